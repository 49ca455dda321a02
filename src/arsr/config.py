"""The one schema of params.yaml.

Every stage loads params through :func:`load_params` and then reads only its own section
(plus the top-level ``seed``). Unknown keys, wrong types and inconsistent values fail
with :class:`ConfigError`, whose message names the key path and the reason, e.g.
``data.hr_size: 60 is not a multiple of the tokenizer downsample 8``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A params.yaml problem; the message names the key path."""


class Section(BaseModel):
    """Strict base: unknown keys and silent type coercions are errors."""

    model_config = ConfigDict(extra="forbid", strict=False, validate_default=True, frozen=True)


def _fail(path: str, value: Any, reason: str) -> None:
    raise ValueError(f"{path}: {value!r} {reason}")


# --------------------------------------------------------------------------------------
# Training (one type, used as its own subsection by every training stage)
# --------------------------------------------------------------------------------------
class TrainConfig(Section):
    nproc: int = Field(1, ge=1, description="processes per node (torchrun --nproc-per-node)")
    max_steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="global batch (all ranks, all accum micro-steps)")
    accum: int = Field(1, ge=1, description="gradient-accumulation micro-steps per optimizer step")
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    base_lr: float = Field(1e-4, gt=0, description="lr = base_lr * batch_size / 256")
    schedule: Literal["lin0", "cos"] = "lin0"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    grad_clip: float = Field(2.0, ge=0, description="0 disables clipping")
    ema: float = Field(0.999, ge=0, lt=1, description="EMA decay (warmed up over the first steps)")
    val_every: int = Field(100, ge=1)
    ckpt_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    max_bad_steps: int = Field(10, ge=1, description="consecutive non-finite losses before the run stops")
    deterministic: bool = False
    compile: bool = Field(False, description="torch.compile the training forward (GPU; minutes to build)")
    workers: int = Field(2, ge=0, description="data-loader workers per rank")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        per_step = self.nproc * self.accum
        if self.batch_size % per_step:
            _fail("batch_size", self.batch_size, f"is not divisible by nproc x accum = {per_step}")
        if self.amp == "fp16":
            import torch

            if not torch.cuda.is_available():
                _fail("amp", "fp16", "needs CUDA (no GPU here); use 'bf16' or 'none' on CPU")
        if self.warmup_steps > self.max_steps:
            _fail("warmup_steps", self.warmup_steps, f"exceeds max_steps {self.max_steps}")
        return self

    @property
    def micro_batch(self) -> int:
        """Samples one rank processes in one micro-step."""
        return self.batch_size // (self.nproc * self.accum)


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------
class DataConfig(Section):
    source: str = Field("builtin", description="'builtin' (scikit-image photos) or a folder of images")
    labels: Literal["none", "folder"] = "none"
    hr_size: int = Field(64, ge=8, description="HR crop side in pixels")
    scale: int = Field(4, ge=2, le=8, description="SR factor; LR side = hr_size / scale")
    crop_stride: int = Field(32, ge=1, description="grid step between crops")
    max_crops_per_image: int = Field(0, ge=0, description="0 = every grid crop")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="fraction of source images held out")
    min_shards: int = Field(4, ge=1, description="shards per split at least (>= nproc x workers)")
    samples_per_shard: int = Field(1000, ge=1)
    workers: int = Field(2, ge=1, description="processes that decode/crop/resize")
    max_image_pixels: int = Field(89_478_485, ge=1, description="decompression-bomb limit (Pillow's default)")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.hr_size % self.scale:
            _fail("hr_size", self.hr_size, f"is not a multiple of scale {self.scale}")
        return self


class VQVAEConfig(Section):
    pretrained: str | None = Field(None, description="official VAR vae .pth to adopt instead of training")
    vocab_size: int = Field(512, ge=2)
    z_channels: int = Field(32, ge=1, description="Cvae, the latent width")
    ch: int = Field(16, ge=8, description="base channels (VAR: 160)")
    ch_mult: list[int] = Field(default_factory=lambda: [1, 2, 2, 4])
    dropout: float = Field(0.0, ge=0, lt=1)
    patch_nums: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 8])
    beta: float = Field(0.25, gt=0)
    quant_resi: float = 0.5
    share_quant_resi: int = Field(4, ge=0)
    restart_dead_codes: bool = True
    restart_every: int = Field(25, ge=1, description="steps between dead-code restarts")
    augment: bool = Field(True, description="random RGB order, flips and negatives of the train crops")
    perceptual_weight: float = Field(0.0, ge=0, description="LPIPS; needs local weights")
    train: TrainConfig = Field(default_factory=TrainConfig)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @model_validator(mode="after")
    def _check(self) -> VQVAEConfig:
        v = self.patch_nums
        if not v or v[0] < 1 or any(b <= a for a, b in zip(v, v[1:])):
            _fail("patch_nums", v, "must be strictly increasing positive integers")
        if not self.ch_mult:
            _fail("ch_mult", self.ch_mult, "must not be empty")
        return self


class TokenizeConfig(Section):
    batch_size: int = Field(32, ge=1)
    workers: int = Field(2, ge=1, description="processes encoding shards in parallel")


class SRVARConfig(Section):
    depth: int = Field(4, ge=1)
    width: int = Field(0, ge=0, description="0 = 64 x depth (VAR's rule)")
    heads: int = Field(0, ge=0, description="0 = depth (VAR's rule)")
    mlp_ratio: float = Field(4.0, gt=0)
    drop_path: float = Field(0.0, ge=0, lt=1)
    attn_l2_norm: bool = True
    alng: float = Field(1e-3, gt=0, description="AdaLN gamma init scale")
    cond_drop: float = Field(0.1, ge=0, lt=1, description="per-sample LR-condition dropout (CFG)")
    lr_input: bool = Field(True, description="add the LR latent pyramid to every position's input")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    refiner: bool = False
    diff_weight: float = Field(2.0, ge=0)
    refiner_width: int = Field(256, ge=8)
    refiner_depth: int = Field(3, ge=1)
    refiner_steps: str = Field("100", description="respaced diffusion steps at inference")
    init_from: str | None = Field(None, description="official VAR checkpoint to start from")
    train: TrainConfig = Field(default_factory=TrainConfig)


MAR_TRAIN_DEFAULTS = {"grad_clip": 3.0, "weight_decay": 0.02, "amp": "bf16"}


class MARConfig(Section):
    width: int = Field(256, ge=8)
    encoder_depth: int = Field(4, ge=1)
    decoder_depth: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    buffer_size: int = Field(16, ge=1)
    patch_size: int = Field(1, ge=1)
    mask_ratio_min: float = Field(0.7, gt=0, lt=1)
    cond_drop: float = Field(0.1, ge=0, lt=1)
    attn_dropout: float = Field(0.1, ge=0, lt=1)
    proj_dropout: float = Field(0.1, ge=0, lt=1)
    diffloss_width: int = Field(256, ge=8)
    diffloss_depth: int = Field(3, ge=1)
    diffusion_batch_mul: int = Field(4, ge=1)
    # IDDPM's plain "N" spacing keeps t=999 (alpha_bar ~ 2e-9 with the cosine cap), which
    # amplifies a briefly trained head's error ~1000x; DDIM striding ends at t=960 and is stable.
    num_sampling_steps: str = Field("ddim25", description="respaced diffusion steps at sampling")
    # MAR's recipe differs from the generic defaults; a partial `mar.train` keeps these.
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(**MAR_TRAIN_DEFAULTS))

    @field_validator("train", mode="before")
    @classmethod
    def _mar_train_defaults(cls, v: Any) -> Any:
        return {**MAR_TRAIN_DEFAULTS, **v} if isinstance(v, dict) else v


class EvalConfig(Section):
    benchmarks: list[str] = Field(default_factory=list, description="folders with HR/ (and LR_bicubic/X{s}/)")
    protocol: Literal["rgb-uint8", "y-float"] = "rgb-uint8"
    max_val_images: int = Field(0, ge=0, description="0 = all val crops")
    tile_overlap: int = Field(16, ge=0)
    batch_size: int = Field(16, ge=1, description="tiles super-resolved together")
    srvar_cfg: float = Field(0.0, ge=0)
    srvar_top_k: int = Field(0, ge=0, description="0 = off")
    srvar_top_p: float = Field(0.0, ge=0, le=1, description="0 = off")
    mar_cfg: float = Field(1.0, ge=0)
    mar_cfg_schedule: Literal["linear", "constant"] = "linear"
    mar_temperature: float = Field(1.0, gt=0)
    mar_num_iter: int = Field(8, ge=1)
    seed: int = 0
    num_samples: int = Field(4, ge=0, description="sample grids written")


class Params(Section):
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    vqvae: VQVAEConfig = Field(default_factory=VQVAEConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    srvar: SRVARConfig = Field(default_factory=SRVARConfig)
    mar: MARConfig = Field(default_factory=MARConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _cross_section(self) -> Params:
        down = self.vqvae.downsample
        if self.data.hr_size % down:
            raise ValueError(
                f"data.hr_size: {self.data.hr_size} is not a multiple of the tokenizer downsample {down}"
            )
        grid = self.data.hr_size // down
        if self.vqvae.patch_nums[-1] != grid:
            raise ValueError(
                f"vqvae.patch_nums: last entry {self.vqvae.patch_nums[-1]} must equal the latent grid "
                f"data.hr_size / downsample = {self.data.hr_size} / {down} = {grid}"
            )
        for name in ("vqvae", "srvar", "mar"):
            train: TrainConfig = getattr(self, name).train
            need = train.nproc * max(1, train.workers)
            if self.data.min_shards < need:
                raise ValueError(
                    f"data.min_shards: {self.data.min_shards} is below {name}.train.nproc x workers = {need} "
                    "(every worker of every rank needs a shard; fewer hangs DDP)"
                )
        lr = self.data.hr_size // self.data.scale
        if lr < 4:
            raise ValueError(
                f"data.hr_size: {self.data.hr_size} / scale {self.data.scale} leaves a {lr}px LR"
            )
        return self


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            text = f"{loc}: unknown key"
        elif e["type"] == "value_error":
            # Raised by a model validator: loc is the section, msg starts with the field.
            text = f"{loc}.{msg}" if loc else msg
        else:
            text = f"{loc}: {msg} (got {e.get('input')!r})"
        lines.append(f"  {text}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any] | None, source: str = PARAMS_FILE) -> Params:
    """Validate a params mapping; raise ConfigError naming the key path and reason."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such parameters file (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return parse_params(raw, str(path))


def section_dict(section: BaseModel) -> dict[str, Any]:
    """A JSON-able dict of one section (for fingerprints and W&B config)."""
    return section.model_dump(mode="json")


__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "MARConfig",
    "Params",
    "SRVARConfig",
    "TokenizeConfig",
    "TrainConfig",
    "VQVAEConfig",
    "load_params",
    "parse_params",
    "section_dict",
]
