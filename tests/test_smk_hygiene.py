"""Snakemake hygiene: the snakemake-workflows layout (workflow/Snakefile, workflow/profiles/default read
by itself), `snakemake --lint` clean, every job logged and benchmarked under logs/snakemake/, the cheap
stages local rules, and `snakemake --report` bundling the metrics, the training curves and the samples.

Real `snakemake` processes (a few seconds each): in a fresh copy of this checkout (nothing built),
and on the shared built project (`smk_project`, read only) or copies of the built ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from pipeline_fixtures import ROOT, TINY_PARAMS, _env, make_project, run

LOGS = "logs/snakemake"
LOCAL = {"check", "report"}  # cheap: on the submit host, never an sbatch job
NO_SYNC = ["--config", "dvc_mtimes=false"]  # a read-only look: no mtime moved (common.smk)

# The workflow's rules as Snakemake parsed them (its API, in the project's directory).
INTROSPECT = """
import json
from pathlib import Path

from snakemake.api import SnakemakeApi
from snakemake.io import get_flag_value, is_flagged
from snakemake.settings.enums import Quietness
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
    wf = api.workflow(
        ResourceSettings(), ConfigSettings(config={"dvc_mtimes": False}), snakefile=Path("workflow/Snakefile")
    )
    w = wf._workflow
    print(json.dumps({
        r.name: {
            "norun": r.norun,
            "local": r.name in w._localrules,
            "log": [str(f) for f in r.log],
            "benchmark": str(r.benchmark) if r.benchmark else None,
            "shell": r.shellcmd,
            "report": {
                str(f): get_flag_value(f, "report").category for f in r.output if is_flagged(f, "report")
            },
        }
        for r in w.rules
    }))
"""


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of this checkout, nothing built (no dvc.lock: the workflow moves no mtime)."""
    return make_project(tmp_path_factory.mktemp("hygiene"), TINY_PARAMS)


@pytest.fixture(scope="module")
def rules(fresh: Path) -> dict[str, dict]:
    proc = subprocess.run(
        [sys.executable, "-c", INTROSPECT], cwd=fresh, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_standard_layout_and_its_default_profile() -> None:
    assert (ROOT / "workflow" / "Snakefile").is_file() and not (ROOT / "Snakefile").exists()
    assert (ROOT / "workflow" / "profiles" / "default" / "config.yaml").is_file()
    assert not (ROOT / "workflow" / "profiles" / "local").exists()
    for ignore in (".gitignore", ".dvcignore"):
        assert "/logs/" in (ROOT / ignore).read_text().splitlines(), ignore


def test_lint_is_clean_and_the_default_profile_is_read(fresh: Path) -> None:
    proc = run(["snakemake", "--lint"], fresh)  # exit 0: no lint at all
    out = proc.stdout + proc.stderr
    assert "Using workflow specific profile workflow/profiles/default" in out, out
    assert "Congratulations, your workflow is in a good condition!" in out, out
    assert "Lints for" not in out, out


def test_every_stage_has_a_log_and_a_benchmark_and_cheap_ones_are_local(fresh: Path, rules: dict) -> None:
    from pipeline_fixtures import dag_rules_and_metrics

    stages, _metrics = dag_rules_and_metrics(fresh)
    assert set(rules) == {*stages, "all"}
    assert rules["all"]["norun"] and not rules["all"]["log"]
    for name in stages:
        rule = rules[name]
        assert rule["log"] == [f"{LOGS}/{name}.log"], (name, rule)
        assert rule["benchmark"] == f"{LOGS}/{name}.benchmark.tsv", (name, rule)
        # stdout and stderr go to the log (in a SLURM job also to the job's log); the command comes
        # last, without a redirection of its own, so that bash execs it
        shell = rule["shell"]
        assert "exec >> {log} 2>&1;" in shell and "exec tee -a {log}" in shell, (name, shell)
        assert shell.endswith(" {params.cmd}"), (name, shell)
        assert rule["local"] == (name in LOCAL), name
    # What the report shows: every dvc.yaml metrics file, the evaluation table, the samples, the page.
    flagged = {path: cat for rule in rules.values() for path, cat in rule["report"].items()}
    for rel in _metrics:
        assert flagged.get(str(rel)) == "Metrics", (rel, flagged)
    assert flagged["eval/per_image.csv"] == "Metrics"
    assert flagged["eval/samples"] == "Samples" and flagged["reports"] == "Report", flagged


def test_the_report_bundles_metrics_curves_and_samples(smk_project: Path, tmp_path: Path) -> None:
    """`snakemake --report report.zip` on the built tiny DAG (read only: the shared project stays as is)."""
    out = tmp_path / "report.zip"
    proc = run(["snakemake", "--report", str(out), *NO_SYNC], smk_project)
    assert "Report created" in proc.stdout + proc.stderr
    names = zipfile.ZipFile(out).namelist()
    base = {Path(n).name for n in names}
    assert "report.html" in base, names
    assert "metrics.json" in base and "per_image.csv" in base and "curves.png" in base, names
    assert "report.md" in base, names
    samples = sorted((smk_project / "eval" / "samples").glob("*.png"))
    assert samples and {p.name for p in samples} <= base, names
    # the metrics files of every stage (five: the four trainings' and evaluate's), not reports/samples/ copies
    assert sum(n.endswith("/metrics.json") for n in names) == 5, names
    assert sum(n.endswith(".png") for n in names) == len(samples) + 1, names
    html = next(n for n in names if n.endswith("report.html"))
    text = zipfile.ZipFile(out).read(html).decode()
    assert "Sample grids from the evaluation" in text  # a caption (workflow/report/samples.rst)


def test_every_job_wrote_its_log_and_benchmark_where_git_and_dvc_look_away(smk_project: Path) -> None:
    from pipeline_fixtures import dag_rules_and_metrics

    stages, _metrics = dag_rules_and_metrics(smk_project)
    for name in stages:
        log = smk_project / LOGS / f"{name}.log"
        bench = (smk_project / LOGS / f"{name}.benchmark.tsv").read_text().splitlines()
        assert log.is_file(), name
        assert bench[0].startswith("s\th:m:s\tmax_rss") and len(bench) == 2, (name, bench)
    assert "launch: " in (smk_project / LOGS / "train_base.log").read_text()  # the stage's own output
    logs = [f"{LOGS}/check.log", f"{LOGS}/check.benchmark.tsv"]
    for tool in ("git", "dvc"):  # each prints the paths it ignores
        assert run([tool, "check-ignore", *logs], smk_project).stdout.split() == logs, tool


def test_a_stage_named_as_target_is_up_to_date_without_a_benchmark(dvc_project: Path, tmp_path: Path) -> None:
    """Snakemake reruns a target rule whose benchmark is missing (it is one of its products): in a
    workspace DVC built (no logs/), the workflow writes empty ones where dvc.lock says a stage is
    up to date, so `snakemake report train_mar` has nothing to do."""
    proj = tmp_path / "proj"
    shutil.copytree(dvc_project, proj, symlinks=True)
    assert not (proj / "logs").exists()
    proc = run(["snakemake", "-n", "--cores", "2", "report", "train_mar"], proj)
    out = proc.stdout + proc.stderr
    assert "Nothing to be done" in out and "empty benchmark files written" in out, out[-3000:]
    bench = (proj / LOGS / "train_mar.benchmark.tsv").read_text().splitlines()
    assert len(bench) == 1 and bench[0].startswith("s\th:m:s"), bench
    proc = run(["snakemake", "-n", "--cores", "2", "report", "train_mar"], proj)  # idempotent
    out = proc.stdout + proc.stderr
    assert "Nothing to be done" in out and "mtimes follow dvc.lock" not in out, out[-3000:]


def test_the_log_keeps_the_stage_the_process_snakemake_started(rules: dict, tmp_path: Path) -> None:
    """The check rule's command as Snakemake runs it (`bash -c "set -euo pipefail; ..."`): bash execs
    the stage (signals such as SLURM's USR1 reach it, not a shell), whose output goes to the log
    (Snakemake empties it before a job); in a SLURM job to the job's own log too (what survives a
    requeue), through a `tee` that SIGUSR1 does not stop."""
    log = tmp_path / "check.log"
    stage = f"{sys.executable} -c 'import os; print(os.getppid())'"
    cmd = rules["check"]["shell"].format(log=log, threads=1, params=SimpleNamespace(cmd=stage))

    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    proc = subprocess.run(["bash", "-c", f"set -euo pipefail; {cmd}"], env=env, capture_output=True)
    assert proc.returncode == 0 and proc.stdout == b"", proc
    assert log.read_text().split() == [str(os.getpid())]  # no bash in between
    # In a SLURM job: the log and stdout (the job's log) both; a USR1 to the job's processes (what
    # the time-limit warning does) leaves the tee running, so the stage can still write.
    stage = (
        f"{sys.executable} -c 'import os, signal, time; signal.signal(signal.SIGUSR1, signal.SIG_IGN); "
        "os.killpg(0, signal.SIGUSR1); time.sleep(0.2); print(os.getppid(), flush=True)'"
    )
    cmd = rules["check"]["shell"].format(log=log, threads=1, params=SimpleNamespace(cmd=stage))
    proc = subprocess.run(
        ["bash", "-c", f"set -euo pipefail; {cmd}"], env={**env, "SLURM_JOB_ID": "7"}, capture_output=True,
        text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc
    assert proc.stdout.split() == log.read_text().split()[1:] == [str(os.getpid())], (proc, log.read_text())
