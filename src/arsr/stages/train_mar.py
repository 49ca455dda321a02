"""Stage `train_mar`: train MAR-SR on the token shards (DESIGN §4; reference/mar_diffusion.md §8-9).

    python -m arsr.stages.launch train_mar      # torchrun with resources.train_mar.nproc processes
    python -m arsr.stages.train_mar [--params params.yaml] [--tokens data/tokens]
                                    [--vqvae runs/vqvae/model.pt] [--shards data/shards] [--out runs/mar]

Reads ``seed`` and ``mar`` from params.yaml; everything else is a fact of the inputs: the token
facts (tokenizer target, latent and LR-condition widths, grid, per-channel stats, hr_size, scale,
class count) from ``data/tokens/latent_stats.json``, checked against the tokenizer
``runs/vqvae/model.pt`` (it must be the one the tokens were made with); the image shards give the
W&B previews their LR and HR crops.

What the model sees (per sample, normalized per channel):

- target: the HR latent ``f`` [Cv, h, w] (of the HR image, or of the normalised residual over the
  base for a ``residual`` tokenizer) -> ``(f - mean_c) / std_c`` with the token facts' stats;
- condition: ``lrf`` [lr_channels, h, w] (:func:`arsr.infer.tokenizer.lr_condition`). ``hr``
  tokenizer: the latent of the bicubic-upsampled LR image, normalized with the *same* (HR) stats:
  it lives in the same latent space (one encoder), so the same numbers keep LR and HR values
  comparable position by position, and the model learns the LR -> HR change rather than an offset
  between two normalizations. ``residual`` tokenizer: the base's trunk features, normalized with
  their own per-channel stats, measured on the first ``LR_STATS_SAMPLES`` training samples
  (deterministic: every rank gets the same numbers) and stored in model.pt (``extra["lr_stats"]``);
- the class index when the shards carry labels (``data.labels: folder``).

Loss: MAR's diffusion loss on the masked tokens (``loss`` and ``diff_loss``, the same number: MAR
has no other term). Validation: the EMA model's diffusion loss over the whole val split, with the
masks, timesteps and noise drawn from a generator seeded per batch, so every validation scores the
same draws. At each validation W&B gets a sample grid (LR | MAR | HR rows for the first val crops,
sampled by the same code path as ``arsr upscale``) and ``val/sample_psnr`` (Y PSNR of those).

Writes ``runs/mar/{model.pt,ckpt/,metrics.json,plots/,timing.json}`` through the training engine.
``model.pt`` (kind "mar") is self-contained: the MAR config (:class:`~arsr.models.mar.MARConfig`) and
EMA weights plus, in ``extra``, the tokenizer (:func:`arsr.infer.tokenizer.tokenizer_entry`: the VQVAE,
and a residual tokenizer's base and sigma), the token facts and the LR condition's stats
(``lr_stats``); ``arsr.infer.mar`` turns it into the Upscaler that ``arsr upscale`` and ``evaluate`` use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from arsr.config import Params
from arsr.data.loader import decode_tokens, eval_loader
from arsr.data.shards import shard_urls
from arsr.data.tokens import TokenFacts
from arsr.infer.mar import LatentNorm, MARSampling, MARUpscaler, build_mar_sr, lr_norm_of, lr_stats_of
from arsr.infer.preview import first_val_pairs, preview
from arsr.infer.tokenizer import load_tokenizer, read_token_facts, tokenizer_entry
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
from arsr.train.dist import DistInfo, cleanup, init_distributed, print0, unwrap
from arsr.train.engine import Trainer, micro_batch_size
from arsr.train.logging import WandbRun, declare_artifacts

PARAMS = ("seed", "mar")
NUM_PREVIEWS = 4  # val crops in the W&B sample grid
VAL_BATCH = 64
LR_STATS_SAMPLES = 1024  # training samples a residual tokenizer's LR-condition stats are measured on


@torch.no_grad()
def measure_lr_stats(urls: list[str], n: int = LR_STATS_SAMPLES) -> dict[str, list[float]]:
    """Per-channel mean / std of the stored ``lrf`` over the first ``n`` samples of ``urls`` (ordered
    reads: every rank gets the same numbers without a collective)."""
    sum_C = sq_C = None
    count, samples = 0, 0
    for batch in eval_loader(urls, decode=decode_tokens, batch_size=VAL_BATCH):
        lrf = batch["lrf"][: n - samples].double()  # [B, Clr, h, w], the float16 values as stored
        s, q = lrf.sum((0, 2, 3)), lrf.square().sum((0, 2, 3))
        sum_C, sq_C = (s, q) if sum_C is None else (sum_C + s, sq_C + q)
        count, samples = count + lrf[:, 0].numel(), samples + lrf.shape[0]
        if samples >= n:
            break
    if sum_C is None:
        raise ValueError("no training tokens to measure the LR condition's stats on")
    return lr_stats_of(sum_C.tolist(), sq_C.tolist(), count)


def make_lr_norm(facts: TokenFacts, train_urls: list[str]) -> LatentNorm:
    """The LR condition's normalization (:func:`arsr.infer.mar.lr_norm_of`); measured for ``residual``."""
    return lr_norm_of(facts, None if facts.target == "hr" else measure_lr_stats(train_urls))


# --------------------------------------------------------------------------------------
# Training: loss, validation
# --------------------------------------------------------------------------------------
def mar_loss(
    model: nn.Module,
    batch: dict[str, Tensor],
    norm: LatentNorm,
    lr_norm: LatentNorm,
    use_labels: bool,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Diffusion loss of one batch of token-shard samples (``model`` may be DDP-wrapped): ``f``
    [B, Cv, h, w] normalized by ``norm``, ``lrf`` [B, lr_channels, h, w] by ``lr_norm``."""
    x = norm.normalize(batch["f"])
    lrf = lr_norm.normalize(batch["lrf"])
    labels = batch["cls"] if use_labels else None
    return model(x, lrf, labels, generator=generator)


class Validator:
    """The EMA model's diffusion loss over this rank's share of the val split.

    Batch ``i`` of rank ``r`` draws its orders, mask ratio, timesteps and noise from a generator
    seeded by ``(seed, r, i)`` (the engine asks for a new iterator at each validation, which
    restarts ``i``), so successive validations differ only by the weights.
    """

    def __init__(
        self,
        urls: list[str],
        norm: LatentNorm,
        lr_norm: LatentNorm,
        use_labels: bool,
        seed: int,
        dist: DistInfo,
    ):
        self.urls, self.norm, self.lr_norm, self.use_labels = urls, norm, lr_norm, use_labels
        self.seed, self.dist = seed, dist
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
        loss = mar_loss(unwrap(model), batch, self.norm, self.lr_norm, self.use_labels, gen)
        B = batch["f"].shape[0]
        return {"diff_loss": (float(loss) * B, B)}


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------
def train(params: Params, tokens: Path, vqvae_path: Path, shards: Path, out: Path) -> dict[str, float]:
    cfg, tcfg = params.mar, params.mar.train
    res = params.resources.train_mar  # loader workers, compile, accum: the machine's, not fingerprinted
    fp = fingerprint("train_mar", params, PARAMS, [tokens, vqvae_path, shards])  # fails early if missing
    facts, vqvae_file = read_token_facts(tokens, vqvae_path)
    norm, use_labels = LatentNorm(facts.mean, facts.std), facts.num_classes > 0
    dist = init_distributed()
    train_urls, val_urls = shard_urls(tokens, "train"), shard_urls(tokens, "val")
    lr_norm = make_lr_norm(facts, train_urls)
    torch.manual_seed(params.seed)  # identical initial weights on every rank
    model = build_mar_sr(cfg.model, facts)
    mb = micro_batch_size(tcfg, dist.world_size, res.accum)

    def loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        loss = mar_loss(model, batch, norm, lr_norm, use_labels)
        return loss, {"diff_loss": loss.detach()}

    pairs, tok = None, None
    if dist.is_main:
        pairs, tok = first_val_pairs(shards, NUM_PREVIEWS), load_tokenizer(vqvae_file, dist.device)

    def on_val(step: int, ema_model: nn.Module, run: WandbRun) -> dict[str, float] | None:
        if not run.enabled:  # sampling costs time: only when someone will look at it
            return None
        upscaler = MARUpscaler(unwrap(ema_model), tok, facts, MARSampling(), lr_norm)
        grid, sample_psnr = preview(upscaler, pairs, seed=0)
        run.log_images("val/samples", [grid], captions=["LR | MAR | HR"], step=step)
        return {"val/sample_psnr": sample_psnr}

    validator = Validator(val_urls, norm, lr_norm, use_labels, params.seed, dist)
    trainer = Trainer(
        kind="mar",
        model=model,
        model_config=model.model_config(),
        cfg=tcfg,
        compile=res.compile,
        accum=res.accum,
        max_requeues=res.max_requeues,
        loss_fn=loss_fn,
        make_train_iter=rank_train_iters(train_urls, decode_tokens, mb, params.seed, dist, res.workers),
        out_dir=out,
        fingerprint=fp,
        seed=params.seed,
        val_fn=validator,
        make_val_iter=validator.make_iter,
        no_weight_decay=model.no_weight_decay,
        model_extra={
            "vqvae": tokenizer_entry(vqvae_file),
            "token_facts": facts.to_dict(),
            "lr_stats": lr_norm.to_dict(),
        },
        on_val=on_val,
        dist_info=dist,
    )
    declare_artifacts(
        uses=[tokens_artifact(tokens), model_artifact("vqvae", vqvae_path), shards_artifact(shards)],
        logs=[model_artifact("mar", out / "model.pt")],
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
    ap.add_argument("--shards", default=str(SHARDS_DIR), help="image shards (val previews)")
    ap.add_argument("--out", default=str(RUNS_DIR / "mar"), help="run folder (default: runs/mar)")


def main(argv: list[str] | None = None) -> int:
    return stage_main("train_mar", __doc__, run, argv, _add_args)


if __name__ == "__main__":
    sys.exit(main())
