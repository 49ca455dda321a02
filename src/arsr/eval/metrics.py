"""PSNR / SSIM on the Y channel, as the SR literature scores them.

Two protocols (shared/data/sr_benchmarks/README.md, DESIGN §6):
- ``rgb-uint8`` (default): every method starts from the same RGB uint8 LR image; the
  SR output is RGB uint8; Y (BT.601, rounded to uint8) of SR and HR is compared.
- ``y-float``: VDSR/EDSR's bicubic row: the Y of HR (rounded) is downscaled and
  upscaled in double precision and only the final result is rounded.
Both shave ``scale`` pixels on every border; SSIM is Wang et al.'s (11x11 Gaussian,
sigma 1.5, K1 0.01, K2 0.03, on [0, 255], 'valid' window).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.ndimage import correlate1d

from arsr.data.imresize import imresize, modcrop

Protocol = Literal["rgb-uint8", "y-float"]


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma in [16, 235] as float64 (MATLAB's rgb2ycbcr Y). Greyscale passes through."""
    if img.ndim == 2:
        return img.astype(np.float64)
    rgb = img[..., :3].astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def y_uint8(img: np.ndarray) -> np.ndarray:
    """Y rounded to uint8 (the reference scripts round before scoring)."""
    return np.clip(np.floor(rgb_to_y(img) + 0.5), 0, 255)


def _shave(x: np.ndarray, border: int) -> np.ndarray:
    return x[border:-border, border:-border] if border > 0 else x


MAX_PSNR = 100.0  # dB: an exact reconstruction (a flat crop's bicubic is exact) scores this, not inf


def psnr(a: np.ndarray, b: np.ndarray, border: int = 0) -> float:
    """PSNR in dB of two equally shaped arrays on [0, 255], at most :data:`MAX_PSNR`: one flat crop
    (real photos have them: saturated sky) must not make a split's mean infinite."""
    a, b = _shave(a.astype(np.float64), border), _shave(b.astype(np.float64), border)
    mse = np.mean((a - b) ** 2)
    return MAX_PSNR if mse == 0 else float(min(MAX_PSNR, 10.0 * np.log10(255.0**2 / mse)))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(ax**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable correlation with the window, keeping only fully covered pixels."""
    r = len(g) // 2
    y = correlate1d(correlate1d(x, g, axis=0, mode="constant"), g, axis=1, mode="constant")
    return y[r:-r, r:-r]


def ssim(a: np.ndarray, b: np.ndarray, border: int = 0) -> float:
    """SSIM (Wang et al. 2004) of two greyscale images on [0, 255]."""
    a, b = _shave(a.astype(np.float64), border), _shave(b.astype(np.float64), border)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = _gaussian_window()
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float(np.mean(num / den))


def score_y(sr: np.ndarray, hr: np.ndarray, scale: int) -> tuple[float, float]:
    """(PSNR, SSIM) of uint8 images (RGB or grey) on rounded Y, ``scale`` pixels shaved."""
    if sr.shape[:2] != hr.shape[:2]:
        raise ValueError(f"SR shape {sr.shape} != HR shape {hr.shape}")
    ys, yh = y_uint8(sr), y_uint8(hr)
    return psnr(ys, yh, scale), ssim(ys, yh, scale)


def bicubic_sr(
    hr: np.ndarray, scale: int, protocol: Protocol = "rgb-uint8", lr: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Bicubic baseline: returns (SR, reference) images to pass to PSNR/SSIM on Y.

    ``rgb-uint8``: the LR is ``lr`` if given (e.g. an official LR_bicubic file) else the
    MATLAB downscale of the modcropped HR; upscaled in uint8. Both outputs are uint8 images.
    ``y-float``: works on Y alone in double precision; outputs are rounded Y planes.
    """
    hr = modcrop(hr, scale)
    if protocol == "y-float":
        y_hr = y_uint8(hr)
        y_sr = imresize(imresize(y_hr, 1.0 / scale), output_shape=y_hr.shape[:2])
        return np.clip(np.floor(y_sr + 0.5), 0, 255), y_hr
    if lr is None:
        lr = imresize(hr, 1.0 / scale)
    sr = imresize(lr, output_shape=hr.shape[:2])
    return sr, hr


def score_bicubic(
    hr: np.ndarray, scale: int, protocol: Protocol = "rgb-uint8", lr: np.ndarray | None = None
) -> tuple[float, float]:
    """(PSNR, SSIM) of the bicubic baseline on one HR image under ``protocol``."""
    sr, ref = bicubic_sr(hr, scale, protocol, lr)
    if protocol == "y-float":
        return psnr(sr, ref, scale), ssim(sr, ref, scale)
    return score_y(sr, ref, scale)
