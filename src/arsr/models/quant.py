"""VAR's multi-scale residual vector quantizer (the "VQ" of the tokenizer).

A latent ``f_BChw`` (h = w = ``patch_nums[-1]``) is turned into SN token maps of growing size
``pn x pn``. At every scale the *remaining* residual is area-downsampled to ``pn x pn``, each vector is
replaced by its nearest code, the code map is bicubic-upsampled back to ``h x w`` and refined by a
small conv ``phi``; the result is added to ``f_hat`` and subtracted from the residual. The last scale
is never resized. ``f_hat`` after all scales is what the decoder sees.

Everything here runs in fp32 with autocast off (VAR pitfall 4): token targets must not depend on the
caller's AMP setting. Names keep VAR's shape suffixes (``f_BChw``, ``idx_Bl``, ``z_NC``, ``hit_SV``)
and the state-dict keys of VAR's ``VectorQuantizer2``, so official weights load unchanged.

torch.distributed is optional: hit counts are all-reduced only when a process group is initialised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F


def _dist_on() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that turns autocast off on ``device`` (the quantizer is always fp32)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# phi: the residual refinement conv applied to every upsampled code map
# --------------------------------------------------------------------------------------
class Phi(nn.Conv2d):
    """``phi(h) = (1 - r) h + r conv3x3(h)``, r = ``quant_resi`` (VAR: 0.5)."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw * (1 - self.resi_ratio) + super().forward(h_BChw) * self.resi_ratio


def phi_ticks(K: int) -> np.ndarray:
    """Positions in [0, 1] the K phi convs stand for; scale si uses the conv nearest to si/(SN-1).

    Written as VAR writes it (1/3/K for K=4, i.e. linspace(1/12, 11/12, 4)) because scale 2 of 10
    sits on an exact tie between ticks 0 and 1 that float rounding resolves to conv 1; another but
    mathematically equal formula could flip it and break official-checkpoint compatibility.
    """
    if K == 4:
        return np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K)
    return np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)


class _PhiTicks:
    """Mixin: pick a phi by ``at`` = si/(SN-1) in [0, 1]: ``quant_resi[at]``."""

    ticks: np.ndarray

    def index(self, at: float) -> int:
        return int(np.argmin(np.abs(self.ticks - at)))


class PhiShared(nn.Module):
    """One phi for every scale (``share_quant_resi=1``)."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def index(self, at: float) -> int:
        return 0

    def __getitem__(self, at: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(_PhiTicks, nn.Module):
    """K phis shared by the SN scales (``share_quant_resi=K``; VAR uses K=4 for SN=10)."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = phi_ticks(len(qresi_ls))

    def __getitem__(self, at: float) -> nn.Module:
        return self.qresi_ls[self.index(at)]

    def extra_repr(self) -> str:
        return f"ticks={np.round(self.ticks, 4).tolist()}"


class PhiNonShared(_PhiTicks, nn.ModuleList):
    """One phi per scale (``share_quant_resi=0``)."""

    def __init__(self, qresi: list[nn.Module]):
        super().__init__(qresi)
        self.ticks = phi_ticks(len(qresi))

    def __getitem__(self, at: float) -> nn.Module:  # type: ignore[override]
        return super().__getitem__(self.index(at))


def build_phi(channels: int, quant_resi: float, share_quant_resi: int, num_scales: int) -> nn.Module:
    """VAR's phi layout: 0 = one per scale, 1 = fully shared, K > 1 = K partially shared."""

    def make() -> nn.Module:
        return Phi(channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

    if share_quant_resi == 0:
        return PhiNonShared([make() for _ in range(num_scales)])
    if share_quant_resi == 1:
        return PhiShared(make())
    return PhiPartiallyShared(nn.ModuleList([make() for _ in range(share_quant_resi)]))


# --------------------------------------------------------------------------------------
# The quantizer
# --------------------------------------------------------------------------------------
class MultiScaleQuantizer(nn.Module):
    """Residual multi-scale VQ over a square latent grid (VAR's ``VectorQuantizer2``, no z-norm).

    ``ema_vocab_hit_SV`` [SN, V] is VAR's (persistent) EMA of per-scale code hits: it is part of the
    official state dict, and it is what :meth:`restart_dead_codes` reads, so checkpoints carry it and
    resume is exact.
    """

    usage_decay = 0.99  # EMA decay of ema_vocab_hit_SV, one update per training forward

    def __init__(
        self,
        vocab_size: int,
        Cvae: int,
        patch_nums: Sequence[int],
        beta: float = 0.25,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
    ):
        super().__init__()
        self.vocab_size, self.Cvae, self.beta = vocab_size, Cvae, beta
        self.patch_nums: tuple[int, ...] = tuple(int(pn) for pn in patch_nums)
        self.quant_resi = build_phi(Cvae, quant_resi, share_quant_resi, len(self.patch_nums))
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)
        # A small codebook (VAR never released its VAE init): with nn.Embedding's N(0, 1) every residual
        # (std ~0.2 at init) lands on the same few codes; std 0.02 starts with 5-10x more codes in use.
        nn.init.trunc_normal_(self.embedding.weight, std=0.02)

    @property
    def SN(self) -> int:
        return len(self.patch_nums)

    def phi(self, si: int, SN: int | None = None) -> nn.Module:
        """The phi conv of scale ``si`` out of ``SN`` (default: this quantizer's scale count)."""
        SN = SN or self.SN
        return self.quant_resi[si / (SN - 1) if SN > 1 else 1.0]

    def phi_indices(self) -> list[int]:
        """Which phi each scale uses (VAR, 10 scales, 4 shared: [0,0,1,1,1,2,2,3,3,3])."""
        SN = self.SN
        return [self.quant_resi.index(si / (SN - 1) if SN > 1 else 1.0) for si in range(SN)]

    def extra_repr(self) -> str:
        return f"V={self.vocab_size}, Cvae={self.Cvae}, patch_nums={self.patch_nums}, beta={self.beta}"

    # ---- building blocks -------------------------------------------------------------
    @torch.no_grad()
    def _nearest(self, z_NC: torch.Tensor, e_VC: torch.Tensor, e_sq_V: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code by squared L2, ``|z|^2 + |e|^2 - 2 z.e`` (VAR's exact arithmetic)."""
        d_NV = z_NC.square().sum(dim=1, keepdim=True) + e_sq_V
        d_NV.addmm_(z_NC, e_VC.T, beta=1, alpha=-2)
        return d_NV.argmin(dim=1)

    def _up_phi(self, si: int, h_BChw: torch.Tensor, HW: int, SN: int | None = None) -> torch.Tensor:
        """Bicubic-upsample a scale's code map to the full grid (never the last scale), then phi."""
        SN = SN or self.SN
        if si != SN - 1:
            h_BChw = F.interpolate(h_BChw, size=(HW, HW), mode="bicubic")
        return self.phi(si, SN)(h_BChw)

    def _embed(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        """[B, pn*pn] indices -> [B, Cvae, pn, pn] code map."""
        B, l = idx_Bl.shape
        pn = round(l**0.5)
        return self.embedding(idx_Bl.long()).transpose(1, 2).reshape(B, self.Cvae, pn, pn)

    def _residual_scales(self, f_BChw: torch.Tensor):
        """The residual loop shared by every encoding path. Yields per scale ``(si, z_NC, idx_N, h_BChw)``:
        the residual vectors that were quantized [B*pn*pn, C], their codes [B*pn*pn] and the upsampled,
        phi-refined contribution [B, C, h, w] (with grad when grad is enabled, for the VQ loss)."""
        B, C, H, W = f_BChw.shape
        if not H == W == self.patch_nums[-1]:
            raise ValueError(f"latent {H}x{W} does not match the last patch_num {self.patch_nums[-1]}")
        f_rest = f_BChw.detach().clone()
        e_VC = self.embedding.weight.detach().float()
        e_sq_V = e_VC.square().sum(dim=1)  # once per call, shared by all scales
        for si, pn in enumerate(self.patch_nums):
            z_BChw = f_rest if si == self.SN - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
            z_NC = z_BChw.permute(0, 2, 3, 1).reshape(-1, C)
            idx_N = self._nearest(z_NC, e_VC, e_sq_V)
            h_BChw = self._up_phi(si, self._embed(idx_N.view(B, pn * pn)), H)
            f_rest = f_rest - h_BChw.detach()
            yield si, z_NC, idx_N, h_BChw

    # ---- training forward ------------------------------------------------------------
    def forward(self, f_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """VQ-VAE training pass.

        Returns ``(f_hat_BChw, vq_loss, usage_S)``: ``f_hat`` with the straight-through estimator (its
        value is the quantized latent, its gradient w.r.t. ``f`` the identity), ``vq_loss`` = mean over
        scales of ``beta * |sg(f_hat) - f|^2 + |f_hat - sg(f)|^2`` (codebook and phi learn from the
        second term), and ``usage_S`` [SN] the fraction of the V codes hit at each scale in this batch
        (the global batch when torch.distributed is initialised). In training mode it also updates
        ``ema_vocab_hit_SV``.
        """
        with autocast_off(f_BChw.device):
            f = f_BChw.float()
            f_nograd = f.detach()
            f_hat = torch.zeros_like(f_nograd)
            vq_loss = f.new_zeros(())
            hit_SV = f.new_zeros(self.SN, self.vocab_size)
            for si, _z_NC, idx_N, h_BChw in self._residual_scales(f_nograd):
                f_hat = f_hat + h_BChw
                hit_SV[si] = idx_N.bincount(minlength=self.vocab_size).float()
                vq_loss = vq_loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_nograd)
            vq_loss = vq_loss / self.SN
            if self.training:
                hit_SV = self._record_hits(hit_SV)
            usage_S = (hit_SV > 0).float().mean(dim=1)
            f_hat = f + (f_hat - f).detach()  # straight-through: decoder grads flow to the encoder
        return f_hat, vq_loss, usage_S

    @torch.no_grad()
    def _record_hits(self, hit_SV: torch.Tensor) -> torch.Tensor:
        """All-reduce the batch's hit counts (if distributed) and fold them into the EMA buffer."""
        if _dist_on():
            tdist.all_reduce(hit_SV)
        ema = self.ema_vocab_hit_SV
        if ema.sum() == 0:  # never recorded: start from the first batch instead of from zero
            ema.copy_(hit_SV)
        else:
            ema.mul_(self.usage_decay).add_(hit_SV, alpha=1 - self.usage_decay)
        return hit_SV

    @torch.no_grad()
    def restart_dead_codes(
        self, f_BChw: torch.Tensor, generator: torch.Generator, threshold: float = 0.03
    ) -> torch.Tensor:
        """Replace dead codes by residual vectors of the current batch; returns their indices [n].

        A code is dead when its EMA hit count summed over scales is below ``threshold`` x the mean
        per-code count (so "unused for a while" depends on ``usage_decay``: an average code unused for
        ~350 updates falls below 3 %). Each dead row becomes a distinct random ``z_NC`` (the residual
        a scale quantized, pooled over all scales of ``f_BChw``), drawn with ``generator``, so a restart
        is deterministic. Its EMA count is reset to twice the threshold: a grace period before it can be
        restarted again. Under torch.distributed the rows are broadcast from rank 0 (the dead set is
        already the same on every rank because the hit counts are all-reduced). Only dead rows change;
        the trainer may reset their optimizer moments with the returned indices.
        """
        hits_V = self.ema_vocab_hit_SV.sum(dim=0)
        if hits_V.sum() == 0:  # nothing recorded yet: no evidence that any code is dead
            return torch.zeros(0, dtype=torch.long, device=hits_V.device)
        limit = threshold * hits_V.mean()
        dead_n = (hits_V < limit).nonzero().squeeze(1)
        n = dead_n.numel()
        if n == 0:
            return dead_n
        with autocast_off(f_BChw.device):
            z_NC = torch.cat([z for _, z, _, _ in self._residual_scales(f_BChw.float())])
        N = z_NC.shape[0]
        gdev = generator.device
        if n <= N:  # distinct vectors when the batch has enough of them
            pick_n = torch.randperm(N, generator=generator, device=gdev)[:n]
        else:
            pick_n = torch.randint(N, (n,), generator=generator, device=gdev)
        new_nC = z_NC[pick_n.to(z_NC.device)].contiguous()
        if _dist_on():
            tdist.broadcast(new_nC, src=0)
        weight = self.embedding.weight
        weight[dead_n.to(weight.device)] = new_nC.to(weight.dtype)
        self.ema_vocab_hit_SV[:, dead_n] = 2 * limit / self.SN
        return dead_n

    @torch.no_grad()
    def kmeans_init(self, f_BChw: torch.Tensor, generator: torch.Generator, iters: int = 10) -> float:
        """Initialise the codebook from data: Lloyd iterations on the residual vectors that the
        scales of ``f_BChw`` quantize (re-computed with the current codes at every iteration, so the
        codes fit the multi-scale residual loop, not just the last scale). Code 0 is pinned to the
        zero vector: a scale with nothing left to add can add nothing. Starts from random pooled
        latent vectors (drawn with ``generator``); an empty cluster takes a random residual vector.
        Resets the usage EMA. Returns the final mean squared quantization error per vector.

        A random codebook sits far from a small-spread latent (a residual tokenizer's), and the
        nearest-code search then uses a handful of codes for hundreds of steps; from data every code
        starts in use.
        """
        with autocast_off(f_BChw.device):
            f = f_BChw.float()
            C = f.shape[1]
            pooled = torch.cat([
                F.interpolate(f, size=(pn, pn), mode="area").permute(0, 2, 3, 1).reshape(-1, C)
                for pn in self.patch_nums
            ])  # fmt: skip
            gdev = generator.device
            e = self.embedding.weight
            pick = torch.randperm(pooled.shape[0], generator=generator, device=gdev)[: self.vocab_size]
            e[: len(pick)] = pooled[pick.to(pooled.device)].to(e.dtype)
            e[0] = 0
            mse = float("nan")
            for _ in range(iters):
                z = torch.cat([z for _, z, _, _ in self._residual_scales(f)])
                e_VC = e.detach().float()
                d_NV = z.square().sum(1, keepdim=True) + e_VC.square().sum(1) - 2 * z @ e_VC.T
                mind, assign = d_NV.min(dim=1)
                mse = float(mind.mean())
                count = assign.bincount(minlength=self.vocab_size).float()
                sums = torch.zeros_like(e_VC).index_add_(0, assign, z)
                live = count > 0
                e[live] = (sums[live] / count[live, None]).to(e.dtype)
                dead = (~live).nonzero().squeeze(1)
                if len(dead):
                    refill = torch.randperm(z.shape[0], generator=generator, device=gdev)[: len(dead)]
                    e[dead] = z[refill.to(z.device)].to(e.dtype)
                e[0] = 0
            self.ema_vocab_hit_SV.zero_()
        return mse

    # ---- encoding (no grad) ------------------------------------------------------------
    @torch.no_grad()
    def f_to_idxBl(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """Latent -> SN LongTensors [B, pn*pn] (VAR's ``f_to_idxBl_or_fhat(to_fhat=False)``)."""
        B = f_BChw.shape[0]
        with autocast_off(f_BChw.device):
            return [idx_N.view(B, -1) for _, _, idx_N, _ in self._residual_scales(f_BChw.float())]

    @torch.no_grad()
    def f_to_fhat(self, f_BChw: torch.Tensor) -> torch.Tensor:
        """Latent -> its quantized version f_hat [B, C, h, w] (sum of all scales' contributions)."""
        with autocast_off(f_BChw.device):
            f_hat = torch.zeros_like(f_BChw, dtype=torch.float32)
            for _, _, _, h_BChw in self._residual_scales(f_BChw.float()):
                f_hat += h_BChw
        return f_hat

    # ---- decoding side: the teacher-forcing input and its autoregressive twin --------------
    def idxBl_to_fhat(self, ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Token maps of scales 0..k -> f_hat [B, C, h, w] fp32 (all of them: the full reconstruction).

        Scales are upsampled to the full grid except scale SN-1, so a prefix of the list gives the
        coarse reconstruction VAR calls ``all_to_max_scale``."""
        B, HW = ms_idx_Bl[0].shape[0], self.patch_nums[-1]
        with autocast_off(ms_idx_Bl[0].device):
            f_hat = torch.zeros(B, self.Cvae, HW, HW, device=ms_idx_Bl[0].device)
            for si, idx_Bl in enumerate(ms_idx_Bl):
                f_hat = f_hat + self._up_phi(si, self._embed(idx_Bl), HW)
        return f_hat

    def idxBl_to_var_input(self, ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher forcing: SN token maps -> ``x_BLCv_wo_first_l`` [B, L - first_l, Cvae] fp32.

        The input for scale si+1 is the *cumulative* f_hat after scales 0..si (bicubic up, phi, add),
        area-downsampled to scale si+1's grid and flattened row-major; it is not scale si's embedding.
        """
        B, HW = ms_idx_Bl[0].shape[0], self.patch_nums[-1]
        device = ms_idx_Bl[0].device
        next_ls: list[torch.Tensor] = []
        with autocast_off(device):
            f_hat = torch.zeros(B, self.Cvae, HW, HW, device=device)
            for si in range(self.SN - 1):
                f_hat = f_hat + self._up_phi(si, self._embed(ms_idx_Bl[si]), HW)
                pn = self.patch_nums[si + 1]
                next_BChw = F.interpolate(f_hat, size=(pn, pn), mode="area")
                next_ls.append(next_BChw.flatten(2).transpose(1, 2))  # [B, pn*pn, C]
        if not next_ls:
            return torch.zeros(B, 0, self.Cvae, device=device)
        return torch.cat(next_ls, dim=1)

    def get_next_autoregressive_input(
        self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference twin of :meth:`idxBl_to_var_input`: add scale ``si``'s code map ``h_BChw``
        [B, C, pn, pn] to ``f_hat`` [B, C, h, w]. Returns ``(f_hat, next_BChw)``: the new f_hat (a new
        tensor; the argument is not modified) and the input of scale si+1, f_hat area-downsampled to
        [B, C, pn_next, pn_next]; at the last scale ``next_BChw`` is f_hat itself."""
        HW = self.patch_nums[-1]
        with autocast_off(f_hat.device):
            f_hat = f_hat.float() + self._up_phi(si, h_BChw.float(), HW, SN)
            if si == SN - 1:
                return f_hat, f_hat
            pn = self.patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")

    # ---- helpers --------------------------------------------------------------------
    def split_idx_BL(self, idx_BL: torch.Tensor) -> list[torch.Tensor]:
        """[B, L] concatenated tokens (as stored by ``tokenize``) -> SN LongTensors [B, pn*pn]."""
        return list(idx_BL.long().split([pn * pn for pn in self.patch_nums], dim=1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Like VAR: the usage buffer depends on patch_nums, the weights do not. A checkpoint saved with
        # another scale count (e.g. the 256 px VAE used with 512 px patch_nums) keeps our own buffer.
        key = prefix + "ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape != self.ema_vocab_hit_SV.shape:
            state_dict[key] = self.ema_vocab_hit_SV.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
