"""The residual tokenizer (vqvae.target: residual): VQVAE linear path, k-means codebook, SRTokenizer,
and shard -> train_base -> train_vqvae -> tokenize on tiny params (one process, W&B off)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from stage_helpers import one_thread, write_params_file  # noqa: F401 (one_thread: autouse)

from arsr.config import ConfigError, load_params, parse_params
from arsr.data.loader import to_uint8, to_unit_range
from arsr.data.shards import decode_png, iter_tar_samples, shard_urls
from arsr.data.tokens import TokenFacts
from arsr.eval.metrics import psnr, y_uint8
from arsr.infer.tokenizer import VQVAEReconstructor, load_tokenizer_file, lr_condition
from arsr.models.vqvae import VQVAE, VQVAEConfig
from arsr.stages import tokenize, train_base, train_vqvae
from arsr.stages.shard import run_shard

PN = [1, 2, 3, 4]
TINY = {
    "seed": 0,
    "data": {"source": "builtin", "hr_size": 32, "scale": 4, "crop_stride": 32, "max_crops_per_image": 12,
             "min_shards": 2},
    "base": {"model": {"channels": 16, "depth": 4},
             "train": {"max_steps": 40, "batch_size": 16, "warmup_steps": 3,
                       "amp": "none", "val_every": 40, "log_every": 10, "ckpt_every": 100}},
    "vqvae": {"model": {"ch": 16, "ch_mult": [1, 2, 2, 4], "vocab_size": 64, "z_channels": 8,
                        "patch_nums": PN},
              "restart_every": 2,
              "train": {"max_steps": 6, "batch_size": 8, "warmup_steps": 1,
                        "amp": "none", "val_every": 6, "log_every": 2, "ckpt_every": 100}},
    "resources": {"shard": {"workers": 1}, "train_base": {"nproc": 1, "workers": 0},
                  "train_vqvae": {"nproc": 1, "workers": 0}, "tokenize": {"batch_size": 5, "workers": 1}},
}  # fmt: skip


@pytest.fixture(scope="module")
def proj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("restok")
    saved_env, cwd = dict(os.environ), os.getcwd()
    os.chdir(root)
    os.environ.update(WANDB_MODE="disabled")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(var, None)
    try:
        params = write_params_file(root, TINY)
        run_shard(str(params), str(root / "shards"), str(root / "runs"))
        common = ["--params", str(params), "--shards", str(root / "shards")]
        assert train_base.main([*common, "--out", str(root / "runs/base")]) == 0
        base = str(root / "runs/base/model.pt")
        assert train_vqvae.main([*common, "--out", str(root / "runs/vqvae"), "--base", base]) == 0
        tokenize.run_tokenize(
            load_params(params), root / "shards", root / "runs/vqvae/model.pt", root / "tokens", root / "runs"
        )
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(cwd)
    return root


def _pairs(proj: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    samples = list(iter_tar_samples(shard_urls(proj / "shards", split)))
    hr = torch.stack([to_unit_range(decode_png(s["hr.png"])) for s in samples])
    lr_u8 = [decode_png(s["lr.png"]) for s in samples]
    return hr, torch.stack([to_unit_range(a) for a in lr_u8]), lr_u8


# ------------------------------------------------------------------------------------------
# Model level
# ------------------------------------------------------------------------------------------
def _tiny_vae(**over) -> VQVAE:
    cfg = dict(ch=16, ch_mult=(1, 2, 2, 4), vocab_size=64, z_channels=8, patch_nums=tuple(PN)) | over
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(**cfg))


def test_linear_path_starts_as_the_pca_of_patches() -> None:
    """After init_linear_path the deep paths add nothing: decoding the unquantized latent is the
    projection of every 8x8 patch onto the top-z principal directions of the samples."""
    vae = _tiny_vae()
    x = torch.randn(64, 3, 32, 32) * torch.linspace(0.2, 2, 32)  # some directions matter more
    vae.init_linear_path(x)
    f = vae.img_to_f(x)
    rec = vae.decode(f)
    patches = F.pixel_unshuffle(x, 8).permute(0, 2, 3, 1).reshape(-1, 192)
    _, _, v = torch.linalg.svd(patches, full_matrices=False)
    proj = patches @ v[:8].T @ v[:8]
    want = F.pixel_shuffle(proj.reshape(64, 4, 4, 192).permute(0, 3, 1, 2), 8)
    assert torch.allclose(rec, want, atol=1e-4)
    err_pca = (rec - x).square().mean()
    assert err_pca < x.square().mean()  # it explains something
    with pytest.raises(ValueError, match="linear_path"):
        _tiny_vae(linear_path=False).init_linear_path(x)


def test_kmeans_codebook_keeps_a_zero_code_and_beats_a_random_one() -> None:
    vae = _tiny_vae()
    x = torch.randn(64, 3, 32, 32)
    vae.init_linear_path(x)
    f = vae.img_to_f(x)
    random_err = (vae.f_to_fhat(f) - f).square().mean()
    vae.quantize.kmeans_init(f, torch.Generator().manual_seed(0))
    assert torch.all(vae.quantize.embedding.weight[0] == 0)
    kmeans_err = (vae.f_to_fhat(f) - f).square().mean()
    assert kmeans_err < 0.8 * random_err
    usage = torch.cat(vae.f_to_idxBl(f), 1).unique().numel() / 64
    assert usage > 0.5


def test_official_weights_need_the_hr_target() -> None:
    with pytest.raises(ConfigError, match="vqvae"):
        parse_params({"vqvae": {"pretrained": "vae.pth"}})
    cfg = {"target": "hr", "pretrained": "vae.pth", "model": {"linear_path": False}}
    assert parse_params({"vqvae": cfg}).vqvae.target == "hr"


# ------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------
def test_model_file_carries_base_and_sigma(proj: Path) -> None:
    entry, tok = load_tokenizer_file(proj / "runs/vqvae/model.pt")
    extra = entry["extra"]
    assert extra["target"] == "residual" and tok.target == "residual"
    assert set(extra["base"]) == {"config", "state_dict", "extra"}
    hr, lr, _ = _pairs(proj, "train")
    with torch.no_grad():
        rms = float((hr - tok.base(lr)).square().mean().sqrt())
    assert extra["sigma"] == pytest.approx(rms, rel=1e-4)  # every train crop (fewer than SIGMA_SAMPLES)
    assert torch.equal(tok.base.tail.weight, extra["base"]["state_dict"]["tail.weight"])


def test_residual_tokens_reconstruct_better_than_the_base(proj: Path) -> None:
    """The point of the residual target: base(LR) + sigma D(tokens) is closer to the HR than the base
    alone (after 6 steps: the PCA linear path and the k-means codebook do most of it)."""
    _, tok = load_tokenizer_file(proj / "runs/vqvae/model.pt")
    hr, lr, _ = _pairs(proj, "val")
    rec = VQVAEReconstructor(tok)(hr, seed=0)
    with torch.no_grad():
        base = tok.base(lr).clamp(-1, 1)

    def mean_psnr(a: torch.Tensor) -> float:
        return float(np.mean([psnr(y_uint8(to_uint8(x)), y_uint8(to_uint8(y)), 4) for x, y in zip(a, hr)]))

    assert mean_psnr(rec) > mean_psnr(base) + 0.5
    metrics = json.loads((proj / "runs/vqvae/metrics.json").read_text())["val"]
    assert metrics["code_usage"] > 0.3


def test_token_shards_hold_residual_tokens_and_base_features(proj: Path) -> None:
    facts = TokenFacts.read(proj / "tokens")
    _, tok = load_tokenizer_file(proj / "runs/vqvae/model.pt")
    assert facts.target == "residual" and facts.lr_channels == 16 == tok.lr_channels
    samples = list(iter_tar_samples(shard_urls(proj / "tokens", "val")))[:5]
    hr, lr, lr_u8 = _pairs(proj, "val")
    lrf = np.stack([np.load(io.BytesIO(s["lrf.npy"])) for s in samples])
    assert lrf.shape == (5, 16, 4, 4) and lrf.dtype == np.float16
    assert np.array_equal(lrf, lr_condition(tok, lr_u8[:5], 32).numpy())
    idx = torch.from_numpy(np.stack([np.load(io.BytesIO(s["idx.npy"])) for s in samples]))
    want = torch.cat(tok.img_to_idxBl(hr[:5], lr[:5]), 1)
    assert torch.equal(idx.long(), want)


def test_token_dropout_decodes_random_codes_with_the_true_gradient() -> None:
    vae = _tiny_vae()
    x = torch.randn(4, 3, 32, 32)
    vae.init_linear_path(x)
    torch.manual_seed(1)
    clean, _, _ = vae(x)
    torch.manual_seed(1)
    again, _, _ = vae(x, token_dropout=0.0)
    assert torch.equal(clean, again)
    torch.manual_seed(1)
    noisy, vq, _ = vae(x, token_dropout=0.5)
    assert not torch.allclose(noisy, clean)
    noisy.square().mean().backward()
    assert vae.enc_lin.weight.grad is not None and vae.enc_lin.weight.grad.abs().sum() > 0
