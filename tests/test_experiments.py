"""DVC experiments compare (issue 16, point 2): two real `dvc exp run`s on the tiny DAG, then
`dvc exp show`, `dvc metrics diff` and `dvc plots diff` between them, as the README shows.

Metrics, plots and timings are cached outputs, so every experiment stores them; metrics files are
compact (final values, no per-scale breakdowns), so `--only-changed` is a handful of columns.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from pipeline_fixtures import _env, run

# The README's comparison command: changed params and metrics, without the dependency hash columns.
SHOW = ["dvc", "exp", "show", "--only-changed", "--csv", "--drop", "eval/|runs/|data/"]
BACK_TO_BASELINE = (["git", "checkout", "--", "params.yaml", "dvc.lock"], ["dvc", "checkout", "-q"])


@pytest.fixture(scope="module")
def two_experiments(dvc_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    proj = tmp_path_factory.mktemp("exps") / "proj"
    shutil.copytree(dvc_project, proj, symlinks=True)
    run(["git", "add", "dvc.lock"], proj)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline results"], proj)
    for name, setting in (("topk5", "eval.srvar.top_k=5"), ("iter2", "eval.mar.num_iter=2")):
        out = run(["dvc", "exp", "run", "-n", name, "-S", setting], proj).stdout
        assert "Running stage 'evaluate'" in out and "Running stage 'train_srvar'" not in out, out
        for cmd in BACK_TO_BASELINE:
            run(cmd, proj)
    return proj


def test_exp_show_compares_in_a_terminal(two_experiments: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(run(SHOW, two_experiments).stdout)))
    by_name = {r["Experiment"] or r["rev"]: r for r in rows}
    assert {"topk5", "iter2", "workspace"} <= set(by_name), by_name.keys()
    changed = [
        c for c in rows[0] if c not in ("Experiment", "rev", "typ", "Created", "parent", "State", "Executor")
    ]
    assert {"eval.srvar.top_k", "eval.mar.num_iter", "val.srvar.psnr", "val.mar.lpips"} <= set(changed), (
        changed
    )
    assert len(changed) <= 24, changed  # 2 params + 5 metrics of each changed method (+ n)
    for name, row in by_name.items():
        for col in changed:
            assert row[col] not in ("", "!"), f"{name}: {col} = {row[col]!r}"
    assert by_name["topk5"]["eval.srvar.top_k"] == "5" and by_name["iter2"]["eval.mar.num_iter"] == "2"
    # Nothing per scale or per step among all the columns either.
    header = run(["dvc", "exp", "show", "--csv"], two_experiments).stdout.splitlines()[0]
    assert "_s0" not in header and "tlr" not in header, header


def test_metrics_and_plots_diff_between_experiments(two_experiments: Path) -> None:
    diff = json.loads(run(["dvc", "metrics", "diff", "topk5", "iter2", "--json"], two_experiments).stdout)
    changed = diff["eval/metrics.json"]
    assert "val.mar.psnr" in changed and "val.srvar.psnr" in changed, changed
    assert all(v["old"] is not None and v["new"] is not None for v in changed.values())
    # The workspace is the baseline again: nothing differs from HEAD, and nothing is to be rerun.
    assert json.loads(run(["dvc", "metrics", "diff", "--json"], two_experiments).stdout) == {}
    status = subprocess.run(
        ["dvc", "status", "--json"], cwd=two_experiments, env=_env(), capture_output=True, text=True
    )
    assert json.loads(status.stdout) == {}, status.stdout
    plots = json.loads(run(["dvc", "plots", "diff", "topk5", "iter2", "--json"], two_experiments).stdout)[
        "data"
    ]
    loss = plots["runs/srvar/plots/loss.tsv"][0]
    assert loss["revisions"] == ["topk5", "iter2"] and {
        v["rev"] for v in loss["content"]["data"]["values"]
    } == {
        "topk5",
        "iter2",
    }
