"""Random draws that a batch row owns: sampling results that do not depend on the batch size.

One ``torch.Generator`` for a whole batch hands each row whatever numbers its position in the batch
gets, so the same image sampled in a batch of 1 or of 16 comes out different. :class:`RowGenerators`
holds one generator per batch row instead: a draw of shape [N, ...] is split into B equal contiguous
chunks of N / B rows along its first dimension, and chunk b comes from row b's generator. A sampler
whose every draw keeps that layout (chunk b belongs to image b: per-image tokens, noise rows, ...)
then gives image b the numbers it would get alone, whatever its neighbours.

The module-level :func:`randn`, :func:`rand` and :func:`multinomial` take either kind of generator
(or None: torch's global RNG); with a plain ``torch.Generator`` or None they make exactly the call
the models made before (same numbers). Draws run on the generator's device and are then moved to
the requested one, so the numbers depend on the generator, not on where they are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import torch
from torch import Tensor

Device: TypeAlias = torch.device | str
Dtype: TypeAlias = torch.dtype | None  # None: torch's default float dtype


class RowGenerators:
    """One ``torch.Generator`` per batch row, seeded with ``seeds[b]`` on ``device`` (a CPU generator
    keeps only the low 32 bits of a seed: seeds equal modulo 2**32 give the same stream there)."""

    def __init__(self, seeds: Sequence[int], device: Device = "cpu"):
        if len(seeds) == 0:
            raise ValueError("RowGenerators: no seeds")
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def _rows_per_generator(self, N: int) -> int:
        B = len(self.generators)
        if N % B:
            raise ValueError(f"a draw of {N} rows does not split into {B} equal per-row chunks")
        return N // B

    def randn(self, shape: Sequence[int], dtype: Dtype = None, device: Device | None = None) -> Tensor:
        """Standard normal [N, ...]: rows [b*n, (b+1)*n) from generator b (n = N / B)."""
        return self._draw(torch.randn, shape, dtype, device)

    def rand(self, shape: Sequence[int], dtype: Dtype = None, device: Device | None = None) -> Tensor:
        """U[0, 1) [N, ...]: rows [b*n, (b+1)*n) from generator b (n = N / B)."""
        return self._draw(torch.rand, shape, dtype, device)

    def _draw(self, fn, shape: Sequence[int], dtype: Dtype, device: Device | None) -> Tensor:
        N, *rest = shape
        n = self._rows_per_generator(N)
        chunks = [fn((n, *rest), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        return torch.cat(chunks).to(self.device if device is None else device)

    def multinomial(self, probs_NV: Tensor, num_samples: int) -> Tensor:
        """``torch.multinomial`` -> [N, num_samples] long; rows [b*n, (b+1)*n) of ``probs_NV`` drawn
        with generator b."""
        n = self._rows_per_generator(probs_NV.shape[0])
        probs_NV = probs_NV.to(self.device)
        picks = [
            torch.multinomial(probs_NV[b * n : (b + 1) * n], num_samples, generator=g)
            for b, g in enumerate(self.generators)
        ]
        return torch.cat(picks)


# What the sampling paths accept: one generator for the batch, one per row, or torch's global RNG.
AnyGenerator: TypeAlias = torch.Generator | RowGenerators | None


def make_generator(seed: int | Sequence[int], device: Device, rows: int) -> AnyGenerator:
    """An int: one generator for the whole batch (``manual_seed(seed)``); a sequence of ``rows`` ints:
    :class:`RowGenerators`, one per row (an upscaler's tiles, each with its own seed)."""
    if not isinstance(seed, Sequence):
        return torch.Generator(device).manual_seed(int(seed))
    seeds = list(seed)
    if len(seeds) != rows:
        raise ValueError(f"{len(seeds)} seeds for a batch of {rows} rows (one per row, or one int)")
    return RowGenerators(seeds, device)


def _gen_device(generator: torch.Generator | None, device: Device) -> Device:
    return device if generator is None else generator.device


def randn(shape: Sequence[int], generator: AnyGenerator, device: Device, dtype: Dtype = None) -> Tensor:
    """Standard normal noise of ``shape`` on ``device`` (drawn on the generator's device)."""
    if isinstance(generator, RowGenerators):
        return generator.randn(shape, dtype, device)
    gen_device = _gen_device(generator, device)
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


def rand(shape: Sequence[int], generator: AnyGenerator, device: Device, dtype: Dtype = None) -> Tensor:
    """U[0, 1) of ``shape`` on ``device`` (drawn on the generator's device)."""
    if isinstance(generator, RowGenerators):
        return generator.rand(shape, dtype, device)
    gen_device = _gen_device(generator, device)
    return torch.rand(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)


def multinomial(probs_NV: Tensor, num_samples: int, generator: AnyGenerator) -> Tensor:
    """``torch.multinomial(probs_NV, num_samples)`` [N, num_samples] on probs' device; with
    :class:`RowGenerators` the rows are split into one chunk per generator."""
    if isinstance(generator, RowGenerators):
        return generator.multinomial(probs_NV, num_samples).to(probs_NV.device)
    return torch.multinomial(probs_NV, num_samples, generator=generator)
