"""The tokenizer as the SR models see it: an HR image, given its LR, <-> multi-scale tokens.

Two targets (params.yaml's ``vqvae.target``):

- ``hr`` (VAR's tokenizer as is; required for VAR's official weights): the VQVAE encodes the HR
  image, ``image = D(f_hat)``. The decoder never sees the LR, so its reconstruction is a ceiling
  that a small tokenizer keeps far below bicubic (reference/sr_quality.md).
- ``residual`` (the default): a frozen regression base predicts the HR from the LR; the VQVAE
  encodes what it misses, normalised to unit spread, and decodes it back on top of it::

      x_B3HW = (HR - base(LR)) / sigma          image = base(LR) + sigma * D(f_hat)

  so every token model starts from the base (29.5 dB on the default split) and its tokens add
  detail. The multi-scale VAR quantizer is unchanged. ``sigma`` is the residual's standard
  deviation over the training split (measured by train_vqvae, stored in model.pt).

The SR models' LR condition comes from here too (:meth:`SRTokenizer.lr_features`): the base's
trunk features pooled to the token grid for ``residual``; for ``hr`` the VQVAE latent of the
bicubic upsample (the tokenizer loader's lr_condition keeps that path bit-equal to earlier runs).
Images are RGB in [-1, 1]; LR tiles are ``[B, 3, h, w]`` with ``h = H / scale``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from arsr.models.base import BaseSR
from arsr.models.quant import autocast_off
from arsr.models.vqvae import VQVAE


class SRTokenizer(nn.Module):
    """A frozen VQVAE with, for the ``residual`` target, the base it was trained on and ``sigma``."""

    def __init__(self, vae: VQVAE, base: BaseSR | None = None, sigma: float = 1.0):
        super().__init__()
        if base is None and sigma != 1.0:
            raise ValueError("sigma applies to the residual target only (no base given)")
        if sigma <= 0:
            raise ValueError(f"sigma: {sigma} must be > 0")
        self.vae, self.base, self.sigma = vae, base, float(sigma)

    @property
    def target(self) -> str:
        return "hr" if self.base is None else "residual"

    @property
    def lr_channels(self) -> int:
        """Channels of :meth:`lr_features` (the SR models' LR condition)."""
        return self.vae.Cvae if self.base is None else self.base.config.channels

    def freeze(self) -> SRTokenizer:
        self.eval().requires_grad_(False)
        return self

    # ---- HR + LR -> the VQVAE's input and back ---------------------------------------------
    def prior(self, lr_B3hw: torch.Tensor) -> torch.Tensor:
        """What the tokens are added to: base(LR) [B, 3, H, W] fp32 (zeros for the ``hr`` target)."""
        if self.base is None:
            raise ValueError("the hr target has no prior")
        with autocast_off(lr_B3hw.device):
            return self.base(lr_B3hw.float())

    def to_x(
        self, hr_B3HW: torch.Tensor, lr_B3hw: torch.Tensor | None, prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The VQVAE's input: HR, or the normalised residual ``(HR - base(LR)) / sigma`` (``prior``:
        base(LR) when the caller already has it)."""
        if self.base is None:
            return hr_B3HW
        if prior is None and lr_B3hw is None:
            raise ValueError("the residual target needs the LR image")
        return (hr_B3HW.float() - (self.prior(lr_B3hw) if prior is None else prior)) / self.sigma

    def from_x(self, x_B3HW: torch.Tensor, lr_B3hw: torch.Tensor | None) -> torch.Tensor:
        """Inverse of :meth:`to_x`, clamped to the image range."""
        if self.base is None:
            return x_B3HW.clamp(-1, 1)
        return (self.prior(lr_B3hw) + self.sigma * x_B3HW.float()).clamp(-1, 1)

    # ---- tokenizer API (fp32, no grad) ------------------------------------------------------
    @torch.no_grad()
    def img_to_f(self, hr_B3HW: torch.Tensor, lr_B3hw: torch.Tensor | None) -> torch.Tensor:
        """Pre-quantization latent [B, Cvae, h, w] of an HR image (given its LR)."""
        return self.vae.img_to_f(self.to_x(hr_B3HW, lr_B3hw))

    @torch.no_grad()
    def img_to_idxBl(self, hr_B3HW: torch.Tensor, lr_B3hw: torch.Tensor | None) -> list[torch.Tensor]:
        return self.vae.f_to_idxBl(self.img_to_f(hr_B3HW, lr_B3hw))

    @torch.no_grad()
    def fhat_to_img(self, f_hat: torch.Tensor, lr_B3hw: torch.Tensor | None) -> torch.Tensor:
        """f_hat [B, Cvae, h, w] (+ the LR) -> image [B, 3, H, W] in [-1, 1]."""
        with autocast_off(f_hat.device):
            return self.from_x(self.vae.decode(f_hat.float()), lr_B3hw)

    @torch.no_grad()
    def idxBl_to_img(self, ms_idx_Bl: Sequence[torch.Tensor], lr_B3hw: torch.Tensor | None) -> torch.Tensor:
        return self.fhat_to_img(self.vae.idxBl_to_fhat(ms_idx_Bl), lr_B3hw)

    @torch.no_grad()
    def lr_features(self, lr_B3hw: torch.Tensor) -> torch.Tensor:
        """The residual target's LR condition: the base's trunk features [B, C, h, w] area-pooled
        to the token grid [B, C, g, g] (g = the last patch_num), fp32."""
        if self.base is None:
            raise ValueError("lr_features: the hr target conditions on the VQVAE latent of the bicubic LR")
        g = self.vae.patch_nums[-1]
        with autocast_off(lr_B3hw.device):
            feats = self.base.features(lr_B3hw.float())
            return F.adaptive_avg_pool2d(feats, g) if feats.shape[-1] != g else feats
