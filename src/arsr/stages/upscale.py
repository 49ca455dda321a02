"""`arsr upscale`: super-resolve image files with a trained SRVAR or MAR model.

    arsr upscale --model runs/srvar/model.pt --input FILE_OR_DIR --output DIR [--cfg 1.5 ...]

Images of any size are cut into overlapping tiles of the model's grid, super-resolved and
blended (``arsr.eval.tiling``). ``model.pt`` is self-contained (model, VQVAE weights,
latent stats), so the right tokenizer always comes with it. Sampling settings default to
params.yaml's ``eval`` section when there is one, else to the schema's defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from arsr.config import ConfigError, EvalConfig, load_params
from arsr.data.sources import IMAGE_SUFFIXES, ImageError, SourceImage, load_rgb
from arsr.eval.tiling import Upscaler, upscale_image
from arsr.models.vqvae import VQVAE
from arsr.stages.common import StageError
from arsr.train.checkpoint import CheckpointError, load_model_file, safe_load

# model.pt kind -> the stage module that knows how to turn it into an Upscaler.
UPSCALER_MODULES = {"srvar": "arsr.stages.train_srvar", "mar": "arsr.stages.train_mar"}


class VQVAEReconstructor:
    """The VQVAE's reconstruction of an HR tile (scale 1): the ceiling of the token models."""

    scale = 1

    def __init__(self, vqvae: VQVAE, hr_size: int):
        self.vqvae, self.hr_size = vqvae, hr_size
        self.device = next(vqvae.parameters()).device

    @torch.no_grad()
    def __call__(self, hr_B3HW: torch.Tensor, seed: int) -> torch.Tensor:
        return self.vqvae.idxBl_to_img(self.vqvae.img_to_idxBl(hr_B3HW))


def load_vqvae(model_file: dict[str, Any], device: torch.device | str = "cpu") -> VQVAE:
    """Rebuild a frozen VQVAE from a model.pt dict (kind 'vqvae')."""
    vqvae = VQVAE(**model_file["config"])
    vqvae.load_state_dict(model_file["state_dict"])
    return vqvae.to(device).freeze()


def model_kind(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file (train it first, e.g. `dvc repro train_srvar`)")
    d = safe_load(path)
    if not isinstance(d, dict) or "kind" not in d:
        raise CheckpointError(f"{path} is not an arsr model.pt file")
    return str(d["kind"])


def load_upscaler(path: str | Path, eval_cfg: EvalConfig, device: torch.device | str = "cpu") -> Upscaler:
    """An Upscaler for a model.pt of any SR kind (srvar, mar); other kinds are refused by name."""
    kind = model_kind(path)
    if kind not in UPSCALER_MODULES:
        raise CheckpointError(
            f"{path} holds a {kind!r} model; `upscale` needs an SR model ({', '.join(UPSCALER_MODULES)})"
        )
    module = importlib.import_module(UPSCALER_MODULES[kind])
    return module.make_upscaler(load_model_file(path, kind), eval_cfg, device)


def list_inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--input {path}: no image files inside")
    return files


def _eval_config(params_path: str, overrides: dict[str, Any]) -> EvalConfig:
    base = EvalConfig()
    if Path(params_path).is_file():
        with contextlib.suppress(ConfigError):  # upscale works outside a project too
            base = load_params(params_path).eval
    return base.model_copy(update={k: v for k, v in overrides.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    eval_cfg = _eval_config(
        args.params,
        {
            "srvar_cfg": args.cfg,
            "mar_cfg": args.cfg,
            "srvar_top_k": args.top_k,
            "srvar_top_p": args.top_p,
            "mar_temperature": args.temperature,
            "mar_num_iter": args.steps,
            "seed": args.seed,
        },
    )
    device = torch.device(args.device)
    upscaler = load_upscaler(args.model, eval_cfg, device)
    inputs = list_inputs(Path(args.input))
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in tqdm(inputs, desc="upscale", unit="img", disable=None):
        try:
            lr, _notes = load_rgb(SourceImage("in", path.name, path, 0), 89_478_485)
        except ImageError as err:
            print(f"upscale: skipped {path}: {err}", file=sys.stderr)
            failed += 1
            continue
        sr = upscale_image(
            lr, upscaler, eval_cfg.tile_overlap, eval_cfg.batch_size, seed=eval_cfg.seed, device=device
        )
        Image.fromarray(np.ascontiguousarray(sr)).save(out_dir / f"{path.stem}_x{upscaler.scale}.png")
    print(
        f"upscale: {len(inputs) - failed} image(s) -> {out_dir}"
        + (f", {failed} unreadable" if failed else "")
    )
    return 1 if failed == len(inputs) else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="arsr upscale", description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("--model", required=True, help="runs/srvar/model.pt or runs/mar/model.pt")
    ap.add_argument("--input", required=True, help="an image file or a folder of images")
    ap.add_argument("--output", required=True, help="folder for <name>_x<scale>.png")
    ap.add_argument("--params", default="params.yaml", help="sampling defaults from its eval section")
    ap.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    ap.add_argument("--top-k", type=int, help="SRVAR top-k (0 = off)")
    ap.add_argument("--top-p", type=float, help="SRVAR top-p (0 = off)")
    ap.add_argument("--temperature", type=float, help="MAR sampling temperature")
    ap.add_argument("--steps", type=int, help="MAR unmasking steps")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except (StageError, CheckpointError, FileNotFoundError) as err:
        print(f"arsr upscale: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
