"""Metric benchmark: images/s of the perceptual metrics (LPIPS, DISTS) and of PSNR/SSIM on Y.

    python benchmarks/bench_metrics.py [--crops 64] [--crop-size 64] [--size 512] [--repeats 3]
                                       [--batch 16] [--threads N] [--device cpu]

Two workloads: a batch of ``--crops`` crops of ``--crop-size`` px (how the val split is scored)
and one ``--size`` x ``--size`` image. Each timing is the best of ``--repeats`` runs after one
warm-up (which also loads the weights). PSNR/SSIM (arsr.eval.metrics.score_y, numpy, one image at a
time) run on the same uint8 images. "images/s" counts SR-HR pairs scored per second. A metric whose
weights are not installed prints one line.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from PIL import Image

from arsr.eval import perceptual
from arsr.eval.metrics import score_y


def _photos(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 3) uint8 smooth random colour images (bicubic-upscaled noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(size // 8 + 2, size // 8 + 2, 3)).astype(np.uint8)
        out.append(np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC)))
    return np.stack(out)


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (and weight loading)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _score_all(sr: np.ndarray, hr: np.ndarray) -> list[tuple[float, float]]:
    return [score_y(s, h, 4) for s, h in zip(sr, hr)]


def bench_perceptual(args: argparse.Namespace) -> list[tuple[str, str, int, float]]:
    """Rows (metric, workload, images, seconds) for LPIPS, DISTS and PSNR/SSIM."""
    workloads = {
        f"{args.crops}x{args.crop_size}px": (args.crops, args.crop_size),
        f"1x{args.size}px": (1, args.size),
    }
    rows = []
    for name, (n, size) in workloads.items():
        hr = _photos(n, size, 0)
        noise = np.random.default_rng(1).normal(0, 8, hr.shape)
        sr = np.clip(hr.astype(np.float64) + noise, 0, 255).astype(np.uint8)
        a, b = perceptual.image_to_tensor(sr), perceptual.image_to_tensor(hr)
        for metric in perceptual.METRICS:
            try:
                perceptual.get_model(metric, args.device)
            except perceptual.WeightsMissing as e:
                print(f"skip {metric}: {e}")
                continue
            run = partial(perceptual.distance, metric, a, b, batch_size=args.batch, device=args.device)
            rows.append((metric, name, n, _best_time(run, args.repeats)))
        rows.append(("psnr+ssim (Y)", name, n, _best_time(partial(_score_all, sr, hr), args.repeats)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crops", type=int, default=64)
    ap.add_argument("--crop-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="perceptual metrics' batch size")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print(f"{'metric':<14} {'workload':<12} {'images':>6} {'seconds':>8} {'images/s':>9}")
    for metric, name, n, secs in bench_perceptual(args):
        print(f"{metric:<14} {name:<12} {n:>6} {secs:>8.3f} {n / secs:>9.1f}")


if __name__ == "__main__":
    main()
