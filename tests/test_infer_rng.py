"""Per-row random streams: a tile's sample does not depend on the batch it is sampled in.

RowGenerators (one generator per batch row), the SRVAR and MAR upscalers with one seed per tile
(a row in a batch of 4 = that row alone with its seed), and upscale_images giving the same images
for any batch_size.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from imagezoo import photo

from arsr.data.tokens import TokenFacts
from arsr.infer.mar import MARSampling, MARUpscaler, build_mar_sr
from arsr.infer.srvar import SRVARSampling, SRVARUpscaler, build_srvar
from arsr.infer.tiling import TILE_SEED_BITS, tile_seed, upscale_images
from arsr.models import rng
from arsr.models.layers import sample_top_k_top_p
from arsr.models.mar import MARConfig
from arsr.models.residual import SRTokenizer
from arsr.models.rng import RowGenerators, make_generator
from arsr.models.srvar import SRVARConfig
from arsr.models.vqvae import VQVAE, VQVAEConfig

SEEDS = [11, 7, 2**31 + 3, 0]  # one per row of a batch of 4


# Tiny ops on a shared 2-core box: one intra-op thread (conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- RowGenerators ---------------------------------------------------------------------------------
def test_row_b_of_a_batch_draw_is_row_bs_own_draw() -> None:
    assert len(RowGenerators(SEEDS)) == 4
    x_NC = rng.randn((8, 5), RowGenerators(SEEDS), "cpu")  # 2 rows per generator
    u_NC = rng.rand((8, 3), RowGenerators(SEEDS), "cpu", torch.float64)
    assert x_NC.shape == (8, 5) and u_NC.dtype == torch.float64
    probs_NV = torch.rand(12, 9, generator=_gen(1)).softmax(-1)
    pick_N1 = rng.multinomial(probs_NV, 1, RowGenerators(SEEDS))  # 3 rows per generator
    gens = RowGenerators(SEEDS)  # draws in a row: each generator continues its own stream
    first_NC, second_NC = rng.randn((4, 5), gens, "cpu"), rng.randn((8, 5), gens, "cpu")
    for b, s in enumerate(SEEDS):
        assert torch.equal(x_NC[2 * b : 2 * b + 2], torch.randn(2, 5, generator=_gen(s)))
        assert torch.equal(u_NC[2 * b : 2 * b + 2], torch.rand(2, 3, generator=_gen(s), dtype=torch.float64))
        own = torch.multinomial(probs_NV[3 * b : 3 * b + 3], 1, generator=_gen(s))
        assert torch.equal(pick_N1[3 * b : 3 * b + 3], own)
        g = _gen(s)
        assert torch.equal(first_NC[b : b + 1], torch.randn(1, 5, generator=g))
        assert torch.equal(second_NC[2 * b : 2 * b + 2], torch.randn(2, 5, generator=g))
    assert not torch.equal(x_NC[0:2], x_NC[2:4])


def test_plain_generators_draw_as_torch_does() -> None:
    assert torch.equal(rng.randn((3, 2), _gen(5), "cpu"), torch.randn(3, 2, generator=_gen(5)))
    assert torch.equal(rng.rand((4,), _gen(5), "cpu"), torch.rand(4, generator=_gen(5)))
    probs = torch.rand(5, 7, generator=_gen(2))
    assert torch.equal(rng.multinomial(probs, 2, _gen(5)), torch.multinomial(probs, 2, generator=_gen(5)))
    assert rng.randn((3, 2), None, "cpu").shape == (3, 2)  # torch's global RNG
    # one row, one seed: the same numbers as a plain generator with that seed
    assert torch.equal(rng.randn((3, 2), RowGenerators([5]), "cpu"), torch.randn(3, 2, generator=_gen(5)))


def test_a_draw_that_does_not_split_into_rows_is_refused() -> None:
    gens = RowGenerators([1, 2, 3])
    with pytest.raises(ValueError, match="3 equal per-row chunks"):
        rng.randn((4, 2), gens, "cpu")
    with pytest.raises(ValueError, match="3 equal"):
        rng.rand((5,), gens, "cpu")
    with pytest.raises(ValueError, match="3 equal"):
        rng.multinomial(torch.ones(2, 4), 1, gens)
    with pytest.raises(ValueError, match="3 seeds for a batch of 2"):
        make_generator([1, 2, 3], "cpu", rows=2)
    with pytest.raises(ValueError, match="no seeds"):
        RowGenerators([])
    assert isinstance(make_generator(4, "cpu", rows=2), torch.Generator)


def test_top_k_sampling_draws_each_rows_tokens_from_its_generator() -> None:
    logits_BlV = torch.randn(4, 6, 20, generator=_gen(0)) * 3
    batch = sample_top_k_top_p(logits_BlV, top_k=5, top_p=0.9, generator=RowGenerators(SEEDS))
    for b, s in enumerate(SEEDS):
        alone = sample_top_k_top_p(logits_BlV[b : b + 1], top_k=5, top_p=0.9, generator=_gen(s))
        assert torch.equal(batch[b : b + 1], alone)


# ---- the sampling upscalers ------------------------------------------------------------------------
PN = (1, 2, 4)  # 4x4 grid of 4-channel latents, 8 px HR, x2: 4 px LR tiles


def tiny_tokenizer() -> SRTokenizer:
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(vocab_size=32, z_channels=4, ch=8, ch_mult=(1, 2), patch_nums=PN))
    return SRTokenizer(vae.freeze()).freeze()


def tiny_facts() -> TokenFacts:
    return TokenFacts(
        hr_size=8, scale=2, num_classes=0, patch_nums=PN, vocab_size=32, Cvae=4, target="hr",
        lr_channels=4, vqvae_sha256="0" * 64, samples=1, mean=(0.1, -0.2, 0.0, 0.3), std=(1.0, 0.5, 2.0, 1.5),
    )  # fmt: skip


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights on top of the init (zero-initialised heads included): the samples vary."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def srvar_upscaler(cfg: float = 1.5, temperature: float = 0.8) -> SRVARUpscaler:
    tok, facts = tiny_tokenizer(), tiny_facts()
    torch.manual_seed(1)
    config = SRVARConfig(
        depth=2, width=32, heads=2, drop_path=0.0, pool_head_dim=4, refiner=True, refiner_width=16,
        refiner_depth=1, refiner_steps="4",
    )  # fmt: skip
    model = _perturbed(build_srvar(config, facts))
    return SRVARUpscaler(model, tok, facts, SRVARSampling(cfg=cfg, top_k=10, temperature=temperature))


def mar_upscaler(cfg: float = 1.5) -> MARUpscaler:
    tok, facts = tiny_tokenizer(), tiny_facts()
    torch.manual_seed(1)
    config = replace(
        MARConfig(), encoder_dim=16, encoder_depth=1, encoder_heads=2, decoder_dim=16, decoder_depth=1,
        decoder_heads=2, buffer_size=2, diffloss_depth=1, diffloss_width=16, num_sampling_steps="ddim5",
    )  # fmt: skip
    model = _perturbed(build_mar_sr(config, facts))
    return MARUpscaler(model, tok, facts, MARSampling(cfg=cfg, num_iter=3))


UPSCALERS = {
    "srvar": srvar_upscaler,
    "srvar-cfg0-t1": lambda: srvar_upscaler(cfg=0.0, temperature=1.0),  # VAR's own sampler, no CFG
    "mar": mar_upscaler,
    "mar-cfg1": lambda: mar_upscaler(cfg=1.0),  # no doubled batch
}


@pytest.mark.parametrize("name", list(UPSCALERS))
def test_a_row_sampled_in_a_batch_equals_the_row_sampled_alone(name: str) -> None:
    up = UPSCALERS[name]()
    lr_B3hw = torch.rand(4, 3, 4, 4, generator=_gen(5)) * 2 - 1
    batch = up(lr_B3hw, SEEDS)
    assert batch.shape == (4, 3, 8, 8)
    for b, s in enumerate(SEEDS):
        alone = up(lr_B3hw[b : b + 1], [s])
        torch.testing.assert_close(batch[b : b + 1], alone, rtol=0, atol=1e-5)
        # an int seed on a single row is the same stream
        torch.testing.assert_close(up(lr_B3hw[b : b + 1], s), alone, rtol=0, atol=1e-5)
    # the seed matters (not a deterministic decode in disguise), and so does the order of the seeds
    other = up(lr_B3hw, SEEDS[::-1])
    assert (other - batch).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    with pytest.raises(ValueError, match="seeds for a batch of 4"):
        up(lr_B3hw, SEEDS[:3])


# ---- upscale_images --------------------------------------------------------------------------------
def test_tile_seeds_are_distinct_32_bit_seeds() -> None:
    top = 2**TILE_SEED_BITS - 1
    for seed in (0, 1, -1, 2**70 + 5):
        seeds = {tile_seed(seed, i, j) for i in (0, 1, 2, top) for j in (0, 1, 2, 5, top)}
        assert len(seeds) == 20 and all(0 <= s < 2**32 for s in seeds)  # a CPU generator's range
    # other run seeds: other streams, not the same ones shifted by a tile
    run0 = {tile_seed(0, i, j) for i in range(3) for j in range(50)}
    assert not run0 & {tile_seed(1, i, j) for i in range(3) for j in range(50)}
    with pytest.raises(ValueError, match="at most 65536"):
        upscale_images([np.zeros((4 * 2**8 + 1, 4 * 2**8, 3), np.uint8)], srvar_upscaler(), 0, 1)


@pytest.mark.parametrize("name", ["srvar", "mar"])
def test_upscale_images_gives_the_same_images_for_any_batch_size(name: str) -> None:
    up = UPSCALERS[name]()
    lrs = [photo(9, 7, 1), photo(6, 11, 2)]  # 3x3 and 2x4 tiles of 4 LR px (overlap 1)
    ref = upscale_images(lrs, up, overlap_hr=2, batch_size=1, seed=4)
    assert [sr.shape for sr in ref] == [(18, 14, 3), (12, 22, 3)]
    for batch_size in (3, 16):
        out = upscale_images(lrs, up, overlap_hr=2, batch_size=batch_size, seed=4)
        for sr, sr_ref in zip(out, ref):  # uint8: a float's last bits may round a pixel the other way
            diff = np.abs(sr.astype(int) - sr_ref.astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"batch_size {batch_size}"
    other = upscale_images(lrs, up, overlap_hr=2, batch_size=3, seed=5)
    assert any(np.abs(a.astype(int) - b.astype(int)).max() > 2 for a, b in zip(other, ref))
