"""Stage `train_mar` and MAR's Upscaler on tiny token shards.

A module fixture cuts tiny image shards (built-in photos, 32 px), tokenizes them with an untrained
tiny VQVAE (the stage only needs *a* tokenizer; its quality is the train_vqvae tests' business) and
trains a tiny MAR-SR for a few steps through the launcher: torchrun, 2 DDP ranks on CPU, bf16, W&B
offline. The tests check the outputs, recompute the val loss and the inference path independently,
and run `arsr upscale` on the resulting model.pt. A second fixture does the same in one process with
a residual tokenizer (an untrained tiny base + VQVAE): an LR condition of the base's width.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stage_helpers import last_plotted, one_thread, write_params_file  # noqa: F401 (one_thread: autouse)

from arsr.cli import main as arsr_main
from arsr.config import load_params
from arsr.data.loader import decode_pair, decode_tokens, eval_loader, to_uint8
from arsr.data.shards import shard_urls
from arsr.data.tokens import TokenFacts
from arsr.infer.mar import LatentNorm, MARSampling, build_mar_sr, lr_norm_of, make_upscaler
from arsr.infer.tokenizer import load_tokenizer, load_vqvae, lr_condition, upsample_lr
from arsr.models.base import BaseSR, BaseSRConfig
from arsr.models.mar import MAR, MARConfig
from arsr.models.vqvae import VQVAE
from arsr.stages import tokenize, train_mar
from arsr.stages.shard import run_shard
from arsr.train.checkpoint import load_model_file, save_model_file
from arsr.train.dist import DistInfo

STEPS = 4
TINY = {
    "seed": 0,
    "data": {"source": "builtin", "hr_size": 32, "scale": 4, "crop_stride": 32, "max_crops_per_image": 6,
             "min_shards": 2},
    "vqvae": {"model": {"ch": 16, "ch_mult": [1, 2, 2, 4], "vocab_size": 64, "z_channels": 8,
                        "patch_nums": [1, 2, 3, 4]}},
    "mar": {"model": {"encoder_dim": 32, "decoder_dim": 32, "encoder_depth": 1, "decoder_depth": 1,
                      "encoder_heads": 2, "decoder_heads": 2, "buffer_size": 4, "diffloss_width": 32,
                      "diffloss_depth": 1, "num_sampling_steps": "ddim4"},
            "train": {"max_steps": STEPS, "batch_size": 8, "base_lr": 0.01,
                      "warmup_steps": 0, "val_every": 2, "log_every": 2, "ckpt_every": 100}},
    "eval": {"mar": {"num_iter": 2}},
    "resources": {"shard": {"workers": 1}, "tokenize": {"batch_size": 8, "workers": 1},
                  "train_mar": {"nproc": 2, "workers": 0}},
}  # fmt: skip


def write_params(folder: Path, **over) -> Path:
    return write_params_file(folder, TINY, **over)


BASE_CHANNELS = 16  # the residual tokenizer's base width: its LR condition's (the latent has 8)
SIGMA = 0.3


def make_tokens(root: Path, params_path: Path, seed: int = 0, residual: bool = False) -> None:
    """shards/ -> runs/vqvae/model.pt (an untrained tokenizer: hr, or residual over an untrained
    x4 base of BASE_CHANNELS) -> tokens/ with latent_stats.json."""
    params = load_params(params_path)
    torch.manual_seed(seed)
    vae = VQVAE(params.vqvae.model)
    extra = {"target": "hr"}
    if residual:
        base = BaseSR(BaseSRConfig(channels=BASE_CHANNELS, depth=3), scale=4)
        torch.nn.init.normal_(base.tail.weight, std=0.02)  # a base that adds something to bicubic
        base_file = {"config": base.model_config(), "state_dict": base.state_dict(),
                     "extra": {"scale": 4, "hr_size": 32}}  # fmt: skip
        extra = {"target": "residual", "sigma": SIGMA, "base": base_file}
    model = root / "runs/vqvae/model.pt"
    save_model_file(model, kind="vqvae", config=vae.model_config(), state_dict=vae.state_dict(), extra=extra)
    tokenize.run_tokenize(params, root / "shards", model, root / "tokens", root / "runs")


def stage_args(root: Path, params: Path, out: Path | None = None) -> list[str]:
    return [
        "--params", str(params), "--tokens", str(root / "tokens"),
        "--vqvae", str(root / "runs/vqvae/model.pt"), "--shards", str(root / "shards"),
        "--out", str(out or root / "runs/mar"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def proj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mar")
    params = write_params(root)
    run_shard(str(params), str(root / "shards"), str(root / "runs"))
    make_tokens(root, params)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(WANDB_MODE="offline", WANDB_RUN_GROUP="stage-mar-test")
    cmd = [sys.executable, "-m", "arsr.stages.launch", "train_mar", *stage_args(root, params)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "--nproc-per-node=2" in proc.stderr  # DDP through torchrun
    return root


@pytest.fixture(scope="module")
def proj_residual(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stage in one process (W&B off) on the tokens of a residual tokenizer."""
    root = tmp_path_factory.mktemp("mar_residual")
    params = write_params(root, **{"resources.train_mar.nproc": 1})
    run_shard(str(params), str(root / "shards"), str(root / "runs"))
    make_tokens(root, params, residual=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "arsr.stages.train_mar", *stage_args(root, params)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def latent_stats(proj: Path) -> dict:
    return json.loads((proj / "tokens/latent_stats.json").read_text())


def load_mar(d: dict) -> MAR:
    """The MAR-SR of a model.pt dict (EMA weights, strict load)."""
    facts = TokenFacts.from_dict(d["extra"]["token_facts"])
    model = build_mar_sr(MARConfig(**d["config"]), facts)
    model.load_state_dict(d["state_dict"])  # strict
    return model


# ------------------------------------------------------------------------------------------
# train_mar
# ------------------------------------------------------------------------------------------
def test_model_file_is_self_contained(proj: Path):
    d = load_model_file(proj / "runs/mar/model.pt", kind="mar")
    params, stats = load_params(proj / "params.yaml"), latent_stats(proj)
    assert d["config"] == dataclasses.asdict(params.mar.model)
    assert d["step"] == STEPS and d["fingerprint"]["stage"] == "train_mar"
    load_mar(d)  # strict
    extra = d["extra"]
    facts = TokenFacts.from_dict(extra["token_facts"])
    assert (facts.hr_size, facts.scale) == (32, 4)
    assert (facts.Cvae, facts.grid, facts.num_classes) == (8, 4, 0)
    assert extra["token_facts"]["mean"] == pytest.approx(stats["mean"])
    assert extra["token_facts"]["std"] == pytest.approx(stats["std"])
    assert extra["token_facts"] == stats
    vqvae = load_model_file(proj / "runs/vqvae/model.pt", kind="vqvae")
    assert extra["vqvae"]["config"] == vqvae["config"] and extra["vqvae"]["extra"] == {"target": "hr"}
    for k, v in vqvae["state_dict"].items():
        assert torch.equal(extra["vqvae"]["state_dict"][k], v), k
    # the hr tokenizer's LR condition is normalized with the HR latents' stats
    assert extra["lr_stats"]["mean"] == pytest.approx(stats["mean"])
    assert extra["lr_stats"]["std"] == pytest.approx(stats["std"])


def test_metrics_plots_and_timing(proj: Path):
    metrics = json.loads((proj / "runs/mar/metrics.json").read_text())
    assert metrics["step"] == STEPS
    assert set(metrics["train"]) == {"loss"}  # diff_loss, lr, grad norm: plots
    assert metrics["train"]["loss"] == pytest.approx(last_plotted(proj / "runs/mar", "diff_loss"), rel=1e-3)
    assert set(metrics["val"]) == {"diff_loss"} and 0 < metrics["val"]["diff_loss"] < 10
    plots = {p.stem for p in (proj / "runs/mar/plots").glob("*.tsv")}
    assert {"loss", "diff_loss", "tnm", "tlr", "val_diff_loss"} <= plots
    assert (proj / "runs/mar/ckpt/last.pt").is_file()
    assert json.loads((proj / "runs/mar/timing.json").read_text())["world_size"] == 2


def test_val_loss_is_the_ema_models_loss_over_the_val_split(proj: Path):
    """Recompute metrics.json's val diff_loss from model.pt: each rank's share of the val split,
    with the per-(rank, batch) generators, under bf16 autocast like the engine."""
    d = load_model_file(proj / "runs/mar/model.pt", kind="mar")
    model = load_mar(d)
    model.eval()
    norm = LatentNorm(d["extra"]["token_facts"]["mean"], d["extra"]["token_facts"]["std"])
    urls = shard_urls(proj / "tokens", "val")
    total, count = 0.0, 0
    for rank in range(2):
        dist = DistInfo(rank, 2, rank, torch.device("cpu"))
        validator = train_mar.Validator(urls, norm, norm, False, 0, dist)  # hr: LR normalized like HR
        for batch in validator.make_iter():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                s, n = validator(model, batch)["diff_loss"]
            total, count = total + s, count + n
    val = json.loads((proj / "runs/mar/metrics.json").read_text())["val"]
    assert val["diff_loss"] == pytest.approx(total / count, rel=2e-2)


def test_wandb_gets_losses_and_sample_grids(proj: Path):
    from wandb_read import history_keys, offline_runs, read_run, run_info

    runs = {run_info(read_run(r))["job_type"]: r for r in offline_runs(proj / "runs" / "wandb")}
    assert "train_mar" in runs
    keys = history_keys(read_run(runs["train_mar"]))
    assert {"loss", "diff_loss", "tnm", "tlr", "val/diff_loss", "val/sample_psnr"} <= keys
    assert "val/samples.filenames" in keys
    images = list((runs["train_mar"] / "files/media/images").glob("val/samples_*.png"))
    assert len(images) == STEPS // 2  # one grid per validation
    grid = np.asarray(Image.open(images[0]))
    assert grid.shape[:2] == (train_mar.NUM_PREVIEWS * 32, 3 * 32)  # rows of LR | MAR | HR


def test_inputs_from_another_tokenizer_are_refused(proj: Path, tmp_path: Path, capsys):
    params = write_params(tmp_path)
    other = tmp_path / "other_vqvae.pt"
    vae = VQVAE(load_params(params).vqvae.model)
    save_model_file(other, kind="vqvae", config=vae.model_config(), state_dict=vae.state_dict())
    args = stage_args(proj, params, tmp_path / "mar")
    args[args.index("--vqvae") + 1] = str(other)
    assert train_mar.main(args) == 2
    err = capsys.readouterr().err
    assert "tokenized with another VQVAE" in err and "rerun tokenize" in err


@pytest.mark.parametrize("key", ["hr_size", "scale", "num_classes"])
def test_token_facts_are_read_strictly(proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture, key: str):
    """The data facts come from latent_stats.json only (no fallback to the image shards'
    stats.json): a missing key is one clear line naming the file and the key, exit status 2."""
    (tmp_path / "tokens").mkdir()
    facts_file = tmp_path / "tokens/latent_stats.json"
    facts_file.write_text(json.dumps({k: v for k, v in latent_stats(proj).items() if k != key}))
    args = stage_args(proj, proj / "params.yaml", tmp_path / "mar")
    args[args.index("--tokens") + 1] = str(tmp_path / "tokens")
    assert train_mar.main(args) == 2
    err = capsys.readouterr().err
    assert f"arsr train_mar: error: {facts_file}: missing {key}" in err and "rerun" in err
    assert not (tmp_path / "mar").exists()


# ------------------------------------------------------------------------------------------
# The Upscaler
# ------------------------------------------------------------------------------------------
def val_pairs(proj: Path, n: int) -> tuple[dict, dict]:
    images = next(iter(eval_loader(shard_urls(proj / "shards", "val"), decode=decode_pair, batch_size=n)))
    tokens = next(iter(eval_loader(shard_urls(proj / "tokens", "val"), decode=decode_tokens, batch_size=n)))
    assert images["key"] == tokens["key"]
    return images, tokens


def test_upscaler_conditions_on_lrf_as_tokenize_computed_it(proj: Path):
    d = load_model_file(proj / "runs/mar/model.pt", kind="mar")
    up = make_upscaler(d, MARSampling(), "cpu")
    images, tokens = val_pairs(proj, 4)
    torch.testing.assert_close(
        up.condition(images["lr"]),
        up.lr_norm.normalize(tokens["lrf"]),
        rtol=0,
        atol=2e-2 / min(up.lr_norm.std_C),
    )  # float16 storage of lrf


def assert_inference_input_is_training_input(proj: Path) -> None:
    up = make_upscaler(load_model_file(proj / "runs/mar/model.pt", kind="mar"), MARSampling(), "cpu")
    facts = TokenFacts.read(proj / "tokens")
    images, tokens = val_pairs(proj, 8)
    assert tokens["lrf"].dtype == torch.float32  # decode_tokens: float32 of the stored float16 values
    seen = {}

    def spy(x, lrf, labels, generator=None):  # stands in for MAR: records what training feeds it
        seen.update(x=x, lrf=lrf, labels=labels)
        return x.sum()

    lr_norm = train_mar.make_lr_norm(facts, shard_urls(proj / "tokens", "train"))  # as the stage does
    train_mar.mar_loss(spy, tokens, LatentNorm(facts.mean, facts.std), lr_norm, use_labels=False)
    trained_on = seen["lrf"]
    shape = (8, facts.lr_channels, facts.grid, facts.grid)
    assert trained_on.dtype == torch.float32 and trained_on.shape == shape
    inferred_on = up.condition(images["lr"])
    assert inferred_on.dtype == trained_on.dtype
    assert torch.equal(inferred_on, trained_on), (inferred_on - trained_on).abs().max()


def test_inference_input_is_bit_equal_to_training_input(proj: Path):
    """MAR-SR's inference input is bit-equal to its training input for the same LR: the token
    shard's stored ``lrf`` (float16), normalized as ``train_mar.mar_loss`` hands it to the model,
    equals ``MARUpscaler.condition`` of the image shard's LR crop."""
    assert_inference_input_is_training_input(proj)


def test_upscaler_samples_then_requantizes_and_decodes(proj: Path):
    """The output is VQVAE.decode(f_to_fhat(denormalize(sample_tokens(lrf, eval settings, seed))))."""
    d = load_model_file(proj / "runs/mar/model.pt", kind="mar")
    sampling = MARSampling(num_iter=3, cfg=1.5, cfg_schedule="constant", temperature=0.9)
    up = make_upscaler(d, sampling, "cpu")
    assert (up.hr_size, up.scale) == (32, 4)
    images, _ = val_pairs(proj, 2)
    out = up(images["lr"], seed=7)
    assert out.shape == (2, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(up(images["lr"], seed=7), out, rtol=0, atol=0)

    model = load_mar(d)
    vae = load_vqvae(d["extra"]["vqvae"])
    mean = torch.tensor(d["extra"]["token_facts"]["mean"])[:, None, None]
    std = torch.tensor(d["extra"]["token_facts"]["std"])[:, None, None]
    lrf16 = vae.img_to_f(torch.stack([tokenize_input(x) for x in images["lr"]])).half()  # as stored
    lrf = (lrf16.float() - mean) / std
    x = model.eval().sample_tokens(
        lrf, num_iter=3, cfg=1.5, cfg_schedule="constant", temperature=0.9,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    expected = vae.fhat_to_img(vae.f_to_fhat(x * std + mean))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert not torch.equal(up(images["lr"], seed=8), out)


def tokenize_input(lr_3hw: torch.Tensor) -> torch.Tensor:
    """The LR crop as tokenize feeds it to the encoder: uint8, MATLAB bicubic to 32 px, [-1, 1]."""
    u8 = ((lr_3hw + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    up = upsample_lr(u8, 32)
    return torch.from_numpy(up).permute(2, 0, 1).float() / 127.5 - 1


def test_arsr_upscale_writes_images_scale_times_larger(proj: Path, tmp_path: Path):
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    Image.fromarray(rng.integers(0, 256, (11, 13, 3), dtype=np.uint8)).save(tmp_path / "in/a.png")
    Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(tmp_path / "in/b.png")
    argv = ["upscale", "--model", str(proj / "runs/mar/model.pt"), "--input", str(tmp_path / "in"),
            "--output", str(tmp_path / "out"), "--params", str(proj / "params.yaml"),
            "--device", "cpu"]  # fmt: skip
    assert arsr_main(argv) == 0
    assert Image.open(tmp_path / "out/a_x4.png").size == (13 * 4, 11 * 4)
    assert Image.open(tmp_path / "out/b_x4.png").size == (5 * 4, 6 * 4)


# ------------------------------------------------------------------------------------------
# A residual tokenizer: the LR condition is the base's features, normalized by their own stats
# ------------------------------------------------------------------------------------------
def test_residual_tokenizer_trains_with_its_own_lr_width_and_stats(proj_residual: Path):
    d = load_model_file(proj_residual / "runs/mar/model.pt", kind="mar")
    extra, facts = d["extra"], TokenFacts.from_dict(d["extra"]["token_facts"])
    assert (facts.target, facts.lr_channels, facts.Cvae) == ("residual", BASE_CHANNELS, 8)
    assert extra["vqvae"]["extra"]["target"] == "residual" and extra["vqvae"]["extra"]["sigma"] == SIGMA
    assert d["state_dict"]["null_lr"].shape == (1, facts.grid**2, BASE_CHANNELS)
    load_mar(d)  # strict
    # lr_stats: the per-channel mean / std of the stored train lrf (all of it: fewer than 1024 samples)
    train = list(
        eval_loader(shard_urls(proj_residual / "tokens", "train"), decode=decode_tokens, batch_size=64)
    )
    lrf = torch.cat([b["lrf"] for b in train]).double()
    assert len(lrf) <= train_mar.LR_STATS_SAMPLES
    assert extra["lr_stats"]["mean"] == pytest.approx(lrf.mean((0, 2, 3)).tolist(), rel=1e-4, abs=1e-6)
    std = lrf.transpose(0, 1).flatten(1).std(1, unbiased=False)
    live = std > 1e-2 * std.mean()  # (dead channels are floored)
    assert torch.tensor(extra["lr_stats"]["std"])[live].tolist() == pytest.approx(
        std[live].tolist(), rel=1e-4
    )
    metrics = json.loads((proj_residual / "runs/mar/metrics.json").read_text())
    assert np.isfinite(metrics["val"]["diff_loss"])


def test_residual_inference_input_is_bit_equal_to_training_input(proj_residual: Path):
    assert_inference_input_is_training_input(proj_residual)


def test_residual_upscaler_decodes_on_top_of_the_base(proj_residual: Path):
    """Output = tok.fhat_to_img(f_to_fhat(denormalized sample), LR) = base(LR) + sigma * D(f_hat)."""
    d = load_model_file(proj_residual / "runs/mar/model.pt", kind="mar")
    sampling = MARSampling(num_iter=2)
    up = make_upscaler(d, sampling, "cpu")
    images, _ = val_pairs(proj_residual, 2)
    out = up(images["lr"], seed=5)
    assert out.shape == (2, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    tok, facts = load_tokenizer(d["extra"]["vqvae"]), TokenFacts.from_dict(d["extra"]["token_facts"])
    lr_norm = lr_norm_of(facts, d["extra"]["lr_stats"])
    lrf = lr_norm.normalize(lr_condition(tok, [to_uint8(x) for x in images["lr"]], 32))
    x = load_mar(d).eval().sample_tokens(lrf, num_iter=2, generator=torch.Generator().manual_seed(5))
    f = LatentNorm(facts.mean, facts.std).denormalize(x)
    d_img = tok.vae.decode(tok.vae.f_to_fhat(f))
    expected = (tok.base(images["lr"]) + SIGMA * d_img).clamp(-1, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Class labels
# ------------------------------------------------------------------------------------------
def test_labelled_shards_train_a_class_conditional_model(tmp_path: Path, monkeypatch):
    """data.labels: folder -> the class embedding is built and trained; upscale samples without it."""
    rng = np.random.default_rng(1)
    for cls in ("cats", "dogs"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(3):
            img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / "src" / cls / f"{i}.png")
    params = write_params(
        tmp_path,
        **{"data.source": str(tmp_path / "src"), "data.labels": "folder",
           "data.val_fraction": 0.34, "resources.train_mar.nproc": 1, "mar.train.max_steps": 8},
    )  # fmt: skip
    run_shard(str(params), str(tmp_path / "shards"), str(tmp_path / "runs"))
    make_tokens(tmp_path, params)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert train_mar.main(stage_args(tmp_path, params)) == 0
    d = load_model_file(tmp_path / "runs/mar/model.pt", kind="mar")
    assert d["extra"]["token_facts"]["num_classes"] == 2 and "class_emb.weight" in d["state_dict"]
    facts = TokenFacts.from_dict(d["extra"]["token_facts"])
    torch.manual_seed(0)  # the stage's initial weights (seed 0)
    w0 = build_mar_sr(MARConfig(**d["config"]), facts).class_emb.weight.detach().flatten()
    w = d["state_dict"]["class_emb.weight"].flatten()
    # Weight decay alone would only shrink w0; the labels' gradients move it off that line.
    off_line = w - (w @ w0) / (w0 @ w0) * w0
    assert off_line.norm() > 1e-3 * w.norm()
    images = next(iter(eval_loader(shard_urls(tmp_path / "shards", "val"), decode=decode_pair, batch_size=2)))
    out = make_upscaler(d, MARSampling(num_iter=2), "cpu")(images["lr"], seed=0)
    assert out.shape == (images["lr"].shape[0], 3, 32, 32)


def test_cli_knows_the_stage(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        arsr_main(["train_mar", "--help"])
    assert exit_info.value.code == 0
    assert "arsr train_mar" in capsys.readouterr().out
