"""Stages next to a busy process: how much longer they take than on idle cores (issue 14, point 4).

    python benchmarks/bench_contention.py [--project DIR] [--reps 3] [--json OUT]
                                          [--variant NAME SRC|- ACTIVE|PASSIVE|- ...]

Builds a small DAG once in ``--project`` (default: a temporary folder): shards of the built-in photos
at 32 px, a regression base of the default size, a tiny tokenizer, SRVAR and MAR. Then it times

- ``evaluate``: ``python -m arsr.stages.evaluate --out <tmp>`` (bicubic, base, tokenizer, SRVAR and
  MAR on every val crop, metrics),
- ``train_base``: ``python -m arsr.stages.launch train_base --out <tmp>`` (2 ranks from scratch),

each idle and next to one busy single-threaded process (``python -c "while True: pass"``),
interleaved (repetition 1: every variant idle, then busy; repetition 2: ...), and prints the median
wall time of each and their ratio. On 2 cores the busy process is owed one core: a stage that uses
both cores well takes 2x as long next to it, one that spins on the core it does not get much
longer. Goal: <= 2.2x.

A ``--variant NAME SRC POLICY`` (repeatable; default ``installed - -``) runs source tree SRC (put first
on PYTHONPATH; ``-``: the installed arsr), e.g. a copy of ``src/`` from before a change, with
OMP_WAIT_POLICY=POLICY (``-``: whatever the code does itself), on a project of its own (built once,
in ``--project``/NAME) whose params.yaml has the layout that code reads (``resources`` or the older
``<section>.train.nproc``). Variants are interleaved too, so a machine whose other load drifts
affects them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

_RUN = {"val_every": 1000, "ckpt_every": 1000, "log_every": 20, "warmup_steps": 2, "amp": "none"}
SCIENCE = {
    "seed": 0,
    "data": {"source": "builtin", "hr_size": 32, "scale": 4, "crop_stride": 32, "min_shards": 4},
    "base": {"train": {**_RUN, "max_steps": 60, "batch_size": 32, "warmup_steps": 5}},
    "vqvae": {
        "model": {"ch": 16, "ch_mult": [1, 2, 2, 4], "vocab_size": 64, "z_channels": 8,
                  "patch_nums": [1, 2, 3, 4]},
        "train": {**_RUN, "max_steps": 20, "batch_size": 16},
    },
    "srvar": {"model": {"depth": 2, "width": 64, "heads": 2},
              "train": {**_RUN, "max_steps": 20, "batch_size": 16}},
    "mar": {
        "model": {
            "encoder_dim": 64, "decoder_dim": 64, "encoder_depth": 1, "decoder_depth": 1, "encoder_heads": 2,
            "decoder_heads": 2, "buffer_size": 4, "diffloss_width": 64, "diffloss_depth": 2,
            "num_sampling_steps": "ddim10",
        },
        "train": {**_RUN, "max_steps": 20, "batch_size": 16},
    },
    "eval": {"max_val_images": 0, "num_samples": 2, "mar": {"num_iter": 4}},
}  # fmt: skip
RANKS = {"nproc": 2, "workers": 1}
BUILD = [
    ["-m", "arsr.stages.shard"],
    ["-m", "arsr.stages.launch", "train_base"],
    ["-m", "arsr.stages.launch", "train_vqvae"],
    ["-m", "arsr.stages.tokenize"],
    ["-m", "arsr.stages.launch", "train_srvar"],
    ["-m", "arsr.stages.launch", "train_mar"],
]


def stage_env(src: str | None, wait_policy: str | None) -> dict[str, str]:
    """The environment of the timed stages: no thread, CPU or arsr settings of this shell (each
    code version decides itself), W&B off, CPU only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARSR_", "OMP_", "MKL_", "OPENBLAS_"))}
    env |= {"WANDB_MODE": "disabled", "ARSR_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}
    if src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    return env


def params_for(env: dict[str, str]) -> dict:
    """SCIENCE plus the machine settings, in the layout the code under test reads."""
    probe = "from arsr.config import Params; print('resources' in Params.model_fields)"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    p = json.loads(json.dumps(SCIENCE))
    if out.stdout.strip() == "True":
        p["resources"] = {f"train_{s}": dict(RANKS) for s in ("base", "vqvae", "srvar", "mar")}
        p["resources"] |= {"shard": {"workers": 2}, "tokenize": {"batch_size": 64, "workers": 2}}
    else:  # before resources: machine settings inside the sections
        for s in ("base", "vqvae", "srvar", "mar"):
            p[s]["train"] |= RANKS
        p["data"]["workers"] = 2
        p["tokenize"] = {"batch_size": 64, "workers": 2}
    return p


def build(project: Path, env: dict[str, str]) -> None:
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params_for(env), sort_keys=False))
    if (project / "runs/mar/model.pt").is_file():
        return
    for args in BUILD:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, *args], cwd=project, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"build: {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        print(f"build: {' '.join(args[1:])}: {time.perf_counter() - t0:.1f} s", flush=True)


def timed(cmd: list[str], project: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--project", type=Path, help="projects are built here once (default: a temporary folder)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--variant", nargs=3, action="append", metavar=("NAME", "SRC", "POLICY"),
        help="code (a source tree, or - for the installed arsr) and OMP_WAIT_POLICY (or -) to time",
    )  # fmt: skip
    ap.add_argument("--stages", default="evaluate,train_base", help="comma-separated: evaluate,train_base")
    ap.add_argument("--json", type=Path, help="also write the times here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_contention_"))
    root = args.project or tmp
    variants = {}
    for name, src, policy in args.variant or [("installed", "-", "-")]:
        env = stage_env(None if src == "-" else src, None if policy == "-" else policy)
        build(root / name, env)
        variants[name] = env
    commands = {
        "evaluate": [sys.executable, "-m", "arsr.stages.evaluate", "--out", str(tmp / "eval")],
        "train_base": [sys.executable, "-m", "arsr.stages.launch", "train_base", "--out", str(tmp / "base")],
    }
    stages = args.stages.split(",")
    times: dict[tuple[str, str], dict[str, list[float]]] = {
        (v, s): {"idle": [], "busy": []} for v in variants for s in stages
    }
    try:
        for rep in range(args.reps):
            for cond in ("idle", "busy"):
                busy = None
                if cond == "busy":
                    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    time.sleep(0.5)
                try:
                    for stage in stages:
                        for name, env in variants.items():
                            shutil.rmtree(tmp / "eval", ignore_errors=True)
                            shutil.rmtree(tmp / "base", ignore_errors=True)  # trains from scratch each time
                            t = timed(commands[stage], root / name, env)
                            times[name, stage][cond].append(t)
                            print(f"rep {rep + 1} {cond:4} {stage:10} {name:12} {t:6.1f} s", flush=True)
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
    finally:
        shutil.rmtree(tmp / "eval", ignore_errors=True)
        shutil.rmtree(tmp / "base", ignore_errors=True)
    print(f"\n{len(os.sched_getaffinity(0))} CPUs, {args.reps} interleaved reps, median wall s:")
    summary = []
    for (name, stage), t in times.items():
        idle, busy_t = statistics.median(t["idle"]), statistics.median(t["busy"])
        ratio = busy_t / idle
        summary.append(
            {"variant": name, "stage": stage, "idle_s": idle, "busy_s": busy_t, "ratio": ratio, **t}
        )
        print(f"  {stage:10} {name:12} idle {idle:6.1f}  busy {busy_t:6.1f}  ratio {ratio:.2f} (goal <= 2.2)")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)  # (the projects too, unless --project keeps them elsewhere)
    return 0


if __name__ == "__main__":
    sys.exit(main())
