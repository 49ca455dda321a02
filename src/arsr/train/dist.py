"""Process-group setup and the few collectives the engine needs.

Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment, world > 1) this
joins the process group: nccl when CUDA is present, gloo on CPU. Without torchrun it is a
plain single process and every helper here degrades to the obvious local behaviour, so
trainers never branch on "am I distributed?".
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Join torchrun's process group (idempotent); a plain process gets rank 0 of 1."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        tdist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=timeout_s), rank=rank, world_size=world, **kwargs
        )
    return DistInfo(rank, world, local_rank, device)


def cleanup() -> None:
    """Leave the process group (call once, at the end of a stage)."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def barrier() -> None:
    if _active():
        tdist.barrier()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in a single process)."""
    if _active():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (for small, infrequent payloads: metrics, RNG states)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def print0(*args: Any) -> None:
    """Print on rank 0 only (the one process that talks to people)."""
    if int(os.environ.get("RANK", 0)) == 0:
        from tqdm import tqdm

        tqdm.write(" ".join(str(a) for a in args))


# --------------------------------------------------------------------------------------
# Seeds and RNG states (per rank, so a resumed run draws exactly what the old one would have)
# --------------------------------------------------------------------------------------
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def set_deterministic(on: bool) -> None:
    """Deterministic kernels (slower); CPU runs are deterministic anyway for a fixed thread count."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != on:  # the call imports torch._dynamo (~2 s)
        torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.benchmark = not on


def get_rng_state() -> dict[str, Any]:
    """This rank's RNG states as tensors and plain values (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # ("MT19937", ...)
    return {
        "python": list(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
