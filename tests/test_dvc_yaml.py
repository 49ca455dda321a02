"""dvc.yaml tells the truth: each stage's code deps are what its module really imports inside
src/arsr (the import closure, plus config.py), and its params are the keys of the sections the
stage module names in ``PARAMS`` (RUNTIME keys left out: ``arsr.config.stage_param_keys``); the check
stage declares its ``PARAMS`` sections whole: every one but ``resources``.

``python tests/test_dvc_yaml.py`` prints the deps and params every stage should declare;
``--write`` puts them into dvc.yaml (data deps, outs and the header comment are kept).
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# config.py is a leaf here: what it imports (the models' hyperparameter dataclasses, the sampling
# settings) reaches a stage as params values, which dvc.yaml declares key by key.
LEAVES = {"arsr.config"}


def module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def direct_imports(name: str) -> set[str]:
    """The arsr modules ``name`` imports when it runs (``if TYPE_CHECKING`` blocks excluded), with the
    packages Python executes on the way (``arsr.train`` for ``arsr.train.checkpoint``)."""
    path = module_file(name)
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for n in ast.walk(node)}  # fmt: skip
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("arsr")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("arsr"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if module_file(f"{node.module}.{a.name}")}
    out = set()
    for mod in found:
        parts = mod.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if module_file(".".join(parts[:i]))}
    return out - {name}


def import_closure(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        if mod not in LEAVES:
            todo += sorted(direct_imports(mod))
    return seen | {"arsr.config"}


def expected(stage: str) -> tuple[list[str], list]:
    """(code deps as paths relative to the repo, params entries) of one dvc.yaml stage: the keys of
    its ``PARAMS`` sections, or those sections whole (``WHOLE_SECTIONS``: the check stage)."""
    from arsr.config import stage_param_keys

    name = f"arsr.stages.{stage}"
    files = sorted(str(module_file(m).relative_to(ROOT)) for m in import_closure(name))
    module = importlib.import_module(name)
    if getattr(module, "WHOLE_SECTIONS", False):
        return files, list(module.PARAMS)
    return files, stage_param_keys(module.PARAMS)


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_dvc_yaml_code_deps_are_the_import_closure_of_each_stage() -> None:
    for stage, spec in dvc_stages().items():
        files, _ = expected(stage)
        declared = sorted(d for d in spec["deps"] if d.startswith("src/"))
        assert declared == files, (
            f"dvc.yaml stage {stage}: code deps differ from what it imports\n"
            f"  missing: {sorted(set(files) - set(declared))}\n  extra: {sorted(set(declared) - set(files))}"
        )


def test_dvc_yaml_params_are_the_keys_each_stage_reads() -> None:
    for stage, spec in dvc_stages().items():
        _, keys = expected(stage)
        assert sorted(spec.get("params", [])) == sorted(keys), f"dvc.yaml stage {stage}: params != {keys}"


def test_every_stage_waits_for_the_params_check() -> None:
    """The check stage (all of params.yaml but the machine's resources) runs before any stage whose
    outputs DVC would delete."""
    from arsr.config import Params

    stages = dvc_stages()
    assert stages["check"]["params"] == [k for k in Params.model_fields if k != "resources"]
    assert "resources" in Params.model_fields
    (check_out,) = stages["check"]["outs"]
    assert check_out == {"runs/check/params.ok": {"persist": True, "cache": False}}
    for name, spec in stages.items():
        if name != "check":
            assert "runs/check/params.ok" in spec["deps"], f"dvc.yaml stage {name} does not wait for check"


def test_a_logging_key_is_no_stage_param() -> None:
    declared = {k for spec in dvc_stages().values() for k in spec.get("params", []) if isinstance(k, str)}
    assert "srvar.train.log_every" not in declared and "srvar.train.ckpt_every" not in declared
    assert "srvar.train.max_steps" in declared and "srvar.model" in declared


def test_no_stage_declares_a_resource() -> None:
    """Processes, loader workers, encoding batches: no stage (the check neither) depends on them."""
    declared = [k for spec in dvc_stages().values() for k in spec.get("params", [])]
    assert all(isinstance(k, str) for k in declared), "a whole-file params entry would include resources"
    assert not [k for k in declared if k == "resources" or k.startswith("resources.")]
    assert not [k for k in declared if k.rsplit(".", 1)[-1] in ("nproc", "workers", "compile")]


def test_every_written_file_is_a_declared_output() -> None:
    """Timings go to the run folder of the stage that writes them, declared (uncached)."""
    stages = dvc_stages()
    run_dir = {"shard": "shard", "train_base": "base", "tokenize": "tokenize", "train_vqvae": "vqvae",
               "train_srvar": "srvar", "train_mar": "mar", "evaluate": "evaluate"}  # fmt: skip
    for stage, folder in run_dir.items():
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stages[stage].get("outs", [])]
        assert f"runs/{folder}/timing.json" in outs, f"{stage} does not declare runs/{folder}/timing.json"


def write_dvc_yaml() -> None:
    text = (ROOT / "dvc.yaml").read_text()
    header = "".join(ln + "\n" for ln in text.splitlines() if ln.startswith("#"))[: text.index("stages:")]
    doc = yaml.safe_load(text)
    for stage, spec in doc["stages"].items():
        files, keys = expected(stage)
        spec["deps"] = [d for d in spec["deps"] if not d.startswith("src/")] + files
        spec.pop("params", None)
        if keys:  # keep the key order cmd, deps, params, outs, metrics
            items = list(spec.items())
            items.insert(2, ("params", keys))
            doc["stages"][stage] = dict(items)
    body = yaml.safe_dump(doc, sort_keys=False, width=200)
    lines = []
    for ln in body.splitlines():
        stage_line = ln.startswith("  ") and not ln.startswith("   ") and ln.endswith(":")
        if (stage_line and lines) or ln == "plots:":
            lines.append("")
        lines.append(ln)
    (ROOT / "dvc.yaml").write_text(header + "\n".join(lines).replace("stages:\n\n", "stages:\n") + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(SRC))
    if "--write" in sys.argv:
        write_dvc_yaml()
    for stage in dvc_stages():
        files, keys = expected(stage)
        print(f"{stage}:\n  deps:\n" + "".join(f"    - {f}\n" for f in files))
        print("  params:\n" + "".join(f"    - {k}\n" for k in keys))
