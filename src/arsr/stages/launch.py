"""Start a training stage with the right number of processes.

    python -m arsr.stages.launch train_srvar [stage options]

Reads ``<section>.train.nproc`` from params.yaml and execs one of:

- ``nproc == 1`` outside SLURM: the stage as one plain process (no torchrun);
- outside SLURM: ``torchrun --standalone --nproc-per-node=N -m arsr.stages.<stage>``;
- inside a SLURM job: torchrun with a c10d rendezvous on the job's first node, at a port
  derived from the job id (two jobs on one node never collide), one torchrun per node;
  from a batch script (no step yet) it goes through ``srun --ntasks-per-node=1`` so one
  rule can span several nodes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from arsr.config import ConfigError, load_params

SECTIONS = {"train_vqvae": "vqvae", "train_srvar": "srvar", "train_mar": "mar"}


def rendezvous_port(job_id: str) -> int:
    """A port in [20000, 40000) that is a pure function of the SLURM job id."""
    return 20000 + int(job_id) % 20000


def _first_host(nodelist: str) -> str:
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    return nodelist.split(",")[0].split("[")[0]


def build_command(stage: str, nproc: int, env: dict[str, str], extra: list[str]) -> list[str]:
    module = ["-m", f"arsr.stages.{stage}", *extra]
    job_id = env.get("SLURM_JOB_ID")
    if job_id is None:
        if nproc == 1:
            return [sys.executable, *module]
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *module,
        ]
    nnodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    head = _first_host(env.get("SLURM_JOB_NODELIST", "localhost"))
    torchrun = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={head}:{rendezvous_port(job_id)}", f"--rdzv-id={job_id}",
        *module,
    ]  # fmt: skip
    if "SLURM_STEP_ID" in env or nnodes == 1:
        return torchrun  # already inside a step (or one node): no nested srun
    return ["srun", f"--nodes={nnodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *torchrun]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SECTIONS:
        print(f"usage: python -m arsr.stages.launch {{{','.join(SECTIONS)}}} [options]", file=sys.stderr)
        return 2
    stage, extra = argv[0], argv[1:]
    params_file = extra[extra.index("--params") + 1] if "--params" in extra else "params.yaml"
    try:
        nproc = getattr(load_params(params_file), SECTIONS[stage]).train.nproc
    except ConfigError as err:
        print(f"arsr {stage}: error: {err}", file=sys.stderr)
        return 2
    cmd = build_command(stage, nproc, dict(os.environ), extra)
    print("launch:", " ".join(cmd), file=sys.stderr, flush=True)
    os.execvp(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
