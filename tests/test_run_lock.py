"""One run at a time per run folder (arsr.runlock, held by every stage run: arsr.stages.common.run_stage).

A second holder is refused with a message naming the first and how to clear the lock; a lock left by
a dead process (or a finished SLURM job) is taken over; the lock goes on exit, exceptions included;
children of the holder ($ARSR_RUN_LOCK_HELD) do not lock again; and no stage's lock lies inside a
DVC output.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from arsr.runlock import HELD_ENV, LOCK_NAME, RunLocked, run_lock, stale_reason
from arsr.stages.common import stage_lock_folder, stage_parser

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
HOLDER = """
import sys
from arsr.runlock import run_lock
with run_lock(sys.argv[1], "the first run"):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def _no_outer_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (HELD_ENV, "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def _env() -> dict[str, str]:
    drop = (HELD_ENV, "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "LOCAL_RANK")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ARSR_RESOURCES__")}


def _write_lock(folder: Path, **info: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    base = {"host": HOST, "pid": os.getpid(), "slurm_job_id": None, "started": "2024-01-02T03:04:05+00:00"}
    lock.write_text(json.dumps(base | {"owner": "arsr test"} | info))
    return lock


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_a_second_holder_in_another_process_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "srvar"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=_env(),
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = folder / LOCK_NAME
        info = json.loads(lock.read_text())
        assert info["pid"] == holder.pid and info["host"] == HOST and info["owner"] == "the first run"
        assert info["slurm_job_id"] is None and info["started"]
        with pytest.raises(RunLocked) as caught, run_lock(folder, "the second run"):
            pytest.fail("the lock was taken twice")
        msg = str(caught.value)
        for part in (
            f"{folder} is in use by another run",
            f"owner the first run, host {HOST}, pid {holder.pid}, SLURM job none, started {info['started']}",
            f"remove {lock}",
        ):
            assert part in msg, (part, msg)
        assert json.loads(lock.read_text()) == info  # untouched
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    assert not (folder / LOCK_NAME).exists()
    with run_lock(folder, "the second run") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_stale_lock_of_a_dead_pid_on_this_host_is_taken_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pid = _dead_pid()
    lock = _write_lock(tmp_path, pid=pid, owner="arsr train_srvar")
    assert stale_reason(json.loads(lock.read_text())) == f"pid {pid} is no longer running on {HOST}"
    with run_lock(tmp_path, "arsr train_srvar") as held:
        assert held == lock
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert os.environ[HELD_ENV] == str(tmp_path.resolve())
    err = capsys.readouterr().err
    assert f"taking over the lock {lock} (pid {pid} is no longer running" in err, err
    assert not lock.exists() and HELD_ENV not in os.environ


def test_the_lock_is_removed_after_an_exception(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "run"
    with pytest.raises(ZeroDivisionError), run_lock(folder, "arsr test"):
        assert (folder / LOCK_NAME).is_file()
        (folder / "timing.json").write_text("{}")
        1 / 0  # noqa: B018
    assert not (folder / LOCK_NAME).exists() and (folder / "timing.json").is_file()
    assert HELD_ENV not in os.environ
    # a folder the lock created stays only if something was written into it
    empty = tmp_path / "made" / "by-the-lock"
    with pytest.raises(KeyError), run_lock(empty, "arsr test"):
        raise KeyError("x")
    assert not (tmp_path / "made").exists()


def test_a_child_of_the_holder_does_not_lock_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = _write_lock(tmp_path / "runs" / "mar", pid=os.getppid())  # a live lock: held by "the launcher"
    monkeypatch.setenv(HELD_ENV, str(tmp_path / "runs" / ".." / "runs" / "mar"))  # the same folder
    before = lock.read_text()
    with run_lock(tmp_path / "runs" / "mar", "arsr train_mar") as held:
        assert held is None
    assert lock.read_text() == before
    monkeypatch.delenv(HELD_ENV)  # (the variable is what made it a no-op)
    with pytest.raises(RunLocked), run_lock(tmp_path / "runs" / "mar", "arsr train_mar"):
        pass
    with run_lock(tmp_path / "runs" / "other", "arsr other") as held:  # another folder: locked
        assert held is not None and held.is_file()


def test_a_lock_on_another_host_without_a_job_counts_as_live(tmp_path: Path) -> None:
    lock = _write_lock(tmp_path, host="some-other-host.invalid", pid=1)
    match = "another host, with no SLURM job: not checkable from here"
    with pytest.raises(RunLocked, match=match), run_lock(tmp_path, "arsr test"):
        pass
    assert lock.is_file()


def test_slurm_jobs_are_asked_with_squeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock from another host with a SLURM job id: stale when squeue lists the job in no active
    state or not at all; an earlier run of this requeued job is stale without asking."""
    squeue = tmp_path / "bin" / "squeue"
    squeue.parent.mkdir()
    monkeypatch.setenv("PATH", f"{squeue.parent}{os.pathsep}{os.environ['PATH']}")
    info = {"host": "node7.invalid", "pid": 123, "slurm_job_id": "4242", "slurm_restart_count": 0}
    for state, stale in (("RUNNING", False), ("PENDING", False), ("COMPLETED", True), ("", True)):
        squeue.write_text(f"#!/bin/sh\n[ \"$3\" = 4242 ] && echo '{state}'\nexit 0\n")
        squeue.chmod(0o755)
        reason = stale_reason(info)
        assert (reason is not None) == stale, (state, reason)
    squeue.write_text("#!/bin/sh\necho RUNNING\n")
    assert stale_reason(info) is None
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert "requeued since" in (stale_reason(info) or "")
    lock = _write_lock(tmp_path / "run", **info)
    with run_lock(tmp_path / "run", "arsr test"):  # taken over
        assert json.loads(lock.read_text())["slurm_restart_count"] == 1


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------
def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_two_runs_of_the_report_stage_on_one_folder(tmp_path: Path) -> None:
    """The first holder is simulated by a lock naming this (live) test process on this host."""
    runs, out = tmp_path / "runs", tmp_path / "reports"
    lock = _write_lock(runs / "report", owner="arsr report")
    before = lock.read_text()
    args = ("--params", str(ROOT / "params.yaml"), "--runs", str(runs), "--eval", str(tmp_path / "eval"))
    proc = _run("arsr.stages.report", *args, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert (
        f"arsr report: error: {runs / 'report'} is in use by another run (owner arsr report, host {HOST}, "
        in (proc.stderr)
    ), proc.stderr
    assert f"pid {os.getpid()}" in proc.stderr and f"remove {lock}" in proc.stderr, proc.stderr
    assert lock.read_text() == before and not out.exists()
    # Without the lock the stage runs (and fails on its missing input), leaving no lock or folder.
    lock.unlink()
    (runs / "report").rmdir()
    proc = _run("arsr.stages.report", *args, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2 and "in use" not in proc.stderr and "metrics.json" in proc.stderr, proc.stderr
    assert not (runs / "report").exists()


def test_the_check_stage_refuses_a_locked_folder(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "check" / "params.ok"
    lock = _write_lock(out.parent, owner="arsr check")
    args = ["--params", str(ROOT / "params.yaml"), "--dvc-yaml", str(ROOT / "dvc.yaml"), "--out", str(out)]
    proc = _run("arsr.stages.check", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"arsr check: error: {out.parent} is in use by another run" in proc.stderr, proc.stderr
    assert not out.exists() and lock.is_file()
    lock.unlink()
    proc = _run("arsr.stages.check", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["params.ok"]


def _default_lock_folder(stage: str) -> Path:
    """The lock folder of the stage as dvc.yaml runs it (its CLI's defaults)."""
    module = importlib.import_module(f"arsr.stages.{stage}")
    if stage == "check":
        return module.CHECK_FILE.parent
    args = stage_parser(stage, None, module._add_args).parse_args([])
    for dest, default in getattr(module, "DAG_DEFAULTS", {}).items():  # (evaluate fills them in main)
        setattr(args, dest, getattr(args, dest) or default)
    return stage_lock_folder(stage, args)


def test_no_lock_lies_inside_a_dvc_output() -> None:
    """A `.lock` inside a directory output would change its hash (and a file output is no folder)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = []
    for spec in stages.values():
        for entry in [*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])]:
            outs.append(Path(entry if isinstance(entry, str) else next(iter(entry))))
    folders = {}
    for stage in stages:
        folder = _default_lock_folder(stage)
        folders[stage] = str(folder)
        lock = folder / LOCK_NAME
        inside = [str(o) for o in outs if lock.is_relative_to(o) or folder == o]
        assert not inside, f"{stage}: its lock {lock} is inside the DVC output(s) {inside}"
    assert folders == {
        "check": "runs/check", "shard": "runs/shard", "train_base": "runs/base", "train_vqvae": "runs/vqvae",
        "tokenize": "runs/tokenize", "train_srvar": "runs/srvar", "train_mar": "runs/mar",
        "evaluate": "runs/evaluate", "report": "runs/report",
    }  # fmt: skip
