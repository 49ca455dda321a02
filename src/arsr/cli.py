"""The `arsr` command: one sub-command per module of ``arsr.stages`` (each DAG stage, plus the
``upscale`` tool); ``arsr <command> --help`` describes each.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import arsr.stages

NOT_COMMANDS = {"common", "launch"}
COMMANDS = {
    m.name: f"arsr.stages.{m.name}"
    for m in pkgutil.iter_modules(arsr.stages.__path__)
    if m.name not in NOT_COMMANDS
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: arsr {{{' | '.join(sorted(COMMANDS))}}} [options]\n\n{__doc__.strip()}")
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
