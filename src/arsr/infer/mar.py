"""MAR-SR at inference: LR tiles -> masked-autoregressive sampling of HR latents -> VQVAE decoder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from annotated_types import Ge, Gt
from torch import Tensor

from arsr.data.loader import to_uint8
from arsr.data.tokens import TokenFacts
from arsr.infer.tokenizer import load_vqvae, lr_condition
from arsr.models.mar import MAR, MARConfig
from arsr.models.vqvae import VQVAE


@dataclass(frozen=True)
class MARSampling:
    """How MAR-SR samples: params.yaml's ``eval.mar``, ``arsr upscale --mar-*``."""

    __pydantic_config__ = {"extra": "forbid"}

    cfg: Annotated[float, Ge(0)] = 1.0  # guidance; 1 = none (MAR's convention)
    cfg_schedule: Literal["linear", "constant"] = "linear"
    temperature: Annotated[float, Gt(0)] = 1.0
    num_iter: Annotated[int, Ge(1)] = 8  # unmasking steps (MAR: 64)


class LatentNorm:
    """Per-channel ``(f - mean_c) / std_c`` with the token facts' numbers, and its inverse."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean_C = torch.tensor(list(mean), dtype=torch.float32)
        self.std_C = torch.tensor(list(std), dtype=torch.float32)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        return self.mean_C.to(like.device)[:, None, None], self.std_C.to(like.device)[:, None, None]

    def normalize(self, f_BChw: Tensor) -> Tensor:
        mean, std = self._stats(f_BChw)
        return (f_BChw.float() - mean) / std

    def denormalize(self, x_BChw: Tensor) -> Tensor:
        mean, std = self._stats(x_BChw)
        return x_BChw.float() * std + mean


class MARUpscaler:
    """An :class:`~arsr.infer.tiling.Upscaler`: LR tiles [B, 3, hr/s, hr/s] in [-1, 1] -> HR [B, 3, hr, hr].

    The LR tile becomes ``lrf`` by :func:`~arsr.infer.tokenizer.lr_condition` (the values the token
    shards hold, so the condition is bit-equal to training's), is normalized, MAR samples the HR
    latents (a generator seeded by ``seed``), and the de-normalized samples are re-quantized by the
    multi-scale quantizer (f -> f_hat) and decoded, so the decoder sees the inputs it was trained on
    (reference §9, decode path (b)). Models trained with labels sample without them (LR alone).
    """

    def __init__(self, model: MAR, vqvae: VQVAE, facts: TokenFacts, sampling: MARSampling):
        self.model, self.vqvae, self.sampling = model, vqvae, sampling
        self.norm = LatentNorm(facts.mean, facts.std)
        self.hr_size, self.scale = facts.hr_size, facts.scale

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def condition(self, lr_B3hw: Tensor) -> Tensor:
        """Normalized LR-condition latents [B, Cv, h, w]: exactly what training normalized."""
        lrf = lr_condition(self.vqvae, [to_uint8(lr) for lr in lr_B3hw], self.hr_size)
        return self.norm.normalize(lrf)

    def decode(self, x_BChw: Tensor) -> Tensor:
        """Normalized latents -> images [B, 3, H, W] in [-1, 1] (de-normalize, re-quantize, decode)."""
        return self.vqvae.fhat_to_img(self.vqvae.f_to_fhat(self.norm.denormalize(x_BChw)))

    @torch.no_grad()
    def __call__(self, lr_B3hw: Tensor, seed: int) -> Tensor:
        self.model.eval()  # no dropout, no condition drop while sampling
        gen = torch.Generator(device=self.device).manual_seed(seed)
        s = self.sampling
        x = self.model.sample_tokens(
            self.condition(lr_B3hw), num_iter=s.num_iter, cfg=s.cfg, cfg_schedule=s.cfg_schedule,
            temperature=s.temperature, generator=gen,
        )  # fmt: skip
        return self.decode(x)


def build_mar_sr(config: MARConfig, facts: TokenFacts) -> MAR:
    """MAR in SR mode for these tokens: the LR condition has the HR latents' width (one tokenizer)."""
    return MAR(
        config, grid_size=facts.grid, token_channels=facts.Cvae, lr_channels=facts.Cvae,
        num_classes=facts.num_classes,
    )  # fmt: skip


def make_upscaler(
    model_file: dict[str, Any], sampling: MARSampling, device: torch.device | str = "cpu"
) -> MARUpscaler:
    """The Upscaler of a ``train_mar`` model.pt dict."""
    extra = model_file["extra"]
    facts = TokenFacts.from_dict(extra["token_facts"], "model.pt token_facts")
    model = build_mar_sr(MARConfig(**model_file["config"]), facts)
    model.load_state_dict(model_file["state_dict"])
    return MARUpscaler(model.to(device).eval(), load_vqvae(extra["vqvae"], device), facts, sampling)
