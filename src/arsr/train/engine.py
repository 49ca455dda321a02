"""The training loop shared by train_vqvae, train_srvar and train_mar.

A stage builds its model (a plain ``nn.Module``), a loss function and its data iterators, then::

    d = init_distributed()
    mb = micro_batch_size(cfg, d.world_size, res.accum)   # samples per rank per micro-step
    trainer = Trainer(kind="mar", model=model, model_config=kwargs, cfg=cfg, accum=res.accum, loss_fn=loss_fn,
                      make_train_iter=lambda k: train_loader(..., micro_batch=mb, start_step=k),
                      out_dir="runs/mar", fingerprint=fp, seed=params.seed, dist_info=d, ...)
    result = trainer.fit()
    cleanup()

What one optimizer step does (``Trainer._train_step``)::

    for each of accum micro-steps:            # no_sync on all but the last: one all-reduce per step
        batch = next(train_iter)              # this rank's share of global batch `step`: f(seed, step)
        loss, metrics = loss_fn(ddp_model, batch)    under autocast
        scaler.scale(loss / accum).backward()
    unscale -> clip_grad_norm_ -> (skip if not finite) -> AdamW step -> scaler update -> EMA update

Everything a resumed run needs to continue bit for bit (model, EMA, optimizer, scaler, step,
every rank's RNG states, the metric sums of the current log window, the W&B run id) is in
``ckpt/last.pt``; the lr is a pure function of the step and the data a pure function of the
micro-step, so a run killed at any point and rerun gives the weights of a run never stopped
(CPU, fp32; on GPU with ``deterministic: true``). A checkpoint also resumes on another number of
ranks or another ``accum``: the global batch of a step holds the same samples for any split
(arsr.data.loader), the model, EMA, optimizer and scaler states are the same on every rank, the
log window's metric sums of all ranks are merged, and only the RNG streams are reseeded; the
weights then equal those of the uninterrupted run up to float rounding (another reduction order).

A checkpoint is written every ``ckpt_every`` steps and also once ``ckpt_minutes`` have passed
since the last one (by rank 0's clock, shared in the per-step all-reduce: every rank must
checkpoint at the same step, as the write is collective), so a kill loses at most that much work.
"""

from __future__ import annotations

import inspect
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from arsr.data.loader import stop_workers
from arsr.io import atomic_write_text
from arsr.provenance import machine_info
from arsr.slurm import requeue_self
from arsr.train.checkpoint import (
    CKPT_FORMAT,
    atomic_save,
    fingerprint_id,
    load_for_resume,
    safe_load,
    save_model_file,
)
from arsr.train.dist import (
    DistInfo,
    all_gather_object,
    all_reduce_sum_,
    barrier,
    broadcast_object,
    get_rng_state,
    init_distributed,
    print0,
    seed_all,
    set_deterministic,
    set_rng_state,
)
from arsr.train.ema import EMA
from arsr.train.logging import (
    MetricMeter,
    PlotWriter,
    Progress,
    WandbRun,
    final_metrics,
    init_wandb,
    merge_sums,
)
from arsr.train.optim import NoDecayRule, build_optimizer, default_no_weight_decay, lr_factor, peak_lr, set_lr

if TYPE_CHECKING:  # config imports models and infer; only the type is needed here
    from arsr.config import TrainConfig

Batch = Any
Metrics = dict[str, "float | torch.Tensor"]
LossFn = Callable[[nn.Module, Batch], "tuple[torch.Tensor, Metrics]"]
ValFn = Callable[[nn.Module, Batch], "dict[str, tuple[float | torch.Tensor, float | torch.Tensor]]"]
OnStep = Callable[[int, nn.Module], "Metrics | None"]
OnVal = Callable[[int, nn.Module, WandbRun], "dict[str, float] | None"]

FP16_INIT_SCALE = 2.0**11  # VAR's GradScaler settings
FP16_MAX_SCALE = 32768.0
FP16_GROWTH_INTERVAL = 1000


# As VAR: our models keep no running statistics, so skip DDP's buffer broadcast before every
# forward (SRVAR's attention-mask buffers are megabytes). Buffers are still synced once at wrap.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters  # torch >= 2.13
    else {"broadcast_buffers": False}
)


class NonFiniteLossError(RuntimeError):
    """``max_bad_steps`` non-finite losses in a row."""


class TrainingInterrupted(SystemExit):
    """SIGTERM/SIGUSR1: a checkpoint was written; exit non-zero (128 + signal) so SLURM can requeue."""


def micro_batch_size(cfg: TrainConfig, world_size: int, accum: int = 1) -> int:
    """Samples per rank per micro-step for the global ``cfg.batch_size`` on ``world_size`` ranks
    with ``accum`` micro-steps each."""
    per_step = world_size * accum
    if cfg.batch_size % per_step:
        raise ValueError(
            f"batch_size {cfg.batch_size} is not divisible by world size {world_size} x accum {accum}"
        )
    return cfg.batch_size // per_step


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _cpu_meter_state(meter: MetricMeter) -> dict[str, Any]:
    """``meter``'s state (sums of the current log window) with its sums on the CPU."""
    state = meter.state_dict()
    return {"sums": {k: v.detach().cpu() for k, v in state["sums"].items()}, "counts": dict(state["counts"])}


def _meter_state_for(saved: Any, rank: int, world_size: int) -> dict[str, Any] | None:
    """What ``rank`` of ``world_size`` loads of a checkpoint's meter states (one per saving rank).

    The rank count unchanged: its own (a bitwise continuation). Changed from ``W0``: rank 0 takes
    the sums and counts of all ``W0`` ranks scaled by ``world_size / W0``, the others nothing. The
    logged mean is (sum over ranks) / (count over ranks) (``merge_sums``), and every rank adds one
    value per step or micro-step, so this keeps each step of the window at the weight it has in
    the rest of the window (the means of an uninterrupted run; with ``accum`` also changed, the
    per-micro-step metrics of the steps before the resume weigh ``accum_old / accum_new`` as
    much). A checkpoint holding one dict (rank 0's, saved before the per-rank list) is loaded
    everywhere, as it was then."""
    if isinstance(saved, dict):
        return saved
    if len(saved) == world_size:
        return saved[rank]
    if rank != 0:
        return None
    scale = world_size / len(saved)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    for state in saved:
        for k, v in state["sums"].items():
            sums[k] = sums[k] + v if k in sums else v
            counts[k] = counts.get(k, 0) + state["counts"][k]
    # Every rank counted every key equally often, so the scaled counts are whole numbers.
    return {
        "sums": {k: v * scale for k, v in sums.items()},
        "counts": {k: int(c * scale) if (c * scale).is_integer() else c * scale for k, c in counts.items()},
    }


@dataclass
class TrainResult:
    step: int
    train: dict[str, float] = field(default_factory=dict)  # last log window, averaged over ranks
    val: dict[str, float] = field(default_factory=dict)  # last validation of the EMA model


class Trainer:
    """Runs one training stage; see the module docstring.

    Args:
        kind: model kind recorded in checkpoints ("vqvae", "srvar", "mar"); another kind is refused.
        model: the plain module to train (built identically on every rank; DDP syncs it anyway).
        model_config: JSON-able kwargs that rebuild it; recorded, and compared on resume.
        cfg: the stage's ``train`` section.
        loss_fn: ``(model, batch) -> (loss, metrics)``. ``model`` may be DDP-wrapped: call it for
            the forward pass and reach other methods through ``arsr.train.dist.unwrap(model)``.
            The batch is already on the device. Metrics are averaged over micro-steps and ranks.
        make_train_iter: ``start_micro_step -> iterator`` of micro-batches for this rank (infinite).
        out_dir: ``runs/<stage>``: gets ckpt/last.pt, model.pt, metrics.json, timing.json, plots/.
        fingerprint: JSON-able dict (the stage's params and hashes of its inputs); a checkpoint
            resumes only when it matches.
        seed: the top-level seed; rank r draws from seed + r.
        val_fn: ``(ema_model, batch) -> {name: (sum, count)}``, summed over batches and ranks.
        make_val_iter: ``() -> iterable`` of this rank's share of the val set, each sample once.
        no_weight_decay: ``(name, param) -> bool``, the model's AdamW exemptions.
        model_extra: dict stored in model.pt beside the EMA weights (e.g. the tokenizer it needs).
        on_step: ``(step, model)`` after every optimizer step, on every rank (e.g. VQ dead-code
            restarts; it must keep ranks identical). May return metrics to log.
        on_val: ``(step, ema_model, wandb_run)`` at each validation, on rank 0 only (sample
            grids); must not use collectives. May return scalars for W&B.
        dist_info: from :func:`init_distributed` (called here when omitted).
        compile: ``torch.compile`` the training step (the stage's ``resources.<stage>.compile``: how
            the machine runs it, kept out of ``cfg`` and of the fingerprint).
        accum: gradient-accumulation micro-steps per optimizer step (``resources.<stage>.accum``:
            memory, not science; the global batch and its samples are the same for any value).
        max_requeues: inside a SLURM job, SIGUSR1 (the time-limit warning) checkpoints and then
            requeues the job in place up to this many times (:mod:`arsr.slurm`).
    """

    def __init__(
        self,
        *,
        kind: str,
        model: nn.Module,
        model_config: dict[str, Any],
        cfg: TrainConfig,
        loss_fn: LossFn,
        make_train_iter: Callable[[int], Iterator[Batch]],
        out_dir: str | Path,
        fingerprint: dict[str, Any],
        seed: int = 0,
        val_fn: ValFn | None = None,
        make_val_iter: Callable[[], Iterable[Batch]] | None = None,
        no_weight_decay: NoDecayRule = default_no_weight_decay,
        model_extra: dict[str, Any] | None = None,
        on_step: OnStep | None = None,
        on_val: OnVal | None = None,
        dist_info: DistInfo | None = None,
        compile: bool = False,
        accum: int = 1,
        max_requeues: int = 0,
    ):
        self.kind, self.model_config, self.cfg = kind, model_config, cfg
        self.compile, self.accum, self.max_requeues = compile, accum, max_requeues
        self.loss_fn, self.make_train_iter = loss_fn, make_train_iter
        self.val_fn, self.make_val_iter = val_fn, make_val_iter
        self.no_weight_decay, self.model_extra = no_weight_decay, model_extra
        self.on_step, self.on_val = on_step, on_val
        self.out_dir = Path(out_dir)
        self.fingerprint, self.seed = fingerprint, seed
        self.dist = dist_info or init_distributed()
        self.ckpt_path = self.out_dir / "ckpt" / "last.pt"
        micro_batch_size(cfg, self.dist.world_size, accum)  # fail early on an impossible split
        if cfg.amp == "fp16" and self.dist.device.type != "cuda":
            raise ValueError("amp: fp16 needs CUDA; use bf16 or none on CPU")

        self.model = model.to(self.dist.device)
        self.ema: EMA | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.step = 0
        self.bad_steps = 0
        self.meter = MetricMeter()
        self.train_metrics: dict[str, float] = {}
        self.val_metrics: dict[str, float] = {}
        self.wandb = WandbRun(None)
        self._stop_signal = 0
        self._last_ckpt_time = time.monotonic()  # rank 0's is the one that counts

    # ----------------------------------------------------------------------------------
    # Set-up and resume
    # ----------------------------------------------------------------------------------
    def _resume_state(self) -> dict[str, Any] | None:
        """Rank 0 decides (and moves a stale checkpoint aside); every rank then loads the same file."""
        state, resume = None, False
        if self.dist.is_main:
            state, message = load_for_resume(
                self.ckpt_path,
                kind=self.kind,
                config=self.model_config,
                fingerprint=self.fingerprint,
                keep_stale=self.cfg.keep_stale,
                keep_with=[self.out_dir / "plots"],  # a restored checkpoint gets its run's plots back
            )
            print0(message)
            resume = state is not None
        resume = broadcast_object(resume)
        if resume and state is None:
            state = safe_load(self.ckpt_path)
        return state

    def _setup(self) -> dict[str, Any] | None:
        """Build optimizer, EMA, scaler, DDP; load a matching checkpoint. Returns its RNG state."""
        cfg, d = self.cfg, self.dist
        set_deterministic(cfg.deterministic)
        state = self._resume_state()
        if state is not None:
            self.model.load_state_dict(state["model"])
        self.ema = EMA(self.model, cfg.ema)
        self.optimizer = build_optimizer(self.model, cfg, self.no_weight_decay)
        self.scaler = torch.amp.GradScaler(
            d.device.type,
            init_scale=FP16_INIT_SCALE,
            growth_interval=FP16_GROWTH_INTERVAL,
            enabled=cfg.amp == "fp16",
        )
        rng_state = None
        if state is None:
            seed_all(self.seed + d.rank)
        else:
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.step, self.bad_steps = state["step"], state["bad_steps"]
            meter = _meter_state_for(state["meter"], d.rank, d.world_size)
            if meter is not None:
                self.meter.load_state_dict(meter)
            self.train_metrics, self.val_metrics = state["metrics"]["train"], state["metrics"]["val"]
            if len(state["rng"]) == d.world_size:
                rng_state = state["rng"][d.rank]
            else:  # world size changed: still a valid run, just not a bitwise continuation
                print0(f"checkpoint has {len(state['rng'])} ranks' RNG states, not {d.world_size}: reseeding")
                seed_all(self.seed + d.rank + 1_000_003 * self.step)
        self.ddp_model: nn.Module = self.model
        if d.is_distributed:
            self.ddp_model = DDP(
                self.model,
                device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                **_NO_BUFFER_SYNC,
            )
        if self.compile:  # the step's forward/backward only; checkpoints and EMA use self.model
            self.ddp_model = torch.compile(self.ddp_model)
        if d.is_main:
            PlotWriter(self.out_dir / "plots").truncate_after(self.step)
            # A declared output even when nothing is logged (a finished checkpoint restored from a
            # stale folder that kept no plots).
            (self.out_dir / "plots").mkdir(parents=True, exist_ok=True)
        run_id = state.get("wandb_id") if state is not None else None
        self.wandb = init_wandb(
            f"train_{self.kind}", self.fingerprint, out_dir=self.out_dir.parent, rank=d.rank, run_id=run_id
        )
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        print0(
            f"{self.kind}: {n_params:,} trainable params, {d.world_size} rank(s) on {d.device.type}, "
            f"batch {cfg.batch_size} = {micro_batch_size(cfg, d.world_size, self.accum)} x "
            f"{d.world_size} ranks x {self.accum} accum, peak lr {peak_lr(cfg):.3g}, amp {cfg.amp}"
        )
        return rng_state

    def _autocast(self) -> Any:
        if self.cfg.amp == "none":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    # ----------------------------------------------------------------------------------
    # One optimizer step
    # ----------------------------------------------------------------------------------
    def _ckpt_due(self) -> bool:
        """``ckpt_minutes`` passed since the last checkpoint, by this rank's clock (rank 0's decides)."""
        minutes = self.cfg.ckpt_minutes
        return minutes > 0 and time.monotonic() - self._last_ckpt_time >= 60.0 * minutes

    def _train_step(self, train_iter: Iterator[Batch]) -> tuple[bool, bool]:
        """Train one step; returns whether any rank asked to stop (SIGTERM/SIGUSR1) and whether
        rank 0 found a checkpoint due by time (the same two answers on every rank)."""
        cfg, d, opt, scaler = self.cfg, self.dist, self.optimizer, self.scaler
        lr = peak_lr(cfg) * lr_factor(self.step, cfg)
        set_lr(opt, lr)
        self.ddp_model.train()
        loss_sum = torch.zeros((), device=d.device)
        step_metrics: list[Metrics] = []
        for a in range(self.accum):
            batch = to_device(next(train_iter), d.device)
            last = a == self.accum - 1
            # Gradients are all-reduced once per step, in the last micro-step's backward.
            sync = nullcontext() if last or not d.is_distributed else self.ddp_model.no_sync()
            with sync:
                with self._autocast():
                    loss, metrics = self.loss_fn(self.ddp_model, batch)
                scaler.scale(loss / self.accum).backward()
            loss_sum += loss.detach().float()
            step_metrics.append(metrics)

        scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        # Always measured (tnm); with grad_clip 0 the max norm is inf and the grads are left as they are.
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        # One small all-reduce and one host sync per step: the mean loss and grad norm (the norm is
        # the same on every rank already), the stop flag and rank 0's checkpoint-time flag (only
        # rank 0 adds it: ranks' clocks differ). Every rank then holds the same numbers, so all of
        # them skip, stop and checkpoint at the same step.
        stop_flag = torch.tensor(float(self._stop_signal), device=d.device)
        due_flag = torch.tensor(float(d.is_main and self._ckpt_due()), device=d.device)
        stats = torch.stack([loss_sum / self.accum, grad_norm.float(), stop_flag, due_flag])
        loss_val, gnorm, stop, due = (all_reduce_sum_(stats) / d.world_size).tolist()

        # fp16: the scaler skips steps with inf/nan gradients itself (and lowers its scale);
        # only a non-finite loss counts as bad. bf16/fp32: any non-finite value skips the step.
        finite_grads = math.isfinite(gnorm)
        bad = not math.isfinite(loss_val) or (cfg.amp != "fp16" and not finite_grads)
        if cfg.amp == "fp16":
            scaler.step(opt)
            scaler.update()
            if scaler.get_scale() > FP16_MAX_SCALE:
                scaler.update(FP16_MAX_SCALE)
        elif not bad:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if not bad and finite_grads:
            self.ema.update(self.model, self.step)

        self.step += 1
        if bad:
            self.bad_steps += 1
            print0(
                f"step {self.step}: non-finite loss {loss_val} / grad norm {gnorm}: step skipped "
                f"({self.bad_steps} in a row, limit {cfg.max_bad_steps})"
            )
            if self.bad_steps >= cfg.max_bad_steps:
                raise NonFiniteLossError(
                    f"stopping at step {self.step}: {self.bad_steps} non-finite losses in a row "
                    f"(max_bad_steps {cfg.max_bad_steps})"
                )
        else:
            self.bad_steps = 0
            for m in step_metrics:
                self.meter.update(m)
            self.meter.update({"loss": loss_val, "tlr": lr} | ({"tnm": gnorm} if finite_grads else {}))
        return stop > 0, due > 0

    # ----------------------------------------------------------------------------------
    # Logging, validation, checkpoints
    # ----------------------------------------------------------------------------------
    def _log(self, progress: Progress, plots: PlotWriter) -> None:
        means = merge_sums(all_gather_object(self.meter.flush()))
        if not means:
            return
        self.train_metrics = means
        if self.dist.is_main:
            self.wandb.log(means, step=self.step)
            plots.append(self.step, means)
            progress.show(means)

    @torch.no_grad()
    def _validate(self, plots: PlotWriter) -> None:
        ema_model = self.ema.model
        if self.val_fn is not None and self.make_val_iter is not None:
            sums: dict[str, list[float]] = {}
            val_iter = iter(self.make_val_iter())
            try:
                for batch in val_iter:
                    with self._autocast():
                        out = self.val_fn(ema_model, to_device(batch, self.dist.device))
                    for k, (s, n) in out.items():
                        acc = sums.setdefault(k, [0.0, 0.0])
                        acc[0] += float(s)
                        acc[1] += float(n)
            finally:
                stop_workers(val_iter)
            self.val_metrics = merge_sums(all_gather_object(sums))
        if not self.dist.is_main:
            return
        logged = {f"val/{k}": v for k, v in self.val_metrics.items()}
        if logged:
            plots.append(self.step, logged)
            print0(f"step {self.step} val: " + "  ".join(f"{k} {v:.4g}" for k, v in self.val_metrics.items()))
        if self.on_val is not None:
            logged.update(self.on_val(self.step, ema_model, self.wandb) or {})
        if logged:
            self.wandb.log(logged, step=self.step)

    def _checkpoint(self) -> None:
        """Write ckpt/last.pt (collective: gathers every rank's RNG states)."""
        # Every rank's RNG states and log-window sums (one gather; the sums on the CPU so that no
        # rank unpickles another's CUDA tensors).
        gathered = all_gather_object({"rng": get_rng_state(), "meter": _cpu_meter_state(self.meter)})
        if self.dist.is_main:
            state = {
                "format": CKPT_FORMAT,
                "kind": self.kind,
                "config": self.model_config,
                "fingerprint": self.fingerprint,
                "fingerprint_id": fingerprint_id(self.fingerprint),
                "step": self.step,
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                # The lr is recomputed from the step; this records the schedule for people.
                "schedule": {
                    "kind": self.cfg.schedule,
                    "peak_lr": peak_lr(self.cfg),
                    "warmup_steps": self.cfg.warmup_steps,
                    "max_steps": self.cfg.max_steps,
                },
                "rng": [g["rng"] for g in gathered],
                "wandb_id": self.wandb.id,
                "bad_steps": self.bad_steps,
                "meter": [g["meter"] for g in gathered],  # one per rank
                "metrics": {"train": self.train_metrics, "val": self.val_metrics},
            }
            atomic_save(state, self.ckpt_path)
            print0(f"saved checkpoint at step {self.step}")
        barrier()  # nobody exits (or reads) before the file is complete
        self._last_ckpt_time = time.monotonic()

    def _write_outputs(self, wall_s: float, start_step: int) -> None:
        """model.pt, metrics.json (dvc metrics: deterministic), timing.json (varies per run)."""
        extra = self.model_extra or {}
        save_model_file(
            self.out_dir / "model.pt",
            kind=self.kind,
            config=self.model_config,
            state_dict=self.ema.state_dict(),
            extra=extra,
            step=self.step,
            fingerprint=self.fingerprint,
        )
        metrics = final_metrics(self.step, self.train_metrics, self.val_metrics)
        atomic_write_text(self.out_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        steps_run = self.step - start_step
        timing = {
            "world_size": self.dist.world_size,
            "device": str(self.dist.device),
            "resumed_from_step": start_step,
            "steps_run": steps_run,
            "wall_s": round(wall_s, 3),
            "steps_per_s": round(steps_run / wall_s, 4) if wall_s > 0 else None,
            "samples_per_s": round(steps_run * self.cfg.batch_size / wall_s, 2) if wall_s > 0 else None,
            "machine": machine_info(),
        }
        atomic_write_text(self.out_dir / "timing.json", json.dumps(timing, indent=2) + "\n")
        self.wandb.summary_update({f"final/{k}": v for k, v in self.val_metrics.items()} | timing)

    # ----------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only a flag: the loop checks it once per step (all ranks together) and checkpoints.
        self._stop_signal = signum

    def fit(self) -> TrainResult:
        cfg, d = self.cfg, self.dist
        # Signal handlers first, so that a signal during set-up is not lost. Note: torchrun and
        # SLURM signal the whole process group, DataLoader workers included, and a worker killed
        # by SIGTERM makes PyTorch raise in this process; so loaders' workers must ignore
        # SIGTERM/SIGUSR1 (a worker_init_fn), as the main process decides when to stop.
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                previous[sig] = signal.signal(sig, self._on_signal)
        progress, exit_code, train_iter = None, 1, None
        try:
            rng_state = self._setup()
            if self.step < cfg.max_steps:
                # Before restoring the RNG: a DataLoader draws its base seed from the global RNG
                # when its iterator is made, which the uninterrupted run also did before step 1.
                train_iter = iter(self.make_train_iter(self.step * self.accum))
            else:
                print0(f"already trained {self.step} steps: rewriting the outputs only")
            if rng_state is not None:
                set_rng_state(rng_state)
            start_step, t0 = self.step, time.perf_counter()
            plots = PlotWriter(self.out_dir / "plots")
            progress = Progress(cfg.max_steps, self.step, enabled=d.is_main)
            self._last_ckpt_time = time.monotonic()  # set-up is no training work to lose
            while self.step < cfg.max_steps:
                stop, ckpt_due = self._train_step(train_iter)
                progress.update(self.step)
                if self.on_step is not None:
                    self.meter.update(self.on_step(self.step, self.model) or {})
                last = self.step == cfg.max_steps
                if self.step % cfg.log_every == 0 or last:
                    self._log(progress, plots)
                if self.step % cfg.val_every == 0 or last:
                    self._validate(plots)
                if stop or ckpt_due or self.step % cfg.ckpt_every == 0 or last:
                    self._checkpoint()
                if stop:
                    sig = self._stop_signal or signal.SIGTERM
                    print0(
                        f"stopping at step {self.step} on signal {signal.Signals(sig).name}: checkpoint saved"
                    )
                    exit_code = 128 + sig
                    if sig == signal.SIGUSR1 and d.is_main:  # the time-limit warning, not a cancel
                        requeue_self(self.max_requeues)
                    raise TrainingInterrupted(exit_code)
            progress.close()
            if d.is_main:
                self._write_outputs(time.perf_counter() - t0, start_step)
            barrier()
            exit_code = 0
        finally:
            stop_workers(train_iter)
            if progress is not None:
                progress.close()
            self.wandb.finish(exit_code=exit_code)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return TrainResult(self.step, dict(self.train_metrics), dict(self.val_metrics))
