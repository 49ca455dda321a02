"""Stage `train_base`: train the regression base (bicubic + a small conv net's residual) on the image shards.

    python -m arsr.stages.launch train_base      # torchrun with resources.train_base.nproc processes
    python -m arsr.stages.train_base [--params params.yaml] [--shards data/shards] [--out runs/base]

Reads ``seed`` and ``base`` from params.yaml and the HR/LR pairs of ``data/shards`` (the LR is the
shard's MATLAB-bicubic uint8 crop, exactly what ``evaluate`` and ``arsr upscale`` start from); the
scale and crop size are facts of the shards (``stats.json``) and go into ``model.pt``. With
``base.augment`` each train pair is flipped and transposed at random, HR and LR alike (one of the
8 symmetries of the square; +0.15 dB val PSNR on the default run). Loss: ``MSE(base(lr), hr)``
(the model's unclamped output, images in [-1, 1]). MSE and not L1: in a stand-in experiment L1
with a constant lr and a zero-initialised last layer learned nothing in 600 steps, while MSE with
a one-cycle-like schedule learned within 800.

Logged (W&B, ``runs/base/plots``, the console): ``l2`` on training batches; at validation, over the
whole val split (EMA weights, fp32): ``l2``, ``psnr`` and ``bicubic_psnr`` (dB, Y of the uint8
images, ``scale`` pixels shaved, averaged per image: evaluate's ``psnr`` of the base row and of the
bicubic row, since every val crop is one tile). W&B also gets LR | base | HR previews.

Writes ``runs/base/{model.pt,ckpt/,metrics.json,plots/,timing.json}`` through the training engine
(``model.pt``: kind "base", config = :class:`~arsr.models.base.BaseSRConfig`, EMA weights, ``extra``
= {"scale", "hr_size"}); ``arsr.infer.base`` turns it into the Upscaler of ``evaluate``/``upscale``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arsr.config import Params
from arsr.data.imresize import imresize
from arsr.data.loader import eval_loader, load_shard_stats, to_uint8, to_unit_range
from arsr.data.shards import decode_png, shard_urls
from arsr.eval.metrics import psnr, y_uint8
from arsr.infer.base import BaseUpscaler
from arsr.infer.preview import first_val_pairs, preview
from arsr.models.base import BaseSR
from arsr.stages.common import (
    RUNS_DIR,
    SHARDS_DIR,
    StageError,
    fingerprint,
    model_artifact,
    rank_train_iters,
    shards_artifact,
    stage_main,
)
from arsr.train.dist import DistInfo, cleanup, init_distributed, print0, unwrap
from arsr.train.engine import Trainer, micro_batch_size
from arsr.train.logging import WandbRun, declare_artifacts

PARAMS = ("seed", "base")
NUM_PREVIEWS = 4  # val crops in the W&B preview grid
VAL_BATCH = 50


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def decode_hr_lr(sample: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Image shards -> {"hr": [3, H, W], "lr": [3, H/s, W/s]} in [-1, 1]."""
    return {
        "hr": to_unit_range(decode_png(sample["hr.png"])),
        "lr": to_unit_range(decode_png(sample["lr.png"])),
    }


def augment(hr_B3HW: torch.Tensor, lr_B3hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, one of the 8 symmetries of the square (a random transpose, then random flips of
    each axis), HR and LR alike. MATLAB's bicubic commutes with flips and, up to the uint8 rounding
    between its two passes, with the transpose, so an augmented LR is (nearly) the LR of the
    augmented HR. Draws from torch's global RNG, which the engine checkpoints per rank."""
    B = hr_B3HW.shape[0]
    t_B, fh_B, fw_B = (torch.rand(3, B, 1, 1, 1) < 0.5).to(hr_B3HW.device)
    out = []
    for x in (hr_B3HW, lr_B3hw):
        x = torch.where(t_B, x.transpose(2, 3), x)
        x = torch.where(fh_B, x.flip(2), x)
        out.append(torch.where(fw_B, x.flip(3), x))
    return out[0], out[1]


# --------------------------------------------------------------------------------------
# Loss and validation
# --------------------------------------------------------------------------------------
def base_loss(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``MSE(model(lr), hr)`` on one micro-batch (model may be DDP-wrapped; under autocast the
    output is fp32: bicubic is, and the residual is cast)."""
    l2 = F.mse_loss(model(batch["lr"]).float(), batch["hr"])
    return l2, {"l2": l2.detach()}


def y_psnr(sr_3HW: torch.Tensor, hr_3HW: np.ndarray | torch.Tensor, border: int) -> float:
    """Y PSNR of uint8 images (as evaluate's ``psnr``) of a [-1, 1] SR tensor and an HR image."""
    hr = to_uint8(hr_3HW) if isinstance(hr_3HW, torch.Tensor) else hr_3HW
    return psnr(y_uint8(to_uint8(sr_3HW)), y_uint8(hr), border)


class Validator:
    """Val metrics of the (EMA) model over this rank's share of the val split, in fp32 (autocast
    off: what evaluate sees); the engine sums ``(value, count)`` over batches and ranks."""

    def __init__(
        self, urls: list[str], scale: int, batch_size: int = VAL_BATCH, dist: DistInfo | None = None
    ):
        self.urls, self.scale, self.batch_size = urls, scale, batch_size
        self.dist = dist or DistInfo(0, 1, 0, torch.device("cpu"))

    def make_iter(self) -> Iterator[dict[str, torch.Tensor]]:
        d = self.dist
        yield from eval_loader(
            self.urls, decode=decode_hr_lr, batch_size=self.batch_size, rank=d.rank, world_size=d.world_size
        )

    def bicubic_psnr_sum(self, batch: dict[str, torch.Tensor]) -> float:
        """Sum over the batch of evaluate's bicubic-row PSNR (MATLAB imresize of the uint8 LR)."""
        total = 0.0
        for lr, hr in zip(batch["lr"], batch["hr"]):
            hr_u8 = to_uint8(hr)
            total += psnr(
                y_uint8(imresize(to_uint8(lr), output_shape=hr_u8.shape[:2])), y_uint8(hr_u8), self.scale
            )
        return total

    @torch.no_grad()
    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, tuple[float, int]]:
        base: BaseSR = unwrap(model)
        lr, hr = batch["lr"], batch["hr"]
        with torch.autocast(lr.device.type, enabled=False):
            sr = base(lr.float())
        B = hr.shape[0]
        return {
            "l2": (F.mse_loss(sr, hr).item() * B, B),
            "psnr": (sum(y_psnr(s, h, self.scale) for s, h in zip(sr, hr)), B),
            "bicubic_psnr": (self.bicubic_psnr_sum(batch), B),  # a reference line (cheap: numpy, 250 crops)
        }


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------
def shard_facts(shards: Path) -> tuple[int, int]:
    """(scale, hr_size) of the image shards."""
    stats = load_shard_stats(shards)
    try:
        return int(stats["scale"]), int(stats["hr_size"])
    except KeyError as err:
        raise StageError(f"{shards}/stats.json has no {err} (rerun the shard stage)") from None


def train(params: Params, shards: Path, out: Path) -> dict[str, float]:
    cfg, tcfg = params.base, params.base.train
    res = params.resources.train_base  # loader workers, compile, accum: the machine's, not fingerprinted
    fp = fingerprint("train_base", params, PARAMS, [shards])  # fails early if the shards are missing
    scale, hr_size = shard_facts(shards)
    dist = init_distributed()
    torch.manual_seed(params.seed)  # identical initial weights on every rank
    model = BaseSR(cfg.model, scale)
    train_urls, val_urls = shard_urls(shards, "train"), shard_urls(shards, "val")
    mb = micro_batch_size(tcfg, dist.world_size, res.accum)

    def loss_fn(
        model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if cfg.augment:
            hr, lr = augment(batch["hr"], batch["lr"])
            batch = {"hr": hr, "lr": lr}
        return base_loss(model, batch)

    pairs = first_val_pairs(shards, NUM_PREVIEWS) if dist.is_main else None

    def on_val(step: int, ema_model: nn.Module, run: WandbRun) -> dict[str, float] | None:
        if not run.enabled:
            return None
        grid, sample_psnr = preview(BaseUpscaler(unwrap(ema_model), hr_size), pairs)
        run.log_images("val/samples", [grid], captions=["LR | base | HR"], step=step)
        return {"val/sample_psnr": sample_psnr}

    validator = Validator(val_urls, scale, max(mb, VAL_BATCH), dist)
    trainer = Trainer(
        kind="base",
        model=model,
        model_config=model.model_config(),
        cfg=tcfg,
        compile=res.compile,
        accum=res.accum,
        max_requeues=res.max_requeues,
        loss_fn=loss_fn,
        make_train_iter=rank_train_iters(train_urls, decode_hr_lr, mb, params.seed, dist, res.workers),
        out_dir=out,
        fingerprint=fp,
        seed=params.seed,
        val_fn=validator,
        make_val_iter=validator.make_iter,
        model_extra={"scale": scale, "hr_size": hr_size},
        on_val=on_val,
        dist_info=dist,
    )
    declare_artifacts(uses=[shards_artifact(shards)], logs=[model_artifact("base", out / "model.pt")])
    result = trainer.fit()
    cleanup()
    return result.val


def run(args: argparse.Namespace, params: Params) -> dict[str, float]:
    out = Path(args.out)
    val = train(params, Path(args.shards), out)
    if val:
        print0(
            f"train_base: val psnr {val['psnr']:.2f} dB (bicubic {val['bicubic_psnr']:.2f} dB), "
            f"l2 {val['l2']:.5f} -> {out}"
        )
    return val


def _add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shards", default=str(SHARDS_DIR), help="image shards (default: data/shards)")
    ap.add_argument("--out", default=str(RUNS_DIR / "base"), help="run folder (default: runs/base)")


def main(argv: list[str] | None = None) -> int:
    return stage_main("train_base", __doc__, run, argv, _add_args)


if __name__ == "__main__":
    sys.exit(main())
