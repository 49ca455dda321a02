"""VAR's multi-scale VQVAE: the tokenizer every stage shares.

image x_B3HW in [-1, 1]  --Encoder-->  [B, z, h, w]  --quant_conv-->  f_BChw   (h = H / 2^(levels-1))
f_BChw  --MultiScaleQuantizer-->  SN token maps idx_Bl [B, pn*pn]  and  f_hat_BChw
f_hat   --post_quant_conv--> --Decoder-->  rec_B3HW (clamped to [-1, 1] outside training)

The encoder/decoder are the SD/LDM ones VAR uses: GroupNorm(32, eps 1e-6) + SiLU, ResnetBlocks
(2 per level down, 3 up), single-head attention at the lowest resolution and in the middle,
pad-(0,1,0,1) stride-2 conv to go down, nearest x2 + conv to go up. ``VQVAE(VAR_VQVAE)`` has
exactly the state dict of VAR's ``vae_ch160v4096z32.pth`` (108,989,315 numbers incl. the usage buffer),
so :func:`load_official` loads it strictly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from annotated_types import Ge, Gt, Lt

from arsr.models.quant import MultiScaleQuantizer, autocast_off

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@dataclass(frozen=True)
class VQVAEConfig:
    """The tokenizer's architecture: params.yaml's ``vqvae.model`` (the defaults are the CPU default
    run's; :data:`VAR_VQVAE` is VAR's official one), stored in ``model.pt``."""

    __pydantic_config__ = {"extra": "forbid"}  # params.yaml: an unknown key is an error

    vocab_size: Annotated[int, Ge(2)] = 512  # codebook size V
    z_channels: Annotated[int, Ge(1)] = 32  # Cvae, the latent width
    ch: Annotated[int, Ge(8)] = 16  # base channels
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)  # one level per entry: downsample 2^(levels-1)
    num_res_blocks: Annotated[int, Ge(1)] = 2
    dropout: Annotated[float, Ge(0), Lt(1)] = 0.0
    beta: Annotated[float, Gt(0)] = 0.25  # commitment weight of the VQ loss
    quant_resi: float = 0.5  # phi(h) = (1 - r) h + r conv(h)
    share_quant_resi: Annotated[int, Ge(0)] = 4  # phi convs shared across scales
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8)  # token-map sides, coarse to fine
    # A linear path beside the deep encoder/decoder: each downsample x downsample patch <-> one latent
    # vector by a 1x1 map (PCA-initialised from data by train_vqvae). Not in VAR (False for its
    # weights); what lets a tokenizer of small, noise-like residual images learn (see train_vqvae).
    linear_path: bool = True

    def __post_init__(self) -> None:
        v = self.patch_nums
        if not v or v[0] < 1 or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"patch_nums: {list(v)} must be strictly increasing positive integers")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult: {list(self.ch_mult)} must be a non-empty list of positive integers")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


# VAR's vae_ch160v4096z32.pth (16x downsample, 256 px -> 16x16, L = 680 tokens).
VAR_VQVAE = VQVAEConfig(
    vocab_size=4096, ch=160, ch_mult=(1, 1, 2, 2, 4), patch_nums=VAR_PATCH_NUMS, linear_path=False
)


def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-6) as in VAR at its widths (ch 160: 5 to 20 channels per group).

    Narrow CPU widths keep at least 4 channels per group (LDM's ratio at ch 128): with one channel
    per group, GroupNorm is an instance norm that erases each channel's per-image mean and contrast
    at every block, and a ch-16 model then needs ~3x more steps to reach the same reconstruction.
    Only the group count changes; the parameters (and the official state dict) do not.
    """
    groups = max(g for g in range(1, 33) if channels % g == 0 and (g == 1 or channels // g >= 4))
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions (1x1 convs for qkv and the output)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # [B, HW, C]
        h_BLC = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(h_BLC.transpose(1, 2).reshape(B, C, H, W))


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: H -> H/2 exactly


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution: ``n`` ResnetBlocks (each followed by attention when ``attn``), then an optional
    resample stored as ``downsample`` or ``upsample`` (the official key names)."""

    def __init__(self, in_ch: int, out_ch: int, n: int, attn: bool, resample: str | None, dropout: float):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, dropout) for i in range(n)
        )
        self.attn = nn.ModuleList(AttnBlock(out_ch) for _ in range(n)) if attn else nn.ModuleList()
        self.resample_name = resample
        if resample == "downsample":
            self.downsample = Downsample2x(out_ch)
        elif resample == "upsample":
            self.upsample = Upsample2x(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return getattr(self, self.resample_name)(x) if self.resample_name else x


class Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """[B, 3, H, W] -> [B, z_channels, H/d, W/d], d = 2^(len(ch_mult)-1)."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, dropout: float):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        last = len(ch_mult) - 1
        self.down = nn.ModuleList()
        in_ch = ch
        for i, m in enumerate(ch_mult):
            resample = None if i == last else "downsample"
            self.down.append(Level(in_ch, ch * m, num_res_blocks, i == last, resample, dropout))
            in_ch = ch * m
        self.mid = Mid(in_ch, dropout)
        self.norm_out = Normalize(in_ch)
        self.conv_out = nn.Conv2d(in_ch, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """[B, z_channels, h, w] -> [B, 3, h*d, w*d]. ``up[i]`` is level i (0 = full resolution), run from
    the last level to the first, as in VAR/LDM (so the keys match)."""

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, dropout: float):
        super().__init__()
        last = len(ch_mult) - 1
        in_ch = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, in_ch, 3, padding=1)
        self.mid = Mid(in_ch, dropout)
        up: list[Level] = []
        for i in reversed(range(len(ch_mult))):
            resample = None if i == 0 else "upsample"
            up.insert(0, Level(in_ch, ch * ch_mult[i], num_res_blocks + 1, i == last, resample, dropout))
            in_ch = ch * ch_mult[i]
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(in_ch)
        self.conv_out = nn.Conv2d(in_ch, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQVAE(nn.Module):
    """VAR's multi-scale VQVAE. Images are RGB in [-1, 1] (``x * 2 - 1`` of [0, 1] pixels).

    ``VQVAE(VAR_VQVAE)`` is the official ``vae_ch160v4096z32.pth`` layout. ``L``, ``first_l`` and the
    latent grid all derive from ``patch_nums``.
    """

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        c = self.config = config
        self.V, self.Cvae = c.vocab_size, c.z_channels
        self.patch_nums: tuple[int, ...] = tuple(int(pn) for pn in c.patch_nums)
        self.downsample = c.downsample
        z = c.z_channels
        self.encoder = Encoder(c.ch, c.ch_mult, c.num_res_blocks, z, c.dropout)
        self.decoder = Decoder(c.ch, c.ch_mult, c.num_res_blocks, z, c.dropout)
        self.quantize = MultiScaleQuantizer(
            c.vocab_size, z, self.patch_nums, c.beta, c.quant_resi, c.share_quant_resi
        )
        self.quant_conv = nn.Conv2d(z, z, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(z, z, 3, padding=1)
        if c.linear_path:
            P = self.downsample
            self.enc_lin = nn.Conv2d(3 * P * P, z, 1, bias=False)  # [B, 3P^2, h, w] -> [B, z, h, w]
            self.dec_lin = nn.Conv2d(z, 3 * P * P, 1, bias=False)

    # ---- sizes ----------------------------------------------------------------------
    @property
    def L(self) -> int:
        """Tokens per image: sum of pn^2 (680 for VAR's patch_nums, 155 for 1..6,8)."""
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def first_l(self) -> int:
        """Tokens of the first scale (the SOS position of VAR)."""
        return self.patch_nums[0] ** 2

    @property
    def SN(self) -> int:
        return len(self.patch_nums)

    def model_config(self) -> dict[str, Any]:
        """``model.pt``'s config: ``VQVAE(VQVAEConfig(**vae.model_config()))`` rebuilds this architecture."""
        return asdict(self.config)

    def freeze(self) -> VQVAE:
        """Eval mode, no grads: how every stage but ``train_vqvae`` uses the tokenizer."""
        self.eval().requires_grad_(False)
        return self

    # ---- training ---------------------------------------------------------------------
    def forward(
        self, x_B3HW: torch.Tensor, token_dropout: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: ``(rec_B3HW unclamped, vq_loss scalar, usage_S [SN] in [0, 1])``.

        The encoder/decoder follow the caller's autocast; the quantizer is always fp32. The
        reconstruction's gradient reaches the encoder through the straight-through estimator.
        ``token_dropout``: the fraction of tokens (every scale) the decoder sees replaced by random
        codes (torch's global RNG), so that it learns to decode wrong tokens gracefully; the
        gradient still flows as if the true tokens were decoded."""
        f_BChw = self._encode(x_B3HW)
        f_hat, vq_loss, usage_S = self.quantize(f_BChw)
        if token_dropout > 0:
            with torch.no_grad():
                idx_Bl = self.quantize.f_to_idxBl(f_BChw.detach())
                noisy = []
                for idx in idx_Bl:
                    swap = torch.rand(idx.shape, device=idx.device) < token_dropout
                    noisy.append(torch.where(swap, torch.randint_like(idx, self.V), idx))
                f_drop = self.quantize.idxBl_to_fhat(noisy)
            f_hat = f_hat + (f_drop - f_hat).detach()
        return self.decode(f_hat), vq_loss, usage_S

    def _encode(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        f_BChw = self.quant_conv(self.encoder(x_B3HW))
        if self.config.linear_path:
            f_BChw = f_BChw + self.enc_lin(F.pixel_unshuffle(x_B3HW, self.downsample))
        return f_BChw

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat [B, Cvae, h, w] -> image [B, 3, H, W], unclamped (follows the caller's autocast)."""
        out = self.decoder(self.post_quant_conv(f_hat))
        if self.config.linear_path:
            out = out + F.pixel_shuffle(self.dec_lin(f_hat), self.downsample)
        return out

    @torch.no_grad()
    def init_linear_path(self, x_B3HW: torch.Tensor) -> None:
        """PCA-initialise the linear path on sample images and zero the deep paths' last layers, so
        training starts from the best linear patch code (an optimal linear autoencoder of
        downsample x downsample patches, Cvae components) and the deep layers learn the rest.
        ``x_B3HW``: a few hundred training inputs (for a residual tokenizer: normalised residuals)."""
        if not self.config.linear_path:
            raise ValueError("init_linear_path: the config has linear_path false")
        P, z = self.downsample, self.Cvae
        patches_NK = F.pixel_unshuffle(x_B3HW.float(), P).permute(0, 2, 3, 1).reshape(-1, 3 * P * P)
        if z > 3 * P * P:
            raise ValueError(f"linear_path: a {P}x{P} patch has {3 * P * P} values < z_channels {z}")
        _, _, V_KK = torch.linalg.svd(patches_NK, full_matrices=False)  # rows: principal directions
        W_zK = V_KK[:z]
        self.enc_lin.weight.copy_(W_zK[:, :, None, None])
        self.dec_lin.weight.copy_(W_zK.T[:, :, None, None])
        for conv in (self.quant_conv, self.decoder.conv_out):
            conv.weight.zero_()
            conv.bias.zero_()

    @torch.no_grad()
    def restart_dead_codes(
        self, x_B3HW: torch.Tensor, generator: torch.Generator, threshold: float = 0.03
    ) -> torch.Tensor:
        """Re-seed dead codes from this batch's residual vectors; returns the restarted indices [n].
        See :meth:`MultiScaleQuantizer.restart_dead_codes`."""
        return self.quantize.restart_dead_codes(self.img_to_f(x_B3HW), generator, threshold)

    # ---- tokenizer API (fp32, autocast off) ---------------------------------------------
    def img_to_f(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Pre-quantization latent ``f = quant_conv(encoder(x))`` [B, Cvae, h, w] fp32."""
        with autocast_off(x_B3HW.device):
            return self._encode(x_B3HW.float())

    @torch.no_grad()
    def img_to_idxBl(self, x_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Image -> SN LongTensors [B, pn*pn] (``torch.cat(.., 1)`` gives [B, L])."""
        return self.quantize.f_to_idxBl(self.img_to_f(x_B3HW))

    def f_to_idxBl(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        return self.quantize.f_to_idxBl(f_BChw)

    def f_to_fhat(self, f_BChw: torch.Tensor) -> torch.Tensor:
        """Quantized latent f_hat [B, Cvae, h, w]."""
        return self.quantize.f_to_fhat(f_BChw)

    def idxBl_to_var_input(self, ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input ``x_BLCv_wo_first_l`` [B, L - first_l, Cvae] fp32."""
        return self.quantize.idxBl_to_var_input(ms_idx_Bl)

    def get_next_autoregressive_input(
        self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f_hat [B,C,h,w], next_BChw [B,C,pn_next,pn_next])``; see the quantizer's docstring."""
        return self.quantize.get_next_autoregressive_input(si, SN, f_hat, h_BChw)

    def idxBl_to_fhat(self, ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.quantize.idxBl_to_fhat(ms_idx_Bl)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat [B, Cvae, h, w] -> image [B, 3, H, W] clamped to [-1, 1]."""
        with autocast_off(f_hat.device):
            return self.decode(f_hat.float()).clamp(-1, 1)

    def idxBl_to_img(self, ms_idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor:
        """SN token maps [B, pn*pn] -> image [B, 3, H, W] in [-1, 1]."""
        return self.fhat_to_img(self.idxBl_to_fhat(ms_idx_Bl))

    def split_idx_BL(self, idx_BL: torch.Tensor) -> list[torch.Tensor]:
        """[B, L] stored tokens -> SN LongTensors [B, pn*pn]."""
        return self.quantize.split_idx_BL(idx_BL)


def _brief(keys: Sequence[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f", ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_official(path: str | Path, config: VQVAEConfig = VAR_VQVAE, freeze: bool = True) -> VQVAE:
    """Load VAR's ``vae_ch160v4096z32.pth`` (a plain state dict) strictly into ``VQVAE(config)``.

    ``config`` defaults to the official layout; ``patch_nums`` may differ from 256 px VAR's since the
    weights do not depend on them (e.g. VAR's 512 px schedule; only the [SN, V] usage buffer is then
    kept fresh). Returns the model frozen (eval, no grads) unless ``freeze=False``. Raises
    FileNotFoundError / ValueError naming ``path`` when the file is missing or is not such a state
    dict (listing missing, unexpected and mis-shaped keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official VQVAE weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{path} is not a VQVAE state dict (got {type(state).__name__}, not a dict of tensors)"
        )
    if config.linear_path:
        raise ValueError("linear_path: VAR's weights have no linear path (set linear_path: false)")
    vae = VQVAE(config)
    own = vae.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape_bad = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape and k != "quantize.ema_vocab_hit_SV"
    ]
    if missing or unexpected or shape_bad:
        parts = [f"{path} is not a state dict of this VQVAE (VAR_VQVAE: ch160 v4096 z32):"]
        if missing:
            parts.append(f"{len(missing)} missing keys ({_brief(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_brief(unexpected)})")
        if shape_bad:
            parts.append(f"{len(shape_bad)} wrong shapes ({_brief(shape_bad, 3)})")
        raise ValueError(" ".join(parts))
    vae.load_state_dict(state, strict=True)
    return vae.freeze() if freeze else vae
