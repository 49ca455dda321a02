"""The regression base: the model (MATLAB bicubic + residual), its Upscaler, the registry entry, and
the `train_base` stage on tiny shards (2 DDP ranks through the launcher, W&B offline).

The stage fixture cuts tiny shards (built-in photos, 32 px HR, 8 px LR) and trains a small base for
a few dozen steps; the tests check its outputs, that it moved away from bicubic towards the HR, and
that its val numbers are exactly what `evaluate` and `arsr upscale` get from its model.pt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stage_helpers import one_thread, write_params_file  # noqa: F401 (one_thread: autouse)

from arsr.config import ConfigError, EvalConfig, load_params, parse_params
from arsr.data.imresize import imresize
from arsr.data.loader import to_uint8, to_unit_range
from arsr.data.shards import decode_png, iter_tar_samples, shard_urls
from arsr.eval.registry import select
from arsr.infer.base import BaseUpscaler, load_base
from arsr.infer.registry import FAMILIES, add_sampling_args, load_upscaler, method_order, sampling_overrides
from arsr.infer.tiling import upscale_image
from arsr.models.base import BaseSR, BaseSRConfig, bicubic_up
from arsr.stages import evaluate, upscale
from arsr.stages.shard import run_shard
from arsr.stages.train_base import augment
from arsr.train.checkpoint import load_model_file

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30
TINY_MODEL = {"channels": 16, "depth": 4, "act": "relu"}
TINY = {
    "seed": 0,
    "data": {"source": "builtin", "hr_size": 32, "scale": 4, "crop_stride": 32, "max_crops_per_image": 12,
             "min_shards": 2},
    "base": {"model": TINY_MODEL,
             "train": {"max_steps": STEPS, "batch_size": 16, "warmup_steps": 3,
                       "amp": "none", "val_every": 15, "log_every": 5, "ckpt_every": 100}},
    "vqvae": {"model": {"patch_nums": [1, 2, 3, 4]}},  # the tokenizer's grid must fit 32 px (unused here)
    "resources": {"shard": {"workers": 1}, "train_base": {"nproc": 2, "workers": 1}},
}  # fmt: skip


def _lr_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish uint8 RGB image (noise would make bicubic differences meaningless)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(x / 3.0)[..., None] * np.cos(y / 4.0)[..., None]
    return np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def _random_tail(model: BaseSR, seed: int = 0) -> BaseSR:
    """The zero-initialised last conv given random weights, so the residual is not 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.tail.weight.copy_(torch.randn(model.tail.weight.shape, generator=gen) * 0.05)
    return model


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("h", "w", "scale"), [(8, 8, 4), (13, 17, 4), (7, 10, 2), (9, 5, 3)])
def test_bicubic_upsample_is_matlab_imresize(h: int, w: int, scale: int) -> None:
    lr = _lr_image(h, w, seed=h * w)
    x_13hw = to_unit_range(lr)[None]
    ref = imresize(x_13hw[0].permute(1, 2, 0).double().numpy(), output_shape=(h * scale, w * scale))
    up = bicubic_up(x_13hw, scale)
    assert up.shape == (1, 3, h * scale, w * scale) and up.dtype == torch.float32
    np.testing.assert_allclose(up[0].permute(1, 2, 0).double().numpy(), ref, atol=1e-5)
    # ... and the uint8 image it rounds to is MATLAB's uint8 bicubic up to its per-pass rounding
    u8 = to_uint8(up[0]).astype(int)
    assert np.abs(u8 - imresize(lr, scale).astype(int)).max() <= 1


def test_bicubic_upsample_stays_fp32_under_bf16_autocast() -> None:
    x = to_unit_range(_lr_image(8, 8))[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        up = bicubic_up(x, 4)
    assert up.dtype == torch.float32 and torch.equal(up, bicubic_up(x, 4))


def test_untrained_base_is_exactly_bicubic_and_shapes() -> None:
    torch.manual_seed(0)
    cfg = BaseSRConfig(channels=16, depth=3)
    model = BaseSR(cfg, scale=4)
    lr = torch.rand(2, 3, 6, 9) * 2 - 1
    sr = model(lr)
    assert sr.shape == (2, 3, 24, 36)
    assert torch.equal(sr, bicubic_up(lr, 4))  # the zero-initialised tail: training starts at bicubic
    assert model.features(lr).shape == (2, 16, 6, 9)
    assert model.residual(lr).shape == (2, 3, 24, 36)
    # ... and it can leave bicubic: the tail gets a gradient at once
    torch.nn.functional.mse_loss(sr, torch.rand_like(sr)).backward()
    assert model.tail.weight.grad.abs().sum() > 0
    assert len([m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]) == cfg.depth
    assert model.model_config() == asdict(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _random_tail(model)(lr).dtype == torch.float32


def test_augment_applies_the_same_symmetry_to_hr_and_lr() -> None:
    hr = to_unit_range(_lr_image(16, 16, seed=1))[None].repeat(32, 1, 1, 1)
    lr = torch.from_numpy(np.stack([imresize(hr[0].permute(1, 2, 0).double().numpy(), 0.25)] * 32))
    lr = lr.permute(0, 3, 1, 2).float()
    torch.manual_seed(3)
    hr_a, lr_a = augment(hr, lr)
    assert len({tuple(x.flatten()[:20].tolist()) for x in hr_a}) > 4  # several of the 8 symmetries drawn
    for h, lo in zip(hr_a, lr_a):  # the augmented LR is the bicubic LR of the augmented HR
        down = imresize(h.permute(1, 2, 0).double().numpy(), 0.25)
        np.testing.assert_allclose(lo.permute(1, 2, 0).numpy(), down, atol=1e-5)


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        ({"base": {"model": {"depth": 1}}}, "base.model.depth"),
        ({"base": {"model": {"channels": 0}}}, "base.model.channels"),
        ({"base": {"model": {"act": "gelu"}}}, "base.model.act"),
        ({"base": {"model": {"width": 64}}}, "base.model.width: unknown key"),
        ({"base": {"augment": "sometimes"}}, "base.augment"),
        (
            {"resources": {"train_base": {"nproc": 3}}},
            "base.train.batch_size: 32 is not divisible by resources.train_base.nproc",
        ),
    ],
)
def test_a_bad_base_key_is_named(raw: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        parse_params(raw)


def test_a_partial_base_train_section_keeps_the_base_recipe() -> None:
    p = parse_params({"base": {"train": {"max_steps": 60}}})
    assert p.base.train.max_steps == 60 and p.base.train.schedule == "cos" and p.base.train.weight_decay == 0


# ------------------------------------------------------------------------------------------
# The Upscaler and the registry
# ------------------------------------------------------------------------------------------
def test_upscaler_tiles_an_image_larger_than_one_tile() -> None:
    """A 26 x 37 LR image through 8 px tiles (32 px HR): the untrained base is bicubic, tile by tile,
    so the blended result is the whole image's bicubic except near tile seams (edge replication
    inside a tile); a trained-like base gives the same output whatever the tile batching."""
    torch.manual_seed(0)
    model = BaseSR(BaseSRConfig(channels=8, depth=3), scale=4)
    up = BaseUpscaler(model, hr_size=32)
    lr = _lr_image(26, 37, seed=5)
    sr = upscale_image(lr, up, overlap_hr=16, batch_size=4)
    assert sr.shape == (104, 148, 3) and sr.dtype == np.uint8
    ref = np.clip(np.floor(imresize(lr.astype(np.float64), 4) + 0.5), 0, 255)
    diff = np.abs(sr.astype(int) - ref)
    assert diff.mean() < 0.5 and diff.max() <= 6, (diff.mean(), diff.max())
    _random_tail(model)
    one = upscale_image(lr, up, overlap_hr=16, batch_size=1)
    assert np.array_equal(one, upscale_image(lr, up, overlap_hr=16, batch_size=16))
    assert not np.array_equal(one, sr)
    with pytest.raises(ValueError, match=r"\[B,3,8,8\]"):
        up(torch.zeros(1, 3, 9, 8), seed=0)


def test_registry_lists_base_first_without_sampling_settings() -> None:
    assert list(FAMILIES)[0] == "base" and FAMILIES["base"].title == "Regression base"
    assert FAMILIES["base"].sampling is None
    assert method_order("bicubic") < method_order("base") < method_order("srvar") < method_order("mar")
    assert "base" not in EvalConfig.model_fields  # no eval.base section
    ap = argparse.ArgumentParser()
    add_sampling_args(ap)
    options = [o for a in ap._actions for o in a.option_strings]
    assert "--srvar-cfg" in options and not any(o.startswith("--base-") for o in options)
    args = ap.parse_args(["--mar-num-iter", "3"])
    assert sampling_overrides(args) == {"mar": {"num_iter": 3}}


# ------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def proj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shard -> train_base with 2 ranks (torchrun through the launcher, W&B offline), in a temp folder."""
    root = tmp_path_factory.mktemp("base")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        params = write_params_file(root, TINY)
        run_shard(str(params), str(root / "shards"), str(root / "runs"))
    finally:
        os.chdir(cwd)
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "WANDB_SERVICE")  # a parent's W&B service too
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(WANDB_MODE="offline", WANDB_RUN_GROUP="stage-base-test", ARSR_THREADS_PER_RANK="1")
    cmd = [sys.executable, "-m", "arsr.stages.launch", "train_base", "--params", str(params),
           "--shards", str(root / "shards"), "--out", str(root / "runs/base")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    (root / "train.log").write_text(proc.stdout + proc.stderr)
    return root


def _pairs(proj: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    samples = list(iter_tar_samples(shard_urls(proj / "shards", split)))
    lr = torch.stack([to_unit_range(decode_png(s["lr.png"])) for s in samples])
    hr = torch.stack([to_unit_range(decode_png(s["hr.png"])) for s in samples])
    return lr, hr


def test_stage_writes_model_metrics_plots_and_checkpoint(proj: Path) -> None:
    run = proj / "runs/base"
    d = load_model_file(run / "model.pt", kind="base")
    assert (
        d["config"]
        == asdict(BaseSRConfig(**TINY_MODEL))
        == asdict(load_params(proj / "params.yaml").base.model)
    )
    assert d["extra"] == {"scale": 4, "hr_size": 32}
    assert d["step"] == STEPS and d["fingerprint"]["stage"] == "train_base"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == STEPS
    assert set(metrics["train"]) == {"loss"}  # the final loss; l2, lr and grad norm are in plots/
    assert {"l2", "psnr", "bicubic_psnr"} == set(metrics["val"])
    assert 15 < metrics["val"]["bicubic_psnr"] < 40 and 15 < metrics["val"]["psnr"] < 40
    plots = {p.stem for p in (run / "plots").glob("*.tsv")}
    assert {"l2", "loss", "val_l2", "val_psnr", "val_bicubic_psnr"} <= plots
    val_rows = (run / "plots/val_psnr.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in val_rows] == [15, 30]
    assert (run / "ckpt/last.pt").is_file()
    timing = json.loads((run / "timing.json").read_text())
    assert timing["world_size"] == 2 and timing["steps_run"] == STEPS
    assert "2 rank(s)" in (proj / "train.log").read_text()


def test_wandb_gets_the_training_and_val_curves(proj: Path) -> None:
    from wandb_read import history_keys, offline_runs, read_run, run_info

    runs = {run_info(read_run(r))["job_type"]: r for r in offline_runs(proj / "runs" / "wandb")}
    assert "train_base" in runs
    keys = history_keys(read_run(runs["train_base"]))
    assert {"l2", "loss", "val/psnr", "val/bicubic_psnr", "val/l2", "val/sample_psnr"} <= keys
    assert "val/samples.filenames" in keys


def test_trained_base_left_bicubic_towards_the_hr(proj: Path) -> None:
    """The tail moved off zero, and on its train crops the trained base is closer to the HR than
    bicubic (its own starting point)."""
    model = load_base(load_model_file(proj / "runs/base/model.pt", kind="base"))
    assert model.tail.weight.abs().max() > 0
    lr, hr = _pairs(proj, "train")
    with torch.no_grad():
        mse_base = torch.nn.functional.mse_loss(model(lr), hr).item()
    mse_bicubic = torch.nn.functional.mse_loss(bicubic_up(lr, 4), hr).item()
    assert mse_base < mse_bicubic, (mse_base, mse_bicubic)


def test_val_metrics_are_what_evaluate_scores(proj: Path) -> None:
    """The stage's val psnr / bicubic_psnr are evaluate's psnr of the base and bicubic rows
    (every val crop is one tile; same uint8 Y, same shave)."""
    val = json.loads((proj / "runs/base/metrics.json").read_text())["val"]
    cfg = EvalConfig(metrics=["psnr"])
    images = evaluate.val_images(proj / "shards", 0)
    ups = evaluate.load_upscalers(["base"], proj / "runs", cfg)
    assert isinstance(ups["base"], BaseUpscaler)
    per_image, _ = evaluate.evaluate(images, ["bicubic", "base"], ups, 4, cfg, select(["psnr"]))
    means = per_image.groupby("method")["psnr"].mean()
    assert val["psnr"] == pytest.approx(means["base"], abs=1e-3)
    assert val["bicubic_psnr"] == pytest.approx(means["bicubic"], abs=1e-9)


def test_arsr_upscale_takes_the_base_model(proj: Path, tmp_path: Path) -> None:
    """`arsr upscale` with runs/base/model.pt on an image larger than one tile (no --base-* options)."""
    lr = _lr_image(11, 21, seed=2)
    Image.fromarray(lr).save(tmp_path / "in.png")
    model = proj / "runs/base/model.pt"
    argv = ["--model", str(model), "--input", str(tmp_path / "in.png"), "--output", str(tmp_path / "out"),
            "--params", str(proj / "params.yaml"), "--device", "cpu"]  # fmt: skip
    assert upscale.main(argv) == 0
    sr = np.asarray(Image.open(tmp_path / "out" / "in_x4.png"))
    assert sr.shape == (44, 84, 3)
    up = load_upscaler(model, EvalConfig(), "cpu")
    assert np.array_equal(sr, upscale_image(lr, up, overlap_hr=16, batch_size=16))
