"""Stage `check`: validate params.yaml before any stage can delete an output.

    python -m arsr.stages.check          # what `dvc repro` runs first; `arsr check` by hand

DVC removes a stage's outputs before running its command, and each stage validates params.yaml only
inside its command: a typo would cost trained outputs. So this stage comes first and every other
stage depends on its output: it depends on every section of params.yaml but ``resources`` (any edit
reruns it, in a second; a machine setting reruns nothing at all), validates the schema (resources
and their ``ARSR_RESOURCES__*`` overrides included), the cross-section rules and that every key a
dvc.yaml stage declares is in the file, and fails naming the key; DVC then stops before touching
anything downstream. On success it
writes ``runs/check/params.ok``, whose bytes never change (so no downstream stage reruns because of
it), as a ``persist`` output: a failed check does not even remove that file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from arsr.config import PARAMS_FILE, Params, load_params
from arsr.io import atomic_write_text
from arsr.proc import threads_per_process

# Every top-level section but the machine's, each declared whole (RUNTIME keys included: a bad one
# must fail here too), not key by key as the other stages' (tests/test_dvc_yaml.py).
PARAMS: tuple[str, ...] = tuple(name for name in Params.model_fields if name != "resources")
WHOLE_SECTIONS = True
CHECK_FILE = Path("runs/check/params.ok")
CHECK_TEXT = "params.yaml is valid for every stage of dvc.yaml\n"


def declared_keys(dvc_yaml: str | Path, params_file: str = PARAMS_FILE) -> dict[str, str]:
    """``{key: "dvc.yaml stage <name>"}`` for every params key a dvc.yaml stage declares from
    ``params_file`` (entries naming another file, or a whole file, are left out)."""
    path = Path(dvc_yaml)
    if not path.is_file():
        return {}
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    out: dict[str, str] = {}
    for name, spec in stages.items():
        for entry in spec.get("params", []) if isinstance(spec, dict) else []:
            keys = [entry] if isinstance(entry, str) else entry.get(Path(params_file).name) or []
            for key in keys:
                out.setdefault(key, f"{path.name} stage {name}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="arsr check", description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--params", default=PARAMS_FILE, help="parameters file (default: params.yaml)")
    ap.add_argument("--dvc-yaml", default="dvc.yaml", help="the DAG whose declared keys must be present")
    ap.add_argument("--out", type=Path, default=CHECK_FILE, help=f"written if valid (default: {CHECK_FILE})")
    args = ap.parse_args(argv)
    try:
        load_params(args.params, required=declared_keys(args.dvc_yaml, args.params))
        threads_per_process()  # $ARSR_CPUS, $ARSR_THREADS_PER_RANK: every stage would refuse them
    except ValueError as err:  # (a ConfigError is one too)
        print(f"arsr check: error: {err}", file=sys.stderr)
        print("arsr check: nothing was run or removed; fix the key(s) above", file=sys.stderr)
        return 2
    if not args.out.is_file() or args.out.read_text() != CHECK_TEXT:
        atomic_write_text(args.out, CHECK_TEXT)
    print(f"arsr check: {args.params} is valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
