"""Does SRVAR's diffusion refiner raise val PSNR? Decides the default of ``srvar.refiner`` (DESIGN §4).

    python benchmarks/bench_refiner.py [--params params.yaml] [--images 100] [--json bench_refiner.json]

Run from a project whose ``data/shards``, ``data/tokens`` and ``runs/vqvae/model.pt`` exist
(``dvc repro tokenize``). Trains SRVAR twice with the real stage (``arsr.stages.launch train_srvar``,
params.yaml's ``srvar`` section with ``model.refiner`` false / true, into a temp folder, W&B off), then
super-resolves the first ``--images`` val crops as ``evaluate`` does (``eval`` defaults, seed 0)
and scores Y-PSNR / SSIM:

  plain        SRVAR trained without the refiner
  refined      SRVAR trained with the refiner, sampled residual added to f_hat
  refined-off  the same model with the residual left out (the same tokens: the refiner samples
               after them), i.e. the refiner's own effect

Prints mean PSNR/SSIM per row and the paired PSNR differences (mean +- standard error).
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

import numpy as np
import yaml

from arsr.config import EvalConfig
from arsr.eval.metrics import score_y
from arsr.infer.srvar import make_upscaler
from arsr.infer.tiling import upscale_image
from arsr.stages.evaluate import val_images
from arsr.train.checkpoint import load_model_file


def train(params: dict, refiner: bool, tmp: Path) -> tuple[Path, float]:
    p = json.loads(json.dumps(params))
    p.setdefault("srvar", {}).setdefault("model", {})["refiner"] = refiner
    params_file = tmp / f"params_refiner_{refiner}.yaml"
    params_file.write_text(yaml.safe_dump(p, sort_keys=False))
    out = tmp / f"srvar_refiner_{refiner}"
    env = dict(os.environ, WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "arsr.stages.launch", "train_srvar", "--params", str(params_file)]
    t0 = time.perf_counter()
    subprocess.run([*cmd, "--out", str(out)], check=True, env=env)
    return out / "model.pt", time.perf_counter() - t0


def scores(upscaler, images: list, scale: int, cfg: EvalConfig) -> np.ndarray:
    """[N, 2] (PSNR, SSIM) per image, as `evaluate` scores them (rgb-uint8 protocol)."""
    out = []
    for img in images:
        sr = upscale_image(img.lr, upscaler, overlap_hr=cfg.tile_overlap, seed=cfg.seed)
        out.append(score_y(sr, img.hr, scale))
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--images", type=int, default=100, help="val crops scored (0 = all)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    params = yaml.safe_load(Path(args.params).read_text())
    cfg = EvalConfig()
    images = val_images(Path("data/shards"), args.images)
    rows, timing = {}, {}
    with TemporaryDirectory() as tmp:
        for refiner in (False, True):
            model_path, seconds = train(params, refiner, Path(tmp))
            timing[f"train_refiner_{refiner}_s"] = round(seconds, 1)
            d = load_model_file(model_path, kind="srvar")
            up = make_upscaler(d, cfg.srvar, "cpu")
            scale = up.scale
            if not refiner:
                rows["plain"] = scores(up, images, scale, cfg)
                continue
            rows["refined"] = scores(up, images, scale, cfg)
            up.refine = False
            rows["refined-off"] = scores(up, images, scale, cfg)
    result: dict = {"images": len(images), "timing": timing, "mean": {}, "paired_psnr_diff": {}}
    for name, s in rows.items():
        result["mean"][name] = {"psnr": float(s[:, 0].mean()), "ssim": float(s[:, 1].mean())}
        print(f"{name:12s} PSNR {s[:, 0].mean():.3f} dB  SSIM {s[:, 1].mean():.4f}  ({len(s)} val crops)")
    for a, b in (("refined", "refined-off"), ("refined", "plain")):
        d = rows[a][:, 0] - rows[b][:, 0]
        se = d.std(ddof=1) / np.sqrt(len(d))
        result["paired_psnr_diff"][f"{a} - {b}"] = {"mean": float(d.mean()), "se": float(se)}
        print(f"PSNR {a} - {b}: {d.mean():+.3f} +- {se:.3f} dB (mean +- s.e., paired)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
