"""Stage `evaluate`: super-resolve the val split and benchmark folders; score every method with
the metrics of ``arsr.eval.registry`` (PSNR/SSIM on Y, PSNR on RGB, LPIPS, DISTS).

    python -m arsr.stages.evaluate                       # the DAG stage (reads `eval`)
    arsr evaluate --hr-dir DIR --scale 4 --methods bicubic,srvar,mar --metrics psnr,ssim,lpips,dists

Rows: ``bicubic``, ``vqvae_rec`` (the VQVAE's reconstruction of HR: the ceiling of token
models), then one per SR family of ``arsr.infer.registry.FAMILIES`` (``base``, the regression
baseline; ``srvar``, ``mar``, each sampling with its ``eval.<family>`` settings).
Protocol ``rgb-uint8`` (default): every row starts from the same RGB uint8 LR image; each metric
scores the uint8 outputs in its own convention (the registry's);
``y-float`` changes only the bicubic row's PSNR/SSIM (VDSR/EDSR's double-precision Y path).
A metric whose weights are not installed is skipped with one line naming the package.
Whole images of any size go through the tiling of ``arsr.infer.tiling``.
DAG outputs: ``eval/metrics.json``, ``eval/per_image.csv``, ``eval/samples/*.png`` (labelled grids of
images from different photos); W&B: the means, a per-image table with image columns, the grids.

Standalone (``--hr-dir``, in any spelling argparse accepts) writes none of those: it prints the table
and writes ``--json`` if asked. Its settings come by the rule ``arsr upscale`` follows too
(``arsr.stages.common``'s ``tool_settings``): ``--params``' eval section, then ``--protocol``,
``--seed``, ``--<family>-<field>``; the ``--json`` records them. Options of one mode are refused in
the other (the DAG stage reads params.yaml only), so none is silently ignored.
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

from arsr.config import EvalConfig, Params, stage_param_values
from arsr.data.imresize import imresize, modcrop
from arsr.data.sources import IMAGE_SUFFIXES, ImageError, SourceImage, load_rgb
from arsr.eval.grids import as_rgb, labelled_row
from arsr.eval.metrics import score_bicubic
from arsr.eval.registry import METRICS, Metric, runnable, select
from arsr.infer.registry import FAMILIES, add_sampling_args, load_upscaler, method_title, sampling_overrides
from arsr.infer.tiling import upscale_images
from arsr.infer.tokenizer import VQVAEReconstructor, load_tokenizer_file
from arsr.io import atomic_write_bytes, write_json
from arsr.provenance import machine_info
from arsr.stages.common import (
    EVAL_DIR,
    RUNS_DIR,
    SHARDS_DIR,
    StageError,
    add_tool_args,
    default_device,
    eval_artifact,
    model_artifact,
    report_errors,
    run_stage,
    settings_summary,
    shards_artifact,
    stage_parser,
    tool_batch_size,
    tool_settings,
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
    from arsr.data.shards import decode_png, iter_tar_samples, shard_urls  # DAG only (WebDataset)

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
    if folder.name == "HR" and not (folder / "HR").is_dir():
        folder = folder.parent  # given Set5/HR: the benchmark is Set5, its LR in Set5/LR_bicubic
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


def super_resolve(
    method: str, images: list[EvalImage], upscalers: dict, cfg: EvalConfig, batch_size: int
) -> list[np.ndarray]:
    """SR outputs of one method for all images (their tiles ``batch_size`` at a time: each tile has
    its own seed, so the outputs do not depend on it)."""
    if method == "bicubic":
        return [imresize(img.lr, output_shape=img.hr.shape[:2]) for img in images]
    srcs = [as_rgb(img.hr) if method == "vqvae_rec" else as_rgb(img.lr) for img in images]
    up, ov = upscalers[method], cfg.tile_overlap
    srs = upscale_images(srcs, up, overlap_hr=ov, batch_size=batch_size, seed=cfg.seed, desc=method)
    return [sr[..., 0] if img.hr.ndim == 2 else sr for sr, img in zip(srs, images)]  # grey stays grey


def score_method(
    method: str,
    images: list[EvalImage],
    srs: list[np.ndarray],
    metrics: list[Metric],
    scale: int,
    protocol: str,
    device: str,
) -> dict[str, list[float]]:
    """{metric: per-image scores} of one method. Under ``y-float`` the bicubic row's PSNR/SSIM come
    from VDSR/EDSR's double-precision Y path; every other score from the uint8 outputs."""
    hrs = [img.hr for img in images]
    out = {m.name: m.fn(srs, hrs, scale, device) for m in metrics}
    if method == "bicubic" and protocol == "y-float":
        yf = [score_bicubic(img.hr, scale, "y-float") for img in images]
        for i, name in enumerate(("psnr", "ssim")):
            if name in out:
                out[name] = [s[i] for s in yf]
    return out  # fmt: skip


def grid_columns(img: EvalImage, outputs: dict[str, np.ndarray], scale: int) -> list[tuple[str, np.ndarray]]:
    """(label, image) columns: LR (nearest) | bicubic | each SR family | HR (those computed)."""
    lr_up = as_rgb(img.lr).repeat(scale, 0).repeat(scale, 1)[: img.hr.shape[0], : img.hr.shape[1]]
    methods = ("bicubic", *FAMILIES)
    cols = [("LR", lr_up)] + [(method_title(m), outputs[m]) for m in methods if m in outputs]
    return cols + [("HR", img.hr)]


def sample_indices(images: list[EvalImage], n: int) -> list[int]:
    """Up to ``n`` images from different source photos (a crop key is ``<photo>_<index>``), first
    crops first; when there are fewer photos than ``n``, the rest are spread evenly."""
    seen, picks = set(), []
    for i, img in enumerate(images):
        photo = img.name.rsplit("_", 1)[0]
        if photo not in seen:
            seen.add(photo)
            picks.append(i)
    if len(picks) >= n:
        return [picks[int(j)] for j in np.linspace(0, len(picks) - 1, n).round()] if n else []
    rest = [i for i in np.linspace(0, len(images) - 1, n).round().astype(int) if i not in picks]
    return sorted(picks + rest[: n - len(picks)])


def evaluate(
    images: list[EvalImage],
    methods: list[str],
    upscalers: dict,
    scale: int,
    cfg: EvalConfig,
    metrics: list[Metric],
    device: str = "cpu",
    batch_size: int = 16,
) -> tuple[pd.DataFrame, dict[str, list[np.ndarray]]]:
    """Per-image scores (columns dataset, image, method, one per metric) and each method's outputs."""
    outputs = {m: super_resolve(m, images, upscalers, cfg, batch_size) for m in methods}
    frames = []
    for m in methods:
        scores = score_method(m, images, outputs[m], metrics, scale, cfg.protocol, device)
        frames.append(
            pd.DataFrame(
                {
                    "dataset": [i.dataset for i in images],
                    "image": [i.name for i in images],
                    "method": m,
                    **scores,
                }
            )
        )
    cols = ["dataset", "image", "method", *(m.name for m in metrics)]
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols))[cols], outputs


def write_samples(images: list[EvalImage], outputs: dict, scale: int, n: int, out_dir: Path) -> list:
    """Labelled, enlarged grids of ``n`` images from different photos -> ``out_dir/<dataset>_<name>.png``."""
    grids = []
    for i in sample_indices(images, n):
        img = images[i]
        grid = labelled_row(grid_columns(img, {m: o[i] for m, o in outputs.items()}, scale))
        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG")
        atomic_write_bytes(out_dir / f"{img.dataset}_{img.name}.png", buf.getvalue())
        grids.append((f"{img.dataset}/{img.name}", grid))
    return grids


def summarize(per_image: pd.DataFrame, metrics: list[Metric]) -> dict:
    """{dataset: {method: {metric: mean, n}}}, rounded (each metric's digits) for stable diffs."""
    out: dict = {}
    for (dataset, method), g in per_image.groupby(["dataset", "method"], sort=False):
        row = {m.name: round(float(g[m.name].mean()), m.digits) for m in metrics}
        out.setdefault(dataset, {})[method] = {**row, "n": int(len(g))}
    return out


def load_upscalers(methods: list[str], model_dir: Path, cfg: EvalConfig) -> dict:
    """The models of ``methods`` (bicubic needs none), on the GPU when there is one; each SR model
    brings its own tokenizer and data facts (model.pt), and samples with ``cfg.<family>``."""
    ups, device = {}, default_device()
    for m in methods:
        if m == "vqvae_rec":
            ups[m] = VQVAEReconstructor(load_tokenizer_file(model_dir / "vqvae" / "model.pt", device)[1])
        elif m in FAMILIES:
            ups[m] = load_upscaler(model_dir / m / "model.pt", cfg, device)
    return ups


def chosen_metrics(names: list[str]) -> list[Metric]:
    """The registry's metrics of ``names`` that can run; one line printed per metric skipped."""
    try:
        metrics, skipped = runnable(select(names))
    except ValueError as err:
        raise StageError(f"metrics: {err}") from None
    for line in skipped:
        print(f"evaluate: {line}", file=sys.stderr)
    return metrics


def print_table(metrics_json: dict, metrics: list[Metric], header: str = "") -> None:
    for dataset, rows in metrics_json.items():
        table = pd.DataFrame(
            {f"{m.name} {m.arrow}": [rows[k][m.name] for k in rows] for m in metrics}, index=list(rows)
        )
        print(f"evaluate [{dataset}{header}]:\n{table.to_string(float_format=lambda v: f'{v:.4f}')}")


def run_dag(args: argparse.Namespace, params: Params) -> None:
    # The shard readers are imported here: they need WebDataset ([pipeline]), --hr-dir does not.
    from arsr.data.loader import load_shard_stats

    t0 = time.time()
    cfg = params.eval
    scale = int(load_shard_stats(args.shards)["scale"])
    model_dir = Path(args.runs)
    methods, metrics, device = list(METHODS), chosen_metrics(cfg.metrics), default_device()
    upscalers = load_upscalers(methods, model_dir, cfg)
    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for old in (out / "samples").glob("*.png"):
        old.unlink()
    images = val_images(Path(args.shards), cfg.max_val_images)
    batch = params.resources.evaluate.batch_size
    per_image, outputs = evaluate(images, methods, upscalers, scale, cfg, metrics, str(device), batch)
    grids = write_samples(images, outputs, scale, cfg.num_samples, out / "samples")
    tables = [(images, outputs)]
    for folder in cfg.benchmarks:
        bench = folder_images(Path(folder), scale)
        bench_rows, bench_out = evaluate(bench, methods, upscalers, scale, cfg, metrics, str(device), batch)
        per_image = pd.concat([per_image, bench_rows], ignore_index=True)
        tables.append((bench, bench_out))
    summary = summarize(per_image, metrics)
    atomic_write_bytes(out / "per_image.csv", per_image.to_csv(index=False, float_format="%.5f").encode())
    write_json(out / "metrics.json", summary)
    write_json(
        model_dir / "evaluate" / "timing.json",
        {"seconds": round(time.time() - t0, 2), "images": len(images), "machine": machine_info()},
    )
    lineage = (Path(args.shards), out)
    _log_wandb(params, per_image, summary, metrics, grids, tables, scale, model_dir, lineage)
    print_table(summary, metrics)


def wandb_rows(
    images: list[EvalImage], outputs: dict, per_image: pd.DataFrame, metrics: list[Metric], scale: int
) -> tuple[list[str], list[list]]:
    """One row per image: dataset, image, LR | bicubic | each model | HR images, then every
    ``<method>/<metric>``. Image cells are uint8 arrays (WandbRun.log_table makes them wandb.Images)."""
    methods = list(outputs)
    image_cols = [label for label, _ in grid_columns(images[0], {m: outputs[m][0] for m in methods}, scale)]
    score_cols = [f"{m}/{k.name}" for m in methods for k in metrics]
    scores = per_image.set_index(["dataset", "image", "method"])
    rows = []
    for i, img in enumerate(images):
        cells = [a for _, a in grid_columns(img, {m: outputs[m][i] for m in methods}, scale)]
        vals = [float(scores.loc[(img.dataset, img.name, m), k.name]) for m in methods for k in metrics]
        rows.append([img.dataset, img.name, *cells, *vals])
    return ["dataset", "image", *image_cols, *score_cols], rows


def _log_wandb(
    params: Params, per_image: pd.DataFrame, summary: dict, metrics: list[Metric], grids: list,
    tables: list, scale: int, runs_dir: Path, lineage: tuple[Path, Path],
) -> None:  # fmt: skip
    """``lineage``: (the image shards, the eval folder). The run uses the shards and every model
    (runs_dir/<name>/model.pt) and logs the eval outputs."""
    from arsr.train.logging import init_wandb

    run = init_wandb("evaluate", stage_param_values(params, PARAMS), out_dir=runs_dir)
    shards, out = lineage
    run.use_artifact(*shards_artifact(shards))
    for kind in ("vqvae", *FAMILIES):
        run.use_artifact(*model_artifact(kind, runs_dir / kind / "model.pt"))
    flat = {
        f"{d}/{m}/{k.name}": v[k.name]
        for d, rows in summary.items()
        for m, v in rows.items()
        for k in metrics
    }
    run.log(flat)
    run.summary_update(flat)
    columns, rows = [], []
    for images, outputs in tables:
        if images:
            columns, part = wandb_rows(images, outputs, per_image, metrics, scale)
            rows += part
    if rows:
        run.log_table("per_image", columns, rows)
    if grids:
        run.log_images("samples", [g for _, g in grids], captions=[c for c, _ in grids])
    run.log_artifact(*eval_artifact(out))
    run.finish()


def run_standalone(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise StageError(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    cfg = tool_settings("evaluate", args, sampling_overrides(args))
    names = [n.strip() for n in args.metrics.split(",") if n.strip()] if args.metrics else cfg.metrics
    metrics, device = chosen_metrics(names), default_device()
    upscalers = load_upscalers(methods, Path(args.model_dir), cfg)
    images = folder_images(Path(args.hr_dir), args.scale)
    batch = tool_batch_size(args)
    per_image, _ = evaluate(images, methods, upscalers, args.scale, cfg, metrics, str(device), batch)
    summary = summarize(per_image, metrics)
    dataset = images[0].dataset
    result = {
        "scale": args.scale,
        "protocol": cfg.protocol,
        "metrics": [m.name for m in metrics],
        "settings": settings_summary(cfg),  # what the SR rows were sampled with
        "mean": {
            m: {k: float(g[k].mean()) for k in (x.name for x in metrics)}
            for m, g in per_image.groupby("method")
        },
        "per_image": {
            m: {r["image"]: {k.name: float(r[k.name]) for k in metrics} for _, r in g.iterrows()}
            for m, g in per_image.groupby("method")
        },
    }
    if args.json:
        write_json(args.json, result)
    print_table({dataset: summary[dataset]}, metrics, f", {cfg.protocol}, x{args.scale}")
    return 0


# Each mode's options default to None so that main can tell a given one from an absent one.
DAG_DEFAULTS = {"shards": str(SHARDS_DIR), "runs": str(RUNS_DIR), "out": str(EVAL_DIR)}
TOOL_DEFAULTS = {"scale": 4, "methods": "bicubic", "model_dir": str(RUNS_DIR)}


def _add_args(ap: argparse.ArgumentParser) -> None:
    dag = ap.add_argument_group("the DAG stage (without --hr-dir)")
    dag.add_argument("--shards", help=f"default: {SHARDS_DIR}")
    dag.add_argument("--runs", help=f"folder with vqvae/, srvar/, mar/ model.pt (default: {RUNS_DIR})")
    dag.add_argument("--out", help=f"default: {EVAL_DIR}")
    tool = ap.add_argument_group("standalone (--hr-dir); writes no DAG output")
    tool.add_argument("--hr-dir", help="score this folder (HR/ and optional LR_bicubic/X{s}/)")
    tool.add_argument("--scale", type=int, help="default: 4")
    tool.add_argument("--methods", help=f"comma-separated, from {','.join(METHODS)} (default: bicubic)")
    tool.add_argument("--protocol", choices=["rgb-uint8", "y-float"], help="default: params' eval.protocol")
    tool.add_argument("--model-dir", help=f"folder with <method>/model.pt (default: {RUNS_DIR})")
    tool.add_argument("--json", help="also write the scores (means and per image) and settings to this file")
    tool.add_argument(
        "--metrics", help=f"comma-separated, from {','.join(METRICS)} (default: params' eval.metrics)"
    )
    add_tool_args(tool)
    add_sampling_args(ap)


def _given(args: argparse.Namespace, dests: list[str]) -> list[str]:
    return [f"--{d.replace('_', '-')}" for d in dests if getattr(args, d) is not None]


def main(argv: list[str] | None = None) -> int:
    ap = stage_parser("evaluate", __doc__, _add_args)
    args = ap.parse_args(argv)
    if args.hr_dir is None:
        sampling = [f"{f}_{k}" for f, o in sampling_overrides(args).items() for k in o]
        extra = _given(args, [*TOOL_DEFAULTS, "protocol", "json", "metrics", "seed", "batch_size"]) + [
            f"--{d.replace('_', '-')}" for d in sampling
        ]
        if extra:
            ap.error(f"{', '.join(extra)}: only with --hr-dir (the DAG stage reads params.yaml's eval)")
        for dest, default in DAG_DEFAULTS.items():
            setattr(args, dest, getattr(args, dest) or default)
        return run_stage("evaluate", run_dag, args)
    dag_only = _given(args, list(DAG_DEFAULTS))
    if dag_only:
        ap.error(f"{', '.join(dag_only)}: not with --hr-dir (standalone mode writes no DAG output)")
    for dest, default in TOOL_DEFAULTS.items():
        setattr(args, dest, default if getattr(args, dest) is None else getattr(args, dest))
    return report_errors("evaluate", lambda: run_standalone(args))


if __name__ == "__main__":
    sys.exit(main())
