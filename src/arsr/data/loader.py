"""WebDataset loaders for training and evaluation (DESIGN §3).

Training: an infinite stream in which the micro-batch at index ``k`` (counting from 0
over the whole run) is a pure function of ``(seed, rank, k)``. That is what makes
resume exact: ``train_loader(..., start_step=k)`` yields exactly the batches an
uninterrupted run would have yielded from ``k`` on, without drawing 0..k-1.

How: shards are split by node (``urls[rank::world]``, webdataset's ``split_by_node``)
and then by worker (``[w::workers]``, ``split_by_worker``), with rank and worker passed
explicitly so a test can play several ranks in one process. PyTorch's DataLoader hands
out batches from its workers round-robin, so micro-batch ``k`` always comes from the
*logical* worker ``k % workers``; after a resume at ``k0`` the physical worker ``w``
plays logical worker ``(k0 + w) % workers``. Each logical worker reads its shards in a
seeded order per epoch, shuffles samples through a seeded buffer that is flushed at
every epoch end, and skips whole epochs (by count) and then single raw samples (before
decoding) to reach its first batch.

Evaluation: ordered, no shuffling, each sample exactly once across ranks and workers
(the last batch of a worker may be short).
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import multiprocessing
import os
import signal
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from arsr.data.shards import decode_png
from arsr.proc import die_with_parent

Sample = dict[str, Any]
Decode = Callable[[Sample], Sample]

SHUFFLE_BUFFER = 512


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
    yield from wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples())


# --------------------------------------------------------------------------------------
# Training stream
# --------------------------------------------------------------------------------------
class _TrainStream(IterableDataset):
    def __init__(
        self,
        urls: list[str],
        decode: Decode,
        micro_batch: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        start_step: int,
    ):
        super().__init__()
        self.node_urls = split_by_node(urls, rank, world_size)
        self.decode, self.micro_batch = decode, micro_batch
        self.seed, self.rank, self.num_workers, self.start_step = seed, rank, max(1, num_workers), start_step

    def _epoch_samples(self, urls: list[str], logical: int, epoch: int) -> Iterator[Sample]:
        rng = np.random.default_rng([self.seed, self.rank, logical, epoch])
        order = [urls[i] for i in rng.permutation(len(urls))]
        buf: list[Sample] = []
        for sample in _raw_samples(order):
            if len(buf) < SHUFFLE_BUFFER:
                buf.append(sample)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], sample = sample, buf[j]
            yield sample
        rng.shuffle(buf)  # flush: epochs never mix, so whole epochs can be skipped by count
        yield from buf

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        logical = (self.start_step + worker) % self.num_workers
        urls = split_by_worker(self.node_urls, logical, self.num_workers)
        epoch_len = sum(count_samples(u) for u in urls)
        # This worker yields micro-steps logical, logical + W, ...; its first is start + worker.
        first_local = (self.start_step + worker) // self.num_workers
        skip = first_local * self.micro_batch
        epoch, skip = divmod(skip, epoch_len)
        stream = itertools.chain.from_iterable(
            self._epoch_samples(urls, logical, e) for e in itertools.count(epoch)
        )
        stream = itertools.islice(stream, skip, None)
        while True:
            batch = [self.decode(s) for s in itertools.islice(stream, self.micro_batch)]
            yield default_collate(batch)


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


def _check_shards(urls: list[str], world_size: int, workers: int) -> None:
    need = world_size * max(1, workers)
    if len(urls) < need:
        raise ValueError(
            f"{len(urls)} shard(s) for {world_size} rank(s) x {max(1, workers)} worker(s): every worker "
            f"of every rank needs at least one shard (raise data.min_shards to >= {need}, "
            "or lower train.workers)"
        )


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
    """Infinite (or ``num_steps``-long) iterator of collated micro-batches from ``start_step`` on."""
    urls = sorted(urls)
    _check_shards(urls, world_size, workers)
    stream = _TrainStream(urls, decode, micro_batch, seed, rank, world_size, workers, start_step)
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        worker_init_fn=_worker_init_fn() if workers else None,
    )
    return loader if num_steps is None else itertools.islice(loader, num_steps)


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
