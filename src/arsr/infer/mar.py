"""MAR-SR at inference: LR tiles -> the tokenizer's LR condition -> masked-autoregressive sampling of
HR latents -> re-quantization and the tokenizer's decoder (on top of the base's prediction for a
``residual`` tokenizer)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from annotated_types import Ge, Gt
from torch import Tensor

from arsr.data.loader import to_uint8
from arsr.data.tokens import TokenFacts
from arsr.infer.tokenizer import load_tokenizer, lr_condition
from arsr.models.mar import MAR, MARConfig
from arsr.models.residual import SRTokenizer
from arsr.models.rng import make_generator


@dataclass(frozen=True)
class MARSampling:
    """How MAR-SR samples: params.yaml's ``eval.mar``, ``arsr upscale --mar-*``."""

    __pydantic_config__ = {"extra": "forbid"}

    cfg: Annotated[float, Ge(0)] = 1.0  # guidance; 1 = none (MAR's convention)
    cfg_schedule: Literal["linear", "constant"] = "linear"
    temperature: Annotated[float, Gt(0)] = 1.0
    num_iter: Annotated[int, Ge(1)] = 8  # unmasking steps (MAR: 64)


class LatentNorm:
    """Per-channel ``(f - mean_c) / std_c`` (the token facts' numbers, or the LR condition's) and its
    inverse."""

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

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean_C.tolist(), "std": self.std_C.tolist()}


def lr_norm_of(facts: TokenFacts, lr_stats: dict[str, Sequence[float]] | None) -> LatentNorm:
    """How MAR-SR normalizes its LR condition ``lrf`` [B, lr_channels, g, g].

    ``hr`` tokenizer: with the HR latents' stats (the token facts'): lrf is the VQVAE latent of the
    bicubic LR, the same latent space, so the same numbers keep LR and HR values comparable position
    by position. ``residual`` tokenizer: lrf is the base's features, with stats of their own that
    ``train_mar`` measures on the training tokens (:func:`lr_stats_of`) and stores in model.pt
    (``extra["lr_stats"]``)."""
    if facts.target == "hr":
        return LatentNorm(facts.mean, facts.std)
    if lr_stats is None:
        raise ValueError("a residual tokenizer's LR condition needs its stats (model.pt extra['lr_stats'])")
    norm = LatentNorm(lr_stats["mean"], lr_stats["std"])
    if len(norm.mean_C) != facts.lr_channels or len(norm.std_C) != facts.lr_channels:
        raise ValueError(f"lr_stats: {len(norm.mean_C)} channels, the token facts say {facts.lr_channels}")
    return norm


def lr_stats_of(sum_C: Sequence[float], sq_C: Sequence[float], count: int) -> dict[str, list[float]]:
    """Per-channel mean and std of the LR condition from float64 sums over ``count`` values per channel.

    A channel that never varies (a dead ReLU feature) gets std 1e-2 x the mean std of the others
    (never 0: x / 0), so it enters as ~0 and cannot blow up an input that happens to differ."""
    s, q = torch.tensor(list(sum_C), dtype=torch.float64), torch.tensor(list(sq_C), dtype=torch.float64)
    mean = s / max(count, 1)
    std = (q / max(count, 1) - mean.square()).clamp(min=0).sqrt()
    floor = max(1e-2 * float(std.mean()), 1e-6)
    return {"mean": mean.tolist(), "std": std.clamp(min=floor).tolist()}


class MARUpscaler:
    """An :class:`~arsr.infer.tiling.Upscaler`: LR tiles [B, 3, hr/s, hr/s] in [-1, 1] -> HR [B, 3, hr, hr].

    The LR tile becomes ``lrf`` [B, lr_channels, g, g] by :func:`~arsr.infer.tokenizer.lr_condition`
    (the values the token shards hold, so the condition is bit-equal to training's), is normalized
    (``lr_norm``), MAR samples the normalized HR latents (a generator seeded by ``seed``), and the
    de-normalized samples are re-quantized by the multi-scale quantizer (f -> f_hat) and decoded by
    the tokenizer with the LR tile, so the decoder sees the inputs it was trained on (reference §9,
    decode path (b)). Models trained with labels sample without them (LR alone).

    ``seed``: an int (one generator for the batch) or one int per tile (a generator per tile: a
    tile's orders and noise, so its output, do not depend on the other tiles of the batch).
    """

    def __init__(
        self,
        model: MAR,
        tok: SRTokenizer,
        facts: TokenFacts,
        sampling: MARSampling,
        lr_norm: LatentNorm | None = None,
    ):
        """``lr_norm``: the LR condition's normalization (:func:`lr_norm_of`; None: the ``hr`` rule)."""
        if model.lr_channels != tok.lr_channels:
            raise ValueError(
                f"MAR takes {model.lr_channels} LR channels, the tokenizer gives {tok.lr_channels}"
            )
        self.model, self.tok, self.sampling = model, tok, sampling
        self.norm = LatentNorm(facts.mean, facts.std)
        self.lr_norm = lr_norm_of(facts, None) if lr_norm is None else lr_norm
        self.hr_size, self.scale = facts.hr_size, facts.scale

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def condition(self, lr_B3hw: Tensor) -> Tensor:
        """Normalized LR condition [B, lr_channels, g, g]: exactly what training normalized."""
        lrf = lr_condition(self.tok, [to_uint8(lr) for lr in lr_B3hw], self.hr_size)
        return self.lr_norm.normalize(lrf)

    def decode(self, x_BChw: Tensor, lr_B3hw: Tensor) -> Tensor:
        """Normalized latents [B, Cv, g, g] (+ their LR tiles) -> images [B, 3, H, W] in [-1, 1]
        (de-normalize, re-quantize, decode with the tokenizer)."""
        f_hat = self.tok.vae.f_to_fhat(self.norm.denormalize(x_BChw))
        return self.tok.fhat_to_img(f_hat, lr_B3hw.to(f_hat.device).float())

    @torch.no_grad()
    def __call__(self, lr_B3hw: Tensor, seed: int | Sequence[int]) -> Tensor:
        self.model.eval()  # no dropout, no condition drop while sampling
        gen = make_generator(seed, self.device, rows=lr_B3hw.shape[0])
        s = self.sampling
        x = self.model.sample_tokens(
            self.condition(lr_B3hw), num_iter=s.num_iter, cfg=s.cfg, cfg_schedule=s.cfg_schedule,
            temperature=s.temperature, generator=gen,
        )  # fmt: skip
        return self.decode(x, lr_B3hw)


def build_mar_sr(config: MARConfig, facts: TokenFacts) -> MAR:
    """MAR in SR mode for these tokens: HR latents of ``facts.Cvae`` channels, conditioned on the
    tokenizer's LR condition of ``facts.lr_channels`` channels."""
    return MAR(
        config, grid_size=facts.grid, token_channels=facts.Cvae, lr_channels=facts.lr_channels,
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
    tok, lr_norm = load_tokenizer(extra["vqvae"], device), lr_norm_of(facts, extra.get("lr_stats"))
    return MARUpscaler(model.to(device).eval(), tok, facts, sampling, lr_norm)
