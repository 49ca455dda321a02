"""Gaussian diffusion (schedules, respacing, samplers, losses) and the DiffLoss head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from arsr.models.diffloss import DiffLoss, SimpleMLPAdaLN
from arsr.models.diffusion import GaussianDiffusion, create_diffusion, space_timesteps

# Tiny ops on a shared 2-core box: one intra-op thread (conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------
# schedules and respacing
# --------------------------------------------------------------------------------------
def test_cosine_schedule_matches_closed_form():
    d = create_diffusion("", "cosine")
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    closed = np.array([f((i + 1) / 1000) / f(0) for i in range(1000)])
    # identical until the 0.999 cap on beta bites in the last steps
    np.testing.assert_allclose(d.alphas_cumprod[:990], closed[:990], rtol=1e-10)
    assert d.betas.max() == pytest.approx(0.999) and d.betas.dtype == np.float64


def test_linear_schedule_endpoints():
    d = create_diffusion("", "linear")
    assert d.betas[0] == pytest.approx(1e-4) and d.betas[-1] == pytest.approx(0.02)


def test_q_sample_mean_and_variance_match_closed_form():
    d = create_diffusion("", "cosine")
    n = 40_000
    t_values = [0, 100, 500, 900]
    x0 = torch.tensor([1.5, -0.7, 0.0, 3.0])
    for t in t_values:
        ab = d.alphas_cumprod[t]
        xt = d.q_sample(x0.expand(n, 4), torch.full((n,), t), generator=_gen(t))
        mean, var = xt.mean(0), xt.var(0)
        se_mean = math.sqrt((1 - ab) / n)
        se_var = (1 - ab) * math.sqrt(2 / n)
        assert torch.allclose(mean, math.sqrt(ab) * x0, atol=5 * se_mean), (t, mean)
        assert torch.allclose(var, torch.full((4,), 1 - ab), atol=5 * se_var), (t, var)
        m, v = d.q_mean_variance(x0[None], torch.tensor([t]))
        assert torch.allclose(m[0], math.sqrt(ab) * x0) and torch.allclose(v[0], torch.full((4,), 1 - ab))


def test_space_timesteps_rules():
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(100, "5,5") == [0, 12, 24, 37, 49, 50, 62, 74, 87, 99]
    assert space_timesteps(1000, "") == list(range(1000))
    assert len(space_timesteps(1000, "100")) == 100
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim600")  # no integer stride gives exactly 600 steps
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


@pytest.mark.parametrize("spec", ["100", "50", "ddim25", "10,20"])
def test_respaced_betas_reproduce_alphas_cumprod(spec):
    base = create_diffusion("", "cosine")
    d = create_diffusion(spec, "cosine")
    kept = space_timesteps(1000, spec)
    assert list(d.timestep_map) == kept and d.num_timesteps == len(kept)
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-9)
    # the net is called with original timesteps
    t = torch.arange(d.num_timesteps)
    assert d.original_timesteps(t).tolist() == kept


# --------------------------------------------------------------------------------------
# samplers
# --------------------------------------------------------------------------------------
def _point_mass_oracle(base: GaussianDiffusion, x0: torch.Tensor):
    """The exact eps when the data is the point mass x0 (per row); v = 0."""
    ab_all = torch.as_tensor(base.alphas_cumprod)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = ab_all[t].to(x.dtype)[:, None]  # t are original timesteps
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model


@pytest.mark.parametrize("spec", ["", "50"])
def test_p_sample_loop_with_oracle_returns_x0(spec):
    """Tolerance: 1e-4 absolute in float32 (the last step is x0 = (x - sqrt(1-ab_0) eps)/sqrt(ab_0))."""
    base, d = create_diffusion(""), create_diffusion(spec)
    x0 = torch.randn(64, 8, generator=_gen(0))
    model = _point_mass_oracle(base, x0)
    for temperature in (1.0, 0.5):
        x_T = torch.randn(64, 8, generator=_gen(1))
        out = d.p_sample_loop(model, x_T, temperature=temperature, generator=_gen(2))
        assert (out - x0).abs().max() < 1e-4


@pytest.mark.parametrize("spec", ["", "ddim10", "25"])
def test_p_sample_loop_equals_step_by_step_p_sample(spec):
    """The loop's scalar fast path gives exactly the numbers of the general per-row p_sample."""
    d = create_diffusion(spec)
    net = SimpleMLPAdaLN(in_channels=4, width=32, out_channels=8, z_channels=6, depth=2)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    c = torch.randn(16, 6, generator=_gen(1))
    model = lambda x, t: net(x, t, c)  # noqa: E731
    x_T = torch.randn(16, 4, generator=_gen(2))
    gen_fast = _gen(3)
    fast = d.p_sample_loop(model, x_T, temperature=0.9, generator=gen_fast)
    x, g = x_T, _gen(3)
    with torch.no_grad():
        for i in reversed(range(d.num_timesteps)):
            x = d.p_sample(model, x, torch.full((16,), i, dtype=torch.long), 0.9, generator=g)
    assert torch.equal(fast, x)
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=gen_fast))


def test_p_sample_loop_respacing_uses_original_timesteps():
    """If the respaced chain called the net with its own indices, the oracle's eps would be wrong."""
    base, d = create_diffusion(""), create_diffusion("20")
    x0 = torch.randn(16, 4, generator=_gen(0))
    wrong = _point_mass_oracle(base, x0)

    def model_seeing_step_index(x, t):  # pretend t were the respaced index
        return wrong(x, torch.as_tensor(np.searchsorted(d.timestep_map, t.numpy())))

    out = d.p_sample_loop(model_seeing_step_index, torch.randn(16, 4, generator=_gen(1)), generator=_gen(2))
    assert (out - x0).abs().max() > 1e-2


def _gaussian_oracle(base: GaussianDiffusion, mean: torch.Tensor, std: torch.Tensor):
    """The exact eps = E[eps | x_t] when the data is N(mean, diag(std^2))."""
    ab_all = torch.as_tensor(base.alphas_cumprod)

    def model(x, t):
        ab = ab_all[t].to(x.dtype)[:, None]
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * mean) / (ab * std**2 + 1 - ab)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model


def test_ddim_reverse_then_forward_round_trips():
    """DDIM inversion is first order in the step size, so with an exact (Gaussian-data) score the
    round trip error falls with the number of steps: measured 5e-3 max abs for 1000 steps, 5e-2 for
    100 steps. Tolerance: 1e-2 at 1000 steps, and 10x shrinking from 100 to 1000 steps."""
    base = create_diffusion("")
    mean, std = torch.linspace(-1, 1, 16), torch.linspace(0.1, 1.0, 16)
    model = _gaussian_oracle(base, mean, std)
    x0 = torch.randn(32, 16, generator=_gen(0)) * std + mean
    errors = {}
    for spec in ("", "ddim100"):
        d = create_diffusion(spec)
        x_T = d.ddim_reverse_sample_loop(model, x0)
        assert 0.8 < x_T.std() < 1.2  # it really is noise at the top
        errors[spec] = (d.ddim_sample_loop(model, x_T) - x0).abs().max().item()
    assert errors[""] < 1e-2
    assert errors[""] < errors["ddim100"] / 5


@pytest.mark.parametrize("spec", ["", "ddim50"])
def test_ddim_round_trip_with_the_oracle_epsilon_is_within_1e3(spec):
    """The oracle epsilon of the p_sample_loop test (data = the point x0): every DDIM step predicts
    x0 exactly, so inversion then sampling returns x0 up to float error (issue: 1e-3)."""
    base = create_diffusion("")
    x0 = torch.randn(32, 16, generator=_gen(4))
    model = _point_mass_oracle(base, x0)
    d = create_diffusion(spec)
    x_T = d.ddim_reverse_sample_loop(model, x0)
    assert (x_T - x0).abs().max() > 0.5  # it went somewhere
    assert (d.ddim_sample_loop(model, x_T) - x0).abs().max() < 1e-3


def test_ddim_stochastic_is_seeded():
    d = create_diffusion("ddim10")
    model = _gaussian_oracle(create_diffusion(""), torch.zeros(4), torch.ones(4))
    x_T = torch.randn(8, 4, generator=_gen(0))
    a = d.ddim_sample_loop(model, x_T, eta=1.0, generator=_gen(5))
    b = d.ddim_sample_loop(model, x_T, eta=1.0, generator=_gen(5))
    c = d.ddim_sample_loop(model, x_T, eta=0.0)
    assert torch.equal(a, b) and not torch.allclose(a, c)


# --------------------------------------------------------------------------------------
# training loss
# --------------------------------------------------------------------------------------
def test_training_loss_terms_and_frozen_eps():
    d = create_diffusion("")
    net = SimpleMLPAdaLN(in_channels=4, width=32, out_channels=8, z_channels=6, depth=2)
    for p in net.parameters():  # leave the zero init so both heads get gradients
        torch.nn.init.normal_(p, std=0.1)
    x0 = torch.randn(256, 4, generator=_gen(0))
    c = torch.randn(256, 6, generator=_gen(1))
    t = torch.randint(0, 1000, (256,), generator=_gen(2))
    t[:3] = 0  # the discretized decoder term
    terms = d.training_losses(lambda x, tt: net(x, tt, c), x0, t, generator=_gen(3))
    assert set(terms) == {"loss", "mse", "vb"} and terms["loss"].shape == (256,)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    assert torch.isfinite(terms["vb"]).all() and (terms["vb"][3:] >= -1e-6).all()  # KL >= 0
    # vb must not train the eps channels: its gradient wrt the eps output is zero
    out = net(x0, t, c).detach().requires_grad_(True)
    terms = d.training_losses(lambda x, tt: out, x0, t, generator=_gen(3))
    (g,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert g[:, :4].abs().max() == 0 and g[:, 4:].abs().max() > 0


def test_training_loss_zero_for_perfect_eps():
    """With the true noise as eps and v chosen so the variance equals the posterior's, mse = 0 and
    the KL part of vb = 0 (t > 0)."""
    d = create_diffusion("")
    x0 = torch.randn(64, 4, generator=_gen(0), dtype=torch.float64)
    noise = torch.randn(64, 4, generator=_gen(1), dtype=torch.float64)
    t = torch.randint(1, 1000, (64,), generator=_gen(2))
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # v = -1: posterior variance
    terms = d.training_losses(lambda x, tt: out, x0, t, noise=noise)
    assert terms["mse"].abs().max() < 1e-20 and terms["vb"].abs().max() < 1e-8


# --------------------------------------------------------------------------------------
# DiffLoss
# --------------------------------------------------------------------------------------
def test_diffloss_key_names_and_zero_init():
    dl = DiffLoss(target_channels=16, z_channels=768, depth=2, width=64, num_sampling_steps="100")
    keys = set(dl.state_dict())
    for k in (
        "net.time_embed.mlp.0.weight",
        "net.time_embed.mlp.2.bias",
        "net.cond_embed.weight",
        "net.input_proj.weight",
        "net.res_blocks.1.in_ln.weight",
        "net.res_blocks.1.mlp.2.weight",
        "net.res_blocks.1.adaLN_modulation.1.weight",
        "net.final_layer.linear.weight",
        "net.final_layer.adaLN_modulation.1.bias",
    ):
        assert k in keys, k
    out = dl.net(torch.randn(5, 16), torch.tensor([0, 1, 2, 500, 999]), torch.randn(5, 768))
    assert out.shape == (5, 32) and out.abs().max() == 0  # eps = 0, v = 0 at init


def test_timestep_table_path_matches_direct_embedding():
    net = SimpleMLPAdaLN(in_channels=4, width=32, out_channels=8, z_channels=6, depth=1)
    t = torch.randint(0, 1000, (3000,), generator=_gen(0))  # > 1000 rows: the table path
    direct = net.time_embed.mlp(net.time_embed.sinusoid(t))
    assert torch.allclose(net.time_embed(t), direct, atol=1e-6)


def test_diffloss_forward_masked_mean():
    torch.manual_seed(0)
    dl = DiffLoss(target_channels=4, z_channels=8, depth=1, width=16, num_sampling_steps="10")
    target, z = torch.randn(10, 4), torch.randn(10, 8)
    mask = torch.tensor([1.0] * 4 + [0.0] * 6)
    full = dl(target, z, generator=_gen(0))
    masked = dl(target, z, mask, generator=_gen(0))
    # same draws: the masked mean is the mean of the first 4 rows' losses
    t = torch.randint(0, 1000, (10,), generator=_gen(0))
    g = _gen(0)
    torch.randint(0, 1000, (10,), generator=g)  # advance g past the timestep draw
    rows = dl.train_diffusion.training_losses(lambda x, tt: dl.net(x, tt, z), target, t, generator=g)["loss"]
    assert torch.allclose(full, rows.mean()) and torch.allclose(masked, rows[:4].mean())


def _trained_looking_diffloss() -> DiffLoss:
    dl = DiffLoss(target_channels=4, z_channels=8, depth=2, width=32, num_sampling_steps="20")
    for p in dl.parameters():
        torch.nn.init.normal_(p, std=0.05)  # non-zero output layers, so cond and uncond differ
    return dl.eval()


def test_diffloss_sample_cfg_semantics():
    dl = _trained_looking_diffloss()
    z, z_null = torch.randn(6, 8, generator=_gen(0)), torch.randn(6, 8, generator=_gen(1))
    plain = dl.sample(z, temperature=1.0, generator=_gen(7))
    again = dl.sample(z, temperature=1.0, generator=_gen(7))
    guided_1 = dl.sample(z, temperature=1.0, cfg=1.0, z_uncond=z_null, generator=_gen(7))
    guided_3 = dl.sample(z, temperature=1.0, cfg=3.0, z_uncond=z_null, generator=_gen(7))
    assert plain.shape == (6, 4)
    assert torch.equal(plain, again)  # same seed, same sample
    assert torch.allclose(guided_1, plain, atol=1e-5)  # cfg = 1 is no guidance
    assert (guided_3 - plain).abs().max() > 1e-3  # cfg > 1 changes the sample
    assert not torch.allclose(dl.sample(z, generator=_gen(8)), plain)  # another seed, another sample
    assert dl.sample(z[:0]).shape == (0, 4)


def test_diffloss_sample_matches_generic_chain():
    """The fast sampler (cond embedded once, one time embedding per step) equals p_sample_loop
    driven by the plain net."""
    dl = _trained_looking_diffloss()
    z = torch.randn(6, 8, generator=_gen(0))
    fast = dl.sample(z, temperature=0.9, generator=_gen(3))
    g = _gen(3)
    x_T = torch.randn(6, 4, generator=g)
    slow = dl.gen_diffusion.p_sample_loop(lambda x, t: dl.net(x, t, z), x_T, temperature=0.9, generator=g)
    assert torch.allclose(fast, slow, atol=1e-5)
