"""Stage `shard`: images -> WebDataset tars of HR/LR pairs (DESIGN §3).

    python -m arsr.stages.shard [--params params.yaml] [--out data/shards]

Reads ``seed`` and ``data`` from params.yaml. Writes ``{train,val}-NNNNNN.tar``,
``manifest.parquet`` (one row per sample, plus one per skipped file) and ``stats.json``
(counts, skipped files with reasons, conversions; no timings) under ``--out``, and
``runs/shard/timing.json``. The same inputs and params give byte-identical tars.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from arsr.config import DataConfig, load_params, stage_param_values
from arsr.data.shards import SPLITS, ShardSetWriter, crop_grid, decode_png, make_sample, shard_name
from arsr.data.sources import ImageError, SourceImage, list_sources, load_rgb
from arsr.io import atomic_write_bytes, write_json
from arsr.proc import spawn_pool, usable_cpus
from arsr.progress import progress
from arsr.provenance import machine_info
from arsr.stages.common import RUNS_DIR, SHARDS_DIR, StageError, shards_artifact, stage_main

PARAMS = ("seed", "data")
EXIF_ORIENTATION = 0x0112


class ShardError(StageError):
    """The stage cannot produce a usable data set; the message says why."""


def split_sources(images: list[SourceImage], val_fraction: float, seed: int) -> dict[str, list[SourceImage]]:
    """Train/val split by source image (no image in both), deterministic from ``seed``."""
    if len(images) < 2:
        raise ShardError(f"need at least 2 images for a train/val split, found {len(images)}")
    ordered = sorted(images, key=lambda s: s.ref)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_val = min(len(ordered) - 1, max(1, round(val_fraction * len(ordered))))
    val = {int(i) for i in perm[:n_val]}
    return {
        "train": [s for i, s in enumerate(ordered) if i not in val],
        "val": [s for i, s in enumerate(ordered) if i in val],
    }


def _probe_size(src: SourceImage) -> tuple[int, int] | None:
    """(H, W) after EXIF rotation from the header alone; None if unreadable (decided later)."""
    if src.path is None:
        return load_rgb(src, 0)[0].shape[:2]
    from PIL import Image

    try:
        with Image.open(src.path) as img:
            w, h = img.size
            if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                w, h = h, w
            return h, w
    except Exception:
        return None


def _crop_seed(seed: int, source_id: str) -> int:
    return seed * 1_000_003 + int(source_id.rsplit("-", 1)[-1], 16)


def _process(task: tuple[SourceImage, DataConfig, int]) -> tuple[list[dict], list[str], str | None]:
    """Worker: decode one image and cut its samples. Returns (samples, notes, skip reason)."""
    src, cfg, seed = task
    try:
        rgb, notes = load_rgb(src, cfg.max_image_pixels)
    except ImageError as err:
        return [], [], str(err)
    h, w = rgb.shape[:2]
    if min(h, w) < cfg.hr_size:
        return [], notes, f"smaller than data.hr_size={cfg.hr_size} ({w}x{h})"
    boxes = crop_grid(
        h, w, cfg.hr_size, cfg.crop_stride, cfg.max_crops_per_image, _crop_seed(seed, src.source_id)
    )
    samples = []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        key = f"{src.source_id}_{i:05d}"
        meta = {"source": src.ref, "box": [x0, y0, x1, y1]}
        samples.append(make_sample(key, np.ascontiguousarray(rgb[y0:y1, x0:x1]), cfg.scale, src.label, meta))
    return samples, notes, None


def _example_grid(samples: list[dict], scale: int) -> np.ndarray:
    """[LR (nearest-upscaled) | HR] rows for a quick visual check in W&B."""
    rows = []
    for s in samples:
        hr, lr = decode_png(s["hr.png"]), decode_png(s["lr.png"])
        rows.append(np.concatenate([lr.repeat(scale, 0).repeat(scale, 1), hr], axis=1))
    return np.concatenate(rows, axis=0)


def run_shard(params_path: str = "params.yaml", out_dir: str = "data/shards", runs_dir: str = "runs") -> dict:
    """Build the shards; returns the stats dict written to stats.json."""
    t0 = time.time()
    params = load_params(params_path)
    cfg, seed = params.data, params.seed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    try:
        images, skipped_early, classes = list_sources(cfg.source, cfg.labels)
    except ValueError as err:
        raise ShardError(str(err)) from None
    skipped = [{"source": s.ref, "reason": s.reason} for s in skipped_early]
    if not images:
        raise ShardError(f"data.source {cfg.source!r}: no image files found ({len(skipped)} skipped)")
    splits = split_sources(images, cfg.val_fraction, seed)

    # Shard counts come from a cheap header probe, so samples can stream to disk.
    shard_counts = {}
    for split in SPLITS:
        est = 0
        for src in splits[split]:
            size = _probe_size(src)
            if size and min(size) >= cfg.hr_size:
                n = len(crop_grid(*size, cfg.hr_size, cfg.crop_stride, 0, 0))
                est += min(n, cfg.max_crops_per_image) if cfg.max_crops_per_image else n
        shard_counts[split] = max(cfg.min_shards, math.ceil(est / cfg.samples_per_shard))

    writers = {s: ShardSetWriter(out, s, shard_counts[s]) for s in SPLITS}
    rows, converted, examples = [], [], []
    per_split_images = {s: 0 for s in SPLITS}
    tasks = [(src, split) for split in SPLITS for src in splits[split]]
    committed = False
    try:
        # Workers that die with this process: a killed stage leaves none waiting forever for work.
        # At most one worker per CPU this process may use (the shards do not depend on the count).
        workers = max(1, min(params.resources.shard.workers, len(tasks), usable_cpus()))
        with spawn_pool(workers) as pool:
            results = pool.imap(_process, [(src, cfg, seed) for src, _ in tasks], chunksize=1)
            for (src, split), (samples, notes, reason) in progress(
                zip(tasks, results), total=len(tasks), desc="shard", unit="img"
            ):
                if reason is not None:
                    skipped.append({"source": src.ref, "reason": reason})
                    print(f"shard: skipped {src.ref}: {reason}", file=sys.stderr)
                    continue
                if notes:
                    converted.append({"source": src.ref, "notes": notes})
                per_split_images[split] += 1
                for sample in samples:
                    shard = writers[split].write(sample)
                    box = json.loads(sample["json"])["box"]
                    rows.append(
                        {
                            "key": sample["__key__"],
                            "split": split,
                            "source": src.ref,
                            "x0": box[0],
                            "y0": box[1],
                            "x1": box[2],
                            "y1": box[3],
                            "label": src.label,
                            "shard": shard,
                            "reason": None,
                        }
                    )
                if split == "train" and len(examples) < 8:
                    examples.extend(samples[: 8 - len(examples)])
        for split in SPLITS:
            n = sum(writers[split].sizes)
            if per_split_images[split] == 0:
                raise ShardError(
                    f"data.source {cfg.source!r}: no usable image in the {split} split "
                    f"({len(skipped)} file(s) skipped; see the log)"
                )
            if n < writers[split].count:
                raise ShardError(
                    f"{split} split has {n} samples, fewer than its {writers[split].count} shards "
                    f"(data.min_shards); add images, lower data.crop_stride or data.min_shards"
                )
        committed = True
    finally:
        for w in writers.values():
            w.close(commit=committed)

    keep = {shard_name(s, i) for s in SPLITS for i in range(shard_counts[s])}
    for stale in out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if stale.name not in keep:
            stale.unlink()

    rows += [
        {
            "key": None,
            "split": "skipped",
            "source": s["source"],
            "x0": None,
            "y0": None,
            "x1": None,
            "y1": None,
            "label": None,
            "shard": None,
            "reason": s["reason"],
        }
        for s in skipped
    ]
    manifest = pd.DataFrame(rows).astype(
        {"x0": "Int64", "y0": "Int64", "x1": "Int64", "y1": "Int64", "label": "Int64"}
    )
    buf = io.BytesIO()
    manifest.to_parquet(buf, index=False)
    atomic_write_bytes(out / "manifest.parquet", buf.getvalue())

    stats = {
        "source": cfg.source,
        "classes": classes,
        "num_classes": len(classes),
        "hr_size": cfg.hr_size,
        "scale": cfg.scale,
        "splits": {
            s: {
                "images": per_split_images[s],
                "samples": sum(writers[s].sizes),
                "shards": writers[s].count,
                "shard_sizes": writers[s].sizes,
            }
            for s in SPLITS
        },
        "skipped": sorted(skipped, key=lambda d: d["source"]),
        "converted": sorted(converted, key=lambda d: d["source"]),
    }
    write_json(out / "stats.json", stats)
    elapsed = time.time() - t0
    n_img = sum(per_split_images.values())
    write_json(
        Path(runs_dir) / "shard" / "timing.json",
        {
            "seconds": round(elapsed, 3),
            "images": n_img,
            "images_per_s": round(n_img / elapsed, 3),
            "samples": len(manifest) - len(skipped),
            "machine": machine_info(),
        },
    )
    _log_wandb(params, stats, examples, runs_dir, out)
    print(
        f"shard: {stats['splits']['train']['samples']} train / {stats['splits']['val']['samples']} val "
        f"samples from {n_img} images, {len(skipped)} skipped -> {out}"
    )
    return stats


def _log_wandb(params, stats: dict, examples: list[dict], runs_dir: str, out: Path) -> None:
    from arsr.train.logging import init_wandb

    run = init_wandb("shard", stage_param_values(params, PARAMS), out_dir=runs_dir)
    counts = {f"{s}/{k}": v for s in SPLITS for k, v in stats["splits"][s].items() if k != "shard_sizes"}
    counts["skipped"] = len(stats["skipped"])
    run.log(counts)
    run.summary_update(counts)
    if examples:
        run.log_images(
            "examples", [_example_grid(examples, params.data.scale)], captions=["LR (x nearest) | HR"]
        )
    run.log_artifact(*shards_artifact(out))
    run.finish()


def _add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default=str(SHARDS_DIR), help="output folder (default: data/shards)")
    ap.add_argument("--runs", default=str(RUNS_DIR), help="where timing.json and W&B files go")


def main(argv: list[str] | None = None) -> int:
    return stage_main("shard", __doc__, lambda a, _p: run_shard(a.params, a.out, a.runs), argv, _add_args)


if __name__ == "__main__":
    sys.exit(main())
