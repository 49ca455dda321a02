"""GPU checks of the models (run on a CUDA machine; benchmarks/gpu_check.sh runs it after the DAG).

1. SRVAR on CUDA: teacher-forced logits == KV-cached logits fed the same tokens (fp32, TF32 off).
2. Which SDPA kernels VAR's attention uses under bf16 autocast (flash for the unmasked groups).
3. VAR-d16 at 256 px (class mode, L = 680), batch 16: train step (fwd + CE + bwd + AdamW) and
   ``autoregressive_infer_cfg`` (cfg 1.5, KV cache), bf16 autocast, eager vs ``torch.compile``.

    python benchmarks/gpu_check.py [--batch 16] [--runs 5] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from arsr.models.srvar import SRVAR, SRVARConfig
from arsr.models.var import VAR
from arsr.models.vqvae import VAR_VQVAE, VQVAE, VQVAEConfig


def timed(fn: Callable[[], object], runs: int) -> float:
    """Min wall seconds over ``runs`` calls after two warm-ups (CUDA synchronised)."""
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def check_kv_cache(dev: torch.device) -> float:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pn = (1, 2, 3, 4, 6, 8)
    vq_config = VQVAEConfig(vocab_size=512, z_channels=32, ch=32, ch_mult=(1, 2, 2, 4), patch_nums=pn)
    vae = VQVAE(vq_config).to(dev).freeze()
    config = SRVARConfig(depth=4, width=0, heads=0, drop_path=0.0)  # VAR's rule: width 256, 4 heads
    model = SRVAR(config, patch_nums=pn, vocab_size=512, Cvae=32).to(dev).eval()
    g = torch.Generator(dev).manual_seed(0)
    gt = [torch.randint(0, 512, (4, p * p), generator=g, device=dev) for p in pn]
    lrf = torch.randn(4, 32, 8, 8, generator=g, device=dev)
    seen: list[torch.Tensor] = []

    def feed(si: int, logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits)
        return gt[si]

    with torch.no_grad():
        tf, _ = model(lrf, vae.idxBl_to_var_input(gt))
        model.sample_fhat(lrf, vae, cfg=0, pick=feed)
    diff = (torch.cat(seen, 1) - tf).abs().max().item()
    torch.backends.cuda.matmul.allow_tf32 = True
    return diff


def sdpa_kernels(model: VAR, x: torch.Tensor, label: torch.Tensor) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.autocast("cuda", torch.bfloat16):
        model(label, x)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(k in n.lower() for k in ("flash", "fmha", "attention", "cudnn")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    out["kv_cache_max_abs_diff"] = check_kv_cache(dev)
    print(f"SRVAR KV cache vs teacher forcing (fp32, CUDA): max |diff| {out['kv_cache_max_abs_diff']:.2e}")

    torch.manual_seed(0)
    B = args.batch
    vae = VQVAE(VAR_VQVAE).to(dev).freeze()  # VAR's tokenizer layout (random weights: timing only)
    model = VAR(depth=16).to(dev)
    label = torch.randint(0, 1000, (B,), device=dev)
    gt = [torch.randint(0, 4096, (B, p * p), device=dev) for p in model.patch_nums]
    gt_BL, x = torch.cat(gt, 1), vae.idxBl_to_var_input(gt)
    out["sdpa_kernels"] = sdpa_kernels(model, x, label)
    print("SDPA kernels under bf16:", out["sdpa_kernels"], flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(m: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cuda", torch.bfloat16):
                logits = m(label, x)
            F.cross_entropy(logits.view(-1, 4096), gt_BL.view(-1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    model.train()
    out["train_step_s_eager"] = timed(step(model), args.runs)
    print(f"VAR-d16 train step, B {B}, bf16, eager: {out['train_step_s_eager'] * 1e3:.1f} ms", flush=True)
    t = time.perf_counter()
    compiled = torch.compile(model)
    step(compiled)()
    out["compile_s"] = time.perf_counter() - t
    out["train_step_s_compiled"] = timed(step(compiled), args.runs)
    print(
        f"  torch.compile: {out['train_step_s_compiled'] * 1e3:.1f} ms (build {out['compile_s']:.0f} s)",
        flush=True,
    )

    model.eval()

    def infer() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            model.autoregressive_infer_cfg(label, vae, cfg=1.5, top_k=900, top_p=0.96, seed=0)

    out["infer_s"] = timed(infer, args.runs)
    print(f"VAR-d16 autoregressive_infer_cfg, B {B}, cfg 1.5, bf16: {out['infer_s'] * 1e3:.1f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
