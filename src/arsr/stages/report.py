"""Stage `report`: one Markdown page for people — metrics table, training curves, samples.

    python -m arsr.stages.report      # reads eval/ and runs/<stage>/, writes reports/

``reports/report.md`` holds the evaluation table (pandas -> Markdown), each training
stage's final metrics, ``reports/curves.png`` (matplotlib, from ``runs/*/plots/*.tsv``)
and the sample grids (copied into ``reports/samples/`` so the folder stands alone); to W&B, the
evaluation table (a wandb.Table) and the curves.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from arsr.config import Params, stage_param_values  # noqa: E402
from arsr.eval.registry import METRICS  # noqa: E402
from arsr.infer.registry import CEILING_METHODS, method_order, method_title  # noqa: E402
from arsr.io import atomic_write_text  # noqa: E402
from arsr.provenance import describe  # noqa: E402
from arsr.stages.common import EVAL_DIR, REPORTS_DIR, RUNS_DIR, eval_artifact, stage_main  # noqa: E402
from arsr.train.logging import init_wandb  # noqa: E402

TRAIN_STAGES = ("base", "vqvae", "srvar", "mar")
MAX_PANELS = 6


def metrics_table(metrics: dict) -> str:
    """Markdown table: one row per (dataset, method), one column per registry metric present (with
    its direction); the best value of each column within a dataset in bold (ceiling rows, which see
    the HR, are not ranked)."""
    rows = []
    for dataset, by_method in metrics.items():
        shown = [m for m in METRICS.values() if all(m.name in v for v in by_method.values())]
        ranked = {m: v for m, v in by_method.items() if m not in CEILING_METHODS}
        best = {k.name: k.best([v[k.name] for v in ranked.values()]) for k in shown if ranked}
        for method, v in sorted(by_method.items(), key=lambda kv: method_order(kv[0])):
            row = {"dataset": dataset, "method": method_title(method)}
            for k in shown:
                cell = f"{v[k.name]:.{k.digits}f}"
                row[f"{k.title} {k.arrow}"] = (
                    f"**{cell}**" if method in ranked and v[k.name] == best[k.name] else cell
                )
            rows.append({**row, "n": v["n"]})
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def read_plots(stage_dir: Path) -> dict[str, pd.DataFrame]:
    return {f.stem: pd.read_csv(f, sep="\t") for f in sorted((stage_dir / "plots").glob("*.tsv"))}


def curve_panels(names: list[str]) -> list[tuple[str, str | None, str | None]]:
    """(title, train series, val series) panels, most telling first: the loss, then every metric
    that has a validation curve (train and val drawn together), then the other training losses and
    metrics; per-scale breakdowns (``*_s<N>``), lr and grad norm last."""
    have = set(names)
    bases = []
    for n in names:
        base = n.removeprefix("val_")
        if base not in bases:
            bases.append(base)

    def rank(base: str) -> tuple[int, str]:
        if base == "loss":
            return 0, base
        if re.search(r"_s\d+$", base) or base in ("tlr", "tnm"):
            return 4, base
        if base.startswith("bicubic"):  # a constant reference (train_base's val bicubic_psnr)
            return 3, base
        if f"val_{base}" in have:
            return 1 if "psnr" in base or "acc" in base else 2, base
        return 3 if "loss" not in base else 2, base

    return [
        (b, b if b in have else None, f"val_{b}" if f"val_{b}" in have else None)
        for b in sorted(bases, key=rank)
    ]


def plot_curves(runs: Path, out_png: Path) -> list[str]:
    """One row of panels per training stage (loss and validation metrics first); returns the stages drawn."""
    stages = {s: read_plots(runs / s) for s in TRAIN_STAGES}
    stages = {s: p for s, p in stages.items() if p}
    if not stages:
        return []
    ncols = max(min(len(curve_panels(list(p))), MAX_PANELS) for p in stages.values())
    fig, axes = plt.subplots(len(stages), ncols, figsize=(3.2 * ncols, 2.6 * len(stages)), squeeze=False)
    for r, (stage, plots) in enumerate(stages.items()):
        panels = curve_panels(list(plots))[:MAX_PANELS]
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(panels):
                ax.axis("off")
                continue
            title, train, val = panels[c]
            for series, label, style in ((train, "train", "-"), (val, "val", "o-")):
                if series is not None:
                    df = plots[series]
                    ax.plot(df["step"], df[df.columns[1]], style, lw=1.2, ms=3, label=label)
            if train and val:
                ax.legend(fontsize=7)
            ax.set_title(f"{stage}: {title if train else 'val ' + title}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return list(stages)


PARAMS: tuple[str, ...] = ()  # reads no params
# Every stage's timing.json, in DAG order (`runs/<folder>`), for the provenance table.
TIMED_STAGES = (
    ("shard", "shard"), ("train_base", "base"), ("train_vqvae", "vqvae"), ("tokenize", "tokenize"),
    ("train_srvar", "srvar"), ("train_mar", "mar"), ("evaluate", "evaluate"),
)  # fmt: skip


def provenance(runs: Path) -> tuple[str, str]:
    """(one line naming where the evaluation ran, a Markdown table: stage | measured on | seconds)
    from the ``machine`` each stage wrote into its timing.json; stages trained elsewhere (another
    CPU's bf16 kernels give other numbers) show up as a different row."""
    rows, eval_machine = [], ""
    for stage, folder in TIMED_STAGES:
        path = runs / folder / "timing.json"
        if not path.is_file():
            continue
        timing = json.loads(path.read_text())
        machine = describe(timing["machine"]) if "machine" in timing else "(not recorded)"
        seconds = timing.get("wall_s", timing.get("seconds"))
        rows.append({"stage": stage, "measured on": machine, "seconds": seconds})
        if stage == "evaluate":
            eval_machine = machine
    table = pd.DataFrame(rows).to_markdown(index=False) if rows else ""
    return eval_machine, table


def run(args: argparse.Namespace, params: Params) -> None:
    runs, eval_dir, out = Path(args.runs), Path(args.eval), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    lines = [
        "# arsr report",
        "",
        "## Evaluation",
        "",
        "PSNR/SSIM on Y and PSNR on RGB with `scale` pixels shaved; LPIPS (AlexNet) and DISTS on RGB.",
        "↑/↓: higher/lower is better; bold: the best method per column (the tokenizer's reconstruction",
        "sees the HR and is not ranked).",
        "",
        metrics_table(metrics),
        "",
    ]
    eval_machine, machines = provenance(runs)
    if eval_machine:
        lines[2:2] = [f"Measured on {eval_machine}; every stage's machine is under Provenance below.", ""]
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
    if machines:
        lines += ["## Provenance", "", "Where each stage ran (runs/<stage>/timing.json).", "", machines, ""]
    samples = sorted((eval_dir / "samples").glob("*.png"))
    if samples:
        dest = out / "samples"
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir()
        lines += ["## Samples (val images from different photos; LR shown enlarged, nearest)", ""]
        for s in samples:
            shutil.copyfile(s, dest / s.name)
            lines += [f"![{s.stem}](samples/{s.name})", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    _log_wandb(params, metrics, out / "curves.png" if drawn else None, eval_dir, runs)
    print(f"report: {out / 'report.md'}")


def _log_wandb(params: Params, metrics: dict, curves: Path | None, eval_dir: Path, runs: Path) -> None:
    """The stage's W&B run: the evaluation as a table (numbers, not Markdown: sortable in the
    dashboard) and the training curves; it uses the eval artifact."""
    run = init_wandb("report", stage_param_values(params, PARAMS), out_dir=runs)
    names = [k for k in METRICS if all(k in v for rows in metrics.values() for v in rows.values())]
    rows = [
        [dataset, method_title(method), *(v[k] for k in names), v["n"]]
        for dataset, by_method in metrics.items()
        for method, v in sorted(by_method.items(), key=lambda kv: method_order(kv[0]))
    ]
    run.log_table("metrics", ["dataset", "method", *names, "n"], rows)
    if curves is not None:
        run.log_images("curves", [str(curves)])
    run.use_artifact(*eval_artifact(eval_dir))
    run.finish()


def _add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--runs", default=str(RUNS_DIR))
    ap.add_argument("--eval", default=str(EVAL_DIR))
    ap.add_argument("--out", default=str(REPORTS_DIR))


def main(argv: list[str] | None = None) -> int:
    return stage_main("report", __doc__, run, argv, _add_args)


if __name__ == "__main__":
    sys.exit(main())
