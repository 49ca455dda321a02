"""The plan check (arsr.plan, `arsr check --nodes N --gpus-per-node G`): every training stage's global
batch divides into nodes x ranks per node x accum micro-batches on the target machines, and the
workspace has free disk; every problem names the setting to change."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from arsr.config import Params, parse_params
from arsr.plan import (
    GIB,
    MIN_FREE_ENV,
    min_free_bytes,
    plan_problems,
    plan_summary,
    stage_targets,
    workspace_paths,
)
from arsr.stages.check import CHECK_TEXT

ROOT = Path(__file__).resolve().parents[1]


def _params(batch: int = 32, nproc: int = 2, accum: int = 1) -> Params:
    """Schema defaults, with srvar's global batch and resources.train_srvar as given."""
    return parse_params(
        {
            "srvar": {"train": {"batch_size": batch}},
            "resources": {"train_srvar": {"nproc": nproc, "accum": accum}},
        }
    )


def _problems(params: Params, nodes: int = 1, gpus: int = 0, **kw: object) -> list[str]:
    kw.setdefault("min_free", 0)
    return plan_problems(params, nodes, gpus, **kw)  # type: ignore[arg-type]


def test_divisible_batches_pass() -> None:
    params = _params()
    assert _problems(params) == []
    assert _problems(params, nodes=4) == []  # 4 CPU nodes x 2 ranks (resources nproc) x 1: 32 / 8
    target = {t.stage: t for t in stage_targets(params, 4)}["train_srvar"]
    assert (target.world_size, target.micro_batches, target.micro_batch) == (8, 8, 4)


def test_two_nodes_of_four_gpus_with_batch_32_pass() -> None:
    params = _params(batch=32)
    assert _problems(params, nodes=2, gpus=4) == []
    target = {t.stage: t for t in stage_targets(params, 2, 4)}["train_srvar"]
    assert (target.ranks_per_node, target.world_size, target.micro_batch) == (4, 8, 4)
    line = next(ln for ln in plan_summary(params, 2, 4) if ln.startswith("train_srvar:"))
    assert "2 node(s) x 4 ranks per node (the node's GPUs, not resources.train_srvar.nproc 2)" in line, line
    assert "8 micro-batches of 4" in line, line
    # one line per training stage
    assert [ln.split(":")[0] for ln in plan_summary(params, 2, 4)] == [t.stage for t in stage_targets(params)]


def test_batch_12_on_two_nodes_of_four_gpus_fails_naming_the_key() -> None:
    params = _params(batch=12)  # valid for the schema: 12 = 2 CPU ranks x 6
    assert _problems(params) == []
    problems = _problems(params, nodes=2, gpus=4)
    assert len(problems) == 1, problems
    msg = problems[0]
    assert msg.startswith("srvar.train.batch_size: 12 is not divisible by 2 node(s) (--nodes) x 4 ranks"), msg
    for part in (
        "(--gpus-per-node)",
        "resources.train_srvar.accum",
        "= 8",
        "multiple of 8 (nearest: 8 or 16)",
    ):
        assert part in msg, (part, msg)
    line = next(ln for ln in plan_summary(params, 2, 4) if ln.startswith("train_srvar:"))
    assert "does not divide into 8 micro-batches" in line, line


def test_cpu_ranks_name_nproc_and_an_accum_that_would_do() -> None:
    params = _params(batch=16, nproc=1, accum=4)  # 2 nodes x 4 GPUs: 8 ranks x 4 micro-steps = 32 > 16
    (msg,) = _problems(params, nodes=2, gpus=4)
    assert "resources.train_srvar.accum to 2 (a divisor of the 2 samples per rank)" in msg, msg
    (msg,) = _problems(_params(batch=30, nproc=2, accum=1), nodes=2)  # 2 CPU nodes x 2 ranks: 30 / 4
    assert "x 2 ranks per node (resources.train_srvar.nproc) x accum 1" in msg, msg
    assert "nearest: 28 or 32" in msg and "--nodes" in msg, msg


def test_disk_check_with_a_huge_minimum_fails_naming_the_path(tmp_path: Path) -> None:
    problems = _problems(_params(), workspace=tmp_path, min_free=1 << 60)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"free disk: {tmp_path.resolve()} has "), problems
    assert "GiB free, at least 1073741824.00 GiB needed" in problems[0] and MIN_FREE_ENV in problems[0]
    assert _problems(_params(), workspace=tmp_path, min_free=0) == []
    # the environment's minimum, when none is given
    assert plan_problems(_params(), workspace=tmp_path, env={MIN_FREE_ENV: "1e12"})[0].startswith("free disk")
    assert plan_problems(_params(), workspace=tmp_path, env={MIN_FREE_ENV: "0"}) == []


def test_min_free_from_the_environment() -> None:
    assert min_free_bytes({}) == GIB
    assert min_free_bytes({MIN_FREE_ENV: "2.5"}) == int(2.5 * GIB)
    for bad in ("lots", "-1", "nan"):
        with pytest.raises(ValueError, match=f"\\${MIN_FREE_ENV}: '{bad}' is not a number of GiB"):
            min_free_bytes({MIN_FREE_ENV: bad})
    (msg,) = plan_problems(_params(), env={MIN_FREE_ENV: "lots"})
    assert MIN_FREE_ENV in msg


def test_workspace_paths_one_per_filesystem(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    assert workspace_paths(tmp_path) == [tmp_path]  # runs/ is on the same filesystem


# --------------------------------------------------------------------------------------
# arsr check --nodes N --gpus-per-node G
# --------------------------------------------------------------------------------------
def _check(
    tmp_path: Path, batch: int | None, *options: str
) -> tuple[subprocess.CompletedProcess, Path, float]:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    if batch is not None:
        raw["srvar"]["train"]["batch_size"] = batch
    params, out = tmp_path / "params.yaml", tmp_path / "runs" / "check" / "params.ok"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARSR_")} | {MIN_FREE_ENV: "0"}
    cmd = [sys.executable, "-m", "arsr.stages.check", "--params", str(params), "--out", str(out)]
    cmd += ["--dvc-yaml", str(ROOT / "dvc.yaml"), *options]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return proc, out, time.perf_counter() - t0


def test_check_cli_fails_on_a_plan_that_does_not_divide(tmp_path: Path) -> None:
    proc, out, seconds = _check(tmp_path, 12, "--nodes", "2", "--gpus-per-node", "4")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "srvar.train.batch_size: 12 is not divisible by 2 node(s) (--nodes) x 4 ranks" in proc.stderr, (
        proc.stderr
    )
    assert "1 problem(s)" in proc.stderr and "nothing was run or removed" in proc.stderr, proc.stderr
    assert not out.exists() and not out.parent.exists()
    assert seconds < 30, f"arsr check took {seconds:.1f} s"
    print(f"arsr check (failing plan): {seconds:.1f} s")


def test_check_cli_prints_a_plan_that_passes(tmp_path: Path) -> None:
    proc, out, seconds = _check(tmp_path, None, "--nodes", "2", "--gpus-per-node", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "plan for training jobs on 2 node(s) x 4 GPU(s)" in proc.stdout, proc.stdout
    for stage in ("train_base", "train_vqvae", "train_srvar", "train_mar"):
        assert f"  {stage}: 2 node(s) x 4 ranks per node (the node's GPUs" in proc.stdout, proc.stdout
    assert out.read_text() == CHECK_TEXT
    assert sorted(p.name for p in out.parent.iterdir()) == ["params.ok"]  # the lock is gone
    print(f"arsr check (passing plan): {seconds:.1f} s")


def test_check_cli_defaults_are_the_dag_check(tmp_path: Path) -> None:
    """What `dvc repro` runs: one CPU node, ranks from resources.<stage>.nproc."""
    proc, out, _ = _check(tmp_path, None)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 node(s) x 2 ranks per node (resources.train_srvar.nproc) x accum 1" in proc.stdout, proc.stdout
    assert out.read_text() == CHECK_TEXT


def test_check_cli_refuses_zero_nodes(tmp_path: Path) -> None:
    proc, out, _ = _check(tmp_path, None, "--nodes", "0")
    assert proc.returncode == 2 and "--nodes: 0 must be at least 1" in proc.stderr, proc.stderr
    assert not out.exists()
