"""Stage `train_srvar`: train SRVAR, VAR's next-scale transformer conditioned on the LR image.

    python -m arsr.stages.launch train_srvar       # torchrun with srvar.train.nproc processes (DDP)
    python -m arsr.stages.train_srvar [--params params.yaml] [--tokens data/tokens]
                                      [--vqvae runs/vqvae/model.pt] [--out runs/srvar]

Reads ``seed`` and ``srvar`` from params.yaml, the token shards (``idx`` [L], ``f`` and ``lrf``
[Cv,h,w]) and the frozen VQVAE (fp32; its ops run with autocast off). Per batch: the teacher-forcing
input is built from the ground-truth tokens, SRVAR predicts all L tokens from it and the LR latent
``lrf`` (replaced by the learned null LR with p = ``srvar.cond_drop``), and the loss is CE over all
tokens (label smoothing ``srvar.label_smoothing``) [+ ``srvar.diff_weight`` x the refiner's diffusion
loss when ``srvar.refiner``; its target scale is measured on the training tokens first].

Logged (W&B, ``runs/srvar/plots``, console): ``Lm``, ``Lt``, ``Accm``, ``Acct`` (VAR's names: CE and
top-1 accuracy % over all tokens / the last scale) [+ ``diff_loss``], ``tnm``, ``tlr``; at validation
(EMA weights, no condition dropout) the same plus ``Acc_s{si}`` per scale, and W&B sample grids
LR | SRVAR | HR for a few val samples.

``model.pt`` is self-contained (DESIGN §4): SRVAR's config and EMA weights, and in ``extra`` the
VQVAE (config + weights), ``latent_stats.json``, ``hr_size`` and ``scale``. ``arsr upscale`` and
``evaluate`` turn it into an :class:`SRVARUpscaler` with :func:`make_upscaler`.

``hr_size`` and ``scale`` are facts of the data, not params this stage may read: tokenize records
them in ``latent_stats.json`` (with the tokenizer's facts and the sha256 of the VQVAE it used; both
are checked against ``--vqvae``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from arsr.config import EvalConfig, Params, SRVARConfig
from arsr.data.loader import decode_tokens, eval_loader, to_unit_range
from arsr.data.shards import shard_urls
from arsr.eval.tiling import to_uint8
from arsr.io import file_sha256
from arsr.models.srvar import SRVAR, build_srvar, init_from, last_scale_residual, srvar_loss
from arsr.models.vqvae import VQVAE
from arsr.stages.common import RUNS_DIR, TOKENS_DIR, StageError, fingerprint, rank_train_iters, stage_main
from arsr.stages.tokenize import upsample_lr
from arsr.stages.upscale import load_vqvae
from arsr.train.checkpoint import load_model_file
from arsr.train.dist import cleanup, init_distributed, print0, unwrap
from arsr.train.engine import Trainer, micro_batch_size, to_device
from arsr.train.logging import WandbRun

NUM_VAL_SAMPLES = 4  # val samples drawn for the W&B grids at every validation
SAMPLE_CFG = 1.5  # guidance of those samples (EvalConfig's default; this stage reads no eval params)
VAL_BATCH = 64
REFINER_SCALE_SAMPLES = 512  # training samples the refiner's target scale is measured on


# --------------------------------------------------------------------------------------
# Inputs: tokenizer, token facts
# --------------------------------------------------------------------------------------
def load_inputs(tokens: Path, vqvae_path: Path) -> tuple[dict, VQVAE, dict, int, int]:
    """-> (the VQVAE model.pt dict, the frozen VQVAE, latent_stats.json, hr_size, scale).

    Refuses token shards made by another tokenizer than ``vqvae_path`` (tokenize records its hash)."""
    stats_path = tokens / "latent_stats.json"
    if not stats_path.is_file():
        raise FileNotFoundError(f"{stats_path} not found (run the tokenize stage first)")
    stats = json.loads(stats_path.read_text())
    missing = sorted({"vqvae_sha256", "hr_size", "scale"} - set(stats))
    if missing:
        raise StageError(f"{stats_path} lacks {', '.join(missing)} (made by an older tokenize); rerun it")
    vae_file = load_model_file(vqvae_path, kind="vqvae")
    if stats["vqvae_sha256"] != file_sha256(vqvae_path):
        raise StageError(
            f"{tokens} was tokenized with another VQVAE than {vqvae_path} (sha256 differs); rerun tokenize"
        )
    vae = load_vqvae(vae_file)
    if list(stats["patch_nums"]) != list(vae.patch_nums) or stats["vocab_size"] != vae.V:
        raise StageError(
            f"{stats_path}: patch_nums {stats['patch_nums']} / vocab {stats['vocab_size']} do not match "
            f"the VQVAE's {list(vae.patch_nums)} / {vae.V}; rerun tokenize"
        )
    hr_size, scale = int(stats["hr_size"]), int(stats["scale"])
    if hr_size != vae.patch_nums[-1] * vae.downsample:
        raise StageError(
            f"hr_size {hr_size} != the VQVAE's grid {vae.patch_nums[-1]} x downsample {vae.downsample}"
        )
    return vae_file, vae, stats, hr_size, scale


@torch.no_grad()
def measure_refiner_scale(vae: VQVAE, urls: list[str], n: int = REFINER_SCALE_SAMPLES) -> float:
    """Std of the last scale's quantisation residual f - f_hat over the first ``n`` training samples.

    Deterministic (ordered reads), so every rank gets the same number without a collective."""
    sq, count = 0.0, 0
    for batch in eval_loader(urls, decode=decode_tokens, batch_size=VAL_BATCH):
        idx = vae.split_idx_BL(batch["idx"])
        r = last_scale_residual(batch["f"], vae.idxBl_to_var_input(idx), idx[-1], vae, vae.SN)
        sq, count = sq + r.double().square().sum().item(), count + r.numel()
        if count >= n * r[0].numel():
            break
    return float(np.sqrt(sq / max(count, 1)))


# --------------------------------------------------------------------------------------
# Loss, validation, samples
# --------------------------------------------------------------------------------------
def teacher_forced(
    model: nn.Module, vae: VQVAE, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One teacher-forced pass -> (logits_BLV fp32, diff_loss or None). ``model`` may be DDP-wrapped."""
    x_BLCv = vae.idxBl_to_var_input(vae.split_idx_BL(batch["idx"]))  # fp32, autocast off inside
    if unwrap(model).has_refiner:
        return model(batch["lrf"], x_BLCv, batch["f"], vae)
    return model(batch["lrf"], x_BLCv)


def make_loss_fn(vae: VQVAE, cfg: SRVARConfig) -> Any:
    """(model, batch) -> (CE [+ diff_weight * diff_loss], {Lm, Lt, Accm, Acct [, diff_loss]})."""
    last_l = vae.patch_nums[-1] ** 2

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        logits_BLV, diff_loss = teacher_forced(model, vae, batch)
        return srvar_loss(logits_BLV, batch["idx"], diff_loss, last_l, cfg.label_smoothing, cfg.diff_weight)

    return loss_fn


def make_val_fn(vae: VQVAE) -> Any:
    """(ema_model, batch) -> {name: (sum, count)}: the training metrics (no smoothing, no condition
    dropout: the EMA model is in eval mode) plus top-1 accuracy per scale ``Acc_s{si}``."""
    last_l = vae.patch_nums[-1] ** 2
    ends = np.cumsum([pn * pn for pn in vae.patch_nums]).tolist()

    @torch.no_grad()
    def val_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
        logits_BLV, diff_loss = teacher_forced(model, vae, batch)
        gt_BL = batch["idx"]
        _, metrics = srvar_loss(logits_BLV, gt_BL, diff_loss, last_l)
        B = gt_BL.shape[0]
        out = {k: (v.item() * B, B) for k, v in metrics.items()}
        hit_BL = (logits_BLV.argmax(-1) == gt_BL).float()
        for si, (bg, ed) in enumerate(zip([0] + ends[:-1], ends)):
            out[f"Acc_s{si}"] = (hit_BL[:, bg:ed].mean(1).sum().item() * 100, B)
        return out

    return val_fn


@torch.no_grad()
def sample_grid(model: SRVAR, vae: VQVAE, batch: dict[str, torch.Tensor], seed: int) -> np.ndarray:
    """uint8 image, one row per sample: LR | SRVAR | HR.

    The token shards hold latents, not pixels: "LR" is the tokenizer's view of the bicubic-upsampled
    LR input (its latent quantised and decoded), "HR" the decoded ground-truth tokens (the ceiling)."""
    lrf, idx = batch["lrf"], vae.split_idx_BL(batch["idx"])
    sr = model.autoregressive_infer_cfg(lrf, vae, cfg=SAMPLE_CFG, seed=seed).mul(2).sub(1)
    cols = [vae.fhat_to_img(vae.f_to_fhat(lrf)), sr, vae.idxBl_to_img(idx)]
    rows = [np.concatenate([to_uint8(c[i]) for c in cols], axis=1) for i in range(lrf.shape[0])]
    return np.concatenate(rows, axis=0)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def build_model(cfg: SRVARConfig, vae: VQVAE, refiner_scale: float) -> SRVAR:
    model = build_srvar(cfg, vae.patch_nums, vae.V, vae.Cvae, refiner_scale)
    if cfg.init_from:
        report = init_from(model, cfg.init_from)
        print0(f"train_srvar: init_from {cfg.init_from}: {report.summary()}")
        print0(f"  new (kept at init): {', '.join(report.new)}")
        for line in report.skipped:
            print0(f"  skipped {line}")
    return model


def train(args: argparse.Namespace, params: Params) -> dict[str, float]:
    cfg, tcfg = params.srvar, params.srvar.train
    tokens, vqvae_path, out = Path(args.tokens), Path(args.vqvae), Path(args.out)
    inputs = [tokens, vqvae_path] + ([Path(cfg.init_from)] if cfg.init_from else [])
    fp = fingerprint("train_srvar", params, "srvar", inputs)  # also fails early on a missing input
    dist = init_distributed()
    vae_file, vae, stats, hr_size, scale = load_inputs(tokens, vqvae_path)
    vae = vae.to(dist.device)
    train_urls, val_urls = shard_urls(tokens, "train"), shard_urls(tokens, "val")

    refiner_scale = measure_refiner_scale(vae, train_urls) if cfg.refiner else 1.0
    if cfg.refiner:
        print0(f"train_srvar: refiner target scale (std of f - f_hat on train tokens) {refiner_scale:.4g}")
    torch.manual_seed(params.seed)  # identical initial weights on every rank
    model = build_model(cfg, vae, refiner_scale)
    mb = micro_batch_size(tcfg, dist.world_size)

    samples = None
    if dist.is_main:
        samples = next(iter(eval_loader(val_urls, decode=decode_tokens, batch_size=NUM_VAL_SAMPLES)))

    def on_val(step: int, ema_model: nn.Module, run: WandbRun) -> None:
        if run.enabled:  # sampling costs time: only when someone will look at it
            grid = sample_grid(unwrap(ema_model), vae, to_device(samples, dist.device), seed=params.seed)
            run.log_images(
                "val/samples", [grid], captions=["LR (tokenizer view) | SRVAR | HR (tokens)"], step=step
            )

    extra = {
        "vqvae": {"config": vae_file["config"], "state_dict": vae_file["state_dict"]},
        "latent_stats": stats,
        "hr_size": hr_size,
        "scale": scale,
        "init_from": cfg.init_from,
    }
    trainer = Trainer(
        kind="srvar",
        model=model,
        model_config=model.model_config(),
        cfg=tcfg,
        loss_fn=make_loss_fn(vae, cfg),
        make_train_iter=rank_train_iters(train_urls, decode_tokens, mb, params.seed, dist, tcfg.workers),
        out_dir=out,
        fingerprint=fp,
        seed=params.seed,
        val_fn=make_val_fn(vae),
        make_val_iter=lambda: eval_loader(
            val_urls, decode=decode_tokens, batch_size=VAL_BATCH, rank=dist.rank, world_size=dist.world_size
        ),
        no_weight_decay=model.no_weight_decay,
        model_extra=extra,
        on_val=on_val,
        stage="train_srvar",
        dist_info=dist,
    )
    result = trainer.fit()
    cleanup()
    return result.val


def run(args: argparse.Namespace, params: Params) -> dict[str, float]:
    val = train(args, params)
    if val:
        print0(
            f"train_srvar: val Lm {val['Lm']:.3f}  Lt {val['Lt']:.3f}  Accm {val['Accm']:.2f}%  "
            f"Acct {val['Acct']:.2f}% -> {args.out}"
        )
    return val


# --------------------------------------------------------------------------------------
# Inference: the Upscaler that `arsr upscale` and `evaluate` use
# --------------------------------------------------------------------------------------
class SRVARUpscaler:
    """LR tiles [B,3,hr/s,hr/s] in [-1,1] -> SR tiles [B,3,hr,hr] in [-1,1] (``arsr.eval.tiling``).

    The input goes the way the training condition went (tokenize): uint8 RGB -> MATLAB bicubic up
    to ``hr_size`` -> VQVAE encoder -> ``lrf`` (rounded through float16 as stored in the token
    shards); then scale-by-scale sampling with CFG and the VQVAE decoder (refiner residual included)."""

    def __init__(
        self, model: SRVAR, vae: VQVAE, hr_size: int, scale: int, cfg: EvalConfig, device: torch.device | str
    ):
        self.model, self.vae, self.hr_size, self.scale = model, vae, hr_size, scale
        self.cfg, self.top_k, self.top_p = cfg.srvar_cfg, cfg.srvar_top_k, cfg.srvar_top_p
        self.device = torch.device(device)
        self.refine = True  # with a refiner: add its sampled residual (False: tokens only)

    @torch.no_grad()
    def lr_latent(self, lr_B3hw: torch.Tensor) -> torch.Tensor:
        lr_size = self.hr_size // self.scale
        if lr_B3hw.shape[1:] != (3, lr_size, lr_size):
            raise ValueError(f"LR tiles must be [B,3,{lr_size},{lr_size}], got {tuple(lr_B3hw.shape)}")
        up = [to_unit_range(upsample_lr(to_uint8(lr), self.hr_size)) for lr in lr_B3hw]
        return self.vae.img_to_f(torch.stack(up).to(self.device)).half().float()

    @torch.no_grad()
    def __call__(self, lr_B3hw: torch.Tensor, seed: int) -> torch.Tensor:
        lrf = self.lr_latent(lr_B3hw)
        img = self.model.autoregressive_infer_cfg(
            lrf, self.vae, self.cfg, self.top_k, self.top_p, seed=seed, refine=self.refine
        )
        return img.mul(2).sub(1)


def make_upscaler(
    model_file: dict[str, Any], eval_cfg: EvalConfig, device: torch.device | str
) -> SRVARUpscaler:
    """Rebuild SRVAR and its VQVAE from a ``train_srvar`` model.pt dict alone."""
    extra = model_file["extra"]
    vae = load_vqvae(extra["vqvae"], device)
    model = SRVAR(**model_file["config"])
    model.load_state_dict(model_file["state_dict"])
    model = model.to(device).eval().requires_grad_(False)
    return SRVARUpscaler(model, vae, int(extra["hr_size"]), int(extra["scale"]), eval_cfg, device)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def _add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tokens", default=str(TOKENS_DIR), help="token shards (default: data/tokens)")
    ap.add_argument("--vqvae", default=str(RUNS_DIR / "vqvae" / "model.pt"), help="the tokenizer's model.pt")
    ap.add_argument("--out", default=str(RUNS_DIR / "srvar"), help="run folder (default: runs/srvar)")


def main(argv: list[str] | None = None) -> int:
    return stage_main("train_srvar", __doc__, run, argv, _add_args)


if __name__ == "__main__":
    sys.exit(main())
