"""Training engine under torchrun (2 ranks, gloo on CPU, fp32): DDP equivalence, a failing rank,
SIGTERM. Every run is tests/engine_worker.py, a tiny training stage.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import engine_worker as w
import pytest
import torch

from arsr.config import TrainConfig
from arsr.train.checkpoint import load_model_file, safe_load
from arsr.train.engine import Trainer


def weights(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    return safe_load(path)[key]


# --------------------------------------------------------------------------------------
# 1. DDP == one process on the concatenated batch
# --------------------------------------------------------------------------------------
def test_two_ranks_match_one_process_on_the_whole_batch(tmp_path: Path, monkeypatch) -> None:
    p = w.launch(
        w.torchrun_cmd(2) + ["--out", str(tmp_path / "ddp"), "--steps", "5", "--accum", "1", "2"],
        env=w.launch_env(),
    )
    assert p.returncode == 0, p.stderr[-3000:]

    # Reference: this process alone (no torchrun), global batch 8, accum 1.
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    ckpt = safe_load(tmp_path / "ddp" / "accum1" / "ckpt" / "last.pt")
    cfg = TrainConfig(**ckpt["fingerprint"]["train"])  # (the ranks are no part of it: resources)
    torch.manual_seed(0)
    init = w.TinyNet().state_dict()
    torch.manual_seed(0)
    Trainer(
        kind="tinynet",
        model=w.TinyNet(),
        model_config={"width": 32, "dropout": 0.0},
        cfg=cfg,
        loss_fn=w.loss_fn,
        make_train_iter=lambda k: w.synthetic_iter(5, 0, 1, 1, 8, k),
        out_dir=tmp_path / "one",
        fingerprint={},
        seed=3,
        val_fn=w.val_fn,
        make_val_iter=lambda: w.val_batches(0, 1),
    ).fit()

    ref = weights(tmp_path / "one" / "ckpt" / "last.pt")
    ref_ema = weights(tmp_path / "one" / "ckpt" / "last.pt", "ema")
    ref_val = json.loads((tmp_path / "one" / "metrics.json").read_text())["val"]["mse"]
    for accum in (1, 2):
        run_dir = tmp_path / "ddp" / f"accum{accum}"
        got, got_ema = weights(run_dir / "ckpt" / "last.pt"), weights(run_dir / "ckpt" / "last.pt", "ema")
        assert ref.keys() == got.keys()
        for k in ref:
            assert not torch.equal(ref[k], init[k])  # it did train
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=f"accum {accum}: {k}")
            torch.testing.assert_close(got_ema[k], ref_ema[k], rtol=0, atol=1e-6)
        # Validation is all-reduced over the ranks' halves of the val set.
        val = json.loads((run_dir / "metrics.json").read_text())["val"]["mse"]
        assert val == pytest.approx(ref_val, abs=1e-6)


# --------------------------------------------------------------------------------------
# 3. One rank raising ends the whole job (no hang)
# --------------------------------------------------------------------------------------
def test_one_failing_rank_ends_the_job(tmp_path: Path) -> None:
    t0 = time.monotonic()
    p = w.launch(
        w.torchrun_cmd(2) + ["--out", str(tmp_path), "--steps", "200", "--sleep", "0.02", "--fail", "1:3"],
        env=w.launch_env(),
        timeout=90,
    )
    assert p.returncode != 0
    assert time.monotonic() - t0 < 60
    assert "rank 1 fails on purpose at step 3" in p.stderr


# --------------------------------------------------------------------------------------
# 4. SIGTERM: checkpoint, exit non-zero; the rerun resumes from there
# --------------------------------------------------------------------------------------
def test_sigterm_checkpoints_and_the_rerun_resumes(tmp_path: Path) -> None:
    marker = tmp_path / "step"
    cmd = w.torchrun_cmd(2) + ["--out", str(tmp_path / "out"), "--steps", "16", "--log-every", "5"]
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
    assert "on signal SIGTERM: checkpoint saved" in out, err[-3000:]
    ckpt = tmp_path / "out" / "accum1" / "ckpt" / "last.pt"
    stopped = safe_load(ckpt)["step"]
    assert 3 <= stopped < 16 and len(safe_load(ckpt)["rng"]) == 2
    assert not (tmp_path / "out" / "accum1" / "model.pt").exists()

    p = w.launch(cmd, env=w.launch_env())
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"at step {stopped}" in p.stdout
    assert load_model_file(tmp_path / "out" / "accum1" / "model.pt", "tinynet")["step"] == 16
