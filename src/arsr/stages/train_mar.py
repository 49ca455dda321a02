"""Stage `train_mar`: train MAR-SR on the token shards (DESIGN §4; reference/mar_diffusion.md §8-9).

    python -m arsr.stages.launch train_mar      # torchrun with mar.train.nproc processes
    python -m arsr.stages.train_mar [--params params.yaml] [--tokens data/tokens]
                                    [--vqvae runs/vqvae/model.pt] [--shards data/shards] [--out runs/mar]

Reads ``seed`` and ``mar`` from params.yaml; everything else is a fact of the inputs: the latent
width, grid and per-channel stats from ``data/tokens/latent_stats.json``, the tokenizer from
``runs/vqvae/model.pt`` (it must be the one the tokens were made with), and ``hr_size``, ``scale``
and the class count from ``latent_stats.json`` when tokenize records them there, else from
``data/shards/stats.json`` (the image shards also give the W&B previews their LR and HR crops).

What the model sees (per sample, normalized with the train split's per-channel latent stats):

- target: the HR latent ``f`` [Cv, h, w] -> ``(f - mean_c) / std_c``;
- condition: ``lrf`` [Cv, h, w], the latent of the bicubic-upsampled LR image, normalized with the
  *same* (HR) stats: it lives in the same latent space (one encoder), so the same numbers keep LR
  and HR values comparable position by position, and the model learns the LR -> HR change rather
  than an offset between two normalizations;
- the class index when the shards carry labels (``data.labels: folder``).

Loss: MAR's diffusion loss on the masked tokens (``loss`` and ``diff_loss``, the same number: MAR
has no other term). Validation: the EMA model's diffusion loss over the whole val split, with the
masks, timesteps and noise drawn from a generator seeded per batch, so every validation scores the
same draws. At each validation W&B gets a sample grid (LR | MAR | HR rows for the first val crops,
sampled by the same code path as ``arsr upscale``) and ``val/sample_psnr`` (Y PSNR of those).

Writes ``runs/mar/{model.pt,ckpt/,metrics.json,plots/,timing.json}`` through the training engine.
``model.pt`` (kind "mar") is self-contained: the MAR config and EMA weights plus, in ``extra``, the
VQVAE config and weights, the latent stats, ``hr_size`` and ``scale``; :func:`make_upscaler` turns it
into the :class:`~arsr.eval.tiling.Upscaler` that ``arsr upscale`` and ``evaluate`` use.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from arsr.config import EvalConfig, Params
from arsr.data.loader import (
    decode_pair,
    decode_tokens,
    eval_loader,
    load_shard_stats,
    to_unit_range,
)
from arsr.data.shards import shard_urls
from arsr.eval.metrics import psnr, y_uint8
from arsr.eval.tiling import to_uint8
from arsr.io import file_sha256
from arsr.models.mar import MAR, build_mar_sr, mar_sr_kwargs
from arsr.models.vqvae import VQVAE
from arsr.stages.common import (
    RUNS_DIR,
    SHARDS_DIR,
    TOKENS_DIR,
    StageError,
    fingerprint,
    rank_train_iters,
    stage_main,
)
from arsr.stages.tokenize import upsample_lr
from arsr.stages.upscale import load_vqvae
from arsr.train.checkpoint import load_model_file
from arsr.train.dist import DistInfo, cleanup, init_distributed, print0, unwrap
from arsr.train.engine import Trainer, micro_batch_size
from arsr.train.logging import WandbRun

NUM_PREVIEWS = 4  # val crops in the W&B sample grid
PREVIEW_NUM_ITER = 8  # unmasking steps of the previews (cfg 1, temperature 1)
VAL_BATCH = 64


# --------------------------------------------------------------------------------------
# Latent normalization
# --------------------------------------------------------------------------------------
class LatentNorm:
    """Per-channel ``(f - mean_c) / std_c`` with ``latent_stats.json``'s numbers, and its inverse."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean_C = torch.tensor(list(mean), dtype=torch.float32)
        self.std_C = torch.tensor(list(std), dtype=torch.float32)
        if (self.std_C <= 0).any():
            raise StageError(f"latent stats: a channel has std <= 0 ({self.std_C.tolist()})")

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


# --------------------------------------------------------------------------------------
# Inference: LR tiles -> HR images (arsr upscale, evaluate, the W&B previews)
# --------------------------------------------------------------------------------------
class MARUpscaler:
    """An :class:`~arsr.eval.tiling.Upscaler`: LR tiles [B, 3, hr/s, hr/s] in [-1, 1] -> HR [B, 3, hr, hr].

    The LR tile takes the tokenize stage's path to ``lrf`` (uint8, MATLAB bicubic to the HR size,
    VQVAE encoder), is normalized, MAR samples the HR latents (a generator seeded by ``seed``), and
    the de-normalized samples are re-quantized by the multi-scale quantizer (f -> f_hat) and decoded,
    so the decoder sees the inputs it was trained on (reference §9, decode path (b)).
    Models trained with class labels sample without them (the LR condition alone).
    """

    def __init__(
        self,
        model: MAR,
        vqvae: VQVAE,
        norm: LatentNorm,
        hr_size: int,
        scale: int,
        *,
        num_iter: int = 8,
        cfg: float = 1.0,
        cfg_schedule: str = "linear",
        temperature: float = 1.0,
    ):
        self.model, self.vqvae, self.norm = model, vqvae, norm
        self.hr_size, self.scale = hr_size, scale
        self.num_iter, self.cfg, self.cfg_schedule = num_iter, cfg, cfg_schedule
        self.temperature = temperature

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def lr_latents(self, lr_B3hw: Tensor) -> Tensor:
        """Normalized LR-condition latents [B, Cv, h, w], computed as tokenize computed ``lrf``."""
        up = [to_unit_range(upsample_lr(to_uint8(lr), self.hr_size)) for lr in lr_B3hw]
        return self.norm.normalize(self.vqvae.img_to_f(torch.stack(up).to(self.device)))

    def decode(self, x_BChw: Tensor) -> Tensor:
        """Normalized latents -> images [B, 3, H, W] in [-1, 1] (de-normalize, re-quantize, decode)."""
        return self.vqvae.fhat_to_img(self.vqvae.f_to_fhat(self.norm.denormalize(x_BChw)))

    @torch.no_grad()
    def __call__(self, lr_B3hw: Tensor, seed: int) -> Tensor:
        self.model.eval()  # no dropout, no condition drop while sampling
        lrf = self.lr_latents(lr_B3hw)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        x = self.model.sample_tokens(
            lrf,
            num_iter=self.num_iter,
            cfg=self.cfg,
            cfg_schedule=self.cfg_schedule,
            temperature=self.temperature,
            generator=gen,
        )
        return self.decode(x)


def make_upscaler(
    model_file: dict[str, Any], eval_cfg: EvalConfig, device: torch.device | str
) -> MARUpscaler:
    """The Upscaler of a ``train_mar`` model.pt dict (kind "mar"), sampling with ``eval_cfg``'s MAR keys."""
    extra = model_file["extra"]
    model = MAR(**model_file["config"])
    model.load_state_dict(model_file["state_dict"])
    stats = extra["latent_stats"]
    return MARUpscaler(
        model.to(device).eval(),
        load_vqvae(extra["vqvae"], device),
        LatentNorm(stats["mean"], stats["std"]),
        int(extra["hr_size"]),
        int(extra["scale"]),
        num_iter=eval_cfg.mar_num_iter,
        cfg=eval_cfg.mar_cfg,
        cfg_schedule=eval_cfg.mar_cfg_schedule,
        temperature=eval_cfg.mar_temperature,
    )


# --------------------------------------------------------------------------------------
# Training: loss, validation, previews
# --------------------------------------------------------------------------------------
def mar_loss(
    model: nn.Module,
    batch: dict[str, Tensor],
    norm: LatentNorm,
    use_labels: bool,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Diffusion loss of one batch of token-shard samples (``model`` may be DDP-wrapped)."""
    x = norm.normalize(batch["f"])
    lrf = norm.normalize(batch["lrf"])
    labels = batch["cls"] if use_labels else None
    return model(x, lrf, labels, generator=generator)


class Validator:
    """The EMA model's diffusion loss over this rank's share of the val split.

    Batch ``i`` of rank ``r`` draws its orders, mask ratio, timesteps and noise from a generator
    seeded by ``(seed, r, i)`` (the engine asks for a new iterator at each validation, which
    restarts ``i``), so successive validations differ only by the weights.
    """

    def __init__(self, urls: list[str], norm: LatentNorm, use_labels: bool, seed: int, dist: DistInfo):
        self.urls, self.norm, self.use_labels, self.seed, self.dist = urls, norm, use_labels, seed, dist
        self.batch_idx = 0

    def make_iter(self) -> Any:
        self.batch_idx = 0
        return eval_loader(
            self.urls, decode=decode_tokens, batch_size=VAL_BATCH, rank=self.dist.rank,
            world_size=self.dist.world_size,
        )  # fmt: skip

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, tuple[float, int]]:
        seed = (self.seed * 1_000_003 + self.dist.rank) * 100_003 + self.batch_idx
        self.batch_idx += 1
        gen = torch.Generator(device=batch["f"].device).manual_seed(seed)
        loss = mar_loss(unwrap(model), batch, self.norm, self.use_labels, gen)
        B = batch["f"].shape[0]
        return {"diff_loss": (float(loss) * B, B)}


def first_val_pairs(shards: Path, n: int) -> dict[str, Tensor]:
    """The first ``n`` val crops of the image shards: {"lr", "hr"} in [-1, 1]."""
    return next(iter(eval_loader(shard_urls(shards, "val"), decode=decode_pair, batch_size=n)))


def sample_grid(lr_B3hw: Tensor, sr_B3HW: Tensor, hr_B3HW: Tensor) -> np.ndarray:
    """uint8 image, one row per sample: LR (nearest, at HR size) | MAR | HR."""
    s = hr_B3HW.shape[-1] // lr_B3hw.shape[-1]
    rows = []
    for lr, sr, hr in zip(lr_B3hw, sr_B3HW, hr_B3HW):
        lr_up = to_uint8(lr).repeat(s, axis=0).repeat(s, axis=1)
        rows.append(np.concatenate([lr_up, to_uint8(sr), to_uint8(hr)], axis=1))
    return np.concatenate(rows, axis=0)


class Preview:
    """``on_val``: W&B sample grid of the EMA model on the first val crops, plus their Y PSNR."""

    def __init__(self, pairs: dict[str, Tensor], vqvae: VQVAE, norm: LatentNorm, hr_size: int, scale: int):
        self.pairs, self.vqvae, self.norm, self.hr_size, self.scale = pairs, vqvae, norm, hr_size, scale

    def __call__(self, step: int, ema_model: nn.Module, run: WandbRun) -> dict[str, float] | None:
        if not run.enabled:
            return None
        upscaler = MARUpscaler(
            unwrap(ema_model), self.vqvae, self.norm, self.hr_size, self.scale, num_iter=PREVIEW_NUM_ITER
        )
        lr, hr = self.pairs["lr"], self.pairs["hr"]
        sr = upscaler(lr, seed=0).cpu()
        run.log_images("val/samples", [sample_grid(lr, sr, hr)], captions=["LR | MAR | HR"], step=step)
        scores = [psnr(y_uint8(to_uint8(a)), y_uint8(to_uint8(b))) for a, b in zip(sr, hr)]
        return {"val/sample_psnr": float(np.mean(scores))}


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------
def read_inputs(tokens: Path, vqvae_path: Path, shards: Path) -> dict[str, Any]:
    """The facts the stage takes from its inputs, checked against each other."""
    stats_path = tokens / "latent_stats.json"
    if not stats_path.is_file():
        raise FileNotFoundError(f"{stats_path} not found (run the tokenize stage first)")
    if not vqvae_path.is_file():
        raise FileNotFoundError(f"{vqvae_path} not found (run train_vqvae first)")
    stats = json.loads(stats_path.read_text())
    if stats.get("vqvae_sha256") != file_sha256(vqvae_path):
        raise StageError(f"{tokens} was made with another VQVAE than {vqvae_path}: rerun the tokenize stage")
    vqvae_file = load_model_file(vqvae_path, kind="vqvae")
    # Data facts: latent_stats.json's when tokenize records them there, else the shards' stats.json.
    shard_stats = load_shard_stats(shards)
    hr_size, scale, num_classes = (
        int(stats.get(k, shard_stats.get(k, 0))) for k in ("hr_size", "scale", "num_classes")
    )
    grid, downsample = int(stats["grid"]), 2 ** (len(vqvae_file["config"]["ch_mult"]) - 1)
    if grid * downsample != hr_size:
        raise StageError(
            f"the latent grid {grid} x downsample {downsample} != the data's hr_size {hr_size}: "
            "rerun train_vqvae and tokenize on these shards"
        )
    return {
        "norm": LatentNorm(stats["mean"], stats["std"]),
        "channels": int(stats["Cvae"]),
        "grid": grid,
        "num_classes": num_classes,
        "hr_size": hr_size,
        "scale": scale,
        "vqvae_file": vqvae_file,
    }


def train(params: Params, tokens: Path, vqvae_path: Path, shards: Path, out: Path) -> dict[str, float]:
    cfg, tcfg = params.mar, params.mar.train
    facts = read_inputs(tokens, vqvae_path, shards)
    norm, num_classes = facts["norm"], facts["num_classes"]
    dist = init_distributed()
    torch.manual_seed(params.seed)  # identical initial weights on every rank
    model = build_mar_sr(cfg, facts["channels"], facts["grid"], num_classes)
    kwargs = mar_sr_kwargs(cfg, facts["channels"], facts["grid"], num_classes)
    use_labels = num_classes > 0
    train_urls, val_urls = shard_urls(tokens, "train"), shard_urls(tokens, "val")
    mb = micro_batch_size(tcfg, dist.world_size)
    vqvae_file = facts["vqvae_file"]

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        loss = mar_loss(model, batch, norm, use_labels)
        return loss, {"diff_loss": loss.detach()}

    preview = None
    if dist.is_main:
        pairs = first_val_pairs(shards, NUM_PREVIEWS)
        vqvae = load_vqvae(vqvae_file, dist.device)
        preview = Preview(pairs, vqvae, norm, facts["hr_size"], facts["scale"])
    validator = Validator(val_urls, norm, use_labels, params.seed, dist)
    trainer = Trainer(
        kind="mar",
        model=model,
        model_config=kwargs,
        cfg=tcfg,
        loss_fn=loss_fn,
        make_train_iter=rank_train_iters(train_urls, decode_tokens, mb, params.seed, dist, tcfg.workers),
        out_dir=out,
        fingerprint=fingerprint("train_mar", params, "mar", [tokens, vqvae_path, shards / "stats.json"]),
        seed=params.seed,
        val_fn=validator,
        make_val_iter=validator.make_iter,
        no_weight_decay=MAR.no_weight_decay,
        model_extra={
            "vqvae": {"config": vqvae_file["config"], "state_dict": vqvae_file["state_dict"]},
            "latent_stats": norm.to_dict(),
            "hr_size": facts["hr_size"],
            "scale": facts["scale"],
        },
        on_val=preview,
        stage="train_mar",
        dist_info=dist,
    )
    result = trainer.fit()
    cleanup()
    return result.val


def run(args: argparse.Namespace, params: Params) -> dict[str, float]:
    out = Path(args.out)
    val = train(params, Path(args.tokens), Path(args.vqvae), Path(args.shards), out)
    if val:
        print0(f"train_mar: val diff_loss {val['diff_loss']:.4f} -> {out}")
    return val


def _add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tokens", default=str(TOKENS_DIR), help="token shards (default: data/tokens)")
    vqvae = str(RUNS_DIR / "vqvae" / "model.pt")
    ap.add_argument("--vqvae", default=vqvae, help="the VQVAE the tokens were made with")
    ap.add_argument("--shards", default=str(SHARDS_DIR), help="image shards: stats.json, val previews")
    ap.add_argument("--out", default=str(RUNS_DIR / "mar"), help="run folder (default: runs/mar)")


def main(argv: list[str] | None = None) -> int:
    return stage_main("train_mar", __doc__, run, argv, _add_args)


if __name__ == "__main__":
    sys.exit(main())
