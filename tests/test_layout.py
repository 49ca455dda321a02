"""The project's layout: declared dependencies agree, the DAG files exist, the CLI works."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_lists_the_same_dependencies_as_pyproject() -> None:
    """environment.yml (the whole pipeline) = the core dependencies + the [pipeline] extra; the
    orchestration stack is in the extra only, pinned, and the core stays free of it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core, pipeline = project["dependencies"], project["optional-dependencies"]["pipeline"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(p for p in pip if not p.startswith("-e")) == sorted(core + pipeline)
    stack = ("dvc", "snakemake", "snakemake-executor-plugin-slurm", "wandb", "webdataset")
    pins = {dep.split("==")[0]: dep for dep in pipeline if "==" in dep}
    assert set(stack) <= set(pins), f"unpinned in [pipeline]: {sorted(set(stack) - set(pins))}"
    assert not [dep for dep in core if dep.split("=")[0].split(">")[0] in stack], core


def test_constraints_pin_every_declared_dependency_but_torch() -> None:
    """requirements/constraints.txt (make setup's ``-c``) pins exact versions of the whole closure,
    every declared dependency included; torch is the Makefile's (TORCH), not the file's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [ln for ln in (ROOT / "requirements" / "constraints.txt").read_text().splitlines() if ln.strip()]
    pins = {}
    for line in lines:
        if line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version and " " not in line, f"constraints.txt: not an exact pin: {line!r}"
        pins[name.lower().replace("_", "-")] = version
    extras = project["optional-dependencies"].values()
    declared = [*project["dependencies"], *(dep for deps in extras for dep in deps)]
    names = {re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower().replace("_", "-") for dep in declared}
    assert "torch" not in pins
    assert sorted(names - {"torch"} - set(pins)) == []
    assert "make constraints" in (ROOT / "requirements" / "constraints.txt").read_text()
    assert "-c $(CONSTRAINTS)" in (ROOT / "Makefile").read_text()


def test_layout_files_exist() -> None:
    for name in (
        "workflow/Snakefile",  # the snakemake-workflows layout: Snakemake finds it from the root
        "workflow/profiles/default/config.yaml",  # ... and this profile, next to it
        "dvc.yaml",
        "params.yaml",
        "environment.yml",
        "pyproject.toml",
        "Makefile",
        "README.md",
        ".ci/run",
        ".dvc/config",
        ".dvcignore",
        "workflow",
        "benchmarks",
    ):
        assert (ROOT / name).exists(), name
    assert not (ROOT / "Snakefile").exists()  # it would shadow workflow/Snakefile
    assert "analytics = false" in (ROOT / ".dvc" / "config").read_text()


def test_every_dvc_stage_is_a_python_module_with_a_cli() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert stage["cmd"] in (f"python -m arsr.stages.{name}", f"python -m arsr.stages.launch {name}"), name
        assert (ROOT / "src" / "arsr" / "stages" / f"{name}.py").is_file(), name
    out = subprocess.run(
        [sys.executable, "-m", "arsr.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "shard" in out.stdout


def test_lower_layers_never_import_higher_ones() -> None:
    order = {"data": 0, "models": 0, "train": 1, "eval": 1, "infer": 2, "stages": 3}
    for layer, level in order.items():
        for path in (ROOT / "src" / "arsr" / layer).rglob("*.py"):
            text = path.read_text()
            for other, other_level in order.items():
                if other_level > level:
                    assert f"arsr.{other}" not in text, f"{path.relative_to(ROOT)} imports arsr.{other}"


def test_no_stage_imports_another_stage() -> None:
    """What two stages share lives below stages/ (common.py is the stages' shared CLI plumbing);
    importlib counts too: a string naming a stage module is an import."""
    stages = ROOT / "src" / "arsr" / "stages"
    names = {p.stem for p in stages.glob("*.py")} - {"__init__", "common"}
    for path in stages.glob("*.py"):
        text = path.read_text()
        assert "importlib" not in text, f"{path.relative_to(ROOT)} imports modules by name"
        for other in names - {path.stem}:
            assert f"arsr.stages.{other}" not in text.replace(f"python -m arsr.stages.{other}", ""), (
                f"{path.relative_to(ROOT)} imports arsr.stages.{other}"
            )
        if path.stem != "launch":
            assert "from arsr.stages import" not in text, path
