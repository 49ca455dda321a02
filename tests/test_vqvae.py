"""The multi-scale VQVAE tokenizer: official layout, VAR's quantizer semantics, training hooks."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F

from arsr.models.quant import MultiScaleQuantizer, phi_ticks
from arsr.models.vqvae import VAR_PATCH_NUMS, VAR_VQVAE, VQVAE, VQVAEConfig, load_official

KEYS_TSV = Path(__file__).resolve().parents[2] / "shared" / "reference" / "var_vqvae_ch160v4096z32_keys.tsv"

# A tiny tokenizer: 2x downsample, 8x8 images -> 4x4 latent, 4 scales (L = 30).
# VAR's layout (no linear path): these tests are about VAR's VQVAE
TINY = dict(vocab_size=32, z_channels=4, ch=8, ch_mult=(1, 2), patch_nums=(1, 2, 3, 4), linear_path=False)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: on a busy 2-core machine a second intra-op thread only adds spin-waits
    (the file took 60 s with 2 threads under load, 9 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed: int = 0, **kw) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(VQVAEConfig(**{**TINY, **kw}))


def images(B: int = 2, side: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, side, side, generator=g) * 2 - 1


def var_quantizer(seed: int = 0) -> MultiScaleQuantizer:
    """VAR's 10-scale quantizer on a small codebook (the encoder is not needed for these tests)."""
    torch.manual_seed(seed)
    return MultiScaleQuantizer(vocab_size=64, Cvae=8, patch_nums=VAR_PATCH_NUMS)


def random_idx(q: MultiScaleQuantizer, B: int = 2, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(q.vocab_size, (B, pn * pn), generator=g) for pn in q.patch_nums]


# ------------------------------------------------------------------------------------------
# Official layout
# ------------------------------------------------------------------------------------------
def read_key_table() -> dict[str, tuple[int, ...]]:
    rows = [line.rstrip("\n").split("\t") for line in KEYS_TSV.read_text().splitlines()[1:]]
    return {k: tuple(int(s) for s in shape.split("x")) for k, shape, _ in rows}


@pytest.mark.skipif(not KEYS_TSV.is_file(), reason=f"{KEYS_TSV} not found (../shared is provided in CI)")
def test_default_vqvae_state_dict_is_the_official_key_table():
    with torch.device("meta"):
        vae = VQVAE(VAR_VQVAE)
    mine = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    ref = read_key_table()
    assert sorted(set(mine) ^ set(ref)) == []
    assert {k: s for k, s in mine.items() if ref[k] != s} == {}
    assert sum(v.numel() for v in vae.state_dict().values()) == 108_989_315
    assert vae.L == 680 and vae.first_l == 1 and vae.downsample == 16


def test_phi_index_per_scale_for_var_10_scales():
    q = var_quantizer()
    assert q.phi_indices() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # scale 2 is the tie that picks conv 1
    np.testing.assert_allclose(phi_ticks(4), [1 / 12, 13 / 36, 23 / 36, 11 / 12])
    assert len(q.quant_resi.qresi_ls) == 4


# ------------------------------------------------------------------------------------------
# Teacher forcing and its autoregressive twin
# ------------------------------------------------------------------------------------------
def test_idxBl_to_var_input_equals_plain_rederivation():
    q = var_quantizer()
    idx = random_idx(q)
    B, C, HW, pns = 2, 8, 16, VAR_PATCH_NUMS
    phi_of_scale = [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    codebook = q.embedding.weight
    with torch.no_grad():
        f_hat = torch.zeros(B, C, HW, HW)
        inputs = []
        for si in range(len(pns) - 1):
            pn = pns[si]
            code_map = codebook[idx[si]].reshape(B, pn, pn, C).permute(0, 3, 1, 2)
            up = F.interpolate(code_map, size=(HW, HW), mode="bicubic")
            conv = q.quant_resi.qresi_ls[phi_of_scale[si]]
            f_hat = f_hat + 0.5 * up + 0.5 * F.conv2d(up, conv.weight, conv.bias, padding=1)
            nxt = pns[si + 1]
            down = F.interpolate(f_hat, size=(nxt, nxt), mode="area")  # cumulative f_hat, not scale si
            inputs.append(down.permute(0, 2, 3, 1).reshape(B, nxt * nxt, C))
        expect = torch.cat(inputs, dim=1)
        got = q.idxBl_to_var_input(idx)
    assert got.shape == (B, 680 - 1, C) and got.dtype == torch.float32
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)


def test_autoregressive_twin_reproduces_teacher_forcing_and_final_fhat():
    q = var_quantizer()
    idx = random_idx(q)
    SN, B = q.SN, 2
    with torch.no_grad():
        tf_BLC = q.idxBl_to_var_input(idx)
        f_hat = torch.zeros(B, q.Cvae, 16, 16)
        ar_inputs = []
        for si, pn in enumerate(q.patch_nums):
            h_BChw = q.embedding(idx[si]).transpose(1, 2).reshape(B, q.Cvae, pn, pn)
            f_hat, next_BChw = q.get_next_autoregressive_input(si, SN, f_hat, h_BChw)
            if si < SN - 1:
                ar_inputs.append(next_BChw.flatten(2).transpose(1, 2))
        torch.testing.assert_close(torch.cat(ar_inputs, 1), tf_BLC, rtol=0, atol=1e-6)
        torch.testing.assert_close(f_hat, q.idxBl_to_fhat(idx), rtol=0, atol=1e-6)
        assert next_BChw is f_hat  # last scale returns f_hat itself


def test_tokens_roundtrip_and_fhat_paths_agree():
    vae = tiny().freeze()
    x = images()
    f = vae.img_to_f(x)
    assert f.shape == (2, 4, 4, 4)
    idx = vae.img_to_idxBl(x)
    assert [t.shape for t in idx] == [(2, pn * pn) for pn in (1, 2, 3, 4)]
    assert all(t.dtype == torch.long for t in idx)
    torch.testing.assert_close(vae.idxBl_to_fhat(idx), vae.f_to_fhat(f), rtol=0, atol=1e-5)
    rec_from_tokens = vae.idxBl_to_img(idx)
    rec_from_fhat = vae.fhat_to_img(vae.f_to_fhat(f))
    assert rec_from_tokens.shape == x.shape and rec_from_tokens.abs().max() <= 1
    torch.testing.assert_close(rec_from_tokens, rec_from_fhat, rtol=0, atol=1e-5)
    # stored tokens ([B, L], int16) split back into scales
    idx_BL = torch.cat(idx, 1).to(torch.int16)
    assert idx_BL.shape == (2, vae.L) and vae.L == 30
    assert all(torch.equal(a, b) for a, b in zip(vae.split_idx_BL(idx_BL), idx))


def test_tokens_do_not_depend_on_autocast():
    vae = tiny().freeze()
    x = images(B=3)
    ref = torch.cat(vae.img_to_idxBl(x), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = torch.cat(vae.img_to_idxBl(x), 1)
        x_BLC = vae.idxBl_to_var_input(vae.img_to_idxBl(x))
    assert torch.equal(ref, amp)
    assert x_BLC.dtype == torch.float32 and x_BLC.shape == (3, vae.L - 1, 4)


def test_each_scale_quantizes_the_remaining_residual():
    """Scale 0 holds the code nearest the mean latent (area down to 1x1), as in VAR."""
    vae = tiny().freeze()
    f = vae.img_to_f(images())
    idx0 = vae.f_to_idxBl(f)[0][:, 0]
    mean_BC = f.mean(dim=(2, 3))
    expect = torch.cdist(mean_BC, vae.quantize.embedding.weight).argmin(1)
    assert torch.equal(idx0, expect)


# ------------------------------------------------------------------------------------------
# Training hooks
# ------------------------------------------------------------------------------------------
def test_forward_losses_ste_and_usage_without_distributed():
    assert not tdist.is_initialized()
    vae = tiny().train()
    x = images()
    rec, vq_loss, usage = vae(x)
    assert rec.shape == x.shape and vq_loss.ndim == 0 and usage.shape == (4,)
    assert ((usage > 0) & (usage <= 1)).all()
    # scale 0 sees B=2 vectors, so at most 2 of the 32 codes can be hit there
    assert usage[0] <= 2 / 32
    assert vae.quantize.ema_vocab_hit_SV.sum() == sum(2 * pn * pn for pn in (1, 2, 3, 4))
    # the reconstruction's gradient reaches the encoder (straight-through), not the codebook
    rec.square().mean().backward(retain_graph=True)
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.quantize.embedding.weight.grad is None
    # the VQ loss trains the codebook and phi
    vae.zero_grad()
    vq_loss.backward()
    assert vae.quantize.embedding.weight.grad.abs().sum() > 0
    assert vae.quantize.quant_resi.qresi_ls[0].weight.grad.abs().sum() > 0
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0  # commitment term


def test_forward_value_is_the_quantized_latent():
    vae = tiny().eval()
    x = images()
    with torch.no_grad():
        f = vae.img_to_f(x)
        f_hat_ste, vq, _ = vae.quantize(f)
        torch.testing.assert_close(f_hat_ste, vae.f_to_fhat(f), rtol=0, atol=1e-5)
        # vq_loss = mean_s (beta + 1) |f_hat_s - f|^2, f_hat_s = the reconstruction after scales 0..s
        idx = vae.f_to_idxBl(f)
        err = sum(1.25 * F.mse_loss(vae.idxBl_to_fhat(idx[: s + 1]), f) for s in range(4))
    torch.testing.assert_close(vq, err / 4, rtol=1e-4, atol=1e-6)


def test_dead_code_restart_changes_only_dead_rows_deterministically():
    vae = tiny().train()
    x = images(B=4)
    vae(x)  # records hits: most of the 32 codes are never chosen by this batch
    hits_V = vae.quantize.ema_vocab_hit_SV.sum(0)
    dead_expect = (hits_V < 0.03 * hits_V.mean()).nonzero().squeeze(1)
    assert 0 < dead_expect.numel() < 32
    before = vae.quantize.embedding.weight.detach().clone()
    twin = copy.deepcopy(vae)

    dead = vae.restart_dead_codes(x, torch.Generator().manual_seed(0))
    assert torch.equal(dead, dead_expect)
    after = vae.quantize.embedding.weight.detach()
    alive = torch.ones(32, dtype=torch.bool)
    alive[dead] = False
    assert torch.equal(after[alive], before[alive])
    assert (after[dead] != before[dead]).any(dim=1).all()
    # new rows are residual vectors of this batch: every one equals some z_NC of some scale
    z_NC = torch.cat([z for _, z, _, _ in twin.quantize._residual_scales(twin.img_to_f(x))])
    gap_nN = (after[dead][:, None] - z_NC[None]).abs().amax(dim=2)
    assert gap_nN.min(dim=1).values.max() < 1e-6
    # restarted codes get a grace period, and the same generator seed gives the same rows
    assert (vae.quantize.ema_vocab_hit_SV.sum(0)[dead] >= 0.03 * hits_V.mean()).all()
    assert torch.equal(twin.restart_dead_codes(x, torch.Generator().manual_seed(0)), dead)
    assert torch.equal(twin.quantize.embedding.weight, vae.quantize.embedding.weight)


def test_tiny_model_overfits_one_batch():
    vae = tiny(seed=0, vocab_size=64).train()
    x = images(B=4)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        rec, vq_loss, _ = vae(x)
        loss = F.l1_loss(rec, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


# ------------------------------------------------------------------------------------------
# Config, rebuild, loading
# ------------------------------------------------------------------------------------------
def test_build_from_cpu_default_config():
    vae = VQVAE(VQVAEConfig())
    assert vae.L == 155 and vae.downsample == 8 and vae.V == 512 and vae.first_l == 1
    x = images(B=1, side=64)
    idx = vae.img_to_idxBl(x)
    assert [t.shape[1] for t in idx] == [1, 4, 9, 16, 25, 36, 64]
    assert vae.idxBl_to_var_input(idx).shape == (1, 154, 32)
    rebuilt = VQVAE(VQVAEConfig(**vae.model_config()))
    assert rebuilt.model_config() == vae.model_config()
    rebuilt.load_state_dict(vae.state_dict(), strict=True)


def test_load_official_roundtrip_and_other_patch_nums(tmp_path: Path):
    vae = tiny(seed=5)
    vae.quantize.ema_vocab_hit_SV.fill_(1.0)
    path = tmp_path / "vae.pth"
    torch.save(vae.state_dict(), path)
    arch = {k: v for k, v in TINY.items() if k != "patch_nums"}
    loaded = load_official(path, VQVAEConfig(**arch, patch_nums=(1, 2, 3, 4)))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))
    # same weights, a different scale schedule: only the usage buffer (shape [SN, V]) is not taken over
    other = load_official(path, VQVAEConfig(**arch, patch_nums=(1, 2, 4)))
    assert other.quantize.ema_vocab_hit_SV.shape == (3, 32)
    assert torch.equal(other.quantize.embedding.weight, vae.quantize.embedding.weight)


def test_load_official_errors_are_clear(tmp_path: Path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_official(missing)
    wrong = tmp_path / "wrong.pth"
    torch.save({"encoder.conv_in.weight": torch.zeros(1), "foo.bar": torch.zeros(2)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth") as err:
        load_official(wrong)
    msg = str(err.value)
    assert "missing keys" in msg and "unexpected keys (foo.bar)" in msg and "wrong shapes" in msg
    assert "more)" in msg  # long key lists are cut short
    not_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(ValueError, match="list.pth.*not a VQVAE state dict"):
        load_official(not_dict)


def test_distributed_paths_single_process_gloo(tmp_path: Path):
    """With a process group (world 1) the hit counts are all-reduced and restarted rows broadcast."""
    store = tdist.FileStore(str(tmp_path / "store"), 1)
    tdist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        vae = tiny().train()
        x = images(B=4)
        _, _, usage = vae(x)
        assert vae.quantize.ema_vocab_hit_SV.sum() == sum(4 * pn * pn for pn in (1, 2, 3, 4))
        dead = vae.restart_dead_codes(x, torch.Generator().manual_seed(0))
        assert dead.numel() > 0 and usage.shape == (4,)
    finally:
        tdist.destroy_process_group()
    assert not tdist.is_initialized()
