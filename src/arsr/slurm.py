"""A training that outlives its SLURM time limit: requeue the job in place.

``sbatch --signal=USR1@<s>`` (the workflow profile sets it on training rules) warns every job step
some seconds before the time limit; the engine checkpoints on it, and rank 0 then asks SLURM to put
the same job back in the queue (``scontrol requeue $SLURM_JOB_ID``, as submitit and Lightning do).
SLURM stops the job and starts it again later under the same id (``SLURM_RESTART_COUNT`` counts the
restarts): the batch script reruns the rule, and the engine resumes from the checkpoint. Snakemake
sees one job that stays pending or running, so no Snakemake retry is spent on it and a real crash
still fails the job.

At most ``max_requeues`` times (``resources.<stage>.max_requeues``): a training that needs more
windows than that stops with its checkpoint, and a rerun resumes it. The job must be requeueable
(``sbatch --requeue``, also in the profile); SLURM holds a requeued job for about two minutes
before it may start again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping


def restart_count(env: Mapping[str, str] | None = None) -> int:
    """How often this SLURM job was requeued: ``SLURM_RESTART_COUNT``, else ``scontrol show job``'s
    ``Restarts=`` (job steps do not always carry the variable), else 0."""
    env = os.environ if env is None else env
    if env.get("SLURM_RESTART_COUNT", "").isdigit():
        return int(env["SLURM_RESTART_COUNT"])
    job_id = env.get("SLURM_JOB_ID")
    if job_id and shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
        found = re.search(r"\bRestarts=(\d+)", out.stdout)
        if out.returncode == 0 and found:
            return int(found.group(1))
    return 0


def requeue_self(max_requeues: int, env: Mapping[str, str] | None = None) -> bool:
    """Put this SLURM job back in the queue (``scontrol requeue``) unless it was requeued
    ``max_requeues`` times already or runs outside SLURM. Returns whether SLURM accepted; says
    why not on stderr."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return False
    done = restart_count(env)
    if done >= max_requeues:
        print(
            f"slurm: job {job_id} already requeued {done} time(s) (max_requeues {max_requeues}): not again; "
            "rerun the workflow to resume from the checkpoint",
            file=sys.stderr,
            flush=True,
        )
        return False
    if not shutil.which("scontrol"):
        print("slurm: `scontrol` not found: cannot requeue the job", file=sys.stderr, flush=True)
        return False
    out = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        print(
            f"slurm: `scontrol requeue {job_id}` failed: {out.stderr.strip()} (submit with --requeue, or "
            "rerun the workflow to resume from the checkpoint)",
            file=sys.stderr,
            flush=True,
        )
        return False
    print(
        f"slurm: job {job_id} requeued ({done + 1} of at most {max_requeues}); "
        "it resumes from the checkpoint",
        file=sys.stderr,
        flush=True,
    )
    return True


def allocated_gpus(env: Mapping[str, str] | None = None) -> int:
    """GPUs SLURM gave this job on this node (``SLURM_GPUS_ON_NODE``, set for ``--gres=gpu:<n>`` and
    ``--gpus-per-node``), 0 outside a job or without GPUs."""
    env = os.environ if env is None else env
    value = env.get("SLURM_GPUS_ON_NODE", "") if env.get("SLURM_JOB_ID") else ""
    return int(value) if value.isdigit() else 0
