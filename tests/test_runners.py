"""DVC and Snakemake side by side on one workspace (real `dvc` and `snakemake` processes).

- A workspace that DVC built or restored (`dvc repro`, `dvc checkout`, `dvc commit -f`) is
  "nothing to be done" for Snakemake, although Snakemake has no record of those files and their
  mtimes say otherwise (workflow/rules/common.smk makes the mtimes agree with dvc.lock);
- Snakemake still reruns a stage (and what follows) when one of its params keys or sources changes;
- plain `snakemake --cores 2` trains one model at a time (training rules claim their cores).

Each test works on a copy of a shared session project (pipeline_fixtures), never on the original.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import yaml
from pipeline_fixtures import run

NOTHING = "Nothing to be done"


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def _plan(proj: Path, *args: str) -> tuple[set[str], str]:
    """The rules a dry run would run (``all`` left out), and its whole output."""
    proc = run(["snakemake", "-n", "--cores", "2", *args], proj)
    out = proc.stdout + proc.stderr
    if NOTHING in out:
        return set(), out
    table = out.split("Job stats:", 1)[1].split("total", 1)[0]
    rules = set(re.findall(r"^(\w+)\s+\d+\s*$", table, re.M)) - {"all"}
    return rules, out


def _set_param(proj: Path, dotted: str, value) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    *parents, key = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[key] = value
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _touch_tree(folder: Path) -> None:
    now = time.time()  # (later than the build; an mtime in the future is never copied to outputs)
    for path in folder.rglob("*"):
        if path.is_file():
            os.utime(path, (now, now))


def test_a_workspace_dvc_built_or_restored_is_nothing_to_be_done(dvc_project: Path, tmp_path: Path) -> None:
    proj = _copy(dvc_project, tmp_path / "proj")
    # New mtimes everywhere, no content change: every source touched, outputs restored by DVC
    # in its own order (a file and two folders deleted first).
    _touch_tree(proj / "src")
    (proj / "runs" / "base" / "model.pt").unlink()
    shutil.rmtree(proj / "data" / "tokens")
    shutil.rmtree(proj / "eval" / "samples")
    run(["dvc", "checkout"], proj)
    assert not (proj / ".snakemake").exists()  # Snakemake never built anything here
    rules, out = _plan(proj, "--config", "dvc_mtimes=false")  # mtimes alone: stale-looking
    assert {"tokenize", "train_srvar", "train_mar", "evaluate", "report"} <= rules, out
    t0 = time.perf_counter()
    rules, out = _plan(proj)
    first = time.perf_counter() - t0
    assert rules == set(), out
    assert "mtimes follow dvc.lock: up to date" in out, out
    t0 = time.perf_counter()
    rules, out = _plan(proj)  # idempotent: nothing left to adjust
    again = time.perf_counter() - t0
    assert rules == set() and "mtimes follow dvc.lock" not in out, out
    status = run(["dvc", "status"], proj).stdout
    assert "up to date" in status, status  # contents untouched (.snakemake_timestamp is dvcignored)
    print(f"snakemake -n after dvc checkout: {first:.2f} s; again: {again:.2f} s")


def test_params_key_and_source_edits_still_rerun_their_stage(dvc_project: Path, tmp_path: Path) -> None:
    """A DVC-built workspace: Snakemake has no params record, DVC's verdict makes it rerun."""
    proj = _copy(dvc_project, tmp_path / "proj")
    assert _plan(proj)[0] == set()
    base_lr = yaml.safe_load((proj / "params.yaml").read_text())["srvar"]["train"]["base_lr"]
    _set_param(proj, "srvar.train.base_lr", base_lr * 2)
    rules, out = _plan(proj)
    assert rules == {"train_srvar", "evaluate", "report"}, out
    _set_param(proj, "srvar.train.base_lr", base_lr)  # back to what dvc.lock says
    assert _plan(proj)[0] == set()
    _set_param(proj, "srvar.train.log_every", 7)  # a runtime key: no stage declares it
    assert _plan(proj)[0] == set()
    with open(proj / "src" / "arsr" / "models" / "mar.py", "a") as f:
        f.write("# an edit\n")
    rules, out = _plan(proj)
    assert rules == {"train_mar", "evaluate", "report"}, out


def test_snakemake_built_workspace_keeps_its_triggers_and_accepts_dvc_commit(
    smk_project: Path, tmp_path: Path
) -> None:
    proj = _copy(smk_project, tmp_path / "proj")
    grad_clip = yaml.safe_load((proj / "params.yaml").read_text())["mar"]["train"]["grad_clip"]
    assert _plan(proj)[0] == set()
    _set_param(proj, "mar.train.grad_clip", grad_clip / 2)  # Snakemake's own params trigger
    assert _plan(proj)[0] == {"train_mar", "evaluate", "report"}
    _set_param(proj, "mar.train.grad_clip", grad_clip)
    assert _plan(proj)[0] == set()
    # `dvc commit -f` (the README's step after a Snakemake build) relinks cached files: new mtimes.
    run(["dvc", "commit", "-f"], proj)
    rules, out = _plan(proj)
    assert rules == set(), out
    (proj / "runs" / "vqvae" / "model.pt").unlink()
    run(["dvc", "checkout"], proj)
    assert _plan(proj)[0] == set()
    _set_param(proj, "mar.train.grad_clip", grad_clip / 2)
    rules, out = _plan(proj)
    assert rules == {"train_mar", "evaluate", "report"}, out
    _set_param(proj, "mar.train.grad_clip", grad_clip)
    assert _plan(proj)[0] == set()
    with open(proj / "src" / "arsr" / "stages" / "tokenize.py", "a") as f:
        f.write("# an edit\n")
    rules, out = _plan(proj)
    assert rules == {"tokenize", "train_srvar", "train_mar", "evaluate", "report"}, out


def test_plain_snakemake_on_two_cores_trains_one_model_at_a_time(dvc_project: Path, tmp_path: Path) -> None:
    proj = _copy(dvc_project, tmp_path / "proj")
    force = ["--forcerun", "train_srvar", "train_mar", "--", "runs/srvar/model.pt", "runs/mar/model.pt"]
    # Each training rule claims nproc x (1 + workers) cores (the tiny DAG: 2 x 2), capped at --cores.
    for cores, threads in ((2, 2), (8, 4)):
        proc = run(["snakemake", "-n", "--cores", str(cores), *force], proj)
        out = proc.stdout + proc.stderr
        claims = re.findall(r"^rule (train_\w+):\n(?:    .*\n)*?    threads: (\d+)$", out, re.M)
        assert sorted(claims) == [("train_mar", str(threads)), ("train_srvar", str(threads))], out
    proc = run(["snakemake", "--cores", "2", *force], proj)
    log = proc.stdout + proc.stderr
    events = re.findall(r"^(?:local)?rule (train_\w+):|^Finished jobid: \d+ \(Rule: (train_\w+)\)", log, re.M)
    order = [("start", a) if a else ("end", b) for a, b in events]
    assert len(order) == 4, log
    first = order[0][1]
    assert order[:2] == [("start", first), ("end", first)], order  # the second starts after the first ends
