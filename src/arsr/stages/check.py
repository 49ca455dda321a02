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

It also checks the plan for the target machines (:mod:`arsr.plan`) and prints it, one line per
training stage: ``--nodes N`` nodes per training job (default 1) with ``--gpus-per-node G`` GPUs each
(default 0: CPU nodes, ranks from ``resources.<stage>.nproc``; on GPU nodes one rank per GPU), so
every global batch must divide into nodes x ranks per node x ``resources.<stage>.accum``; and the
workspace needs ``$ARSR_MIN_FREE_GB`` (default 1) GiB of free disk. The DAG runs it with the
defaults, for which the batch rule is the schema's own. Every problem is listed, nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from arsr.config import PARAMS_FILE, Params, load_params
from arsr.io import atomic_write_text
from arsr.plan import plan_problems, plan_summary
from arsr.proc import threads_per_process
from arsr.runlock import RunLocked, run_lock

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


def _count(least: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``least``."""

    def count(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} must be at least {least}")
        return value

    return count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="arsr check", description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--params", default=PARAMS_FILE, help="parameters file (default: params.yaml)")
    ap.add_argument("--dvc-yaml", default="dvc.yaml", help="the DAG whose declared keys must be present")
    ap.add_argument("--out", type=Path, default=CHECK_FILE, help=f"written if valid (default: {CHECK_FILE})")
    ap.add_argument("--nodes", type=_count(1), default=1, help="nodes per training job (default: 1)")
    ap.add_argument(
        "--gpus-per-node",
        type=_count(0),
        default=0,
        help="GPUs per node, one rank each (default: 0 = CPU nodes, ranks from resources.<stage>.nproc)",
    )
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params, required=declared_keys(args.dvc_yaml, args.params))
        threads_per_process()  # $ARSR_CPUS, $ARSR_THREADS_PER_RANK: every stage would refuse them
    except ValueError as err:  # (a ConfigError is one too)
        print(f"arsr check: error: {err}", file=sys.stderr)
        print("arsr check: nothing was run or removed; fix the key(s) above", file=sys.stderr)
        return 2
    target = f"{args.nodes} node(s) x " + (
        f"{args.gpus_per_node} GPU(s)" if args.gpus_per_node else "CPU ranks (resources.<stage>.nproc)"
    )
    print(f"arsr check: plan for training jobs on {target}:")
    for line in plan_summary(params, args.nodes, args.gpus_per_node):
        print(f"  {line}")
    problems = plan_problems(params, args.nodes, args.gpus_per_node, workspace=Path.cwd())
    if problems:
        print(f"arsr check: error: {len(problems)} problem(s) with this plan:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        print("arsr check: nothing was run or removed; fix the setting(s) above", file=sys.stderr)
        return 2
    if not args.out.is_file() or args.out.read_text() != CHECK_TEXT:
        try:
            with run_lock(args.out.parent, "arsr check"):  # (runs/check/.lock: not a DVC output)
                atomic_write_text(args.out, CHECK_TEXT)
        except RunLocked as err:
            print(f"arsr check: error: {err}", file=sys.stderr)
            return 2
    print(f"arsr check: {args.params} is valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
