"""A bad params.yaml fails before DVC or Snakemake touches an output (issue 16, point 1).

DVC removes a stage's outputs before running its command; the `check` stage (all of params.yaml,
first in the DAG) fails naming the key, so DVC stops before anything downstream. Each case runs the
real `dvc repro` on a copy of the built tiny DAG and compares every output byte for byte.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from pipeline_fixtures import _env, sha_tree

from arsr.config import ConfigError, load_params, missing_keys
from arsr.stages.check import declared_keys

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_DIRS = ("data", "runs", "eval", "reports")


def _outputs(proj: Path) -> dict[str, str]:
    return {f"{d}/{k}": v for d in OUTPUT_DIRS for k, v in sha_tree(proj / d).items()}


@pytest.fixture(scope="module")
def built(dvc_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the built tiny DAG (the session's stays as it is)."""
    dest = tmp_path_factory.mktemp("bad-params") / "proj"
    shutil.copytree(dvc_project, dest, symlinks=True)
    return dest


def _breaks(raw: dict, case: str) -> tuple[dict, str]:
    bad = copy.deepcopy(raw)
    if case == "unknown key":
        bad["srvar"]["train"]["base_lrr"] = 0.1
        return bad, "srvar.train.base_lrr: unknown key"
    if case == "bad value":
        bad["mar"]["train"]["base_lr"] = -1.0
        return bad, "mar.train.base_lr"
    if case == "missing section":
        del bad["eval"]
        return bad, "eval.benchmarks: missing (dvc.yaml stage evaluate reads it)"
    if case == "missing key":
        del bad["eval"]["seed"]
        return bad, "eval.seed: missing (dvc.yaml stage evaluate reads it)"
    assert case == "cross-stage"
    bad["srvar"]["train"]["batch_size"] = 7  # not a multiple of resources.train_srvar.nproc (2)
    return bad, "srvar.train.batch_size: 7 is not divisible by resources.train_srvar.nproc"


CASES = ["unknown key", "bad value", "missing section", "missing key", "cross-stage"]


@pytest.mark.parametrize("case", CASES)
def test_dvc_repro_with_bad_params_fails_fast_and_keeps_every_output(built: Path, case: str) -> None:
    params = built / "params.yaml"
    good = params.read_text()
    before = _outputs(built)
    assert any(k.endswith("model.pt") for k in before) and "eval/metrics.json" in before
    bad, message = _breaks(yaml.safe_load(good), case)
    params.write_text(yaml.safe_dump(bad, sort_keys=False))
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["dvc", "repro"], cwd=built, env=_env(), capture_output=True, text=True, timeout=300
        )
        elapsed = time.perf_counter() - t0
    finally:
        params.write_text(good)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    if case == "missing section":  # a section the check declares (all but resources): DVC refuses first
        assert "Parameters 'eval' are missing from 'params.yaml'" in out and "Running stage" not in out, out
    else:
        assert message in out, out
        assert "Running stage 'check'" in out and "Running stage 'shard'" not in out, out
    assert elapsed < 60, f"dvc repro took {elapsed:.0f} s to refuse a bad params.yaml"
    assert _outputs(built) == before, f"{case}: outputs changed"


def test_snakemake_refuses_bad_params_before_building_the_dag(built: Path) -> None:
    params = built / "params.yaml"
    good = params.read_text()
    bad, message = _breaks(yaml.safe_load(good), "missing section")
    params.write_text(yaml.safe_dump(bad, sort_keys=False))
    before = _outputs(built)
    try:
        proc = subprocess.run(
            ["snakemake", "--cores", "1"], cwd=built, env=_env(), capture_output=True, text=True, timeout=300
        )
    finally:
        params.write_text(good)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert _outputs(built) == before


def test_check_names_every_missing_declared_key(tmp_path: Path) -> None:
    declared = declared_keys(ROOT / "dvc.yaml")
    assert declared["srvar.model"] == "dvc.yaml stage train_srvar" and "srvar.train.log_every" not in declared
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert missing_keys(raw, declared) == []
    del raw["mar"]["model"], raw["eval"]["seed"]
    assert missing_keys(raw, declared) == ["mar.model", "eval.seed"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    load_params(tmp_path / "params.yaml")  # the schema alone fills in defaults
    with pytest.raises(ConfigError, match=r"mar\.model: missing \(dvc.yaml stage train_mar reads it\)"):
        load_params(tmp_path / "params.yaml", required=declared)
