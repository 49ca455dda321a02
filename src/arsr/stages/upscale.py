"""`arsr upscale`: super-resolve image files with a trained SR model (any family of the registry).

    arsr upscale --model runs/srvar/model.pt --input FILE_OR_DIR --output DIR [--srvar-cfg 1.5 ...]
                 [--srvar-decode sample|greedy|soft --srvar-temperature 0.8 ...]

Images of any size are cut into overlapping tiles of the model's grid, super-resolved and
blended (``arsr.infer.tiling``). ``model.pt`` is self-contained (model, tokenizer: the VQVAE and,
for a residual tokenizer, its base and sigma; token facts), so the right tokenizer always comes
with it. Settings come by the rule ``arsr evaluate --hr-dir`` follows too (``arsr.stages.common``'s
``tool_settings``): params.yaml's (or ``--params FILE``'s) eval section, the schema's defaults
outside a project, overridden by ``--seed`` and ``--<family>-<field>``; one line on stderr says
which were used. Progress: a bar on a terminal, plain lines in a log.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from arsr.data.sources import IMAGE_SUFFIXES, ImageError, SourceImage, load_rgb
from arsr.infer.registry import FAMILIES, add_sampling_args, load_upscaler, sampling_overrides
from arsr.infer.tiling import upscale_image
from arsr.progress import progress
from arsr.stages.common import (
    add_tool_args,
    default_device,
    report_errors,
    stage_parser,
    tool_batch_size,
    tool_settings,
)


def list_inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--input {path}: no image files inside")
    return files


def run(args: argparse.Namespace) -> int:
    eval_cfg = tool_settings("upscale", args, sampling_overrides(args))
    seed, batch = eval_cfg.seed, tool_batch_size(args)  # (--seed, --batch-size applied)
    device = torch.device(args.device) if args.device else default_device()
    upscaler = load_upscaler(args.model, eval_cfg, device)
    inputs = list_inputs(Path(args.input))
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    # The i-th file samples as the i-th image of `arsr evaluate --hr-dir` (the same sorted order).
    for index, path in enumerate(progress(inputs, desc="upscale", unit="img")):
        try:
            lr, _notes = load_rgb(SourceImage("in", path.name, path, 0), 89_478_485)
        except ImageError as err:
            print(f"upscale: skipped {path}: {err}", file=sys.stderr)
            failed += 1
            continue
        sr = upscale_image(lr, upscaler, eval_cfg.tile_overlap, batch, seed=seed, device=device, index=index)
        Image.fromarray(np.ascontiguousarray(sr)).save(out_dir / f"{path.stem}_x{upscaler.scale}.png")
    print(
        f"upscale: {len(inputs) - failed} image(s) -> {out_dir}"
        + (f", {failed} unreadable" if failed else "")
    )
    return 1 if failed == len(inputs) else 0


def _add_args(ap: argparse.ArgumentParser) -> None:
    families = ", ".join(FAMILIES)
    ap.add_argument("--model", required=True, help=f"an SR model.pt ({families}): runs/<family>/model.pt")
    ap.add_argument("--input", required=True, help="an image file or a folder of images")
    ap.add_argument("--output", required=True, help="folder for <name>_x<scale>.png")
    ap.add_argument("--device", help="default: cuda when there is a GPU (ARSR_DEVICE overrides)")
    add_tool_args(ap)
    add_sampling_args(ap)


def main(argv: list[str] | None = None) -> int:
    args = stage_parser("upscale", __doc__, _add_args).parse_args(argv)
    return report_errors("upscale", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
