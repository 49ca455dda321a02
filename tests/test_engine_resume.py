"""Exact resume: a run fed by arsr.data.loader (2 workers) is kill -9'ed after a checkpoint at a
random step and rerun; a changed param starts fresh; the offline W&B files hold what was logged;
SIGTERM with loader workers running; a run stopped on 2 ranks resumes on 1 (and with another
accum). Every run is tests/engine_worker.py, a tiny training stage.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import engine_worker as w
import pytest
import torch

from arsr.train.checkpoint import load_model_file, safe_load


def weights(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    return safe_load(path)[key]


# --------------------------------------------------------------------------------------
# 2. kill -9 mid-run, rerun: bitwise the weights of a run never stopped (+ 6. W&B files)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loader_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("resume")
    w.write_shards(tmp / "shards")
    args = ["--steps", "24", "--batch", "4", "--ckpt-every", "4", "--log-every", "3", "--val-every", "5",
            "--dropout", "0.2", "--shards", str(tmp / "shards"), "--workers", "2",
            "--deterministic"]  # fmt: skip
    e = w.launch_env(WANDB_MODE="offline", WANDB_RUN_GROUP="engine-test")
    full = w.launch([*w.plain_cmd(), "--out", str(tmp / "full"), *args], env=e)
    assert full.returncode == 0, full.stderr[-3000:]

    # The same command, slowed down, killed a moment after a randomly chosen checkpoint.
    kill_after = random.choice([4, 8, 12])
    cmd = [*w.plain_cmd(), "--out", str(tmp / "cut"), *args]
    proc = subprocess.Popen(cmd + ["--sleep", "0.1"], cwd=w.ROOT, env=e, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if f"saved checkpoint at step {kill_after}" in line:
            break
    time.sleep(random.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed = safe_load(tmp / "cut" / "accum1" / "ckpt" / "last.pt")
    resumed = w.launch(cmd, env=e)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"tmp": tmp, "env": e, "cmd": cmd, "killed": proc.returncode, "kill_after": kill_after,
            "killed_at": killed["step"], "wandb_id": killed["wandb_id"], "resumed": resumed}  # fmt: skip


def test_kill9_then_rerun_resumes_bitwise(loader_runs: dict) -> None:
    tmp, r = loader_runs["tmp"], loader_runs
    assert r["killed"] == -signal.SIGKILL
    assert r["kill_after"] <= r["killed_at"] < 24, "the kill must land mid-run"
    assert (
        f"resuming from {tmp / 'cut' / 'accum1' / 'ckpt' / 'last.pt'} at step {r['killed_at']}"
        in r["resumed"].stdout
    )
    full, cut = tmp / "full" / "accum1", tmp / "cut" / "accum1"
    a, b = load_model_file(full / "model.pt", "tinynet"), load_model_file(cut / "model.pt", "tinynet")
    assert a["step"] == b["step"] == 24
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for key in ("model", "optimizer"):
        assert str(weights(full / "ckpt" / "last.pt", key)) == str(weights(cut / "ckpt" / "last.pt", key))
    # dvc metrics and plots continue exactly as well (nothing run-dependent in them).
    assert (full / "metrics.json").read_text() == (cut / "metrics.json").read_text()
    for f in sorted((full / "plots").glob("*.tsv")):
        assert f.read_text() == (cut / "plots" / f.name).read_text(), f.name


def test_changed_param_starts_fresh_and_keeps_the_stale_checkpoint(loader_runs: dict) -> None:
    cut = loader_runs["tmp"] / "cut" / "accum1"
    old = safe_load(cut / "ckpt" / "last.pt")
    p = w.launch(loader_runs["cmd"] + ["--lr", "0.02", "--steps", "3"], env=loader_runs["env"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "starting fresh" in p.stdout and "train.base_lr" in p.stdout
    stale = cut / "ckpt" / f"stale-{old['fingerprint_id']}" / "last.pt"
    assert safe_load(stale)["step"] == old["step"] == 24
    new = safe_load(cut / "ckpt" / "last.pt")
    assert new["step"] == 3 and new["fingerprint_id"] != old["fingerprint_id"]
    assert [r.split("\t")[0] for r in (cut / "plots" / "loss.tsv").read_text().splitlines()] == ["step", "3"]


def leet(run_dir: Path) -> list[dict]:
    wandb_cli = Path(sys.executable).with_name("wandb")
    p = w.launch([str(wandb_cli), "leet", "inspect", "--json", str(run_dir)])
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def test_offline_wandb_files_hold_the_logged_keys(loader_runs: dict) -> None:
    tmp = loader_runs["tmp"]
    (run_dir,) = sorted((tmp / "full" / "wandb").glob("offline-run-*"))
    records = leet(run_dir)
    info = next(r["run"] for r in records if r["type"] == "run")
    assert info["run_group"] == "engine-test" and info["job_type"] == "train_tinynet"
    assert info["config"]["update"]["train"]["max_steps"] == 24
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    keys = set().union(*history)
    assert {"loss", "mse", "tlr", "tnm", "val/mse", "val/hook", "samples._type", "per_image._type"} <= keys
    val_steps = sorted(h["_step"] for h in history if "val/mse" in h)
    assert val_steps == [5, 10, 15, 20, 24] and all("samples._type" in h for h in history if "val/mse" in h)
    assert len(list((run_dir / "files" / "media" / "images").glob("samples_*.png"))) >= 2
    assert list((run_dir / "files" / "media" / "table").glob("per_image_*.table.json"))
    assert max(h["_step"] for h in history) == 24
    # The rerun continued the killed run's W&B run: the id came from the checkpoint.
    assert loader_runs["wandb_id"]
    same_id = sorted((tmp / "cut" / "wandb").glob(f"offline-run-*-{loader_runs['wandb_id']}"))
    assert len(same_id) == 2  # the killed run's folder and the rerun's
    records = leet(same_id[-1])
    assert next(r["run"] for r in records if r["type"] == "run")["run_id"] == loader_runs["wandb_id"]
    steps = [r["history"]["step"]["num"] for r in records if r["type"] == "history"]
    assert min(steps) > loader_runs["killed_at"] and max(steps) == 24


# --------------------------------------------------------------------------------------
# SIGTERM to the whole process group, with loader workers (torchrun, 2 ranks x 2 workers)
# --------------------------------------------------------------------------------------
def test_sigterm_with_loader_workers_checkpoints(tmp_path: Path) -> None:
    marker = tmp_path / "step"
    w.write_shards(tmp_path / "shards")  # 4 shards: 2 ranks x 2 workers
    cmd = w.torchrun_cmd(2) + ["--out", str(tmp_path / "out"), "--steps", "200", "--batch", "4",
                               "--shards", str(tmp_path / "shards"), "--workers", "2"]  # fmt: skip
    proc = subprocess.Popen(
        cmd + ["--sleep", "0.05", "--marker", str(marker)],
        cwd=w.ROOT,
        env=w.launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (marker.exists() and int(marker.read_text() or 0) >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "on signal SIGTERM: checkpoint saved" in out, err[-2000:]
    assert safe_load(tmp_path / "out" / "accum1" / "ckpt" / "last.pt")["step"] >= 3


def test_a_failing_stage_with_loader_workers_exits_instead_of_hanging(tmp_path: Path) -> None:
    """The workers ignore SIGTERM (above), which is how Python's exit stops them: a stage failing
    mid-run with workers alive must still end (the engine stops them; they also leave on their own
    a while after a SIGTERM)."""
    w.write_shards(tmp_path / "shards")
    cmd = [*w.plain_cmd(), "--out", str(tmp_path / "out"), "--steps", "50", "--batch", "4",
           "--shards", str(tmp_path / "shards"), "--workers", "2", "--fail", "0:3"]  # fmt: skip
    t0 = time.monotonic()
    proc = w.launch(cmd, timeout=45, env=w.launch_env())
    assert proc.returncode != 0 and "fails on purpose at step 3" in proc.stderr
    assert time.monotonic() - t0 < 40


# --------------------------------------------------------------------------------------
# Checkpoints by wall time (ckpt_minutes), decided by rank 0 for every rank
# --------------------------------------------------------------------------------------
CKPT_MINUTES_WORKER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import engine_worker as w
import torch
from arsr.config import TrainConfig
from arsr.train.dist import cleanup, init_distributed
from arsr.train.engine import Trainer

d = init_distributed()
cfg = TrainConfig(max_steps=12, batch_size=4, amp="none", warmup_steps=1, val_every=1000,
                  ckpt_every=1000, log_every=1000, ckpt_minutes=float(sys.argv[3]))


class SkewedClocks(Trainer):
    def _ckpt_due(self):  # rank 1's clock runs far ahead: a checkpoint is always due by it
        return d.rank == 1 or super()._ckpt_due()


torch.manual_seed(0)
SkewedClocks(kind="tinynet", model=w.TinyNet(), model_config={"width": 32}, cfg=cfg, loss_fn=w.loss_fn,
             make_train_iter=lambda k: w.synthetic_iter(5, d.rank, d.world_size, 1, 4 // d.world_size, k),
             out_dir=sys.argv[2], fingerprint={"train": cfg.model_dump(mode="json")}, seed=3,
             on_step=lambda step, model: time.sleep(0.1), dist_info=d).fit()
cleanup()
"""


def saved_steps(stdout: str) -> list[int]:
    return [int(ln.rsplit(" ", 1)[1]) for ln in stdout.splitlines() if ln.startswith("saved checkpoint")]


def test_ckpt_minutes_checkpoints_before_ckpt_every_on_every_rank(tmp_path: Path) -> None:
    """0.3 s between checkpoints, ~0.1 s per step, ckpt_every 1000: a checkpoint every few steps,
    at the steps rank 0's clock says. The write is collective: had rank 1 gone by its own clock
    (which here finds one due at every step) the ranks would have disagreed, and the run failed."""
    script = tmp_path / "worker.py"
    script.write_text(CKPT_MINUTES_WORKER)
    tests = str(Path(__file__).parent)
    # The ranks through arsr.proc: a run hung by a regression dies with its torchrun at the timeout.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                "arsr.proc"]  # fmt: skip
    p = w.launch([*torchrun, str(script), tests, str(tmp_path / "timed"), "0.005"], env=w.launch_env())
    assert p.returncode == 0, p.stderr[-3000:]
    steps = saved_steps(p.stdout)
    assert steps[-1] == 12 and 3 <= len(steps) < 12 and steps == sorted(set(steps)), p.stdout
    assert safe_load(tmp_path / "timed" / "ckpt" / "last.pt")["step"] == 12
    # 0 turns it off: the last step's checkpoint only (one plain process: rank 0's clock).
    p = w.launch([sys.executable, str(script), tests, str(tmp_path / "off"), "0"], env=w.launch_env())
    assert p.returncode == 0, p.stderr[-3000:]
    assert saved_steps(p.stdout) == [12]


# --------------------------------------------------------------------------------------
# Resume on another world size / accum: the same data order, the same weights up to rounding
# --------------------------------------------------------------------------------------
def plot_rows(run_dir: Path, name: str) -> dict[int, float]:
    rows = (run_dir / "plots" / f"{name}.tsv").read_text().splitlines()[1:]
    return {int(r.split("\t")[0]): float(r.split("\t")[1]) for r in rows}


def test_resume_on_another_world_size_and_accum_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    """(a) 2 ranks x 2 workers train 16 steps from shards (64 samples, batch 8: two epochs);
    (b) the same command, its torchrun process group SIGTERMed after the checkpoint at step 8,
    resumed on 1 rank; (c) that checkpoint resumed on 1 rank with accum 2 and no workers. The loader
    gives every step the same samples whatever the split, so (b) and (c) end at (a)'s weights up to
    float rounding (another reduction order), and the logged loss (and, for (b), the mse of a log
    window cut by the resume, whose sums came from 2 ranks) continues as well."""
    w.write_shards(tmp_path / "shards")
    args = ["--steps", "16", "--batch", "8", "--ckpt-every", "8", "--log-every", "5", "--val-every", "8",
            "--shards", str(tmp_path / "shards"), "--deterministic", "--portable"]  # fmt: skip
    env = w.launch_env()
    full = w.launch([*w.torchrun_cmd(2), "--out", str(tmp_path / "full"), *args, "--workers", "2"], env=env)
    assert full.returncode == 0, full.stderr[-3000:]

    cut_cmd = [*w.torchrun_cmd(2), "--out", str(tmp_path / "cut"), *args, "--workers", "2", "--sleep", "0.2"]
    proc = subprocess.Popen(
        cut_cmd, cwd=w.ROOT, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    out = []
    for line in proc.stdout:
        out.append(line)
        if "saved checkpoint at step 8" in line:
            os.killpg(proc.pid, signal.SIGTERM)  # as SLURM or a shell does: torchrun's whole group
            break
    out += proc.communicate(timeout=90)[0]
    assert proc.returncode != 0 and "on signal SIGTERM: checkpoint saved" in "".join(out), "".join(out)
    ckpt = safe_load(tmp_path / "cut" / "run" / "ckpt" / "last.pt")
    assert 8 < ckpt["step"] < 16 and len(ckpt["rng"]) == len(ckpt["meter"]) == 2
    shutil.copytree(tmp_path / "cut", tmp_path / "cut_accum2")

    one = w.launch([*w.plain_cmd(), "--out", str(tmp_path / "cut"), *args, "--workers", "1"], env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    assert f"at step {ckpt['step']}" in one.stdout and "reseeding" in one.stdout, one.stdout
    cmd = [*w.plain_cmd(), "--out", str(tmp_path / "cut_accum2"), *args, "--workers", "0", "--accum", "2"]
    acc = w.launch(cmd, env=env)
    assert acc.returncode == 0, acc.stderr[-3000:]
    assert f"at step {ckpt['step']}" in acc.stdout, acc.stdout

    ref_dir = tmp_path / "full" / "run"
    ref = load_model_file(ref_dir / "model.pt", "tinynet")["state_dict"]
    ref_model = weights(ref_dir / "ckpt" / "last.pt")
    torch.manual_seed(0)  # the worker's initial weights
    init = w.TinyNet().state_dict()
    for name in ("cut", "cut_accum2"):
        run_dir = tmp_path / name / "run"
        ema = load_model_file(run_dir / "model.pt", "tinynet")
        model = weights(run_dir / "ckpt" / "last.pt")
        assert ema["step"] == 16
        for k in ref:
            assert not torch.equal(ref_model[k], init[k])  # it did train
            tol = 1e-5 * max(1.0, ref_model[k].abs().max().item())
            torch.testing.assert_close(model[k], ref_model[k], rtol=0, atol=tol, msg=f"{name}: {k}")
            torch.testing.assert_close(ema["state_dict"][k], ref[k], rtol=0, atol=tol, msg=f"{name}: ema {k}")
        keys = ["loss", "val_mse"] + (["mse"] if name == "cut" else [])
        for key in keys:
            got, want = plot_rows(run_dir, key), plot_rows(ref_dir, key)
            assert got.keys() == want.keys(), (name, key)
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6), (name, key)
