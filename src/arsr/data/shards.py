"""HR/LR crops and reproducible WebDataset tar shards (DESIGN §3).

A sample is ``{key}.hr.png`` (uint8 RGB, ``hr_size`` square), ``{key}.lr.png`` (the HR
crop downscaled by MATLAB-compatible bicubic), ``{key}.cls`` and ``{key}.json`` (source
and crop box). Keys are ``<source-id>_<crop-idx>``: stable and free of dots.

Tars are byte-reproducible: members are written in a fixed order with mtime 0 and a
fixed owner, and PNGs are encoded with fixed settings. Each tar is written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from arsr.data.imresize import imresize

SPLITS = ("train", "val")


def crop_grid(height: int, width: int, size: int, stride: int, max_crops: int, seed: int) -> list[tuple]:
    """Top-left-anchored grid of ``size`` crops every ``stride`` pixels; at most ``max_crops``
    (a seeded, sorted subset) when ``max_crops`` > 0."""
    ys = range(0, height - size + 1, stride)
    xs = range(0, width - size + 1, stride)
    boxes = [(x, y, x + size, y + size) for y in ys for x in xs]
    if 0 < max_crops < len(boxes):
        pick = np.random.default_rng(seed).choice(len(boxes), size=max_crops, replace=False)
        boxes = [boxes[i] for i in sorted(pick)]
    return boxes


def png_bytes(arr: np.ndarray) -> bytes:
    """Deterministic PNG encoding of a uint8 array."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 RGB [H, W, 3]."""
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"))


def make_sample(key: str, hr: np.ndarray, scale: int, label: int, meta: dict) -> dict:
    """One WebDataset sample dict (values already bytes) for an HR crop."""
    lr = imresize(hr, 1.0 / scale)
    return {
        "__key__": key,
        "hr.png": png_bytes(hr),
        "lr.png": png_bytes(lr),
        "cls": str(label).encode(),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class ShardSetWriter:
    """Writes samples round-robin into ``count`` tars ``{split}-NNNNNN.tar`` under ``out_dir``.

    Round-robin over the global sample order spreads every source image over all shards
    (so each rank/worker sees a mix) and keeps shard sizes within one sample of each other.
    """

    def __init__(self, out_dir: Path, split: str, count: int):
        self.out_dir, self.split, self.count = Path(out_dir), split, count
        self.names = [shard_name(split, i) for i in range(count)]
        self.sizes = [0] * count
        import webdataset as wds  # the [pipeline] extra: `arsr upscale` / `arsr evaluate --hr-dir` need none

        self._files = [open(self.out_dir / (n + ".tmp"), "wb") for n in self.names]  # noqa: SIM115
        self._writers = [
            wds.TarWriter(f, user="arsr", group="arsr", mode=0o444, mtime=0.0, encoder=False)
            for f in self._files
        ]
        self._next = 0

    def write(self, sample: dict) -> str:
        i = self._next % self.count
        self._next += 1
        self._writers[i].write(sample)
        self.sizes[i] += 1
        return self.names[i]

    def close(self, commit: bool) -> None:
        """Close all tars; rename them into place if ``commit`` else delete the temporaries."""
        for w, f in zip(self._writers, self._files):
            w.close()
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        for name in self.names:
            tmp = self.out_dir / (name + ".tmp")
            if commit:
                os.replace(tmp, self.out_dir / name)
            else:
                tmp.unlink(missing_ok=True)


def shard_urls(shard_dir: str | Path, split: str) -> list[str]:
    """Sorted shard paths of one split; an error naming the folder when there are none."""
    urls = sorted(str(p) for p in Path(shard_dir).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
    if not urls:
        raise FileNotFoundError(f"no {split}-NNNNNN.tar shards in {shard_dir} (run the previous stage)")
    return urls


def iter_tar_samples(urls: Iterable[str]) -> Iterable[dict]:
    """Raw samples (bytes per member suffix, plus __key__) of the given tars, in file order."""
    import webdataset as wds  # the [pipeline] extra (see ShardWriter)

    pipeline = wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples())
    yield from pipeline
