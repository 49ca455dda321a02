"""Stage `train_srvar`: train SRVAR, VAR's next-scale transformer conditioned on the LR image.

    python -m arsr.stages.launch train_srvar       # torchrun with resources.train_srvar.nproc processes (DDP)
    python -m arsr.stages.train_srvar [--params params.yaml] [--tokens data/tokens]
                                      [--vqvae runs/vqvae/model.pt] [--shards data/shards] [--out runs/srvar]

Reads ``seed`` and ``srvar`` from params.yaml, the token shards (``idx`` [L], ``f`` [Cv,h,w] and
``lrf`` [lr_channels,h,w]) and the frozen tokenizer (:class:`~arsr.models.residual.SRTokenizer`;
fp32, its ops run with autocast off). Per batch: the teacher-forcing input is built from the
ground-truth tokens by the tokenizer's VQVAE, SRVAR predicts all L tokens from it and the LR condition
``lrf`` (replaced by the learned null LR with p = ``srvar.model.cond_drop``), and the loss is CE over
all tokens (label smoothing ``srvar.label_smoothing``) [+ ``srvar.diff_weight`` x the refiner's
diffusion loss when ``srvar.model.refiner``; its target scale is measured on the training tokens].

Logged (W&B, ``runs/srvar/plots``, console): ``Lm``, ``Lt``, ``Accm``, ``Acct`` (VAR's names: CE and
top-1 accuracy % over all tokens / the last scale) [+ ``diff_loss``], ``tnm``, ``tlr``; at validation
(EMA weights, no condition dropout) the same plus ``Acc_s{si}`` per scale, and W&B sample grids
LR | SRVAR | HR of the first val crops of the image shards, sampled by ``arsr upscale``'s code path
(:class:`arsr.infer.srvar.SRVARUpscaler`, eval's default sampling), with ``val/sample_psnr``.

``model.pt`` is self-contained (DESIGN §4): SRVAR's config (:class:`~arsr.models.srvar.SRVARConfig`)
and EMA weights, and in ``extra`` the tokenizer (:func:`arsr.infer.tokenizer.tokenizer_entry`: the
VQVAE, and a residual tokenizer's base and sigma) and the token facts
(:class:`~arsr.data.tokens.TokenFacts`, read from ``latent_stats.json`` and checked against
``--vqvae``). ``arsr upscale`` and ``evaluate`` load it through ``arsr.infer``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from arsr.config import Params, SRVARSection
from arsr.data.loader import decode_tokens, eval_loader
from arsr.data.shards import shard_urls
from arsr.data.tokens import TokenFacts
from arsr.infer.preview import first_val_pairs, preview
from arsr.infer.srvar import SRVARSampling, SRVARUpscaler, build_srvar
from arsr.infer.tokenizer import load_tokenizer, read_token_facts, tokenizer_entry
from arsr.models.srvar import SRVAR, init_from, last_scale_residual, srvar_loss
from arsr.models.vqvae import VQVAE
from arsr.stages.common import (
    RUNS_DIR,
    SHARDS_DIR,
    TOKENS_DIR,
    fingerprint,
    model_artifact,
    rank_train_iters,
    shards_artifact,
    stage_main,
    tokens_artifact,
)
from arsr.train.dist import cleanup, init_distributed, print0, unwrap
from arsr.train.engine import Trainer, micro_batch_size
from arsr.train.logging import WandbRun, declare_artifacts

PARAMS = ("seed", "srvar")
NUM_PREVIEWS = 4  # val crops in the W&B sample grid at every validation
VAL_BATCH = 64
REFINER_SCALE_SAMPLES = 512  # training samples the refiner's target scale is measured on


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


def make_loss_fn(vae: VQVAE, cfg: SRVARSection) -> Any:
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


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def build_model(cfg: SRVARSection, facts: TokenFacts, refiner_scale: float) -> SRVAR:
    """SRVAR for these tokens (LR condition of ``facts.lr_channels``), optionally from VAR weights."""
    model = build_srvar(cfg.model, facts, refiner_scale)
    if cfg.init_from:
        report = init_from(model, cfg.init_from)
        print0(f"train_srvar: init_from {cfg.init_from}: {report.summary()}")
        print0(f"  new (kept at init): {', '.join(report.new)}")
        for line in report.skipped:
            print0(f"  skipped {line}")
    return model


def train(args: argparse.Namespace, params: Params) -> dict[str, float]:
    cfg, tcfg = params.srvar, params.srvar.train
    res = params.resources.train_srvar  # loader workers, compile, accum: the machine's, not fingerprinted
    tokens, vqvae_path, shards, out = Path(args.tokens), Path(args.vqvae), Path(args.shards), Path(args.out)
    inputs = [tokens, vqvae_path, shards] + ([Path(cfg.init_from)] if cfg.init_from else [])
    fp = fingerprint("train_srvar", params, PARAMS, inputs)  # also fails early on a missing input
    dist = init_distributed()
    facts, vae_file = read_token_facts(tokens, vqvae_path)
    tok = load_tokenizer(vae_file, dist.device)
    vae = tok.vae  # teacher forcing and the refiner's targets work on the tokens, in the VQVAE's latent
    train_urls, val_urls = shard_urls(tokens, "train"), shard_urls(tokens, "val")

    refiner_scale = measure_refiner_scale(vae, train_urls) if cfg.model.refiner else 1.0
    if cfg.model.refiner:
        print0(f"train_srvar: refiner target scale (std of f - f_hat on train tokens) {refiner_scale:.4g}")
    torch.manual_seed(params.seed)  # identical initial weights on every rank
    model = build_model(cfg, facts, refiner_scale)
    mb = micro_batch_size(tcfg, dist.world_size, res.accum)
    pairs = first_val_pairs(shards, NUM_PREVIEWS) if dist.is_main else None

    def on_val(step: int, ema_model: nn.Module, run: WandbRun) -> dict[str, float] | None:
        if not run.enabled:  # sampling costs time: only when someone will look at it
            return None
        upscaler = SRVARUpscaler(unwrap(ema_model), tok, facts, SRVARSampling())
        grid, sample_psnr = preview(upscaler, pairs, seed=params.seed)
        run.log_images("val/samples", [grid], captions=["LR | SRVAR | HR"], step=step)
        return {"val/sample_psnr": sample_psnr}

    extra = {
        "vqvae": tokenizer_entry(vae_file),
        "token_facts": facts.to_dict(),
        "init_from": cfg.init_from,
    }
    trainer = Trainer(
        kind="srvar",
        model=model,
        model_config=model.model_config(),
        cfg=tcfg,
        compile=res.compile,
        accum=res.accum,
        max_requeues=res.max_requeues,
        loss_fn=make_loss_fn(vae, cfg),
        make_train_iter=rank_train_iters(train_urls, decode_tokens, mb, params.seed, dist, res.workers),
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
        dist_info=dist,
    )
    declare_artifacts(
        uses=[tokens_artifact(tokens), model_artifact("vqvae", vqvae_path), shards_artifact(shards)],
        logs=[model_artifact("srvar", out / "model.pt")],
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
# CLI
# --------------------------------------------------------------------------------------
def _add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tokens", default=str(TOKENS_DIR), help="token shards (default: data/tokens)")
    ap.add_argument("--vqvae", default=str(RUNS_DIR / "vqvae" / "model.pt"), help="the tokenizer's model.pt")
    ap.add_argument("--shards", default=str(SHARDS_DIR), help="image shards (val previews)")
    ap.add_argument("--out", default=str(RUNS_DIR / "srvar"), help="run folder (default: runs/srvar)")


def main(argv: list[str] | None = None) -> int:
    return stage_main("train_srvar", __doc__, run, argv, _add_args)


if __name__ == "__main__":
    sys.exit(main())
