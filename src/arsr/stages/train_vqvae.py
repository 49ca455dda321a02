"""Stage `train_vqvae`: train the multi-scale VQVAE tokenizer (or adopt official weights).

    python -m arsr.stages.launch train_vqvae      # torchrun when resources.train_vqvae.nproc > 1
    python -m arsr.stages.train_vqvae [--params params.yaml] [--shards data/shards] [--out runs/vqvae]

Reads ``seed`` and ``vqvae`` from params.yaml and the crops of ``data/shards`` (with
``vqvae.augment``: random RGB order, flips and negatives, see :func:`augment`).

``vqvae.target: residual`` (the default) also reads the regression base (``--base``,
runs/base/model.pt): the VQVAE's input is ``x = (HR - base(LR)) / sigma``, sigma the RMS of the
residual over the first train crops, and its reconstruction is read as ``base(LR) + sigma x_rec``
(``arsr.models.residual.SRTokenizer``). Before step 1 the linear path is PCA-initialised on the first
crops' inputs (``vqvae.model.linear_path``) and the codebook is k-means on their latents
(``vqvae.kmeans_init``): a random start of a small, noise-like residual's tokenizer learns nothing
(reference/sr_quality.md). ``model.pt``'s ``extra`` holds the target, sigma and the base. ``hr``
keeps VAR's tokenizer of the HR image (required for official weights).

Loss per batch (x: the VQVAE's input): ``L1(rec, x) + L2(rec, x) + vq_loss`` for ``hr``,
``L2(rec, x) + vq_loss`` for ``residual`` (the measured recipe: with MSE the loss on x is the loss on
the final image up to a constant); vq_loss is VAR's (beta ``vqvae.beta``, with the
straight-through estimator; see ``arsr.models.quant``), plus
``vqvae.perceptual_weight x LPIPS(rec, x)`` when that is > 0 (AlexNet LPIPS of
``arsr.eval.perceptual``, frozen, outside the model). With ``vqvae.restart_dead_codes`` every
``vqvae.restart_every`` steps the codes whose EMA hit count fell below ``RESTART_THRESHOLD`` of the mean
are re-seeded from this batch's encoder residuals (on every rank, from a generator seeded by the
step, so runs and resumed runs stay identical).

Logged (W&B, ``runs/vqvae/plots``, the console): ``rec_l1``, ``rec_l2``, ``vq_loss``, ``code_usage``
(the fraction of the V codes that the last scale uses) and ``code_usage_s{si}`` per scale, on
training batches and, at validation, over the whole val split (EMA weights, fp32); val also gives
``rec_psnr`` (dB, Y channel of the uint8 reconstruction, no border shaved, averaged per image) and,
when the LPIPS weights are installed, ``rec_lpips`` (also logged on training batches when it is in
the loss).
W&B gets val inputs beside their reconstructions.

Writes ``runs/vqvae/{model.pt,ckpt/,metrics.json,plots/,timing.json}`` through the training engine
(``model.pt``: kind "vqvae", config = :class:`~arsr.models.vqvae.VQVAEConfig`, EMA weights).

``vqvae.pretrained: PATH`` adopts official VAR weights instead of training (``vqvae.model`` must
describe them, e.g. ch 160, ch_mult [1, 1, 2, 2, 4], vocab_size 4096, z_channels 32):
``model.pt`` is written from them and ``metrics.json`` holds their val numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from arsr.config import Params, VQVAESection, stage_param_values
from arsr.data.loader import eval_loader, load_shard_stats, to_uint8, to_unit_range
from arsr.data.shards import decode_png, shard_urls
from arsr.eval.metrics import psnr, y_uint8
from arsr.eval.perceptual import LPIPS, WeightsMissing, lpips_module
from arsr.infer.base import load_base
from arsr.io import atomic_write_text
from arsr.models.base import BaseSR
from arsr.models.residual import SRTokenizer
from arsr.models.vqvae import VQVAE, load_official
from arsr.stages.common import (
    RUNS_DIR,
    SHARDS_DIR,
    StageError,
    fingerprint,
    model_artifact,
    rank_train_iters,
    shards_artifact,
    stage_main,
)
from arsr.train.checkpoint import load_model_file, save_model_file
from arsr.train.dist import DistInfo, all_reduce_sum_, cleanup, init_distributed, print0, unwrap
from arsr.train.engine import Trainer, micro_batch_size
from arsr.train.logging import PlotWriter, WandbRun, declare_artifacts, init_wandb, merge_sums

# DDP compares a gradient's strides with its bucket's; for 1x1 conv weights [C, C, 1, 1] the oneDNN
# gradient differs only in the strides of the size-1 dims, which address nothing: harmless, once per
# rank, but it prints a 6-line warning.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

PARAMS = ("seed", "vqvae")
RESTART_THRESHOLD = 0.03  # dead: EMA hits < 3% of the mean code's (see MultiScaleQuantizer)
NUM_VAL_IMAGES = 8  # val inputs shown beside their reconstructions in W&B
VAL_BATCH = 50
SIGMA_SAMPLES = 2048  # train crops the residual's spread is measured on
INIT_SAMPLES = 512  # train crops the linear path (PCA) and the codebook (k-means) start from


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def decode_hr(sample: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Image shards -> {"hr": [3, H, W] in [-1, 1]} (the ``hr`` target never looks at the LR crop)."""
    return {"hr": to_unit_range(decode_png(sample["hr.png"]))}


def decode_pair(sample: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Image shards -> {"hr": [3, H, W], "lr": [3, h, w]} in [-1, 1] (the ``residual`` target)."""
    return {
        "hr": to_unit_range(decode_png(sample["hr.png"])),
        "lr": to_unit_range(decode_png(sample["lr.png"])),
    }


@torch.no_grad()
def residual_sigma(
    base: BaseSR, urls: list[str], device: torch.device, max_samples: int = SIGMA_SAMPLES
) -> float:
    """RMS of ``HR - base(LR)`` over the first ``max_samples`` train crops in shard order (the same
    number on every rank): the residual tokenizer's input scale."""
    sq, n = 0.0, 0
    for batch in eval_loader(urls, decode=decode_pair, batch_size=256):
        r = batch["hr"].to(device) - base(batch["lr"].to(device))
        sq += float(r.double().square().sum())
        n += r.numel()
        if n >= max_samples * r[0].numel():
            break
    return float(np.sqrt(sq / n))


@torch.no_grad()
def first_inputs(tok: SRTokenizer, urls: list[str], n: int, device: torch.device) -> torch.Tensor:
    """The VQVAE inputs of the first ``n`` train crops (shard order): data for the inits."""
    xs, got = [], 0
    decode = decode_pair if tok.base is not None else decode_hr
    for batch in eval_loader(urls, decode=decode, batch_size=256):
        lr = batch["lr"].to(device) if "lr" in batch else None
        xs.append(tok.to_x(batch["hr"].to(device), lr))
        got += xs[-1].shape[0]
        if got >= n:
            break
    return torch.cat(xs)[:n]


def augment(x_B3HW: torch.Tensor) -> torch.Tensor:
    """Per image: a random order of the RGB channels, a random horizontal flip, and the negative
    image half of the time. A tokenizer must reconstruct any image, and a small train split can be
    far from the val one (the built-in train photos are mostly dark: retina, Hubble; the val ones
    bright): these cover colours and brightness it would otherwise never see. Draws from torch's
    global RNG, which the engine checkpoints per rank, so a resumed run draws the same."""
    B, _, H, W = x_B3HW.shape
    order_B3 = torch.rand(B, 3).argsort(dim=1).to(x_B3HW.device)
    x = x_B3HW.gather(1, order_B3[:, :, None, None].expand(B, 3, H, W))
    flip_B, negate_B = (torch.rand(2, B, 1, 1, 1) < 0.5).to(x.device)
    x = torch.where(flip_B, x.flip(3), x)
    return torch.where(negate_B, -x, x)


# --------------------------------------------------------------------------------------
# Losses and metrics
# --------------------------------------------------------------------------------------
def usage_metrics(usage_S: torch.Tensor) -> dict[str, torch.Tensor]:
    """``code_usage`` (last scale) and ``code_usage_s{si}`` from a [SN] usage vector."""
    out = {f"code_usage_s{si}": u for si, u in enumerate(usage_S.detach())}
    out["code_usage"] = usage_S[-1].detach()
    return out


def lpips_of(lpips: LPIPS, rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS ``(B,)`` of images in the models' [-1, 1] range (LPIPS takes [0, 1])."""
    return lpips(rec.add(1).div(2), x.add(1).div(2))


def vqvae_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    lpips: LPIPS | None = None,
    perceptual_weight: float = 0.0,
    to_image: Any = None,
    l1_weight: float = 1.0,
    token_dropout: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """``l1_weight x L1 + L2 + vq_loss (+ perceptual_weight x LPIPS)`` on one micro-batch of VQVAE
    inputs ``batch["x"]`` (model may be DDP-wrapped; runs under autocast). ``lpips`` is a frozen
    module held outside the model, so it is neither trained nor saved; gradients reach the decoder
    through ``rec``. ``to_image`` maps inputs/reconstructions to images for LPIPS (the residual
    target: ``base(LR) + sigma x``); default: they are images."""
    x = batch["x"]
    rec, vq_loss, usage_S = model(x, token_dropout) if token_dropout > 0 else model(x)
    rec = rec.float()
    l1 = (rec - x).abs().mean()
    l2 = F.mse_loss(rec, x)
    loss = l1_weight * l1 + l2 + vq_loss
    metrics = {"rec_l1": l1.detach(), "rec_l2": l2.detach(), "vq_loss": vq_loss.detach()}
    if lpips is not None and perceptual_weight > 0:
        img, ref = (rec, x) if to_image is None else (to_image(rec), to_image(x))
        p = lpips_of(lpips, img, ref).mean()
        loss = loss + perceptual_weight * p
        metrics["rec_lpips"] = p.detach()
    return loss, metrics | usage_metrics(usage_S)


class Validator:
    """Val metrics of the (EMA) model on the full val split, in fp32 with autocast off: what
    ``tokenize`` and ``evaluate`` will see.

    The engine sums ``(value, count)`` pairs over batches and ranks, but code usage over the whole
    split is no such sum. So the val iterator yields this rank's batches (whose codes are counted
    here) and then one summary item ``{"hits_SV": ...}``, the code hits of all ranks, all-reduced
    (safe: every rank reaches the end of its own share exactly once); ``__call__`` turns it into
    ``code_usage`` with count 1 on rank 0 and 0 elsewhere, so the engine's mean is exact.
    """

    def __init__(
        self,
        urls: list[str],
        SN: int,
        V: int,
        batch_size: int = VAL_BATCH,
        dist: DistInfo | None = None,
        lpips: LPIPS | None = None,
        base: BaseSR | None = None,
        sigma: float = 1.0,
    ):
        self.urls, self.SN, self.V, self.batch_size, self.lpips = urls, SN, V, batch_size, lpips
        self.base, self.sigma = base, sigma
        self.dist = dist or DistInfo(0, 1, 0, torch.device("cpu"))
        self.hits_SV = torch.zeros(SN, V)

    def make_iter(self) -> Iterator[dict[str, torch.Tensor]]:
        d = self.dist
        self.hits_SV = torch.zeros(self.SN, self.V, device=d.device)
        decode = decode_hr if self.base is None else decode_pair
        yield from eval_loader(
            self.urls, decode=decode, batch_size=self.batch_size, rank=d.rank, world_size=d.world_size
        )
        yield {"hits_SV": all_reduce_sum_(self.hits_SV)}

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, tuple]:
        if "hits_SV" in batch:
            n = 1 if self.dist.is_main else 0
            usage_S = (batch["hits_SV"] > 0).float().mean(dim=1).tolist()
            out = {f"code_usage_s{si}": (u * n, n) for si, u in enumerate(usage_S)}
            return out | {"code_usage": (usage_S[-1] * n, n)}
        tok = SRTokenizer(unwrap(model), self.base, self.sigma)
        hr, lr = batch["hr"], batch.get("lr")
        B = hr.shape[0]
        x = tok.to_x(hr, lr)
        f = tok.vae.img_to_f(x)
        vq_loss = tok.vae.quantize(f)[1]  # eval mode: no usage-buffer update
        f_hat = tok.vae.f_to_fhat(f)
        x_rec = tok.vae.decode(f_hat).float()
        if tok.base is None:
            x_rec = x_rec.clamp(-1, 1)  # the image range (as before: the reconstruction as an image)
        rec = tok.fhat_to_img(f_hat, lr)  # exactly what decoding the stored tokens gives
        for si, idx_Bl in enumerate(tok.vae.f_to_idxBl(f)):
            self.hits_SV[si] += idx_Bl.flatten().bincount(minlength=tok.vae.V).to(self.hits_SV.dtype)
        psnr_sum = sum(psnr(y_uint8(to_uint8(a)), y_uint8(to_uint8(b))) for a, b in zip(rec, hr))
        out = {
            "rec_l1": ((x_rec - x).abs().mean().item() * B, B),
            "rec_l2": (F.mse_loss(x_rec, x).item() * B, B),
            "rec_psnr": (psnr_sum, B),
            "vq_loss": (vq_loss.item() * B, B),
        }
        if self.lpips is not None:  # of the float reconstruction (evaluate scores the uint8 one)
            out["rec_lpips"] = (lpips_of(self.lpips, rec, hr).sum().item(), B)
        return out


def validate(vae: VQVAE, urls: list[str]) -> dict[str, float]:
    """One val pass in this process, outside the engine (adopted weights); the engine's metrics."""
    validator = Validator(urls, vae.SN, vae.V, lpips=val_lpips(vae.quant_conv.weight.device))
    sums: dict[str, list[float]] = {}
    for batch in validator.make_iter():
        for k, (s, n) in validator(vae, batch).items():
            acc = sums.setdefault(k, [0.0, 0.0])
            acc[0] += s
            acc[1] += n
    return merge_sums([sums])


def recon_grid(tok: SRTokenizer, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """uint8 image, one row per HR input: [input | reconstruction from its tokens]."""
    hr, lr = batch["hr"], batch.get("lr")
    rec = tok.idxBl_to_img(tok.img_to_idxBl(hr, lr), lr)
    rows = [np.concatenate([to_uint8(a), to_uint8(b)], axis=1) for a, b in zip(hr, rec)]
    return np.concatenate(rows, axis=0)


def first_val_images(urls: list[str], n: int, pairs: bool = False) -> dict[str, torch.Tensor]:
    return next(iter(eval_loader(urls, decode=decode_pair if pairs else decode_hr, batch_size=n)))


# --------------------------------------------------------------------------------------
# The two modes
# --------------------------------------------------------------------------------------
def adopt_pretrained(cfg: VQVAESection, params: Params, shards: Path, out: Path) -> dict[str, float]:
    """Write ``model.pt`` from official weights and score them on the val split."""
    path = Path(cfg.pretrained)
    try:
        vae = load_official(path, cfg.model)
    except ValueError as err:
        raise StageError(
            f"vqvae.pretrained: {err}. vqvae.model must describe the file (VAR's "
            "vae_ch160v4096z32.pth: ch 160, ch_mult [1, 1, 2, 2, 4], vocab_size 4096, z_channels 32)"
        ) from None
    fp = fingerprint("train_vqvae", params, PARAMS, [shards, path])
    if not init_distributed().is_main:  # started under torchrun: rank 0 does it all
        cleanup()
        return {}
    print(f"train_vqvae: adopting official weights {path} (no training)", file=sys.stderr)
    val_urls = shard_urls(shards, "val")
    val = validate(vae, val_urls)
    save_model_file(
        out / "model.pt", kind="vqvae", config=vae.model_config(), state_dict=vae.state_dict(),
        extra={"target": "hr", "pretrained": str(path)}, step=0, fingerprint=fp,
    )  # fmt: skip
    metrics = {"step": 0, "pretrained": str(path), "train": {}, "val": val}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    # The DAG declares ckpt/ and plots/ for this stage: present in both modes, plots from this run only.
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    for old in (out / "plots").glob("*.tsv"):
        old.unlink()
    PlotWriter(out / "plots").append(0, {f"val/{k}": v for k, v in val.items()})
    run = init_wandb("train_vqvae", stage_param_values(params, PARAMS), out_dir=out.parent)
    run.summary_update({f"final/{k}": v for k, v in val.items()} | {"pretrained": str(path)})
    grid = recon_grid(SRTokenizer(vae), first_val_images(val_urls, NUM_VAL_IMAGES))
    run.log_images("val/reconstructions", [grid])
    run.finish()
    cleanup()
    return val


def val_lpips(device: torch.device) -> LPIPS | None:
    """LPIPS for the val metric ``rec_lpips``: None (one line printed) when its weights are absent."""
    try:
        return lpips_module(device)
    except WeightsMissing as err:
        print0(f"train_vqvae: val rec_lpips skipped: {err}")
        return None


def load_frozen_base(path: Path, shards: Path, device: torch.device) -> tuple[BaseSR, dict[str, Any]]:
    """The regression base of the residual target (runs/base/model.pt), checked against the shards."""
    entry = load_model_file(path, kind="base")
    stats = load_shard_stats(shards)
    extra = entry["extra"]
    if int(extra["scale"]) != int(stats["scale"]) or int(extra["hr_size"]) != int(stats["hr_size"]):
        raise StageError(
            f"{path}: trained for x{extra['scale']} on {extra['hr_size']} px crops, but {shards} holds "
            f"x{stats['scale']} / {stats['hr_size']} px: rerun train_base"
        )
    return load_base(entry, device), entry


def train(cfg: VQVAESection, params: Params, shards: Path, out: Path, base_path: Path) -> dict[str, float]:
    tcfg = cfg.train
    res = params.resources.train_vqvae  # loader workers, compile, accum: the machine's, not fingerprinted
    dist = init_distributed()
    torch.manual_seed(params.seed)  # identical initial weights on every rank
    vae = VQVAE(cfg.model)
    train_urls, val_urls = shard_urls(shards, "train"), shard_urls(shards, "val")
    mb = micro_batch_size(tcfg, dist.world_size, res.accum)
    residual = cfg.target == "residual"

    base, extra, inputs = None, {"target": "hr"}, [shards]
    sigma = 1.0
    if residual:
        base, base_file = load_frozen_base(base_path, shards, dist.device)
        sigma = residual_sigma(base, train_urls, dist.device)
        extra = {"target": "residual", "sigma": sigma, "base": tokenizer_base_entry(base_file)}
        inputs = [shards, base_path]
        print0(f"train_vqvae: residual target, sigma = {sigma:.4f} (RMS of HR - base(LR) in [-1, 1] units)")
    tok = SRTokenizer(vae, base, sigma)  # the live VQVAE: to_x/from_x use only base and sigma
    if cfg.model.linear_path or cfg.kmeans_init:  # data-driven starts (a resumed run overwrites them)
        x0 = first_inputs(tok, train_urls, INIT_SAMPLES, dist.device)
        if cfg.model.linear_path:
            vae.init_linear_path(x0.cpu())
        if cfg.kmeans_init:
            gen = torch.Generator().manual_seed(params.seed)
            mse = vae.quantize.kmeans_init(vae.img_to_f(x0.cpu()).detach(), gen)
            print0(f"train_vqvae: codebook from k-means on {len(x0)} crops (quantization mse {mse:.4f})")

    # vqvae.perceptual_weight > 0 needs the LPIPS weights (an error naming the package if absent).
    lpips = lpips_module(dist.device) if cfg.perceptual_weight > 0 else val_lpips(dist.device)
    last_batch: dict[str, torch.Tensor] = {}

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():  # one base forward per micro-batch; the prior is kept for LPIPS only
            prior = tok.prior(batch["lr"]) if residual else None
            x = tok.to_x(batch["hr"], None, prior)
            if cfg.perceptual_weight == 0:
                prior = None
        if cfg.augment:  # the same flips / RGB order / negation of input and prior
            gen_state = torch.get_rng_state()
            x = augment(x)
            if prior is not None:
                torch.set_rng_state(gen_state)
                prior = augment(prior)
        last_batch["x"] = x  # dead codes restart from the step's last micro-batch
        to_image = (lambda v: (prior + sigma * v).clamp(-1, 1)) if prior is not None else None
        l1_weight = 0.0 if residual else 1.0
        weight = cfg.perceptual_weight
        return vqvae_loss(model, {"x": x}, lpips, weight, to_image, l1_weight, cfg.token_dropout)

    def on_step(step: int, model: torch.nn.Module) -> dict[str, float] | None:
        if not cfg.restart_dead_codes or step % cfg.restart_every:
            return None
        gen = torch.Generator(device=last_batch["x"].device).manual_seed(params.seed * 1_000_003 + step)
        restarted = unwrap(model).restart_dead_codes(last_batch["x"], gen, RESTART_THRESHOLD)
        return {"restarted_codes": float(restarted.numel())}

    samples = first_val_images(val_urls, NUM_VAL_IMAGES, residual) if dist.is_main else None

    def on_val(step: int, ema_model: torch.nn.Module, run: WandbRun) -> None:
        if run.enabled:
            ema_tok = SRTokenizer(unwrap(ema_model), base, sigma)
            grid = recon_grid(ema_tok, {k: v.to(dist.device) for k, v in samples.items()})
            run.log_images("val/reconstructions", [grid], captions=["input | reconstruction"], step=step)

    validator = Validator(val_urls, vae.SN, vae.V, max(mb, VAL_BATCH), dist, lpips, base, sigma)
    trainer = Trainer(
        kind="vqvae",
        model=vae,
        model_config=vae.model_config(),
        cfg=tcfg,
        compile=res.compile,
        accum=res.accum,
        max_requeues=res.max_requeues,
        loss_fn=loss_fn,
        make_train_iter=rank_train_iters(
            train_urls, decode_pair if residual else decode_hr, mb, params.seed, dist, res.workers
        ),
        out_dir=out,
        fingerprint=fingerprint("train_vqvae", params, PARAMS, inputs),
        seed=params.seed,
        val_fn=validator,
        make_val_iter=validator.make_iter,
        on_step=on_step,
        on_val=on_val,
        dist_info=dist,
        model_extra=extra,
    )
    result = trainer.fit()
    cleanup()
    return result.val


def tokenizer_base_entry(base_file: dict[str, Any]) -> dict[str, Any]:
    """What a residual tokenizer's model.pt keeps of its base (enough to rebuild it)."""
    return {"config": base_file["config"], "state_dict": base_file["state_dict"], "extra": base_file["extra"]}


def run(args: argparse.Namespace, params: Params) -> dict[str, float]:
    cfg = params.vqvae
    shards, out = Path(args.shards), Path(args.out)
    uses = [shards_artifact(shards)]
    if cfg.target == "residual" and not cfg.pretrained:
        uses.append(model_artifact("base", args.base))
    # The run is the engine's when training, adopt_pretrained's otherwise: both take these.
    declare_artifacts(uses=uses, logs=[model_artifact("vqvae", out / "model.pt")])
    if cfg.pretrained:
        val = adopt_pretrained(cfg, params, shards, out)
    else:
        val = train(cfg, params, shards, out, Path(args.base))
    if val:
        usage = "  ".join(f"{val[f'code_usage_s{si}']:.2f}" for si in range(len(cfg.model.patch_nums)))
        print0(f"train_vqvae: val rec_psnr {val['rec_psnr']:.2f} dB, code usage per scale {usage} -> {out}")
    return val


def _add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shards", default=str(SHARDS_DIR), help="image shards (default: data/shards)")
    ap.add_argument("--out", default=str(RUNS_DIR / "vqvae"), help="run folder (default: runs/vqvae)")
    ap.add_argument(
        "--base", default=str(RUNS_DIR / "base" / "model.pt"), help="regression base (vqvae.target: residual)"
    )


def main(argv: list[str] | None = None) -> int:
    return stage_main("train_vqvae", __doc__, run, argv, _add_args)


if __name__ == "__main__":
    sys.exit(main())
