"""Data benchmark: shard throughput and training-loader throughput vs. plain in-memory decoding.

    python benchmarks/bench_data.py [--steps 60] [--batch 32] [--workers 2]

Shard: images/s of the `shard` stage on the built-in photos (default params).
Loader: samples/s of `train_loader` (PNG decode + collate in `--workers` processes) against
decoding the very same PNG bytes in memory in this process with no loader (the ratio's goal
is >= 0.9: the loader must not be the bottleneck it adds).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data._utils.collate import default_collate

from arsr.data.loader import decode_pair, train_loader
from arsr.data.shards import iter_tar_samples, shard_urls
from arsr.stages.shard import run_shard


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        t0 = time.perf_counter()
        stats = run_shard(str(tmp / "params.yaml"), str(tmp / "shards"), str(tmp / "runs"))
        dt = time.perf_counter() - t0
        n_img = sum(s["images"] for s in stats["splits"].values())
        n_smp = sum(s["samples"] for s in stats["splits"].values())
        print(
            f"shard: {n_img} images, {n_smp} samples in {dt:.2f} s = {n_img / dt:.2f} images/s, "
            f"{n_smp / dt:.0f} samples/s (workers={params['data']['workers']})"
        )

        urls = shard_urls(tmp / "shards", "train")
        n = args.steps * args.batch
        raw = []
        for s in iter_tar_samples(urls):
            raw.append(s)
            if len(raw) == n:
                break
        while len(raw) < n:
            raw += raw[: n - len(raw)]
        t0 = time.perf_counter()
        for i in range(0, n, args.batch):
            default_collate([decode_pair(s) for s in raw[i : i + args.batch]])
        base = n / (time.perf_counter() - t0)

        loader = train_loader(
            urls,
            decode=decode_pair,
            micro_batch=args.batch,
            seed=0,
            rank=0,
            world_size=1,
            workers=args.workers,
            num_steps=args.steps + 5,
        )
        it = iter(loader)
        for _ in range(5):  # worker start-up is not throughput
            next(it)
        t0 = time.perf_counter()
        for _ in it:
            pass
        ours = n / (time.perf_counter() - t0)
        print(f"decode in memory, no loader: {base:.0f} samples/s")
        ratio = ours / base
        print(f"train_loader ({args.workers} workers): {ours:.0f} samples/s  ratio {ratio:.2f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
