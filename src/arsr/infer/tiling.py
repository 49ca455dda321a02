"""Super-resolve images of any size with a model that works on a fixed grid (DESIGN §4).

The LR image is cut into overlapping tiles of ``hr_size / scale`` pixels, the tiles are
super-resolved in batches, and the HR tiles are blended back with weights that ramp
linearly across each overlap (a tile's own border pixels count little, so no seam shows
where two tiles meet). Images smaller than one tile are edge-padded and cropped back.

An :class:`Upscaler` is anything with ``hr_size``, ``scale`` and
``__call__(lr_B3hw, seed) -> hr_B3HW`` on tensors in [-1, 1]: one per model family in
``arsr.infer`` (registry.py lists them). Tiles go to the upscaler's ``device`` attribute when it
has one (else the CPU).

Each tile is sampled with a seed of its own (:func:`tile_seed`: the run's seed, the image's index in
the list and the tile's index in the image), passed to the upscaler as one seed per row of the
batch, so a tile's output does not depend on which tiles share its batch: ``batch_size`` is a
machine setting only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

from arsr.data.imresize import imresize
from arsr.data.loader import to_uint8, to_unit_range
from arsr.progress import progress


class Upscaler(Protocol):
    """LR tiles [B,3,hr_size/scale,hr_size/scale] in [-1,1] -> HR tiles [B,3,hr_size,hr_size] in [-1,1];
    the same ``seed`` and inputs give the same outputs.

    ``seed``: an int (one random stream for the whole batch) or a sequence of B ints, one per tile:
    then tile b's output depends only on tile b and ``seed[b]``, not on the other tiles of the batch
    (up to float rounding of batched kernels). Deterministic upscalers ignore it."""

    hr_size: int
    scale: int

    def __call__(self, lr_B3hw: torch.Tensor, seed: int | Sequence[int]) -> torch.Tensor: ...


class BicubicUpscaler:
    """MATLAB bicubic as an Upscaler (uint8 rounding like the rgb-uint8 protocol)."""

    def __init__(self, hr_size: int, scale: int):
        self.hr_size, self.scale = hr_size, scale

    def __call__(self, lr_B3hw: torch.Tensor, seed: int | Sequence[int]) -> torch.Tensor:
        out = []
        for lr in lr_B3hw:
            up = imresize(to_uint8(lr), self.scale)
            out.append(to_unit_range(up))
        return torch.stack(out)


# tile_seed's layout: the image index and the tile index get TILE_SEED_BITS bits each of a 32-bit seed.
TILE_SEED_BITS = 16


def tile_seed(seed: int, image_index: int, tile_index: int) -> int:
    """The sampling seed of one tile: ``(mix32(seed) + image_index * 2**16 + tile_index) mod 2**32``.

    ``image_index`` is the image's position in the list given to :func:`upscale_images`,
    ``tile_index`` the tile's position among that image's tiles (row-major). Within one call every
    tile gets its own seed (below 2**16 images and 2**16 tiles per image, which the caller checks).
    32 bits because torch's CPU generator keeps only the low 32 bits of a seed. ``mix32`` (murmur3's
    32-bit finalizer, a bijection) scatters the run seeds, so runs with seeds 0 and 1 do not share
    their tiles' streams shifted by one; seeds equal modulo 2**32 are the same seed.
    """
    b = TILE_SEED_BITS
    return (_mix32(seed) + image_index * 2**b + tile_index) % 2**32


def _mix32(x: int) -> int:
    """murmur3's fmix32 on x mod 2**32: a bijection of the 32-bit integers that scatters neighbours."""
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & m
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & m
    return x ^ (x >> 16)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of ``tile`` overlapping by >= ``overlap``."""
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def blend_window(size: int, ramp: int) -> np.ndarray:
    """[size] weights: 1 in the middle, a linear ramp over ``ramp`` pixels at both ends."""
    if ramp <= 0:
        return np.ones(size)
    x = np.arange(size, dtype=np.float64) + 0.5
    return np.clip(np.minimum(x, size - x) / ramp, 1e-3, 1.0)


def _batches(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


@torch.no_grad()
def upscale_images(
    lrs: list[np.ndarray],
    upscaler: Upscaler,
    overlap_hr: int = 16,
    batch_size: int = 16,
    seed: int = 0,
    device: torch.device | str | None = None,
    desc: str | None = None,
    first_index: int = 0,
) -> list[np.ndarray]:
    """Super-resolve uint8 RGB images [h, w, 3] of any sizes -> [h*scale, w*scale, 3] uint8 each.

    The tiles of all images go through the model together, ``batch_size`` at a time (a small
    model samples 16 tiles in about the time of one), each tile with its own seed
    (:func:`tile_seed` of ``seed``, its image's index ``first_index + i`` and its index in the image): the
    same images, settings and seed give the same outputs for any ``batch_size`` (up to the last
    bits of batched float kernels). ``desc`` shows progress over the batches (a bar on a terminal,
    plain lines in a log: :func:`arsr.progress.progress`).

    A greyscale image (three equal channels) comes out greyscale: the model's three output channels
    are averaged. Models see colour photos in training and nothing ties their channels together,
    so a grey input would otherwise come out faintly coloured.
    """
    s, t_hr = upscaler.scale, upscaler.hr_size
    t_lr, ov_lr = t_hr // s, max(0, overlap_hr // s)
    device = device or getattr(upscaler, "device", "cpu")
    win = blend_window(t_hr, ov_lr * s)
    win2d = (win[:, None] * win[None, :])[..., None]
    if first_index + len(lrs) > 2**TILE_SEED_BITS:
        raise ValueError(f"{len(lrs)} images: at most {2**TILE_SEED_BITS} per call (tile seeds)")
    padded, canvas, weight = [], [], []
    tiles: list[tuple[int, int, int, int]] = []  # (image index, y, x in LR pixels, the tile's seed)
    for i, lr in enumerate(lrs):
        h, w = lr.shape[:2]
        ph, pw = max(h, t_lr), max(w, t_lr)
        yxs = [(y, x) for y in tile_starts(ph, t_lr, ov_lr) for x in tile_starts(pw, t_lr, ov_lr)]
        if len(yxs) > 2**TILE_SEED_BITS:
            raise ValueError(f"image {i}: {len(yxs)} tiles, at most {2**TILE_SEED_BITS} (tile seeds)")
        padded.append(np.pad(lr, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge"))
        canvas.append(np.zeros((ph * s, pw * s, 3)))
        weight.append(np.zeros((ph * s, pw * s, 1)))
        tiles += [(i, y, x, tile_seed(seed, first_index + i, j)) for j, (y, x) in enumerate(yxs)]
    batches = list(_batches(tiles, batch_size))
    bar = progress(batches, desc=desc, unit="batch", disable=desc is None)
    for batch in bar:
        lr_B3hw = torch.stack([to_unit_range(padded[i][y : y + t_lr, x : x + t_lr]) for i, y, x, _ in batch])
        seeds = [ts for *_, ts in batch]  # one per row of lr_B3hw
        out = upscaler(lr_B3hw.to(device), seeds).float().clamp(-1, 1).cpu()
        for (i, y, x, _), hr_3HW in zip(batch, out):
            hr_np = (hr_3HW.permute(1, 2, 0).numpy() + 1.0) * 127.5
            canvas[i][y * s : (y + t_lr) * s, x * s : (x + t_lr) * s] += hr_np * win2d
            weight[i][y * s : (y + t_lr) * s, x * s : (x + t_lr) * s] += win2d
    outs = []
    for c, w, lr in zip(canvas, weight, lrs):
        hr = c / w
        if is_grey(lr):
            hr = np.repeat(hr.mean(axis=2, keepdims=True), 3, axis=2)
        outs.append(
            np.clip(np.floor(hr + 0.5), 0, 255).astype(np.uint8)[: lr.shape[0] * s, : lr.shape[1] * s]
        )
    return outs


def is_grey(img: np.ndarray) -> bool:
    """Whether a uint8 [h, w, 3] image has three equal channels."""
    return bool(np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2]))


def upscale_image(
    lr: np.ndarray,
    upscaler: Upscaler,
    overlap_hr: int = 16,
    batch_size: int = 16,
    seed: int = 0,
    device: torch.device | str | None = None,
    index: int = 0,
) -> np.ndarray:
    """Super-resolve one uint8 RGB image [h, w, 3] of any size to [h*scale, w*scale, 3] uint8: the
    image ``index`` of a list given to :func:`upscale_images` (its tiles' seeds)."""
    return upscale_images([lr], upscaler, overlap_hr, batch_size, seed, device, first_index=index)[0]
