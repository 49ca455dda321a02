"""The regression base at inference: LR tiles -> bicubic + learned residual, in one forward pass.

Deterministic (no sampling settings: ``seed`` is accepted and ignored), so the registry gives the
family no ``eval.base`` section and no ``--base-*`` options.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from arsr.models.base import BaseSR, BaseSRConfig


class BaseUpscaler:
    """An :class:`~arsr.infer.tiling.Upscaler`: LR tiles [B, 3, hr/s, hr/s] in [-1, 1] -> SR [B, 3, hr, hr]
    (fp32, unclamped; the tiling clamps).

    The net is fully convolutional, but the tile is the training crop (``hr_size``): the trunk
    zero-pads at a tile's border as it did at a crop's, and a val crop is exactly one tile, so
    ``evaluate`` scores what ``train_base`` validated."""

    def __init__(self, model: BaseSR, hr_size: int):
        if hr_size % model.scale:
            raise ValueError(f"hr_size {hr_size} is not a multiple of the model's scale {model.scale}")
        self.model = model.eval()
        self.hr_size, self.scale = hr_size, model.scale

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, lr_B3hw: torch.Tensor, seed: int | Sequence[int] = 0) -> torch.Tensor:
        """``seed`` (an int or one per tile) is ignored: the base is deterministic."""
        lr_size = self.hr_size // self.scale
        if lr_B3hw.shape[1:] != (3, lr_size, lr_size):
            raise ValueError(f"LR tiles must be [B,3,{lr_size},{lr_size}], got {tuple(lr_B3hw.shape)}")
        return self.model(lr_B3hw.to(self.device).float())


def load_base(entry: dict[str, Any], device: torch.device | str = "cpu") -> BaseSR:
    """BaseSR (EMA weights, eval mode, no grads) from a ``train_base`` model.pt dict
    (``config`` = :class:`~arsr.models.base.BaseSRConfig`, ``extra`` = {"scale", "hr_size"})."""
    model = BaseSR(BaseSRConfig(**entry["config"]), int(entry["extra"]["scale"]))
    model.load_state_dict(entry["state_dict"])
    return model.to(device).eval().requires_grad_(False)


def make_upscaler(
    model_file: dict[str, Any], sampling: None, device: torch.device | str = "cpu"
) -> BaseUpscaler:
    """The Upscaler of a ``train_base`` model.pt dict (``sampling``: always None, the base has none)."""
    return BaseUpscaler(load_base(model_file, device), int(model_file["extra"]["hr_size"]))
