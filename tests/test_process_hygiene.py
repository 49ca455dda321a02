"""No process outlives its parent (arsr.proc): a training stage killed with kill -9 leaves no rank,
loader worker or pool worker running on to write outputs behind the runner's back.

The stage runs are real: `dvc repro train_base` in a throw-away copy of this repo (torchrun, 2 ranks
x 1 loader worker), and `python -m arsr.stages.launch train_base` (one plain process), on tiny
shards, told to train far longer than the test waits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipeline_fixtures import make_project
from stage_helpers import write_params_file

ROOT = Path(__file__).resolve().parents[1]
GONE_WITHIN_S = 10.0

TINY = {
    "seed": 0,
    "data": {"source": "builtin", "hr_size": 32, "scale": 4, "crop_stride": 32, "max_crops_per_image": 12,
             "min_shards": 2},
    "base": {"model": {"channels": 8, "depth": 3},
             "train": {"max_steps": 100_000, "batch_size": 4, "warmup_steps": 1,
                       "amp": "none", "val_every": 100_000, "log_every": 1, "ckpt_every": 100_000}},
    "vqvae": {"model": {"patch_nums": [1, 2, 3, 4]}},  # the tokenizer's grid must fit 32 px (unused here)
    "resources": {"shard": {"workers": 1}, "train_base": {"nproc": 2, "workers": 1}},
}  # fmt: skip


def env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "WANDB_SERVICE", "ARSR_PARENT_PID", "ARSR_DIE_WITH_PARENT")
    e = {k: v for k, v in os.environ.items() if k not in drop}
    path = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"  # dvc, and the stages' python
    return e | {"PATH": path, "WANDB_MODE": "disabled", "ARSR_THREADS_PER_RANK": "1", "PYTHONUNBUFFERED": "1"}


def processes(folder: Path) -> dict[int, tuple[int, str]]:
    """{pid: (session id, command line)} of the live (not zombie) processes working in ``folder``
    (their working directory, or a path on their command line), this test process excepted."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, session
        mine = cwd == str(folder) or cwd.startswith(f"{folder}/") or str(folder) in cmdline
        if mine and fields[0] != "Z":
            found[int(entry.name)] = (int(fields[3]), cmdline)
    return found


def wait_until_gone(folder: Path) -> dict[int, tuple[int, str]]:
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := processes(folder)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away copy of this repo with the tiny params.yaml, its shards made by `dvc repro shard`."""
    proj = make_project(tmp_path_factory.mktemp("hygiene"), TINY)
    p = subprocess.run(
        ["dvc", "repro", "shard"], cwd=proj, env=env(), capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return proj


@pytest.fixture
def reaper() -> Iterator[list[Path]]:
    """Folders whose processes are killed after the test, whatever it asserted (no leftovers)."""
    folders: list[Path] = []
    yield folders
    for folder in folders:
        for pid in processes(folder):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    """``cmd`` in a session of its own (as a terminal or a scheduler would run it), output to a log."""
    with open(cwd / "log.txt", "w") as log:
        return subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def wait_for_training(proc: subprocess.Popen, out: Path, log: Path, timeout: float = 120.0) -> None:
    """Until rank 0 has logged a few steps (plots/loss.tsv has rows)."""
    loss = out / "plots" / "loss.tsv"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        if loss.is_file() and len(loss.read_text().splitlines()) >= 3:
            return
        time.sleep(0.1)
    pytest.fail(f"no training within {timeout} s: {log.read_text()[-3000:]}")


def test_kill9_of_dvc_repro_leaves_no_rank_training(project: Path, reaper: list[Path]) -> None:
    reaper.append(project)
    proc = start(["dvc", "repro", "train_base"], project)
    out = project / "runs" / "base"
    wait_for_training(proc, out, project / "log.txt")
    running = processes(project)
    # torchrun put the ranks (and their loader workers) in sessions of their own: the kill below
    # does not reach them, their parents' deaths must.
    elsewhere = [pid for pid, (sid, _) in running.items() if sid != proc.pid]
    assert len(elsewhere) >= 4, running  # 2 ranks + 2 loader workers
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGKILL)  # dvc, its shell, the launcher become torchrun's agent
    proc.wait(timeout=10)
    left = wait_until_gone(project)
    print(f"{len(running)} processes gone {time.monotonic() - t0:.2f} s after the kill")
    assert not left, left
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()


def test_one_training_process_dies_with_its_parent(project: Path, reaper: list[Path]) -> None:
    """nproc 1: the launcher execs the stage itself; killing only the process that started it (as
    if `dvc repro` alone were killed) ends the stage and its loader worker."""
    folder = project / "plain"
    folder.mkdir()
    reaper.append(folder)
    params = write_params_file(folder, TINY, **{"resources.train_base.nproc": 1})
    parent = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"]
    launch = [sys.executable, "-m", "arsr.stages.launch", "train_base", "--params", str(params),
              "--shards", str(project / "data" / "shards"), "--out", str(folder / "run")]  # fmt: skip
    proc = start([*parent, *launch], folder)
    wait_for_training(proc, folder / "run", folder / "log.txt")
    running = processes(folder)
    assert len(running) >= 3, running  # the parent, the stage and its loader worker
    t0 = time.monotonic()
    proc.send_signal(signal.SIGKILL)  # the parent only, not its process group
    proc.wait(timeout=10)
    left = wait_until_gone(folder)
    print(f"{len(running)} processes gone {time.monotonic() - t0:.2f} s after the kill")
    assert not left, left
    assert not (folder / "run" / "model.pt").exists() and not (folder / "run" / "metrics.json").exists()


POOL_PARENT = """
import multiprocessing, sys, time
from arsr.proc import spawn_pool
pool = spawn_pool(2, print, ("worker up",))
pool.map_async(time.sleep, [600, 600], chunksize=1)  # one long task each (a shard to encode)
print(*[p.pid for p in multiprocessing.active_children()], file=sys.stderr, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_spawn_pool_workers_die_with_their_parent() -> None:
    """The pools of shard and tokenize: a worker busy with a task would otherwise finish it (write
    its shard) after its parent is gone."""
    proc = subprocess.Popen([sys.executable, "-c", POOL_PARENT], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    workers: list[int] = []
    try:
        workers = [int(pid) for pid in proc.stderr.readline().split()]
        assert len(workers) == 2
        time.sleep(1.0)  # both at their tasks
        assert all(alive(pid) for pid in workers)
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + GONE_WITHIN_S
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers)
        assert proc.stdout.read().count("worker up") == 2  # the pool's own initializer ran too
    finally:
        proc.kill()
        for pid in filter(alive, workers):
            os.kill(pid, signal.SIGKILL)


def test_a_process_whose_parent_is_already_gone_kills_itself() -> None:
    """The race check: a parent that died before the child armed its death signal."""
    code = "import sys; from arsr.proc import die_with_parent as die; die(int(sys.argv[1])); print('alive')"
    same = subprocess.run([sys.executable, "-c", code, str(os.getpid())], capture_output=True, text=True)
    assert same.returncode == 0 and same.stdout == "alive\n", same.stderr
    other = subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True)
    assert other.returncode == -signal.SIGKILL and other.stdout == ""
