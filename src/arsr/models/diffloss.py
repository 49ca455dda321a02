"""Diffusion loss (MAR): a small denoising MLP that models p(x | z) for one token at a time.

Each row is one token: ``target [N, C]`` is the token's continuous value and ``z [N, Dz]`` the
transformer's output at that position. Training draws one timestep and one noise per row from the
1000-step cosine process; sampling runs a respaced chain (``num_sampling_steps``, e.g. "100").

Where ``diffusion_batch_mul`` lives: as in the reference, the *caller* (``MAR.forward_loss``)
repeats its (target, z) rows k times before calling ``DiffLoss.forward``, so every copy gets its own
t and noise; this module sees plain rows.

Parameter names follow the reference (``net.time_embed.mlp.0``, ``net.res_blocks.0.adaLN_modulation.1``
...) so official MAR checkpoints load.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from arsr.models import rng
from arsr.models.diffusion import create_diffusion, randn_like


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Integer timestep -> sinusoid (cos half first, then sin) -> MLP -> [N, width]."""

    def __init__(self, width: int, freq_dim: int = 256, num_timesteps: int = 1000):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.freq_dim = freq_dim
        self.num_timesteps = num_timesteps

    def sinusoid(self, t: Tensor, max_period: float = 10000.0) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.freq_dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        if t.numel() > self.num_timesteps and not t.is_floating_point():
            # Training has many more rows than distinct timesteps: embed each timestep once and
            # gather (same values and gradients, ~7x fewer MLP rows at MAR's batch sizes).
            table = self.mlp(self.sinusoid(torch.arange(self.num_timesteps, device=t.device)))
            return table[t]
        return self.mlp(self.sinusoid(t))


class ResBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x))), with (shift, scale, gate) from the condition y."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """Non-affine LN, adaLN shift/scale from y, then Linear(width -> out)."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The denoiser: ``(x_t [N, C], t [N], c [N, Dz]) -> [N, 2C]`` (eps, then variance values).

    The condition is y = time_embed(t) + cond_embed(c); every block is modulated by y. All
    modulation and output layers start at zero, so the untrained net predicts eps = 0, v = 0.
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, z_channels: int, depth: int):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in self.res_blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return self.forward_embedded(x, self.time_embed(t) + self.cond_embed(c))

    def forward_embedded(self, x: Tensor, y: Tensor) -> Tensor:
        """The trunk, given the already embedded condition y [N or 1, width]."""
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


class DiffLoss(nn.Module):
    """Diffusion loss on token rows; see the module docstring.

    Args:
        target_channels: C, the token width (latent channels x patch_size^2).
        z_channels: Dz, the conditioning width (the transformer decoder's width).
        depth, width: the MLP's residual blocks and width.
        num_sampling_steps: IDDPM respacing of the 1000 training steps used by ``sample``.
    """

    def __init__(
        self, target_channels: int, z_channels: int, depth: int, width: int, num_sampling_steps: str
    ):
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth)
        self.train_diffusion = create_diffusion("", "cosine")
        self.gen_diffusion = create_diffusion(num_sampling_steps, "cosine")

    def forward(
        self, target: Tensor, z: Tensor, mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Mean loss over rows (over rows with mask=1 when a mask [N] is given). target [N, C], z [N, Dz]."""
        T = self.train_diffusion.num_timesteps
        t = torch.randint(0, T, (target.shape[0],), generator=generator, device=_gen_device(generator, z))
        t = t.to(target.device)
        loss = self.train_diffusion.training_losses(
            lambda x, tt: self.net(x, tt, z), target, t, generator=generator
        )["loss"]
        if mask is not None:
            return (loss * mask).sum() / mask.sum()
        return loss.mean()

    @torch.no_grad()
    def sample(
        self,
        z: Tensor,
        temperature: float = 1.0,
        cfg: float = 1.0,
        generator: rng.AnyGenerator = None,
        z_uncond: Tensor | None = None,
    ) -> Tensor:
        """Draw one token per row of z [N, Dz] -> [N, C].

        Classifier-free guidance when ``z_uncond`` [N, Dz] (the rows computed with the null
        condition) is given: the net runs on both halves with the *same* x and only eps is guided,
        eps = eps_u + cfg * (eps_c - eps_u); the variance channels come from the conditional half.
        With cfg=1 this equals the unguided sample.

        All noise (x_T and every step's) has z's N rows, guided or not. With
        :class:`~arsr.models.rng.RowGenerators` of B generators, rows [b*N/B, (b+1)*N/B) draw from
        generator b: the caller lays z out as B equal chunks, chunk b the tokens of image b.
        """
        n = z.shape[0]
        x_T = randn_like(z.new_empty(n, self.in_channels), generator)
        if n == 0:
            return x_T
        net = self.net
        # z is fixed along the chain: embed it once, not once per diffusion step.
        c_emb = net.cond_embed(z if z_uncond is None else torch.cat([z, z_uncond]))

        def denoise(x: Tensor, t: Tensor) -> Tensor:
            y = net.time_embed(t[:1]) + c_emb  # the chain's t is the same for every row
            if z_uncond is None:
                return net.forward_embedded(x, y)
            out_c, out_u = net.forward_embedded(torch.cat([x, x]), y).chunk(2)
            eps_c, var_c = out_c.chunk(2, dim=1)
            eps = out_u[:, : self.in_channels] + cfg * (eps_c - out_u[:, : self.in_channels])
            return torch.cat([eps, var_c], dim=1)

        return self.gen_diffusion.p_sample_loop(denoise, x_T, temperature=temperature, generator=generator)


def _gen_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    return like.device if generator is None else generator.device
