"""Benchmark the VAR transformer (class mode) against the reference FoundationVision/VAR code.

Both models get the same weights (our VAR has the reference state dict, so the reference's weights
are copied into ours; the script checks that the logits agree) and the same reference VQVAE (it
satisfies our tokenizer interface), so only the transformer code differs. Timed, interleaved, min
over --runs runs after one warm-up:

  train   fwd + CE + bwd + AdamW step (teacher forcing, fp32)
  infer   autoregressive_infer_cfg (cfg 1.5, top-k 900, top-p 0.96, VAE decode included), ours with
          the KV cache on and off
  decode  the VQVAE decode alone (shared by both, to read the transformer's share of `infer`)

then the same under bf16 autocast. --skip-decode leaves the shared decode out of `infer`. The
reference is NOT part of the project: put its files in a scratch dir outside the repo, e.g.

  git clone https://github.com/FoundationVision/VAR /tmp/varref   (only dist.py, models/ are used)
  printf 'class PyTorchModelHubMixin:\\n    pass\\n' > /tmp/varref/huggingface_hub.py   # import stub

  python benchmarks/bench_srvar.py --ref /tmp/varref [--runs 5] [--configs small,var256]
                                   [--threads 1] [--skip-decode]

Configs (reference/var_srvar.md §3): small = depth 4, pn 1,2,3,4,6,8 (L 130), B 4, VQVAE ch 64;
var256 = depth 6, VAR's 256 px pyramid (L 680), B 2, VQVAE ch 160.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from arsr.models.var import PATCH_NUMS_256, VAR

CONFIGS = {
    "small": dict(depth=4, patch_nums=(1, 2, 3, 4, 6, 8), B=4, vae_ch=64),
    "var256": dict(depth=6, patch_nums=PATCH_NUMS_256, B=2, vae_ch=160),
}
SAMPLING = dict(cfg=1.5, top_k=900, top_p=0.96)


def import_reference(ref_dir: Path):  # noqa: ANN201
    if not (ref_dir / "models" / "var.py").is_file():
        sys.exit(f"{ref_dir}: no reference VAR code there (see this script's docstring)")
    sys.path.insert(0, str(ref_dir))
    import models.var as ref_var  # noqa: PLC0415  (the reference package is named `models`)
    import models.vqvae as ref_vqvae  # noqa: PLC0415

    return ref_var.VAR, ref_vqvae.VQVAE


def interleaved(cases: dict[str, Callable[[], object]], runs: int) -> dict[str, tuple[float, float]]:
    """One warm-up each, then `runs` rounds of every case in turn -> (min wall s, min CPU s) per case.

    CPU time (all threads of this process) is the steadier number on a shared machine; with
    --threads 1 it equals wall time when the machine is otherwise idle.
    """
    for fn in cases.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(runs):
        for k, fn in cases.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)
    return {k: (min(wall[k]), min(cpu[k])) for k in cases}


def report(label: str, t: dict[str, tuple[float, float]], a: str = "ours", b: str = "ref") -> None:
    (wa, ca), (wb, cb) = t[a], t[b]
    print(f"{label:<28} {b} {wb:7.3f} s wall {cb:7.3f} s cpu | {a} {wa:7.3f} s wall {ca:7.3f} s cpu"
          f" | ratio wall {wa / wb:.2f}x  cpu {ca / cb:.2f}x")  # fmt: skip


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, label_B, x_BLCv, gt_BL, amp) -> None:  # noqa: ANN001
    with amp():
        logits = model(label_B, x_BLCv)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gt_BL.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_config(name: str, RefVAR, RefVQVAE, runs: int, skip_decode: bool) -> None:  # noqa: ANN001
    c = CONFIGS[name]
    depth, pn, B = c["depth"], c["patch_nums"], c["B"]
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints its config
        vae = RefVQVAE(vocab_size=4096, z_channels=32, ch=c["vae_ch"], test_mode=True, v_patch_nums=pn)
        ref = RefVAR(
            vae_local=vae, num_classes=1000, depth=depth, embed_dim=64 * depth, num_heads=depth,
            drop_path_rate=0.1 * depth / 24, norm_eps=1e-6, cond_drop_rate=0.1, attn_l2_norm=True,
            patch_nums=pn,
        )  # fmt: skip
        ref.init_weights(init_adaln=0.5, init_adaln_gamma=1e-3, init_head=0.02, init_std=-1)
    ours = VAR(depth=depth, num_classes=1000, patch_nums=pn, vocab_size=4096, Cvae=32)
    ours.load_state_dict(ref.state_dict())
    n_params = sum(p.numel() for p in ours.parameters()) / 1e6
    if skip_decode:  # time the transformer only: both models "decode" by slicing f_hat
        vae.fhat_to_img = lambda f_hat: f_hat[:, :3]

    g = torch.Generator().manual_seed(0)
    gt = [torch.randint(0, 4096, (B, p * p), generator=g) for p in pn]
    x_BLCv, gt_BL = vae.quantize.idxBl_to_var_input(gt), torch.cat(gt, 1)
    label_B = torch.randint(0, 1000, (B,), generator=g)

    ref.eval(), ours.eval()
    ref.cond_drop_rate = 0.0  # the reference drops labels even in eval; off for the equality check
    with torch.no_grad():
        diff = (ref(label_B, x_BLCv) - ours(label_B, x_BLCv)).abs().max().item()
    ref.cond_drop_rate = 0.1
    print(f"\n== {name}: depth {depth}, L {ours.L}, B {B}, {n_params:.2f} M params, VQVAE ch {c['vae_ch']}; "
          f"max |logits ours - reference| = {diff:.1e}")  # fmt: skip
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)

    bf16 = lambda: torch.autocast("cpu", torch.bfloat16)  # noqa: E731
    for amp_name, amp in (("fp32", contextlib.nullcontext), ("bf16", bf16)):
        ref.train(), ours.train()
        t = interleaved(
            {
                "ref": lambda amp=amp: train_step(ref, opt_ref, label_B, x_BLCv, gt_BL, amp),
                "ours": lambda amp=amp: train_step(ours, opt_ours, label_B, x_BLCv, gt_BL, amp),
            },
            runs,
        )
        report(f"[{amp_name}] train step", t)

        ref.eval(), ours.eval()

        def infer_ref(amp=amp) -> None:  # noqa: ANN001
            with amp(), contextlib.redirect_stdout(io.StringIO()):
                ref.autoregressive_infer_cfg(B, label_B, g_seed=0, **SAMPLING)

        def infer_ours(use_cache: bool, amp=amp) -> None:  # noqa: ANN001
            with amp():
                ours.autoregressive_infer_cfg(label_B, vae, seed=0, use_cache=use_cache, **SAMPLING)

        cases = {
            "ref": infer_ref,
            "ours": lambda: infer_ours(True),
            "ours_nocache": lambda: infer_ours(False),
        }
        if not skip_decode:
            f_hat = torch.randn(B, 32, pn[-1], pn[-1])
            cases["decode"] = lambda amp=amp, f_hat=f_hat: amp_call(amp, vae.fhat_to_img, f_hat)
        t = interleaved(cases, runs)
        what = "transformer only" if skip_decode else "incl. decode"
        report(f"[{amp_name}] infer ({what})", t)
        report(f"[{amp_name}] infer, ours no KV cache", t, a="ours_nocache")
        if not skip_decode:
            print(f"[{amp_name}] VQVAE decode alone {t['decode'][0]:.3f} s wall {t['decode'][1]:.3f} s cpu")


def amp_call(amp, fn, *args):  # noqa: ANN001, ANN201
    with amp(), torch.no_grad():
        return fn(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", type=Path, default=Path("/tmp/varref"), help="reference VAR checkout (scratch)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--configs", default="small,var256")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--skip-decode", action="store_true", help="leave the (shared) VQVAE decode out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    RefVAR, RefVQVAE = import_reference(args.ref)
    warnings.filterwarnings("ignore", category=FutureWarning)  # the reference's torch.cuda.amp calls
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; min of {args.runs} runs")
    for name in args.configs.split(","):
        bench_config(name, RefVAR, RefVQVAE, args.runs, args.skip_decode)


if __name__ == "__main__":
    main()
