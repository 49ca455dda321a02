"""MAR: masked autoregression over continuous latent tokens with a diffusion loss (Li et al. 2024).

Two modes share one module:
- class mode (``lr_channels=0``): the paper's class-conditional MAR. ``MAR_B/L/H`` have the
  official state-dict layout, so ``load_official`` reads the released checkpoints.
- SR mode (``lr_channels=Cv``): MAR-SR, conditioned on an LR latent grid ``lrf [B, Cv, h, w]``
  aligned with the HR grid (DESIGN section 4):
  (a) the LR tokens are projected and added at every position of the encoder input and of the
      decoder input (so a masked position still sees the LR content at its own location);
  (b) they are attention-pooled (one learned query) into one vector written into all
      ``buffer_size`` buffer slots, where MAR writes its class embedding (plus the class
      embedding when ``num_classes > 0``).
  CFG: per sample with p=``cond_drop`` in training, the learned null vector ``fake_latent``
  replaces the buffer vector (b, class included) and the learned null grid ``null_lr`` replaces
  the LR tokens before (a). At sampling the batch is doubled with the nulls.

Inputs are *normalized* latents: the caller divides HR targets and LR latents by the per-channel
stats (no file I/O here). Masks are bool with True = masked (to predict). Every random draw (orders,
mask ratio, condition drop, diffusion t and noise) takes an optional ``torch.Generator``; dropout
uses torch's global RNG. Sampling also takes :class:`~arsr.models.rng.RowGenerators` (one generator
per batch row: a row's sample then does not depend on the batch it is in).

Shapes: B batch, L = h*w/p^2 tokens, c = C*p^2 token width, buf = buffer_size, De/Dd widths.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from annotated_types import Ge, Gt, Lt
from torch import Tensor

from arsr.models import rng
from arsr.models.diffloss import DiffLoss


# --------------------------------------------------------------------------------------
# Transformer pieces (parameter names follow timm's ViT Block, which official weights use)
# --------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x_BLC: Tensor) -> Tensor:
        B, L, C = x_BLC.shape
        q, k, v = self.qkv(x_BLC).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm ViT block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attn_drop: float, proj_drop: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionPool(nn.Module):
    """LR tokens [B, L, c] -> one vector [B, D]: a learned query attends over the projected grid."""

    def __init__(self, in_dim: int, dim: int, heads: int, seq_len: int):
        super().__init__()
        self.heads = heads
        self.proj = nn.Linear(in_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, dim))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.query = nn.Parameter(torch.zeros(1, heads, 1, dim // heads))
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x_BLc: Tensor) -> Tensor:
        h = self.norm(self.proj(x_BLc) + self.pos_embed)  # [B, L, D]
        B, L, D = h.shape
        k, v = self.kv(h).view(B, L, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(self.query.expand(B, -1, -1, -1).to(k.dtype), k, v)
        return self.out(out.reshape(B, D))  # [B, heads, 1, D/heads] -> [B, D]


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------
def mask_schedule(seq_len: int, num_iter: int) -> list[int]:
    """Tokens still masked after each sampling step (MaskGIT's cosine, clamped as MAR does).

    mask_len = floor(seq_len * cos(pi/2 * (step+1)/num_iter)), clamped to [1, remaining-1]; the
    last step then predicts everything left, but its clamped value (1) still sets the linear CFG.
    """
    out, remaining = [], seq_len
    for step in range(num_iter):
        mask_len = math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter))
        remaining = max(1, min(remaining - 1, mask_len))
        out.append(remaining)
    return out


def tokens_per_step(seq_len: int, num_iter: int) -> list[int]:
    """How many tokens each sampling step reveals (256 tokens, 8 steps: 5, 15, 24, 31, 39, 45, 48, 49)."""
    after = mask_schedule(seq_len, num_iter)
    after[-1] = 0  # the last step predicts every token still masked
    before = [seq_len, *after[:-1]]
    return [b - a for b, a in zip(before, after)]


def _rand(
    shape: tuple[int, ...], generator: rng.AnyGenerator, device: torch.device, dtype: rng.Dtype = None
) -> Tensor:
    """U[0, 1) drawn on the generator's device (reproducible anywhere), returned on ``device``
    (:class:`~arsr.models.rng.RowGenerators`: the first dim split into one chunk per generator)."""
    return rng.rand(shape, generator, device, dtype)


# --------------------------------------------------------------------------------------
# MAR
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MARConfig:
    """MAR's hyperparameters: params.yaml's ``mar.model`` (the defaults are the CPU default run's;
    :data:`MAR_B` and friends are the paper's), stored in ``model.pt``. The grid, token and LR
    widths and the class count are facts of the data and the tokenizer: the constructor takes them."""

    __pydantic_config__ = {"extra": "forbid"}  # params.yaml: an unknown key is an error

    patch_size: Annotated[int, Ge(1)] = 1  # latent positions per token side (MAR: 1; 2 for 512 px)
    encoder_dim: Annotated[int, Ge(8)] = 128
    encoder_depth: Annotated[int, Ge(1)] = 2
    encoder_heads: Annotated[int, Ge(1)] = 4
    decoder_dim: Annotated[int, Ge(8)] = 128
    decoder_depth: Annotated[int, Ge(1)] = 2
    decoder_heads: Annotated[int, Ge(1)] = 4
    mlp_ratio: Annotated[float, Gt(0)] = 4.0
    buffer_size: Annotated[int, Ge(1)] = 16  # slots holding the class / pooled-LR vector
    mask_ratio_min: Annotated[float, Gt(0), Lt(1)] = 0.7  # ratio ~ N(1, 0.25) truncated to [min, 1]
    cond_drop: Annotated[float, Ge(0), Lt(1)] = 0.1  # per-sample condition drop (CFG)
    attn_dropout: Annotated[float, Ge(0), Lt(1)] = 0.1
    proj_dropout: Annotated[float, Ge(0), Lt(1)] = 0.1
    diffloss_depth: Annotated[int, Ge(1)] = 2
    diffloss_width: Annotated[int, Ge(8)] = 128
    # IDDPM's plain "N" spacing keeps t=999 (alpha_bar ~ 2e-9 with the cosine cap), which amplifies
    # a briefly trained head's error ~1000x; DDIM striding ends at t=960 and is stable.
    num_sampling_steps: str = "ddim10"  # respaced diffusion steps at sampling
    diffusion_batch_mul: Annotated[int, Ge(1)] = 4  # noise draws per token in training

    def __post_init__(self) -> None:
        for side in ("encoder", "decoder"):
            dim, heads = getattr(self, f"{side}_dim"), getattr(self, f"{side}_heads")
            if dim % heads:
                raise ValueError(f"{side}_dim: {dim} is not divisible by {side}_heads {heads}")


# The paper's models (class mode: 256 px, 16x16 grid of 16-channel KL latents, 1000 classes, 64 buffer
# slots, DiffLoss "100" steps).
_PAPER = dict(buffer_size=64, diffloss_depth=3, diffloss_width=1024, num_sampling_steps="100")
MAR_B = MARConfig(**_PAPER | dict(encoder_dim=768, encoder_depth=12, encoder_heads=12, decoder_dim=768,
                                  decoder_depth=12, decoder_heads=12, diffloss_depth=6))  # 207.9M params
MAR_L = MARConfig(**_PAPER | dict(encoder_dim=1024, encoder_depth=16, encoder_heads=16, decoder_dim=1024,
                                  decoder_depth=16, decoder_heads=16, diffloss_depth=8,
                                  diffloss_width=1280))  # 478.3M params
MAR_H = MARConfig(**_PAPER | dict(encoder_dim=1280, encoder_depth=20, encoder_heads=16, decoder_dim=1280,
                                  decoder_depth=20, decoder_heads=16, diffloss_depth=12,
                                  diffloss_width=1536))  # 942.4M params


class MAR(nn.Module):
    """Masked autoregressive model with a diffusion head; class mode or SR mode (module docstring).

    ``config`` holds the hyperparameters; ``grid_size`` (latent side h = w), ``token_channels``,
    ``lr_channels`` (0: class mode) and ``num_classes`` come from the data and the tokenizer.
    """

    def __init__(
        self,
        config: MARConfig,
        *,
        grid_size: int,
        token_channels: int,
        lr_channels: int = 0,
        num_classes: int = 0,
    ):
        super().__init__()
        c = self.config = config
        patch_size, buffer_size = c.patch_size, c.buffer_size
        De, Dd = c.encoder_dim, c.decoder_dim
        encoder_heads, decoder_heads = c.encoder_heads, c.decoder_heads
        assert grid_size % patch_size == 0, f"grid {grid_size} is not divisible by patch {patch_size}"
        self.patch_size = patch_size
        self.token_channels = token_channels
        self.seq_h = self.seq_w = grid_size // patch_size
        self.seq_len = L = self.seq_h * self.seq_w
        self.token_dim = token_channels * patch_size**2
        self.lr_channels = lr_channels
        self.lr_dim = lr_channels * patch_size**2
        self.num_classes = num_classes
        self.buffer_size = buffer_size
        self.mask_ratio_min = c.mask_ratio_min
        self.cond_drop = c.cond_drop
        self.diffusion_batch_mul = c.diffusion_batch_mul

        # Registration order gives the official state-dict order for class mode.
        self.fake_latent = nn.Parameter(torch.zeros(1, De))  # the learned null condition (CFG)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + L, De))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buffer_size + L, Dd))
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, Dd))
        if num_classes > 0:
            self.class_emb = nn.Embedding(num_classes, De)
        if lr_channels > 0:
            self.null_lr = nn.Parameter(torch.zeros(1, L, self.lr_dim))  # the learned null LR grid
            self.lr_pool = AttentionPool(self.lr_dim, De, encoder_heads, L)  # (b)
            self.lr_proj_enc = nn.Linear(self.lr_dim, De)  # (a), encoder side
            self.lr_proj_dec = nn.Linear(self.lr_dim, Dd)  # (a), decoder side

        self.z_proj = nn.Linear(self.token_dim, De)
        self.z_proj_ln = nn.LayerNorm(De, eps=1e-6)
        blk = dict(mlp_ratio=c.mlp_ratio, attn_drop=c.attn_dropout, proj_drop=c.proj_dropout)
        self.encoder_blocks = nn.ModuleList([Block(De, encoder_heads, **blk) for _ in range(c.encoder_depth)])
        self.encoder_norm = nn.LayerNorm(De, eps=1e-6)
        self.decoder_embed = nn.Linear(De, Dd)
        self.decoder_blocks = nn.ModuleList([Block(Dd, decoder_heads, **blk) for _ in range(c.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.initialize_weights()

        # Built after initialize_weights so the head keeps its own (zero) init.
        self.diffloss = DiffLoss(self.token_dim, Dd, c.diffloss_depth, c.diffloss_width, c.num_sampling_steps)

    def model_config(self) -> dict[str, Any]:
        """``model.pt``'s config: ``MAR(MARConfig(**m.model_config()), <data facts>)`` rebuilds it."""
        return asdict(self.config)

    def initialize_weights(self) -> None:
        for p in (
            self.fake_latent,
            self.mask_token,
            self.encoder_pos_embed_learned,
            self.decoder_pos_embed_learned,
            self.diffusion_pos_embed_learned,
        ):
            nn.init.normal_(p, std=0.02)
        if self.num_classes > 0:
            nn.init.normal_(self.class_emb.weight, std=0.02)
        if self.lr_channels > 0:
            for p in (self.null_lr, self.lr_pool.pos_embed, self.lr_pool.query):
                nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # as the official JAX ViT
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- tokens <-> grids ---------------------------------------------------------------
    def patchify(self, f_BChw: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, L, C*p*p]; tokens row-major over the grid, channel-major inside."""
        B, C, H, W = f_BChw.shape
        p = self.patch_size
        x = f_BChw.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, x_BLc: Tensor) -> Tensor:
        """[B, L, C*p*p] -> [B, C, h*p, w*p] (the grid fixed at construction)."""
        B, p, h, w = x_BLc.shape[0], self.patch_size, self.seq_h, self.seq_w
        x = x_BLc.reshape(B, h, w, -1, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(B, -1, h * p, w * p)

    # ---- randomness -----------------------------------------------------------------------
    def sample_orders(self, B: int, device: torch.device, generator: rng.AnyGenerator = None) -> Tensor:
        """One random permutation of the L positions per sample: [B, L] long (row b from generator b
        with :class:`~arsr.models.rng.RowGenerators`)."""
        return _rand((B, self.seq_len), generator, device).argsort(dim=1)

    def sample_mask_ratio(self, generator: torch.Generator | None = None) -> float:
        """One ratio per batch from N(1, 0.25^2) truncated to [mask_ratio_min, 1] (inverse CDF)."""
        a = torch.tensor((self.mask_ratio_min - 1.0) / 0.25, dtype=torch.float64)
        lo, hi = torch.special.ndtr(a), 0.5  # standard normal CDF at a and at 0
        u = _rand((1,), generator, torch.device("cpu"), dtype=torch.float64)
        return float(1.0 + 0.25 * torch.special.ndtri(lo + u * (hi - lo)))

    def random_mask(self, orders_BL: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Mask [B, L] bool: the first ceil(L * ratio) positions of each order are masked."""
        num_masked = math.ceil(self.seq_len * self.sample_mask_ratio(generator))
        return self._mask_first(orders_BL, num_masked)

    @staticmethod
    def _mask_first(orders_BL: Tensor, n: int) -> Tensor:
        mask = torch.zeros_like(orders_BL, dtype=torch.bool)
        return mask.scatter_(1, orders_BL[:, :n], True)

    # ---- condition ----------------------------------------------------------------------
    def condition(
        self,
        B: int,
        lr_BLc: Tensor | None = None,
        labels_B: Tensor | None = None,
        drop_B: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """The buffer vector [B, De] and the LR tokens for the additive path [B, L, c] (or None).

        ``drop_B`` (bool) swaps in the learned nulls per sample. In class mode without labels every
        sample is unconditional (the null vector), as in the reference.
        """
        device = self.fake_latent.device
        if self.lr_channels > 0 and lr_BLc is None:
            raise ValueError("SR mode: lrf is required")
        if self.num_classes > 0 and self.lr_channels == 0 and labels_B is None:
            drop_B = torch.ones(B, dtype=torch.bool, device=device)
        cond = self.fake_latent.expand(B, -1)
        if self.lr_channels > 0:
            cond = self.lr_pool(lr_BLc)
        if self.num_classes > 0 and labels_B is not None:
            cls = self.class_emb(labels_B)
            cond = cls if self.lr_channels == 0 else cond + cls
        if drop_B is not None:
            cond = torch.where(drop_B[:, None], self.fake_latent.to(cond.dtype), cond)
            if lr_BLc is not None:
                lr_BLc = torch.where(drop_B[:, None, None], self.null_lr.to(lr_BLc.dtype), lr_BLc)
        return cond, lr_BLc

    # ---- encoder / decoder ----------------------------------------------------------------
    def _visible_index(self, mask_BL: Tensor) -> Tensor:
        """[B, buf + visible] indices into the buffered sequence; every row hides the same count."""
        B = mask_BL.shape[0]
        keep = torch.cat([mask_BL.new_zeros(B, self.buffer_size), mask_BL], dim=1).logical_not_()
        return keep.nonzero()[:, 1].view(B, -1)

    def forward_encoder(
        self, x_BLc: Tensor, mask_BL: Tensor, cond_BD: Tensor, lr_BLc: Tensor | None
    ) -> Tensor:
        """Tokens -> encoder states [B, buf + visible, De] (masked positions are dropped)."""
        B = x_BLc.shape[0]
        x = self.z_proj(x_BLc)  # [B, L, De]
        if lr_BLc is not None:
            x = x + self.lr_proj_enc(lr_BLc)  # (a)
        # every buffer slot holds the same condition vector; only the positions tell them apart
        x = torch.cat([cond_BD[:, None].expand(B, self.buffer_size, -1).to(x.dtype), x], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)  # LN after the position embedding
        idx = self._visible_index(mask_BL)
        x = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
        for block in self.encoder_blocks:
            x = block(x)
        return self.encoder_norm(x)

    def forward_decoder(self, h: Tensor, mask_BL: Tensor, lr_BLc: Tensor | None) -> Tensor:
        """Encoder states -> per-position conditions z [B, L, Dd] for the diffusion head."""
        B = h.shape[0]
        h = self.decoder_embed(h)  # [B, buf + visible, Dd]
        idx = self._visible_index(mask_BL)
        x = self.mask_token.to(h.dtype).expand(B, self.buffer_size + self.seq_len, -1)
        x = x.scatter(1, idx[..., None].expand(-1, -1, h.shape[-1]), h)  # [B, buf + L, Dd]
        if lr_BLc is not None:  # (a): masked positions see the LR content at their location
            lr = self.lr_proj_dec(lr_BLc)
            x = torch.cat([x[:, : self.buffer_size], x[:, self.buffer_size :] + lr], dim=1)
        x = x + self.decoder_pos_embed_learned
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)[:, self.buffer_size :]  # drop the buffer
        return x + self.diffusion_pos_embed_learned

    # ---- training -----------------------------------------------------------------------
    def forward(
        self,
        x_BChw: Tensor,
        lrf_BChw: Tensor | None = None,
        labels_B: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Diffusion loss (scalar) of normalized latents ``x_BChw`` [B, C, H, W].

        SR mode needs ``lrf_BChw`` [B, Cv, H, W] (normalized like x). Labels [B] long when
        ``num_classes > 0`` (class mode without labels trains unconditionally).
        """
        target = self.patchify(x_BChw)  # [B, L, c], visible ones are also the encoder input
        B, device = target.shape[0], target.device
        lr = self.patchify(lrf_BChw) if lrf_BChw is not None else None
        orders = self.sample_orders(B, device, generator)
        mask = self.random_mask(orders, generator)
        drop = _rand((B,), generator, device) < self.cond_drop if self.training else None
        cond, lr = self.condition(B, lr, labels_B, drop)
        z = self.forward_decoder(self.forward_encoder(target, mask, cond, lr), mask, lr)
        return self.forward_loss(z, target, mask, generator)

    def forward_loss(
        self, z_BLD: Tensor, target_BLc: Tensor, mask_BL: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Mean diffusion loss over the masked tokens, each seen ``diffusion_batch_mul`` times.

        Only masked rows enter the head (the reference runs it on all rows, then weights by the
        mask: same value and expected gradient, ~13% less head compute).
        """
        k = self.diffusion_batch_mul
        z = z_BLD[mask_BL].repeat(k, 1)  # [k*M, Dd], each copy gets its own t and noise
        target = target_BLc[mask_BL].repeat(k, 1)  # [k*M, c]
        return self.diffloss(target, z, generator=generator)

    # ---- sampling -----------------------------------------------------------------------
    @torch.no_grad()
    def sample_tokens(
        self,
        lrf_BChw: Tensor | None = None,
        labels_B: Tensor | None = None,
        *,
        bsz: int | None = None,
        num_iter: int = 64,
        cfg: float = 1.0,
        cfg_schedule: Literal["linear", "constant"] = "linear",
        temperature: float = 1.0,
        generator: rng.AnyGenerator = None,
    ) -> Tensor:
        """Generate normalized latents [B, C, H, W] in ``num_iter`` steps (call ``eval()`` first).

        Each step runs encoder + decoder on the current tokens, reveals the next positions of a
        random order (cosine schedule) and samples them with the diffusion head. With cfg != 1 the
        batch is doubled with the learned nulls and eps is guided with
        cfg_iter = 1 + (cfg-1)(L - mask_len)/L ('linear', rising as tokens are revealed) or cfg.

        ``generator``: one for the batch, or :class:`~arsr.models.rng.RowGenerators` (one per row:
        row b's orders and diffusion noise come from generator b, so its sample does not depend on
        the other rows). Every row reveals the same number of tokens per step and ``z[:B][to_pred]``
        lists them row-major, so the head's rows split into B equal chunks, chunk b image b's.
        """
        if lrf_BChw is not None:
            B = lrf_BChw.shape[0]
        elif labels_B is not None:
            B = labels_B.shape[0]
        elif bsz is not None:
            B = bsz
        else:
            raise ValueError("give lrf_BChw, labels_B or bsz")
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"cfg_schedule {cfg_schedule!r} is not 'linear' or 'constant'")
        device, L = self.fake_latent.device, self.seq_len
        lr = self.patchify(lrf_BChw) if lrf_BChw is not None else None
        cond, lr = self.condition(B, lr, labels_B)
        guided = cfg != 1.0
        if guided:  # [cond; null] for the whole run
            null_cond, null_lr = self.condition(
                B, lr, labels_B, torch.ones(B, dtype=torch.bool, device=device)
            )
            cond = torch.cat([cond, null_cond])
            lr = torch.cat([lr, null_lr]) if lr is not None else None

        tokens = torch.zeros(B, L, self.token_dim, device=device)
        mask = torch.ones(B, L, dtype=torch.bool, device=device)
        orders = self.sample_orders(B, device, generator)
        for step, mask_len in enumerate(mask_schedule(L, num_iter)):
            x, m = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if guided else (tokens, mask)
            z = self.forward_decoder(self.forward_encoder(x, m, cond, lr), m, lr)  # [B or 2B, L, Dd]
            mask_next = self._mask_first(orders, mask_len)
            to_pred = mask if step == num_iter - 1 else mask & ~mask_next
            cfg_iter = 1 + (cfg - 1) * (L - mask_len) / L if cfg_schedule == "linear" else cfg
            z_uncond = z[B:][to_pred] if guided else None  # [B*k, Dd], the same rows' null pass
            tokens[to_pred] = self.diffloss.sample(  # z[:B][to_pred]: [B*k, Dd], row-major (k per row)
                z[:B][to_pred].float(), temperature, cfg_iter, generator, z_uncond=z_uncond
            ).to(tokens.dtype)
            mask = mask_next
        return self.unpatchify(tokens)

    # ---- optimizer and checkpoints ------------------------------------------------------
    @staticmethod
    def no_weight_decay(name: str, param: Tensor) -> bool:
        """MAR's rule: 1-D params, biases and everything in the diffusion head skip weight decay
        (position embeddings, mask_token, fake_latent, null_lr and class_emb are decayed)."""
        return param.ndim <= 1 or name.endswith(".bias") or name.startswith("diffloss.")

    def load_official(self, path: str | Path, ema: bool = True) -> None:
        """Load an official LTH14/mar checkpoint (``model_ema`` by default, else ``model``), strictly."""
        path = Path(path)
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such checkpoint") from None
        except Exception as err:  # an unpickling refusal names the offending global
            raise ValueError(f"{path}: not a loadable MAR checkpoint: {err}") from None
        key = "model_ema" if ema else "model"
        if not isinstance(ckpt, dict) or key not in ckpt:
            found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(f"{path}: no '{key}' entry (found {found})")
        state = ckpt[key]
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [
            f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or shapes:
            raise ValueError(
                f"{path}: '{key}' does not match this model: {len(missing)} missing {missing[:5]}, "
                f"{len(unexpected)} unexpected {unexpected[:5]}, {len(shapes)} shape mismatches {shapes[:5]}"
            )
        self.load_state_dict(state, strict=True)
