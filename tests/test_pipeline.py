"""End-to-end: the tiny DAG under `dvc repro` and under `snakemake`, in copies of this repo.

One session fixture per runner builds the whole tiny DAG once; every end-to-end test
shares them (the slow part of the suite).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

# The fixtures dvc_project/smk_project come from conftest.py (shared with test_slurm.py).
from pipeline_fixtures import ROOT, TINY_PARAMS, dag_rules_and_metrics, make_project, run, sha_tree  # noqa: F401

from arsr.train.checkpoint import safe_load


def test_second_dvc_repro_does_nothing_quickly(dvc_project: Path) -> None:
    t0 = time.perf_counter()
    out = run(["dvc", "repro"], dvc_project).stdout
    elapsed = time.perf_counter() - t0
    assert "up to date" in out or "didn't change" in out
    assert elapsed < 3.0, f"no-op dvc repro took {elapsed:.2f} s"


def test_a_logging_only_key_reruns_nothing(dvc_project: Path) -> None:
    """`dvc exp run -S srvar.train.log_every=5` changes no stage's declared params: nothing reruns
    (but the params check, a second, whose output stays the same), and the workspace is left as it
    was."""
    model = dvc_project / "runs" / "srvar" / "model.pt"
    before = model.stat().st_mtime_ns
    out = run(["dvc", "exp", "run", "-S", "srvar.train.log_every=5"], dvc_project).stdout
    assert not re.search(r"Running stage '(?!check')", out), out
    assert model.stat().st_mtime_ns == before
    run(["git", "checkout", "--", "params.yaml"], dvc_project)
    run(["dvc", "exp", "remove", "--all"], dvc_project)
    # The check's lock entry recorded log_every=5 (it declares whole sections): record the file's
    # values again, so the shared project is clean for the tests after this one.
    out = run(["dvc", "repro"], dvc_project).stdout
    assert not re.search(r"Running stage '(?!check')", out), out
    assert run(["dvc", "status", "--json"], dvc_project).stdout.strip() == "{}"


def test_snakemake_builds_byte_identical_shards_and_dvc_accepts_them(
    dvc_project: Path, smk_project: Path
) -> None:
    assert sha_tree(smk_project / "data" / "shards") == sha_tree(dvc_project / "data" / "shards")
    _rules, metrics = dag_rules_and_metrics(dvc_project)
    assert len(metrics) >= 4  # the training stages' and evaluate's
    for rel in metrics:  # the tiny DAG trains in deterministic mode: the same numbers
        smk, dvc = (_flat(json.loads((p / rel).read_text())) for p in (smk_project, dvc_project))
        assert smk.keys() == dvc.keys(), rel
        # Losses and val metrics come out bit-equal; a grad norm once differed in the 7th digit.
        assert all(math.isclose(smk[k], dvc[k], rel_tol=1e-6) for k in smk), (rel, smk, dvc)
    for stage in ("vqvae", "srvar", "mar"):  # the same inputs: a checkpoint resumes under either runner
        fingerprints = [
            safe_load(p / "runs" / stage / "model.pt")["fingerprint"] for p in (smk_project, dvc_project)
        ]
        assert fingerprints[0] == fingerprints[1], stage
    run(["dvc", "commit", "-f"], smk_project)
    status = run(["dvc", "status"], smk_project).stdout
    assert "up to date" in status, status


def _flat(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": float(v)})
    return out


def _dot_graph(text: str, label_re: str, edge_re: str) -> tuple[set[str], set[tuple[str, str]]]:
    import re

    labels = dict(re.findall(label_re, text))
    nodes = set(labels.values()) if labels else set(re.findall(r'^"([^"]+)";$', text, re.M))
    edges = {(labels.get(a, a), labels.get(b, b)) for a, b in re.findall(edge_re, text)}
    return nodes, edges


def test_dvc_dag_and_snakemake_dag_are_the_same_graph() -> None:
    dvc_dot = run(["dvc", "dag", "--dot"], ROOT).stdout
    smk_dot = run(["snakemake", "--dag", "--quiet", "all"], ROOT).stdout
    dvc_nodes, dvc_edges = _dot_graph(dvc_dot, r"(?!)", r'"([^"]+)" -> "([^"]+)"')
    smk_nodes, smk_edges = _dot_graph(smk_dot, r'(\d+)\[label = "([^"]+)"', r"(\d+) -> (\d+)")
    smk_nodes.discard("all")
    smk_edges = {e for e in smk_edges if "all" not in e}
    assert dvc_nodes == smk_nodes and len(dvc_nodes) == 9  # the 8 stages of the README + check
    assert {("check", stage) for stage in dvc_nodes - {"check"}} <= dvc_edges  # every stage waits for it
    assert dvc_edges == smk_edges


def test_evaluate_and_report_show_every_metric_for_every_method(dvc_project: Path) -> None:
    """eval/metrics.json and per_image.csv carry the registry's metrics for each row; the report's
    table has them with arrows and bold bests; the sample grids are labelled and enlarged; W&B's
    per-image table has image columns beside every score."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from arsr.eval.registry import METRICS

    metrics = json.loads((dvc_project / "eval" / "metrics.json").read_text())["val"]
    assert set(metrics) == {"bicubic", "vqvae_rec", "base", "srvar", "mar"}
    for method, row in metrics.items():
        assert set(row) == {*METRICS, "n"}, method
        assert 0 <= row["lpips"] <= 1.5 and 0 <= row["dists"] <= 1 and row["psnr_rgb"] > 5
    per_image = pd.read_csv(dvc_project / "eval" / "per_image.csv")
    assert list(per_image.columns) == ["dataset", "image", "method", *METRICS]
    report = (dvc_project / "reports" / "report.md").read_text()
    for header in ("PSNR-Y (dB) ↑", "SSIM-Y ↑", "PSNR-RGB (dB) ↑", "LPIPS ↓", "DISTS ↓"):
        assert header in report
    for title in ("Bicubic", "Tokenizer reconstruction (ceiling)", "Regression base", "SRVAR", "MAR-SR"):
        assert f"| {title} " in report
    assert report.count("**") >= 2 * len(METRICS)  # one best per column
    # Where the numbers come from: the machine, torch and commit of every stage (timing.json).
    from arsr.provenance import describe, machine_info

    here = describe(machine_info() | {"code_modified": None, "commit": None})
    assert f"Measured on {here.split(', commit')[0]}" in report and "## Provenance" in report
    for stage in ("shard", "train_base", "train_vqvae", "tokenize", "train_srvar", "train_mar", "evaluate"):
        timing = json.loads((dvc_project / "runs" / stage.removeprefix("train_") / "timing.json").read_text())
        assert timing["machine"]["torch"] == machine_info()["torch"] and f"| {stage} " in report, stage
    grids = sorted((dvc_project / "reports" / "samples").glob("*.png"))
    assert len(grids) == 2
    hr_side = 32  # TINY_PARAMS' hr_size; 6 columns (LR, bicubic, base, SRVAR, MAR-SR, HR), enlarged x6
    grid = np.asarray(Image.open(grids[0]))
    assert grid.shape[1] >= 6 * hr_side * 6 and grid.shape[0] > hr_side * 6
    assert (dvc_project / "reports" / "curves.png").is_file()
    wandb_runs = dvc_project / "runs" / "wandb"
    tables = sorted(wandb_runs.glob("offline-run-*/files/media/table/per_image_*.table.json"))
    table = json.loads(tables[-1].read_text())
    images = ["LR", "Bicubic", "Regression base", "SRVAR", "MAR-SR", "HR"]
    assert table["columns"][:8] == ["dataset", "image", *images]
    assert {f"{m}/{k}" for m in metrics for k in METRICS} <= set(table["columns"])
    # W&B turns a logged table with media into a run_table artifact holding the images.
    record = next(tables[-1].parents[3].glob("run-*.wandb")).read_bytes()
    assert b"run_table" in record and record.count(b"media/images/") >= 5
