"""Stage `train_srvar` and SRVAR's upscaler (`arsr upscale`, `evaluate`).

1. The LR condition is used (issue 5): SRVAR trained by the engine with the stage's loss on 8
   samples predicts scales 0 and 1, which only the condition determines, from the true LR and not
   from another sample's LR.
2. The stage end to end on tiny token shards (shard -> tiny VQVAE -> tokenize -> launch with 2 DDP
   ranks, refiner on, W&B offline): model.pt, metrics.json, plots, W&B sample grids.
3. `arsr upscale` with the resulting model.pt: sizes, the LR path matching tokenize's, decodes, refusals.
4. The stage in one process with a residual tokenizer (untrained tiny base + VQVAE): SRVAR takes
   the base's features (another width than the latent) and decodes on top of the base.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from stage_helpers import last_plotted, one_thread  # noqa: F401 (autouse)

from arsr.cli import main as arsr_main
from arsr.config import SRVARSection, TrainConfig, load_params
from arsr.data.loader import decode_tokens, eval_loader, to_uint8, to_unit_range
from arsr.data.shards import decode_png, iter_tar_samples, shard_urls
from arsr.infer.registry import FAMILIES
from arsr.infer.srvar import SRVARSampling, make_upscaler
from arsr.infer.tokenizer import load_tokenizer, lr_condition
from arsr.models.base import BaseSR, BaseSRConfig
from arsr.models.srvar import SRVAR, SRVARConfig
from arsr.models.vqvae import VQVAE, VQVAEConfig
from arsr.stages import tokenize, train_srvar
from arsr.stages.shard import run_shard
from arsr.stages.train_srvar import make_loss_fn, make_val_fn
from arsr.train.checkpoint import load_model_file, save_model_file
from arsr.train.engine import Trainer

ROOT = Path(__file__).resolve().parents[1]
PN = [1, 2, 3, 4]
STEPS = 4
TINY = {
    "seed": 0,
    "data": {"source": "builtin", "hr_size": 32, "scale": 4, "crop_stride": 32, "max_crops_per_image": 6,
             "min_shards": 2},
    "vqvae": {"model": {"ch": 16, "ch_mult": [1, 2, 2, 4], "vocab_size": 64, "z_channels": 8,
                        "patch_nums": PN}},
    "srvar": {"model": {"depth": 1, "width": 32, "refiner": True, "refiner_width": 16, "refiner_depth": 1,
                        "refiner_steps": "4"},
              "train": {"max_steps": STEPS, "batch_size": 4, "base_lr": 0.05,
                        "warmup_steps": 0, "val_every": 2, "log_every": 1, "ckpt_every": 100}},
    "resources": {"shard": {"workers": 1}, "tokenize": {"batch_size": 16, "workers": 1},
                  "train_srvar": {"nproc": 2, "workers": 1}},
}  # fmt: skip


# ------------------------------------------------------------------------------------------
# 1. The LR condition is used
# ------------------------------------------------------------------------------------------
def test_the_lr_condition_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """8 samples whose scale-0 and scale-1 tokens all differ from each other's; random LR latents.
    After training, greedy decoding (the inference path) gets scales 0 and 1 right from the true LR
    and wrong from the LR of another sample; so does the stage's teacher-forced validation."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.manual_seed(0)
    vae = VQVAE(
        VQVAEConfig(vocab_size=32, z_channels=16, ch=8, ch_mult=(1, 2), patch_nums=tuple(PN))
    ).freeze()
    g, B = torch.Generator().manual_seed(0), 8
    s0_B1 = torch.randperm(32, generator=g)[:B, None]
    s1_B4 = torch.stack([torch.randperm(32, generator=g)[:B] for _ in range(4)], dim=1)  # per position
    rest = [torch.randint(0, 32, (B, pn * pn), generator=g) for pn in PN[2:]]
    idx_BL = torch.cat([s0_B1, s1_B4, *rest], dim=1)
    lrf = torch.randn(B, 16, 4, 4, generator=g)
    batch = {"idx": idx_BL, "f": vae.idxBl_to_fhat(vae.split_idx_BL(idx_BL)), "lrf": lrf}

    tcfg = TrainConfig(
        max_steps=80, batch_size=B, amp="none", base_lr=0.1, warmup_steps=5, ema=0.9, weight_decay=0.0,
        val_every=10**6, log_every=10**6, ckpt_every=10**6,
    )  # fmt: skip
    cfg = SRVARSection(model=SRVARConfig(depth=2, width=64), train=tcfg)  # cond_drop 0.1 as by default
    torch.manual_seed(0)
    model = SRVAR(cfg.model, PN, vae.V, vae.Cvae)
    trainer = Trainer(
        kind="srvar", model=model, model_config=model.model_config(), cfg=tcfg,
        loss_fn=make_loss_fn(vae, cfg), make_train_iter=lambda k: itertools.repeat(batch),
        out_dir=tmp_path, fingerprint={}, no_weight_decay=model.no_weight_decay,
    )  # fmt: skip
    trainer.fit()
    ema = trainer.ema.model

    other = torch.roll(torch.arange(B), 1)  # every sample gets another sample's LR
    for lr, lo, hi in ((lrf, 90, 100), (lrf[other], 0, 50)):
        _, greedy = ema.sample_fhat(lr, vae, cfg=0, top_k=1)
        acc0 = (greedy[0] == s0_B1).float().mean() * 100
        acc1 = (greedy[1] == s1_B4).float().mean() * 100
        val = make_val_fn(vae)(ema, {**batch, "lrf": lr})
        tf0 = val["Acc_s0"][0] / val["Acc_s0"][1]
        assert lo <= acc0 <= hi and lo <= acc1 <= hi and lo <= tf0 <= hi, (acc0, acc1, tf0)
    assert np.isfinite(val["Lm"][0])  # the EMA-averaged model's mask stays finite


# ------------------------------------------------------------------------------------------
# 2. The stage end to end
# ------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_RUN_GROUP="stage-srvar-test", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def proj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shard -> an (untrained) tiny VQVAE model.pt -> tokenize -> `launch train_srvar` (2 ranks)."""
    root = tmp_path_factory.mktemp("srvar")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    params = load_params(root / "params.yaml")
    run_shard(str(root / "params.yaml"), str(root / "data/shards"), str(root / "runs"))
    torch.manual_seed(0)
    vae = VQVAE(params.vqvae.model)
    save_model_file(
        root / "runs/vqvae/model.pt", kind="vqvae", config=vae.model_config(), state_dict=vae.state_dict()
    )
    tokenize.run_tokenize(
        params, root / "data/shards", root / "runs/vqvae/model.pt", root / "data/tokens", root / "runs"
    )
    cmd = [sys.executable, "-m", "arsr.stages.launch", "train_srvar"]
    proc = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    (root / "train_srvar.log").write_text(proc.stdout + proc.stderr)
    return root


def test_stage_writes_a_self_contained_model_and_metrics(proj: Path):
    log = (proj / "train_srvar.log").read_text()
    assert "torch.distributed.run" in log and "2 rank(s)" in log and "refiner target scale" in log
    d = load_model_file(proj / "runs/srvar/model.pt", kind="srvar")
    vq = load_model_file(proj / "runs/vqvae/model.pt", kind="vqvae")
    stats = json.loads((proj / "data/tokens/latent_stats.json").read_text())
    assert d["step"] == STEPS and d["fingerprint"]["stage"] == "train_srvar"
    assert d["config"]["refiner"] and 0 < d["state_dict"]["refiner_scale"] < 10  # a buffer, with the weights
    extra = d["extra"]
    assert (extra["token_facts"]["hr_size"], extra["token_facts"]["scale"]) == (32, 4)
    assert extra["token_facts"] == stats
    assert extra["vqvae"]["config"] == vq["config"] and extra["vqvae"]["extra"] == vq["extra"]
    assert all(torch.equal(extra["vqvae"]["state_dict"][k], v) for k, v in vq["state_dict"].items())
    assert all(torch.isfinite(v).all() for v in d["state_dict"].values() if v.is_floating_point())

    metrics = json.loads((proj / "runs/srvar/metrics.json").read_text())
    assert metrics["step"] == STEPS
    names = {"Lm", "Lt", "Accm", "Acct", "diff_loss"}
    assert set(metrics["train"]) == {"loss"} and set(metrics["val"]) == names  # the rest: plots
    assert all(0 <= last_plotted(proj / "runs/srvar", f"val_Acc_s{si}") <= 100 for si in range(len(PN)))
    assert all(np.isfinite(v) for v in metrics["val"].values())
    assert 0 <= metrics["val"]["Acct"] <= 100 and metrics["val"]["Lm"] > 0
    plots = {p.stem for p in (proj / "runs/srvar/plots").glob("*.tsv")}
    assert {"Lm", "Acct", "diff_loss", "val_Acct", "val_Acc_s0"} <= plots
    assert (proj / "runs/srvar/ckpt/last.pt").is_file()


def test_wandb_gets_val_sample_grids(proj: Path):
    from wandb_read import offline_runs, read_run, run_info

    runs = {run_info(read_run(r))["job_type"]: r for r in offline_runs(proj / "runs" / "wandb")}
    assert "train_srvar" in runs
    grids = list((runs["train_srvar"] / "files" / "media" / "images").glob("val/samples_*.png"))
    assert len(grids) == 2  # validations at steps 2 and 4
    img = np.asarray(Image.open(grids[0]))
    assert img.shape[:2] == (4 * 32, 3 * 32)  # 4 samples, LR | SRVAR | HR


# ------------------------------------------------------------------------------------------
# 3. The upscaler and `arsr upscale`
# ------------------------------------------------------------------------------------------
def test_upscaler_conditions_like_tokenize(proj: Path):
    """The LR path of inference (the upscaler's, :func:`arsr.infer.tokenizer.lr_condition`) gives the
    lrf the model was trained on (uint8 LR -> MATLAB bicubic -> encoder), and the same seed gives the
    same super-resolution."""
    up = make_upscaler(load_model_file(proj / "runs/srvar/model.pt", kind="srvar"), SRVARSampling(), "cpu")
    assert (up.hr_size, up.scale) == (32, 4)
    images = list(iter_tar_samples(shard_urls(proj / "data/shards", "val")))[:4]
    tokens = next(
        iter(eval_loader(shard_urls(proj / "data/tokens", "val"), decode=decode_tokens, batch_size=4))
    )
    assert tokens["key"] == [s["__key__"] for s in images]
    lr = torch.stack([to_unit_range(decode_png(s["lr.png"])) for s in images])
    lrf = lr_condition(up.tok, [to_uint8(x) for x in lr], up.hr_size).float()
    torch.testing.assert_close(lrf, tokens["lrf"], rtol=0, atol=2e-3)  # fp16 ulps
    a, b, c = up(lr, seed=3), up(lr, seed=3), up(lr, seed=4)
    assert a.shape == (4, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="LR tiles"):
        up(torch.zeros(1, 3, 16, 16), seed=0)


def test_arsr_upscale_folder(proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(inp / "tile.png")
    Image.fromarray(rng.integers(0, 256, (13, 10, 3), dtype=np.uint8)).save(inp / "odd.png")
    model = str(proj / "runs/srvar/model.pt")
    argv = ["upscale", "--model", model, "--input", str(inp), "--output", str(tmp_path / "out")]
    assert arsr_main([*argv, "--params", str(tmp_path / "none.yaml"), "--device", "cpu"]) == 0
    assert np.asarray(Image.open(tmp_path / "out/tile_x4.png")).shape == (32, 32, 3)
    assert np.asarray(Image.open(tmp_path / "out/odd_x4.png")).shape == (52, 40, 3)


def test_arsr_upscale_decode_options(proj: Path, tmp_path: Path):
    """--srvar-decode / --srvar-temperature come from SRVARSampling; greedy and soft tokens are seed-free."""
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        tmp_path / "a.png"
    )
    model = str(proj / "runs/srvar/model.pt")
    for decode in ("greedy", "soft", "sample"):
        argv = ["upscale", "--model", model, "--input", str(tmp_path / "a.png"), "--output",
                str(tmp_path / decode), "--device", "cpu", "--params", str(tmp_path / "none.yaml"),
                "--srvar-decode", decode, "--srvar-temperature", "0.7"]  # fmt: skip
        assert arsr_main(argv) == 0
        assert np.asarray(Image.open(tmp_path / decode / "a_x4.png")).shape == (32, 32, 3)
    d = load_model_file(model, kind="srvar")
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for decode in ("greedy", "soft"):
        up = make_upscaler(d, SRVARSampling(decode=decode, temperature=0.7), "cpu")
        up.refine = False  # the refiner draws its residual from the seed
        assert torch.equal(up(lr, seed=0), up(lr, seed=1)), decode


def test_arsr_upscale_refusals(proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(img)
    base = ["upscale", "--output", str(tmp_path / "out"), "--device", "cpu"]
    vqvae = str(proj / "runs/vqvae/model.pt")
    assert arsr_main([*base, "--model", vqvae, "--input", str(img)]) == 2
    assert f"holds a 'vqvae' model; an SR model is needed ({', '.join(FAMILIES)})" in capsys.readouterr().err

    model = str(proj / "runs/srvar/model.pt")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    assert arsr_main([*base, "--model", model, "--input", str(notes)]) == 1
    err = capsys.readouterr().err
    assert f"skipped {notes}" in err
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not a png")
    assert arsr_main([*base, "--model", model, "--input", str(fake)]) == 1
    assert f"skipped {fake}" in capsys.readouterr().err
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    assert arsr_main([*base, "--model", model, "--input", str(folder)]) == 2
    assert "no image files inside" in capsys.readouterr().err


def test_tokens_of_another_tokenizer_are_refused(proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    stats = json.loads((proj / "data/tokens/latent_stats.json").read_text())
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens/latent_stats.json").write_text(json.dumps({**stats, "vqvae_sha256": "0" * 64}))
    argv = ["--params", str(proj / "params.yaml"), "--tokens", str(tmp_path / "tokens")]
    argv += ["--vqvae", str(proj / "runs/vqvae/model.pt"), "--shards", str(proj / "data/shards")]
    assert train_srvar.main([*argv, "--out", str(tmp_path / "srvar")]) == 2
    assert "tokenized with another VQVAE" in capsys.readouterr().err
    assert not (tmp_path / "srvar").exists()


@pytest.mark.parametrize("key", ["hr_size", "num_classes", "mean"])
def test_token_facts_are_read_strictly(proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture, key: str):
    """Every fact comes from latent_stats.json (no fallback to the shards' stats.json): a missing key
    is one clear line naming the file and the key, exit status 2."""
    stats = json.loads((proj / "data/tokens/latent_stats.json").read_text())
    (tmp_path / "tokens").mkdir()
    facts_file = tmp_path / "tokens/latent_stats.json"
    facts_file.write_text(json.dumps({k: v for k, v in stats.items() if k != key}))
    argv = ["--params", str(proj / "params.yaml"), "--tokens", str(tmp_path / "tokens")]
    argv += ["--vqvae", str(proj / "runs/vqvae/model.pt"), "--shards", str(proj / "data/shards")]
    assert train_srvar.main([*argv, "--out", str(tmp_path / "srvar")]) == 2
    err = capsys.readouterr().err
    assert f"{facts_file}: missing {key}" in err and "rerun" in err
    assert not (tmp_path / "srvar").exists()


# ------------------------------------------------------------------------------------------
# 4. A residual tokenizer
# ------------------------------------------------------------------------------------------
BASE_CHANNELS, SIGMA = 16, 0.3  # the base's width (the LR condition's; the latent has 8) and sigma


@pytest.fixture(scope="module")
def proj_residual(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shard -> an untrained tiny x4 base + VQVAE as a residual tokenizer -> tokenize -> train_srvar
    (one process)."""
    root = tmp_path_factory.mktemp("srvar_residual")
    tiny = json.loads(json.dumps(TINY))
    tiny["resources"]["train_srvar"]["nproc"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(tiny))
    params = load_params(root / "params.yaml")
    run_shard(str(root / "params.yaml"), str(root / "data/shards"), str(root / "runs"))
    torch.manual_seed(0)
    vae = VQVAE(params.vqvae.model)
    base = BaseSR(BaseSRConfig(channels=BASE_CHANNELS, depth=3), scale=4)
    torch.nn.init.normal_(base.tail.weight, std=0.02)  # a base that adds something to bicubic
    base_file = {
        "config": base.model_config(),
        "state_dict": base.state_dict(),
        "extra": {"scale": 4, "hr_size": 32},
    }
    save_model_file(
        root / "runs/vqvae/model.pt", kind="vqvae", config=vae.model_config(), state_dict=vae.state_dict(),
        extra={"target": "residual", "sigma": SIGMA, "base": base_file},
    )  # fmt: skip
    tokenize.run_tokenize(
        params, root / "data/shards", root / "runs/vqvae/model.pt", root / "data/tokens", root / "runs"
    )
    env = {**_env(), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "arsr.stages.train_srvar"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return root


def test_residual_tokenizer_srvar_takes_the_base_features(proj_residual: Path):
    d = load_model_file(proj_residual / "runs/srvar/model.pt", kind="srvar")
    facts, vq = d["extra"]["token_facts"], d["extra"]["vqvae"]
    assert (facts["target"], facts["lr_channels"], facts["Cvae"]) == ("residual", BASE_CHANNELS, 8)
    assert vq["extra"]["target"] == "residual" and vq["extra"]["sigma"] == SIGMA
    assert d["state_dict"]["cfg_uncond"].shape == (16, BASE_CHANNELS)
    assert d["state_dict"]["lr_in.weight"].shape[1] == BASE_CHANNELS
    assert d["state_dict"]["word_embed.weight"].shape[1] == 8
    metrics = json.loads((proj_residual / "runs/srvar/metrics.json").read_text())
    assert all(np.isfinite(v) for v in metrics["val"].values())


def test_residual_upscaler_conditions_like_tokenize_and_decodes_on_the_base(proj_residual: Path):
    d = load_model_file(proj_residual / "runs/srvar/model.pt", kind="srvar")
    up = make_upscaler(d, SRVARSampling(decode="greedy"), "cpu")
    images = list(iter_tar_samples(shard_urls(proj_residual / "data/shards", "val")))[:4]
    tokens = next(
        iter(
            eval_loader(shard_urls(proj_residual / "data/tokens", "val"), decode=decode_tokens, batch_size=4)
        )
    )
    lr = torch.stack([to_unit_range(decode_png(s["lr.png"])) for s in images])
    lrf = lr_condition(up.tok, [to_uint8(x) for x in lr], up.hr_size).float()
    assert lrf.shape == (4, BASE_CHANNELS, 4, 4)
    assert torch.equal(lrf, tokens["lrf"])  # float16 both, computed the same way on the CPU
    up.refine = False
    out = up(lr, seed=0)
    assert out.shape == (4, 3, 32, 32) and torch.equal(out, up(lr, seed=1))  # greedy tokens: seed-free
    tok = load_tokenizer(d["extra"]["vqvae"])
    f_hat, _ = up.model.sample_fhat(lrf, tok.vae, cfg=0, decode="greedy", refine=False)
    expected = (tok.base(lr) + SIGMA * tok.vae.decode(f_hat)).clamp(-1, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
