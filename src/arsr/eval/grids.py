"""Labelled side-by-side image grids for people: the report's samples and W&B's."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def as_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 (H, W) grey or (H, W, 3) RGB -> (H, W, 3)."""
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img


def labelled_row(columns: Sequence[tuple[str, np.ndarray]], min_side: int = 192, gap: int = 4) -> np.ndarray:
    """Images side by side, each under its label, enlarged (nearest, an integer factor) until the
    longer side of the first image is at least ``min_side`` px so that 64 px crops can be seen.

    ``columns``: (label, uint8 image) pairs of one size, grey or RGB. Returns an (H', W', 3) uint8 image.
    """
    if not columns:
        raise ValueError("labelled_row: no columns")
    h, w = columns[0][1].shape[:2]
    k = max(1, math.ceil(min_side / max(h, w)))
    font_px = max(12, min(24, (w * k) // 10))
    font = ImageFont.load_default(size=font_px)
    header = font_px + 8
    n = len(columns)
    canvas = Image.new("RGB", (n * w * k + (n - 1) * gap, header + h * k), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, img) in enumerate(columns):
        if img.shape[:2] != (h, w):
            raise ValueError(f"labelled_row: column {label!r} is {img.shape[:2]}, not {(h, w)}")
        x0 = i * (w * k + gap)
        tile = Image.fromarray(as_rgb(img)).resize((w * k, h * k), Image.NEAREST)
        canvas.paste(tile, (x0, header))
        text_w = draw.textlength(label, font=font)
        draw.text((x0 + max(0.0, (w * k - text_w) / 2), 3), label, fill="black", font=font)
    return np.asarray(canvas)
