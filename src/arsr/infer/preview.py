"""Validation previews of the SR training stages: a few val crops through the same Upscaler that
``arsr upscale`` and ``evaluate`` use, as an LR | SR | HR grid and their mean Y PSNR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from arsr.data.loader import decode_pair, eval_loader, to_uint8
from arsr.data.shards import shard_urls
from arsr.eval.metrics import psnr, y_uint8
from arsr.infer.tiling import Upscaler


def first_val_pairs(shards: str | Path, n: int) -> dict[str, torch.Tensor]:
    """The first ``n`` val crops of the image shards: {"lr", "hr"} in [-1, 1]."""
    return next(iter(eval_loader(shard_urls(shards, "val"), decode=decode_pair, batch_size=n)))


@torch.no_grad()
def preview(upscaler: Upscaler, pairs: dict[str, torch.Tensor], seed: int = 0) -> tuple[np.ndarray, float]:
    """-> (uint8 grid, one row per crop: LR (nearest, at HR size) | SR | HR; mean Y PSNR of SR)."""
    lr_B3hw, hr_B3HW = pairs["lr"], pairs["hr"]
    sr_B3HW = upscaler(lr_B3hw, seed).cpu()
    s = hr_B3HW.shape[-1] // lr_B3hw.shape[-1]
    rows, scores = [], []
    for lr, sr, hr in zip(lr_B3hw, sr_B3HW, hr_B3HW):
        lr_up = to_uint8(lr).repeat(s, axis=0).repeat(s, axis=1)
        rows.append(np.concatenate([lr_up, to_uint8(sr), to_uint8(hr)], axis=1))
        scores.append(psnr(y_uint8(to_uint8(sr)), y_uint8(to_uint8(hr))))
    return np.concatenate(rows, axis=0), float(np.mean(scores))
