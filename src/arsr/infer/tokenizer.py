"""The frozen tokenizer and the LR -> condition step every SR model shares.

A tokenizer is an :class:`~arsr.models.residual.SRTokenizer`: the VQVAE and, for the ``residual``
target, the regression base it was trained on and the residual's spread (both in the VQVAE's
model.pt ``extra``). ``lr_condition`` is the only place an LR image becomes the condition ``lrf`` the
SR models see: for ``residual`` the base's features pooled to the token grid; for ``hr`` the uint8
LR -> MATLAB bicubic to the HR size (the ``rgb-uint8`` protocol's input) -> VQVAE encoder. Both are
rounded to float16 as the token shards store them: ``tokenize`` writes its output and every
upscaler computes its input with it, so training and inference inputs are bit-equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arsr.data.imresize import imresize
from arsr.data.loader import to_uint8, to_unit_range
from arsr.data.tokens import TokenFacts, TokenFactsError
from arsr.infer.base import load_base
from arsr.io import file_sha256
from arsr.models.residual import SRTokenizer
from arsr.models.vqvae import VQVAE, VQVAEConfig
from arsr.train.checkpoint import load_model_file


def load_vqvae(entry: dict[str, Any], device: torch.device | str = "cpu") -> VQVAE:
    """A frozen VQVAE from ``{"config", "state_dict"}``: a ``train_vqvae`` model.pt, or the copy an
    SR model.pt carries in ``extra["vqvae"]``."""
    vae = VQVAE(VQVAEConfig(**{"linear_path": False} | entry["config"]))  # files from before linear_path
    vae.load_state_dict(entry["state_dict"])
    return vae.to(device).freeze()


def load_vqvae_file(path: str | Path, device: torch.device | str = "cpu") -> tuple[dict[str, Any], VQVAE]:
    """``runs/vqvae/model.pt`` -> (the file's dict, the frozen VQVAE with its EMA weights)."""
    entry = load_model_file(path, kind="vqvae")
    return entry, load_vqvae(entry, device)


def tokenizer_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """What an SR model.pt keeps of its tokenizer's model.pt (``extra["vqvae"]``): enough to rebuild it."""
    return {"config": entry["config"], "state_dict": entry["state_dict"], "extra": entry.get("extra") or {}}


def load_tokenizer(entry: dict[str, Any], device: torch.device | str = "cpu") -> SRTokenizer:
    """The frozen :class:`SRTokenizer` of a ``train_vqvae`` model.pt dict (or an SR model.pt's copy
    of it): ``extra`` says the target; a residual tokenizer carries its base and sigma there."""
    vae = load_vqvae(entry, device)
    extra = entry.get("extra") or {}
    if extra.get("target", "hr") == "hr":
        return SRTokenizer(vae).freeze()
    return SRTokenizer(vae, load_base(extra["base"], device), float(extra["sigma"])).to(device).freeze()


def load_tokenizer_file(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[dict[str, Any], SRTokenizer]:
    """``runs/vqvae/model.pt`` -> (the file's dict, its frozen SRTokenizer)."""
    entry = load_model_file(path, kind="vqvae")
    return entry, load_tokenizer(entry, device)


def upsample_lr(lr_HWC: np.ndarray, size: int) -> np.ndarray:
    """uint8 LR [h, w, 3] -> uint8 [size, size, 3] by MATLAB bicubic (what every SR model starts from)."""
    return imresize(lr_HWC, output_shape=(size, size))


# oneDNN's convolution (ATen's choice from 16 rows on) for every batch size: see lr_condition.
CONDITION_ROWS = 16


@torch.no_grad()
def lr_condition(tok: SRTokenizer, lr_uint8: Sequence[np.ndarray], hr_size: int) -> torch.Tensor:
    """uint8 LR crops [h, w, 3] -> their conditions ``lrf`` float16 [B, tok.lr_channels, g, g] on the
    tokenizer's device (float16 is how the token shards store them: SR models train on these values)."""
    device = next(tok.parameters()).device
    n = len(lr_uint8)
    # At least CONDITION_ROWS rows (copies of the crops): ATen picks another convolution kernel for a
    # single row (other last bits), and tokenize and the upscalers must compute the same values.
    lr_uint8 = [lr_uint8[i % n] for i in range(max(n, CONDITION_ROWS))]
    if tok.target == "residual":
        lr_B3hw = torch.stack([to_unit_range(lr) for lr in lr_uint8]).to(device)
        return tok.lr_features(lr_B3hw)[:n].to(torch.float16)
    x_B3HW = torch.stack([to_unit_range(upsample_lr(lr, hr_size)) for lr in lr_uint8]).to(device)
    return tok.vae.img_to_f(x_B3HW)[:n].to(torch.float16)


def read_token_facts(tokens_dir: str | Path, vqvae_path: str | Path) -> tuple[TokenFacts, dict[str, Any]]:
    """The token facts, checked against the tokenizer the SR stage is given; -> (facts, VQVAE file).

    Refuses token shards made by another VQVAE (tokenize records its sha256) or whose facts do not
    describe it (patch_nums, vocab, Cvae, hr_size = grid x downsample)."""
    facts = TokenFacts.read(tokens_dir)
    vqvae_path = Path(vqvae_path)
    if not vqvae_path.is_file():
        raise FileNotFoundError(f"{vqvae_path} not found (run train_vqvae first)")
    if facts.vqvae_sha256 != file_sha256(vqvae_path):
        raise TokenFactsError(
            f"{tokens_dir} was tokenized with another VQVAE than {vqvae_path} (sha256 differs): "
            "rerun tokenize"
        )
    entry = load_model_file(vqvae_path, kind="vqvae")
    check_facts_match_vqvae(facts, VQVAEConfig(**{"linear_path": False} | entry["config"]), str(tokens_dir))
    return facts, entry


def check_facts_match_vqvae(facts: TokenFacts, cfg: VQVAEConfig, source: str) -> None:
    if tuple(cfg.patch_nums) != facts.patch_nums or cfg.vocab_size != facts.vocab_size:
        raise TokenFactsError(
            f"{source}: patch_nums {list(facts.patch_nums)} / vocab {facts.vocab_size} do not match the "
            f"VQVAE's {list(cfg.patch_nums)} / {cfg.vocab_size}: rerun tokenize"
        )
    if cfg.z_channels != facts.Cvae or facts.grid * cfg.downsample != facts.hr_size:
        raise TokenFactsError(
            f"{source}: Cvae {facts.Cvae}, grid {facts.grid} x downsample {cfg.downsample} != hr_size "
            f"{facts.hr_size} do not match the VQVAE: rerun train_vqvae and tokenize on these shards"
        )


class VQVAEReconstructor:
    """The tokenizer's reconstruction of an HR tile (scale 1): the ceiling of the token models.

    A residual tokenizer also needs the tile's LR: the MATLAB-bicubic downscale of the uint8 HR
    tile, as the shards make it."""

    scale = 1

    def __init__(self, tok: SRTokenizer):
        self.tok = tok
        self.hr_size = tok.vae.patch_nums[-1] * tok.vae.downsample
        self.device = next(tok.parameters()).device

    @torch.no_grad()
    def __call__(self, hr_B3HW: torch.Tensor, seed: int | Sequence[int]) -> torch.Tensor:
        """HR tiles [B,3,H,W] -> their reconstructions; ``seed`` is ignored (deterministic)."""
        lr = None
        if self.tok.target == "residual":
            s = self.tok.base.scale
            lr = torch.stack([to_unit_range(imresize(to_uint8(x), 1.0 / s)) for x in hr_B3HW]).to(self.device)
        return self.tok.idxBl_to_img(self.tok.img_to_idxBl(hr_B3HW, lr), lr)
