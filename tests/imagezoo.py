"""A folder of awkward image files, each case of issue 2's bad-input list (built in tests)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _png16(path: Path, arr: np.ndarray) -> None:
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit RGB)."""
    h, w = arr.shape[:2]
    color_type = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random colour image (compresses like a photo, not like noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(h // 8 + 2, w // 8 + 2, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def build_zoo(root: Path, size: int = 48) -> dict[str, str]:
    """Write the zoo under ``root``; returns {relative path: 'ok' | 'converted' | 'skipped'}."""
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str] = {}
    base = photo(size, size + 8, 0)

    def save(name: str, img: Image.Image, kind: str, **kw) -> None:
        img.save(root / name, **kw)
        expect[name] = kind

    save("plain.png", Image.fromarray(base), "ok")
    save("photo.JPG", Image.fromarray(photo(size, size, 1)), "ok", quality=90)
    # EXIF orientation 6 (rotate 90 CW): a 40x64 file is a 64x40 picture; size decides usability.
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated.jpg", Image.fromarray(photo(size + 8, size, 2)), "ok", exif=exif)
    save("palette.png", Image.fromarray(base).convert("P", palette=Image.ADAPTIVE), "converted")
    save(
        "rgba.png",
        Image.fromarray(np.dstack([base, np.full(base.shape[:2], 128, np.uint8)]), "RGBA"),
        "converted",
    )
    save("la.png", Image.fromarray(base).convert("LA"), "converted")
    save("grey.png", Image.fromarray(base).convert("L"), "converted")
    save("cmyk.jpg", Image.fromarray(base).convert("CMYK"), "converted")
    frames = [Image.fromarray(photo(size, size, 10 + i)).convert("P") for i in range(3)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    expect["anim.gif"] = "converted"
    _png16(root / "grey16.png", (photo(size, size, 3)[..., 0].astype(np.uint16) * 257))
    expect["grey16.png"] = "converted"
    _png16(root / "rgb16.png", (photo(size, size, 4).astype(np.uint16) * 257))
    expect["rgb16.png"] = "converted"
    save("nön-ascii ünïcode.png", Image.fromarray(photo(size, size, 5)), "ok")

    # Unusable files.
    buf = io.BytesIO()
    Image.fromarray(base).save(buf, format="PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expect["truncated.png"] = "skipped"
    buf = io.BytesIO()
    Image.fromarray(base).save(buf, format="JPEG")
    (root / "truncated.jpeg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expect["truncated.jpeg"] = "skipped"
    (root / "empty.png").write_bytes(b"")
    expect["empty.png"] = "skipped"
    (root / "text.jpg").write_text("this is not an image\n")
    expect["text.jpg"] = "skipped"
    save("tiny.png", Image.fromarray(photo(8, 8, 6)), "skipped")  # below any hr_size used in tests
    os.symlink(root / "does-not-exist.png", root / "broken-link.png")
    expect["broken-link.png"] = "skipped"
    (root / "folder.png").mkdir()
    expect["folder.png"] = "skipped"
    save("folder.png/inside.png", Image.fromarray(photo(size, size, 7)), "ok")
    return expect


def add_bomb(root: Path, max_pixels: int) -> None:
    """An image over twice Pillow's limit (an error) and one between 1x and 2x (a warning)."""
    side = int((max_pixels * 2.5) ** 0.5)
    Image.fromarray(photo(side, side, 8)).save(root / "bomb.png")
    side = int((max_pixels * 1.5) ** 0.5)
    Image.fromarray(photo(side, side, 9)).save(root / "bomb-small.png")
