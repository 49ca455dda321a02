"""W&B that respects the user, read back from real offline run files.

- Every stage logs a run (tokenize and report too), in the pipeline's group, named
  ``<stage>-<8 hex>``: the sha256 of the stage's params values (those of its PARAMS sections).
- Lineage: each DAG output is a reference artifact (``file://`` paths with checksums, nothing
  uploaded) that the stage writing it logs and every stage reading it uses, with the same digest, so
  that `wandb sync` resolves each use to the producer's version: shards -> base/vqvae models ->
  tokens -> srvar/mar models -> eval -> report.
- A user's W&B settings (WANDB_CONFIG_DIR, ~/.config/wandb: the server of `wandb login --host`)
  are the ones used, and nothing is written there.

The tiny DAG (`dvc_project`, built by `dvc repro` in a copy of this checkout) holds every stage's
offline run; it is only read here.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from wandb_read import history_keys, offline_runs, read_run, run_info

from arsr.config import load_params, stage_param_values
from arsr.eval.registry import METRICS

STAGES = ("shard", "train_base", "train_vqvae", "tokenize", "train_srvar", "train_mar", "evaluate", "report")
# What each stage writes, as one artifact, and what it reads (names as README "W&B" lists them).
LOGS = {
    "shard": "shards", "train_base": "base-model", "train_vqvae": "vqvae-model", "tokenize": "tokens",
    "train_srvar": "srvar-model", "train_mar": "mar-model", "evaluate": "eval",
}  # fmt: skip
USES = {
    "train_base": {"shards"},
    "train_vqvae": {"shards", "base-model"},  # the residual tokenizer (params' default target)
    "tokenize": {"shards", "vqvae-model"},
    "train_srvar": {"tokens", "vqvae-model", "shards"},
    "train_mar": {"tokens", "vqvae-model", "shards"},
    "evaluate": {"shards", "vqvae-model", "base-model", "srvar-model", "mar-model"},
    "report": {"eval"},
}
TYPES = {"shards": "dataset", "tokens": "dataset", "eval": "evaluation"}  # the others: model
SELF_HOSTED = "https://wandb.selfhosted.example"


@pytest.fixture(scope="module")
def stage_runs(dvc_project: Path) -> dict[str, list[tuple[Path, list[dict]]]]:
    """job_type -> [(offline run folder, its records)]."""
    runs: dict[str, list[tuple[Path, list[dict]]]] = {}
    for folder in offline_runs(dvc_project / "runs" / "wandb"):
        records = read_run(folder)
        runs.setdefault(run_info(records)["job_type"], []).append((folder, records))
    return runs


def lineage(runs: list[tuple[Path, list[dict]]]) -> list[dict]:
    """The artifact records of our types (W&B's own, e.g. a logged table's run_table, left out)."""
    return [
        r["artifact"]
        for _, records in runs
        for r in records
        if r.get("type") == "artifact" and r["artifact"]["type"] in ("dataset", "model", "evaluation")
    ]


def test_every_stage_logs_a_run_named_by_its_params_in_one_group(dvc_project: Path, stage_runs) -> None:
    assert set(STAGES) <= set(stage_runs), sorted(stage_runs)
    groups = {run_info(records)["run_group"] for runs in stage_runs.values() for _, records in runs}
    assert len(groups) == 1 and groups.pop().startswith("pipe-")
    params = load_params(dvc_project / "params.yaml")
    for stage in STAGES:
        values = stage_param_values(params, importlib.import_module(f"arsr.stages.{stage}").PARAMS)
        text = json.dumps(values, sort_keys=True, separators=(",", ":"))
        expected = f"{stage}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
        assert {run_info(records)["display_name"] for _, records in stage_runs[stage]} == {expected}


def test_tokenize_and_report_log_their_numbers(dvc_project: Path, stage_runs) -> None:
    [(_, tok)] = stage_runs["tokenize"]
    assert {"samples", "samples_per_s", "code_usage"} <= history_keys(tok)
    logged = {k: v for r in tok if r.get("type") == "history" for k, v in r["history"]["item"].items()}
    stats = json.loads((dvc_project / "data" / "shards" / "stats.json").read_text())
    assert int(logged["samples"]) == sum(s["samples"] for s in stats["splits"].values())
    assert 0 < float(logged["code_usage"]) <= 1

    [(folder, report)] = stage_runs["report"]
    assert {"metrics._type", "curves._type"} <= history_keys(report)  # media keys come flattened
    [table] = (folder / "files" / "media" / "table").glob("metrics_*.table.json")
    table = json.loads(table.read_text())
    metrics = json.loads((dvc_project / "eval" / "metrics.json").read_text())
    row = next(iter(metrics["val"].values()))
    assert table["columns"] == ["dataset", "method", *(k for k in METRICS if k in row), "n"]
    assert len(table["data"]) == len(metrics["val"])  # one row per method
    assert all(isinstance(v, int | float) for v in table["data"][0][2:])  # numbers, sortable
    assert list((folder / "files" / "media" / "images").glob("curves_*.png"))


def test_data_and_models_are_reference_artifacts_logged_once_and_used_downstream(
    dvc_project: Path, stage_runs
) -> None:
    root = f"file://{dvc_project.resolve()}/"
    logged = {}
    for stage, name in LOGS.items():
        outputs = [a for a in lineage(stage_runs[stage]) if not a.get("user_created")]
        assert [a["name"] for a in outputs] == [name], stage
        logged[name] = art = outputs[0]
        assert art["type"] == TYPES.get(name, "model")
        entries = art["manifest"]["contents"]
        # References with checksums: W&B uploads no bytes (DVC keeps them), yet knows the contents.
        assert entries and all(e["ref"].startswith(root) and e["digest"] for e in entries), name
        assert not any(e.get("local_path") for e in entries), name
    samples = sorted((dvc_project / "eval" / "samples").iterdir())
    assert [e["path"] for e in logged["eval"]["manifest"]["contents"]] == [
        "metrics.json", "per_image.csv", *(f"samples/{p.name}" for p in samples)
    ]  # fmt: skip
    assert [e["path"] for e in logged["vqvae-model"]["manifest"]["contents"]] == ["model.pt"]
    for stage, names in USES.items():
        used = [a for a in lineage(stage_runs[stage]) if a.get("use_after_commit")]
        assert sorted(a["name"] for a in used) == sorted(names), stage
        for art in used:
            # A use is the artifact rebuilt from the files the stage read: the producer's digest,
            # which `wandb sync` deduplicates to the producer's version, then marks as this run's input.
            producer = logged[art["name"]]
            assert art["user_created"] and art["digest"] == producer["digest"], (stage, art["name"])


def _user_env(home: Path) -> dict[str, str]:
    """A user's environment: HOME with a `wandb login --host` settings file, WANDB_CONFIG_DIR unset."""
    import matplotlib

    drop = ("WANDB_CONFIG_DIR", "WANDB_BASE_URL", "WANDB_SERVICE", "WANDB_RUN_GROUP")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    bin_dir = str(Path(sys.executable).parent)
    # matplotlib's font cache stays where it is (a new HOME would rebuild it: seconds).
    return env | {"HOME": str(home), "WANDB_MODE": "offline", "MPLCONFIGDIR": matplotlib.get_configdir(),
                  "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}  # fmt: skip


def _wandb_files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if "wandb" in str(p.relative_to(home)))


def test_a_users_wandb_settings_are_used_and_left_alone(dvc_project: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = home / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    settings.write_text(f"[default]\nbase_url = {SELF_HOSTED}\n")  # as `wandb login --host` leaves it
    env = _user_env(home)

    # arsr's W&B start, in a process of its own: the user's server is the one W&B would talk to.
    code = (
        "import json, os, wandb\n"
        "from arsr.train.logging import init_wandb\n"
        "run = init_wandb('report', {}, out_dir='runs')\n"
        "run.use_artifact('nothing', 'dataset', ['no/such/path'])  # no file: no artifact, no error\n"
        "print(json.dumps({'dir': os.environ.get('WANDB_CONFIG_DIR'), 'url': wandb.run.settings.base_url}))\n"
        "run.finish()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"dir": None, "url": SELF_HOSTED}

    # A real stage (report, on a copy of the tiny DAG's eval/ and runs/) under that HOME.
    proj = tmp_path / "proj"
    shutil.copytree(dvc_project / "eval", proj / "eval")
    skip = shutil.ignore_patterns("wandb", "ckpt", "*.pt")
    shutil.copytree(dvc_project / "runs", proj / "runs", ignore=skip)
    shutil.copy(dvc_project / "params.yaml", proj / "params.yaml")
    cmd = [sys.executable, "-m", "arsr.stages.report"]
    proc = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run] = offline_runs(proj / "runs" / "wandb")
    records = read_run(run)
    assert run_info(records)["job_type"] == "report"
    [used] = lineage([(run, records)])
    assert used["name"] == "eval" and used["use_after_commit"]
    assert not (proj / "runs" / "wandb" / "_env" / "config").exists()  # no settings folder of arsr's
    assert settings.read_text() == f"[default]\nbase_url = {SELF_HOSTED}\n"
    assert _wandb_files(home) == [".config/wandb", ".config/wandb/settings"]  # nothing else written
