"""Start a training stage with the right number of processes.

    python -m arsr.stages.launch train_srvar [stage options]

Reads ``resources.<stage>.nproc`` from params.yaml (or ``$ARSR_RESOURCES__<STAGE>__NPROC``) as the
ranks per node, except in a SLURM job with GPUs, where each node runs one rank per GPU SLURM
allocated there (``SLURM_GPUS_ON_NODE``: the site profile's ``gpus_per_node`` reaches sbatch as
``--gres=gpu:<n>`` and the launcher through the allocation, one number in one place), and
execs one of:

- ``nproc == 1`` outside SLURM: the stage as one plain process (no torchrun);
- outside SLURM: ``torchrun --standalone --nproc-per-node=N -m arsr.stages.<stage>``;
- inside a SLURM job step (Snakemake's default: its jobstep executor runs each rule under
  ``srun -n1``): torchrun over the step's nodes with a c10d rendezvous on the step's first
  node, at a port derived from the job id (two jobs on one node never collide);
- inside a SLURM batch script (no step yet; a rule with the ``mpi`` resource, or your own
  sbatch script) on several nodes: ``srun --ntasks-per-node=1`` runs this launcher once per
  node, which then takes the case above; on one node, torchrun directly.

Inside SLURM the torchrun agent ignores SIGUSR1: ``sbatch --signal=USR1@120`` reaches every
process of the step, and only the training ranks should react (the engine checkpoints and
exits non-zero); an agent killed by the signal would leave them orphaned.

No process outlives its parent (``arsr.proc``): the launcher arms a death signal before it execs,
so torchrun's agent (or the one training process) dies with whoever started the launcher, each
torchrun rank starts as ``python -m arsr.proc -m arsr.stages.<stage>`` (which ties it to the agent,
then execs the stage), and the ranks' loader workers die with their rank. A ``kill -9`` of the
runner therefore leaves no rank training on to write outputs behind its back.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

# Who started this process, read before the slow imports below: the launcher dies with it (see
# main), and a parent that exits before that is set up shows as another parent pid by then.
STARTED_BY = os.getppid()

from arsr.config import RESOURCES_ENV_PREFIX, TRAINING_STAGES, ConfigError, load_params  # noqa: E402
from arsr.proc import PARENT_PID_ENV, die_with_parent, thread_env, threads_per_process  # noqa: E402
from arsr.runlock import HELD_ENV, RunLocked, acquire  # noqa: E402
from arsr.slurm import allocated_gpus  # noqa: E402
from arsr.stages.common import RUNS_DIR, out_option, params_option  # noqa: E402

# A training stage is `train_<section>`, and that params section has a `train` subsection.
SECTIONS = TRAINING_STAGES


def rendezvous_port(job_id: str) -> int:
    """A port in [20000, 40000) that is a pure function of the SLURM job id."""
    return 20000 + int(job_id) % 20000


def threads_per_rank(nproc: int, env: dict[str, str]) -> int:
    """Intra-op threads for each of ``nproc`` ranks: the CPUs this process may use (affinity, SLURM,
    cgroup quota, ``$ARSR_CPUS``: :func:`arsr.proc.usable_cpus`), shared out.

    Exported (:func:`arsr.proc.thread_env`) so that every runner trains the same way: torchrun's
    default is 1 per rank, Snakemake exports the rule's ``threads``, a plain process takes every
    core. ``ARSR_THREADS_PER_RANK`` overrides."""
    return threads_per_process(nproc, env)


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA); asks the driver without creating a context."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _first_host(nodelist: str) -> str:
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    return nodelist.split(",")[0].split("[")[0]


def complete_slurm_env(env: dict[str, str]) -> dict[str, str]:
    """Fill in the job's node count, node list and CPUs per task from ``scontrol`` when missing.

    Snakemake's jobstep executor keeps only ``SLURM_JOB_ID`` (and a few ids) of the ``SLURM_*``
    variables before it runs a rule; without this a multi-node rule would train on one node.
    """
    job_id = env.get("SLURM_JOB_ID")
    if job_id is None or "SLURM_STEP_ID" in env or "SLURM_JOB_NUM_NODES" in env:
        return env
    if not shutil.which("scontrol"):
        return env
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if out.returncode != 0:
        return env
    fields = dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)
    env = dict(env)
    for var, key in (
        ("SLURM_JOB_NUM_NODES", "NumNodes"),
        ("SLURM_JOB_NODELIST", "NodeList"),
        ("SLURM_CPUS_PER_TASK", "CPUs/Task"),
    ):
        value = fields.get(key, "")
        if var not in env and value not in ("", "(null)", "N/A"):
            env[var] = value
    return env


def _torchrun(job_id: str, nnodes: int, nodelist: str, nproc: int, module: list[str]) -> list[str]:
    head = _first_host(nodelist)
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={head}:{rendezvous_port(job_id)}", f"--rdzv-id={job_id}",
        *module,
    ]  # fmt: skip


def build_command(stage: str, nproc: int, env: dict[str, str], extra: list[str]) -> list[str]:
    module = ["-m", f"arsr.stages.{stage}", *extra]
    # A torchrun rank starts as `python -m arsr.proc`, which ties it to the torchrun agent and then
    # execs the stage: torchrun puts each rank in a session of its own, so a kill of the runner's
    # process group would miss the ranks. (One plain process dies with this launcher: see main.)
    rank = ["-m", "arsr.proc", *module]
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
            *rank,
        ]
    job_nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    job_nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "localhost"
    if "SLURM_STEP_ID" in env:
        # Already in a step: one torchrun per node of *this step* (it may span fewer nodes
        # than the job, e.g. under Snakemake's `srun -n1`).
        nnodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        if nnodes < job_nodes:
            print(
                f"launch: warning: the job has {job_nodes} nodes but this step {nnodes}; training on "
                f"{nnodes} (for a multi-node rule give it the `mpi: srun` and `tasks` resources)",
                file=sys.stderr,
            )
        return _torchrun(job_id, nnodes, env.get("SLURM_STEP_NODELIST") or job_nodelist, nproc, rank)
    if job_nodes == 1:
        return _torchrun(job_id, 1, job_nodelist, nproc, rank)
    # Batch script on several nodes: a step with this launcher once per node (see above).
    cpus = [f"--cpus-per-task={env['SLURM_CPUS_PER_TASK']}"] if env.get("SLURM_CPUS_PER_TASK") else []
    return [
        "srun", f"--nodes={job_nodes}", "--ntasks-per-node=1", *cpus, "--kill-on-bad-exit=1",
        sys.executable, "-m", "arsr.stages.launch", stage, *extra,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SECTIONS:
        print(f"usage: python -m arsr.stages.launch {{{','.join(SECTIONS)}}} [options]", file=sys.stderr)
        return 2
    stage, extra = argv[0], argv[1:]
    params_file = params_option(extra)  # --params F, --params=F: as the stage's parser reads it
    try:
        nproc = getattr(load_params(params_file).resources, stage).nproc
    except ConfigError as err:
        print(f"arsr {stage}: error: {err}", file=sys.stderr)
        return 2
    allocated = allocated_gpus()
    if allocated:  # a SLURM job with GPUs: one rank per GPU of this node (the site's gpus_per_node)
        if allocated != nproc:
            print(
                f"launch: {allocated} ranks per node, one per GPU SLURM allocated "
                f"(resources.{stage}.nproc {nproc} applies outside such a job)",
                file=sys.stderr,
            )
        nproc = allocated
    gpus = visible_gpus()
    if 0 < gpus < nproc:  # NCCL cannot put two ranks on one GPU
        print(
            f"arsr {stage}: error: resources.{stage}.nproc: {nproc} ranks per node but {gpus} GPU(s) "
            f"visible; set it to {gpus} (e.g. dvc exp run -S resources.{stage}.nproc={gpus}, or "
            f"{RESOURCES_ENV_PREFIX}{stage.upper()}__NPROC={gpus}: nothing reruns); the global batch_size "
            "stays the same",
            file=sys.stderr,
        )
        return 2
    env = complete_slurm_env(dict(os.environ))
    cmd = build_command(stage, nproc, env, extra)
    if cmd[0] != "srun":  # (a multi-node batch script: the launcher run on each node decides)
        try:
            threads = threads_per_rank(nproc, env)
        except ValueError as err:
            print(f"arsr {stage}: error: {err}", file=sys.stderr)
            return 2
        os.environ.update(thread_env(threads))  # the ranks' (OpenMP reads it when torch loads)
        if "SLURM_JOB_ID" in env:
            # Inherited across exec by torchrun and its workers; the engine installs its own handler.
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    # This process becomes torchrun's agent, srun or the one training process (exec keeps the pid
    # and the death signal): it dies with whoever started it (dvc, Snakemake's shell, slurmstepd),
    # and torchrun's ranks check they are children of this pid (arsr.proc). ARSR_DIE_WITH_PARENT=0
    # keeps a launcher started by hand running after its shell exits (`nohup ... &`, then logout).
    if os.environ.get("ARSR_DIE_WITH_PARENT", "1") != "0":
        die_with_parent(STARTED_BY)
    if "torch.distributed.run" in cmd:
        os.environ[PARENT_PID_ENV] = str(os.getpid())
    # One live writer per run folder: the lock names this pid, which exec keeps (torchrun's agent,
    # srun, or the one training process), so it turns stale when the training ends. The ranks and
    # the launchers `srun` starts on the other nodes see it held in the environment.
    folder = out_option(extra, RUNS_DIR / SECTIONS[stage]).resolve()
    if os.environ.get(HELD_ENV) != str(folder):
        try:
            acquire(folder, f"arsr {stage}")
        except RunLocked as err:
            print(f"arsr {stage}: error: {err}", file=sys.stderr)
            return 2
        os.environ[HELD_ENV] = str(folder)
    print("launch:", " ".join(cmd), file=sys.stderr, flush=True)
    os.execvp(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
