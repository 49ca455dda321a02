"""The tiny DAG in throw-away copies of this repo, shared by the end-to-end tests.

conftest.py imports the session fixtures (`dvc_project`, `smk_project`), so the slow builds
run once per session whichever test files need them (test_pipeline.py, test_slurm.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The smallest DAG that still exercises every stage (CPU, a couple of minutes). Training is
# deterministic so the local and the SLURM runs can be compared number for number.
_TINY_TRAIN = {
    "max_steps": 8,
    "batch_size": 8,
    "val_every": 100,  # validate once, at the end
    "ckpt_every": 4,
    "log_every": 2,
    "warmup_steps": 1,
    "deterministic": True,
    "amp": "none",
}
_TINY_RANKS = {"nproc": 2, "workers": 1}  # resources.train_*: 2 ranks, one loader process each
TINY_PARAMS = {
    "seed": 0,
    "data": {
        "source": "builtin",
        "hr_size": 32,
        "scale": 4,
        "crop_stride": 64,
        "min_shards": 4,
    },
    "base": {"model": {"channels": 16, "depth": 3}, "train": _TINY_TRAIN},
    "vqvae": {
        "model": {
            "ch": 16,
            "ch_mult": [1, 2, 2, 4],
            "vocab_size": 64,
            "z_channels": 8,
            "patch_nums": [1, 2, 3, 4],
        },
        "train": {**_TINY_TRAIN, "max_steps": 12},
    },
    "srvar": {"model": {"depth": 2, "width": 64, "heads": 2}, "train": _TINY_TRAIN},
    "mar": {
        "model": {
            "encoder_dim": 64,
            "decoder_dim": 64,
            "encoder_depth": 1,
            "decoder_depth": 1,
            "encoder_heads": 2,
            "decoder_heads": 2,
            "buffer_size": 4,
            "diffloss_width": 64,
            "diffloss_depth": 2,
            "num_sampling_steps": "ddim10",
        },
        "train": _TINY_TRAIN,
    },
    "eval": {"max_val_images": 4, "num_samples": 2, "mar": {"num_iter": 4}},
    "resources": {
        "shard": {"workers": 2},
        "train_base": _TINY_RANKS,
        "train_vqvae": _TINY_RANKS,
        "tokenize": {"batch_size": 32, "workers": 2},
        "train_srvar": _TINY_RANKS,
        "train_mar": _TINY_RANKS,
    },
}


def full_params(overrides: dict) -> dict:
    """A complete params.yaml (every key, as DVC's key-level params need) = the schema's defaults
    (params.yaml's values) with ``overrides`` merged in."""
    from arsr.config import parse_params

    return parse_params(overrides).model_dump(mode="json")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["WANDB_MODE"] = "offline"
    env.pop("WANDB_RUN_GROUP", None)
    env.pop("WANDB_SERVICE", None)  # a service of the test process is not the stages'
    return env


def run(cmd: list[str], cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def make_project(dest: Path, params: dict) -> Path:
    """A git repo holding this checkout's files (tracked + untracked, not ignored) and ``params``."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "params.yaml").write_text(yaml.safe_dump(full_params(params), sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"],
    ):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def sha_tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".snakemake_timestamp"
    }


def dag_rules_and_metrics(proj: Path) -> tuple[list[str], list[Path]]:
    """Every dvc.yaml stage as its Snakemake rule name (as the Snakefile derives it), and every
    declared ``metrics.json`` (relative paths)."""
    from dvc.repo import Repo

    with Repo(str(proj)) as repo:
        stages = [s for s in repo.index.stages if getattr(s, "cmd", None)]
        rules = sorted(s.name.replace("@", "__") for s in stages)
        metrics = sorted(
            Path(o.fs_path).relative_to(proj)
            for s in stages
            for o in s.outs
            if Path(o.fs_path).name == "metrics.json"
        )
    return rules, metrics


@pytest.fixture(scope="session")
def dvc_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    proj = make_project(tmp_path_factory.mktemp("dvc"), TINY_PARAMS)
    run(["dvc", "repro"], proj)
    return proj


@pytest.fixture(scope="session")
def smk_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    proj = make_project(tmp_path_factory.mktemp("smk"), TINY_PARAMS)
    run(["snakemake", "--cores", "2"], proj)
    return proj
