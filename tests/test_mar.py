"""MAR (class mode and MAR-SR): layout, randomness, schedule, conditioning (of the tokenizer's width or
its own), CFG, overfitting, and the upscaler with both tokenizers."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arsr.data.loader import to_uint8
from arsr.data.tokens import TokenFacts
from arsr.infer.mar import MARSampling, MARUpscaler, build_mar_sr, lr_norm_of, lr_stats_of, make_upscaler
from arsr.infer.tokenizer import load_tokenizer, lr_condition, tokenizer_entry
from arsr.models.base import BaseSR, BaseSRConfig
from arsr.models.mar import MAR, MAR_B, MAR_H, MAR_L, MARConfig, mask_schedule, tokens_per_step
from arsr.models.residual import SRTokenizer
from arsr.models.vqvae import VQVAE, VQVAEConfig

KEYS_TSV = Path(__file__).resolve().parents[2] / "shared" / "reference" / "mar_base_keys.tsv"

# The hyperparameters these tests were written against (MAR's constructor defaults before MARConfig);
# the other fields (patch 1, mlp 4, mask ratio >= .7, cond drop .1, dropouts .1, 4 noise draws per
# token) equal MARConfig's defaults. The tiny models below override the sizes.
BASE = MARConfig(
    encoder_dim=1024, encoder_depth=16, encoder_heads=16, decoder_dim=1024, decoder_depth=16,
    decoder_heads=16, buffer_size=64, diffloss_depth=3, diffloss_width=1024, num_sampling_steps="100",
)  # fmt: skip
TINY_SR = replace(
    BASE, encoder_dim=32, encoder_depth=1, encoder_heads=4, decoder_dim=32, decoder_depth=1,
    decoder_heads=4, buffer_size=4, diffloss_depth=1, diffloss_width=32, num_sampling_steps="ddim10",
)  # fmt: skip


# Tiny ops on a shared 2-core box: one intra-op thread (conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_sr(grid_size: int = 4, num_classes: int = 0, **kw) -> MAR:
    """A 4x4 grid of 4-channel latents, LR grid of 4 channels: 16 tokens. ``kw``: MARConfig fields."""
    config = replace(TINY_SR, **kw)
    return MAR(config, grid_size=grid_size, token_channels=4, lr_channels=4, num_classes=num_classes)


# --------------------------------------------------------------------------------------
# layout and sizes
# --------------------------------------------------------------------------------------
def test_mar_base_state_dict_equals_official_key_table():
    if not KEYS_TSV.is_file():
        pytest.skip(f"{KEYS_TSV} not found (../shared is provided in CI)")
    rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines()[1:]]
    with torch.device("meta"):
        model = MAR(MAR_B, grid_size=16, token_channels=16, num_classes=1000)
    got = [(k, "x".join(map(str, v.shape))) for k, v in model.state_dict().items()]
    assert got == [(r[0], r[1]) for r in rows]  # key for key, shape for shape, same order


@pytest.mark.parametrize(("config", "millions"), [(MAR_B, 207.9), (MAR_L, 478.3), (MAR_H, 942.4)])
def test_parameter_counts(config, millions):
    with torch.device("meta"):
        model = MAR(config, grid_size=16, token_channels=16, num_classes=1000)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


def test_model_config_rebuilds_the_same_architecture():
    facts = dict(grid_size=16, token_channels=16, num_classes=10)
    with torch.device("meta"):
        a = MAR(MAR_L, **facts)
        b = MAR(MARConfig(**a.model_config()), **facts)
    assert b.model_config() == a.model_config()
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_build_from_mar_config():
    cfg = MARConfig(  # the sizes of the former params.yaml defaults (width 256, 4 + 4 blocks, heads 4)
        encoder_dim=256, encoder_depth=4, encoder_heads=4, decoder_dim=256, decoder_depth=4, decoder_heads=4,
        buffer_size=16, diffloss_depth=3, diffloss_width=256, num_sampling_steps="ddim25",
    )  # fmt: skip
    facts = TokenFacts(
        hr_size=64, scale=4, num_classes=0, patch_nums=(1, 2, 4, 8), vocab_size=64, Cvae=32, target="hr",
        lr_channels=32, vqvae_sha256="0" * 64, samples=1, mean=(0.0,) * 32, std=(1.0,) * 32,
    )  # fmt: skip
    model = build_mar_sr(cfg, facts)
    assert model.seq_len == 64 and model.token_dim == 32 and model.buffer_size == cfg.buffer_size
    assert model.lr_dim == 32
    assert model.encoder_pos_embed_learned.shape == (1, 16 + 64, 256)
    assert len(model.encoder_blocks) == 4 and len(model.diffloss.net.res_blocks) == 3
    assert model.diffloss.gen_diffusion.num_timesteps == len(model.diffloss.gen_diffusion.timestep_map)
    rebuilt = build_mar_sr(MARConfig(**model.model_config()), facts)
    rebuilt.load_state_dict(model.state_dict())  # strict
    assert not hasattr(model, "class_emb")
    assert hasattr(build_mar_sr(cfg, replace(facts, num_classes=5)), "class_emb")
    # a residual tokenizer: the LR condition (the base's features) has its own width
    residual = build_mar_sr(cfg, replace(facts, target="residual", lr_channels=64))
    assert residual.lr_dim == 64 and residual.null_lr.shape == (1, 64, 64) and residual.token_dim == 32
    assert residual.lr_proj_enc.in_features == 64 and residual.lr_pool.proj.in_features == 64


def test_lr_channels_other_than_the_token_width_train_and_sample():
    """MAR-SR with a 6-channel LR condition (e.g. the base's features) over 4-channel tokens."""
    config = replace(TINY_SR, attn_dropout=0.0, proj_dropout=0.0)
    model = _random_head(MAR(config, grid_size=4, token_channels=4, lr_channels=6)).train()
    x, lrf = torch.randn(4, 4, 4, 4), torch.randn(4, 6, 4, 4)
    loss = model(x, lrf, generator=_gen(0))
    loss.backward()
    assert torch.isfinite(loss) and model.lr_proj_dec.weight.grad.abs().sum() > 0
    model.eval()
    out = model.sample_tokens(lrf, num_iter=2, cfg=2.0, generator=_gen(1))
    assert out.shape == (4, 4, 4, 4) and torch.isfinite(out).all()
    assert torch.equal(out, model.sample_tokens(lrf, num_iter=2, cfg=2.0, generator=_gen(1)))
    other = model.sample_tokens(lrf + torch.randn_like(lrf), num_iter=2, cfg=2.0, generator=_gen(1))
    assert (other - out).abs().max() > 1e-4  # the condition matters


# --------------------------------------------------------------------------------------
# tokens, orders, masks, schedule
# --------------------------------------------------------------------------------------
def test_patchify_roundtrip_and_layout():
    model = tiny_sr(grid_size=8, patch_size=2)
    f = torch.randn(2, 4, 8, 8)
    x = model.patchify(f)
    assert x.shape == (2, 16, 16)
    # token (row 0, col 1), channel 3, in-patch (p=1, q=0): channel-major inside the token
    assert x[1, 1, 3 * 4 + 1 * 2 + 0] == f[1, 3, 1, 2]
    assert torch.equal(model.unpatchify(x), f)


def test_orders_and_mask_ratio_are_seeded_and_truncated_normal():
    model = tiny_sr(grid_size=16)
    a = model.sample_orders(4, torch.device("cpu"), _gen(0))
    assert torch.equal(a, model.sample_orders(4, torch.device("cpu"), _gen(0)))
    assert torch.equal(a.sort(dim=1).values, torch.arange(256).expand(4, -1))  # permutations
    g = _gen(1)
    ratios = torch.tensor([model.sample_mask_ratio(g) for _ in range(4000)])
    assert ratios.min() >= 0.7 and ratios.max() <= 1.0
    # N(1, 0.25^2) truncated to [0.7, 1]: mean 1 + 0.25 (phi(-1.2) - phi(0)) / (Phi(0) - Phi(-1.2)) = 0.867
    phi = lambda v: math.exp(-(v**2) / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    mean = 1 + 0.25 * (phi(-1.2) - phi(0)) / (0.5 - 0.5 * math.erfc(1.2 / math.sqrt(2)))
    assert abs(ratios.mean().item() - mean) < 0.005
    assert model.sample_mask_ratio(_gen(5)) == model.sample_mask_ratio(_gen(5))
    mask = model.random_mask(a, _gen(2))
    n = math.ceil(256 * model.sample_mask_ratio(_gen(2)))
    assert (mask.sum(1) == n).all()
    assert mask.gather(1, a[:, :n]).all()  # the first n positions of each order are the masked ones


def test_unmasking_schedule():
    assert tokens_per_step(256, 8) == [5, 15, 24, 31, 39, 45, 48, 49]
    assert mask_schedule(256, 8) == [251, 236, 212, 181, 142, 97, 49, 1]
    for L, n in [(64, 8), (16, 4), (16, 32), (256, 64)]:
        steps = tokens_per_step(L, n)
        assert sum(steps) == L and len(steps) == n and min(steps) >= 0
    assert tokens_per_step(256, 64)[0] == 1


# --------------------------------------------------------------------------------------
# training pass and conditioning
# --------------------------------------------------------------------------------------
def test_forward_is_seeded_and_trains_every_sr_part():
    model = _random_head(tiny_sr(cond_drop=0.5, attn_dropout=0.0, proj_dropout=0.0)).train()
    x, lrf = torch.randn(8, 4, 4, 4), torch.randn(8, 4, 4, 4)  # with p=0.5 some of the 8 are dropped
    loss = model(x, lrf, generator=_gen(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.equal(loss, model(x, lrf, generator=_gen(0)))
    loss.backward()  # (the zero-initialized head would pass no gradient back at step 0)
    for name in ("lr_pool.query", "lr_proj_enc.weight", "lr_proj_dec.weight", "null_lr", "fake_latent"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_condition_drop_uses_the_learned_nulls():
    model = tiny_sr().eval()
    lr = torch.randn(3, 16, 4)
    cond, lr_c = model.condition(3, lr)
    drop = torch.tensor([True, False, True])
    cond_d, lr_d = model.condition(3, lr, drop_B=drop)
    assert torch.equal(cond_d[1], cond[1]) and torch.equal(lr_d[1], lr_c[1])
    for i in (0, 2):
        assert torch.equal(cond_d[i], model.fake_latent[0]) and torch.equal(lr_d[i], model.null_lr[0])
    # the drop is applied only in train mode, per sample, with p = cond_drop
    model.train()
    model.cond_drop = 1.0
    x = torch.randn(3, 4, 4, 4)
    lrf = torch.randn(3, 4, 4, 4)
    loss_all_dropped = model(x, lrf, generator=_gen(0))
    loss_other_lr = model(x, torch.randn(3, 4, 4, 4), generator=_gen(0))
    assert torch.equal(loss_all_dropped, loss_other_lr)  # the LR input no longer matters


def test_class_labels_add_to_the_pooled_vector():
    model = tiny_sr(num_classes=3).eval()
    lr = torch.randn(2, 16, 4)
    cond, _ = model.condition(2, lr, torch.tensor([0, 2]))
    assert torch.allclose(cond, model.lr_pool(lr) + model.class_emb.weight[[0, 2]])


def test_decoder_sees_lr_at_masked_positions():
    model = tiny_sr().eval()
    x, lr = torch.randn(1, 16, 4), torch.randn(1, 16, 4)
    mask = torch.ones(1, 16, dtype=torch.bool)  # everything masked: only (a) and (b) carry LR
    cond, _ = model.condition(1, lr)
    h = model.forward_encoder(x, mask, cond, lr)
    lr2 = lr.clone()
    lr2[0, 5] += 1.0
    z1, z2 = model.forward_decoder(h, mask, lr), model.forward_decoder(h, mask, lr2)
    assert (z1 - z2).abs().max() > 1e-4


def test_class_mode_forward_and_unconditional():
    model = MAR(
        replace(TINY_SR, buffer_size=2, num_sampling_steps="5"),
        grid_size=4,
        token_channels=4,
        num_classes=10,
    )
    x = torch.randn(2, 4, 4, 4)
    assert torch.isfinite(model(x, labels_B=torch.tensor([1, 2]), generator=_gen(0)))
    model.eval()
    out = model.sample_tokens(labels_B=torch.tensor([1, 2]), num_iter=2, cfg=2.0, generator=_gen(0))
    assert out.shape == (2, 4, 4, 4)
    assert model.sample_tokens(bsz=3, num_iter=2, generator=_gen(0)).shape == (3, 4, 4, 4)


# --------------------------------------------------------------------------------------
# sampling and CFG
# --------------------------------------------------------------------------------------
def _random_head(model: MAR) -> MAR:
    for p in model.diffloss.parameters():  # leave the zero init so cond and uncond differ
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_cfg_unconditional_half_equals_the_learned_nulls():
    model = _random_head(tiny_sr())
    lrf = torch.randn(2, 4, 4, 4)
    seen: list[torch.Tensor] = []
    hook = model.decoder_norm.register_forward_hook(lambda m, i, o: seen.append(o))
    model.sample_tokens(lrf, num_iter=2, cfg=3.0, generator=_gen(0))
    hook.remove()
    assert seen[0].shape[0] == 4  # the batch was doubled
    # first step: all tokens masked (zeros); the null half must equal a pass with the training nulls
    mask = torch.ones(2, 16, dtype=torch.bool)
    tokens = torch.zeros(2, 16, 4)
    cond, lr = model.condition(2, model.patchify(lrf), drop_B=torch.ones(2, dtype=torch.bool))
    seen_null = []
    hook = model.decoder_norm.register_forward_hook(lambda m, i, o: seen_null.append(o))
    model.forward_decoder(model.forward_encoder(tokens, mask, cond, lr), mask, lr)
    hook.remove()
    assert torch.allclose(seen[0][2:], seen_null[0], atol=1e-6)
    assert not torch.allclose(seen[0][:2], seen_null[0], atol=1e-3)


def test_cfg_sampling_semantics():
    model = _random_head(tiny_sr())
    lrf = torch.randn(2, 4, 4, 4)
    seen: list[int] = []
    hook = model.decoder_norm.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    plain = model.sample_tokens(lrf, num_iter=3, cfg=1.0, generator=_gen(0))
    hook.remove()
    assert seen == [2, 2, 2]  # cfg = 1: no doubled batch, no guidance
    again = model.sample_tokens(lrf, num_iter=3, cfg=1.0, generator=_gen(0))
    guided = model.sample_tokens(lrf, num_iter=3, cfg=3.0, generator=_gen(0))
    guided_c = model.sample_tokens(lrf, num_iter=3, cfg=3.0, cfg_schedule="constant", generator=_gen(0))
    assert plain.shape == (2, 4, 4, 4)
    assert torch.equal(plain, again)  # same seed, same sample
    assert (guided - plain).abs().max() > 1e-3  # cfg > 1 changes the sample
    assert (guided_c - guided).abs().max() > 1e-4  # the schedule matters
    assert not torch.equal(plain, model.sample_tokens(lrf, num_iter=3, generator=_gen(1)))
    with pytest.raises(ValueError):
        model.sample_tokens(lrf, num_iter=2, cfg=2.0, cfg_schedule="cosine")
    with pytest.raises(ValueError):
        model.sample_tokens(None, num_iter=2)  # SR mode needs the LR grid


def test_overfit_eight_samples():
    """Loss halves and samples reproduce the targets.

    Normalized MSE = mean((sample - target)^2) / mean((target - mean(target))^2): 1 is as bad as
    predicting the mean, 2 is an independent draw. The LR grid (2x2 average pool of the target,
    upsampled) alone scores 0.75, so <= 0.5 needs the memorized detail.
    """
    g = _gen(0)
    x = torch.randn(8, 4, 4, 4, generator=g)
    lrf = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2)
    torch.manual_seed(0)
    config = replace(
        BASE,
        encoder_dim=64,
        encoder_depth=1,
        encoder_heads=4,
        decoder_dim=64,
        decoder_depth=1,
        decoder_heads=4,
        buffer_size=4,
        attn_dropout=0.0,
        proj_dropout=0.0,
        diffloss_depth=2,
        diffloss_width=64,
        # an evenly strided chain that stops short of t=999 (alpha_bar 2e-9), where a briefly
        # trained head's eps error is amplified ~1e3 x; "50" samples diverge here (see report)
        num_sampling_steps="ddim50",
    )
    model = MAR(config, grid_size=4, token_channels=4, lr_channels=4, num_classes=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    gen = _gen(1)
    losses = []
    for _ in range(300):
        loss = model(x, lrf, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert last < first / 2, (first, last)
    model.eval()
    sample = model.sample_tokens(lrf, num_iter=4, cfg=1.0, temperature=1.0, generator=_gen(2))
    nmse = ((sample - x) ** 2).mean() / ((x - x.mean()) ** 2).mean()
    assert nmse <= 0.5, nmse


# --------------------------------------------------------------------------------------
# optimizer rule and official checkpoints
# --------------------------------------------------------------------------------------
def test_no_weight_decay_rule():
    model = tiny_sr()
    exempt = {n for n, p in model.named_parameters() if model.no_weight_decay(n, p)}
    for n in (
        "z_proj.bias",
        "z_proj_ln.weight",
        "encoder_blocks.0.norm1.weight",
        "diffloss.net.input_proj.weight",
    ):
        assert n in exempt, n
    for n in ("encoder_pos_embed_learned", "mask_token", "fake_latent", "null_lr", "z_proj.weight"):
        assert n not in exempt, n
    assert all(model.no_weight_decay(n, p) for n, p in model.named_parameters() if n.startswith("diffloss."))


def _tiny_class_model() -> MAR:
    config = replace(
        BASE,
        encoder_dim=16,
        encoder_depth=1,
        encoder_heads=2,
        decoder_dim=16,
        decoder_depth=1,
        decoder_heads=2,
        buffer_size=2,
        diffloss_depth=1,
        diffloss_width=16,
        num_sampling_steps="5",
    )
    return MAR(config, grid_size=2, token_channels=4, num_classes=3)


def test_load_official(tmp_path):
    src, ema = _tiny_class_model(), _tiny_class_model()
    path = tmp_path / "checkpoint-last.pth"
    args = argparse.Namespace(model="mar_tiny", diffloss_d=1)
    torch.save({"model": src.state_dict(), "model_ema": ema.state_dict(), "args": args, "epoch": 3}, path)
    dst = _tiny_class_model()
    dst.load_official(path)
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), ema.state_dict().values()))
    dst.load_official(path, ema=False)
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))

    other = tmp_path / "other.pth"
    torch.save({"model": tiny_sr().state_dict()}, other)
    with pytest.raises(ValueError, match="other.pth.*missing"):
        dst.load_official(other, ema=False)
    with pytest.raises(ValueError, match="other.pth.*no 'model_ema' entry"):
        dst.load_official(other)
    evil = tmp_path / "evil.pth"
    torch.save({"model": src.state_dict(), "x": Path("p")}, evil)  # a global outside the allow-list
    with pytest.raises(ValueError, match="evil.pth"):
        dst.load_official(evil, ema=False)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        dst.load_official(tmp_path / "nope.pth")


# --------------------------------------------------------------------------------------
# the upscaler with either tokenizer
# --------------------------------------------------------------------------------------
def _tiny_tokenizer_file(target: str) -> dict:
    """A train_vqvae-like model.pt dict of a tiny tokenizer (8 px HR, 4x4 grid of 4 channels); the
    residual one over a tiny x2 base of 8 channels (its LR condition's width)."""
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(vocab_size=32, z_channels=4, ch=8, ch_mult=(1, 2), patch_nums=(1, 2, 4)))
    entry = {"config": vae.model_config(), "state_dict": vae.state_dict(), "extra": {"target": "hr"}}
    if target == "residual":
        base = BaseSR(BaseSRConfig(channels=8, depth=2), scale=2)
        torch.nn.init.normal_(base.tail.weight, std=0.05)
        base_file = {"config": base.model_config(), "state_dict": base.state_dict(),
                     "extra": {"scale": 2, "hr_size": 8}}  # fmt: skip
        entry["extra"] = {"target": "residual", "base": base_file, "sigma": 0.3}
    return entry


def _facts(tok: SRTokenizer) -> TokenFacts:
    return TokenFacts(
        hr_size=8, scale=2, num_classes=0, patch_nums=(1, 2, 4), vocab_size=32, Cvae=4, target=tok.target,
        lr_channels=tok.lr_channels, vqvae_sha256="0" * 64, samples=1, mean=(0.1, -0.2, 0.0, 0.3),
        std=(1.0, 0.5, 2.0, 1.5),
    )  # fmt: skip


def test_lr_norm_follows_the_tokenizer():
    hr = _facts(load_tokenizer(_tiny_tokenizer_file("hr")))
    norm = lr_norm_of(hr, None)  # the HR latents' stats: one latent space
    assert norm.mean_C.tolist() == pytest.approx(hr.mean) and norm.std_C.tolist() == pytest.approx(hr.std)
    res = _facts(load_tokenizer(_tiny_tokenizer_file("residual")))
    with pytest.raises(ValueError, match="lr_stats"):
        lr_norm_of(res, None)
    with pytest.raises(ValueError, match="8"):
        lr_norm_of(res, {"mean": [0.0] * 4, "std": [1.0] * 4})
    x = torch.rand(1000, 8, dtype=torch.float64) * (torch.arange(8) + 1) + torch.arange(8)
    x[:, 3] = 2.0  # a dead channel
    stats = lr_stats_of(x.sum(0).tolist(), x.square().sum(0).tolist(), 1000)
    assert stats["mean"] == pytest.approx(x.mean(0).tolist())
    assert stats["std"][:3] == pytest.approx(x.std(0, unbiased=False)[:3].tolist())
    assert 0 < stats["std"][3] < 0.1  # floored, never 0
    assert lr_norm_of(res, stats).std_C.shape == (8,)


@pytest.mark.parametrize("target", ["hr", "residual"])
def test_upscaler_conditions_samples_and_decodes_through_the_tokenizer(target: str):
    """make_upscaler of a model.pt dict: condition = lr_norm(lr_condition(tok, LR)) of the tokenizer's
    width, output = tok.fhat_to_img(f_to_fhat(denormalized sample), LR)."""
    entry = _tiny_tokenizer_file(target)
    tok = load_tokenizer(entry)
    facts = _facts(tok)
    assert facts.lr_channels == (4 if target == "hr" else 8)
    torch.manual_seed(0)
    model = _random_head(build_mar_sr(TINY_SR, facts))
    assert model.lr_dim == facts.lr_channels
    lr_stats = {"mean": [0.5] * facts.lr_channels, "std": [2.0] * facts.lr_channels}
    model_file = {
        "config": model.model_config(), "state_dict": model.state_dict(),
        "extra": {"vqvae": tokenizer_entry(entry), "token_facts": facts.to_dict(), "lr_stats": lr_stats},
    }  # fmt: skip
    sampling = MARSampling(num_iter=2, cfg=1.5)
    up = make_upscaler(model_file, sampling, "cpu")
    assert up.tok.target == target and (up.hr_size, up.scale) == (8, 2)
    lr = torch.rand(2, 3, 4, 4, generator=_gen(5)) * 2 - 1
    out = up(lr, seed=3)
    assert out.shape == (2, 3, 8, 8) and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, up(lr, seed=3))

    lrf16 = lr_condition(tok, [to_uint8(x) for x in lr], 8)
    norm = lr_norm_of(facts, lr_stats)
    if target == "hr":  # the HR latents' stats, whatever model.pt says
        torch.testing.assert_close(norm.std_C, torch.tensor(facts.std))
    assert torch.equal(up.condition(lr), norm.normalize(lrf16))
    x = model.sample_tokens(up.condition(lr), num_iter=2, cfg=1.5, generator=_gen(3))
    f = x * torch.tensor(facts.std)[:, None, None] + torch.tensor(facts.mean)[:, None, None]
    expected = tok.fhat_to_img(tok.vae.f_to_fhat(f), lr)
    if target == "residual":  # base(LR) + sigma * D(f_hat)
        torch.testing.assert_close(
            expected, (tok.base(lr) + 0.3 * tok.vae.decode(tok.vae.f_to_fhat(f))).clamp(-1, 1)
        )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="LR channels"):
        MARUpscaler(build_mar_sr(TINY_SR, replace(facts, lr_channels=16)), tok, facts, sampling)
