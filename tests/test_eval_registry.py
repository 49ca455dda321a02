"""The metric registry (arsr.eval.registry), labelled grids, and the report's table and curves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arsr.config import ConfigError, parse_params
from arsr.eval import perceptual
from arsr.eval.grids import labelled_row
from arsr.eval.metrics import psnr, rgb_to_y
from arsr.eval.registry import METRICS, runnable, select
from arsr.stages.evaluate import EvalImage, sample_indices
from arsr.stages.report import curve_panels, metrics_table

ROOT = Path(__file__).resolve().parents[1]
SET5 = ROOT.parent / "shared" / "data" / "sr_benchmarks" / "Set5"


def _photo(seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(40, 216, size=(size, size, 3)).astype(np.uint8)


def test_every_metric_declares_direction_convention_and_scores_a_batch() -> None:
    hr = [_photo(i) for i in range(3)]
    rng = np.random.default_rng(9)
    noisy = [np.clip(h.astype(int) + rng.integers(-20, 21, h.shape), 0, 255).astype(np.uint8) for h in hr]
    assert list(METRICS) == ["psnr", "ssim", "psnr_rgb", "lpips", "dists"]
    for m in METRICS.values():
        assert m.convention in ("y-uint8-shaved", "rgb-uint8-shaved", "rgb-unit")
        assert (m.weights is not None) == (m.convention == "rgb-unit")
        same, worse = m.fn(hr, hr, 4, "cpu"), m.fn(noisy, hr, 4, "cpu")
        assert len(same) == len(worse) == 3
        for s, w in zip(same, worse):  # identical beats noisy in the metric's own direction
            assert (s > w) if m.higher_is_better else (s < w), (m.name, s, w)


def test_psnr_rgb_sees_colour_damage_that_y_psnr_hides() -> None:
    """A grey HR and an SR with the same luma but tinted (R up, B down): Y-PSNR cannot tell, RGB can."""
    hr = np.full((24, 24, 3), 128, np.uint8)
    sr = hr.copy()
    sr[..., 0] += 10
    sr[..., 2] -= 26  # 65.481 x 10 ~ 24.966 x 26: the same Y after rounding
    assert np.array_equal(np.floor(rgb_to_y(sr) + 0.5), np.floor(rgb_to_y(hr) + 0.5))
    y_psnr = METRICS["psnr"].fn([sr], [hr], 4, "cpu")[0]
    rgb_psnr = METRICS["psnr_rgb"].fn([sr], [hr], 4, "cpu")[0]
    assert y_psnr == 100.0 and rgb_psnr < 30  # exact Y: capped, never inf
    assert rgb_psnr == pytest.approx(psnr(sr, hr, 4))
    grey = hr[..., 0]  # a grey image scores as its three equal channels
    assert METRICS["psnr_rgb"].fn([grey], [grey + 1], 4, "cpu")[0] == pytest.approx(psnr(hr, hr + 1, 4))


def test_learned_metrics_batch_images_of_mixed_sizes_like_one_by_one() -> None:
    hrs = [_photo(1, 32), _photo(2, 48), _photo(3, 32)]
    srs = [np.roll(h, 1, axis=1) for h in hrs]
    for name in ("lpips", "dists"):
        batched = METRICS[name].fn(srs, hrs, 4, "cpu")
        single = [METRICS[name].fn([s], [h], 4, "cpu")[0] for s, h in zip(srs, hrs)]
        assert batched == pytest.approx(single, abs=1e-5)


def test_unknown_metrics_are_named_and_missing_weights_skip_with_the_package(monkeypatch) -> None:
    with pytest.raises(ValueError, match="'fid'"):
        select(["psnr", "fid"])
    assert [m.name for m in select(["dists", "psnr"])] == ["psnr", "dists"]  # registry order
    monkeypatch.setattr(perceptual, "available", lambda metric: metric != "dists")
    ok, skipped = runnable(select(["psnr", "lpips", "dists"]))
    assert [m.name for m in ok] == ["psnr", "lpips"]
    assert len(skipped) == 1 and "dists" in skipped[0]
    assert "pip install --no-deps DISTS-pytorch==0.1" in skipped[0]


def test_params_refuse_an_unknown_metric_by_key() -> None:
    with pytest.raises(ConfigError, match="eval"):
        parse_params({"eval": {"metrics": ["psnr", "niqe"]}})


def test_labelled_row_enlarges_small_crops_and_keeps_columns_apart() -> None:
    cols = [(name, np.full((16, 16, 3), v, np.uint8)) for name, v in (("LR", 0), ("SRVAR", 255))]
    cols.append(("HR", np.full((16, 16), 90, np.uint8)))  # grey column
    grid = labelled_row(cols, min_side=64)
    k, header = 4, grid.shape[0] - 64
    assert header > 10 and grid.shape == (header + 16 * k, 3 * 16 * k + 2 * 4, 3)
    body = grid[header:]
    assert (body[:, :64] == 0).all() and (body[:, 68:132] == 255).all() and (body[:, 136:] == 90).all()
    assert (grid[:header] < 128).any()  # the labels are drawn
    with pytest.raises(ValueError, match="HR"):
        labelled_row([("LR", np.zeros((16, 16, 3), np.uint8)), ("HR", np.zeros((8, 8, 3), np.uint8))])


def test_sample_images_come_from_different_photos() -> None:
    names = [f"{p}-abc_{i:05d}" for p in ("astronaut", "coffee", "retina") for i in range(5)]
    images = [EvalImage("val", n, np.zeros((4, 4), np.uint8), np.zeros((1, 1), np.uint8)) for n in names]
    picks = sample_indices(images, 3)
    assert len({images[i].name.rsplit("_", 1)[0] for i in picks}) == 3
    picks = sample_indices(images, 5)  # more samples than photos: every photo, then spread
    assert len(set(picks)) == 5 and len({images[i].name.rsplit("_", 1)[0] for i in picks}) == 3


def test_report_table_has_arrows_and_bolds_the_best_ranked_method() -> None:
    metrics = {
        "val": {
            "bicubic": {"psnr": 28.0, "ssim": 0.7, "psnr_rgb": 26.0, "lpips": 0.33, "dists": 0.27, "n": 4},
            "vqvae_rec": {"psnr": 31.0, "ssim": 0.9, "psnr_rgb": 30.0, "lpips": 0.05, "dists": 0.1, "n": 4},
            "srvar": {"psnr": 27.5, "ssim": 0.72, "psnr_rgb": 26.5, "lpips": 0.20, "dists": 0.24, "n": 4},
        }
    }
    table = metrics_table(metrics)
    lines = table.splitlines()
    assert "PSNR-Y (dB) ↑" in lines[0] and "LPIPS ↓" in lines[0] and "DISTS ↓" in lines[0]
    bic, rec, sr = (next(line for line in lines if name in line) for name in ("Bicubic", "ceiling", "SRVAR"))
    assert "**28.0000**" in bic and "**0.2000**" in sr and "**0.72000**" in sr and "**26.5000**" in sr
    assert "**" not in rec  # sees the HR: never ranked


def test_curve_panels_put_the_loss_and_validation_metrics_first() -> None:
    names = ["code_usage", "code_usage_s0", "loss", "rec_l1", "rec_l2", "tlr", "tnm", "val_code_usage",
             "val_rec_l1", "val_rec_psnr", "vq_loss"]  # fmt: skip
    panels = curve_panels(names)
    assert panels[0] == ("loss", "loss", None)
    assert panels[1] == ("rec_psnr", None, "val_rec_psnr")
    assert {p[0] for p in panels[:5]} >= {"rec_l1", "code_usage", "vq_loss"}
    assert [p[0] for p in panels[-3:]] == ["code_usage_s0", "tlr", "tnm"]
    assert ("rec_l1", "rec_l1", "val_rec_l1") in panels


@pytest.mark.skipif(not SET5.is_dir(), reason="../shared/data/sr_benchmarks/Set5 not present")
def test_standalone_evaluate_prints_every_requested_metric(tmp_path: Path) -> None:
    out = tmp_path / "x4.json"
    proc = subprocess.run(
        [sys.executable, "-m", "arsr.cli", "evaluate", "--hr-dir", str(SET5 / "HR"), "--scale", "4",
         "--methods", "bicubic", "--metrics", "psnr,ssim,lpips,dists", "--json", str(out)],
        check=True, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    header = next(line for line in proc.stdout.splitlines() if "psnr" in line)
    assert header.split() == ["psnr", "↑", "ssim", "↑", "lpips", "↓", "dists", "↓"]
    assert "Set5" in proc.stdout
    result = json.loads(out.read_text())
    mean = result["mean"]["bicubic"]
    assert abs(mean["psnr"] - 28.42) <= 0.01  # the published bicubic x4 row (rgb-uint8 Y)
    assert 0.2 < mean["lpips"] < 0.5 and 0.1 < mean["dists"] < 0.4
    per = pd.DataFrame(result["per_image"]["bicubic"]).T
    assert set(per.columns) == {"psnr", "ssim", "lpips", "dists"} and len(per) == 5
