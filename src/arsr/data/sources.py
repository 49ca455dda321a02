"""Where images come from: the built-in sample photos or a folder, and robust decoding.

Every file found is either decoded to an RGB uint8 array (converting 16-bit, palette,
alpha, greyscale, CMYK and animated images, with a note saying so) or rejected with an
:class:`ImageError` whose message is the reason that ends up in ``stats.json``.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}

# Colour photographs that ship inside scikit-image (no network needed).
BUILTIN_IMAGES = (
    "astronaut",
    "coffee",
    "chelsea",
    "immunohistochemistry",
    "motorcycle_left",
    "motorcycle_right",
    "rocket",
    "hubble_deep_field",
    "retina",
)


class ImageError(Exception):
    """An input image that cannot be used; the message is the reason."""


@dataclass(frozen=True)
class SourceImage:
    """One input image. ``ref`` is what outputs record (never an absolute path)."""

    source_id: str  # stable, ASCII letters/digits/'-' only: safe inside WebDataset keys
    ref: str  # "builtin:<name>" or the path relative to the source folder
    path: Path | None  # None for built-in images
    label: int  # class index (0 when unlabeled)


@dataclass(frozen=True)
class Skipped:
    ref: str
    reason: str


def _source_id(ref: str) -> str:
    """``<readable stem>-<hash>``: unique per ref, no dots or underscores (they split wds keys)."""
    stem = re.sub(r"[^A-Za-z0-9]+", "-", Path(ref).with_suffix("").as_posix()).strip("-")[-40:]
    digest = hashlib.sha1(ref.encode("utf-8")).hexdigest()[:8]
    return f"{stem or 'img'}-{digest}"


def list_sources(source: str, labels: str = "none") -> tuple[list[SourceImage], list[Skipped], list[str]]:
    """Images of ``source`` ('builtin' or a folder), files rejected before decoding, class names."""
    if source == "builtin":
        images = [SourceImage(_source_id(n), f"builtin:{n}", None, 0) for n in BUILTIN_IMAGES]
        return images, [], []
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"data.source: {source!r} is neither 'builtin' nor an existing folder")
    classes: list[str] = []
    if labels == "folder":
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise ValueError(f"data.labels: 'folder' but {source!r} has no subfolders to use as classes")
    class_index = {c: i for i, c in enumerate(classes)}
    images: list[SourceImage] = []
    skipped: list[Skipped] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        for name in sorted(filenames) + [d for d in dirnames if Path(d).suffix.lower() in IMAGE_SUFFIXES]:
            path = here / name
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES or name.startswith("."):
                continue
            ref = path.relative_to(root).as_posix()
            if path.is_dir():
                skipped.append(Skipped(ref, "is a directory with an image suffix (its contents are scanned)"))
                continue
            if path.is_symlink() and not path.exists():
                skipped.append(Skipped(ref, f"broken symlink to {os.readlink(path)!r}"))
                continue
            label = 0
            if labels == "folder":
                top = Path(ref).parts[0]
                if len(Path(ref).parts) == 1 or top not in class_index:
                    skipped.append(Skipped(ref, "not inside a class subfolder (data.labels: folder)"))
                    continue
                label = class_index[top]
            images.append(SourceImage(_source_id(ref), ref, path, label))
    return images, skipped, classes


def _builtin_array(name: str) -> np.ndarray:
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _disp = skimage.data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(skimage.data, name)()


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16/32-bit or float pixel data to uint8."""
    if arr.dtype == np.uint8:
        return arr
    a = arr.astype(np.float64)
    if mode == "F" or np.issubdtype(arr.dtype, np.floating):
        peak = 1.0 if a.max(initial=0) <= 1.0 else 255.0
    else:  # 16-bit data (PNG/TIFF "I;16*" or "I")
        peak = 65535.0
    return np.clip(np.floor(a / peak * 255.0 + 0.5), 0, 255).astype(np.uint8)


def _pil_to_rgb(img: Image.Image, notes: list[str]) -> np.ndarray:
    if getattr(img, "n_frames", 1) > 1:
        notes.append(f"animated ({img.n_frames} frames): first frame used")
        img.seek(0)
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        notes.append(f"{mode} greyscale scaled to 8 bits")
        grey = _to_uint8(np.asarray(img), mode)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "P":
        has_alpha = "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        notes.append("palette converted to RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        notes.append(f"{mode}: alpha composited over white")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    elif mode in ("L", "1"):
        notes.append("greyscale replicated to RGB")
        img = img.convert("RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV") or mode != "RGB":
        notes.append(f"{mode} converted to RGB")
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def load_rgb(src: SourceImage, max_pixels: int) -> tuple[np.ndarray, list[str]]:
    """Decode ``src`` to an RGB uint8 array [H, W, 3] plus conversion notes; ImageError if unusable."""
    notes: list[str] = []
    if src.path is None:
        return _builtin_array(src.ref.removeprefix("builtin:")), notes
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        if src.path.stat().st_size == 0:
            raise ImageError("empty file (0 bytes)")
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x the limit; treat every bomb as an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src.path) as img:
                rawmode = img.tile[0][3] if img.tile and isinstance(img.tile[0][3], str) else ""
                img.load()
                if img.mode == "RGB" and ";16" in rawmode:
                    notes.append("16-bit RGB reduced to 8 bits")
                return _pil_to_rgb(img, notes), notes
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"decompression bomb refused (data.max_image_pixels={max_pixels}): {err}") from None
    except UnidentifiedImageError:
        raise ImageError("not a readable image (unidentified format)") from None
    except PermissionError as err:
        raise ImageError(f"unreadable: {err.strerror}") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated data, bad headers
        raise ImageError(f"corrupt image: {err}") from None
