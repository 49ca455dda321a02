"""SRVAR at inference: LR tiles -> the tokenizer's LR condition -> scale-by-scale token decoding
(sampled, greedy or soft) -> the tokenizer's decoder (on top of the base's prediction for a
``residual`` tokenizer)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from annotated_types import Ge, Gt, Le

from arsr.data.loader import to_uint8
from arsr.data.tokens import TokenFacts
from arsr.infer.tokenizer import load_tokenizer, lr_condition
from arsr.models.residual import SRTokenizer
from arsr.models.rng import make_generator
from arsr.models.srvar import SRVAR, SRVARConfig


@dataclass(frozen=True)
class SRVARSampling:
    """How SRVAR decodes: params.yaml's ``eval.srvar``, ``arsr upscale --srvar-*``."""

    __pydantic_config__ = {"extra": "forbid"}

    cfg: Annotated[float, Ge(0)] = 0.0  # CFG scale, ramped over scales; 0 = no guidance (1.5 scored lower)
    top_k: Annotated[int, Ge(0)] = 50  # 0 = off (VAR's FID setting: 900); decode "sample" only
    top_p: Annotated[float, Ge(0), Le(1)] = 0.0  # 0 = off (VAR: 0.96); decode "sample" only
    # sample: draw from softmax(logits / temperature) (top-k/top-p); greedy: argmax; soft: the
    # probability-weighted mean of the code embeddings (softmax at temperature) as the token
    decode: Literal["sample", "greedy", "soft"] = "sample"
    temperature: Annotated[float, Gt(0)] = 1.0  # of "sample" and "soft" (greedy ignores it)


class SRVARUpscaler:
    """An :class:`~arsr.infer.tiling.Upscaler`: LR tiles [B,3,hr/s,hr/s] in [-1,1] -> SR [B,3,hr,hr].

    The LR tile becomes ``lrf`` [B,Clr,g,g] by :func:`~arsr.infer.tokenizer.lr_condition` (the values
    the token shards hold), SRVAR decodes f_hat [B,Cv,g,g] scale by scale (refiner residual included
    when the model has one and ``refine``), and the tokenizer turns f_hat and the LR tile into the
    image (``SRTokenizer.fhat_to_img``: base(LR) + sigma * D(f_hat) for ``residual``, D(f_hat) for ``hr``).

    ``seed``: an int (one generator for the batch) or one int per tile (tile b's tokens and refiner
    noise from its own generator: its output does not depend on the other tiles of the batch).
    """

    def __init__(self, model: SRVAR, tok: SRTokenizer, facts: TokenFacts, sampling: SRVARSampling):
        if model.lr_channels != tok.lr_channels:
            raise ValueError(
                f"SRVAR takes {model.lr_channels} LR channels, the tokenizer gives {tok.lr_channels}"
            )
        self.model, self.tok, self.sampling = model.eval(), tok, sampling
        self.hr_size, self.scale = facts.hr_size, facts.scale
        self.device = next(model.parameters()).device
        self.refine = True  # with a refiner: add its sampled residual (False: tokens only)

    @torch.no_grad()
    def __call__(self, lr_B3hw: torch.Tensor, seed: int | Sequence[int]) -> torch.Tensor:
        lr_size = self.hr_size // self.scale
        if lr_B3hw.shape[1:] != (3, lr_size, lr_size):
            raise ValueError(f"LR tiles must be [B,3,{lr_size},{lr_size}], got {tuple(lr_B3hw.shape)}")
        lrf = lr_condition(self.tok, [to_uint8(lr) for lr in lr_B3hw], self.hr_size).float()
        s = self.sampling
        generator = make_generator(seed, lrf.device, rows=lrf.shape[0])
        f_hat, _ = self.model.sample_fhat(
            lrf, self.tok.vae, s.cfg, s.top_k, s.top_p, generator, refine=self.refine, decode=s.decode,
            temperature=s.temperature,
        )  # fmt: skip
        return self.tok.fhat_to_img(f_hat, lr_B3hw.to(self.device).float())


def build_srvar(config: SRVARConfig, facts: TokenFacts, refiner_scale: float = 1.0) -> SRVAR:
    """SRVAR for these tokens: the tokenizer's pyramid, vocabulary and latent width, and the LR
    condition's width ``facts.lr_channels``."""
    return SRVAR(
        config, facts.patch_nums, facts.vocab_size, facts.Cvae, lr_channels=facts.lr_channels,
        refiner_scale=refiner_scale,
    )  # fmt: skip


def load_srvar(
    model_file: dict[str, Any], device: torch.device | str = "cpu"
) -> tuple[SRVAR, SRTokenizer, TokenFacts]:
    """SRVAR (EMA weights, eval mode), its tokenizer and token facts, from a ``train_srvar`` model.pt dict."""
    extra = model_file["extra"]
    facts = TokenFacts.from_dict(extra["token_facts"], "model.pt token_facts")
    model = build_srvar(SRVARConfig(**model_file["config"]), facts)
    model.load_state_dict(model_file["state_dict"])
    return model.to(device).eval().requires_grad_(False), load_tokenizer(extra["vqvae"], device), facts


def make_upscaler(
    model_file: dict[str, Any], sampling: SRVARSampling, device: torch.device | str = "cpu"
) -> SRVARUpscaler:
    model, tok, facts = load_srvar(model_file, device)
    return SRVARUpscaler(model, tok, facts, sampling)
