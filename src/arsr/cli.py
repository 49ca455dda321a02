"""The `arsr` command: one sub-command per module of ``arsr.stages`` (each DAG stage, plus the
``upscale`` tool); ``arsr <command> --help`` describes each.

A training command (``train_<section>``, whose params section has a ``train`` subsection) starts as
the DAG starts it: ``python -m arsr.stages.launch <command> ...`` (torchrun with ``resources.<command>.nproc``
ranks, srun inside SLURM); ``arsr <command> --help`` only prints the stage's help.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import pkgutil
import re
import sys
from pathlib import Path

import arsr.stages

NOT_COMMANDS = {"common", "launch"}
COMMANDS = {
    m.name: f"arsr.stages.{m.name}"
    for m in pkgutil.iter_modules(arsr.stages.__path__)
    if m.name not in NOT_COMMANDS
}


def summary(module: str) -> str:
    """The first paragraph of a stage module's docstring as one line, without its ``Stage `x`:``
    prefix. Read from the source, not imported: importing a stage imports torch (seconds), and
    ``arsr --help`` should answer at once."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""
    line = " ".join(doc.strip().split("\n\n")[0].split())
    line = re.sub(r"^(Stage `\w+`|`arsr \w+`):\s*", "", line)
    return line.replace("``", "`")


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = [f"  {name:<{width}}  {summary(COMMANDS[name])}" for name in sorted(COMMANDS)]
    about = __doc__.strip().replace("``", "`")
    return f"usage: arsr <command> [options]\n\n{about}\n\ncommands:\n" + "\n".join(rows)


def wants_help(argv: list[str]) -> bool:
    """Whether a command line asks for help (``-h``/``--help`` in any position argparse accepts)."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("-h", "--help", action="store_true")
    return bool(ap.parse_known_args(argv)[0].help)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0].replace("-", "_"), argv[1:]
    if name not in COMMANDS:
        print(f"arsr: unknown command {argv[0]!r}; one of: {', '.join(sorted(COMMANDS))}", file=sys.stderr)
        return 2
    if name.startswith("train_") and not wants_help(rest):
        from arsr.stages import launch

        if name in launch.SECTIONS:  # exec's torchrun (or the stage itself when nproc is 1)
            return int(launch.main([name, *rest]) or 0)
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
