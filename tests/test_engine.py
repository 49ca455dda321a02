"""Training engine, in one process: schedule, weight-decay groups, EMA, the NaN rules, the W&B
failure rule, checkpoint refusals, atomic writes and dvc plot files.

The multi-process behaviour (DDP equivalence, kill -9 resume, failing rank, SIGTERM, offline W&B
files) is in test_engine_dist.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import engine_worker as w
import pytest
import torch

from arsr.config import TrainConfig
from arsr.train.checkpoint import CKPT_FORMAT, CheckpointError, atomic_save, load_model_file, safe_load
from arsr.train.ema import EMA
from arsr.train.engine import NonFiniteLossError, Trainer, TrainingInterrupted
from arsr.train.logging import PlotWriter, init_wandb, pipeline_group
from arsr.train.optim import END_RATIO, lr_factor, param_groups, peak_lr

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def wandb_in_process():
    """W&B in this process sets env vars (WANDB_SERVICE, which child processes would join, and
    the hermetic dirs) and starts a service: undo both so later tests start clean."""
    saved = dict(os.environ)
    yield
    import wandb

    wandb.teardown()
    os.environ.clear()
    os.environ.update(saved)


def make_cfg(**kw) -> TrainConfig:
    base = dict(max_steps=6, batch_size=8, amp="none", base_lr=0.05, warmup_steps=2, grad_clip=1.0,
                ema=0.9, val_every=3, ckpt_every=100, log_every=2)  # fmt: skip
    return TrainConfig(**(base | kw))


def make_trainer(out: Path, cfg: TrainConfig | None = None, *, loss_fn=w.loss_fn, kind: str = "tinynet",
                 width: int = 32, accum: int = 1, **kw) -> Trainer:  # fmt: skip
    cfg = cfg or make_cfg()
    torch.manual_seed(0)
    return Trainer(
        kind=kind, model=w.TinyNet(width=width), model_config={"width": width}, cfg=cfg, loss_fn=loss_fn,
        make_train_iter=lambda k: w.synthetic_iter(5, 0, 1, accum, cfg.batch_size // accum, k), accum=accum,
        out_dir=out, fingerprint={"train": cfg.model_dump(mode="json")}, seed=1, val_fn=w.val_fn,
        make_val_iter=lambda: w.val_batches(0, 1), **kw,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Optimizer pieces
# --------------------------------------------------------------------------------------
def test_lr_schedule_warmup_then_decay() -> None:
    cfg = make_cfg(max_steps=100, warmup_steps=10, batch_size=512, base_lr=1e-4)
    assert peak_lr(cfg) == pytest.approx(2e-4)  # base_lr * global_batch / 256
    assert [lr_factor(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(12, cfg) == 1.0  # lin0 holds the peak for 5% of the decay
    assert lr_factor(99, cfg) == pytest.approx(END_RATIO, abs=0.02)
    f = [lr_factor(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(f, f[1:]))
    cos = make_cfg(max_steps=100, warmup_steps=0, schedule="cos")
    assert lr_factor(0, cos) == 1.0 and lr_factor(50, cos) == pytest.approx((1 + END_RATIO) / 2)


def test_weight_decay_groups_follow_the_model_rule() -> None:
    model = w.TinyNet()
    decay, exempt = param_groups(model, 0.05, lambda name, p: p.ndim <= 1 or name.endswith("bias"))
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["fc1.weight", "fc2.weight"]
    assert decay["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
    # MAR-style rule: everything under one submodule is exempt too.
    decay, _ = param_groups(model, 0.05, lambda name, p: p.ndim <= 1 or name.startswith("fc2"))
    assert [names[id(p)] for p in decay["params"]] == ["fc1.weight"]


def test_ema_decay_is_warmed_up() -> None:
    model = w.TinyNet()
    ema = EMA(model, decay=0.999)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10_000) == 0.999
    old = model.fc1.weight.detach().clone()
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    ema.update(model, step=0)
    assert torch.allclose(ema.model.fc1.weight, 0.1 * old + 0.9 * (old + 1.0))


# --------------------------------------------------------------------------------------
# A whole in-process run (single process: no torchrun)
# --------------------------------------------------------------------------------------
def test_single_process_run_writes_outputs(tmp_path: Path) -> None:
    result = make_trainer(tmp_path / "run", make_cfg(amp="bf16")).fit()  # bf16 autocast on CPU
    out = tmp_path / "run"
    assert result.step == 6 and result.val["mse"] > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["train"] == {"loss": result.train["loss"]}  # rest: plots/
    assert "wall_s" in json.loads((out / "timing.json").read_text()) and "wall_s" not in metrics
    rows = (out / "plots" / "loss.tsv").read_text().splitlines()
    assert rows[0] == "step\tloss" and [r.split("\t")[0] for r in rows[1:]] == ["2", "4", "6"]
    assert (out / "plots" / "val_mse.tsv").read_text().splitlines()[1:][-1].startswith("6\t")
    d = load_model_file(out / "model.pt", kind="tinynet", config={"width": 32})
    model = w.TinyNet(**d["config"])
    model.load_state_dict(d["state_dict"])  # model.pt rebuilds the model on its own
    assert d["extra"] == {} and d["step"] == 6


# --------------------------------------------------------------------------------------
# Failure rules
# --------------------------------------------------------------------------------------
def nan_on(steps: set[int]):
    """A loss that is NaN at the given (1-based) optimizer steps."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss, metrics = w.loss_fn(model, batch)
        return (loss * float("nan"), metrics) if calls["n"] in steps else (loss, metrics)

    return loss_fn


def test_nan_steps_are_skipped_and_counted(tmp_path: Path) -> None:
    snapshots = {}

    def on_step(step, model):
        snapshots[step] = model.fc1.weight.detach().clone()

    result = make_trainer(tmp_path / "run", loss_fn=nan_on({3, 4}), on_step=on_step).fit()
    assert result.step == 6
    assert torch.equal(snapshots[2], snapshots[3]) and torch.equal(snapshots[3], snapshots[4])  # skipped
    assert not torch.equal(snapshots[4], snapshots[5])  # and training goes on
    assert all(torch.isfinite(p).all() for p in snapshots.values())
    assert result.train["loss"] == result.train["loss"]  # the logged means hold no NaN


def test_too_many_nan_steps_in_a_row_stop_the_run(tmp_path: Path) -> None:
    cfg = make_cfg(max_steps=20, max_bad_steps=3)
    with pytest.raises(NonFiniteLossError, match="stopping at step 6: 3 non-finite losses in a row"):
        make_trainer(tmp_path / "run", cfg, loss_fn=nan_on(set(range(4, 100)))).fit()


def test_wandb_bad_mode_warns_once_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, wandb_in_process
) -> None:
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with caplog.at_level(logging.WARNING, logger="arsr.train.logging"):
        result = make_trainer(tmp_path / "run").fit()
    assert result.step == 6 and (tmp_path / "run" / "model.pt").is_file()
    warnings = [r for r in caplog.records if r.name == "arsr.train.logging"]
    assert len(warnings) == 1 and "W&B init failed" in warnings[0].getMessage()


def test_wandb_failing_mid_run_turns_into_a_noop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, wandb_in_process
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = init_wandb("train_x", {"a": 1}, out_dir=tmp_path)
    assert run.enabled and run.id
    run._run.finish()  # W&B goes away behind the wrapper's back: its log() now raises
    with caplog.at_level(logging.WARNING, logger="arsr.train.logging"):
        run.log({"loss": 1.0}, step=1)
        run.log_images("samples", [torch.zeros(4, 4, 3, dtype=torch.uint8)])
        run.log_table("t", ["a"], [[1]])
        run.summary_update({"x": 1})
        run.finish()
    assert not run.enabled and run.id is None
    assert len([r for r in caplog.records if r.name == "arsr.train.logging"]) == 1


def test_wandb_unreachable_server_is_one_warning(tmp_path: Path) -> None:
    # A fresh process: W&B keeps state per process after a failed online init (wandb#9865).
    code = (
        "from arsr.train.logging import init_wandb\n"
        "run = init_wandb('train_x', {'a': 1}, out_dir='out')\n"
        "run.log({'loss': 1.0}); run.summary_update({'x': 1}); run.finish()\n"
        "print('noop run', run.id)\n"
    )
    env = os.environ | {
        "WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "a" * 40,
        "WANDB_INIT_TIMEOUT": "3", "WANDB_RUN_GROUP": "g",
    }  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "noop run None" in p.stdout
    assert p.stderr.count("W&B init failed") == 1, p.stderr


def test_sigusr1_checkpoints_exits_nonzero_and_resumes(tmp_path: Path) -> None:
    def on_step(step, model):
        if step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM's --signal=USR1@<secs> would

    with pytest.raises(TrainingInterrupted) as exc:
        make_trainer(tmp_path / "run", on_step=on_step).fit()
    assert exc.value.code == 128 + signal.SIGUSR1
    assert safe_load(tmp_path / "run" / "ckpt" / "last.pt")["step"] == 4  # seen at the next step's check
    assert not (tmp_path / "run" / "model.pt").exists()
    assert make_trainer(tmp_path / "run").fit().step == 6


def test_wandb_group_derives_from_params_and_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    monkeypatch.chdir(tmp_path)  # no git here: the commit part is 'nogit'
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    first = pipeline_group()
    assert first.startswith("pipe-") and pipeline_group() == first  # every stage gets the same id
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    assert pipeline_group() != first
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-7")
    assert pipeline_group() == "sweep-7"


def test_checkpoint_of_another_kind_or_config_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    make_trainer(out, make_cfg(max_steps=2)).fit()
    with pytest.raises(CheckpointError, match="holds a 'tinynet' model, not a 'vqvae' model"):
        make_trainer(out, make_cfg(max_steps=2), kind="vqvae").fit()
    assert (out / "ckpt" / "last.pt").is_file()  # another model's file is never moved aside
    with pytest.raises(CheckpointError, match="width: checkpoint 32 != expected 64"):
        make_trainer(out, make_cfg(max_steps=2), width=64).fit()
    with pytest.raises(CheckpointError, match="not a 'srvar' model"):
        load_model_file(out / "model.pt", kind="srvar")
    with pytest.raises(CheckpointError, match="width"):
        load_model_file(out / "model.pt", kind="tinynet", config={"width": 64})


class NotATensor:
    pass


def test_checkpoint_holding_a_pickled_object_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ckpt = out / "ckpt" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"format": CKPT_FORMAT, "kind": "tinynet", "payload": NotATensor()}, ckpt)
    with pytest.raises(CheckpointError, match="pickled object"):
        make_trainer(out).fit()
    with pytest.raises(CheckpointError, match="pickled object"):
        safe_load(ckpt)
    assert safe_load(ckpt, allow=[NotATensor])["kind"] == "tinynet"  # an explicit allow-list works


def test_param_change_moves_the_checkpoint_aside(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    make_trainer(out, make_cfg(max_steps=2)).fit()
    old = safe_load(out / "ckpt" / "last.pt")["fingerprint_id"]
    make_trainer(out, make_cfg(max_steps=2, base_lr=0.01)).fit()
    text = capsys.readouterr().out
    assert "starting fresh" in text and "train.base_lr: checkpoint 0.05 != expected 0.01" in text
    assert (out / "ckpt" / f"stale-{old}" / "last.pt").is_file()
    assert safe_load(out / "ckpt" / "last.pt")["fingerprint_id"] != old


def test_a_reverted_param_restores_its_checkpoint_and_old_ones_are_pruned(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """ckpt/ is a cache keyed by fingerprint: run A, change a param (B), revert (A): A's finished
    checkpoint comes back and only the outputs are rewritten, the same bytes. Stale folders beyond
    the newest keep_stale (2) are removed."""
    out, ckpt = tmp_path / "run", tmp_path / "run" / "ckpt"
    outputs = ("model.pt", "metrics.json", "plots/loss.tsv", "plots/val_mse.tsv")

    def run(base_lr: float, on_step=None) -> str:
        capsys.readouterr()
        make_trainer(out, make_cfg(max_steps=4, base_lr=base_lr), on_step=on_step).fit()
        return capsys.readouterr().out

    def fp() -> str:
        return safe_load(ckpt / "last.pt")["fingerprint_id"]

    def stale() -> set[str]:
        return {d.name for d in ckpt.glob("stale-*")}

    run(0.05)
    fp_a, first = fp(), {name: (out / name).read_bytes() for name in outputs}
    run(0.01)
    fp_b = fp()
    assert stale() == {f"stale-{fp_a}"} and (ckpt / f"stale-{fp_a}" / "plots" / "loss.tsv").is_file()

    steps: list[int] = []
    text = run(0.05, on_step=lambda step, model: steps.append(step))
    assert steps == [], "a finished checkpoint restores: no training step"
    assert f"restored this fingerprint's checkpoint {ckpt / f'stale-{fp_a}' / 'last.pt'}" in text, text
    assert "already trained 4 steps: rewriting the outputs only" in text
    assert fp() == fp_a and stale() == {f"stale-{fp_b}"}
    for name in outputs:  # the first run's model, metrics and plots (B's plots went aside with B)
        assert (out / name).read_bytes() == first[name], name
    assert json.loads((out / "timing.json").read_text())["steps_run"] == 0

    text = run(0.02)  # C: A goes aside; stale B, A
    fp_c = fp()
    assert "starting fresh" in text and stale() == {f"stale-{fp_b}", f"stale-{fp_a}"}
    text = run(0.03)  # D: C goes aside; B, the least recently set aside, is removed
    assert stale() == {f"stale-{fp_a}", f"stale-{fp_c}"}
    assert f"removed stale checkpoint(s) beyond the newest 2: stale-{fp_b}" in text, text


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
def test_atomic_save_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    atomic_save({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for a lambda
        atomic_save({"a": lambda: 0}, path)
    assert torch.equal(safe_load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temp file left behind


def test_plots_are_truncated_to_the_resumed_step(tmp_path: Path) -> None:
    plots = PlotWriter(tmp_path / "plots")
    for step in (2, 4, 6):
        plots.append(step, {"loss": step / 10, "val/mse": 1.0})
    with open(tmp_path / "plots" / "loss.tsv", "a") as f:
        f.write("8\t0.")  # a line cut by a kill
    plots.truncate_after(4)
    assert (tmp_path / "plots" / "loss.tsv").read_text() == "step\tloss\n2\t0.2\n4\t0.4\n"
    assert (tmp_path / "plots" / "val_mse.tsv").read_text() == "step\tval_mse\n2\t1.0\n4\t1.0\n"


def test_ema_averages_parameters_and_copies_buffers() -> None:
    from arsr.train.ema import EMA

    model = torch.nn.Linear(2, 2)
    model.register_buffer("mask", torch.tensor([0.0, float("-inf")]))
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1000)
    assert torch.equal(ema.model.mask, model.mask)  # -inf stays -inf, no NaN
    assert torch.allclose(ema.model.weight, model.weight - 0.9)


def test_input_fingerprints_ignore_runner_bookkeeping(tmp_path: Path) -> None:
    """A folder written by Snakemake holds a .snakemake_timestamp; its fingerprint must equal DVC's,
    or a checkpoint made under one runner would be 'stale' under the other."""
    from arsr.train.checkpoint import hash_paths

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train-000000.tar").write_bytes(b"data")
    before = hash_paths(tmp_path / "shards")
    (tmp_path / "shards" / ".snakemake_timestamp").write_bytes(b"")
    assert hash_paths(tmp_path / "shards") == before
    (tmp_path / "shards" / "train-000001.tar").write_bytes(b"more")
    assert hash_paths(tmp_path / "shards") != before


def test_a_dead_wandb_service_of_this_process_is_not_joined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wandb_in_process
) -> None:
    """An idle W&B service can exit while its WANDB_SERVICE stays in the environment (a test runner
    waiting minutes on a subprocess): the next init starts a new service instead of failing."""
    from arsr.train.logging import wandb_service_alive

    monkeypatch.setenv("WANDB_SERVICE", f"3-{os.getpid()}-unix-{tmp_path / 'gone' / 'socket'}")
    assert not wandb_service_alive()
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = init_wandb("train_x", {"a": 1}, out_dir=tmp_path)
    assert run.enabled and run.id
    run.finish()
