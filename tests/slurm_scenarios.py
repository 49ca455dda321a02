"""The SLURM runs of tests/test_slurm.py, started in the background at the beginning of the session.

A SLURM run is mostly waiting: for the executor's status checks (their interval grows by 10 s each
round without a finished job), for job starts, for a requeued job's hold. So the cluster tests'
runs start in a thread as the session starts (conftest.py, when the session selects a test that
uses them and a cluster is up) and overlap the other tests; the tests then wait for the results and
assert on them. Each scenario runs once; its exceptions re-raise in the tests that use it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from pipeline_fixtures import TINY_PARAMS, _env, make_project, run

# The README's recipe: a site profile (here the CI cluster's) under the workflow profile.
PROFILES = ["--profile", ".ci/slurm-profile", "--workflow-profile", "workflow/profiles/slurm"]
SMK_TIMEOUT_S = 1500  # the whole tiny DAG on 2 CPUs, plus ~10-40 s of SLURM status polling per stage
REQUEUE_STEPS = 3000  # tiny base model: tens of seconds on 2 CPUs, long enough to interrupt twice
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}

_pool: ThreadPoolExecutor | None = None
_futures: dict[str, Future] = {}
_projects: list[Path] = []


def cluster_problem() -> str | None:
    """Why no SLURM job could run here, or None when a partition with a usable node is up."""
    if shutil.which("sinfo") is None:
        return "`sinfo` not found (SLURM client tools are not installed)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%a %T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`sinfo` did not answer within 30 s (slurmctld down?)"
    if out.returncode != 0:
        return f"`sinfo` failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}"
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    if not any(avail == "up" and state in USABLE_NODE_STATES for avail, state in rows):
        return f"no partition up with a usable node: sinfo says {out.stdout.strip()!r}"
    return None


def squeue_jobs() -> dict[str, dict[str, str]]:
    """Every job slurmctld still knows (MinJobAge keeps finished ones): id -> state, comment, workdir."""
    out = subprocess.run(
        ["squeue", "--states=all", "-h", "-o", "%i|%T|%k|%Z"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    jobs = {}
    for line in out.stdout.splitlines():
        job_id, state, comment, workdir = line.split("|", 3)
        jobs[job_id] = {"state": state, "comment": comment, "workdir": workdir}
    return jobs


def cancel_jobs_in(proj: Path) -> None:
    live = [
        i
        for i, j in squeue_jobs().items()
        if j["workdir"] == str(proj) and j["state"] in {"PENDING", "RUNNING", "CONFIGURING", "REQUEUED"}
    ]
    if live:
        subprocess.run(["scancel", *live], check=False, timeout=30)


def job_of(proj: Path, rule: str) -> tuple[str, str] | None:
    """(job id, state) of the newest job of ``rule`` submitted from ``proj``, or None."""
    mine = [(int(i), j["state"]) for i, j in squeue_jobs().items()
            if j["workdir"] == str(proj) and j["comment"] == f"rule_{rule}"]  # fmt: skip
    return (str(max(mine)[0]), max(mine)[1]) if mine else None


def ckpt_step(path: Path) -> int:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["step"])
    except (FileNotFoundError, EOFError, RuntimeError):  # not written yet (or being replaced)
        return -1


# --------------------------------------------------------------------------------------
# The scenarios
# --------------------------------------------------------------------------------------
def build_tiny_dag(root: Path) -> tuple[Path, float, str]:
    """The tiny DAG built by `snakemake --profile .ci/slurm-profile --workflow-profile
    workflow/profiles/slurm`: (project, seconds, Snakemake's output)."""
    proj = make_project(root / "slurm", TINY_PARAMS)
    _projects.append(proj)
    t0 = time.perf_counter()
    try:
        # `timeout -k`: Snakemake answers SIGTERM by waiting for its running jobs.
        cmd = ["timeout", "-k", "10", str(SMK_TIMEOUT_S), "snakemake", *PROFILES]
        proc = run(cmd, proj, timeout=SMK_TIMEOUT_S + 60)
    finally:
        cancel_jobs_in(proj)  # only matters when the run failed or timed out
    seconds = time.perf_counter() - t0
    print(f"\nthe tiny DAG through SLURM took {seconds:.1f} s", file=sys.stderr)
    return proj, seconds, proc.stdout + proc.stderr


def _release_when_requeued(proj: Path, job_id: str, smk: subprocess.Popen, deadline: float) -> None:
    """Wait for the requeue (the job leaves RUNNING), then let it start again now: SLURM holds a
    requeued job ~2 min (its begin time), set when the job is pending again, so release it until it
    runs."""
    while time.monotonic() < deadline and job_of(proj, "train_base") == (job_id, "RUNNING"):
        time.sleep(0.5)
    while time.monotonic() < deadline and job_of(proj, "train_base") != (job_id, "RUNNING"):
        if job_of(proj, "train_base") == (job_id, "PENDING"):
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=30)
        if smk.poll() is not None:
            return
        time.sleep(1)


def requeue_scenario(built: Future, root: Path) -> dict[str, Any]:
    """train_base of the built tiny DAG, retrained for REQUEUE_STEPS steps through SLURM, with the
    time-limit warning (SIGUSR1 to the job's steps, what `--signal=USR1@<s>` sends) sent twice, each
    time once the window has trained past a checkpoint; and the same training on this machine,
    never interrupted. Returns what the test asserts on."""
    built_proj, _seconds, _log = built.result()
    params = yaml.safe_load((built_proj / "params.yaml").read_text())
    params["base"]["train"] |= {"max_steps": REQUEUE_STEPS, "ckpt_every": 100, "log_every": 500}
    copies = {}
    for name in ("requeue", "uninterrupted"):
        copies[name] = root / name
        shutil.copytree(built_proj, copies[name], symlinks=True)
        (copies[name] / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proj = copies["requeue"]
    _projects.append(proj)
    # The workflow profile with a short time limit (5 min: each window ends well before it), without
    # the time-limit signal (the scenario sends it).
    profile = yaml.safe_load((proj / "workflow/profiles/slurm/config.yaml").read_text())
    profile["set-resources"]["train_base"] |= {"runtime": 5, "slurm_extra": "'--requeue --open-mode=append'"}
    (proj / "requeue_profile").mkdir()
    (proj / "requeue_profile/config.yaml").write_text(yaml.safe_dump(profile))

    run(["python", "-m", "arsr.stages.launch", "train_base"], copies["uninterrupted"], timeout=900)

    cmd = ["timeout", "-k", "10", "900", "snakemake", "--profile", ".ci/slurm-profile", "--workflow-profile",
           "requeue_profile", "runs/base/model.pt"]  # fmt: skip
    smk = subprocess.Popen(
        cmd, cwd=proj, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    ckpt = proj / "runs/base/ckpt/last.pt"
    signals, seen_step, deadline = 0, ckpt_step(ckpt), time.monotonic() + 800
    try:
        while signals < 2 and time.monotonic() < deadline and smk.poll() is None:
            time.sleep(0.5)
            job = job_of(proj, "train_base")
            step = ckpt_step(ckpt)
            if job and job[1] == "RUNNING" and seen_step < step < REQUEUE_STEPS - 500:
                subprocess.run(["scancel", "--signal=USR1", job[0]], check=True, timeout=30)
                signals += 1
                _release_when_requeued(proj, job[0], smk, deadline)
                seen_step = ckpt_step(ckpt)
        out, _ = smk.communicate(timeout=900)
    finally:
        if smk.poll() is None:
            smk.kill()
        cancel_jobs_in(proj)
    job_id, state = job_of(proj, "train_base") or ("", "")
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    return {
        "proj": proj, "reference": copies["uninterrupted"], "signals": signals, "returncode": smk.returncode,
        "output": out, "job_id": job_id, "state": state, "scontrol": shown.stdout,
    }  # fmt: skip


# --------------------------------------------------------------------------------------
# Background
# --------------------------------------------------------------------------------------
def start(root: Path) -> None:
    """Start the scenarios (once): the tiny DAG, then the requeue scenario on it."""
    global _pool
    if _pool is not None:
        return
    _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slurm")
    _futures["tiny_dag"] = _pool.submit(build_tiny_dag, root)
    _futures["requeue"] = _pool.submit(requeue_scenario, _futures["tiny_dag"], root)


def result(name: str, root: Path, timeout: float) -> Any:
    """A scenario's result, starting the scenarios now if the session did not."""
    start(root)
    return _futures[name].result(timeout=timeout)


def shutdown() -> None:
    """Cancel what is still queued and the jobs of every scenario's project."""
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
    for proj in _projects:
        with contextlib.suppress(Exception):  # (a cluster already down)
            cancel_jobs_in(proj)
