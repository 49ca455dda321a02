"""Training-engine throughput on this machine's CPUs: DDP scaling and bf16 autocast.

    python benchmarks/bench_ddp.py [--steps 30] [--width 256] [--depth 4]

Runs the real engine (arsr.train.Trainer) on a small GPT-style transformer with random tokens:
  1. 1 process x 1 thread, fp32
  2. 2 processes x 1 thread under torchrun (gloo), fp32, same per-rank batch: the goal is
     >= 1.8x the samples/s of (1)
  3. 1 process x 1 thread, bf16 autocast, against (1)'s step time
Steady-state figures: steps after the first few (warm-up) are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
import torch.nn.functional as F
from torch import nn

WARMUP = 5


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 512, width: int = 256, depth: int = 4, heads: int = 4, seq: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(1, seq, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, idx_BL: torch.Tensor) -> torch.Tensor:
        x_BLC = self.tok(idx_BL) + self.pos[:, : idx_BL.shape[1]]
        L = idx_BL.shape[1]
        return self.head(self.blocks(x_BLC, mask=self.causal[:L, :L], is_causal=True))


def worker(args: argparse.Namespace) -> None:
    """One engine run; rank 0 prints a JSON line with the steady-state step time."""
    from arsr.config import TrainConfig
    from arsr.train.dist import cleanup, init_distributed
    from arsr.train.engine import Trainer, micro_batch_size

    torch.set_num_threads(1)
    d = init_distributed()
    cfg = TrainConfig(
        max_steps=args.steps, batch_size=args.micro_batch * d.world_size, amp=args.amp,
        base_lr=1e-4, warmup_steps=0, val_every=10**6, ckpt_every=10**6, log_every=10,
    )  # fmt: skip
    mb, seq = micro_batch_size(cfg, d.world_size), args.seq
    torch.manual_seed(0)
    model = TinyGPT(width=args.width, depth=args.depth, seq=seq)

    def batches(k: int):
        g = torch.Generator().manual_seed(1000 * d.rank + k)
        while True:
            yield {"idx": torch.randint(0, 512, (mb, seq + 1), generator=g)}

    def loss_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        idx = batch["idx"]
        logits_BLV = model(idx[:, :-1])
        return F.cross_entropy(logits_BLV.flatten(0, 1).float(), idx[:, 1:].flatten()), {}

    stamps: dict[int, tuple[float, float]] = {}

    def on_step(step: int, model: nn.Module) -> None:
        # Wall time, and this process's CPU time (all its threads, gloo's included): on a machine
        # shared with other jobs the wall time also counts waiting for a core.
        stamps[step] = (time.perf_counter(), time.process_time())

    with TemporaryDirectory() as tmp:
        Trainer(
            kind="tinygpt", model=model, model_config={}, cfg=cfg, loss_fn=loss_fn, make_train_iter=batches,
            out_dir=Path(tmp) / "run", fingerprint={}, on_step=on_step, dist_info=d,
        ).fit()  # fmt: skip
    n = args.steps - WARMUP
    step_s = (stamps[args.steps][0] - stamps[WARMUP][0]) / n
    cpu_s = (stamps[args.steps][1] - stamps[WARMUP][1]) / n
    if d.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(json.dumps({"world": d.world_size, "amp": args.amp, "step_s": step_s, "cpu_s": cpu_s,
                          "params": n_params}))  # fmt: skip
    cleanup()


def launch(args: argparse.Namespace, nproc: int, amp: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--amp", amp] + [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("steps", "width", "depth", "seq", "micro_batch")
    ]
    if nproc > 1:
        cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", __file__]
    env = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if p.returncode:
        sys.exit(f"run failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=16, help="samples per rank per step")
    p.add_argument("--amp", default="none", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    one = launch(args, 1, "none")
    two = launch(args, 2, "none")
    bf16 = launch(args, 1, "bf16")
    mb = args.micro_batch
    print(f"TinyGPT {one['params'] / 1e6:.2f}M params, width {args.width}, depth {args.depth}, "
          f"seq {args.seq}, {mb} samples per rank per step, "
          f"{args.steps} steps ({WARMUP} warm-up)")  # fmt: skip
    rows = [
        ("1 proc x 1 thread, fp32", one, mb),
        ("2 procs x 1 thread, fp32 (DDP, gloo)", two, 2 * mb),
        ("1 proc x 1 thread, bf16 autocast", bf16, mb),
    ]
    base = mb / one["step_s"]
    for name, r, samples in rows:
        rate = samples / r["step_s"]
        print(f"  {name:38s} {1 / r['step_s']:6.2f} steps/s  {1000 * r['step_s']:7.1f} ms/step "
              f"(CPU {1000 * r['cpu_s']:6.1f} ms)  {rate:7.1f} samples/s  ({rate / base:.2f}x)")  # fmt: skip
    speedup = (2 * mb / two["step_s"]) / base
    print(f"DDP scaling 2 vs 1 process: {speedup:.2f}x samples/s (goal >= 1.8x)")
    # If each rank had a core to itself, a step would take its CPU time: the scaling without
    # other jobs competing for the cores (gloo's threads' CPU time included).
    ideal = 2 * one["cpu_s"] / two["cpu_s"]
    print(f"  CPU-time based (each rank on a free core): {ideal:.2f}x")
    print(f"bf16 / fp32 step time: {bf16['step_s'] / one['step_s']:.2f} wall, "
          f"{bf16['cpu_s'] / one['cpu_s']:.2f} CPU time")  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
