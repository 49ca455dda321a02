"""End-to-end: the tiny DAG under `dvc repro` and under `snakemake`, in copies of this repo.

One session fixture per runner builds the whole tiny DAG once; every end-to-end test
shares them (the slow part of the suite).
"""

from __future__ import annotations

import time
from pathlib import Path

# Shared with test_slurm.py: the fixtures dvc_project/smk_project come from conftest.py.
from pipeline_fixtures import TINY_PARAMS, make_project, run, sha_tree  # noqa: F401


def test_second_dvc_repro_does_nothing_quickly(dvc_project: Path) -> None:
    t0 = time.perf_counter()
    out = run(["dvc", "repro"], dvc_project).stdout
    elapsed = time.perf_counter() - t0
    assert "up to date" in out or "didn't change" in out
    assert elapsed < 3.0, f"no-op dvc repro took {elapsed:.2f} s"


def test_snakemake_builds_byte_identical_shards_and_dvc_accepts_them(
    dvc_project: Path, smk_project: Path
) -> None:
    assert sha_tree(smk_project / "data" / "shards") == sha_tree(dvc_project / "data" / "shards")
    run(["dvc", "commit", "-f"], smk_project)
    status = run(["dvc", "status"], smk_project).stdout
    assert "up to date" in status, status
