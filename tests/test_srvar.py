"""SRVAR (SR mode): LR conditioning (of the tokenizer's width or its own), teacher forcing vs KV cache,
CFG, decoding (sample / greedy / soft), init_from, refiner, and the upscaler with both tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from arsr.data.loader import to_uint8
from arsr.data.tokens import TokenFacts
from arsr.infer.srvar import SRVARSampling, SRVARUpscaler, build_srvar
from arsr.infer.tokenizer import lr_condition
from arsr.models.base import BaseSR, BaseSRConfig
from arsr.models.layers import sample_top_k_top_p
from arsr.models.residual import SRTokenizer
from arsr.models.srvar import (
    SRVAR,
    SoftCodes,
    SRVARConfig,
    init_from,
    last_scale_residual,
    srvar_loss,
    token_picker,
)
from arsr.models.var import VAR, ar_loss
from arsr.models.vqvae import VQVAE, VQVAEConfig

PN = (1, 2, 3, 4)  # L = 30, 4x4 latent (and 4x4 LR grid)
TINY_VAE = dict(vocab_size=32, z_channels=16, ch=8, ch_mult=(1, 2), patch_nums=PN)
TINY = dict(depth=2, width=64, heads=0, drop_path=0.0)  # SRVARConfig fields (heads 0: VAR's rule)
TOKENIZER = dict(patch_nums=PN, vocab_size=32, Cvae=16)  # the tokenizer's facts
REFINER = dict(refiner=True, refiner_width=32, refiner_depth=1, refiner_steps="4")
CLR = 32  # an LR condition wider than the latent (a residual tokenizer's base features)


def tiny_vae() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(**TINY_VAE)).freeze()


def tiny_srvar(lr_channels: int | None = None, **kw) -> SRVAR:
    """A tiny SRVAR, weights perturbed so the condition visibly matters (a fresh init is near-identity).
    ``kw``: SRVARConfig fields."""
    torch.manual_seed(1)
    model = SRVAR(SRVARConfig(**{**TINY, **kw}), **TOKENIZER, lr_channels=lr_channels)
    with torch.no_grad():
        for p in model.parameters():  # (the refiner's last layer starts at zero, as in MAR)
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def batch(
    vae: VQVAE, B: int, seed: int = 2, lr_channels: int = 16
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Random ground-truth tokens, their teacher-forcing input, and an LR condition [B,Clr,4,4]."""
    g = torch.Generator().manual_seed(seed)
    idx = [torch.randint(0, vae.V, (B, pn * pn), generator=g) for pn in PN]
    return idx, vae.idxBl_to_var_input(idx), torch.randn(B, lr_channels, 4, 4, generator=g) * 3


# ---- teacher forcing vs KV cache, CFG --------------------------------------------------------------
@pytest.mark.parametrize(
    "use_cache,lr_input,lr_channels",
    [(True, True, None), (False, True, None), (True, False, None), (True, True, CLR)],
)
def test_teacher_forced_logits_equal_cached_decoding(
    use_cache: bool, lr_input: bool, lr_channels: int | None
) -> None:
    vae, model = tiny_vae(), tiny_srvar(lr_channels, lr_input=lr_input)
    gt, x, lrf = batch(vae, B=3, lr_channels=lr_channels or 16)
    with torch.no_grad():
        tf_cond, _ = model(lrf, x)
        tf_uncond, _ = model(model.cfg_uncond.expand(3, -1, -1), x)
    seen: list[torch.Tensor] = []

    def feed_gt(si: int, logits_nBlV: torch.Tensor) -> torch.Tensor:
        seen.append(logits_nBlV)
        return gt[si]

    f_hat, _ = model.sample_fhat(lrf, vae, cfg=1.5, pick=feed_gt, use_cache=use_cache)
    cached = torch.cat(seen, dim=1)  # [2B, L, V], conditional half first
    assert (cached[:3] - tf_cond).abs().max() < 1e-5
    assert (cached[3:] - tf_uncond).abs().max() < 1e-5  # the unconditional half is cfg_uncond's
    assert (tf_cond - tf_uncond).abs().max() > 1e-2
    assert torch.allclose(f_hat, vae.idxBl_to_fhat(gt), atol=1e-5)


def test_lr_condition_layouts_and_spatial_order() -> None:
    vae, model = tiny_vae(), tiny_srvar()
    _, x, lrf = batch(vae, B=2)
    with torch.no_grad():
        grid, _ = model(lrf, x)
        tokens, _ = model(lrf.flatten(2).transpose(1, 2), x)
        shuffled, _ = model(lrf.flatten(2)[:, :, torch.randperm(16)].view_as(lrf), x)
    assert torch.equal(grid, tokens)
    assert (grid - shuffled).abs().max() > 1e-3  # LR positions matter (lr_pos_embed)
    with pytest.raises(ValueError, match="lrf"):
        model(lrf[:, :, :2], x)


def test_lr_input_is_the_area_pyramid_of_lrf() -> None:
    vae, model = tiny_vae(), tiny_srvar()
    _, _, lrf = batch(vae, B=2)
    in_BLC = model.lr_inputs(model._lr_tokens(lrf))
    assert in_BLC.shape == (2, model.L, model.C)
    bg, pn = model.begin_ends[1][0], PN[1]  # scale 1: each cell is the mean of its LR block
    k = lrf.shape[-1] // pn
    mean_BCv = lrf[:, :, :k, :k].mean((2, 3))
    assert torch.allclose(in_BLC[:, bg], model.lr_in(mean_BCv), atol=1e-5)
    assert torch.allclose(in_BLC[:, -model.lr_len :], model.lr_in(lrf.flatten(2).transpose(1, 2)), atol=1e-5)
    assert tiny_srvar(lr_input=False).lr_inputs(model._lr_tokens(lrf)) is None


def test_cond_drop_only_in_training_and_keeps_cfg_uncond_on_graph() -> None:
    vae = tiny_vae()
    _, x, lrf = batch(vae, B=2)
    model = tiny_srvar(cond_drop=1.0)
    with torch.no_grad():
        eval_logits, _ = model(lrf, x)
        uncond, _ = model(model.cfg_uncond.expand(2, -1, -1), x)
        model.train()
        train_logits, _ = model(lrf, x)
    assert not torch.allclose(eval_logits, uncond)
    assert torch.allclose(train_logits, uncond, atol=1e-6)
    model.cond_drop = 1e-9  # practically never dropped, yet cfg_uncond must get a (zero) grad for DDP
    model(lrf, x)[0].sum().backward()
    assert model.cfg_uncond.grad is not None and not model.cfg_uncond.grad.any()
    assert model.blocks[0].ca.mat_kv.weight.grad.abs().sum() > 0


def test_same_seed_same_image() -> None:
    vae, model = tiny_vae(), tiny_srvar()
    _, _, lrf = batch(vae, B=2)
    a = model.autoregressive_infer_cfg(lrf, vae, cfg=1.5, top_k=20, top_p=0.9, seed=11)
    b = model.autoregressive_infer_cfg(lrf, vae, cfg=1.5, top_k=20, top_p=0.9, seed=11)
    c = model.autoregressive_infer_cfg(lrf, vae, cfg=1.5, top_k=20, top_p=0.9, seed=12)
    assert a.shape == (2, 3, 8, 8) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cfg0_is_conditional_only_and_cfg_changes_tokens() -> None:
    vae, model = tiny_vae(), tiny_srvar()
    _, _, lrf = batch(vae, B=2)
    _, idx = model.sample_fhat(lrf, vae, cfg=0, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        tf, _ = model(lrf, vae.idxBl_to_var_input(idx))
    g = torch.Generator().manual_seed(3)
    for (bg, ed), idx_Bl in zip(model.begin_ends, idx):  # replaying the conditional logits
        assert torch.equal(sample_top_k_top_p(tf[:, bg:ed], generator=g), idx_Bl)
    _, greedy0 = model.sample_fhat(lrf, vae, cfg=0, top_k=1)
    _, greedy3 = model.sample_fhat(lrf, vae, cfg=3.0, top_k=1)
    assert torch.equal(greedy0[0], greedy3[0])  # t = 0 at scale 0
    assert any(not torch.equal(a, b) for a, b in zip(greedy0[1:], greedy3[1:]))


# ---- builder, optimizer rule, init_from --------------------------------------------------------------
def test_builder_config_roundtrip_and_no_decay() -> None:
    cfg = SRVARConfig(
        depth=2, width=64, heads=0, refiner=True, refiner_width=32, refiner_depth=1, refiner_steps="4"
    )
    model = SRVAR(cfg, PN, vocab_size=32, Cvae=16, refiner_scale=0.7)
    assert model.C == 64 and model.num_heads == 2 and model.alng == cfg.alng
    assert float(model.refiner_scale) == pytest.approx(0.7)
    rebuilt = SRVAR(SRVARConfig(**model.model_config()), PN, vocab_size=32, Cvae=16)
    assert rebuilt.model_config() == model.model_config()
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    rebuilt.load_state_dict(model.state_dict(), strict=True)  # the refiner's scale is a buffer
    assert float(rebuilt.refiner_scale) == pytest.approx(0.7)
    exempt = {n for n, p in model.named_parameters() if model.no_weight_decay(n, p)}
    for name in ("cfg_uncond", "lr_pos_embed", "blocks.0.ca_gamma", "blocks.0.attn.scale_mul_1H11",
                 "lr_norm.weight", "refiner.net.input_proj.weight"):  # fmt: skip
        assert name in exempt
    for name in (
        "lr_proj.0.weight",
        "blocks.0.ca.mat_kv.weight",
        "word_embed.weight",
        "lr_pool.ca.mat_kv.weight",
    ):
        assert name not in exempt


def test_init_from_official_var(tmp_path: Path) -> None:
    torch.manual_seed(0)
    var = VAR(depth=2, width=64, num_classes=10, patch_nums=PN, vocab_size=32, Cvae=16)
    torch.save(var.state_dict(), tmp_path / "var.pth")
    model = SRVAR(SRVARConfig(**TINY), **TOKENIZER)
    report = init_from(model, tmp_path / "var.pth")
    assert "blocks.1.attn.mat_qkv.weight" in report.loaded and "head.weight" in report.loaded
    assert torch.equal(model.blocks[1].ffn.fc2.weight, var.blocks[1].ffn.fc2.weight)
    assert {"cfg_uncond", "lr_pos_embed", "blocks.0.ca.mat_q.weight", "blocks.0.ca_gamma"} <= set(report.new)
    assert "class_emb.weight: not in SRVAR" in report.skipped
    assert "attn_bias_for_masking: buffer (derived)" in report.skipped
    assert len(report.loaded) + len(report.new) == len(list(model.parameters()))
    # another pyramid: positions do not transfer
    other = SRVAR(SRVARConfig(**TINY), **{**TOKENIZER, "patch_nums": (1, 2, 4)})
    report = init_from(other, tmp_path / "var.pth")
    assert any(s.startswith("pos_1LC: shape") for s in report.skipped) and "pos_1LC" in report.new


def test_ar_loss_on_srvar_logits() -> None:
    vae, model = tiny_vae(), tiny_srvar()
    gt, x, lrf = batch(vae, B=2)
    logits, diff = model(lrf, x)
    loss, m = ar_loss(logits, torch.cat(gt, 1), last_l=16)
    assert diff is None and loss.requires_grad and set(m) == {"Lm", "Lt", "Accm", "Acct"}
    assert 0 <= m["Acct"] <= 100


# ---- refiner ----------------------------------------------------------------------------------
def test_last_scale_residual_is_the_quantisation_error() -> None:
    vae = tiny_vae()
    f = torch.randn(2, 16, 4, 4)
    idx = vae.f_to_idxBl(f)
    r = last_scale_residual(f, vae.idxBl_to_var_input(idx), idx[-1], vae, SN=len(PN))
    assert torch.allclose(r, f - vae.f_to_fhat(f), atol=1e-5)


def test_refiner_trains_and_refines() -> None:
    vae = tiny_vae()
    gt, x, lrf = batch(vae, B=2)
    f = vae.idxBl_to_fhat(gt) + 0.1 * torch.randn(2, 16, 4, 4)
    model = tiny_srvar(**REFINER).train()
    with pytest.raises(ValueError, match="f_BChw"):
        model(lrf, x)
    logits, diff = model(lrf, x, f_BChw=f, vae=vae)
    assert diff.ndim == 0 and torch.isfinite(diff)
    loss, m = srvar_loss(logits, torch.cat(gt, 1), diff, last_l=16, diff_weight=2.0)
    assert loss.item() == pytest.approx(m["Lm"].item() + 2.0 * m["diff_loss"].item(), rel=1e-5)
    diff.backward()
    assert model.refiner.net.input_proj.weight.grad.abs().sum() > 0
    assert model.blocks[-1].ffn.fc2.weight.grad.abs().sum() > 0  # the refiner's condition is h_last
    assert model.head.weight.grad is None  # the target uses the argmax, no gradient through logits
    model.eval()
    plain, idx = model.sample_fhat(lrf, vae, generator=torch.Generator().manual_seed(5), refine=False)
    refined, idx2 = model.sample_fhat(lrf, vae, generator=torch.Generator().manual_seed(5))
    again, _ = model.sample_fhat(lrf, vae, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(idx, idx2))  # the refiner only adds a residual
    assert not torch.allclose(plain, refined) and torch.equal(refined, again)


def test_bf16_autocast_runs_in_bf16_and_keeps_fp32_logits() -> None:
    vae, model = tiny_vae(), tiny_srvar()
    gt, x, lrf = batch(vae, B=2)
    seen = []
    hook = model.blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(lrf, x)
        model.sample_fhat(lrf, vae, cfg=1.5, top_k=4)
    hook.remove()
    assert logits.dtype == torch.float32 and set(seen) == {torch.bfloat16}
    assert (logits - model(lrf, x)[0]).abs().max() < 0.1


# ---- an LR condition of its own width (the residual tokenizer's base features) --------------------
def test_lr_channels_other_than_cvae_build_train_and_sample() -> None:
    vae, model = tiny_vae(), tiny_srvar(CLR, **REFINER)
    assert model.lr_channels == CLR and tiny_srvar().lr_channels == 16  # None: Cvae (VAR-compatible)
    assert model.cfg_uncond.shape == (16, CLR) and model.lr_norm.weight.shape == (CLR,)
    assert model.lr_proj[0].in_features == CLR and model.lr_in.in_features == CLR
    assert model.word_embed.in_features == 16 and model.refiner.in_channels == 16  # tokens stay Cvae
    gt, x, lrf = batch(vae, B=2, lr_channels=CLR)
    with pytest.raises(ValueError, match=f"lrf: expected \\[B,16,{CLR}\\]"):
        model(lrf[:, :16], x)
    model.train()
    f = vae.idxBl_to_fhat(gt) + 0.1 * torch.randn(2, 16, 4, 4)
    logits, diff = model(lrf, x, f_BChw=f, vae=vae)
    loss, _ = srvar_loss(logits, torch.cat(gt, 1), diff, last_l=16)
    loss.backward()
    for name in (
        "lr_in.weight",
        "lr_proj.0.weight",
        "lr_norm.weight",
        "cfg_uncond",
        "refiner.net.input_proj.weight",
    ):
        assert model.get_parameter(name).grad is not None, name
    assert model.lr_in.weight.grad.abs().sum() > 0
    model.eval()
    f_hat, idx = model.sample_fhat(lrf, vae, cfg=1.5, top_k=8, generator=torch.Generator().manual_seed(0))
    assert f_hat.shape == (2, 16, 4, 4) and [i.shape[1] for i in idx] == [pn * pn for pn in PN]
    img = model.autoregressive_infer_cfg(lrf, vae, cfg=1.5, seed=0)
    assert img.shape == (2, 3, 8, 8) and img.min() >= 0 and img.max() <= 1
    greedy, _ = model.sample_fhat(lrf, vae, decode="greedy", refine=False)
    other, _ = model.sample_fhat(-lrf, vae, decode="greedy", refine=False)
    assert (other - greedy).abs().max() > 1e-3  # the wide LR condition is used


# ---- decoding: sample / greedy / soft --------------------------------------------------------------
def test_sample_decode_at_a_temperature_replays_the_scaled_logits() -> None:
    vae, model = tiny_vae(), tiny_srvar()
    _, _, lrf = batch(vae, B=2)
    default, idx_default = model.sample_fhat(lrf, vae, cfg=0, generator=torch.Generator().manual_seed(3))
    explicit, idx_explicit = model.sample_fhat(
        lrf, vae, cfg=0, generator=torch.Generator().manual_seed(3), decode="sample", temperature=1.0
    )
    assert torch.equal(default, explicit) and all(
        torch.equal(a, b) for a, b in zip(idx_default, idx_explicit)
    )
    _, idx = model.sample_fhat(lrf, vae, cfg=0, generator=torch.Generator().manual_seed(3), temperature=0.5)
    with torch.no_grad():
        tf, _ = model(lrf, vae.idxBl_to_var_input(idx))
    g = torch.Generator().manual_seed(3)
    for (bg, ed), idx_Bl in zip(model.begin_ends, idx):  # the same draws from logits / 0.5
        assert torch.equal(sample_top_k_top_p(tf[:, bg:ed] / 0.5, generator=g), idx_Bl)
    assert any(not torch.equal(a, b) for a, b in zip(idx, idx_default))


@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_greedy_decode_is_the_argmax_and_ignores_the_seed(cfg: float) -> None:
    vae, model = tiny_vae(), tiny_srvar()
    _, _, lrf = batch(vae, B=2)
    runs = [model.sample_fhat(lrf, vae, cfg=cfg, generator=torch.Generator().manual_seed(s), decode="greedy")
            for s in (0, 1)]  # fmt: skip
    (f0, idx0), (f1, idx1) = runs
    assert torch.equal(f0, f1) and all(torch.equal(a, b) for a, b in zip(idx0, idx1))
    _, top1 = model.sample_fhat(lrf, vae, cfg=cfg, top_k=1)  # sampling from the top 1: the same tokens
    assert all(torch.equal(a, b) for a, b in zip(idx0, top1))
    if cfg == 0:
        with torch.no_grad():
            tf, _ = model(lrf, vae.idxBl_to_var_input(idx0))
        for (bg, ed), idx_Bl in zip(model.begin_ends, idx0):
            assert torch.equal(tf[:, bg:ed].argmax(-1), idx_Bl)
    a = model.autoregressive_infer_cfg(lrf, vae, cfg=cfg, seed=0, decode="greedy")
    assert torch.equal(a, model.autoregressive_infer_cfg(lrf, vae, cfg=cfg, seed=9, decode="greedy"))


def test_soft_decode_accumulates_expected_code_embeddings() -> None:
    """Soft decoding, replayed by teacher forcing: each scale's embedding is softmax(logits/T) @ codebook
    of the logits the model gives on the *soft* cumulative inputs, and f_hat sums them (phi included)."""
    vae, model = tiny_vae(), tiny_srvar()
    _, _, lrf = batch(vae, B=2)
    T = 0.7
    seen: list[torch.Tensor] = []
    pick = SoftCodes.pick

    def spy(self: SoftCodes, si: int, logits_BlV: torch.Tensor) -> torch.Tensor:
        idx = pick(self, si, logits_BlV)
        seen.append(self.h_BlCv.clone())
        return idx

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SoftCodes, "pick", spy)
        f_soft, idx = model.sample_fhat(lrf, vae, cfg=0, decode="soft", temperature=T)
    SN, quant = len(PN), vae.quantize
    f_hat, inputs = torch.zeros(2, 16, 4, 4), []
    for si, (pn, h_BlCv) in enumerate(zip(PN, seen)):
        f_hat, nxt = quant.get_next_autoregressive_input(
            si, SN, f_hat, h_BlCv.transpose(1, 2).reshape(2, 16, pn, pn)
        )
        if si + 1 < SN:
            inputs.append(nxt.flatten(2).transpose(1, 2))
    torch.testing.assert_close(f_soft, f_hat, rtol=0, atol=1e-5)
    with torch.no_grad():
        tf, _ = model(lrf, torch.cat(inputs, 1))
    W = vae.quantize.embedding.weight
    for (bg, ed), h_BlCv, idx_Bl in zip(model.begin_ends, seen, idx):
        probs = (tf[:, bg:ed] / T).softmax(-1)
        torch.testing.assert_close(h_BlCv, probs @ W, rtol=0, atol=1e-5)
        assert torch.equal(idx_Bl, probs.argmax(-1))


def test_soft_decode_is_deterministic_and_tends_to_greedy_as_temperature_falls() -> None:
    vae, model = tiny_vae(), tiny_srvar()
    _, _, lrf = batch(vae, B=2)
    greedy, idx_g = model.sample_fhat(lrf, vae, cfg=1.5, decode="greedy")
    soft, _ = model.sample_fhat(lrf, vae, cfg=1.5, decode="soft", generator=torch.Generator().manual_seed(0))
    again, _ = model.sample_fhat(lrf, vae, cfg=1.5, decode="soft", generator=torch.Generator().manual_seed(1))
    assert torch.equal(soft, again) and (soft - greedy).abs().max() > 1e-3
    cold, idx_c = model.sample_fhat(lrf, vae, cfg=1.5, decode="soft", temperature=1e-4)
    torch.testing.assert_close(cold, greedy, rtol=0, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(idx_c, idx_g))
    refined = tiny_srvar(**REFINER)  # the refiner takes the soft last-scale embedding as its condition
    f, _ = refined.sample_fhat(lrf, vae, decode="soft", generator=torch.Generator().manual_seed(0))
    assert f.shape == (2, 16, 4, 4) and torch.isfinite(f).all()


def test_decode_choices_are_checked() -> None:
    vae, model = tiny_vae(), tiny_srvar()
    _, _, lrf = batch(vae, B=1)
    with pytest.raises(ValueError, match="decode"):
        model.sample_fhat(lrf, vae, decode="beam")
    with pytest.raises(ValueError, match="temperature"):
        model.sample_fhat(lrf, vae, decode="soft", temperature=0.0)
    with pytest.raises(ValueError, match="soft"):
        token_picker("soft")


# ---- the upscaler: tokenizer in, tokenizer out -----------------------------------------------------
def tiny_tokenizer(target: str) -> SRTokenizer:
    """The tiny VQVAE (8 px HR), alone (hr) or over a tiny x2 base of CLR channels (residual)."""
    vae = tiny_vae()
    if target == "hr":
        return SRTokenizer(vae).freeze()
    torch.manual_seed(4)
    base = BaseSR(BaseSRConfig(channels=CLR, depth=2), scale=2)
    torch.nn.init.normal_(base.tail.weight, std=0.05)  # a base that adds something to bicubic
    return SRTokenizer(vae, base, sigma=0.3).freeze()


def tiny_facts(tok: SRTokenizer) -> TokenFacts:
    return TokenFacts(
        hr_size=8, scale=2, num_classes=0, patch_nums=PN, vocab_size=32, Cvae=16, target=tok.target,
        lr_channels=tok.lr_channels, vqvae_sha256="0" * 64, samples=1, mean=(0.0,) * 16, std=(1.0,) * 16,
    )  # fmt: skip


@pytest.mark.parametrize("target", ["hr", "residual"])
@pytest.mark.parametrize("decode", ["sample", "greedy", "soft"])
def test_upscaler_conditions_samples_and_decodes_through_the_tokenizer(target: str, decode: str) -> None:
    tok = tiny_tokenizer(target)
    facts = tiny_facts(tok)
    assert facts.lr_channels == (16 if target == "hr" else CLR)
    torch.manual_seed(1)
    model = build_srvar(SRVARConfig(**TINY, **REFINER), facts)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sampling = SRVARSampling(cfg=1.5, top_k=10, decode=decode, temperature=0.8)
    up = SRVARUpscaler(model, tok, facts, sampling)
    lr = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    out = up(lr, seed=3)
    assert out.shape == (2, 3, 8, 8) and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, up(lr, seed=3))

    lrf = lr_condition(tok, [to_uint8(x) for x in lr], 8).float()
    assert lrf.shape == (2, facts.lr_channels, 4, 4)
    f_hat, _ = model.sample_fhat(
        lrf, tok.vae, 1.5, 10, 0.0, torch.Generator().manual_seed(3), decode=decode, temperature=0.8
    )
    expected = tok.fhat_to_img(f_hat, lr)
    if target == "residual":  # base(LR) + sigma * D(f_hat), not D(f_hat)
        torch.testing.assert_close(expected, (tok.base(lr) + 0.3 * tok.vae.decode(f_hat)).clamp(-1, 1))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    if decode != "sample":  # the refiner still draws its residual: tokens alone are seed-free
        up.refine = False
        assert torch.equal(up(lr, seed=0), up(lr, seed=1))


def test_upscaler_refuses_a_tokenizer_of_another_lr_width() -> None:
    tok = tiny_tokenizer("residual")
    model = SRVAR(SRVARConfig(**TINY), **TOKENIZER)  # lr_channels = Cvae = 16, the base gives CLR
    with pytest.raises(ValueError, match="LR channels"):
        SRVARUpscaler(model, tok, tiny_facts(tok), SRVARSampling())
