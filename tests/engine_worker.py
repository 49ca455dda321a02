"""A tiny training stage for the engine tests: plain `python` or under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/engine_worker.py \
        --out OUT --steps 6 --accum 1 2

Each value of --accum trains once into OUT/accum<A>. Data is either synthetic (the global batch
of step s is a pure function of (seed, s); rank r, micro-step a take chunk r*accum + a of it,
so any world size and accum see the same global batch) or read from shards with
arsr.data.loader (--shards DIR, members x.npy / y.npy).
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from arsr.config import TrainConfig
from arsr.train.dist import init_distributed
from arsr.train.engine import Trainer, micro_batch_size

DIM, OUT = 8, 4


class TinyNet(nn.Module):
    def __init__(self, width: int = 32, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(DIM, width)
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, OUT)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.norm(F.gelu(self.fc1(x_BD)))))


_W = torch.randn(DIM, OUT, generator=torch.Generator().manual_seed(1234))


def target(x_BD: torch.Tensor) -> torch.Tensor:
    return torch.sin(x_BD @ _W)


def global_batch(seed: int, step: int, size: int) -> dict[str, torch.Tensor]:
    x = torch.randn(size, DIM, generator=torch.Generator().manual_seed(seed * 100_003 + step))
    return {"x": x, "y": target(x)}


def synthetic_iter(seed: int, rank: int, world: int, accum: int, micro: int, start: int):
    for k in itertools.count(start):
        step, a = divmod(k, accum)
        g = global_batch(seed, step, micro * world * accum)
        j = rank * accum + a
        yield {n: t[j * micro : (j + 1) * micro] for n, t in g.items()}


def val_batches(rank: int, world: int, n: int = 32, batch: int = 8):
    g = global_batch(999, 0, n)
    mine = {k: v[rank::world] for k, v in g.items()}
    for i in range(0, len(mine["x"]), batch):
        yield {k: v[i : i + batch] for k, v in mine.items()}


def loss_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    loss = F.mse_loss(model(batch["x"]), batch["y"])
    return loss, {"mse": loss.detach()}


def val_fn(model: nn.Module, batch: dict) -> dict:
    err = (model(batch["x"]) - batch["y"]).pow(2).mean(dim=1)
    return {"mse": (err.sum(), err.numel())}


def decode_xy(sample: dict) -> dict:
    from arsr.data.loader import decode_npy

    return {k: torch.from_numpy(decode_npy(sample[f"{k}.npy"])) for k in ("x", "y")}


def write_shards(folder: Path, n_shards: int = 4, per_shard: int = 16) -> list[str]:
    """Tiny WebDataset shards of (x, target(x)) pairs."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    urls = []
    for s in range(n_shards):
        url = folder / f"train-{s:06d}.tar"
        with wds.TarWriter(str(url), mtime=0) as sink:
            for i in range(per_shard):
                x = torch.randn(DIM, generator=g)
                sink.write({"__key__": f"s{s:02d}_{i:03d}", "x.npy": x.numpy(), "y.npy": target(x).numpy()})
        urls.append(str(url))
    return urls


# --------------------------------------------------------------------------------------
# Launch helpers for the tests
# --------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def launch_env(**extra: str) -> dict[str, str]:
    """The test's environment, W&B off, one thread per process, unbuffered output."""
    # WANDB_SERVICE would make the child join a W&B service of this process (if it started one).
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "WANDB_SERVICE")
    e = {k: v for k, v in os.environ.items() if k not in drop}
    return e | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"} | extra


def plain_cmd() -> list[str]:
    return [sys.executable, __file__]


def torchrun_cmd(nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        __file__,
    ]


def launch(cmd: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--accum", type=int, nargs="+", default=[1])
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=2)
    p.add_argument("--val-every", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--shards", default=None, help="train from shards with arsr.data.loader")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per step (to catch a run mid-way)")
    p.add_argument("--fail", default=None, help="RANK:STEP raises there")
    p.add_argument("--marker", default=None, help="rank 0 writes the finished step number here")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument(
        "--portable",
        action="store_true",
        help="the run goes to OUT/run (not OUT/accum<A>), so a rerun with another accum resumes it "
        "(accum, like ranks and workers, is a resource: never in the fingerprint)",
    )
    args = p.parse_args()

    d = init_distributed()
    for accum in args.accum:
        cfg = TrainConfig(
            max_steps=args.steps, batch_size=args.batch, amp="none",
            base_lr=args.lr, warmup_steps=2, weight_decay=0.05, grad_clip=1.0, ema=0.9,
            val_every=args.val_every, ckpt_every=args.ckpt_every, log_every=args.log_every,
            deterministic=args.deterministic,
        )  # fmt: skip
        mb = micro_batch_size(cfg, d.world_size, accum)
        torch.manual_seed(0)  # the same initial weights on every rank and in every run
        model = TinyNet(dropout=args.dropout)
        if args.shards:
            from arsr.data.loader import train_loader

            urls = sorted(str(u) for u in Path(args.shards).glob("train-*.tar"))

            def make_train_iter(k: int, urls=urls, mb=mb):
                loader = train_loader(
                    urls,
                    decode=decode_xy,
                    micro_batch=mb,
                    seed=5,
                    rank=d.rank,
                    world_size=d.world_size,
                    workers=args.workers,
                    start_step=k,
                )
                return iter(loader)
        else:

            def make_train_iter(k: int, accum=accum, mb=mb):
                return synthetic_iter(5, d.rank, d.world_size, accum, mb, k)

        def on_step(step: int, model: nn.Module) -> None:
            if args.fail and (d.rank, step) == tuple(map(int, args.fail.split(":"))):
                raise RuntimeError(f"rank {d.rank} fails on purpose at step {step}")
            if args.marker and d.is_main:
                Path(args.marker).write_text(str(step))
            time.sleep(args.sleep)

        def on_val(step: int, ema_model: nn.Module, run) -> dict:
            # What a stage does here: sample grids and per-image tables for people.
            grid = (torch.arange(8 * 8 * 3) % 256).to(torch.uint8).reshape(8, 8, 3)
            run.log_images("samples", [grid, grid.numpy()], captions=["a", "b"], step=step)
            run.log_table("per_image", ["key", "mse"], [["a", 0.5], ["b", 0.25]])
            return {"val/hook": float(step)}

        fingerprint = {"train": cfg.model_dump(mode="json"), "dropout": args.dropout, "data": args.shards}
        run_dir = Path(args.out) / ("run" if args.portable else f"accum{accum}")
        trainer = Trainer(
            kind="tinynet", model=model, model_config={"width": 32, "dropout": args.dropout}, cfg=cfg,
            loss_fn=loss_fn, make_train_iter=make_train_iter, out_dir=run_dir,
            fingerprint=fingerprint, seed=3, val_fn=val_fn,
            make_val_iter=lambda: val_batches(d.rank, d.world_size), on_step=on_step, on_val=on_val,
            model_extra={"note": 1.5}, dist_info=d, accum=accum,
        )  # fmt: skip
        trainer.fit()


if __name__ == "__main__":
    main()
