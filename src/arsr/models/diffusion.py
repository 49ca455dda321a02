"""Gaussian diffusion for DiffLoss heads (MAR, the SRVAR refiner).

The setting MAR uses from IDDPM/ADM, and only that:
- the net predicts epsilon plus ``v`` in [-1, 1] per channel (output ``[N, 2C]``); ``v`` picks the
  log-variance between the clipped posterior variance (v=-1) and beta_t (v=+1): "learned range";
- training loss per row = mse(eps) + vb, where vb (in bits) is computed with a *detached* eps, so
  the vb term trains only the variance channels;
- respacing ("100", "ddim25", "10,20") keeps a subset of the training steps; betas are recomputed
  from alpha_bar at the kept steps, and the net always sees the *original* timestep (0..T-1).

A denoiser is any callable ``model(x_NC, t_N) -> out_N2C`` (bind conditions with a closure); ``t_N``
are original timesteps. Schedules are float64 numpy arrays like the reference and are gathered to
the input's dtype and device on use; nothing is moved to a GPU implicitly. Every random draw takes
an optional ``torch.Generator`` so sampling is reproducible; the samplers also take
:class:`~arsr.models.rng.RowGenerators` (noise row chunk b from generator b, rows [N, ...] split
into equal chunks), so a row's noise does not depend on the other rows of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from arsr.models import rng

Denoiser = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------
# Schedules and respacing
# --------------------------------------------------------------------------------------
def linear_betas(num_steps: int) -> np.ndarray:
    """Ho et al.'s linear schedule, rescaled so any step count spans the same noise range."""
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2)."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    s = np.arange(num_steps + 1) / num_steps
    ab = np.array([alpha_bar(v) for v in s], dtype=np.float64)
    # beta_i = 1 - alpha_bar(t_{i+1}) / alpha_bar(t_i); capped because alpha_bar(1) = 0
    return np.minimum(1 - ab[1:] / ab[:-1], max_beta)


def named_betas(name: str, num_steps: int) -> np.ndarray:
    if name == "linear":
        return linear_betas(num_steps)
    if name == "cosine":
        return cosine_betas(num_steps)
    raise ValueError(f"unknown noise schedule {name!r} (expected 'linear' or 'cosine')")


def space_timesteps(num_timesteps: int, spec: str | Sequence[int]) -> list[int]:
    """Which of ``num_timesteps`` original steps to keep, IDDPM's rules, sorted ascending.

    ``"100"``: 100 steps evenly strided (fractional stride, rounded) over the whole range.
    ``"10,20"``: the range is cut into 2 equal sections with 10 and 20 steps.
    ``"ddim25"``: an integer stride giving exactly 25 steps starting at 0 (DDIM's spacing).
    ``""``: every step.
    """
    if isinstance(spec, str):
        if spec == "":
            return list(range(num_timesteps))
        if spec.startswith("ddim"):
            want = int(spec[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {want} steps of {num_timesteps} with an integer stride")
        spec = [int(s) for s in spec.split(",")]
    size_per, extra = divmod(num_timesteps, len(spec))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(spec):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(kept))


# --------------------------------------------------------------------------------------
# Log-likelihood helpers (nats)
# --------------------------------------------------------------------------------------
def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp()
    )


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) for a Gaussian binned to 1/255-wide buckets on [-1, 1] (ADM's t=0 decoder term).

    A pixel-space leftover kept for parity with the reference: in latent space it only affects
    the rows drawn at t=0 (1 in 1000).
    """
    centered = x - mean
    inv_std = (-log_scale).exp()
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


# --------------------------------------------------------------------------------------
# The diffusion process
# --------------------------------------------------------------------------------------
class GaussianDiffusion:
    """eps-prediction diffusion with learned-range variance over rows ``x [N, C, ...]``.

    ``betas`` are the (possibly respaced) betas; ``timestep_map[i]`` is the original timestep of
    step ``i`` (identity when not respaced). Indices ``t`` passed to the methods are step indices
    of *this* process; the denoiser receives ``timestep_map[t]``.
    """

    def __init__(self, betas: np.ndarray, timestep_map: Sequence[int] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all()
        self.num_timesteps = T = len(betas)
        self.timestep_map = np.arange(T) if timestep_map is None else np.asarray(timestep_map)
        assert len(self.timestep_map) == T

        alphas = 1.0 - betas
        ab = np.cumprod(alphas)
        ab_prev = np.append(1.0, ab[:-1])
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        self.betas = betas
        self.alphas_cumprod = ab
        self.alphas_cumprod_prev = ab_prev
        self.alphas_cumprod_next = np.append(ab[1:], 0.0)
        # Named float64 tables; gathered per row by _gather.
        self._np = {
            "sqrt_ab": np.sqrt(ab),
            "sqrt_1m_ab": np.sqrt(1.0 - ab),
            "log_1m_ab": np.log(1.0 - ab),
            "one_m_ab": 1.0 - ab,
            "sqrt_recip_ab": np.sqrt(1.0 / ab),
            "sqrt_recipm1_ab": np.sqrt(1.0 / ab - 1.0),
            "ab": ab,
            "ab_prev": ab_prev,
            "ab_next": self.alphas_cumprod_next,
            "post_var": post_var,
            # the posterior variance is 0 at t=0; its log is clipped to the t=1 value
            "post_logvar": np.log(np.append(post_var[1], post_var[1:])) if T > 1 else np.log(betas),
            "post_coef1": betas * np.sqrt(ab_prev) / (1.0 - ab),
            "post_coef2": (1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab),
            "log_betas": np.log(betas),
            "timestep_map": self.timestep_map,
        }
        self._tables: dict[tuple[str, torch.device], Tensor] = {}

    # ---- table access ------------------------------------------------------------------
    def _table(self, name: str, device: torch.device) -> Tensor:
        """A schedule array as a tensor on ``device`` (float64, cached per device)."""
        key = (name, device)
        if key not in self._tables:
            arr = self._np[name]
            dtype = torch.long if name == "timestep_map" else torch.float64
            if device.type == "mps" and dtype == torch.float64:
                dtype = torch.float32  # MPS has no float64
            self._tables[key] = torch.as_tensor(arr, dtype=dtype).to(device)
        return self._tables[key]

    def _gather(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """``table[t]`` in x's dtype, shaped [N, 1, ...] to broadcast against x [N, ...]."""
        v = self._table(name, t.device)[t].to(x.dtype)
        return v.view(-1, *([1] * (x.ndim - 1)))

    def original_timesteps(self, t: Tensor) -> Tensor:
        """Step indices of this (respaced) process -> original 0..T0-1 timesteps the net expects."""
        return self._table("timestep_map", t.device)[t]

    # ---- forward process ---------------------------------------------------------------
    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_t | x_0)."""
        return self._gather("sqrt_ab", t, x0) * x0, self._gather("one_m_ab", t, x0).expand_as(x0)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None, generator=None) -> Tensor:
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps."""
        if noise is None:
            noise = randn_like(x0, generator)
        return self._gather("sqrt_ab", t, x0) * x0 + self._gather("sqrt_1m_ab", t, x0) * noise

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._gather("post_coef1", t, x_t) * x0 + self._gather("post_coef2", t, x_t) * x_t
        var = self._gather("post_var", t, x_t).expand_as(x_t)
        logvar = self._gather("post_logvar", t, x_t).expand_as(x_t)
        return mean, var, logvar

    # ---- reverse process ---------------------------------------------------------------
    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return self._gather("sqrt_recip_ab", t, x_t) * x_t - self._gather("sqrt_recipm1_ab", t, x_t) * eps

    def _split_output(self, out: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Net output [N, 2C] -> (eps [N, C], log-variance [N, C]) in x's dtype."""
        eps, v = out.to(x.dtype).chunk(2, dim=1)
        frac = (v + 1) / 2  # v is not bounded; [-1, 1] spans [posterior var, beta_t]
        logvar = frac * self._gather("log_betas", t, x) + (1 - frac) * self._gather("post_logvar", t, x)
        return eps, logvar

    def p_mean_variance(
        self, model: Denoiser, x: Tensor, t: Tensor, clip_denoised: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """p(x_{t-1} | x_t): (mean, log-variance, predicted x_0)."""
        eps, logvar = self._split_output(model(x, self.original_timesteps(t)), x, t)
        x0 = self.predict_x0_from_eps(x, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(x0, x, t)
        return mean, logvar, x0

    def p_sample(
        self,
        model: Denoiser,
        x: Tensor,
        t: Tensor,
        temperature: float = 1.0,
        clip_denoised: bool = False,
        generator: rng.AnyGenerator = None,
    ) -> Tensor:
        """One ancestral step x_t -> x_{t-1}; temperature scales only the added noise (ADM/MAR)."""
        mean, logvar, _ = self.p_mean_variance(model, x, t, clip_denoised)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # no noise on the last step
        return mean + nonzero * (0.5 * logvar).exp() * randn_like(x, generator) * temperature

    @torch.no_grad()
    def p_sample_loop(
        self,
        model: Denoiser,
        x_T: Tensor,
        temperature: float = 1.0,
        clip_denoised: bool = False,
        generator: rng.AnyGenerator = None,
    ) -> Tensor:
        """Ancestral sampling from x_T (pure noise, [N, C, ...]) down to x_0.

        Every row shares the step, so the schedule's values enter as Python scalars instead of
        per-row gathers: the same numbers as :meth:`p_sample` in fewer ops per step.
        """
        x, tab = x_T, self._np
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            if clip_denoised:  # the general path (rare)
                x = self.p_sample(model, x, t, temperature, clip_denoised, generator)
                continue
            eps, v = model(x, self.original_timesteps(t)).to(x.dtype).chunk(2, dim=1)
            x0 = float(tab["sqrt_recip_ab"][i]) * x - float(tab["sqrt_recipm1_ab"][i]) * eps
            mean = float(tab["post_coef1"][i]) * x0 + float(tab["post_coef2"][i]) * x
            noise = randn_like(x, generator)  # also on the last step: the generator advances as in p_sample
            if i == 0:  # no noise on the last step
                x = mean
                continue
            log_beta, post_logvar = float(tab["log_betas"][i]), float(tab["post_logvar"][i])
            frac = (v + 1) / 2  # as _split_output
            logvar = frac * log_beta + (1 - frac) * post_logvar
            x = mean + (0.5 * logvar).exp() * noise * temperature
        return x

    def ddim_sample(
        self,
        model: Denoiser,
        x: Tensor,
        t: Tensor,
        eta: float = 0.0,
        clip_denoised: bool = False,
        generator: rng.AnyGenerator = None,
    ) -> Tensor:
        """One DDIM step x_t -> x_{t-1} (eta=0: deterministic). Temperature does not apply."""
        _, _, x0 = self.p_mean_variance(model, x, t, clip_denoised)
        eps = (self._gather("sqrt_recip_ab", t, x) * x - x0) / self._gather("sqrt_recipm1_ab", t, x)
        ab, ab_prev = self._gather("ab", t, x), self._gather("ab_prev", t, x)
        sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
        out = x0 * ab_prev.sqrt() + (1 - ab_prev - sigma**2).sqrt() * eps
        if eta > 0:
            nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
            out = out + nonzero * sigma * randn_like(x, generator)
        return out

    def ddim_reverse_sample(
        self, model: Denoiser, x: Tensor, t: Tensor, clip_denoised: bool = False
    ) -> Tensor:
        """One deterministic DDIM inversion step x_t -> x_{t+1}."""
        _, _, x0 = self.p_mean_variance(model, x, t, clip_denoised)
        eps = (self._gather("sqrt_recip_ab", t, x) * x - x0) / self._gather("sqrt_recipm1_ab", t, x)
        ab_next = self._gather("ab_next", t, x)
        return x0 * ab_next.sqrt() + (1 - ab_next).sqrt() * eps

    @torch.no_grad()
    def ddim_sample_loop(
        self, model: Denoiser, x_T: Tensor, eta: float = 0.0, generator: rng.AnyGenerator = None
    ) -> Tensor:
        x = x_T
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            x = self.ddim_sample(model, x, t, eta, generator=generator)
        return x

    @torch.no_grad()
    def ddim_reverse_sample_loop(self, model: Denoiser, x0: Tensor) -> Tensor:
        """Deterministic DDIM inversion: clean x_0 -> x at the noisiest step T-1.

        Mirrors ``ddim_sample_loop`` (eta=0) step for step, so running both gives x_0 back up to
        the discretization error of DDIM, which is first order in the step size.
        """
        zero = torch.zeros(x0.shape[0], device=x0.device, dtype=torch.long)
        # clean -> step 0 (undone by the sampler's last step) with the eps the net predicts at x0
        eps, _ = self._split_output(model(x0, self.original_timesteps(zero)), x0, zero)
        x = self._gather("sqrt_ab", zero, x0) * x0 + self._gather("sqrt_1m_ab", zero, x0) * eps
        for i in range(self.num_timesteps - 1):
            x = self.ddim_reverse_sample(model, x, torch.full_like(zero, i))  # step i -> i+1
        return x

    # ---- training ------------------------------------------------------------------------
    def vb_bits(self, x0: Tensor, x_t: Tensor, t: Tensor, eps: Tensor, logvar: Tensor) -> Tensor:
        """Per-row variational-bound term in bits: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, and the
        discretized decoder NLL at t = 0."""
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x0, x_t, t)
        mean, _, _ = self.q_posterior_mean_variance(self.predict_x0_from_eps(x_t, t, eps), x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model: Denoiser,
        x0: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-row losses ``{"loss", "mse", "vb"}`` (each [N]); loss = mse + vb (IDDPM "hybrid").

        The net output may be low precision (autocast); the diffusion arithmetic runs in x0's dtype.
        """
        if noise is None:
            noise = randn_like(x0, generator)
        x_t = self.q_sample(x0, t, noise)
        eps, logvar = self._split_output(model(x_t, self.original_timesteps(t)), x_t, t)
        mse = _mean_flat((noise - eps) ** 2)
        # vb sees a frozen eps: it may only move the variance channels, never the mean.
        vb = self.vb_bits(x0, x_t, t, eps.detach(), logvar)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def create_diffusion(
    timestep_respacing: str = "", noise_schedule: str = "cosine", diffusion_steps: int = 1000
) -> GaussianDiffusion:
    """A ``diffusion_steps`` process, respaced to ``timestep_respacing`` ("" keeps every step)."""
    betas = named_betas(noise_schedule, diffusion_steps)
    kept = space_timesteps(diffusion_steps, timestep_respacing)
    if len(kept) == diffusion_steps:
        return GaussianDiffusion(betas)
    ab = np.cumprod(1.0 - betas)[kept]
    # betas of the shorter chain, so that its alpha_bar equals the original's at the kept steps
    new_betas = 1.0 - ab / np.append(1.0, ab[:-1])
    return GaussianDiffusion(new_betas, timestep_map=kept)


def randn_like(x: Tensor, generator: rng.AnyGenerator = None) -> Tensor:
    """Standard normal noise like x; drawn on the generator's device, then moved to x's. With
    :class:`~arsr.models.rng.RowGenerators` x's rows [N, ...] are split into one chunk per generator."""
    if generator is None:
        return torch.randn_like(x)
    return rng.randn(x.shape, generator, x.device, x.dtype)
