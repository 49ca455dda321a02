"""VAR (class mode): official layout, init, teacher forcing vs KV cache, CFG, sampling, loss, no-decay."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from arsr.models.layers import sample_top_k_top_p
from arsr.models.var import VAR, ar_loss, cfg_mix, load_official, var_no_weight_decay
from arsr.models.vqvae import VQVAE, VQVAEConfig

KEYS_TSV = Path(__file__).resolve().parents[2] / "shared" / "reference" / "var_d16_keys.tsv"
PN = (1, 2, 3, 4)  # L = 30, 4x4 latent
TINY_VAE = dict(vocab_size=32, z_channels=4, ch=8, ch_mult=(1, 2), patch_nums=PN)
TINY_VAR = dict(depth=2, width=64, num_classes=10, patch_nums=PN, vocab_size=32, Cvae=4)


def tiny_vae() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(**TINY_VAE)).freeze()


def tiny_var(**kw) -> VAR:
    """A tiny VAR, weights perturbed so the condition visibly matters (a fresh init is near-identity)."""
    torch.manual_seed(1)
    model = VAR(**{**TINY_VAR, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def gt_tokens(vae: VQVAE, B: int, seed: int = 2) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = [torch.randint(0, vae.V, (B, pn * pn), generator=g) for pn in PN]
    return idx, vae.idxBl_to_var_input(idx)


def read_key_table() -> dict[str, tuple[int, ...]]:
    rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines()[1:] if line]
    return {k: tuple(int(s) for s in shape.split("x")) for k, shape, _ in rows}


# ---- layout ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not KEYS_TSV.is_file(), reason=f"{KEYS_TSV} not found (../shared is provided in CI)")
def test_d16_state_dict_equals_official_key_table() -> None:
    with torch.device("meta"):
        model = VAR(depth=16, num_classes=1000)
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert mine == read_key_table()


@pytest.mark.parametrize("depth,millions", [(16, 310.3), (20, 600.9), (24, 1033.4), (30, 2010.0)])
def test_parameter_counts(depth: int, millions: float) -> None:
    with torch.device("meta"):
        model = VAR(depth=depth)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions
    assert (model.C, model.num_heads) == (64 * depth, depth)
    assert model.blocks[-1].drop_path.p == pytest.approx(0.1 * depth / 24)
    assert model.blocks[0].drop_path.p == 0


def test_block_causal_mask() -> None:
    model = VAR(**TINY_VAR)
    lvl = model.lvl_1L[0]
    visible = model.attn_bias_for_masking[0, 0] == 0
    assert torch.equal(visible, lvl[:, None] >= lvl[None, :])
    assert visible[1:5, :5].all() and not visible[1:5, 5:].any()  # scale 1 sees scales 0-1 only


def test_attention_plan_skips_invisible_keys_only() -> None:
    model = VAR(depth=1, width=64, num_classes=10, vocab_size=32, Cvae=4)  # VAR's 256 px pyramid
    plan = model.attn_plan()
    assert [(a, b, m is None) for a, b, m in plan] == [(0, 255, False), (255, 424, True), (424, 680, True)]
    assert [(a, b) for a, b, _ in model.attn_plan(3)] == [(0, 1), (1, 5), (5, 14)]
    x = torch.randn(2, model.L, 64)
    full = [(0, model.L, model.attn_bias_for_masking)]
    with torch.no_grad():
        assert torch.allclose(model.blocks[0].attn(x, plan), model.blocks[0].attn(x, full), atol=1e-6)


def test_init_follows_var() -> None:
    torch.manual_seed(0)
    model = VAR(depth=4, width=256, num_classes=10, patch_nums=PN, vocab_size=64, Cvae=4, alng=1e-3)
    C, std = 256, math.sqrt(1 / (3 * 256))
    w = model.blocks[0].ada_lin[1].weight  # rows: gamma1, gamma2 | scale1, scale2, shift1, shift2
    assert w[: 2 * C].std().item() == pytest.approx(1e-3 * std, rel=0.1)
    assert w[2 * C :].std().item() == pytest.approx(0.5 * std, rel=0.1)
    assert model.head.weight.std().item() == pytest.approx(0.02 * std, rel=0.1)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(std / math.sqrt(8), rel=0.1)
    assert model.blocks[0].ffn.fc2.weight.std().item() == pytest.approx(std / math.sqrt(8), rel=0.1)
    assert model.class_emb.weight.std().item() == pytest.approx(std, rel=0.1)
    assert torch.allclose(model.blocks[1].attn.scale_mul_1H11, torch.tensor(math.log(4.0)))
    assert not model.blocks[0].attn.q_bias.any() and not model.head.bias.any()
    assert model.blocks[0].attn.mat_qkv.bias is None  # K has no bias; q/v biases are separate


# ---- teacher forcing vs KV cache ----------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
def test_teacher_forced_logits_equal_cached_decoding(use_cache: bool) -> None:
    vae, model = tiny_vae(), tiny_var()
    gt, x = gt_tokens(vae, B=3)
    label = torch.tensor([0, 4, 9])
    with torch.no_grad():
        tf_cond = model(label, x)
        tf_uncond = model(torch.full_like(label, model.num_classes), x)
    seen: list[torch.Tensor] = []

    def feed_gt(si: int, logits_nBlV: torch.Tensor) -> torch.Tensor:
        seen.append(logits_nBlV)
        return gt[si]

    f_hat, idx = model.sample_fhat(label, vae, cfg=1.5, pick=feed_gt, use_cache=use_cache)
    cached = torch.cat(seen, dim=1)  # [2B, L, V], conditional half first
    assert (cached[:3] - tf_cond).abs().max() < 1e-5
    assert (cached[3:] - tf_uncond).abs().max() < 1e-5  # the unconditional half is the null class
    assert torch.allclose(f_hat, vae.idxBl_to_fhat(gt), atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(idx, gt))


def test_cond_drop_only_in_training() -> None:
    vae = tiny_vae()
    _, x = gt_tokens(vae, B=2)
    label = torch.tensor([1, 2])
    model = tiny_var(cond_drop=1.0, drop_path=0.0)
    with torch.no_grad():
        eval_logits = model(label, x)
        uncond = model(torch.full_like(label, 10), x)
        model.train()
        train_logits = model(label, x)
    assert not torch.allclose(eval_logits, uncond)  # eval never drops the label
    assert torch.allclose(train_logits, uncond)  # p = 1 in training drops every label


def test_bf16_autocast_keeps_fp32_logits() -> None:
    vae, model = tiny_vae(), tiny_var()
    _, x = gt_tokens(vae, B=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.tensor([1, 2]), x)
    assert logits.dtype == torch.float32
    assert (logits - model(torch.tensor([1, 2]), x)).abs().max() < 0.1


# ---- sampling -----------------------------------------------------------------------------------
def test_sampler_leaves_logits_alone_and_filters() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 50, 32, generator=g)
    before = logits.clone()
    greedy = sample_top_k_top_p(logits, top_k=1, generator=g)
    assert torch.equal(logits, before)
    assert torch.equal(greedy, logits.argmax(-1))
    top4 = logits.topk(4, dim=-1).indices
    for _ in range(5):
        idx = sample_top_k_top_p(logits, top_k=4, top_p=0.9, generator=g)
        assert (idx[..., None] == top4).any(-1).all()
    assert torch.equal(sample_top_k_top_p(logits, top_p=1e-6, generator=g), logits.argmax(-1))
    assert torch.equal(logits, before)
    # top-p keeps the largest tokens until their mass reaches p: probs .5 .3 .15 .05
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3]).log().expand(1, 400, 4)
    assert set(sample_top_k_top_p(probs, top_p=0.7, generator=g).unique().tolist()) == {1, 3}
    assert set(sample_top_k_top_p(probs, top_p=0.85, generator=g).unique().tolist()) == {1, 2, 3}
    assert set(sample_top_k_top_p(probs, top_k=3, top_p=0.99, generator=g).unique().tolist()) == {1, 2, 3}


def test_same_seed_same_image() -> None:
    vae, model = tiny_vae(), tiny_var()
    label = torch.tensor([3, 3])
    a = model.autoregressive_infer_cfg(label, vae, cfg=2.0, top_k=20, top_p=0.9, seed=7)
    b = model.autoregressive_infer_cfg(label, vae, cfg=2.0, top_k=20, top_p=0.9, seed=7)
    c = model.autoregressive_infer_cfg(label, vae, cfg=2.0, top_k=20, top_p=0.9, seed=8)
    assert a.shape == (2, 3, 8, 8) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cfg0_samples_the_conditional_model() -> None:
    """cfg=0 (no unconditional batch) draws from the conditional logits: replaying the teacher-forced
    logits of the drawn tokens with the same generator seed reproduces them."""
    vae, model = tiny_vae(), tiny_var()
    label = torch.tensor([5, 6])
    _, idx = model.sample_fhat(label, vae, cfg=0, generator=torch.Generator().manual_seed(3))
    tf = model(label, vae.idxBl_to_var_input(idx))
    g = torch.Generator().manual_seed(3)
    for (bg, ed), idx_Bl in zip(model.begin_ends, idx):
        assert torch.equal(sample_top_k_top_p(tf[:, bg:ed], generator=g), idx_Bl)


def test_cfg_mixes_from_the_second_scale() -> None:
    vae, model = tiny_vae(), tiny_var()
    label = torch.tensor([5, 6])
    _, greedy0 = model.sample_fhat(label, vae, cfg=0, top_k=1)
    _, greedy4 = model.sample_fhat(label, vae, cfg=4.0, top_k=1)
    assert torch.equal(greedy0[0], greedy4[0])  # t = 0 at scale 0
    assert any(not torch.equal(a, b) for a, b in zip(greedy0[1:], greedy4[1:]))
    c, u = torch.randn(2, 1, 5, 7).unbind(0)
    assert torch.equal(cfg_mix(torch.cat((c, u)), 0.0), c)
    assert torch.allclose(cfg_mix(torch.cat((c, u)), 0.5), 1.5 * c - 0.5 * u)


def test_guidance_before_the_head_equals_mixing_logits() -> None:
    vae, model = tiny_vae(), tiny_var()
    gt, _ = gt_tokens(vae, B=2)
    cond_BD = model.class_emb(torch.tensor([1, 2, 10, 10]))  # conditional half, then the null class
    raw, guided = [], []
    for seen, cfg in ((raw, None), (guided, 2.0)):
        model.decode(cond_BD, vae, 2, lambda si, lg, seen=seen: seen.append(lg) or gt[si], cfg=cfg)
    for si, (r, g) in enumerate(zip(raw, guided)):
        assert g.shape[0] == 2 and (g - cfg_mix(r, 2.0 * si / 3)).abs().max() < 1e-5


# ---- loss, optimizer rule, checkpoints -------------------------------------------------------------
def test_ar_loss_metrics() -> None:
    gt = torch.randint(0, 8, (2, 30))
    logits = torch.nn.functional.one_hot(gt, 8).float() * 20
    logits[:, -16:] = 0  # last scale: uniform
    loss, m = ar_loss(logits, gt, last_l=16)
    assert m["Acct"] < 100 and m["Accm"] >= 100 * 14 / 30
    assert m["Lt"].item() == pytest.approx(math.log(8), rel=1e-4)
    assert m["Lm"].item() == pytest.approx(loss.item())
    smoothed, m2 = ar_loss(logits, gt, last_l=16, label_smoothing=0.1)
    assert smoothed > loss and m2["Lm"] == m["Lm"]  # metrics never smooth


def test_no_weight_decay_rule() -> None:
    model = VAR(**TINY_VAR)
    exempt = {n for n, p in model.named_parameters() if var_no_weight_decay(n, p)}
    for name in ("pos_start", "pos_1LC", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11",
                 "blocks.0.attn.q_bias", "blocks.1.ffn.fc1.bias", "head.bias"):  # fmt: skip
        assert name in exempt
    for name in ("class_emb.weight", "word_embed.weight", "blocks.0.attn.mat_qkv.weight", "head.weight"):
        assert name not in exempt
    assert model.no_weight_decay("x.gamma", torch.zeros(2, 2))


def test_load_official(tmp_path: Path) -> None:
    src = VAR(**TINY_VAR)
    plain, wrapped = tmp_path / "var.pth", tmp_path / "ar-ckpt.pth"
    torch.save(src.state_dict(), plain)
    torch.save({"trainer": {"var_wo_ddp": src.state_dict()}, "args": argparse.Namespace(depth=2)}, wrapped)
    for path in (plain, wrapped):
        model = load_official(path, VAR(**{**TINY_VAR}, alng=0.5))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_official(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="var.pth"):
        load_official(plain, VAR(**{**TINY_VAR, "num_classes": 5}))
