"""The `arsr` command: one sub-command per DAG stage, plus tools.

arsr shard | train_vqvae | tokenize | train_srvar | train_mar | evaluate | report | upscale
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "shard": "arsr.stages.shard",
    "train_vqvae": "arsr.stages.train_vqvae",
    "tokenize": "arsr.stages.tokenize",
    "train_srvar": "arsr.stages.train_srvar",
    "train_mar": "arsr.stages.train_mar",
    "evaluate": "arsr.stages.evaluate",
    "report": "arsr.stages.report",
    "upscale": "arsr.stages.upscale",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    name, rest = argv[0].replace("-", "_"), argv[1:]
    if name not in COMMANDS:
        print(f"arsr: unknown command {argv[0]!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name])
    except ModuleNotFoundError as err:
        if err.name == COMMANDS[name]:
            print(f"arsr: command {name!r} is not available in this version", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
