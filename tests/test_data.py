"""Issue 2: MATLAB imresize, PSNR/SSIM, config errors, sources, shards, loaders."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from imagezoo import add_bomb, build_zoo, photo
from PIL import Image

from arsr.config import ConfigError, parse_params
from arsr.data.imresize import imresize, modcrop
from arsr.data.loader import TarSamples, decode_pair, eval_loader, tar_index, train_loader
from arsr.data.shards import ShardSetWriter, decode_png, make_sample, shard_urls
from arsr.data.sources import ImageError, SourceImage, load_rgb
from arsr.eval.metrics import score_bicubic
from arsr.stages.shard import run_shard

# --------------------------------------------------------------------------------------
# imresize + metrics against the published Set5 numbers
# --------------------------------------------------------------------------------------
PUBLISHED = {  # shared/data/sr_benchmarks/README.md
    "y-float": {2: (33.66, 0.9299), 3: (30.39, 0.8682), 4: (28.42, 0.8104)},
    "rgb-uint8": {2: (33.64, 0.9292), 3: (30.39, 0.8678), 4: (28.42, 0.8101)},
}


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_imresize_regenerates_official_lr_bit_exactly(set5: Path, scale: int) -> None:
    for hr_path in sorted((set5 / "HR").glob("*.png")):
        official = _read(set5 / "LR_bicubic" / f"X{scale}" / f"{hr_path.stem}x{scale}.png")
        ours = imresize(modcrop(_read(hr_path), scale), 1.0 / scale)
        assert ours.shape == official.shape, hr_path.name
        assert np.array_equal(ours, official), (
            f"{hr_path.name} x{scale}: {np.sum(ours != official)} pixels differ"
        )


@pytest.mark.parametrize("protocol", ["y-float", "rgb-uint8"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_rows_reproduce_published_numbers(set5: Path, protocol: str, scale: int) -> None:
    scores = [score_bicubic(_read(p), scale, protocol) for p in sorted((set5 / "HR").glob("*.png"))]
    mean_psnr, mean_ssim = np.mean(scores, axis=0)
    want_psnr, want_ssim = PUBLISHED[protocol][scale]
    assert abs(mean_psnr - want_psnr) <= 0.01, (protocol, scale, mean_psnr)
    assert abs(mean_ssim - want_ssim) <= 0.0005, (protocol, scale, mean_ssim)


def test_imresize_float_and_shapes() -> None:
    img = photo(30, 45, 0)
    up = imresize(img.astype(np.float64), output_shape=(60, 90))
    assert up.shape == (60, 90, 3) and up.dtype == np.float64
    assert imresize(img, 0.5).shape == (15, 23, 3)
    flat = np.full((16, 16), 77, np.uint8)  # a constant image stays constant (weights sum to 1)
    assert np.all(imresize(flat, 0.25) == 77) and np.all(imresize(flat, 3) == 77)


# --------------------------------------------------------------------------------------
# Config errors name the key path and the reason
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"data": {"hr_size": 60}}, "data.hr_size: 60 is not a multiple of the tokenizer downsample 8"),
        ({"data": {"hr_sise": 64}}, "data.hr_sise: unknown key"),
        ({"nonsense": 1}, "nonsense: unknown key"),
        ({"data": {"scale": "four"}}, "data.scale: Input should be a valid integer"),
        ({"srvar": {"train": {"batch_size": 5}}}, "srvar.train.batch_size: 5 is not divisible"),
        ({"mar": {"train": {"amp": "fp16"}}}, "mar.train.amp: 'fp16' needs CUDA"),
        (
            {"vqvae": {"model": {"patch_nums": [1, 2, 3]}}},
            "vqvae.model.patch_nums: last entry 3 must equal the latent grid",
        ),
        ({"data": {"labels": "dirs"}}, "data.labels: Input should be 'none' or 'folder'"),
    ],
)
def test_config_errors_name_key_and_reason(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert message in str(err.value)


def test_shipped_params_yaml_is_valid() -> None:
    root = Path(__file__).resolve().parents[1]
    parse_params(yaml.safe_load((root / "params.yaml").read_text()))


# --------------------------------------------------------------------------------------
# The shard stage on awkward inputs
# --------------------------------------------------------------------------------------
TINY = {"hr_size": 16, "scale": 4, "crop_stride": 16, "min_shards": 2}
TINY_VQ = {"model": {"patch_nums": [1, 2]}}
TINY_RESOURCES = {"shard": {"workers": 2}}


def write_params(path: Path, data: dict, seed: int = 0) -> Path:
    raw = {"seed": seed, "data": data, "vqvae": TINY_VQ, "resources": TINY_RESOURCES}
    path.write_text(yaml.safe_dump(raw))
    return path


@contextlib.contextmanager
def no_wandb():
    """In-process stage runs log nothing to W&B (a W&B service would outlive the test)."""
    old = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "disabled"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("WANDB_MODE")
        else:
            os.environ["WANDB_MODE"] = old


def shard_folder(tmp: Path, source: Path, **data) -> tuple[dict, Path]:
    params = write_params(tmp / "params.yaml", {**TINY, "source": str(source), **data})
    out = tmp / "shards"
    with no_wandb():
        stats = run_shard(str(params), str(out), str(tmp / "runs"))
    return stats, out


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("zoo")
    expect = build_zoo(tmp / "images", size=48)
    add_bomb(tmp / "images", max_pixels=6000)
    expect["bomb.png"] = expect["bomb-small.png"] = "skipped"
    stats, out = shard_folder(tmp, tmp / "images", max_image_pixels=6000, val_fraction=0.3)
    return expect, stats, out


def test_every_bad_input_is_converted_or_skipped_with_a_reason(zoo_run) -> None:
    expect, stats, out = zoo_run
    skipped = {s["source"]: s["reason"] for s in stats["skipped"]}
    converted = {c["source"]: c["notes"] for c in stats["converted"]}
    manifest = pd.read_parquet(out / "manifest.parquet")
    used = set(manifest.loc[manifest.split != "skipped", "source"])
    for name, kind in expect.items():
        if kind == "skipped":
            assert name in skipped and skipped[name], name
        else:
            assert name in used, f"{name} was dropped: {skipped.get(name)}"
            assert (name in converted) == (kind == "converted"), (name, converted.get(name))
    assert set(skipped) == {n for n, k in expect.items() if k == "skipped"}  # never a silent drop
    assert set(manifest.loc[manifest.split == "skipped", "source"]) == set(skipped)
    reasons = " ".join(skipped.values())
    for word in (
        "empty file",
        "not a readable image",
        "corrupt",
        "smaller than",
        "broken symlink",
        "directory",
        "decompression bomb",
    ):
        assert word in reasons, word


def test_conversions_are_correct(tmp_path: Path) -> None:
    expect = build_zoo(tmp_path / "z", size=48)
    assert expect

    def load(name: str) -> np.ndarray:
        return load_rgb(SourceImage("x-0", name, tmp_path / "z" / name, 0), 10**8)[0]

    base = np.asarray(Image.open(tmp_path / "z" / "plain.png")).astype(np.float64)
    assert np.array_equal(load("grey.png")[..., 0], load("grey.png")[..., 2])
    assert np.abs(load("grey16.png")[..., 0].astype(int) - photo(48, 48, 3)[..., 0]).max() <= 1
    assert np.abs(load("rgb16.png").astype(int) - photo(48, 48, 4)).max() <= 1
    rgba = load("rgba.png").astype(int)  # alpha 128 over white
    assert np.abs(rgba - (base * 128 / 255 + 255 * 127 / 255)).max() <= 1.5
    assert load("rotated.jpg").shape == (48, 56, 3)  # EXIF orientation applied (file is 56 high, 48 wide)
    assert load("anim.gif").shape == (48, 48, 3)
    for name in ("cmyk.jpg", "palette.png", "la.png"):
        img = load(name)
        assert img.dtype == np.uint8 and img.shape == (48, 56, 3)


def test_unreadable_file_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    Image.fromarray(photo(32, 32, 0)).save(path)
    path.chmod(0)
    tmp_path.chmod(0o755)
    src = SourceImage("s-0", "secret.png", path, 0)
    as_root = os.geteuid() == 0
    if as_root:  # root reads anything: take an ordinary user's view for this check
        os.seteuid(65534)
    try:
        with pytest.raises(ImageError, match="unreadable"):
            load_rgb(src, 10**8)
    finally:
        if as_root:
            os.seteuid(0)


def test_no_usable_image_exits_nonzero_naming_the_source(tmp_path: Path) -> None:
    src = tmp_path / "broken_images"
    src.mkdir()
    (src / "a.png").write_bytes(b"")
    (src / "b.jpg").write_text("nope")
    params = write_params(tmp_path / "params.yaml", {**TINY, "source": str(src)})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "arsr.stages.shard",
            "--params",
            str(params),
            "--out",
            str(tmp_path / "out"),
            "--runs",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode != 0
    assert str(src) in proc.stderr and "no usable image" in proc.stderr


def test_folder_labels(tmp_path: Path) -> None:
    for cls, seeds in {"cats": (1, 2), "dogs": (3, 4)}.items():
        (tmp_path / "img" / cls).mkdir(parents=True)
        for s in seeds:
            Image.fromarray(photo(32, 32, s)).save(tmp_path / "img" / cls / f"{s}.png")
    stats, out = shard_folder(tmp_path, tmp_path / "img", labels="folder", val_fraction=0.25, min_shards=2)
    assert stats["classes"] == ["cats", "dogs"]
    m = pd.read_parquet(out / "manifest.parquet")
    assert set(zip(m.source.str.split("/").str[0], m.label)) == {("cats", 0), ("dogs", 1)}
    for sample in _raw(shard_urls(out, "train")):
        src = json.loads(sample["json"])["source"]
        assert int(sample["cls"]) == (0 if src.startswith("cats") else 1)


def _raw(urls: list[str]):
    from arsr.data.shards import iter_tar_samples

    return list(iter_tar_samples(urls))


# --------------------------------------------------------------------------------------
# Builtin source: determinism and the output contract
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builtin_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("builtin")
    data = {"hr_size": 64, "scale": 4, "crop_stride": 64, "min_shards": 4}
    (tmp / "params.yaml").write_text(yaml.safe_dump({"seed": 3, "data": data}))
    # A subprocess, as DVC runs it: W&B then lives and dies with the stage, not in pytest.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "arsr.stages.shard",
            "--params",
            str(tmp / "params.yaml"),
            "--out",
            str(tmp / "shards"),
            "--runs",
            str(tmp / "runs"),
        ],
        check=True,
        capture_output=True,
        cwd=tmp,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"WANDB_MODE": "offline"},
    )
    return tmp


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_builtin_shards_contract_and_reproducibility(builtin_shards: Path, tmp_path: Path) -> None:
    out = builtin_shards / "shards"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"]["train"]["images"] + stats["splits"]["val"]["images"] == 9  # all builtins load
    assert "seconds" not in json.dumps(stats)  # no timings in a DAG output
    assert json.loads((builtin_shards / "runs" / "shard" / "timing.json").read_text())["images"] == 9
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert {"key", "split", "source", "x0", "y0", "x1", "y1", "label"} <= set(manifest.columns)
    by_split = manifest.groupby("split").source.apply(set)
    assert not by_split["train"] & by_split["val"]  # split by source image
    for split in ("train", "val"):
        urls = shard_urls(out, split)
        assert len(urls) >= 4
        members = []
        for url in urls:
            with tarfile.open(url) as tar:
                members += tar.getmembers()
        assert all(m.mtime == 0 and m.uname == "arsr" for m in members)
        keys = [m.name.split(".", 1)[0] for m in members]
        assert all("." not in k for k in keys)
        assert len(set(keys)) == (manifest.split == split).sum()
        sample = _raw(urls[:1])[0]
        assert set(sample) >= {"__key__", "hr.png", "lr.png", "cls", "json"}
        hr, lr = decode_png(sample["hr.png"]), decode_png(sample["lr.png"])
        assert hr.shape == (64, 64, 3) and lr.shape == (16, 16, 3)
        assert np.array_equal(lr, imresize(hr, 0.25))
    # Same inputs and params -> byte-identical output.
    (tmp_path / "params.yaml").write_text((builtin_shards / "params.yaml").read_text())
    with no_wandb():
        run_shard(str(tmp_path / "params.yaml"), str(tmp_path / "shards"), str(tmp_path / "runs"))
    assert _sha(tmp_path / "shards") == _sha(out)


def test_shard_writer_leaves_no_partial_tar_on_failure(tmp_path: Path) -> None:
    writer = ShardSetWriter(tmp_path, "train", 2)
    writer.write(make_sample("a_00000", photo(16, 16, 0), 4, 0, {}))
    writer.close(commit=False)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """5 shards (an odd number) of 16x16 samples."""
    tmp = tmp_path_factory.mktemp("odd")
    writer = ShardSetWriter(tmp, "train", 5)
    for i in range(53):
        writer.write(make_sample(f"s{i:03d}_00000", photo(16, 16, i), 4, i % 3, {"i": i}))
    writer.close(commit=True)
    return shard_urls(tmp, "train")


def test_eval_loader_yields_each_key_once_over_2_ranks_x_2_workers(odd_shards: list[str]) -> None:
    keys = []
    for rank in range(2):
        for batch in eval_loader(
            odd_shards, decode=decode_pair, batch_size=4, rank=rank, world_size=2, workers=2
        ):
            keys += batch["key"]
    assert sorted(keys) == sorted(f"s{i:03d}_00000" for i in range(53))


def test_train_loader_gives_every_rank_exact_batches_and_exact_resume(odd_shards: list[str]) -> None:
    kw = {"decode": decode_pair, "micro_batch": 6, "seed": 7, "world_size": 2, "workers": 2}
    runs = {}
    for rank in range(2):
        batches = list(train_loader(odd_shards, rank=rank, num_steps=13, **kw))
        assert len(batches) == 13 and all(len(b["key"]) == 6 for b in batches)
        assert batches[0]["hr"].shape == (6, 3, 16, 16) and batches[0]["lr"].shape == (6, 3, 4, 4)
        runs[rank] = [b["key"] for b in batches]
    assert runs[0] != runs[1]
    # Resume at step k (including past an epoch boundary) gives the same batches.
    for k in (1, 5, 12):
        resumed = [b["key"] for b in train_loader(odd_shards, rank=1, start_step=k, num_steps=13 - k, **kw)]
        assert resumed == runs[1][k:], k
    # Another seed gives another order; worker count 0 still works.
    other = [b["key"] for b in train_loader(odd_shards, rank=1, num_steps=3, **{**kw, "seed": 8})]
    assert other != runs[1][:3]
    assert len(list(train_loader(odd_shards, rank=0, num_steps=2, **{**kw, "workers": 0}))) == 2


def micro_keys(
    urls: list[str], world: int, workers: int, micro: int, steps: int, **kw
) -> list[list[list[str]]]:
    """[rank][micro-step] -> keys, every rank played in this process."""
    return [
        [b["key"] for b in train_loader(urls, decode=decode_pair, micro_batch=micro, seed=7, rank=r,
                                        world_size=world, workers=workers, num_steps=steps, **kw)]
        for r in range(world)
    ]  # fmt: skip


def test_global_batches_are_the_same_for_any_ranks_workers_and_accum(odd_shards: list[str]) -> None:
    """Global batch k (12 samples) holds the same samples for (world, workers, accum) in
    {(1,0,1), (2,1,1), (2,2,2), (4,1,1)}; 10 steps = 120 samples cross two epochs of 53."""
    batch, steps = 12, 10
    by_setup = {}
    for world, workers, accum in [(1, 0, 1), (2, 1, 1), (2, 2, 2), (4, 1, 1)]:
        keys = micro_keys(odd_shards, world, workers, batch // (world * accum), steps * accum)
        by_setup[world, workers, accum] = [
            sorted(k for r in range(world) for a in range(accum) for k in keys[r][step * accum + a])
            for step in range(steps)
        ]
    reference = by_setup[1, 0, 1]
    for setup, batches in by_setup.items():
        assert batches == reference, setup
    # Each epoch is a permutation of all samples; shuffling is global (a batch mixes the shards).
    flat = micro_keys(odd_shards, 1, 0, batch, steps)[0]
    order = [k for b in flat for k in b]
    assert sorted(order[:53]) == sorted(order[53:106]) == [f"s{i:03d}_00000" for i in range(53)]
    assert order[:53] != order[53:106]
    assert len({int(k[1:4]) % 5 for k in flat[0]}) >= 4  # ShardSetWriter: sample i is in shard i % 5
    # Resume at micro-step j (mid-step, past the epoch boundary too) continues exactly.
    full = micro_keys(odd_shards, 2, 2, 3, 2 * steps)[1]
    for j in (1, 5, 9, 17):
        resumed = micro_keys(odd_shards, 2, 2, 3, 2 * steps - j, start_step=j)[1]
        assert resumed == full[j:], j


def test_train_loader_needs_no_shard_per_worker(odd_shards: list[str]) -> None:
    """One shard, 2 ranks x 2 workers: every rank gets its batches (the shards are no unit of
    work any more)."""
    keys = micro_keys(odd_shards[:1], 2, 2, 2, 6)
    assert all(len(k) == 6 and all(len(b) == 2 for b in k) for k in keys)
    assert {k for r in keys for b in r for k in b} <= {f"s{i:03d}_00000" for i in range(0, 53, 5)}


def tar_of(path: Path, fmt: int) -> None:
    """A tar in ``fmt`` with what the index must get right: long names (pax / GNU long-name / ustar
    prefix), a non-ASCII name, a folder entry, a webdataset meta entry, an empty member."""
    long_dir = "d/" * 30 if fmt == tarfile.USTAR_FORMAT else "deep/" * 30
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("folder/")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i in range(5):
            key = f"{long_dir}k{i}" + ("é" if fmt == tarfile.PAX_FORMAT else "")
            for suffix, data in (("a.bin", bytes(range(256)) * i * 3), ("TXT", b"x" * i), ("c", b"")):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            tar.addfile(tarfile.TarInfo("__meta__"), io.BytesIO(b""))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_samples_read_by_offset_equal_webdatasets_stream(
    odd_shards: list[str], tmp_path: Path, fmt: int
) -> None:
    tar_of(tmp_path / "x.tar", fmt)
    for urls in (odd_shards, [str(tmp_path / "x.tar")]):
        samples = TarSamples(urls)
        ours = [samples.raw(i) for i in range(len(samples))]
        theirs = _raw(urls)
        drop = ("__url__", "__local_path__")
        assert [{k: v for k, v in s.items() if k not in drop} for s in ours] == [
            {k: v for k, v in s.items() if k not in drop} for s in theirs
        ]
        assert len(ours) == sum(len(tar_index(u)) for u in urls) == len(theirs)


# --------------------------------------------------------------------------------------
# W&B: the shard stage logs its counts and an example grid (offline run read back)
# --------------------------------------------------------------------------------------
def test_shard_logs_counts_and_examples_to_offline_wandb(builtin_shards: Path) -> None:
    from wandb_read import history_keys, offline_runs, read_run, run_info

    runs = offline_runs(builtin_shards / "runs" / "wandb")
    assert len(runs) == 1
    records = read_run(runs[0])
    info = run_info(records)
    assert info["job_type"] == "shard" and info["run_group"].startswith("pipe-")
    assert info["config"]["update"]["data.hr_size"] == 64  # the stage's params, by key
    logged = history_keys(records)
    assert {"train/samples", "val/samples", "train/shards", "skipped", "examples.filenames"} <= logged
    assert list((runs[0] / "files" / "media" / "images").glob("examples_*.png"))


def test_partial_mar_train_section_keeps_mar_defaults() -> None:
    params = parse_params({"mar": {"train": {"max_steps": 30}}})  # >= MAR's 10 warm-up steps
    assert params.mar.train.max_steps == 30
    assert (params.mar.train.grad_clip, params.mar.train.weight_decay) == (
        3.0,
        0.02,
    )  # MAR's recipe, not generic
    assert parse_params({}).srvar.train.grad_clip == 2.0  # VAR's
