"""Evaluation: tiling without seams, and the standalone `arsr evaluate` on Set5."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from imagezoo import photo

from arsr.data.imresize import imresize
from arsr.infer.tiling import BicubicUpscaler, tile_starts, upscale_image, upscale_images

PUBLISHED = {  # shared/data/sr_benchmarks/README.md
    "y-float": {2: (33.66, 0.9299), 3: (30.39, 0.8682), 4: (28.42, 0.8104)},
    "rgb-uint8": {2: (33.64, 0.9292), 3: (30.39, 0.8678), 4: (28.42, 0.8101)},
}


def test_tile_starts_cover_the_image() -> None:
    assert tile_starts(10, 16, 4) == [0]
    starts = tile_starts(45, 16, 4)
    assert starts[0] == 0 and starts[-1] == 45 - 16
    assert all(b - a <= 12 for a, b in zip(starts, starts[1:]))


def test_tiled_upscale_of_a_non_square_image_has_no_seams() -> None:
    """Bicubic per tile vs bicubic on the whole image: they differ only near tile borders
    (where a tile lacks context); the blend must keep every seam as close to the
    whole-image result as the tiles' interiors are, i.e. no line brighter or darker."""
    lr = photo(45, 70, 3)  # 45 x 70 LR, larger than one 16 px tile, not square
    up = BicubicUpscaler(hr_size=64, scale=4)
    tiled = upscale_image(lr, up, overlap_hr=16, batch_size=5).astype(np.float64)
    whole = imresize(lr, 4).astype(np.float64)
    assert tiled.shape == (180, 280, 3)
    diff = tiled - whole
    # Seam positions: where a tile ends (HR coordinates) inside the image.
    seams_x = [(s + 16) * 4 for s in tile_starts(70, 16, 4)[:-1]]
    seams_y = [(s + 16) * 4 for s in tile_starts(45, 16, 4)[:-1]]
    for x in seams_x:
        assert abs(diff[:, x - 2 : x + 2].mean()) < 1.0, f"column seam at x={x}"
    for y in seams_y:
        assert abs(diff[y - 2 : y + 2].mean()) < 1.0, f"row seam at y={y}"
    assert np.abs(diff).mean() < 1.0


def test_tiles_of_several_images_batched_together_equal_one_by_one() -> None:
    up = BicubicUpscaler(hr_size=64, scale=4)
    lrs = [photo(45, 70, 3), photo(10, 12, 4), photo(16, 33, 5)]  # one smaller than a tile
    together = upscale_images(lrs, up, overlap_hr=16, batch_size=7)
    for lr, sr in zip(lrs, together):
        assert sr.shape == (lr.shape[0] * 4, lr.shape[1] * 4, 3)
        assert np.array_equal(sr, upscale_image(lr, up, overlap_hr=16, batch_size=3))


@pytest.mark.parametrize("protocol", ["rgb-uint8", "y-float"])
def test_standalone_evaluate_reproduces_set5_bicubic(set5: Path, tmp_path: Path, protocol: str) -> None:
    for scale in (2, 3, 4):
        out = tmp_path / f"x{scale}.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "arsr.cli",
                "evaluate",
                "--hr-dir",
                str(set5),
                "--scale",
                str(scale),
                "--methods",
                "bicubic",
                "--protocol",
                protocol,
                "--metrics",
                "psnr,ssim",  # LPIPS/DISTS on Set5: tests/test_eval_registry.py
                "--json",
                str(out),
            ],
            check=True,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
        )
        result = json.loads(out.read_text())
        want_psnr, want_ssim = PUBLISHED[protocol][scale]
        mean = result["mean"]["bicubic"]
        assert abs(mean["psnr"] - want_psnr) <= 0.01, (scale, mean)
        assert abs(mean["ssim"] - want_ssim) <= 0.0005, (scale, mean)
        assert set(result["per_image"]["bicubic"]) == {"baby", "bird", "butterfly", "head", "woman"}


class _TintingUpscaler(BicubicUpscaler):
    """Bicubic with a red tint: a model whose channels drift apart."""

    def __call__(self, lr_B3hw, seed):  # type: ignore[override]
        out = super().__call__(lr_B3hw, seed).clone()
        out[:, 0] += 0.1
        return out


def test_a_greyscale_image_comes_out_greyscale_and_colour_stays_colour() -> None:
    up = _TintingUpscaler(hr_size=64, scale=4)
    grey = np.repeat(photo(20, 30, 7)[..., :1], 3, axis=2)
    sr = upscale_image(grey, up, overlap_hr=16)
    assert np.array_equal(sr[..., 0], sr[..., 1]) and np.array_equal(sr[..., 0], sr[..., 2])
    colour = upscale_image(photo(20, 30, 7), up, overlap_hr=16).astype(int)
    assert (colour[..., 0] - colour[..., 1]).mean() > 5  # the tint passes through on colour input
