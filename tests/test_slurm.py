"""The tiny DAG through SLURM: every dvc.yaml stage becomes an sbatch job, outputs equal local ones.

Needs a running cluster (`.ci/slurm.sh start`, as root; `.ci/run` does it). Without one these
tests fail under CI=true and are skipped otherwise. The launcher tests at the end need no
cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import slurm_scenarios
from pipeline_fixtures import TINY_PARAMS, _env, dag_rules_and_metrics, make_project, run, sha_tree
from slurm_scenarios import PROFILES, REQUEUE_STEPS, SMK_TIMEOUT_S, cluster_problem, squeue_jobs

from arsr.stages.launch import build_command, rendezvous_port, threads_per_rank

# The first cluster test may also build the local reference run (smk_project) when no other test
# has, and waits for the background SLURM runs (slurm_scenarios).
CLUSTER_TEST_TIMEOUT_S = SMK_TIMEOUT_S + 1800
ROOT_DIR = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    problem = cluster_problem()
    if problem is None:
        return
    msg = f"no SLURM cluster: {problem}. Start one with `sudo .ci/slurm.sh start`."
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def slurm_run(slurm_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, str]:
    """The tiny DAG built by `snakemake --profile .ci/slurm-profile --workflow-profile
    workflow/profiles/slurm` (started in the background as the session began, see conftest.py):
    (project, seconds, Snakemake's output)."""
    return slurm_scenarios.result("tiny_dag", tmp_path_factory.mktemp("slurm"), SMK_TIMEOUT_S + 120)


@pytest.mark.slow
@pytest.mark.timeout(CLUSTER_TEST_TIMEOUT_S)
def test_every_stage_ran_as_a_slurm_job(slurm_run: tuple[Path, float, str]) -> None:
    proj, _seconds, log = slurm_run
    rules, _metrics = dag_rules_and_metrics(proj)
    assert "shard" in rules
    jobs = squeue_jobs()
    local = {"check", "report"}  # localrules: they run where Snakemake runs, no sbatch job
    for rule in local:
        assert not (proj / ".snakemake" / "slurm_logs" / f"rule_{rule}").exists(), rule
        assert f"localrule {rule}:" in log, log[-3000:]
    for rule in sorted(set(rules) - local):
        # The executor names each sbatch log after the SLURM job id.
        logs = sorted((proj / ".snakemake" / "slurm_logs" / f"rule_{rule}").glob("*.log"))
        assert logs, f"no SLURM log for rule {rule}:\n{log[-3000:]}"
        job_id = logs[-1].stem
        assert f"has been submitted with SLURM jobid {job_id}" in log
        # slurmctld itself saw the job: ours (comment = rule, workdir = this copy) and done.
        assert jobs.get(job_id) == {"state": "COMPLETED", "comment": f"rule_{rule}", "workdir": str(proj)}
        # ... and the job really ran the rule (the jobstep's Snakemake prints it).
        text = logs[-1].read_text()
        assert f"rule {rule}:" in text and "1 of 1 steps (100%) done" in text, text[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(CLUSTER_TEST_TIMEOUT_S)
def test_slurm_outputs_equal_the_local_run(slurm_run: tuple[Path, float, str], smk_project: Path) -> None:
    proj, _seconds, _log = slurm_run
    # Shards are byte-reproducible.
    assert sha_tree(proj / "data" / "shards") == sha_tree(smk_project / "data" / "shards")
    # Training/eval metrics agree exactly (the DAG runs in deterministic mode).
    _rules, metrics = dag_rules_and_metrics(proj)
    for rel in metrics:
        assert (proj / rel).is_file(), f"{rel} missing in the SLURM run"
        assert json.loads((proj / rel).read_text()) == json.loads((smk_project / rel).read_text()), rel


@pytest.mark.slow
@pytest.mark.timeout(CLUSTER_TEST_TIMEOUT_S)
def test_second_slurm_run_submits_nothing(slurm_run: tuple[Path, float, str]) -> None:
    proj, _seconds, _log = slurm_run
    proc = run(["timeout", "-k", "10", "300", "snakemake", *PROFILES], proj, timeout=360)
    out = proc.stdout + proc.stderr
    assert "Nothing to be done" in out and "submitted with SLURM jobid" not in out, out[-3000:]


# --- arsr.stages.launch inside SLURM (no cluster needed: the environment decides) ---------------

STEP_ENV = {  # what `srun -n1` gives a rule under Snakemake's jobstep executor
    "SLURM_JOB_ID": "123",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_JOB_NODELIST": "localhost",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_NODES": "1",
    "SLURM_STEP_NODELIST": "localhost",
}


def _flag(cmd: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}="))


def test_launch_in_a_job_step_runs_torchrun_with_a_job_keyed_rendezvous() -> None:
    cmd = build_command("train_srvar", 2, STEP_ENV, ["--params", "p.yaml"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert _flag(cmd, "nnodes") == "1" and _flag(cmd, "nproc-per-node") == "2"
    assert _flag(cmd, "rdzv-endpoint") == f"localhost:{rendezvous_port('123')}"
    assert _flag(cmd, "rdzv-id") == "123"
    assert cmd[-4:] == ["-m", "arsr.stages.train_srvar", "--params", "p.yaml"]
    # Two jobs sharing a node never share a rendezvous port.
    other = build_command("train_srvar", 2, {**STEP_ENV, "SLURM_JOB_ID": "124"}, [])
    assert _flag(other, "rdzv-endpoint") != _flag(cmd, "rdzv-endpoint")


def test_launch_trains_on_the_steps_nodes_not_the_jobs() -> None:
    # Snakemake's `srun -n1` puts a 2-node job's rule on one node: torchrun must not wait for a
    # second node that never joins.
    env = {
        **STEP_ENV,
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_STEP_NODELIST": "n2",
    }
    cmd = build_command("train_mar", 1, env, [])
    assert _flag(cmd, "nnodes") == "1"
    assert _flag(cmd, "rdzv-endpoint").startswith("n2:")


def test_launch_from_a_multi_node_batch_script_reenters_once_per_node() -> None:
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NUM_NODES": "3",
        "SLURM_JOB_NODELIST": "n[1-3]",
        "SLURM_CPUS_PER_TASK": "8",
    }
    cmd = build_command("train_vqvae", 4, env, ["--foo"])
    assert cmd[0] == "srun"
    assert {"--nodes=3", "--ntasks-per-node=1", "--cpus-per-task=8", "--kill-on-bad-exit=1"} <= set(cmd)
    assert cmd[-4:] == ["-m", "arsr.stages.launch", "train_vqvae", "--foo"]


def test_threads_per_rank_share_the_cpus_this_process_may_use() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert threads_per_rank(1, {}) == cpus
    assert threads_per_rank(2, {}) == max(1, cpus // 2)
    assert threads_per_rank(10 * cpus, {}) == 1
    assert threads_per_rank(2, {"ARSR_THREADS_PER_RANK": "3"}) == 3


def test_launch_outside_slurm() -> None:
    assert build_command("train_mar", 1, {}, []) == [sys.executable, "-m", "arsr.stages.train_mar"]
    cmd = build_command("train_mar", 2, {}, [])
    assert "--standalone" in cmd and "--nproc-per-node=2" in cmd


# --- long trainings: SIGUSR1 -> checkpoint -> the job requeues itself in place -----------------------


@pytest.mark.slow
@pytest.mark.timeout(CLUSTER_TEST_TIMEOUT_S)
def test_a_training_spans_three_windows_by_requeueing_itself(
    slurm_cluster: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """train_base longer than its windows (slurm_scenarios.requeue_scenario): each time SLURM's
    time-limit warning (SIGUSR1 to the job steps, what `--signal=USR1@<s>` sends) arrives, the
    engine checkpoints and requeues the job in place; the third window finishes. Snakemake sees one
    job (no retry), and the weights equal an uninterrupted run's. The scenario sends the signal
    itself (`scancel --signal=USR1`, steps only, as `--signal` does) once a window has trained past
    a checkpoint: SLURM's own warning comes on a 30-s timer, up to a minute early, which makes short
    windows arbitrary; and it lets a requeued job start at once (`scontrol update StartTime=now`)."""
    import torch

    r = slurm_scenarios.result("requeue", tmp_path_factory.mktemp("slurm"), CLUSTER_TEST_TIMEOUT_S - 60)
    proj, out = r["proj"], r["output"]
    assert r["signals"] == 2, out[-4000:]
    assert r["returncode"] == 0, out[-4000:]
    assert r["state"] == "COMPLETED", out[-4000:]
    assert out.count("has been submitted with SLURM jobid") == 1, out[-4000:]  # one job, no retry
    assert "Restarts=2" in r["scontrol"], r["scontrol"]
    # Every window's output is in the job's SLURM log (append mode); the rule log has the last one.
    slurm_log = (proj / ".snakemake/slurm_logs/rule_train_base" / f"{r['job_id']}.log").read_text()
    for n in (1, 2):
        assert f"requeued ({n} of at most 10)" in slurm_log, slurm_log[-4000:]
    assert "resuming from" in (proj / "logs/snakemake/train_base.log").read_text()
    got = torch.load(proj / "runs/base/model.pt", map_location="cpu", weights_only=False)
    want = torch.load(r["reference"] / "runs/base/model.pt", map_location="cpu", weights_only=False)
    assert got["step"] == want["step"] == REQUEUE_STEPS
    for key, value in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, rtol=0, atol=0, msg=key)


# --- arsr.slurm without a cluster: a fake scontrol on PATH ------------------------------------------


@pytest.fixture
def fake_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`scontrol` that records its arguments and reports Restarts=1 for `show job`."""
    calls = tmp_path / "calls"
    script = tmp_path / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1" = show ] && echo "JobId=5 Restarts=1"\nexit 0\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_requeue_self_asks_slurm_until_the_limit(fake_scontrol: Path) -> None:
    from arsr.slurm import allocated_gpus, requeue_self, restart_count

    assert not requeue_self(3, {})  # outside SLURM: nothing to requeue
    assert not fake_scontrol.exists()
    assert restart_count({"SLURM_JOB_ID": "5"}) == 1  # from `scontrol show job` (steps lack the variable)
    assert requeue_self(3, {"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "2"})
    assert fake_scontrol.read_text().splitlines()[-1] == "requeue 5"
    assert not requeue_self(2, {"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "2"})  # the limit
    assert fake_scontrol.read_text().splitlines().count("requeue 5") == 1  # not asked again
    assert allocated_gpus({"SLURM_JOB_ID": "5", "SLURM_GPUS_ON_NODE": "4"}) == 4
    assert allocated_gpus({"SLURM_GPUS_ON_NODE": "4"}) == 0  # not in a job: not ours


# --- GPUs per node, declared once (the site profile's config), as sbatch gets them -----------------


def _dry_run_resources(proj: Path, site: Path, rule: str) -> dict[str, object]:
    """The resources Snakemake gives ``rule`` under ``site`` + the workflow profile (a dry run)."""
    out = run(["snakemake", "-n", "--profile", str(site), "--workflow-profile", "workflow/profiles/slurm"],
              proj)  # fmt: skip
    text = out.stdout + out.stderr
    block = text[text.index(f"rule {rule}:") :]
    line = next(ln for ln in block.splitlines() if ln.strip().startswith("resources:"))
    res: dict[str, object] = {}
    for item in line.split("resources:", 1)[1].split(", "):
        key, value = item.strip().split("=", 1)
        res[key] = int(value) if value.isdigit() else value
    return res


class _Resources(dict):
    """What the plugin reads of job.resources: .get() and attributes."""

    __getattr__ = dict.__getitem__


@pytest.mark.slow
def test_two_nodes_of_four_gpus_reach_sbatch_per_node(tmp_path: Path) -> None:
    """A site profile with `gpus_per_node: 4, train_nodes: 2`: the plugin's own submit-command code
    asks, for train_srvar, 2 nodes with 4 GPUs *each* (`--gres=gpu:4`, not `--gpus=4`, a total for
    the job), one task per node (the launcher; `mpi: srun`), and a core per rank and loader worker."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    proj = make_project(tmp_path / "proj", TINY_PARAMS)
    site = tmp_path / "site"
    site.mkdir()
    profile = (ROOT_DIR / ".ci/slurm-profile/config.yaml").read_text()
    (site / "config.yaml").write_text(profile.replace("gpus_per_node: 0", "gpus_per_node: 4").replace(
        "train_nodes: 1", "train_nodes: 2").replace("cpus_per_node: 2", "cpus_per_node: 64"))  # fmt: skip
    res = _dry_run_resources(proj, site, "train_srvar")
    assert (res["nodes"], res["tasks"], res["gres"], res["mpi"]) == (2, 2, "gpu:4", "srun"), res
    workers = TINY_PARAMS.get("resources", {}).get("train_srvar", {}).get("workers", 1)
    job = SimpleNamespace(resources=_Resources(res), threads=res["cpus_per_task"], name="train_srvar")
    params = {"run_uuid": "u", "slurm_logfile": "l.log", "comment_str": "rule_train_srvar", "account": "",
              "partition": "-p gpu", "workdir": str(proj)}  # fmt: skip
    call = get_submit_command(job, params) + set_gres_string(job)
    flags = call.split()
    assert "--nodes=2" in flags and "--gres=gpu:4" in flags and "--ntasks=2" in flags, call
    assert f"--cpus-per-task={4 * (1 + workers)}" in flags, call
    assert not [f for f in flags if f.startswith(("--gpus", "--ntasks-per-gpu"))], call
    # tokenize and evaluate take one GPU; the CPU stages none.
    assert _dry_run_resources(proj, site, "evaluate")["gres"] == "gpu:1"
    assert "gres" not in _dry_run_resources(proj, site, "shard")


@pytest.mark.slow
def test_snakemake_preflight_refuses_a_plan_that_does_not_fit_before_submitting(tmp_path: Path) -> None:
    """3 GPUs per node: the tiny DAG's global batch (8) does not split; Snakemake stops at parse time
    naming the key and the site setting, before any job (no cluster needed)."""
    proj = make_project(tmp_path / "proj", TINY_PARAMS)
    site = tmp_path / "site"
    site.mkdir()
    profile = (ROOT_DIR / ".ci/slurm-profile/config.yaml").read_text()
    (site / "config.yaml").write_text(profile.replace("gpus_per_node: 0", "gpus_per_node: 3"))
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["snakemake", "-n", "--profile", str(site), "--workflow-profile", "workflow/profiles/slurm"],
        cwd=proj, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.perf_counter() - t0 < 60, out[-3000:]
    assert "base.train.batch_size: 8 is not divisible by 1 node(s) (config train_nodes) x 3 ranks" in out, out
    assert "(config gpus_per_node)" in out and "submitted" not in out, out[-3000:]
