"""Packaging (issue 14, point 6): ``pip install arsr`` (the core dependencies) is enough for ``arsr
upscale`` and ``arsr evaluate --hr-dir``; the orchestration stack (DVC, Snakemake, W&B, WebDataset,
...) is the ``[pipeline]`` extra, which make setup installs with requirements/constraints.txt's pins.

- The core closure holds none of the stack (read from pyproject.toml and the installed metadata).
- The tools run in this venv with every module that only ``[pipeline]`` brings made unimportable (a
  meta-path finder raising ModuleNotFoundError, as a core-only install would).
- ``test_fresh_venv_core_install`` (``slow``, ``install``): a clean venv, torch as the Makefile
  installs it, then ``pip install <copy of the repo>``, and the same commands with the real thing.
  ``pytest -m "not install"`` leaves it out (it needs pip's indexes: PyPI or this machine's
  find-links). About 90 s on 2 busy cores: venv 4 s, torch 30 s, arsr 32 s, the commands 23 s.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from stage_helpers import write_tiny_srvar

from arsr.data.imresize import imresize

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
STACK = ("dvc", "snakemake", "wandb", "webdataset")  # must never load on the core paths
PN, SCALE = (1, 2, 3, 4), 2
TORCH = re.search(r"^TORCH\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)  # torch==2.13.0


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def closure(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` pull in, as installed here (markers evaluated, no extras of
    the dependencies' own unless a requirement asks for them)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = _name(req.name)
        if name in seen or (req.marker is not None and not any(
            req.marker.evaluate({"extra": e}) for e in ("", *req.extras)
        )):  # fmt: skip
            continue
        seen.add(name)
        try:
            deps = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue  # declared but not installed here (nothing of it can be imported either)
        for dep in map(Requirement, deps):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(dep)
    return seen


def pipeline_only_modules(requirements: list[str] | None = None) -> set[str]:
    """Top-level import names that only distributions of ``requirements``' closure (default: the
    ``[pipeline]`` extra), not the core's, provide: what a core-only install cannot import."""
    core = closure(PROJECT["dependencies"])
    extra = closure(PROJECT["optional-dependencies"]["pipeline"] if requirements is None else requirements)
    extra -= core
    return {
        module
        for module, dists in md.packages_distributions().items()
        if dists and all(_name(d) in extra for d in dists) and not module.startswith("_")
    } | (set(STACK) if requirements is None else set())


def test_core_closure_holds_none_of_the_orchestration_stack() -> None:
    core = closure(PROJECT["dependencies"])
    stack = {"dvc", "snakemake", "snakemake-executor-plugin-slurm", "wandb", "webdataset", "pyarrow",
             "matplotlib", "tabulate", "scikit-image"}  # fmt: skip
    assert not core & stack, sorted(core & stack)
    assert {"torch", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "scipy", "tqdm"} <= core
    assert stack <= closure(PROJECT["optional-dependencies"]["pipeline"])


# Runs ``arsr ARGS`` with the names of argv[1] unimportable; last stdout line: the blocked modules
# that were loaded anyway (a .pth file, say) as JSON.
BLOCKING_CLI = """
import json, sys
blocked = set(sys.argv[1].split(","))
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: arsr[pipeline] only)", name=name)
        return None
sys.meta_path.insert(0, NotInstalled())
from arsr.cli import main
try:
    rc = main(sys.argv[2:])
finally:
    print("\\nloaded:", json.dumps(sorted({m.partition(".")[0] for m in sys.modules} & blocked)))
sys.exit(rc)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", ARSR_DEVICE="cpu", WANDB_MODE="disabled")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_STEP_ID", "PYTHONPATH"):
        env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def tool_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/vqvae/model.pt and runs/srvar/model.pt (tiny, untrained x2 models on an hr tokenizer),
    bench/HR with two photos-to-be (48x40, 40x40) and their LR images in lr/. No params.yaml: the
    tools take the schema's defaults, as outside a project."""
    root = tmp_path_factory.mktemp("packaging")
    write_tiny_srvar(root, scale=SCALE, patch_nums=PN, vqvae_extra={"target": "hr"}, vqvae_file=True)
    rng = np.random.default_rng(0)
    (root / "bench/HR").mkdir(parents=True)
    (root / "lr").mkdir()
    for name, (h, w) in {"a": (48, 40), "b": (40, 40)}.items():  # LPIPS (AlexNet) needs >= 40 px
        hr = np.clip(rng.normal(128, 40, (h // 4, w // 4, 3)), 0, 255).astype(np.uint8)
        hr = np.asarray(Image.fromarray(hr).resize((w, h), Image.BICUBIC))
        Image.fromarray(hr).save(root / "bench/HR" / f"{name}.png")
        Image.fromarray(imresize(hr, 1.0 / SCALE)).save(root / "lr" / f"{name}.png")
    return root


def tool_commands(root: Path) -> list[list[str]]:
    """The core paths: the help texts, upscale, evaluate --hr-dir with every method these models
    allow and every metric (LPIPS/DISTS are skipped with a line where their weights are absent)."""
    return [
        ["--help"],
        ["upscale", "--help"],
        ["evaluate", "--help"],
        ["upscale", "--model", str(root / "runs/srvar/model.pt"), "--input", str(root / "lr"),
         "--output", str(root / "up")],
        ["evaluate", "--hr-dir", str(root / "bench"), "--scale", str(SCALE),
         "--model-dir", str(root / "runs"), "--methods", "bicubic,vqvae_rec,srvar",
         "--metrics", "psnr,ssim,psnr_rgb,lpips,dists", "--json", str(root / "scores.json")],
    ]  # fmt: skip


def _clear_outputs(root: Path) -> None:
    shutil.rmtree(root / "up", ignore_errors=True)
    (root / "scores.json").unlink(missing_ok=True)


def _check_outputs(root: Path) -> None:
    assert sorted(p.name for p in (root / "up").iterdir()) == [f"a_x{SCALE}.png", f"b_x{SCALE}.png"]
    assert Image.open(root / "up" / f"a_x{SCALE}.png").size == (40, 48)
    scores = json.loads((root / "scores.json").read_text())
    assert set(scores["mean"]) == {"bicubic", "vqvae_rec", "srvar"}
    assert {"psnr", "ssim", "psnr_rgb"} <= set(scores["metrics"])


def _run_blocked(root: Path, blocked: set[str]) -> list[tuple[list[str], subprocess.CompletedProcess]]:
    _clear_outputs(root)
    runs = []
    for args in tool_commands(root):
        cmd = [sys.executable, "-c", BLOCKING_CLI, ",".join(sorted(blocked)), *args]
        out = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
        runs.append((args, out))
        if out.returncode:
            break
    return runs


def test_core_tools_import_nothing_of_the_pipeline_extra(tool_inputs: Path) -> None:
    blocked = pipeline_only_modules()
    assert {"dvc", "snakemake", "wandb", "webdataset", "pyarrow", "matplotlib", "skimage"} <= blocked
    for args, out in _run_blocked(tool_inputs, blocked):
        assert out.returncode == 0, f"arsr {' '.join(args)}:\n{out.stderr[-3000:]}"
        assert out.stdout.splitlines()[-1] == "loaded: []", (args, out.stdout.splitlines()[-1])
    _check_outputs(tool_inputs)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, emptied afterwards: the venv takes 1.3 GB, and pytest keeps its last three runs."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.install
def test_fresh_venv_core_install(tool_inputs: Path, scratch: Path) -> None:
    """A clean venv (no system site-packages), torch as the Makefile installs it (TORCH), then ``pip
    install`` of a copy of the repo, core only: the stack is absent and the tools still run."""
    src = scratch / "arsr"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "requirements"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    venv, times = scratch / "venv", {}
    py, constraints = venv / "bin" / "python", str(src / "requirements" / "constraints.txt")
    env = {k: v for k, v in _env().items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    steps = {
        "venv": [sys.executable, "-m", "venv", str(venv)],
        "torch": [str(py), "-m", "pip", "install", "-q", TORCH, "-c", constraints],
        "arsr": [str(py), "-m", "pip", "install", "-q", str(src), "-c", constraints],
    }
    for step, cmd in steps.items():
        t0 = time.monotonic()
        out = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=900)
        times[step] = round(time.monotonic() - t0, 1)
        assert out.returncode == 0, f"{step}: {out.stderr[-3000:]}"
    installed = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], env=env, capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
    names = {_name(p["name"]) for p in json.loads(installed)}
    stack = {"dvc", "snakemake", "snakemake-executor-plugin-slurm", "wandb", "webdataset", "pyarrow",
             "matplotlib", "tabulate", "scikit-image"}  # fmt: skip
    assert not names & stack, sorted(names & stack)
    assert "torch" in names and "arsr" in names
    _clear_outputs(tool_inputs)
    t0 = time.monotonic()
    for args in tool_commands(tool_inputs):
        out = subprocess.run([str(venv / "bin" / "arsr"), *args], cwd=tool_inputs, env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, f"arsr {' '.join(args)}:\n{out.stderr[-3000:]}"
    times["commands"] = round(time.monotonic() - t0, 1)
    _check_outputs(tool_inputs)
    print(f"fresh core install: {times}")
