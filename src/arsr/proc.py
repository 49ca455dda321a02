"""Child processes that never outlive their parent.

A process killed with SIGKILL cannot stop its children, and some of ours would carry on without
it: torchrun starts every training rank in a session of its own (so a ``kill -9`` of the runner's
process group misses them) and a multiprocessing pool worker waits forever on a queue whose
writer end it holds itself. Left alone, a rank trains to the end and writes ``model.pt`` and
``metrics.json`` behind the runner's back (DVC never records them); a pool worker lingers.

Linux ties a process to its parent with ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills it
when the parent exits. The child arms it itself, so two things need care:

- a parent that dies between starting the child and the ``prctl`` call is missed: the child
  compares ``os.getppid()`` with the parent's pid recorded before it started (an environment
  variable, an initializer argument) and, re-parented already, kills itself;
- the "parent" is the *thread* that started the child: a child started by a thread that ends
  while the child runs would be killed early. Every child armed here is started by a thread
  that outlives it (a main thread, or a pool's own worker-handler thread).

The setting survives ``execve`` (except of setuid programs), so a process can arm itself and then
exec the real command: :func:`main` is how the training launcher ties torchrun's ranks to the
torchrun agent, and the launcher arms itself before it execs torchrun (or the one training
process). Elsewhere than Linux every function here is a no-op.

It also sizes every process's intra-op threads (:func:`usable_cpus`, :func:`threads_per_process`,
:func:`fit_threads`): the CPUs a process may use (its affinity mask, ``SLURM_CPUS_PER_TASK``, the
cgroup CPU quota, ``ARSR_CPUS`` from a runner such as Snakemake) shared out among the sibling
processes doing the same work (torchrun's ranks, a pool's workers), so no machine is oversubscribed
whichever runner starts the stage.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from multiprocessing import get_context
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any, NoReturn

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# The pid a process started through `python -m arsr.proc` must have as its parent (the training
# launcher sets it to its own pid, which torchrun keeps: the launcher execs it).
PARENT_PID_ENV = "ARSR_PARENT_PID"

# The CPUs a runner gives this process tree when the affinity mask does not say so: Snakemake's
# local scheduler shares the cores among its jobs without pinning them (dvc_stages.smk sets it to
# the rule's threads).
CPUS_ENV = "ARSR_CPUS"
# Intra-op threads of each process (each rank of a training stage), whatever the CPUs.
THREADS_ENV = "ARSR_THREADS_PER_RANK"
# What every process this package starts runs with (set for children by thread_env). Passive:
# OpenMP threads that finish a parallel region sleep instead of spinning for the next one (libgomp
# spins ~3 ms by default, for ever with ACTIVE). evaluate next to one busy process on 2 cores took
# 1.43x its idle time passive, 2.40x with ACTIVE, 2.78x before (benchmarks/bench_contention.py);
# idle, passive cost it 7 %.
WAIT_POLICY = "PASSIVE"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPUs' worth of time the cgroup CPU quota of this process allows (the smallest along its
    cgroup and their ancestors, v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``); None without one."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    candidates: list[tuple[Path, Path]] = []  # (cgroup folder, its mount root)
    for line in lines:
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        rel = rel.strip().lstrip("/")
        if controllers == "":  # v2 (a container's namespace shows its own root as "/")
            candidates.append((root / rel, root))
        elif "cpu" in controllers.split(","):  # v1: mounted as cpu or cpu,cpuacct
            for mount in (root / controllers, root / "cpu"):
                if mount.is_dir():
                    candidates.append((mount / rel, mount))
                    break
    best: float | None = None
    for folder, mount in candidates:
        node = folder
        while True:
            q = _read_quota(node)
            if q is not None:
                best = q if best is None else min(best, q)
            if node == mount or mount not in node.parents:
                break
            node = node.parent
    return best


def _read_quota(folder: Path) -> float | None:
    try:
        if (folder / "cpu.max").is_file():
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if (folder / "cpu.cfs_quota_us").is_file():
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            return None if quota < 0 else quota / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        pass
    return None


def _positive_int(env: Mapping[str, str], name: str, strict: bool = True) -> int | None:
    """``$name`` as a whole number >= 1; None when unset. A bad value raises ValueError naming the
    variable (``strict``: ours, a user's typo) or is ignored (not strict: SLURM's)."""
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        n = int(value)
        if n < 1:
            raise ValueError
    except ValueError:
        if not strict:
            return None
        raise ValueError(f"${name}={value!r}: expected a whole number >= 1") from None
    return n


def usable_cpus(env: Mapping[str, str] | None = None) -> int:
    """How many CPUs this process may keep busy: its affinity mask (taskset, SLURM's binding), at
    most ``SLURM_CPUS_PER_TASK`` inside a SLURM job, the cgroup CPU quota (a container's
    ``--cpus``, rounded up) and ``$ARSR_CPUS`` (a runner's share of the cores); at least 1."""
    env = os.environ if env is None else env
    limits = [len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)]
    if env.get("SLURM_JOB_ID"):
        limits.append(_positive_int(env, "SLURM_CPUS_PER_TASK", strict=False) or limits[0])
    quota = _cgroup_quota()
    if quota is not None:
        limits.append(max(1, math.ceil(quota)))
    limits.append(_positive_int(env, CPUS_ENV) or limits[0])
    return max(1, min(limits))


def threads_per_process(processes: int = 1, env: Mapping[str, str] | None = None) -> int:
    """Intra-op threads for each of ``processes`` sibling processes sharing :func:`usable_cpus`
    (``$ARSR_THREADS_PER_RANK`` overrides)."""
    env = os.environ if env is None else env
    return _positive_int(env, THREADS_ENV) or max(1, usable_cpus(env) // max(1, processes))


def thread_env(threads: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables that give a child process ``threads`` intra-op threads (torch's OpenMP, MKL,
    numpy's OpenBLAS) that sleep when idle; they must be in its environment when it starts (the
    libraries read them once, when loaded). A wait policy set in ``env`` is kept."""
    env = os.environ if env is None else env
    n = str(max(1, threads))
    return {
        "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n,
        "OMP_WAIT_POLICY": env.get("OMP_WAIT_POLICY") or WAIT_POLICY,
    }  # fmt: skip


def fit_threads(processes: int = 1, env: MutableMapping[str, str] | None = None) -> int:
    """Size this process's torch threads as one of ``processes`` siblings, and its children's
    environment to match; returns the thread count. (OMP_WAIT_POLICY reaches this process itself
    only when set before torch loads OpenMP: ``arsr/__init__.py`` sets it.)"""
    env = os.environ if env is None else env
    threads = threads_per_process(processes, env)
    env.update(thread_env(threads, env))
    if "torch" in sys.modules:  # (never imported here: the launcher reads this before torch)
        sys.modules["torch"].set_num_threads(threads)
    return threads


def die_with_parent(parent_pid: int | None) -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux; a no-op elsewhere).

    ``parent_pid``: the parent's pid as recorded before this process started; when
    ``os.getppid()`` differs, the parent is gone already and this process kills itself now.
    ``None`` skips that check (the parent's pid is not known)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def _pool_worker_init(
    parent_pid: int, threads: int, initializer: Callable[..., Any] | None, initargs: Sequence[Any]
) -> None:
    die_with_parent(parent_pid)
    if "torch" in sys.modules:  # (a worker restarted later did not start with thread_env)
        sys.modules["torch"].set_num_threads(threads)
    if initializer is not None:
        initializer(*initargs)


def spawn_pool(
    processes: int,
    initializer: Callable[..., Any] | None = None,
    initargs: Sequence[Any] = (),
    threads: int | None = None,
) -> Pool:
    """A ``spawn`` multiprocessing pool whose workers die with this process, each with ``threads``
    intra-op threads (default: this process's CPUs shared out among them), then ``initializer``."""
    threads = threads_per_process(processes) if threads is None else threads
    # The workers start here, with this environment: the thread libraries read it when they load.
    saved = {k: os.environ.get(k) for k in thread_env(threads)}
    os.environ.update(thread_env(threads))
    try:
        return get_context("spawn").Pool(
            processes,
            initializer=_pool_worker_init,
            initargs=(os.getpid(), threads, initializer, tuple(initargs)),
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: list[str] | None = None) -> NoReturn:
    """``python -m arsr.proc (-m MODULE | SCRIPT) [ARGS]``: die with the parent (checked against
    ``$ARSR_PARENT_PID`` when set), then exec ``python (-m MODULE | SCRIPT) ARGS`` with this
    interpreter's options (torchrun's ``-u``). torchrun runs this as each rank (``torchrun ... -m
    arsr.proc -m arsr.stages.train_base``): a rank's parent is the agent."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv == ["-m"]:
        sys.exit("usage: python -m arsr.proc (-m MODULE | SCRIPT) [ARGS]")
    parent = os.environ.pop(PARENT_PID_ENV, None)
    die_with_parent(int(parent) if parent else None)
    # sys.orig_argv = [python, *options, "-m", "arsr.proc", *sys.argv[1:]]
    options = sys.orig_argv[1 : len(sys.orig_argv) - len(sys.argv) - 1]
    os.execv(sys.executable, [sys.executable, *options, *argv])


if __name__ == "__main__":
    main()
