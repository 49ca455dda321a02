"""Stage `report`: one Markdown page for people — metrics table, training curves, samples.

    python -m arsr.stages.report      # reads eval/ and runs/<stage>/, writes reports/

``reports/report.md`` holds the evaluation table (pandas -> Markdown), each training
stage's final metrics, ``reports/curves.png`` (matplotlib, from ``runs/*/plots/*.tsv``)
and the sample grids (copied into ``reports/samples/`` so the folder stands alone).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from arsr.config import Params  # noqa: E402
from arsr.infer.registry import FAMILIES  # noqa: E402
from arsr.io import atomic_write_text  # noqa: E402
from arsr.stages.common import EVAL_DIR, REPORTS_DIR, RUNS_DIR, stage_main  # noqa: E402

TRAIN_STAGES = ("vqvae", "srvar", "mar")
METHOD_NAMES = {
    "bicubic": "Bicubic",
    "vqvae_rec": "VQVAE reconstruction (ceiling)",
    "srvar": "SRVAR",
    "mar": "MAR-SR",
}


def metrics_table(metrics: dict) -> str:
    rows = [
        {
            "dataset": dataset,
            "method": METHOD_NAMES.get(m, m),
            "PSNR (dB)": v["psnr"],
            "SSIM": v["ssim"],
            "n": v["n"],
        }
        for dataset, by_method in metrics.items()
        for m, v in by_method.items()
    ]
    return pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f")


def read_plots(stage_dir: Path) -> dict[str, pd.DataFrame]:
    return {f.stem: pd.read_csv(f, sep="\t") for f in sorted((stage_dir / "plots").glob("*.tsv"))}


def plot_curves(runs: Path, out_png: Path) -> list[str]:
    """One row of panels per training stage (its losses/metrics vs step); returns the stages drawn."""
    stages = {s: read_plots(runs / s) for s in TRAIN_STAGES}
    stages = {s: {k: v for k, v in p.items() if len(v) > 1} for s, p in stages.items()}
    stages = {s: p for s, p in stages.items() if p}
    if not stages:
        return []
    ncols = max(min(len(p), 6) for p in stages.values())
    fig, axes = plt.subplots(len(stages), ncols, figsize=(3.2 * ncols, 2.6 * len(stages)), squeeze=False)
    for r, (stage, plots) in enumerate(stages.items()):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(plots):
                ax.axis("off")
                continue
            name, df = list(plots.items())[c]
            ax.plot(df["step"], df[df.columns[1]], lw=1.2)
            ax.set_title(f"{stage}: {name}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return list(stages)


PARAMS: tuple[str, ...] = ()  # reads no params


def run(args: argparse.Namespace, params: Params) -> None:
    runs, eval_dir, out = Path(args.runs), Path(args.eval), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    lines = [
        "# arsr report",
        "",
        "## Evaluation (PSNR/SSIM on Y, `scale` pixels shaved)",
        "",
        metrics_table(metrics),
        "",
    ]
    lines += ["## Training", ""]
    for stage in TRAIN_STAGES:
        path = runs / stage / "metrics.json"
        if path.is_file():
            final = json.loads(path.read_text())
            flat = pd.json_normalize(final, sep="/").T.reset_index()
            flat.columns = ["metric", "value"]
            lines += [f"### {stage}", "", flat.to_markdown(index=False), ""]
    drawn = plot_curves(runs, out / "curves.png")
    if drawn:
        lines += ["## Training curves", "", "![training curves](curves.png)", ""]
    samples = sorted((eval_dir / "samples").glob("*.png"))
    if samples:
        dest = out / "samples"
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir()
        columns = " | ".join(["LR", "bicubic", *(f.title for f in FAMILIES.values()), "HR"])
        lines += [f"## Samples ({columns})", ""]
        for s in samples:
            shutil.copyfile(s, dest / s.name)
            lines += [f"![{s.stem}](samples/{s.name})", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    print(f"report: {out / 'report.md'}")


def _add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--runs", default=str(RUNS_DIR))
    ap.add_argument("--eval", default=str(EVAL_DIR))
    ap.add_argument("--out", default=str(REPORTS_DIR))


def main(argv: list[str] | None = None) -> int:
    return stage_main("report", __doc__, run, argv, _add_args)


if __name__ == "__main__":
    sys.exit(main())
