"""Transformer pieces shared by the next-scale models (VAR, SRVAR).

Shape letters: B batch, L tokens, l tokens of one scale, C width, D condition width, H heads,
c head dim, V vocabulary, Cv VAE latent channels. State-dict names follow FoundationVision/VAR
(``attn.mat_qkv``, ``ada_lin.1`` ...) so official checkpoints load; the cross-attention pieces
follow FoundationVision/Infinity (``ca``, ``ca_norm``, ``ca_gamma``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from arsr.models import rng


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p (training only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep.div_(1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


class RMSNorm(nn.Module):
    """RMS normalisation with a learned gain, computed in fp32 (the LR latents can be large)."""

    def __init__(self, C: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


class FFN(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (VAR's MLP; its dropout defaults to 0 and is left out)."""

    def __init__(self, C: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x_normed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """AdaLN: x * (1 + scale) + shift, as one fused op (x [B,L,C], scale/shift [B,1,C])."""
    return torch.addcmul(shift, x_normed, scale + 1)


# Attention in query groups: rows [a, b) attend to keys [0, b) under an additive mask [1,1,b-a,b]
# (0 / -inf), or with no mask (None) when all those keys are visible. [(0, L, mask)] is plain masked
# attention; VAR's block-causal mask lets the model skip the keys a group can never see.
AttnPlan = list[tuple[int, int, torch.Tensor | None]]


class SelfAttention(nn.Module):
    """VAR's self-attention: fused qkv without K bias, optional cosine (L2-normalised) attention, KV cache.

    With ``attn_l2_norm`` q and k are unit vectors and q is multiplied by a learned per-head scale
    (init 4, clamped at 100), so the softmax scale is 1; otherwise VAR uses 0.25/sqrt(c).
    """

    def __init__(self, C: int, num_heads: int, attn_l2_norm: bool = True) -> None:
        super().__init__()
        assert C % num_heads == 0, f"width {C} is not divisible by {num_heads} heads"
        self.num_heads, self.head_dim = num_heads, C // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))  # K has no bias; kept as a buffer (VAR's keys)
        self.proj = nn.Linear(C, C)
        self.caching = False
        self.cached_k: torch.Tensor | None = None
        self.cached_v: torch.Tensor | None = None

    def kv_caching(self, enable: bool) -> None:
        """Turn the inference KV cache on or off; either way it starts empty."""
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x_BLC: torch.Tensor, plan: AttnPlan | None = None) -> torch.Tensor:
        """plan: query groups and their masks (see AttnPlan), or None: every query sees every key
        (with the KV cache: the new scale and all cached ones)."""
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B,H,L,c]
        if self.attn_l2_norm:  # q/|q| * scale, k/|k|; the per-head scale is folded into the [B,H,L,1] factor
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = q * (scale_mul / torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(1e-12))
            k = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(1e-12)
        if self.caching:  # scales arrive one by one; attend to every earlier scale's keys
            if self.cached_k is not None:
                k = torch.cat((self.cached_k, k), dim=2)
                v = torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        q, k = q.to(v.dtype), k.to(v.dtype)  # (under autocast the normalisation may run in fp32)
        if plan is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:  # one SDPA per query group, over the keys it can see
            outs = []
            for a, b, mask in plan:
                mask = None if mask is None else mask.to(q.dtype)  # SDPA wants the mask in q's dtype
                qkv_b = q[:, :, a:b], k[:, :, :b], v[:, :, :b]
                outs.append(F.scaled_dot_product_attention(*qkv_b, attn_mask=mask, scale=self.scale))
            out = torch.cat(outs, dim=2)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Infinity-style cross-attention: queries from x (or one learned query), K/V from a condition.

    q has a bias, K has none, V has one; softmax scale 1/sqrt(c). All conditions in a batch have the
    same length here (one LR latent grid per sample), so dense SDPA replaces Infinity's varlen
    flash-attention and no padding mask is needed. With the cache on, the projected K/V of the
    condition are computed once and reused at every scale.
    """

    def __init__(self, C: int, kv_dim: int, num_heads: int, learned_query: bool = False) -> None:
        super().__init__()
        assert C % num_heads == 0, f"width {C} is not divisible by {num_heads} heads"
        self.num_heads, self.head_dim = num_heads, C // num_heads
        if learned_query:  # attentive pooling: one query per head, shared by the batch
            self.mat_q = nn.Parameter(torch.empty(1, num_heads, self.head_dim))
            nn.init.trunc_normal_(self.mat_q, std=math.sqrt(1 / (3 * C)))
        else:
            self.mat_q = nn.Linear(C, C)
        self.mat_kv = nn.Linear(kv_dim, 2 * C, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.proj = nn.Linear(C, C)
        self.caching = False
        self.cached_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def kv_caching(self, enable: bool) -> None:
        self.caching, self.cached_kv = enable, None

    def _kv(self, kv_BLc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.caching and self.cached_kv is not None:
            return self.cached_kv
        B, Lk, _ = kv_BLc.shape
        bias = torch.cat((torch.zeros_like(self.v_bias), self.v_bias))
        kv = F.linear(kv_BLc, self.mat_kv.weight, bias).view(B, Lk, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B,H,Lk,c]
        if self.caching:
            self.cached_kv = (k, v)
        return k, v

    def forward(self, x_BLC: torch.Tensor | None, kv_BLc: torch.Tensor) -> torch.Tensor:
        """x_BLC [B,L,C] (None with a learned query, then L = 1); kv_BLc [B,Lk,kv_dim] -> [B,L,C]."""
        k, v = self._kv(kv_BLc)
        B = k.shape[0]
        if x_BLC is None:
            q = self.mat_q.unsqueeze(2).expand(B, -1, -1, -1)  # [B,H,1,c]
        else:
            q = self.mat_q(x_BLC).view(B, x_BLC.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.to(v.dtype), k, v)  # default scale 1/sqrt(c)
        return self.proj(out.transpose(1, 2).flatten(2))


class AttentivePool(nn.Module):
    """Pool a token set [B,Lk,kv_dim] into one vector [B,D] with a learned query (Infinity's
    TextAttentivePool). The head count is kv_dim // head_dim (head_dim 8 gives 4 heads for Cv = 32)."""

    def __init__(self, kv_dim: int, D: int, head_dim: int = 8) -> None:
        super().__init__()
        assert kv_dim % head_dim == 0, f"kv_dim {kv_dim} is not divisible by head_dim {head_dim}"
        self.ca = CrossAttention(D, kv_dim, num_heads=kv_dim // head_dim, learned_query=True)

    def forward(self, kv_BLc: torch.Tensor) -> torch.Tensor:
        return self.ca(None, kv_BLc).squeeze(1)


class AdaLNSelfAttn(nn.Module):
    """VAR's block: AdaLN-modulated self-attention and FFN, each residual scaled by a gamma.

    The six modulation vectors come from one Linear in the order gamma1, gamma2, scale1, scale2,
    shift1, shift2 (VAR's order; official checkpoints depend on it).
    """

    def __init__(
        self,
        C: int,
        D: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        attn_l2_norm: bool = True,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.C = C
        self.attn = SelfAttention(C, num_heads, attn_l2_norm)
        self.ffn = FFN(C, round(C * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * C))

    def ada_params(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """cond [B,D] -> g1, g2, scale1, scale2, shift1, shift2 [B,1,C]."""
        return self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)

    def forward(self, x_BLC: torch.Tensor, cond: torch.Tensor, plan: AttnPlan | None) -> torch.Tensor:
        g1, g2, s1, s2, b1, b2 = self.ada_params(cond)
        # Drop-path scales a sample's whole branch, so it is applied to the small gamma [B,1,C].
        x_BLC = x_BLC + self.attn(modulate(self.ln_wo_grad(x_BLC), s1, b1), plan) * self.drop_path(g1)
        return x_BLC + self.ffn(modulate(self.ln_wo_grad(x_BLC), s2, b2)) * self.drop_path(g2)


class CrossAttnBlock(AdaLNSelfAttn):
    """AdaLNSelfAttn plus Infinity's cross-attention between the two branches:
    ``x = x + ca(ca_norm(x), kv) * ca_gamma`` (affine LN, no AdaLN and no drop-path on that branch)."""

    def __init__(self, C: int, D: int, num_heads: int, ca_gamma: float = 1.0, **kw) -> None:
        super().__init__(C, D, num_heads, **kw)
        self.ca = CrossAttention(C, C, num_heads)
        self.ca_norm = nn.LayerNorm(C, eps=self.ln_wo_grad.eps)
        self.ca_gamma = nn.Parameter(torch.full((C,), ca_gamma))

    def forward(  # type: ignore[override]
        self, x_BLC: torch.Tensor, cond: torch.Tensor, plan: AttnPlan | None, kv_BLC: torch.Tensor
    ) -> torch.Tensor:
        g1, g2, s1, s2, b1, b2 = self.ada_params(cond)
        x_BLC = x_BLC + self.attn(modulate(self.ln_wo_grad(x_BLC), s1, b1), plan) * self.drop_path(g1)
        x_BLC = x_BLC + self.ca(self.ca_norm(x_BLC), kv_BLC) * self.ca_gamma.to(x_BLC.dtype)
        return x_BLC + self.ffn(modulate(self.ln_wo_grad(x_BLC), s2, b2)) * self.drop_path(g2)


class AdaLNBeforeHead(nn.Module):
    """The head's own AdaLN: LN(x) * (1 + scale) + shift from Linear(D, 2C)."""

    def __init__(self, C: int, D: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return modulate(self.ln_wo_grad(x_BLC), scale, shift)


def sample_top_k_top_p(
    logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0, generator: rng.AnyGenerator = None
) -> torch.Tensor:
    """Sample one token per position -> idx_Bl. Does NOT modify ``logits_BlV`` (VAR's helper does).

    With :class:`~arsr.models.rng.RowGenerators` (one per batch row) row b's l tokens are drawn with
    generator b: the B*l draws are row-major, so chunk b of the flattened rows is image b.

    top_k keeps the k largest logits; top_p keeps the smallest set of the largest tokens whose
    probability reaches p (the largest is always kept). 0 disables either filter. Same distribution
    as VAR's helper, but the filters and the draw work on the k candidates only, not on all V.
    """
    B, l, V = logits_BlV.shape
    logits = logits_BlV.float().reshape(B * l, V)
    cand_idx = None  # candidates' vocabulary ids when filtered, [N,k] sorted by logit, descending
    if 0 < top_k < V:
        logits, cand_idx = logits.topk(top_k, dim=-1)
    if top_p > 0:
        if cand_idx is None:
            logits, cand_idx = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly larger candidates
        logits = logits.masked_fill(mass_before >= top_p, -torch.inf)
    pick_N1 = rng.multinomial(logits.softmax(dim=-1), 1, generator)  # [B*l,1], row-major: b, then l
    if cand_idx is not None:
        pick_N1 = cand_idx.gather(-1, pick_N1)
    return pick_N1.view(B, l)
