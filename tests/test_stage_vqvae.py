"""Stages `train_vqvae` and `tokenize` on tiny shards: outputs, metrics, token files, latent stats.

One module fixture cuts tiny shards (built-in photos, 32 px, a few crops per image), trains a tiny
tokenizer for a handful of steps (W&B offline, read back) and tokenizes with 2 processes; the
tests check those outputs against independent recomputations from the image shards.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from stage_helpers import last_plotted, one_thread, write_params_file  # noqa: F401 (one_thread: autouse)

from arsr.cli import main as arsr_main
from arsr.config import load_params
from arsr.data.imresize import imresize
from arsr.data.loader import count_samples, decode_tokens, eval_loader, to_unit_range
from arsr.data.shards import decode_png, iter_tar_samples, shard_urls
from arsr.data.tokens import TokenFacts
from arsr.eval.metrics import psnr, y_uint8
from arsr.infer.tokenizer import load_vqvae_file
from arsr.io import file_sha256
from arsr.models.vqvae import VQVAE
from arsr.stages import tokenize, train_vqvae
from arsr.stages.shard import run_shard
from arsr.train.checkpoint import load_model_file

STEPS = 6
PN = [1, 2, 3, 4]
TINY = {
    "seed": 0,
    "data": {"source": "builtin", "hr_size": 32, "scale": 4, "crop_stride": 32, "max_crops_per_image": 8,
             "min_shards": 2},
    # VAR's tokenizer of the HR (target hr, no linear path); the residual target: test_residual_tokenizer.py
    "vqvae": {"target": "hr", "kmeans_init": False,
              "model": {"ch": 16, "ch_mult": [1, 2, 2, 4], "vocab_size": 64, "z_channels": 8,
                        "patch_nums": PN, "linear_path": False},
              "restart_every": 2,
              "train": {"max_steps": STEPS, "batch_size": 8, "base_lr": 0.05, "warmup_steps": 1,
                        "val_every": 3, "log_every": 2, "ckpt_every": 100}},
    "resources": {"shard": {"workers": 1}, "train_vqvae": {"workers": 0},
                  "tokenize": {"batch_size": 5, "workers": 2}},
}  # fmt: skip


def write_params(folder: Path, **over) -> Path:
    return write_params_file(folder, TINY, **over)


@pytest.fixture(scope="module")
def proj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shard -> train_vqvae (W&B offline) -> tokenize, in a temp folder."""
    root = tmp_path_factory.mktemp("vqvae")
    saved_env, cwd = dict(os.environ), os.getcwd()
    os.chdir(root)  # W&B's group id reads params.yaml from the working folder
    os.environ.update(WANDB_MODE="offline", WANDB_RUN_GROUP="stage-vqvae-test")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(var, None)
    try:
        params = write_params(root)
        run_shard(str(params), str(root / "shards"), str(root / "runs"))
        args = ["--params", str(params), "--shards", str(root / "shards"), "--out", str(root / "runs/vqvae")]
        assert train_vqvae.main(args) == 0
        tokenize.run_tokenize(
            load_params(params), root / "shards", root / "runs/vqvae/model.pt", root / "tokens", root / "runs"
        )
    finally:
        import wandb

        wandb.teardown()  # W&B in this process leaves a service and env vars behind
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(cwd)
    return root


def load_tokenizer(proj: Path) -> VQVAE:
    return load_vqvae_file(proj / "runs/vqvae/model.pt")[1]


def image_samples(proj: Path, split: str) -> list[dict]:
    return list(iter_tar_samples(shard_urls(proj / "shards", split)))


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# ------------------------------------------------------------------------------------------
# train_vqvae
# ------------------------------------------------------------------------------------------
def test_model_file_metrics_and_plots(proj: Path):
    d = load_model_file(proj / "runs/vqvae/model.pt", kind="vqvae")
    assert d["config"] == VQVAE(load_params(proj / "params.yaml").vqvae.model).model_config()
    assert d["step"] == STEPS and d["fingerprint"]["stage"] == "train_vqvae"
    metrics = json.loads((proj / "runs/vqvae/metrics.json").read_text())
    assert metrics["step"] == STEPS
    # metrics.json: the final headline values (what `dvc exp show` compares); per-scale, lr and
    # grad-norm values are in the plots.
    assert {"rec_l1", "rec_l2", "rec_psnr", "vq_loss", "code_usage"} <= set(metrics["val"])
    assert not [k for k in metrics["val"] if "_s" in k]
    assert set(metrics["train"]) == {"loss"}
    assert 5 < metrics["val"]["rec_psnr"] < 60
    run = proj / "runs/vqvae"
    assert all(0 < last_plotted(run, f"val_code_usage_s{si}") <= 1 for si in range(len(PN)))
    assert last_plotted(run, "code_usage") == pytest.approx(last_plotted(run, f"code_usage_s{len(PN) - 1}"))
    plots = {p.stem for p in (run / "plots").glob("*.tsv")}
    assert {"rec_l1", "vq_loss", "code_usage", "val_rec_psnr", "val_code_usage", "restarted_codes"} <= plots
    assert {"tnm", "tlr"} <= plots
    assert (proj / "runs/vqvae/ckpt/last.pt").is_file()


def test_val_metrics_match_an_independent_recomputation(proj: Path):
    """rec_psnr is the mean per-image Y PSNR of the EMA model's uint8 reconstruction; code_usage is
    the fraction of codes the last scale uses over the whole val split."""
    vae = load_tokenizer(proj)
    val = json.loads((proj / "runs/vqvae/metrics.json").read_text())["val"]
    hr = torch.stack([to_unit_range(decode_png(s["hr.png"])) for s in image_samples(proj, "val")])
    idx = vae.img_to_idxBl(hr)
    rec = vae.idxBl_to_img(idx)
    u8 = lambda x: ((x + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1).numpy()  # noqa: E731
    psnrs = [psnr(y_uint8(a), y_uint8(b)) for a, b in zip(u8(rec), u8(hr))]
    assert val["rec_psnr"] == pytest.approx(np.mean(psnrs), abs=1e-3)  # other batch sizes
    for si, idx_Bl in enumerate(idx):
        usage = last_plotted(proj / "runs/vqvae", f"val_code_usage_s{si}")
        assert usage == pytest.approx(idx_Bl.unique().numel() / vae.V, abs=1e-6)
    assert val["code_usage"] == pytest.approx(idx[-1].unique().numel() / vae.V)


def test_dead_codes_were_restarted(proj: Path):
    rows = (proj / "runs/vqvae/plots/restarted_codes.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows] == [2, 4, 6]  # logged at the log steps that restarted
    assert sum(float(r.split("\t")[1]) for r in rows) > 0  # a 64-code book starts with dead codes


def test_wandb_gets_metrics_and_reconstruction_images(proj: Path):
    from wandb_read import history_keys, offline_runs, read_run, run_info

    runs = {run_info(read_run(r))["job_type"]: r for r in offline_runs(proj / "runs" / "wandb")}
    assert sorted(runs) == ["shard", "tokenize", "train_vqvae"]  # the fixture's tokenize logs too
    records = read_run(runs["train_vqvae"])
    keys = history_keys(records)
    assert {"rec_l1", "vq_loss", "code_usage", "code_usage_s0", "val/rec_psnr", "val/code_usage"} <= keys
    assert "val/reconstructions.filenames" in keys
    images = list((runs["train_vqvae"] / "files" / "media" / "images").glob("val/reconstructions_*.png"))
    assert len(images) == 2  # validations at steps 3 and 6


def test_augment_reorders_flips_and_negates_each_image_reproducibly():
    x = torch.rand(64, 3, 4, 4) * 2 - 1
    torch.manual_seed(1)
    out = train_vqvae.augment(x)
    torch.manual_seed(1)
    assert torch.equal(train_vqvae.augment(x), out)  # drawn from torch's RNG (checkpointed per rank)
    seen = set()
    for xi, yi in zip(x, out):
        ways = [
            (order, flip, neg)
            for order in itertools.permutations(range(3))
            for flip in (False, True)
            for neg in (False, True)
            if torch.equal((-1 if neg else 1) * (xi[list(order)].flip(2) if flip else xi[list(order)]), yi)
        ]
        assert len(ways) == 1
        seen.add(ways[0])
    assert len(seen) >= 12  # of the 24 combinations


def test_perceptual_weight_trains_with_lpips_held_outside_the_model(proj: Path, tmp_path: Path, monkeypatch):
    """vqvae.perceptual_weight > 0: LPIPS(rec, x) joins the loss (logged as rec_lpips, train and val),
    its gradient reaches the decoder, and model.pt holds the VQVAE's weights only."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    params = write_params(tmp_path, **{"vqvae.perceptual_weight": 1.0, "vqvae.train.max_steps": 3})
    out = tmp_path / "runs/vqvae"
    args = ["--params", str(params), "--shards", str(proj / "shards"), "--out", str(out)]
    assert train_vqvae.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < last_plotted(out, "rec_lpips") < 1.5 and 0 < metrics["val"]["rec_lpips"] < 1.5
    d = load_model_file(out / "model.pt", kind="vqvae")
    vae = VQVAE(load_params(params).vqvae.model)
    assert set(d["state_dict"]) == set(vae.state_dict())  # no LPIPS/AlexNet weights in the tokenizer

    from arsr.eval.perceptual import lpips_module

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    grads = []
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        vae = VQVAE(load_params(params).vqvae.model)
        loss, logged = train_vqvae.vqvae_loss(vae, {"x": x}, lpips_module(), weight)
        loss.backward()
        grads.append(vae.decoder.conv_out.weight.grad.clone())
        assert ("rec_lpips" in logged) == (weight > 0)
    assert not torch.allclose(grads[0], grads[1])


def test_pretrained_weights_are_adopted_without_training(proj: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.manual_seed(5)
    official = VQVAE(load_params(proj / "params.yaml").vqvae.model)
    torch.save(official.state_dict(), tmp_path / "official.pth")  # a plain state dict, as VAR ships
    params = write_params(tmp_path, **{"vqvae.pretrained": str(tmp_path / "official.pth")})
    out = tmp_path / "vqvae"
    args = ["--params", str(params), "--shards", str(proj / "shards"), "--out", str(out)]
    assert train_vqvae.main(args) == 0
    d = load_model_file(out / "model.pt", kind="vqvae")
    assert d["step"] == 0 and d["extra"]["pretrained"] == str(tmp_path / "official.pth")
    for k, v in official.state_dict().items():
        assert torch.equal(d["state_dict"][k], v), k
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 0 and metrics["train"] == {} and metrics["val"]["rec_psnr"] > 0
    assert (out / "ckpt").is_dir() and not list((out / "ckpt").iterdir())  # nothing was trained

    # An architecture that does not describe the file: one clear line, exit status 2.
    params = write_params(
        tmp_path, **{"vqvae.pretrained": str(tmp_path / "official.pth"), "vqvae.model.ch": 32}
    )
    args = ["--params", str(params), "--shards", str(proj / "shards"), "--out", str(out)]
    assert train_vqvae.main(args) == 2


def test_cli_knows_both_stages(capsys: pytest.CaptureFixture):
    for name in ("train_vqvae", "tokenize"):
        with pytest.raises(SystemExit) as exit_info:
            arsr_main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"arsr {name}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# tokenize
# ------------------------------------------------------------------------------------------
def test_token_shards_mirror_image_shards(proj: Path):
    vae = load_tokenizer(proj)
    for split in ("train", "val"):
        src, dst = shard_urls(proj / "shards", split), shard_urls(proj / "tokens", split)
        assert [Path(u).name for u in dst] == [Path(u).name for u in src]
        for s, d in zip(src, dst):
            assert count_samples(d) == count_samples(s)
            with tarfile.open(d) as tar:
                members = tar.getmembers()
            assert {m.mtime for m in members} == {0} and {m.uname for m in members} == {"arsr"}
            keys = [m.name.split(".", 1)[0] for m in members]
            assert keys[::4] == [x["__key__"] for x in iter_tar_samples([s])]
            assert {m.name.split(".", 1)[1] for m in members} == {"idx.npy", "f.npy", "lrf.npy", "cls"}
    sample = next(iter(iter_tar_samples(shard_urls(proj / "tokens", "train"))))
    idx, f, lrf = npy(sample["idx.npy"]), npy(sample["f.npy"]), npy(sample["lrf.npy"])
    assert idx.dtype == np.int16 and idx.shape == (sum(p * p for p in PN),)
    assert idx.min() >= 0 and idx.max() < vae.V
    assert f.dtype == lrf.dtype == np.float16 and f.shape == lrf.shape == (vae.Cvae, PN[-1], PN[-1])
    assert not list((proj / "tokens").glob("*.tmp"))


def test_stored_tokens_decode_to_the_models_reconstruction(proj: Path):
    vae = load_tokenizer(proj)
    images = {s["__key__"]: s for s in image_samples(proj, "val")}
    tokens = list(iter_tar_samples(shard_urls(proj / "tokens", "val")))
    keys = [t["__key__"] for t in tokens]
    hr = torch.stack([to_unit_range(decode_png(images[k]["hr.png"])) for k in keys])
    idx_BL = torch.from_numpy(np.stack([npy(t["idx.npy"]) for t in tokens]).astype(np.int64))
    from_tokens = vae.idxBl_to_img(vae.split_idx_BL(idx_BL))
    from_model = vae.fhat_to_img(vae.f_to_fhat(vae.img_to_f(hr)))
    torch.testing.assert_close(from_tokens, from_model, rtol=0, atol=1e-5)
    # f is the HR latent, lrf the latent of the MATLAB-bicubic (uint8) upsampled LR crop; cls copied.
    f = torch.from_numpy(np.stack([npy(t["f.npy"]) for t in tokens]).astype(np.float32))
    torch.testing.assert_close(f, vae.img_to_f(hr), rtol=2e-3, atol=2e-3)
    up = torch.stack(
        [to_unit_range(imresize(decode_png(images[k]["lr.png"]), output_shape=(32, 32))) for k in keys]
    )
    lrf = torch.from_numpy(np.stack([npy(t["lrf.npy"]) for t in tokens]).astype(np.float32))
    torch.testing.assert_close(lrf, vae.img_to_f(up), rtol=2e-3, atol=2e-3)
    assert [t["cls"] for t in tokens] == [images[k]["cls"] for k in keys]
    # The loaders read token shards back.
    batch = next(iter(eval_loader(shard_urls(proj / "tokens", "val"), decode=decode_tokens, batch_size=4)))
    assert batch["idx"].shape == (4, vae.L) and batch["f"].dtype == torch.float32


def test_latent_stats(proj: Path):
    stats = json.loads((proj / "tokens/latent_stats.json").read_text())
    vae = load_tokenizer(proj)
    f = np.stack([npy(t["f.npy"]) for t in iter_tar_samples(shard_urls(proj / "tokens", "train"))])
    f = f.astype(np.float64).transpose(1, 0, 2, 3).reshape(vae.Cvae, -1)  # [Cv, N*h*w]
    np.testing.assert_allclose(stats["mean"], f.mean(axis=1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats["std"], f.std(axis=1), rtol=1e-6)
    assert min(stats["std"]) > 0 and len(stats["mean"]) == vae.Cvae == stats["Cvae"]
    assert stats["samples"] == sum(count_samples(u) for u in shard_urls(proj / "shards", "train"))
    assert set(stats) == {f.name for f in dataclasses.fields(TokenFacts)}  # TokenFacts, nothing else
    facts = TokenFacts.read(proj / "tokens")
    assert (stats["vocab_size"], stats["patch_nums"], facts.L, facts.grid) == (64, PN, 30, 4)
    assert (stats["hr_size"], stats["scale"], stats["num_classes"]) == (32, 4, 0)
    assert stats["vqvae_sha256"] == file_sha256(proj / "runs/vqvae/model.pt")
    timing = json.loads((proj / "runs/tokenize/timing.json").read_text())
    n_val = sum(count_samples(u) for u in shard_urls(proj / "tokens", "val"))
    assert timing["images"] == stats["samples"] + n_val
    assert timing["images_per_s"] > 0 and timing["workers"] == 2


def test_tokens_are_byte_identical_for_any_worker_count(proj: Path, tmp_path: Path):
    params = load_params(write_params(tmp_path, **{"resources.tokenize.workers": 1}))
    model = proj / "runs/vqvae/model.pt"
    tokenize.run_tokenize(params, proj / "shards", model, tmp_path / "tokens", tmp_path)
    mine = sorted(p.name for p in (proj / "tokens").iterdir())
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == mine
    for name in mine:
        assert (tmp_path / "tokens" / name).read_bytes() == (proj / "tokens" / name).read_bytes(), name


def test_tokenize_without_a_model_says_so(proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    params = write_params(tmp_path)
    argv = ["--params", str(params), "--shards", str(proj / "shards"), "--model", str(tmp_path / "none.pt")]
    assert tokenize.main([*argv, "--out", str(tmp_path / "t"), "--runs", str(tmp_path)]) == 2
    assert "run train_vqvae first" in capsys.readouterr().err
