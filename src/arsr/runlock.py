"""One run at a time per run folder: ``<folder>/.lock``.

Two runs of a stage writing into the same folder (a second ``dvc repro`` or Snakemake in the same
workspace, a resubmitted SLURM job while the first still runs, a run started by hand) would overwrite
each other's checkpoints and outputs. Every stage run therefore holds :func:`run_lock` on its run
folder (:func:`arsr.stages.common.run_stage`: ``runs/<stage>/``, never inside a declared DVC output).

The lock is a file created atomically (it appears complete or not at all) holding JSON ``{host, pid,
slurm_job_id, slurm_restart_count, started, owner}``; it is removed when the holder leaves, also on
an exception. A lock left behind by a run that died (``kill -9``, a node crash) is *stale* and taken
over with a note on stderr:

- same host and its pid is no longer running;
- or its SLURM job is over: ``squeue -h -j ID`` (only where ``squeue`` exists) lists it in no active
  state, or not at all;
- or it is an earlier run of this very SLURM job (same job id, lower ``SLURM_RESTART_COUNT``: the job
  was requeued).

A lock from another host with no SLURM job id cannot be checked from here and counts as live.
Otherwise :class:`RunLocked` names the folder, host, pid, job and start time and how to clear it.

Child processes of the holder (torchrun's ranks, which run the stage's own code) find the folder in
``$ARSR_RUN_LOCK_HELD`` (set while the lock is held, inherited by children and across ``exec``) and
do not lock it again: :func:`run_lock` on that folder does nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"
HELD_ENV = "ARSR_RUN_LOCK_HELD"
# squeue states of a job whose processes may still write (anything else, or no line: it is over).
ACTIVE_SLURM_STATES = frozenset(
    {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "STAGE_OUT"}
)


class RunLocked(RuntimeError):
    """Another live run holds the folder's lock; the message says whose and how to clear it."""

    def __init__(self, folder: Path, lock: Path, info: Mapping[str, Any] | None, why: str = "") -> None:
        self.folder, self.lock, self.info = folder, lock, dict(info or {})
        if info is None:
            holder = "its lock file cannot be read"
        else:
            owner, host, pid, job, started = (
                info.get(k) for k in ("owner", "host", "pid", "slurm_job_id", "started")
            )
            holder = f"owner {owner}, host {host}, pid {pid}, SLURM job {job or 'none'}, started {started}"
        super().__init__(
            f"{folder} is in use by another run ({holder}){f'; {why}' if why else ''}. Wait for that run to "
            f"finish or stop it; if you are sure no process writes into {folder} any more, remove {lock} "
            "and start again"
        )


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def lock_info(owner: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What this process writes into a lock it takes."""
    env = os.environ if env is None else env
    restarts = env.get("SLURM_RESTART_COUNT", "")
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": env.get("SLURM_JOB_ID") or None,
        "slurm_restart_count": int(restarts) if restarts.isdigit() else None,
        "started": _now(),
        "owner": owner,
    }


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    try:  # Linux: a zombie has exited, only its parent has not reaped it yet
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def slurm_job_state(job_id: str) -> str | None:
    """``squeue``'s state of SLURM job ``job_id``: e.g. ``RUNNING``; ``""`` when SLURM does not list it
    (the job is over); ``None`` when it cannot be asked (no ``squeue`` here, or it failed)."""
    if not shutil.which("squeue"):
        return None
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, timeout=15
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return "" if "invalid job id" in out.stderr.lower() else None  # (older SLURM: a gone job is an error)
    lines = out.stdout.split()
    return lines[0].strip().upper() if lines else ""


def stale_reason(info: Mapping[str, Any], env: Mapping[str, str] | None = None) -> str | None:
    """Why the lock ``info`` was left by a run that is over (``None``: it may be live)."""
    env = os.environ if env is None else env
    host, job = info.get("host"), info.get("slurm_job_id")
    try:
        pid = int(info.get("pid", 0))
    except (TypeError, ValueError):
        pid = 0
    if host == socket.gethostname() and not pid_alive(pid):
        return f"pid {pid} is no longer running on {host}"
    if job:
        mine, restarts = env.get("SLURM_JOB_ID"), env.get("SLURM_RESTART_COUNT", "")
        theirs = info.get("slurm_restart_count")
        if str(job) == mine and restarts.isdigit() and isinstance(theirs, int) and theirs < int(restarts):
            return f"it is from run {theirs} of this SLURM job {job}, requeued since (now run {restarts})"
        state = slurm_job_state(str(job))
        if state == "":
            return f"SLURM job {job} is over (squeue does not list it)"
        if state is not None and state not in ACTIVE_SLURM_STATES:
            return f"SLURM job {job} is {state}"
    return None


def _create(lock: Path, data: bytes) -> bool:
    """Create ``lock`` holding ``data``, atomically: False if it exists. A hard link of a complete temp
    file (so nobody reads a half-written lock; NFS-safe), else ``O_CREAT | O_EXCL``."""
    tmp = lock.with_name(f"{lock.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, lock)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            pass
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def _read(lock: Path) -> tuple[bytes, dict[str, Any] | None] | None:
    """(bytes, parsed JSON or None if unreadable) of ``lock``; None if there is no such file. A lock
    being written (the ``O_EXCL`` fallback) is read again for up to a second."""
    for attempt in range(10):
        try:
            raw = lock.read_bytes()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(raw)
            if isinstance(info, dict):
                return raw, info
        except ValueError:
            pass
        if attempt < 9:
            time.sleep(0.1)
    return raw, None


def _held_here(folder: Path, env: Mapping[str, str]) -> bool:
    held = env.get(HELD_ENV)
    return bool(held) and Path(held).resolve() == folder.resolve()


def acquire(folder: str | Path, owner: str) -> tuple[Path, bytes]:
    """Take ``<folder>/.lock`` (the folder is created), taking over a stale one with a note on stderr;
    raise :class:`RunLocked` if a live run holds it. Returns (lock path, the bytes written: what
    :func:`release` checks before it removes the file). For :func:`run_lock` and for a launcher that
    must hold the lock across ``exec`` (the lock then names its pid, which ``exec`` keeps)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    for _ in range(5):  # (each pass: the lock was there, and was stale or vanished)
        data = (json.dumps(lock_info(owner), sort_keys=True) + "\n").encode()
        if _create(lock, data):
            return lock, data
        seen = _read(lock)
        if seen is None:  # released meanwhile
            continue
        raw, info = seen
        if info is None:
            raise RunLocked(folder, lock, None)
        if info.get("host") == socket.gethostname() and info.get("pid") == os.getpid():
            why = "this process holds it (it was taken before an exec)"
        else:
            why = stale_reason(info)
        if why is None:
            unknowable = info.get("host") != socket.gethostname() and not info.get("slurm_job_id")
            note = "it runs on another host, with no SLURM job: not checkable from here" if unknowable else ""
            raise RunLocked(folder, lock, info, note)
        print(f"arsr: note: taking over the lock {lock} ({why}; it was taken by {info.get('owner')!s} "
              f"on {info.get('started')!s})", file=sys.stderr, flush=True)  # fmt: skip
        with contextlib.suppress(FileNotFoundError):
            if lock.read_bytes() == raw:  # (not one that another taker wrote meanwhile)
                lock.unlink()
    seen = _read(lock)
    raise RunLocked(folder, lock, seen[1] if seen else None, "it changed hands while being taken over")


def release(lock: Path, data: bytes) -> None:
    """Remove ``lock`` if it still holds ``data`` (a lock that was taken over is someone else's)."""
    try:
        if lock.read_bytes() == data:
            lock.unlink()
        else:
            print(f"arsr: note: {lock} was taken over by another run; left as it is", file=sys.stderr)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def run_lock(folder: str | Path, owner: str) -> Iterator[Path | None]:
    """Hold ``<folder>/.lock`` for the ``with`` block (see the module doc); yields its path, or None
    when ``$ARSR_RUN_LOCK_HELD`` names ``folder`` (a parent process holds it: nothing is done).

    ``$ARSR_RUN_LOCK_HELD`` names the folder while the lock is held. The folder is created if needed
    and removed again, with any parents created, if it is still empty when the lock is released."""
    folder = Path(folder)
    if _held_here(folder, os.environ):
        yield None
        return
    created = []  # the folders this call creates, outermost last
    parent = folder.absolute()
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    lock, data = acquire(folder, owner)
    previous = os.environ.get(HELD_ENV)
    os.environ[HELD_ENV] = str(folder.resolve())
    try:
        yield lock
    finally:
        if previous is None:
            os.environ.pop(HELD_ENV, None)
        else:
            os.environ[HELD_ENV] = previous
        release(lock, data)
        for path in created:  # innermost first; one with files in it stays
            try:
                path.rmdir()
            except OSError:
                break


__all__ = [
    "HELD_ENV",
    "LOCK_NAME",
    "RunLocked",
    "acquire",
    "lock_info",
    "pid_alive",
    "release",
    "run_lock",
    "slurm_job_state",
    "stale_reason",
]
