"""MAR speed, side by side with the reference code (LTH14/mar), in one process.

The tiny config of reference/mar_diffusion.md section 10: 16x16 tokens of 16 channels, encoder and
decoder 4+4 blocks x 256, 4 heads, buffer 64, DiffLoss 3 x 256, diffusion_batch_mul 4, 1000 classes
(8.2M params), batch 8. Both models get the same weights.

- train step: forward + backward + clip(3.0) + AdamW step (MAR's no-decay groups);
- sampling: 8 images, 8 MAR steps x 50 diffusion steps, cfg 1.0 (and cfg 3.0, linear).

Runs alternate reference / arsr; each timing is the minimum over ``--repeats`` runs of wall time
(median printed too) and of process CPU time (steadier on a shared, oversubscribed CPU; exact
compute time with ``--threads 1``). fp32 first, then bf16 autocast. The reference is exported from
a git repository (``--ref-git``, default: cloned from GitHub) into a temporary folder deleted
afterwards; it needs only torch and scipy, with a stand-in for timm's ViT Block (timm itself needs
torchvision) written into that folder. Nothing of it enters this repository.

    python benchmarks/bench_mar.py --ref-git /path/to/mar-clone --threads 1 --cfg3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from arsr.models.mar import MAR, MARConfig

TIMM_STANDIN = '''
"""timm 0.9.12's ViT Block as MAR uses it: same parameter names, the fused SDPA path."""
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, drop=0.0):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(in_features, hidden_features), nn.GELU(), nn.Dropout(drop)
        self.norm, self.fc2 = nn.Identity(), nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_norm=False, proj_drop=0.0,
                 attn_drop=0.0, init_values=None, drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1, self.attn = norm_layer(dim), Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.ls1 = self.drop_path1 = nn.Identity()
        self.norm2, self.mlp = norm_layer(dim), Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.ls2 = self.drop_path2 = nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
'''

TINY = dict(width=256, depth=4, heads=4, buffer=64, dl_depth=3, dl_width=256, batch_mul=4, steps="50")


def export_reference(dest: Path, git_dir: str | None) -> None:
    """models/ and diffusion/ of LTH14/mar into dest, plus the timm stand-in."""
    if git_dir is None:
        git_dir = str(dest / "clone")
        subprocess.run(
            ["git", "clone", "-q", "--depth", "1", "https://github.com/LTH14/mar", git_dir], check=True
        )
    tar = subprocess.run(
        ["git", "-C", git_dir, "archive", "HEAD", "models", "diffusion"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    (dest / "timm" / "models").mkdir(parents=True)
    (dest / "timm" / "__init__.py").write_text("")
    (dest / "timm" / "models" / "__init__.py").write_text("")
    (dest / "timm" / "models" / "vision_transformer.py").write_text(TIMM_STANDIN)


def build_pair(ref_dir: Path, device: torch.device) -> tuple[nn.Module, MAR]:
    sys.path.insert(0, str(ref_dir))
    if device.type != "cuda":  # the reference hard-codes .cuda() in 14 places
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    from models.mar import MAR as RefMAR  # noqa: PLC0415 (the reference, from ref_dir)

    t = TINY
    torch.manual_seed(0)
    ref = RefMAR(
        img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16,
        encoder_embed_dim=t["width"], encoder_depth=t["depth"], encoder_num_heads=t["heads"],
        decoder_embed_dim=t["width"], decoder_depth=t["depth"], decoder_num_heads=t["heads"],
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), buffer_size=t["buffer"],
        diffloss_d=t["dl_depth"], diffloss_w=t["dl_width"], num_sampling_steps=t["steps"],
        diffusion_batch_mul=t["batch_mul"],
    )  # fmt: skip
    # every field given: the reference's defaults (label drop .1, dropouts .1, mask ratio >= .7) included
    config = MARConfig(
        patch_size=1, encoder_dim=t["width"], encoder_depth=t["depth"], encoder_heads=t["heads"],
        decoder_dim=t["width"], decoder_depth=t["depth"], decoder_heads=t["heads"], mlp_ratio=4.0,
        buffer_size=t["buffer"], mask_ratio_min=0.7, cond_drop=0.1, attn_dropout=0.1, proj_dropout=0.1,
        diffloss_depth=t["dl_depth"], diffloss_width=t["dl_width"], num_sampling_steps=t["steps"],
        diffusion_batch_mul=t["batch_mul"],
    )  # fmt: skip
    ours = MAR(config, grid_size=16, token_channels=16, num_classes=1000)
    ours.load_state_dict(ref.state_dict())  # same weights, same layout
    return ref.to(device), ours.to(device)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.95), wd 0.02, MAR's no-decay groups (identical for both models)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if MAR.no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.02}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds). On a shared CPU box the CPU time is the steadier of the
    two: it does not count the time other processes hold the cores."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - w0, time.process_time() - c0


def run(args: argparse.Namespace, ref: nn.Module, ours: MAR, device: torch.device, amp: str) -> dict:
    B = args.batch
    x = torch.randn(B, 16, 16, 16, device=device)
    labels = torch.randint(0, 1000, (B,), device=device)
    ctx = (
        partial(torch.autocast, device.type, dtype=torch.bfloat16)
        if amp == "bf16"
        else contextlib.nullcontext
    )
    gen = torch.Generator(device).manual_seed(0)
    opts = {"ref": make_optimizer(ref), "arsr": make_optimizer(ours)}

    def train_step(name: str) -> None:
        model = ref if name == "ref" else ours
        model.train()
        with ctx():
            loss = model(x, labels) if name == "ref" else model(x, labels_B=labels, generator=gen)
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opts[name].step()

    def sample(name: str, cfg: float) -> None:
        model = ref if name == "ref" else ours
        model.eval()
        with ctx(), torch.no_grad():
            if name == "ref":
                model.sample_tokens(B, num_iter=args.num_iter, cfg=cfg, labels=labels)
            else:
                model.sample_tokens(labels_B=labels, num_iter=args.num_iter, cfg=cfg, generator=gen)

    tasks: dict[str, Callable[[str], None]] = {
        "train_step": train_step,
        "sample_cfg1": lambda n: sample(n, 1.0),
    }
    if args.cfg3:
        tasks["sample_cfg3"] = lambda n: sample(n, 3.0)
    results = {}
    for task, fn in tasks.items():
        for name in ("ref", "arsr"):  # warm-up
            fn(name)
        times: dict[str, list[tuple[float, float]]] = {"ref": [], "arsr": []}
        for _ in range(args.repeats):  # interleaved
            for name in ("ref", "arsr"):
                times[name].append(timed(partial(fn, name), device))
        r = {}
        for name, runs in times.items():
            wall, cpu = zip(*runs)
            r |= {f"{name}_wall_min_s": min(wall), f"{name}_wall_median_s": statistics.median(wall)}
            r |= {f"{name}_cpu_min_s": min(cpu)}
        r["ratio_wall_min"] = r["arsr_wall_min_s"] / r["ref_wall_min_s"]
        r["ratio_cpu_min"] = r["arsr_cpu_min_s"] / r["ref_cpu_min_s"]
        results[task] = r
        wall = " ".join(f"{n} {r[f'{n}_wall_min_s']:.3f}s ({r[f'{n}_wall_median_s']:.3f})" for n in times)
        cpu = " ".join(f"{n} {r[f'{n}_cpu_min_s']:.3f}s" for n in times)
        print(f"{amp:5s} {task:12s} wall min (median): {wall} ratio {r['ratio_wall_min']:.2f}x", flush=True)
        print(f"{amp:5s} {task:12s} cpu min: {cpu} ratio {r['ratio_cpu_min']:.2f}x", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-git", help="a clone (or bare git dir) of LTH14/mar; default: clone from GitHub")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--num-iter", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--amp", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--cfg3", action="store_true", help="also time cfg 3.0 sampling (doubled batch)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    np.random.seed(0)  # the reference draws orders and mask ratios from numpy's global RNG
    torch.manual_seed(0)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="mar-ref-") as tmp:
        export_reference(Path(tmp), args.ref_git)
        ref, ours = build_pair(Path(tmp), device)
        n_ref = sum(p.numel() for p in ref.parameters())
        n_ours = sum(p.numel() for p in ours.parameters())
        print(f"device {device}, {args.threads} threads, torch {torch.__version__}")
        print(f"params: ref {n_ref / 1e6:.2f}M, arsr {n_ours / 1e6:.2f}M; batch {args.batch}")
        results = {"device": str(device), "threads": args.threads, "params": n_ours}
        for amp in args.amp:
            results[amp] = run(args, ref, ours, device, amp)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
