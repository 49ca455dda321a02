"""VAR: next-scale autoregressive transformer (Tian et al. 2024, FoundationVision/VAR), class mode.

An image is a pyramid of token maps (``patch_nums``, e.g. 1,2,3,...,16); the model predicts all
tokens of scale s+1 at once from scales 0..s. The sequence holds L = sum(pn^2) positions: a start
token (the condition) and the L-1 teacher-forcing inputs, each the cumulative VAE reconstruction
of earlier scales area-downsampled to the next grid (``vae.quantize.idxBl_to_var_input``).
Attention is block-causal (a query sees its own scale and every earlier one); at inference the
KV cache makes the mask unnecessary.

``NextScaleAR`` holds everything the class-conditional ``VAR`` and the LR-conditioned ``SRVAR``
(srvar.py) share. The VQVAE is never a submodule: it is passed to the methods that need it.

Deliberate difference from the reference: the condition dropout for CFG is applied only in
training. VAR also drops 10% of labels in eval, which makes its validation loss noisy.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from arsr.models.layers import AdaLNBeforeHead, AdaLNSelfAttn, AttnPlan, CrossAttnBlock, sample_top_k_top_p
from arsr.models.rng import AnyGenerator

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR's 256 px pyramid, L = 680

# VAR's rule: no weight decay on 1-D params, biases, and names containing any of these.
NO_DECAY_KEYS = (
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
    "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
)  # fmt: skip

# pick(si, logits) -> idx_Bl [B,l]: chooses scale si's tokens (see NextScaleAR.decode for the logits).
Picker = Callable[[int, torch.Tensor], torch.Tensor]


class Quantizer(Protocol):
    """What the AR loop needs from the VQVAE's multi-scale quantizer (arsr.models.quant)."""

    embedding: nn.Embedding

    def get_next_autoregressive_input(
        self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class TokenizerVAE(Protocol):
    quantize: Quantizer

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor: ...


def var_no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """VAR's no-decay rule. Note that ``class_emb`` and ``word_embed`` weights ARE decayed."""
    return param.ndim <= 1 or name.endswith("bias") or any(k in name for k in NO_DECAY_KEYS)


def cfg_mix(x_2BlC: torch.Tensor, t: float) -> torch.Tensor:
    """Classifier-free guidance: (1+t) * cond - t * uncond (conditional half first) -> [B,l,C]."""
    cond, uncond = x_2BlC.chunk(2)
    return torch.lerp(uncond, cond, 1 + t)  # = uncond + (1+t)(cond - uncond), one pass


def ar_loss(
    logits_BLV: torch.Tensor, gt_BL: torch.Tensor, last_l: int, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training CE (mean over tokens) and VAR's metrics as detached 0-d tensors.

    Lm / Accm: CE without smoothing / top-1 accuracy (%) over all L tokens; Lt / Acct: the same over
    the last scale's ``last_l`` tokens.
    """
    V = logits_BLV.shape[-1]
    flat, tgt = logits_BLV.reshape(-1, V), gt_BL.reshape(-1)
    ce_BL = F.cross_entropy(flat, tgt, reduction="none").view_as(gt_BL)
    ls = label_smoothing
    loss = ce_BL.mean() if ls == 0 else F.cross_entropy(flat, tgt, label_smoothing=ls)
    with torch.no_grad():
        ce_BL = ce_BL.detach()
        hit_BL = (logits_BLV.detach().argmax(-1) == gt_BL).float() * 100
        metrics = {
            "Lm": ce_BL.mean(),
            "Lt": ce_BL[:, -last_l:].mean(),
            "Accm": hit_BL.mean(),
            "Acct": hit_BL[:, -last_l:].mean(),
        }
    return loss, metrics


class NextScaleAR(nn.Module):
    """Embeddings, block stack, head, init, teacher-forced pass and KV-cached decoding loop.

    Subclasses provide the condition ``cond_BD`` [B,D] (the start token and the AdaLN condition);
    ``cross_attn=True`` adds cross-attention to a [B,Lk,C] key/value set per block.
    """

    def __init__(
        self,
        depth: int,
        patch_nums: Sequence[int],
        vocab_size: int,
        Cvae: int,
        width: int = 0,
        heads: int = 0,
        mlp_ratio: float = 4.0,
        drop_path: float | None = None,
        attn_l2_norm: bool = True,
        alng: float = 1e-5,
        norm_eps: float = 1e-6,
        cond_drop: float = 0.1,
        cross_attn: bool = False,
    ) -> None:
        super().__init__()
        # VAR's scaling rule: width 64*depth, head_dim 64, stochastic depth 0.1*depth/24.
        self.depth, self.C = depth, width or 64 * depth
        self.D, self.num_heads = self.C, heads or depth
        self.patch_nums = tuple(patch_nums)
        self.V, self.Cvae, self.alng, self.cond_drop = vocab_size, Cvae, alng, cond_drop
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        ends = [sum(pn * pn for pn in self.patch_nums[: i + 1]) for i in range(len(self.patch_nums))]
        self.begin_ends = list(zip([0] + ends[:-1], ends))
        C, init_std = self.C, math.sqrt(1 / (3 * self.C))

        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))  # absolute position of every token
        nn.init.trunc_normal_(self.pos_start, std=init_std)
        nn.init.trunc_normal_(self.pos_1LC, std=init_std)
        # Scale id of each position; block-causal mask: query sees key iff level(q) >= level(k).
        lvl_L = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)])
        self.register_buffer("lvl_1L", lvl_L[None].clone())
        mask_LL = torch.where(lvl_L[:, None] >= lvl_L[None, :], 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", mask_LL.view(1, 1, self.L, self.L).contiguous())

        self.word_embed = nn.Linear(Cvae, C)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        dp = 0.1 * depth / 24 if drop_path is None else drop_path
        block_cls = CrossAttnBlock if cross_attn else AdaLNSelfAttn
        self.blocks = nn.ModuleList(
            block_cls(
                C,
                self.D,
                self.num_heads,
                mlp_ratio=mlp_ratio,
                drop_path=dp * i / max(depth - 1, 1),
                attn_l2_norm=attn_l2_norm,
                norm_eps=norm_eps,
            )
            for i in range(depth)
        )
        self.head_nm = AdaLNBeforeHead(C, self.D, norm_eps)
        self.head = nn.Linear(C, vocab_size)

    @torch.no_grad()
    def init_weights(self, aln: float = 0.5, head: float = 0.02) -> None:
        """VAR's init (call after building every submodule it should cover).

        Trunc-normal std sqrt(1/(3C)) on all Linear/Embedding, zero biases; head weight x ``head``;
        AdaLN scale/shift rows x ``aln``, gamma rows x ``alng``; attn.proj / ffn.fc2 (and ca.proj)
        weights / sqrt(2 depth).
        """
        init_std = math.sqrt(1 / (3 * self.C))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.fill_(1.0)
                m.bias.zero_()
        self.head.weight.mul_(head)
        self.head_nm.ada_lin[-1].weight.mul_(aln)
        C, div = self.C, math.sqrt(2 * self.depth)
        for b in self.blocks:
            b.attn.proj.weight.div_(div)
            b.ffn.fc2.weight.div_(div)
            if isinstance(b, CrossAttnBlock):
                b.ca.proj.weight.div_(div)
            # rows: [gamma1, gamma2 | scale1, scale2, shift1, shift2]
            b.ada_lin[-1].weight[2 * C :].mul_(aln)
            b.ada_lin[-1].weight[: 2 * C].mul_(self.alng)

    def no_weight_decay(self, name: str, param: torch.Tensor) -> bool:
        """True for parameters AdamW must not decay (VAR's rule)."""
        return var_no_weight_decay(name, param)

    # ---- transformer passes -------------------------------------------------------------------
    def attn_plan(self, n_scales: int | None = None) -> AttnPlan:
        """Block-causal attention over the first ``n_scales`` scales (default all), in three query
        groups: the last scale and the one before it each see every earlier key (no mask), all
        earlier scales share the masked group. Skipping the keys a group never sees saves about a
        third of the attention work at L = 680 (and lets unmasked groups use flash kernels)."""
        n = n_scales or len(self.patch_nums)
        begins = [bg for bg, _ in self.begin_ends[:n]]
        cuts = sorted({0, begins[max(n - 2, 0)], begins[n - 1], self.begin_ends[n - 1][1]})
        plan: AttnPlan = []
        for a, b in zip(cuts, cuts[1:]):
            one_scale = (a, b) in self.begin_ends
            plan.append((a, b, None if one_scale else self.attn_bias_for_masking[:, :, a:b, :b]))
        return plan

    def _blocks(
        self,
        x_BLC: torch.Tensor,
        cond: torch.Tensor,
        plan: AttnPlan | None,
        kv_BLC: torch.Tensor | None,
    ) -> torch.Tensor:
        device = x_BLC.device.type
        if torch.is_autocast_enabled(device):  # residual stream in the AMP dtype, as VAR runs it
            dtype = torch.get_autocast_dtype(device)
            x_BLC, cond = x_BLC.to(dtype), cond.to(dtype)
        for b in self.blocks:
            x_BLC = b(x_BLC, cond, plan) if kv_BLC is None else b(x_BLC, cond, plan, kv_BLC)
        return x_BLC

    def get_logits(
        self, h_BLC: torch.Tensor, cond_BD: torch.Tensor, cfg_t: float | None = None
    ) -> torch.Tensor:
        """Head in fp32 even under autocast -> logits [B,L,V].

        With ``cfg_t`` the rows are [cond; uncond] and the result is the guided logits
        (1+t) cond - t uncond [B/2,L,V]. The head is affine, so mixing its input instead of its
        output gives the same logits for half the largest matmul of a decoding step.
        """
        with torch.autocast(h_BLC.device.type, enabled=False):
            x_BLC = self.head_nm(h_BLC.float(), cond_BD.float())
            return self.head(x_BLC if cfg_t is None else cfg_mix(x_BLC, cfg_t))

    def hidden_states(
        self,
        cond_BD: torch.Tensor,
        x_BLCv_wo_first_l: torch.Tensor,
        kv_BLC: torch.Tensor | None = None,
        in_BLC: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced pass over all L positions -> last block's output h_BLC [B,L,C].

        ``in_BLC`` [B,L,C] (optional) is added to the input embedding of every position (SRVAR's
        aligned LR input)."""
        B = x_BLCv_wo_first_l.shape[0]
        with torch.autocast(x_BLCv_wo_first_l.device.type, enabled=False):  # embeddings in fp32, as VAR
            sos_BlC = cond_BD.float()[:, None].expand(B, self.first_l, -1) + self.pos_start
            x_BLC = torch.cat((sos_BlC, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
            x_BLC = x_BLC + self.lvl_embed(self.lvl_1L) + self.pos_1LC
            if in_BLC is not None:
                x_BLC = x_BLC + in_BLC.float()
        return self._blocks(x_BLC, cond_BD.float(), self.attn_plan(), kv_BLC)

    def _kv_caching(self, enable: bool) -> None:
        for b in self.blocks:
            b.attn.kv_caching(enable)
            if isinstance(b, CrossAttnBlock):
                b.ca.kv_caching(enable)

    @staticmethod
    def sampler(top_k: int = 0, top_p: float = 0.0, generator: AnyGenerator = None) -> Picker:
        """The default picker: top-k / top-p sampling of the (guided) logits."""
        return lambda si, logits_BlV: sample_top_k_top_p(logits_BlV, top_k, top_p, generator)

    @torch.no_grad()
    def decode(
        self,
        cond_BD: torch.Tensor,
        vae: TokenizerVAE,
        B: int,
        pick: Picker,
        kv_BLC: torch.Tensor | None = None,
        use_cache: bool = True,
        cfg: float | None = None,
        in_BLC: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Generate scale by scale -> (f_hat_BChw, idx_Bl per scale, last scale's hidden states [nB,l,C]).

        cond_BD [nB,D] (start token and AdaLN condition) and kv_BLC hold nB = B rows, or 2B with the
        unconditional half second (CFG). ``pick(si, logits)`` returns scale si's tokens [B,l]; it
        gets the guided logits [B,l,V] with t = cfg * si/(SN-1) (no guidance at scale 0) when
        ``cfg`` is given, else the raw logits [nB,l,V]. With ``use_cache`` each step feeds only the
        new scale (no mask needed); without it the whole prefix is recomputed under the block-causal
        mask (same numbers).
        ``in_BLC`` [nB,L,C] is added to every position's input, as in :meth:`hidden_states`.
        """
        quant, SN, pn_last = vae.quantize, len(self.patch_nums), self.patch_nums[-1]
        nB, rep = cond_BD.shape[0], cond_BD.shape[0] // B
        fp32 = torch.autocast(cond_BD.device.type, enabled=False)  # embeddings in fp32, as in hidden_states
        with fp32:
            lvl_pos_1LC = self.lvl_embed(self.lvl_1L) + self.pos_1LC
            if in_BLC is not None:  # [nB,L,C]: broadcasts like lvl_pos_1LC, row for row
                lvl_pos_1LC = lvl_pos_1LC + in_BLC.float()
            cond = cond_BD.float()
            sos_BlC = cond[:, None].expand(nB, self.first_l, -1) + self.pos_start
            next_BlC = sos_BlC + lvl_pos_1LC[:, : self.first_l]
        f_hat = cond_BD.new_zeros(B, self.Cvae, pn_last, pn_last)
        idx_Bl_list: list[torch.Tensor] = []
        prefix: list[torch.Tensor] = []
        self._kv_caching(use_cache)
        try:
            for si, (pn, (bg, _)) in enumerate(zip(self.patch_nums, self.begin_ends)):
                if use_cache:
                    h_BlC = self._blocks(next_BlC, cond, None, kv_BLC)
                else:
                    prefix.append(next_BlC)
                    plan = self.attn_plan(si + 1)
                    h_BlC = self._blocks(torch.cat(prefix, dim=1), cond, plan, kv_BLC)[:, bg:]
                t = None if cfg is None or nB == B else cfg * si / max(SN - 1, 1)
                idx_Bl = pick(si, self.get_logits(h_BlC, cond_BD, t))
                idx_Bl_list.append(idx_Bl)
                h_BChw = quant.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
                f_hat, next_BChw = quant.get_next_autoregressive_input(si, SN, f_hat, h_BChw)
                if si + 1 < SN:  # next input: cumulative reconstruction on the next grid
                    nbg, ned = self.begin_ends[si + 1]
                    with fp32:
                        next_BlC = self.word_embed(next_BChw.flatten(2).transpose(1, 2).float())
                    next_BlC = next_BlC.repeat(rep, 1, 1) + lvl_pos_1LC[:, nbg:ned]
        finally:
            self._kv_caching(False)
        return f_hat, idx_Bl_list, h_BlC


class VAR(NextScaleAR):
    """Class-conditional VAR. ``VAR(depth=16)`` has exactly the state dict of the official var_d16.pth.

    Defaults follow VAR's build: width 64*depth, heads = depth, mlp 4, drop_path 0.1*depth/24,
    cond_drop 0.1 (training only), attn_l2_norm, 1000 classes (+1 unconditional).
    """

    def __init__(
        self,
        depth: int = 16,
        num_classes: int = 1000,
        patch_nums: Sequence[int] = PATCH_NUMS_256,
        vocab_size: int = 4096,
        Cvae: int = 32,
        **kw: Any,
    ) -> None:
        super().__init__(depth, patch_nums, vocab_size, Cvae, **kw)
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(num_classes + 1, self.C)  # row num_classes = unconditional
        self.init_weights()

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """label_B [B] int64, x_BLCv_wo_first_l [B,L-1,Cv] teacher-forcing input -> logits [B,L,V] fp32."""
        if self.training and self.cond_drop > 0:  # per-sample label dropout for CFG
            drop_B = torch.rand(label_B.shape[0], device=label_B.device) < self.cond_drop
            label_B = torch.where(drop_B, self.num_classes, label_B)
        cond_BD = self.class_emb(label_B)
        return self.get_logits(self.hidden_states(cond_BD, x_BLCv_wo_first_l), cond_BD)

    @torch.no_grad()
    def sample_fhat(
        self,
        label_B: torch.Tensor,
        vae: TokenizerVAE,
        cfg: float = 1.5,
        top_k: int = 0,
        top_p: float = 0.0,
        generator: AnyGenerator = None,
        use_cache: bool = True,
        pick: Picker | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """label_B [B] (negative = unconditional) -> (f_hat [B,Cv,h,w], idx_Bl per scale).

        cfg = 0 runs only the conditional batch (identical to guidance with t = 0, half the work).
        ``pick`` replaces the sampler; it then gets the raw logits [nB,l,V] (n = 2 when cfg != 0).
        """
        B = label_B.shape[0]
        label_B = torch.where(label_B < 0, self.num_classes, label_B)
        if cfg != 0:
            label_B = torch.cat((label_B, torch.full_like(label_B, self.num_classes)))
        cond_BD = self.class_emb(label_B)
        if pick is None:
            pick, guide = self.sampler(top_k, top_p, generator), cfg
        else:
            guide = None
        f_hat, idx_Bl_list, _ = self.decode(cond_BD, vae, B, pick, use_cache=use_cache, cfg=guide)
        return f_hat, idx_Bl_list

    @torch.no_grad()
    def autoregressive_infer_cfg(
        self,
        label_B: torch.Tensor,
        vae: TokenizerVAE,
        cfg: float = 1.5,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | None = None,
        generator: AnyGenerator = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample images [B,3,H,W] in [0,1]. ``seed`` makes a fresh generator (same seed, same image)."""
        if seed is not None:
            generator = torch.Generator(label_B.device).manual_seed(seed)
        f_hat, _ = self.sample_fhat(label_B, vae, cfg, top_k, top_p, generator, use_cache)
        return vae.fhat_to_img(f_hat).clamp(-1, 1).add(1).mul(0.5)


# ---- official checkpoints -----------------------------------------------------------------------
def read_var_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official VAR checkpoint (a plain state dict, or a trainer checkpoint holding
    ``trainer.var_wo_ddp``) with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such VAR checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # trainer ckpts store their args
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a loadable torch checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict) and isinstance(obj.get("trainer"), dict) and "var_wo_ddp" in obj["trainer"]:
        obj = obj["trainer"]["var_wo_ddp"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a VAR state dict (expected a mapping of names to tensors)")
    return obj


def load_official(path: str | Path, model: VAR | None = None) -> VAR:
    """Load an official class-conditional VAR checkpoint strictly (e.g. var_d16.pth).

    Without ``model`` a ``VAR(depth=n)`` with the 256 px pyramid is built, n read from the file.
    """
    sd = read_var_state_dict(path)
    if model is None:
        depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
        if depth == 0:
            raise ValueError(f"{path}: no transformer blocks found; not a VAR checkpoint")
        model = VAR(depth=depth)
    mine = model.state_dict()
    bad = [k for k in sd if k in mine and sd[k].shape != mine[k].shape]
    missing, unexpected = sorted(set(mine) - set(sd)), sorted(set(sd) - set(mine))
    if bad or missing or unexpected:
        raise ValueError(
            f"{path}: does not match VAR(depth={model.depth}): shape mismatch {bad[:5]}, "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(sd, strict=True)
    return model
