"""Shared fixtures; under CI=true a skipped test fails the run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# The tiny-DAG session fixtures, shared by test_pipeline.py and test_slurm.py.
from pipeline_fixtures import dvc_project, smk_project  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SR_BENCH = SHARED / "data" / "sr_benchmarks"

_skipped: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def wandb_settings_of_the_tests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """An empty W&B settings folder for every test and the stages they start: arsr leaves
    WANDB_CONFIG_DIR to the user (a `wandb login --host` server), and a developer's settings must
    not change what the tests see. One set in the environment (CI) is kept."""
    if os.environ.get("WANDB_CONFIG_DIR"):
        yield
        return
    os.environ["WANDB_CONFIG_DIR"] = str(tmp_path_factory.mktemp("wandb-config"))
    yield
    os.environ.pop("WANDB_CONFIG_DIR", None)


@pytest.fixture(scope="session", autouse=True)
def slurm_runs_in_the_background(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    wandb_settings_of_the_tests: None,
) -> Iterator[None]:
    """The SLURM scenarios of test_slurm.py (mostly waiting on the cluster) start with the session
    when it selects one of their tests and a cluster is up, so they overlap the other tests."""
    import slurm_scenarios

    wanted = any("slurm_cluster" in item.fixturenames for item in request.session.items)
    if wanted and slurm_scenarios.cluster_problem() is None:
        slurm_scenarios.start(tmp_path_factory.mktemp("slurm"))
    yield
    slurm_scenarios.shutdown()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI", "").lower() == "true" and _skipped:
        print(f"\nCI=true: {len(_skipped)} skipped test(s) count as failures: {_skipped}")
        session.exitstatus = 1


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny ops on a shared 2-core box: one intra-op thread avoids OpenMP spin-wait stalls."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def set5() -> Path:
    path = SR_BENCH / "Set5"
    if not path.is_dir():
        pytest.skip(f"{path} not found (../shared is provided in CI)")
    return path
