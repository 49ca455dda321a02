"""Shared fixtures; under CI=true a skipped test fails the run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The tiny-DAG session fixtures, shared by test_pipeline.py and test_slurm.py.
from pipeline_fixtures import dvc_project, smk_project  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SR_BENCH = SHARED / "data" / "sr_benchmarks"

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI", "").lower() == "true" and _skipped:
        print(f"\nCI=true: {len(_skipped)} skipped test(s) count as failures: {_skipped}")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def set5() -> Path:
    path = SR_BENCH / "Set5"
    if not path.is_dir():
        pytest.skip(f"{path} not found (../shared is provided in CI)")
    return path
