"""SRVAR: VAR's next-scale transformer conditioned on a low-resolution image.

The condition is ``lrf`` [B,Clr,h,w] (or flattened [B,h*w,Clr]) on the same h x w grid as the HR
tokens' last scale, with its own channel count ``lr_channels`` = Clr (the tokenizer says which,
arsr.models.residual.SRTokenizer.lr_features): the regression base's trunk features pooled to the grid
for the ``residual`` tokenizer, or (``hr`` tokenizer, VAR-compatible, Clr = Cv) the VQVAE latent of
the LR image bicubic-upsampled to HR size. Following Infinity's text conditioning (and the "SRVAR"
sketch in reference/var_srvar.md §2.3):

    lrf -> RMSNorm -> attentive pool (learned query)       -> sos = cond_BD [B,D] (start token, AdaLN)
        -> RMSNorm -> MLP (Clr -> D -> D, GELU tanh) + pos -> keys/values of a cross-attention per block

With ``lr_input`` (default on) the LR condition also enters every position's input directly: for
scale s, ``lrf`` area-downsampled to pn_s x pn_s, through a linear Clr -> C, is added to the token
embeddings (``lr_in``), so each token sees the LR content at its own location before any attention.
The token embedding (``word_embed``) and the refiner work in the tokenizer's Cv channels.

Every block is self-attention with AdaLN, then ``x + ca(ca_norm(x), kv) * ca_gamma``, then the FFN
with AdaLN. All LR grids have the same length, so the cross-attention is dense SDPA (no varlen
packing, no padding mask).

Deviations from the design note: (1) ``lr_input`` above: on the default run it raises the val
last-scale token accuracy from 7.5% to 33% at the same steps (cross-attention alone must first learn
where to look); (2) a learned position embedding ``lr_pos_embed`` [1,h*w,D] is added to
the cross-attention keys/values. Without it the LR tokens are an unordered set to the HR queries
(Infinity's text tokens get their order from T5), and super-resolution needs spatial alignment.

CFG: in training a sample's LR tokens are replaced by the learned ``cfg_uncond`` [h*w,Clr] with
probability ``cond_drop`` (training only); at inference the batch is doubled with ``cfg_uncond`` and
the logits mixed as (1+t) c - t u with t = cfg * si/(SN-1).

Optional refiner (``refiner=True``): a DiffLoss head on the last scale that predicts the continuous
residual the last scale's code misses; see :meth:`SRVAR.forward` and :func:`last_scale_residual`.

Decoding (:meth:`SRVAR.sample_fhat`, ``decode``): ``sample`` draws each token from the (guided)
logits at ``temperature`` with top-k / top-p; ``greedy`` takes the argmax; ``soft`` uses the expected
code embedding ``softmax(logits / temperature) @ codebook`` as the token's embedding, both in f_hat
and in the next scale's input (:class:`SoftCodes`). The refiner, when on, still samples its residual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Lt
from torch import nn

from arsr.models.diffloss import DiffLoss
from arsr.models.layers import AttentivePool, RMSNorm, sample_top_k_top_p
from arsr.models.rng import AnyGenerator
from arsr.models.var import (
    NextScaleAR,
    Picker,
    Quantizer,
    TokenizerVAE,
    ar_loss,
    read_var_state_dict,
    var_no_weight_decay,
)

Decode = Literal["sample", "greedy", "soft"]
DECODES: tuple[str, ...] = ("sample", "greedy", "soft")


def last_scale_residual(
    f_BChw: torch.Tensor,
    x_BLCv_wo_first_l: torch.Tensor,
    idx_last_Bl: torch.Tensor,
    vae: TokenizerVAE,
    SN: int,
) -> torch.Tensor:
    """r = f - f_hat [B,Cv,h,w], f_hat = scales 0..SN-2 from the teacher-forcing input plus the last
    scale's tokens ``idx_last_Bl`` [B,h*w] (phi included).

    The last teacher-forcing block is the cumulative f_hat of scales 0..SN-2 "area-downsampled" to
    the full grid, i.e. that f_hat itself. With ground-truth tokens this is the quantisation error
    (measure the refiner scale with it); with argmax predictions it is the refiner's target.
    """
    B, Cv, H, W = f_BChw.shape
    f_prev = x_BLCv_wo_first_l[:, -H * W :].transpose(1, 2).reshape(B, Cv, H, W).float()
    h_BChw = vae.quantize.embedding(idx_last_Bl.long()).transpose(1, 2).reshape(B, Cv, H, W)
    f_hat, _ = vae.quantize.get_next_autoregressive_input(SN - 1, SN, f_prev.clone(), h_BChw)
    return f_BChw.float() - f_hat


def token_picker(
    decode: str = "sample",
    top_k: int = 0,
    top_p: float = 0.0,
    temperature: float = 1.0,
    generator: AnyGenerator = None,
) -> Picker:
    """The picker of a hard decode: ``sample`` (top-k / top-p of logits / temperature; at temperature 1
    exactly VAR's sampler) or ``greedy`` (argmax). ``soft`` needs the AR loop's embeddings:
    :class:`SoftCodes`."""
    if decode == "greedy":
        return lambda si, logits_BlV: logits_BlV.argmax(-1)
    if decode != "sample":
        raise ValueError(f"decode: {decode!r} has no token picker (sample, greedy; soft: SoftCodes)")
    if temperature == 1.0:
        return NextScaleAR.sampler(top_k, top_p, generator)
    t = temperature
    return lambda si, logits_BlV: sample_top_k_top_p(logits_BlV.float() / t, top_k, top_p, generator)


class SoftCodes:
    """Soft decoding's view of the tokenizer (the ``quantize`` the AR loop reads, duck-typing
    arsr.models.var.Quantizer): each scale's token embedding is the expected code embedding
    ``softmax(logits / temperature) @ codebook`` [B,l,Cv] instead of the chosen code's row.

    :meth:`pick` (the loop's picker) computes that expectation and returns the argmax tokens (the
    record of the most likely codes); :meth:`embedding` then hands the expectation to the loop,
    which accumulates it into f_hat and the next scale's input exactly as it does a code row.
    """

    def __init__(self, vae: TokenizerVAE, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature: {temperature} must be > 0")
        self.quant: Quantizer = vae.quantize
        self.temperature = temperature
        self.h_BlCv: torch.Tensor | None = None  # the last picked scale's expected embedding

    @property
    def quantize(self) -> SoftCodes:
        """This object is both the VAE view and its quantizer (``vae.quantize`` is all the loop reads)."""
        return self

    def pick(self, si: int, logits_BlV: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits_BlV.device.type, enabled=False):  # fp32, as a code row would be
            probs_BlV = (logits_BlV.float() / self.temperature).softmax(-1)
            self.h_BlCv = probs_BlV @ self.quant.embedding.weight.float()
        return probs_BlV.argmax(-1)

    def embedding(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        """The expected embedding [B,l,Cv] of the scale :meth:`pick` just decided (``idx_Bl`` its argmax)."""
        if self.h_BlCv is None or self.h_BlCv.shape[:2] != idx_Bl.shape:
            raise RuntimeError("SoftCodes.embedding: call pick() on this scale's logits first")
        return self.h_BlCv

    def get_next_autoregressive_input(
        self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quant.get_next_autoregressive_input(si, SN, f_hat, h_BChw)


@dataclass(frozen=True)
class SRVARConfig:
    """SRVAR's hyperparameters: params.yaml's ``srvar.model`` (the defaults are the CPU default run's),
    stored in ``model.pt``. The tokenizer's facts (patch_nums, vocab_size, Cvae, lr_channels) are not
    hyperparameters: the constructor takes them from the token facts."""

    __pydantic_config__ = {"extra": "forbid"}  # params.yaml: an unknown key is an error

    depth: Annotated[int, Ge(1)] = 2  # transformer blocks (VAR-d16: 16)
    width: Annotated[int, Ge(0)] = 128  # 0 = 64 x depth (VAR's rule)
    heads: Annotated[int, Ge(0)] = 2  # 0 = depth (VAR's rule: head dim 64)
    mlp_ratio: Annotated[float, Gt(0)] = 4.0
    drop_path: Annotated[float, Ge(0), Lt(1)] = 0.0  # VAR: 0.1 x depth / 24
    attn_l2_norm: bool = True
    alng: Annotated[float, Gt(0)] = 1e-3  # AdaLN gamma init scale
    norm_eps: Annotated[float, Gt(0)] = 1e-6
    cond_drop: Annotated[float, Ge(0), Lt(1)] = 0.1  # per-sample LR-condition dropout (CFG)
    lr_input: bool = True  # the LR latent pyramid added to every position's input
    pool_head_dim: Annotated[int, Ge(1)] = 8  # attentive pool of the LR tokens
    refiner: bool = False  # diffusion head on the last scale
    refiner_width: Annotated[int, Ge(8)] = 128
    refiner_depth: Annotated[int, Ge(1)] = 2
    refiner_steps: str = "ddim10"  # respaced diffusion steps at inference
    refiner_batch_mul: Annotated[int, Ge(1)] = 4  # noise draws per token in training


class SRVAR(NextScaleAR):
    """LR-conditioned VAR. Inputs: ``lrf`` [B,Clr,h,w] or [B,h*w,Clr] with h = w = patch_nums[-1] and
    Clr = ``lr_channels`` (None: Cvae, the ``hr`` tokenizer's VQVAE latent of the LR, as VAR-SR)."""

    def __init__(
        self,
        config: SRVARConfig,
        patch_nums: Sequence[int],
        vocab_size: int,
        Cvae: int,
        lr_channels: int | None = None,
        refiner_scale: float = 1.0,
    ) -> None:
        c = self.config = config
        super().__init__(
            c.depth, patch_nums, vocab_size, Cvae, width=c.width, heads=c.heads, mlp_ratio=c.mlp_ratio,
            drop_path=c.drop_path, attn_l2_norm=c.attn_l2_norm, alng=c.alng, norm_eps=c.norm_eps,
            cond_drop=c.cond_drop, cross_attn=True,
        )  # fmt: skip
        # A finite "minus infinity" in the block-causal mask: any arithmetic over the state dict
        # (weight averaging, checkpoint checks for non-finite values) stays finite; -inf - -inf is NaN.
        # softmax gives exactly 0 either way.
        self.attn_bias_for_masking.clamp_(min=torch.finfo(torch.float32).min)
        C, D, self.lr_len = self.C, self.D, self.patch_nums[-1] ** 2
        Clr = self.lr_channels = Cvae if lr_channels is None else int(lr_channels)
        hd = c.pool_head_dim  # the LR pool has Clr / hd heads, each D / heads wide
        if Clr < 1 or Clr % hd or D % (Clr // hd):
            raise ValueError(
                f"lr_channels {Clr}: must be a multiple of pool_head_dim {hd} giving a head count that "
                f"divides the width {D}"
            )
        norm_eps = c.norm_eps
        # Learned "null LR" for CFG (Infinity's init: trunc-normal std 1.2 / sqrt(channels)).
        self.cfg_uncond = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(self.lr_len, Clr), std=1.2) / Clr**0.5
        )
        self.lr_norm = RMSNorm(Clr, eps=norm_eps)
        self.lr_pool = AttentivePool(Clr, D, head_dim=c.pool_head_dim)
        self.lr_proj = nn.Sequential(nn.Linear(Clr, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.lr_pos_embed = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(1, self.lr_len, D), std=(3 * C) ** -0.5)
        )
        self.lr_in = nn.Linear(Clr, C) if c.lr_input else None
        self.init_weights()  # before the refiner: DiffLoss initialises itself (MAR's init)

        self.has_refiner = c.refiner
        if c.refiner:
            self.refiner_norm = nn.LayerNorm(C, eps=norm_eps)
            self.refiner = DiffLoss(Cvae, C, c.refiner_depth, c.refiner_width, c.refiner_steps)
            # Targets are divided by this (std of the residual on training tokens); kept in the state dict.
            self.register_buffer("refiner_scale", torch.tensor(float(refiner_scale)))

    def model_config(self) -> dict[str, Any]:
        """``model.pt``'s config: ``SRVAR(SRVARConfig(**m.model_config()), <token facts>)`` rebuilds this
        architecture (the refiner's target scale is a buffer: it comes with the weights)."""
        return asdict(self.config)

    def no_weight_decay(self, name: str, param: torch.Tensor) -> bool:
        """VAR's rule, plus the whole refiner (MAR exempts its diffusion head the same way)."""
        return var_no_weight_decay(name, param) or name.startswith("refiner.")

    # ---- condition ------------------------------------------------------------------------------
    def _lr_tokens(self, lrf: torch.Tensor) -> torch.Tensor:
        """lrf [B,Clr,h,w] or [B,h*w,Clr] -> LR tokens lrf_BlClr [B,h*w,Clr] fp32."""
        if lrf.ndim == 4:  # [B,Clr,h,w] -> [B,h*w,Clr], row-major like the HR tokens
            lrf = lrf.flatten(2).transpose(1, 2)
        if lrf.shape[1:] != (self.lr_len, self.lr_channels):
            raise ValueError(
                f"lrf: expected [B,{self.lr_len},{self.lr_channels}] (or [B,{self.lr_channels},h,w]), "
                f"got {tuple(lrf.shape)}"
            )
        return lrf.float()

    def condition(self, lrf_BlClr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LR tokens [B,h*w,Clr] -> (cond_BD [B,D] for sos and AdaLN, kv_BLC [B,h*w,D] for
        cross-attention)."""
        with torch.autocast(lrf_BlClr.device.type, enabled=False):  # small; fp32 like Infinity's text path
            lr = self.lr_norm(lrf_BlClr.float())
            return self.lr_pool(lr), self.lr_proj(lr) + self.lr_pos_embed

    def lr_inputs(self, lrf_BlClr: torch.Tensor) -> torch.Tensor | None:
        """LR tokens [B,h*w,Clr] -> per-position input [B,L,C]: the LR grid area-downsampled to each
        scale (as the quantizer downsamples f), projected by ``lr_in``. None without ``lr_input``."""
        if self.lr_in is None:
            return None
        B, h = lrf_BlClr.shape[0], self.patch_nums[-1]
        with torch.autocast(lrf_BlClr.device.type, enabled=False):
            lr_BClrhw = lrf_BlClr.float().transpose(1, 2).reshape(B, self.lr_channels, h, h)
            pyramid_BLClr = torch.cat(
                [F.interpolate(lr_BClrhw, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)
                 for pn in self.patch_nums], dim=1,
            )  # fmt: skip
            return self.lr_in(pyramid_BLClr)

    # ---- training -------------------------------------------------------------------------------
    def forward(
        self,
        lrf: torch.Tensor,
        x_BLCv_wo_first_l: torch.Tensor,
        f_BChw: torch.Tensor | None = None,
        vae: TokenizerVAE | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced pass -> (logits_BLV fp32, diff_loss or None).

        lrf: [B,Clr,h,w] or [B,h*w,Clr]; x_BLCv_wo_first_l: [B,L-1,Cv] from ``vae.idxBl_to_var_input``
        (the tokenizer's VQVAE). With the refiner on, also
        pass the HR pre-quantisation latent ``f_BChw`` [B,Cv,h,w] and the (frozen) ``vae``; the
        refiner is trained on r = f - f_hat, with the argmax-predicted last-scale tokens in f_hat.
        Loss = CE + diff_weight * diff_loss (see :func:`srvar_loss`).
        """
        lrf_BlClr = self._lr_tokens(lrf)
        if self.training and self.cond_drop > 0:  # per-sample; where() keeps cfg_uncond on the graph (DDP)
            drop_B11 = torch.rand(lrf_BlClr.shape[0], 1, 1, device=lrf_BlClr.device) < self.cond_drop
            lrf_BlClr = torch.where(drop_B11, self.cfg_uncond, lrf_BlClr)
        cond_BD, kv_BLC = self.condition(lrf_BlClr)
        h_BLC = self.hidden_states(cond_BD, x_BLCv_wo_first_l, kv_BLC, self.lr_inputs(lrf_BlClr))
        logits_BLV = self.get_logits(h_BLC, cond_BD)
        if not self.has_refiner:
            return logits_BLV, None
        if f_BChw is None or vae is None:
            raise ValueError("SRVAR with refiner=True: forward needs f_BChw (HR latent) and vae")
        l = self.lr_len
        with torch.no_grad():
            idx_Bl = logits_BLV[:, -l:].argmax(-1)
            r_BChw = last_scale_residual(f_BChw, x_BLCv_wo_first_l, idx_Bl, vae, len(self.patch_nums))
            target_NC = (r_BChw / self.refiner_scale).flatten(2).transpose(1, 2).reshape(-1, self.Cvae)
        z_NC = self._refiner_cond(h_BLC[:, -l:], idx_Bl, vae).reshape(-1, self.C)
        mul = self.config.refiner_batch_mul  # each token seen with `mul` noise levels (MAR, VARSR)
        return logits_BLV, self.refiner(target_NC.repeat(mul, 1), z_NC.repeat(mul, 1))

    def _refiner_cond(self, h_BlC: torch.Tensor, idx_Bl: torch.Tensor, vae: TokenizerVAE) -> torch.Tensor:
        """Refiner condition: LN(last-scale hidden state + word embedding of the chosen code) [B,l,C]
        (with :class:`SoftCodes` as ``vae``: of the expected embedding that went into f_hat)."""
        return self.refiner_norm(h_BlC + self.word_embed(vae.quantize.embedding(idx_Bl).to(h_BlC.dtype)))

    # ---- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_fhat(
        self,
        lrf: torch.Tensor,
        vae: TokenizerVAE,
        cfg: float = 1.5,
        top_k: int = 0,
        top_p: float = 0.0,
        generator: AnyGenerator = None,
        use_cache: bool = True,
        pick: Picker | None = None,
        refine: bool = True,
        decode: Decode = "sample",
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """lrf [B,Clr,h,w] (or [B,h*w,Clr]) -> (f_hat [B,Cv,h,w], idx_Bl per scale [B,pn^2]).
        cfg = 0 skips the unconditional batch.

        ``decode`` (on the guided logits [B,l,V]): ``sample`` draws from logits / ``temperature``
        with ``top_k`` / ``top_p`` (the defaults are VAR's sampler); ``greedy`` takes the argmax;
        ``soft`` accumulates the expected code embedding softmax(logits / temperature) @ codebook
        (:class:`SoftCodes`; idx_Bl are then its argmax). top_k / top_p apply to ``sample`` only.
        ``pick`` replaces the decode (it gets the raw logits [nB,l,V], n = 2 when cfg != 0), e.g. to
        feed ground-truth tokens through the KV cache. With a refiner and ``refine``, the sampled
        residual (no CFG) times ``refiner_scale`` is added to f_hat.

        ``generator``: one for the batch, or :class:`~arsr.models.rng.RowGenerators` with one per row
        of lrf (row b's tokens and refiner noise from generator b: its sample does not depend on the
        other rows).
        """
        if decode not in DECODES:
            raise ValueError(f"decode: {decode!r} is not one of {', '.join(DECODES)}")
        if temperature <= 0:
            raise ValueError(f"temperature: {temperature} must be > 0")
        lrf_BlClr = self._lr_tokens(lrf)
        B = lrf_BlClr.shape[0]
        if cfg != 0:
            lrf_BlClr = torch.cat((lrf_BlClr, self.cfg_uncond.expand(B, -1, -1)))
        cond_BD, kv_BLC = self.condition(lrf_BlClr)
        codes: TokenizerVAE = vae  # what the AR loop embeds tokens with
        if pick is not None:
            guide = None
        elif decode == "soft":
            soft = SoftCodes(vae, temperature)
            codes, pick, guide = soft, soft.pick, cfg
        else:
            pick, guide = token_picker(decode, top_k, top_p, temperature, generator), cfg
        f_hat, idx_Bl_list, h_BlC = self.decode(
            cond_BD, codes, B, pick, kv_BLC, use_cache, guide, self.lr_inputs(lrf_BlClr)
        )
        if self.has_refiner and refine:
            # z_NC [B*l,C] row-major (image b's l tokens together): the noise chunks follow the images
            z_NC = self._refiner_cond(h_BlC[:B], idx_Bl_list[-1], codes).reshape(-1, self.C)
            r_NC = self.refiner.sample(z_NC, generator=generator).float() * self.refiner_scale
            f_hat = f_hat + r_NC.view(B, self.lr_len, self.Cvae).transpose(1, 2).reshape_as(f_hat)
        return f_hat, idx_Bl_list

    @torch.no_grad()
    def autoregressive_infer_cfg(
        self,
        lrf: torch.Tensor,
        vae: TokenizerVAE,
        cfg: float = 1.5,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | None = None,
        generator: AnyGenerator = None,
        use_cache: bool = True,
        refine: bool = True,
        decode: Decode = "sample",
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """VAR's API for an ``hr`` tokenizer: -> ``vae.fhat_to_img(f_hat)`` [B,3,H,W] in [0,1]. ``seed``
        makes a fresh generator. (A residual tokenizer also needs the LR to decode: sample f_hat with
        :meth:`sample_fhat` and decode with ``SRTokenizer.fhat_to_img``, as the SRVAR upscaler does.)"""
        if seed is not None:
            generator = torch.Generator(lrf.device).manual_seed(seed)
        f_hat, _ = self.sample_fhat(
            lrf, vae, cfg, top_k, top_p, generator, use_cache, refine=refine, decode=decode,
            temperature=temperature,
        )  # fmt: skip
        return vae.fhat_to_img(f_hat).clamp(-1, 1).add(1).mul(0.5)


def srvar_loss(
    logits_BLV: torch.Tensor,
    gt_BL: torch.Tensor,
    diff_loss: torch.Tensor | None,
    last_l: int,
    label_smoothing: float = 0.0,
    diff_weight: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training loss CE + diff_weight * diff_loss, and the metrics Lm, Lt, Accm, Acct (+ diff_loss)."""
    loss, metrics = ar_loss(logits_BLV, gt_BL, last_l, label_smoothing)
    if diff_loss is not None:
        loss = loss + diff_weight * diff_loss
        metrics["diff_loss"] = diff_loss.detach()
    return loss, metrics


@dataclass
class InitReport:
    """What :func:`init_from` did: parameter names loaded / left at their init / checkpoint keys unused."""

    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "key: reason"

    def summary(self) -> str:
        return f"{len(self.loaded)} loaded, {len(self.new)} new, {len(self.skipped)} skipped"


def init_from(model: SRVAR, path: str | Path) -> InitReport:
    """Start SRVAR from an official class-conditional VAR checkpoint: load every parameter whose name
    and shape match (blocks' self-attention, FFN and AdaLN, embeddings, head); everything else keeps
    its init. Buffers (masks, level ids) are derived from the architecture and never loaded."""
    sd = read_var_state_dict(path)
    params = dict(model.named_parameters())
    report, take = InitReport(), {}
    for k, v in sd.items():
        if k not in params:
            report.skipped.append(f"{k}: {'buffer (derived)' if k in model.state_dict() else 'not in SRVAR'}")
        elif v.shape != params[k].shape:
            report.skipped.append(f"{k}: shape {tuple(v.shape)} != {tuple(params[k].shape)}")
        else:
            take[k] = v
    model.load_state_dict(take, strict=False)
    report.loaded = sorted(take)
    report.new = sorted(k for k in params if k not in take)
    return report


__all__ = [
    "DECODES",
    "SRVAR",
    "Decode",
    "InitReport",
    "SRVARConfig",
    "SoftCodes",
    "init_from",
    "last_scale_residual",
    "srvar_loss",
    "token_picker",
]
