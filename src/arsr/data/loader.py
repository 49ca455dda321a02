"""WebDataset loaders for training and evaluation (DESIGN §3).

Training: one global sample order, the same for any number of ranks, workers and accumulation
micro-steps. The samples of the *global* batch of optimizer step ``k`` are a function of
``(seed, k)`` alone (and the data); ranks, workers and ``accum`` only change who reads and decodes
which of them. That is also what makes resume exact, at any world size:
``train_loader(..., start_step=j)`` yields exactly the micro-batches an uninterrupted run would
have yielded from micro-step ``j`` on, without reading 0..j-1.

How: every train sample of every shard is one entry of a global index, ``(shard, byte span)``,
built once per process from the tar headers alone (:func:`tar_index`, cached like
:func:`count_samples`). Epoch ``e`` is a seeded permutation ``(seed, e)`` of all ``N`` samples
(global shuffling: a batch mixes every shard), and the infinite sample sequence is epoch 0, epoch 1,
... concatenated; position ``p`` is sample ``perm_{p // N}[p % N]``. With ``W`` ranks and ``m``
samples per rank per micro-step, micro-step ``j`` covers positions ``[j*W*m, (j+1)*W*m)`` and rank
``r`` takes the ``r``-th ``m`` of them. An optimizer step of ``accum`` micro-steps therefore covers
positions ``[k*B, (k+1)*B)`` with ``B = accum*W*m`` the global batch, whatever ``W``, ``accum`` and
``m``: the rank/micro-step split is micro-step-major (micro-step ``a`` of every rank, then ``a+1``),
which, unlike a rank-major split, needs no ``accum`` here, and which of the B samples a rank sees
in which micro-step does not change the step's mean gradient.

The loader is a map-style dataset whose index is the micro-step: the DataLoader hands micro-step
``j`` to one of its workers (round-robin) and returns them in order; that worker reads exactly
those samples by offset (one ``pread`` of the sample's span per sample; each worker keeps its own
file handles) and decodes them. So no worker needs a shard of its own (any world size x workers
works, even with one shard), and a resume at ``j`` starts reading at ``j``.

Evaluation: ordered, no shuffling, each sample exactly once across ranks and workers
(shards split by rank, then by worker; the last batch of a worker may be short).
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import multiprocessing
import os
import re
import signal
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from arsr.data.shards import decode_png
from arsr.proc import die_with_parent

Sample = dict[str, Any]
Decode = Callable[[Sample], Sample]


# --------------------------------------------------------------------------------------
# Decoders: raw sample (bytes per member suffix) -> tensors
# --------------------------------------------------------------------------------------
def to_unit_range(img_HWC: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [-1, 1] (the models' image range)."""
    return torch.from_numpy(np.ascontiguousarray(img_HWC)).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(img_3HW: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [3, H, W] -> uint8 [H, W, 3] (rounded; exact for images from :func:`to_unit_range`)."""
    x = ((img_3HW.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(1, 2, 0).numpy()


def decode_pair(sample: Sample) -> Sample:
    """Image shards: {"key", "hr" [3,H,W], "lr" [3,H/s,W/s] in [-1,1], "cls" int}."""
    return {
        "key": sample["__key__"],
        "hr": to_unit_range(decode_png(sample["hr.png"])),
        "lr": to_unit_range(decode_png(sample["lr.png"])),
        "cls": int(sample["cls"]),
    }


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_tokens(sample: Sample) -> Sample:
    """Token shards: {"key", "idx" int64 [L], "f" float32 [Cv,h,w], "lrf" float32 [Cv,h,w], "cls"}."""
    return {
        "key": sample["__key__"],
        "idx": torch.from_numpy(decode_npy(sample["idx.npy"]).astype(np.int64)),
        "f": torch.from_numpy(decode_npy(sample["f.npy"]).astype(np.float32)),
        "lrf": torch.from_numpy(decode_npy(sample["lrf.npy"]).astype(np.float32)),
        "cls": int(sample["cls"]),
    }


# --------------------------------------------------------------------------------------
# Splitting and counting
# --------------------------------------------------------------------------------------
def split_by_node(urls: list[str], rank: int, world_size: int) -> list[str]:
    return urls[rank::world_size]


def split_by_worker(urls: list[str], worker: int, num_workers: int) -> list[str]:
    return urls[worker::num_workers]


@lru_cache(maxsize=4096)
def count_samples(url: str) -> int:
    """Samples in one tar, from its headers alone (no member data is read)."""
    keys = set()
    with tarfile.open(url, "r") as tar:
        for member in tar:
            if member.isfile():
                keys.add(member.name.split(".", 1)[0])
    return len(keys)


def _raw_samples(urls: Iterable[str]) -> Iterator[Sample]:
    import webdataset as wds  # the [pipeline] extra: the core (`arsr upscale`) imports this module

    yield from wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples())


# --------------------------------------------------------------------------------------
# Tar index: samples by byte offset, from the headers alone
# --------------------------------------------------------------------------------------
_BLOCK = 512  # tar header and data-padding unit
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: names it never yields


def _tar_number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (first byte 0x80) for large values."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    """A pax extended header's ``"<len> <key>=<value>\\n"`` records."""
    out, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _tar_entries(
    read: Callable[[int, int], bytes], start: int, end: int, url: str
) -> Iterator[tuple[int, str, int, int]]:
    """The regular files whose headers lie in ``[start, end)`` of a tar, as ``(first header byte,
    name, data offset, size)``; ``read(offset, n)`` gives the bytes. A pax (``x``) or GNU long-name
    (``L``) entry renames or resizes the entry after it (the first header byte is then the pax
    entry's); other entries (directories, links, global pax headers) are skipped, as webdataset
    does. Python's tarfile does the same at ~330 us per 4-member sample of pax headers; reading
    and parsing the sample here takes ~55 us."""
    pos, head, override = start, -1, {}
    while pos + _BLOCK <= end:
        hdr = read(pos, _BLOCK)
        if len(hdr) < _BLOCK or not any(hdr):  # end-of-archive (zero block) or a truncated tail
            return
        stored = _tar_number(hdr[148:156])
        unsigned = sum(hdr) - sum(hdr[148:156]) + 8 * 32  # the checksum field counts as spaces
        if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in hdr[:148] + hdr[156:]):
            raise ValueError(f"{url}: bad tar header checksum at byte {pos}")
        kind, size = hdr[156:157], _tar_number(hdr[124:136])
        head = pos if head < 0 else head
        data = pos + _BLOCK
        if kind in (b"x", b"L"):
            payload = read(data, size)
            if kind == b"x":
                override.update(_pax_records(payload))
            else:
                override["path"] = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif kind != b"g":
            size = int(override.get("size", size))
            name = override.get("path")
            if name is None:
                name_b = hdr[0:100].split(b"\0", 1)[0]
                prefix = hdr[345:500].split(b"\0", 1)[0] if hdr[257:263] == b"ustar\0" else b""
                name = ((prefix + b"/" + name_b) if prefix else name_b).decode("utf-8", "surrogateescape")
            if kind in _REGULAR and not name.endswith("/"):  # old-style "regular" + "/" is a folder
                yield head, name, data, size
            head, override = -1, {}
        pos = data + (size + _BLOCK - 1) // _BLOCK * _BLOCK


def _member_key(name: str) -> tuple[str | None, str | None]:
    """(sample key, lower-cased suffix) as webdataset groups members; (None, None) if skipped."""
    from webdataset.tariterators import base_plus_ext  # the [pipeline] extra (see _raw_samples)

    if _SKIP_META.match(name):
        return None, None
    key, suffix = base_plus_ext(name)
    return (key, suffix.lower()) if key is not None else (None, None)


@lru_cache(maxsize=4096)
def _tar_index(url: str, size: int, mtime_ns: int) -> np.ndarray:
    spans: list[tuple[int, int]] = []
    fd = os.open(url, os.O_RDONLY)
    try:
        current = None
        for head, name, data, n in _tar_entries(lambda o, k: os.pread(fd, k, o), 0, size, url):
            key, _ = _member_key(name)
            if key is None:
                continue
            end = data + (n + _BLOCK - 1) // _BLOCK * _BLOCK
            if key == current:  # consecutive members with one key are one sample (webdataset's rule)
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((head, end))
                current = key
    finally:
        os.close(fd)
    return np.asarray(spans, dtype=np.int64).reshape(-1, 2)


def tar_index(url: str) -> np.ndarray:
    """int64 [n, 2]: the byte span ``[start, end)`` of each of the tar's n samples, in file order
    (from the headers only; cached per process while the file's size and mtime stay the same)."""
    st = os.stat(url)
    return _tar_index(url, st.st_size, st.st_mtime_ns)


class TarSamples:
    """All samples of a list of tars, addressable by a global index (tars in the given order, each
    in file order), read by offset. Picklable: file handles are per process (per worker), opened
    on first use; at most ``MAX_OPEN`` stay open."""

    MAX_OPEN = 64

    def __init__(self, urls: list[str]):
        self.urls = list(urls)
        index = [tar_index(u) for u in self.urls]
        self.shard_of = np.repeat(np.arange(len(index), dtype=np.int32), [len(i) for i in index])  # [N]
        self.spans = np.concatenate(index) if index else np.zeros((0, 2), np.int64)  # [N, 2]
        self._fds: OrderedDict[int, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self.spans)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": OrderedDict()}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(Exception):  # also at interpreter exit, when os may be gone
                os.close(fd)

    def _fd(self, shard: int) -> int:
        fd = self._fds.pop(shard, None)
        if fd is None:
            if len(self._fds) >= self.MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
            fd = os.open(self.urls[shard], os.O_RDONLY)
        self._fds[shard] = fd  # most recently used last
        return fd

    def raw(self, i: int) -> Sample:
        """Sample ``i`` as webdataset gives it: ``{"__key__", "__url__", suffix: bytes, ...}``."""
        shard, (start, end) = int(self.shard_of[i]), self.spans[i].tolist()
        # pread: no shared file offset, so a worker forked with open handles reads safely.
        buf = os.pread(self._fd(shard), end - start, start)
        url = self.urls[shard]
        sample: Sample = {"__url__": url}
        for _, name, data, n in _tar_entries(lambda o, k: buf[o - start : o - start + k], start, end, url):
            key, suffix = _member_key(name)
            if key is not None:
                sample["__key__"] = key
                sample[suffix] = buf[data - start : data - start + n]
        return sample


# --------------------------------------------------------------------------------------
# Training stream
# --------------------------------------------------------------------------------------
class _TrainMicroBatches(Dataset):
    """Item ``j``: this rank's micro-batch of micro-step ``j`` (collated), see the module docstring."""

    def __init__(
        self, urls: list[str], decode: Decode, micro_batch: int, seed: int, rank: int, world_size: int
    ):
        super().__init__()
        self.samples = TarSamples(urls)
        if not len(self.samples):
            raise ValueError(f"no samples in the {len(urls)} training shard(s) {urls[:3]}")
        self.decode, self.micro_batch, self.seed = decode, micro_batch, seed
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_perms": {}}

    def _perm(self, epoch: int) -> np.ndarray:
        """int64 [N]: epoch ``epoch``'s order of all samples (the two latest kept: a micro-batch
        may straddle an epoch boundary)."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(len(self.samples))
        return self._perms[epoch]

    def sample_ids(self, j: int) -> list[int]:
        """Global sample indices of micro-step ``j``'s micro-batch on this rank."""
        n = len(self.samples)
        first = (j * self.world_size + self.rank) * self.micro_batch
        return [int(self._perm(p // n)[p % n]) for p in range(first, first + self.micro_batch)]

    def __getitem__(self, j: int) -> Sample:
        return default_collate([self.decode(self.samples.raw(i)) for i in self.sample_ids(j)])


class _MicroSteps:
    """The DataLoader's sampler: micro-steps ``start, start + 1, ...`` (``count`` of them, or forever)."""

    def __init__(self, start: int, count: int | None):
        self.start, self.count = start, count

    def __iter__(self) -> Iterator[int]:
        if self.count is None:
            return itertools.count(self.start)
        return iter(range(self.start, self.start + self.count))


# How long a worker keeps serving after a SIGTERM: long enough for the trainer to finish its step
# and checkpoint, short enough that a parent stuck joining its workers at exit is not stuck forever.
WORKER_TERM_GRACE_S = 60.0


def _exit_later(signum: int, frame: Any) -> None:
    timer = threading.Timer(WORKER_TERM_GRACE_S, os._exit, args=(0,))
    timer.daemon = True
    timer.start()


def _init_worker(parent_pid: int | None, _worker_id: int) -> None:
    """Workers die with the process that iterates the loader (PyTorch's own check of the parent
    runs only every few seconds, between batches), outlive SIGTERM for a grace period and ignore
    SIGUSR1: torchrun and SLURM signal the whole process group, and the trainer must get to write
    its checkpoint before the workers go (it stops them itself). After the grace period a worker
    exits anyway: a parent that failed joins its daemonic workers at exit after a SIGTERM, and
    would wait forever."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGTERM, _exit_later)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _worker_init_fn() -> functools.partial:
    """The loaders' ``worker_init_fn``, holding the pid its workers will have as their parent: this
    process, unless a forkserver (Python 3.14's default start method) forks them; that one exits
    with this process and so takes the workers along, but its pid is not known here."""
    forked_here = multiprocessing.get_start_method() != "forkserver"
    return functools.partial(_init_worker, os.getpid() if forked_here else None)


def stop_workers(it: Any) -> None:
    """Stop a DataLoader iterator's worker processes now (what its ``__del__`` does). Call it when
    a loop over the iterator ends by an exception: the traceback keeps the iterator alive."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def train_loader(
    urls: list[str],
    *,
    decode: Decode,
    micro_batch: int,
    seed: int,
    rank: int,
    world_size: int,
    workers: int,
    start_step: int = 0,
    num_steps: int | None = None,
) -> Iterable[Sample]:
    """Infinite (or ``num_steps``-long) iterable of this rank's collated micro-batches, from
    micro-step ``start_step`` on: ``micro_batch`` samples each, rank ``rank``'s share of the global
    sample order (module docstring), the same order for every ``world_size``, ``workers`` and accum."""
    data = _TrainMicroBatches(sorted(urls), decode, micro_batch, seed, rank, world_size)
    return DataLoader(
        data,
        batch_size=None,  # an item is already a collated micro-batch
        sampler=_MicroSteps(start_step, num_steps),
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        worker_init_fn=_worker_init_fn() if workers else None,
    )


# --------------------------------------------------------------------------------------
# Evaluation stream
# --------------------------------------------------------------------------------------
class _EvalStream(IterableDataset):
    def __init__(self, urls: list[str], decode: Decode, batch_size: int, rank: int, world_size: int):
        super().__init__()
        self.node_urls = split_by_node(urls, rank, world_size)
        self.decode, self.batch_size = decode, batch_size

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        samples = (self.decode(s) for s in _raw_samples(split_by_worker(self.node_urls, worker, workers)))
        while batch := list(itertools.islice(samples, self.batch_size)):
            yield default_collate(batch)


def eval_loader(
    urls: list[str], *, decode: Decode, batch_size: int, rank: int = 0, world_size: int = 1, workers: int = 0
) -> Iterable[Sample]:
    """Ordered batches; every sample exactly once over all ranks and workers."""
    stream = _EvalStream(sorted(urls), decode, batch_size, rank, world_size)
    init = _worker_init_fn() if workers else None
    return DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=init)


def load_shard_stats(shard_dir: str | Path) -> dict:
    """The ``stats.json`` written beside a shard set."""
    path = Path(shard_dir) / "stats.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (run the shard stage first)")
    return json.loads(path.read_text())
