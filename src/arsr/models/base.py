"""The regression base: a small conv net that predicts what MATLAB bicubic misses.

    sr_B3HW = bicubic_up(lr_B3hw) + PixelShuffle(trunk(lr_B3hw))

``trunk`` is ``depth`` 3x3 convolutions on the LR grid (ESPCN/FSRCNN-like: all the work at the
low resolution: a 6-conv x 64-channel trunk is 177k multiply-adds per LR pixel): the first maps
RGB to ``channels``, the next ``depth - 2`` keep the width, each followed by the activation, and
the last maps to ``3 x scale^2`` channels that PixelShuffle turns into the HR residual.

Why bicubic plus a residual: bicubic already holds most of the HR image (28.25 dB on the default
val split), so the net only learns the missing high frequencies, and with the last conv
zero-initialised training *starts at* bicubic and can only move up from there. The bicubic path is
exactly MATLAB's ``imresize`` (``arsr.data.imresize``: a = -0.5, edge replication), the
interpolation every LR in this project was made with, run as two fixed matmuls in fp32 (autocast
off: bf16 would cost ~0.5 of a uint8 level, more than the residual gains on flat areas).

Images are in the models' range [-1, 1]; training outputs are not clamped (the loss sees the
raw values), inference clamps (the tiling does).

:meth:`BaseSR.features` exposes the trunk's last hidden features ``[B, channels, h, w]``, an LR
representation that generative models can take as a condition.

The scale is not a hyperparameter but a fact of the data (the shards' ``stats.json``), passed to
the constructor and stored beside the config in ``model.pt`` (``extra``), as the token models take
their tokenizer's facts.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal

import torch
from annotated_types import Ge
from torch import nn

from arsr.data.imresize import _weights


@dataclass(frozen=True)
class BaseSRConfig:
    """The base's hyperparameters: params.yaml's ``base.model``, stored in ``model.pt``."""

    __pydantic_config__ = {"extra": "forbid"}  # params.yaml: an unknown key is an error

    channels: Annotated[int, Ge(1)] = 64  # trunk width (EDSR-baseline: 64; ESPCN: 64/32)
    depth: Annotated[int, Ge(2)] = 6  # 3x3 convs on the LR, first (RGB -> C) and last (C -> 3 s^2) included
    act: Literal["relu", "silu"] = "relu"


@lru_cache(maxsize=32)
def bicubic_matrices(
    h: int, w: int, scale: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """MATLAB bicubic x``scale`` of an h x w image as ``(Wh [H, h], WwT [w, W])``:
    ``up = Wh @ x @ WwT``. Built once per input size and device (the weights are
    :func:`arsr.data.imresize._weights`, the matrices ``imresize`` itself applies)."""
    wh = torch.from_numpy(_weights(h, h * scale, float(scale))).to(device=device, dtype=dtype)
    ww = torch.from_numpy(_weights(w, w * scale, float(scale))).to(device=device, dtype=dtype)
    return wh, ww.T.contiguous()


def bicubic_up(x_BChw: torch.Tensor, scale: int) -> torch.Tensor:
    """MATLAB ``imresize(x, scale)`` of float images (no rounding): ``[B, C, h, w] -> [B, C, sh, sw]``,
    computed in fp32 whatever the autocast (the output is fp32)."""
    h, w = x_BChw.shape[-2:]
    dev = x_BChw.device
    wh, wwT = bicubic_matrices(h, w, scale, dev, torch.float32)
    ctx = torch.autocast(dev.type, enabled=False) if dev.type in ("cpu", "cuda") else nullcontext()
    with ctx:
        return wh @ x_BChw.float() @ wwT


class BaseSR(nn.Module):
    """``forward(lr_B3hw in [-1, 1]) -> sr_B3HW`` (unclamped) = bicubic + learned residual."""

    def __init__(self, config: BaseSRConfig, scale: int):
        super().__init__()
        if scale < 1:
            raise ValueError(f"scale: {scale} must be >= 1")
        self.config, self.scale = config, scale
        c = config.channels
        act = nn.ReLU if config.act == "relu" else nn.SiLU
        layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1), act()]
        for _ in range(config.depth - 2):
            layers += [nn.Conv2d(c, c, 3, padding=1), act()]
        self.body = nn.Sequential(*layers)  # LR features [B, C, h, w]
        self.tail = nn.Conv2d(c, 3 * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)
        # Start at bicubic: the residual is exactly 0 until the tail learns (its gradient is not:
        # it is body-features x error, so the tail moves at step 1 and the body right after).
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def model_config(self) -> dict[str, Any]:
        """``model.pt``'s config: ``BaseSR(BaseSRConfig(**m.model_config()), scale)`` rebuilds it."""
        return asdict(self.config)

    def features(self, lr_B3hw: torch.Tensor) -> torch.Tensor:
        """The trunk's last hidden features ``[B, channels, h, w]`` (after the activation): what the
        tail turns into the HR residual, usable as an LR condition by other models."""
        return self.body(lr_B3hw)

    def residual(self, lr_B3hw: torch.Tensor) -> torch.Tensor:
        """The learned HR residual ``[B, 3, H, W]`` that is added to bicubic."""
        return self.shuffle(self.tail(self.features(lr_B3hw)))

    def forward(self, lr_B3hw: torch.Tensor) -> torch.Tensor:
        return bicubic_up(lr_B3hw, self.scale) + self.residual(lr_B3hw).float()


__all__ = ["BaseSR", "BaseSRConfig", "bicubic_matrices", "bicubic_up"]
