"""SRVAR at inference: LR tiles -> scale-by-scale token sampling -> VQVAE decoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from annotated_types import Ge, Le

from arsr.data.loader import to_uint8
from arsr.data.tokens import TokenFacts
from arsr.infer.tokenizer import load_vqvae, lr_condition
from arsr.models.srvar import SRVAR, SRVARConfig
from arsr.models.vqvae import VQVAE


@dataclass(frozen=True)
class SRVARSampling:
    """How SRVAR samples: params.yaml's ``eval.srvar``, ``arsr upscale --srvar-*``."""

    __pydantic_config__ = {"extra": "forbid"}

    cfg: Annotated[float, Ge(0)] = 0.0  # CFG scale, ramped over scales; 0 = no guidance (1.5 scored lower)
    top_k: Annotated[int, Ge(0)] = 0  # 0 = off (VAR's FID setting: 900)
    top_p: Annotated[float, Ge(0), Le(1)] = 0.0  # 0 = off (VAR: 0.96)


class SRVARUpscaler:
    """An :class:`~arsr.infer.tiling.Upscaler`: LR tiles [B,3,hr/s,hr/s] in [-1,1] -> SR [B,3,hr,hr].

    The LR tile becomes ``lrf`` by :func:`~arsr.infer.tokenizer.lr_condition` (the values the token
    shards hold), then scale-by-scale sampling and the VQVAE decoder (refiner residual included
    when the model has one and ``refine``)."""

    def __init__(self, model: SRVAR, vae: VQVAE, facts: TokenFacts, sampling: SRVARSampling):
        self.model, self.vae, self.sampling = model.eval(), vae, sampling
        self.hr_size, self.scale = facts.hr_size, facts.scale
        self.device = next(model.parameters()).device
        self.refine = True  # with a refiner: add its sampled residual (False: tokens only)

    @torch.no_grad()
    def __call__(self, lr_B3hw: torch.Tensor, seed: int) -> torch.Tensor:
        lr_size = self.hr_size // self.scale
        if lr_B3hw.shape[1:] != (3, lr_size, lr_size):
            raise ValueError(f"LR tiles must be [B,3,{lr_size},{lr_size}], got {tuple(lr_B3hw.shape)}")
        lrf = lr_condition(self.vae, [to_uint8(lr) for lr in lr_B3hw], self.hr_size).float()
        s = self.sampling
        img = self.model.autoregressive_infer_cfg(
            lrf, self.vae, s.cfg, s.top_k, s.top_p, seed=seed, refine=self.refine
        )
        return img.mul(2).sub(1)


def load_srvar(
    model_file: dict[str, Any], device: torch.device | str = "cpu"
) -> tuple[SRVAR, VQVAE, TokenFacts]:
    """SRVAR (EMA weights, eval mode), its VQVAE and token facts, from a ``train_srvar`` model.pt dict."""
    extra = model_file["extra"]
    facts = TokenFacts.from_dict(extra["token_facts"], "model.pt token_facts")
    model = SRVAR(SRVARConfig(**model_file["config"]), facts.patch_nums, facts.vocab_size, facts.Cvae)
    model.load_state_dict(model_file["state_dict"])
    return model.to(device).eval().requires_grad_(False), load_vqvae(extra["vqvae"], device), facts


def make_upscaler(
    model_file: dict[str, Any], sampling: SRVARSampling, device: torch.device | str = "cpu"
) -> SRVARUpscaler:
    model, vae, facts = load_srvar(model_file, device)
    return SRVARUpscaler(model, vae, facts, sampling)
