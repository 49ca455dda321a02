"""Stage `evaluate`: super-resolve the val split and benchmark folders; PSNR/SSIM on Y.

    python -m arsr.stages.evaluate                       # the DAG stage (reads `eval`)
    arsr evaluate --hr-dir DIR --scale 4 --methods bicubic,srvar,mar --json OUT.json

Rows: ``bicubic``, ``vqvae_rec`` (the VQVAE's reconstruction of HR: the ceiling of token
models), then one per SR family of ``arsr.infer.registry.FAMILIES`` (``srvar``, ``mar``), each
sampling with its ``eval.<family>`` settings. Protocol ``rgb-uint8`` (default): every row starts from the
same RGB uint8 LR image and is scored on rounded Y with ``scale`` pixels shaved;
``y-float`` changes only the bicubic row (VDSR/EDSR's double-precision Y path).
Whole images of any size go through the tiling of ``arsr.infer.tiling``.
DAG outputs: ``eval/metrics.json``, ``eval/per_image.csv``, ``eval/samples/*.png``.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from arsr.config import EvalConfig, Params, stage_param_values, tool_eval_config
from arsr.data.imresize import imresize, modcrop
from arsr.data.loader import load_shard_stats
from arsr.data.shards import decode_png, iter_tar_samples, shard_urls
from arsr.data.sources import IMAGE_SUFFIXES, ImageError, SourceImage, load_rgb
from arsr.eval.metrics import score_bicubic, score_y
from arsr.infer.registry import FAMILIES, add_sampling_args, load_upscaler, sampling_overrides
from arsr.infer.tiling import upscale_images
from arsr.infer.tokenizer import VQVAEReconstructor, load_vqvae_file
from arsr.io import atomic_write_bytes, write_json
from arsr.stages.common import (
    EVAL_DIR,
    RUNS_DIR,
    SHARDS_DIR,
    USER_ERRORS,
    StageError,
    default_device,
    stage_main,
)

PARAMS = ("eval",)
METHODS = ("bicubic", "vqvae_rec", *FAMILIES)


@dataclass
class EvalImage:
    dataset: str
    name: str
    hr: np.ndarray  # uint8 [H, W, 3] (or [H, W] grey), modcropped to the scale
    lr: np.ndarray  # uint8, what every method starts from


def val_images(shard_dir: Path, limit: int) -> list[EvalImage]:
    """The val split's HR/LR crops, in shard order (the first ``limit``; 0 = all)."""
    out = []
    for sample in iter_tar_samples(shard_urls(shard_dir, "val")):
        out.append(
            EvalImage("val", sample["__key__"], decode_png(sample["hr.png"]), decode_png(sample["lr.png"]))
        )
        if limit and len(out) >= limit:
            break
    return out


def folder_images(folder: Path, scale: int) -> list[EvalImage]:
    """HR images of a benchmark folder (``HR/`` if present); LR from ``LR_bicubic/X{s}`` when it exists."""
    hr_dir = folder / "HR" if (folder / "HR").is_dir() else folder
    files = sorted(p for p in hr_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise StageError(f"benchmark folder {folder}: no HR images")
    images = []
    for path in files:
        try:
            hr, _ = load_rgb(SourceImage("b", path.name, path, 0), 10**9)
        except ImageError as err:
            raise StageError(f"{path}: {err}") from None
        grey = Image.open(path).mode in ("L", "I", "I;16")
        hr = modcrop(hr[..., 0] if grey else hr, scale)
        official = folder / "LR_bicubic" / f"X{scale}" / f"{path.stem}x{scale}.png"
        lr = np.asarray(Image.open(official)) if official.is_file() else imresize(hr, 1.0 / scale)
        images.append(EvalImage(folder.name, path.stem, hr, lr))
    return images


def _rgb(img: np.ndarray) -> np.ndarray:
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img


def super_resolve(method: str, images: list[EvalImage], upscalers: dict, cfg: EvalConfig) -> list[np.ndarray]:
    """SR outputs of one method for all images (their tiles batched together)."""
    if method == "bicubic":
        return [imresize(img.lr, output_shape=img.hr.shape[:2]) for img in images]
    srcs = [_rgb(img.hr) if method == "vqvae_rec" else _rgb(img.lr) for img in images]
    up, ov = upscalers[method], cfg.tile_overlap
    srs = upscale_images(srcs, up, overlap_hr=ov, batch_size=cfg.batch_size, seed=cfg.seed, desc=method)
    return [sr[..., 0] if img.hr.ndim == 2 else sr for sr, img in zip(srs, images)]  # grey stays grey


def score(method: str, img: EvalImage, sr: np.ndarray, scale: int, protocol: str) -> tuple[float, float]:
    if method == "bicubic" and protocol == "y-float":
        return score_bicubic(img.hr, scale, "y-float")
    return score_y(sr, img.hr, scale)


def sample_grid(img: EvalImage, outputs: dict[str, np.ndarray], scale: int) -> np.ndarray:
    """LR (nearest) | bicubic | each SR family | HR side by side (columns present are those computed)."""
    lr_up = _rgb(img.lr).repeat(scale, 0).repeat(scale, 1)[: img.hr.shape[0], : img.hr.shape[1]]
    methods = ("bicubic", *FAMILIES)
    cols = [lr_up] + [_rgb(outputs[m]) for m in methods if m in outputs] + [_rgb(img.hr)]
    return np.concatenate(cols, axis=1)


def evaluate(
    images: list[EvalImage],
    methods: list[str],
    upscalers: dict,
    scale: int,
    cfg: EvalConfig,
    samples_dir: Path | None = None,
    num_samples: int = 0,
) -> tuple[pd.DataFrame, list]:
    outputs = {m: super_resolve(m, images, upscalers, cfg) for m in methods}
    rows, grids = [], []
    for i, img in enumerate(images):
        for m in methods:
            p, s = score(m, img, outputs[m][i], scale, cfg.protocol)
            rows.append({"dataset": img.dataset, "image": img.name, "method": m, "psnr": p, "ssim": s})
        if samples_dir is not None and i < num_samples:
            grid = sample_grid(img, {m: outputs[m][i] for m in methods}, scale)
            buf = io.BytesIO()
            Image.fromarray(grid).save(buf, format="PNG")
            atomic_write_bytes(samples_dir / f"{img.dataset}_{img.name}.png", buf.getvalue())
            grids.append((f"{img.dataset}/{img.name}", grid))
    return pd.DataFrame(rows, columns=["dataset", "image", "method", "psnr", "ssim"]), grids


def summarize(per_image: pd.DataFrame) -> dict:
    """{dataset: {method: {psnr, ssim, n}}} means, rounded for stable diffs."""
    out: dict = {}
    for (dataset, method), g in per_image.groupby(["dataset", "method"], sort=True):
        out.setdefault(dataset, {})[method] = {
            "psnr": round(float(g.psnr.mean()), 4),
            "ssim": round(float(g.ssim.mean()), 5),
            "n": int(len(g)),
        }
    return out


def load_upscalers(methods: list[str], model_dir: Path, cfg: EvalConfig) -> dict:
    """The models of ``methods`` (bicubic needs none), on the GPU when there is one; each SR model
    brings its own tokenizer and data facts (model.pt), and samples with ``cfg.<family>``."""
    ups, device = {}, default_device()
    for m in methods:
        if m == "vqvae_rec":
            ups[m] = VQVAEReconstructor(load_vqvae_file(model_dir / "vqvae" / "model.pt", device)[1])
        elif m in FAMILIES:
            ups[m] = load_upscaler(model_dir / m / "model.pt", cfg, device)
    return ups


def run_dag(args: argparse.Namespace, params: Params) -> None:
    t0 = time.time()
    cfg = params.eval
    scale = int(load_shard_stats(args.shards)["scale"])
    model_dir = Path(args.runs)
    methods = list(METHODS)
    upscalers = load_upscalers(methods, model_dir, cfg)
    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for old in (out / "samples").glob("*.png"):
        old.unlink()
    images = val_images(Path(args.shards), cfg.max_val_images)
    per_image, grids = evaluate(images, methods, upscalers, scale, cfg, out / "samples", cfg.num_samples)
    for folder in cfg.benchmarks:
        bench_rows, _ = evaluate(folder_images(Path(folder), scale), methods, upscalers, scale, cfg)
        per_image = pd.concat([per_image, bench_rows], ignore_index=True)
    metrics = summarize(per_image)
    atomic_write_bytes(out / "per_image.csv", per_image.to_csv(index=False, float_format="%.5f").encode())
    write_json(out / "metrics.json", metrics)
    write_json(
        model_dir / "evaluate" / "timing.json", {"seconds": round(time.time() - t0, 2), "images": len(images)}
    )
    _log_wandb(params, per_image, metrics, grids, model_dir)
    for dataset, rows in metrics.items():
        print(
            f"evaluate [{dataset}]: "
            + "  ".join(f"{m} {v['psnr']:.2f}/{v['ssim']:.4f}" for m, v in rows.items())
        )


def _log_wandb(params: Params, per_image: pd.DataFrame, metrics: dict, grids: list, runs_dir: Path) -> None:
    from arsr.train.logging import init_wandb

    run = init_wandb("evaluate", stage_param_values(params, PARAMS), out_dir=runs_dir)
    flat = {
        f"{d}/{m}/{k}": v[k] for d, rows in metrics.items() for m, v in rows.items() for k in ("psnr", "ssim")
    }
    run.log(flat)
    run.summary_update(flat)
    run.log_table("per_image", list(per_image.columns), per_image.values.tolist())
    if grids:
        run.log_images("samples", [g for _, g in grids], captions=[c for c, _ in grids])
    run.finish()


def run_standalone(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise StageError(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    cfg = tool_eval_config(args.params, sampling_overrides(args), args.protocol)
    upscalers = load_upscalers(methods, Path(args.model_dir), cfg)
    per_image, _ = evaluate(folder_images(Path(args.hr_dir), args.scale), methods, upscalers, args.scale, cfg)
    result = {
        "scale": args.scale,
        "protocol": cfg.protocol,
        "mean": {
            m: {"psnr": float(g.psnr.mean()), "ssim": float(g.ssim.mean())}
            for m, g in per_image.groupby("method")
        },
        "per_image": {
            m: {r.image: {"psnr": r.psnr, "ssim": r.ssim} for r in g.itertuples()}
            for m, g in per_image.groupby("method")
        },
    }
    write_json(args.json, result)
    for m, v in result["mean"].items():
        print(f"{m}: PSNR {v['psnr']:.4f} dB  SSIM {v['ssim']:.5f}  ({cfg.protocol}, x{args.scale})")
    return 0


def _add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shards", default=str(SHARDS_DIR))
    ap.add_argument("--runs", default=str(RUNS_DIR), help="folder with vqvae/, srvar/, mar/ model.pt")
    ap.add_argument("--out", default=str(EVAL_DIR))
    ap.add_argument("--hr-dir", help="standalone: score this folder (HR/ and optional LR_bicubic/X{s}/)")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--methods", default="bicubic")
    ap.add_argument("--protocol", choices=["rgb-uint8", "y-float"], help="default: params' eval.protocol")
    ap.add_argument("--model-dir", default=str(RUNS_DIR))
    ap.add_argument("--json", help="standalone: where to write the scores")
    add_sampling_args(ap)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--hr-dir" or a.startswith("--hr-dir=") for a in argv):  # standalone: no params.yaml needed
        ap = argparse.ArgumentParser(prog="arsr evaluate")
        _add_args(ap)
        ap.add_argument("--params", default="params.yaml")
        args = ap.parse_args(argv)
        if not args.json:
            ap.error("--json OUT is required with --hr-dir")
        try:
            return run_standalone(args)
        except USER_ERRORS as err:
            print(f"arsr evaluate: error: {err}", file=sys.stderr)
            return 2
    return stage_main("evaluate", __doc__, run_dag, argv, _add_args)


if __name__ == "__main__":
    sys.exit(main())
