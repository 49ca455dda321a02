"""The one schema of params.yaml.

Every stage loads params through :func:`load_params` and then reads only the sections its
``PARAMS`` names, plus its own ``resources.<stage>`` (how it uses the machine: declared by no
stage, hashed by nothing, overridable from the environment; see :class:`Resources`). The schema's
defaults are params.yaml's values (tests/test_config.py keeps them equal); each model's
hyperparameters are the dataclass next to the model (``vqvae.model`` =
:class:`arsr.models.vqvae.VQVAEConfig`, ...), reused here as its subsection. Unknown keys, wrong
types and inconsistent values fail with :class:`ConfigError`, whose message names the key path and
the reason, e.g. ``data.hr_size: 60 is not a multiple of the tokenizer downsample 8``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from arsr.eval.registry import METRICS
from arsr.infer.mar import MARSampling
from arsr.infer.srvar import SRVARSampling
from arsr.models.base import BaseSRConfig
from arsr.models.mar import MARConfig
from arsr.models.srvar import SRVARConfig
from arsr.models.vqvae import VQVAEConfig

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A params.yaml problem; the message names the key path."""


class Section(BaseModel):
    """Strict base: unknown keys and silent type coercions are errors."""

    model_config = ConfigDict(extra="forbid", strict=False, validate_default=True, frozen=True)


def _fail(path: str, value: Any, reason: str) -> None:
    raise ValueError(f"{path}: {value!r} {reason}")


# A key marked RUNTIME changes how a stage runs or reports, never what it writes into a DAG output
# that later stages read: no dvc.yaml stage declares it and no checkpoint fingerprint hashes it, so
# changing it reruns nothing (`dvc exp run -S srvar.train.log_every=5`). See :func:`stage_param_keys`.
RUNTIME: dict[str, Any] = {"runtime": True}


# --------------------------------------------------------------------------------------
# Training (one type, used as its own subsection by every training stage)
# --------------------------------------------------------------------------------------
class TrainConfig(Section):
    """A training stage's recipe. How many processes run it and how (ranks, loader workers,
    torch.compile) is the machine's business: ``resources.train_<section>`` (:class:`TrainResources`)."""

    max_steps: int = Field(300, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="global batch (all ranks, all accum micro-steps)")
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    base_lr: float = Field(0.04, gt=0, description="lr = base_lr * batch_size / 256")
    schedule: Literal["lin0", "cos"] = "lin0"
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    grad_clip: float = Field(2.0, ge=0, description="0 disables clipping")
    ema: float = Field(0.99, ge=0, lt=1, description="EMA decay (warmed up over the first steps)")
    val_every: int = Field(150, ge=1)
    ckpt_every: int = Field(150, ge=1, json_schema_extra=RUNTIME)
    ckpt_minutes: float = Field(
        5.0, ge=0, description="also checkpoint this long after the last (0: off)", json_schema_extra=RUNTIME
    )
    keep_stale: int = Field(
        2, ge=0, description="other fingerprints' checkpoints kept (newest)", json_schema_extra=RUNTIME
    )
    log_every: int = Field(10, ge=1, json_schema_extra=RUNTIME)
    max_bad_steps: int = Field(10, ge=1, description="consecutive non-finite losses before the run stops")
    deterministic: bool = False

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        # (divisible by nproc x accum, both resources: Params._cross_section)
        if self.amp == "fp16":
            import torch

            if not torch.cuda.is_available():
                _fail("amp", "fp16", "needs CUDA (no GPU here); use 'bf16' or 'none' on CPU")
        if self.warmup_steps > self.max_steps:
            _fail("warmup_steps", self.warmup_steps, f"exceeds max_steps {self.max_steps}")
        return self


def recipe_field(model: type[Section], **recipe: Any) -> Any:
    """A subsection of type ``model`` with this stage's ``recipe`` as its defaults, so a partial
    subsection in params.yaml keeps the rest of the recipe (``Annotated[model, *recipe_field(...)]``)."""

    def merge(v: Any) -> Any:
        return {**recipe, **v} if isinstance(v, dict) else v

    return Field(default_factory=lambda: model(**recipe)), BeforeValidator(merge)


def train_field(**recipe: Any) -> Any:
    """A stage's ``train`` subsection: TrainConfig with this stage's recipe as its defaults."""
    return recipe_field(TrainConfig, **recipe)


# --------------------------------------------------------------------------------------
# Sections (defaults = params.yaml's values; tests/test_config.py keeps them equal)
# --------------------------------------------------------------------------------------
class DataConfig(Section):
    source: str = Field("builtin", description="'builtin' (scikit-image photos) or a folder of images")
    labels: Literal["none", "folder"] = "none"
    hr_size: int = Field(64, ge=8, description="HR crop side in pixels")
    scale: int = Field(4, ge=2, le=8, description="SR factor; LR side = hr_size / scale")
    crop_stride: int = Field(48, ge=1, description="grid step between crops")
    max_crops_per_image: int = Field(0, ge=0, description="0 = every grid crop")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="fraction of source images held out")
    # (A training loader reads samples by offset: any ranks x workers work with any shard count.)
    min_shards: int = Field(4, ge=1, description="shards per split at least")
    samples_per_shard: int = Field(1000, ge=1)
    max_image_pixels: int = Field(89_478_485, ge=1, description="decompression-bomb limit (Pillow's default)")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.hr_size % self.scale:
            _fail("hr_size", self.hr_size, f"is not a multiple of scale {self.scale}")
        return self


_BASE_TRAIN = dict(
    max_steps=800, base_lr=0.016, schedule="cos", warmup_steps=40, weight_decay=0.0, ema=0.999,
    val_every=400, ckpt_every=200, log_every=50,
)  # fmt: skip


class BaseSection(Section):
    model: BaseSRConfig = Field(default_factory=BaseSRConfig)
    augment: bool = Field(True, description="random flips and transposes of the train pairs")
    train: Annotated[TrainConfig, *train_field(**_BASE_TRAIN)]


_VQVAE_TRAIN = dict(
    max_steps=200, batch_size=32, base_lr=0.016, warmup_steps=5, weight_decay=0.0, ema=0.999, val_every=100,
    ckpt_every=100, log_every=25,
)  # fmt: skip


class VQVAESection(Section):
    pretrained: str | None = Field(None, description="official VAR vae .pth to adopt instead of training")
    target: Literal["residual", "hr"] = Field(
        "residual", description="residual: tokens of (HR - base(LR)) / sigma; hr: VAR's tokenizer of the HR"
    )
    model: VQVAEConfig = Field(default_factory=VQVAEConfig)
    kmeans_init: bool = Field(True, description="codebook from k-means on encoder outputs before step 1")
    token_dropout: float = Field(0.0, ge=0, lt=1, description="fraction of tokens decoded as random codes")
    restart_dead_codes: bool = True
    restart_every: int = Field(25, ge=1, description="steps between dead-code restarts")
    augment: bool = Field(True, description="random RGB order, flips and negatives of the train crops")
    perceptual_weight: float = Field(0.0, ge=0, description="weight of LPIPS(rec, x) in the loss (VAR: 1.0)")
    train: Annotated[TrainConfig, *train_field(**_VQVAE_TRAIN)]

    @model_validator(mode="after")
    def _official_weights_are_var_layout(self) -> VQVAESection:
        if self.pretrained and (self.target != "hr" or self.model.linear_path):
            raise ValueError(
                "pretrained: VAR's official weights are a tokenizer of the HR image: set vqvae.target: hr "
                "and vqvae.model.linear_path: false"
            )
        return self


class SRVARSection(Section):
    model: SRVARConfig = Field(default_factory=SRVARConfig)
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="training CE only")
    diff_weight: float = Field(2.0, ge=0, description="loss = CE + diff_weight x refiner loss")
    init_from: str | None = Field(None, description="official VAR checkpoint to start from")
    train: Annotated[TrainConfig, *train_field()]


_MAR_TRAIN = dict(
    max_steps=200, base_lr=0.03, weight_decay=0.02, grad_clip=3.0, ema=0.999, val_every=50, ckpt_every=50,
)  # fmt: skip


class MARSection(Section):
    model: MARConfig = Field(default_factory=MARConfig)
    train: Annotated[TrainConfig, *train_field(**_MAR_TRAIN)]


class EvalConfig(Section):
    benchmarks: list[str] = Field(default_factory=list, description="folders with HR/ (and LR_bicubic/X{s}/)")
    protocol: Literal["rgb-uint8", "y-float"] = "rgb-uint8"
    max_val_images: int = Field(0, ge=0, description="0 = all val crops")
    tile_overlap: int = Field(16, ge=0)
    seed: int = 0
    num_samples: int = Field(4, ge=0, description="sample grids written")
    metrics: list[str] = Field(default_factory=lambda: list(METRICS), description="arsr.eval.registry names")
    # One subsection per SR family with sampling settings (arsr.infer.registry.FAMILIES; the regression
    # base has none), so no setting means two things.
    srvar: SRVARSampling = Field(default_factory=SRVARSampling)
    mar: MARSampling = Field(default_factory=MARSampling)

    @model_validator(mode="after")
    def _known_metrics(self) -> EvalConfig:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"metrics: unknown {unknown}; choose from {', '.join(METRICS)}")
        return self


# --------------------------------------------------------------------------------------
# Resources: how a stage uses the machine, never what it computes
# --------------------------------------------------------------------------------------
# `resources.<dvc.yaml stage>`. No stage declares these keys (dvc.yaml), no checkpoint fingerprint or
# W&B run name hashes them and the check stage leaves the section out, so going from 2 CPU ranks to
# 4 GPUs reruns nothing (`dvc exp run -S resources.train_srvar.nproc=4`) and a stopped training run
# resumes. ARSR_RESOURCES__<STAGE>__<KEY>=value (e.g. ARSR_RESOURCES__TRAIN_SRVAR__NPROC=4) overrides
# a key from the environment (:func:`load_params`), which is how Snakemake passes a rule's
# `set-resources` on.
class TrainResources(Section):
    nproc: int = Field(
        2, ge=1, description="processes per node (torchrun --nproc-per-node; on a GPU machine: its GPUs)"
    )
    workers: int = Field(1, ge=0, description="data-loader processes per rank")
    compile: bool = Field(
        False, description="torch.compile the training step (a GPU gains; minutes to build)"
    )
    accum: int = Field(
        1, ge=1, description="gradient-accumulation micro-steps per optimizer step (memory: same batch)"
    )
    max_requeues: int = Field(
        10, ge=0, description="SLURM time-limit windows beyond the first: requeue in place (arsr.slurm)"
    )


class ShardResources(Section):
    workers: int = Field(2, ge=1, description="processes that decode, crop and resize (at most the CPUs)")


class TokenizeResources(Section):
    batch_size: int = Field(64, ge=1, description="crops encoded together (the bytes do not depend on it)")
    workers: int = Field(2, ge=1, description="processes, each encoding whole shards (at most the CPUs)")


class EvaluateResources(Section):
    batch_size: int = Field(
        16, ge=1, description="tiles super-resolved together (each tile has its own seed: same outputs)"
    )


class Resources(Section):
    shard: ShardResources = Field(default_factory=ShardResources)
    train_base: TrainResources = Field(default_factory=TrainResources)
    train_vqvae: TrainResources = Field(default_factory=TrainResources)
    tokenize: TokenizeResources = Field(default_factory=TokenizeResources)
    train_srvar: TrainResources = Field(default_factory=TrainResources)
    train_mar: Annotated[TrainResources, *recipe_field(TrainResources, workers=2)]
    evaluate: EvaluateResources = Field(default_factory=EvaluateResources)


class Params(Section):
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    base: BaseSection = Field(default_factory=BaseSection)
    vqvae: VQVAESection = Field(default_factory=VQVAESection)
    srvar: SRVARSection = Field(default_factory=SRVARSection)
    mar: MARSection = Field(default_factory=MARSection)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="after")
    def _cross_section(self) -> Params:
        vq = self.vqvae.model
        down = vq.downsample
        if self.data.hr_size % down:
            raise ValueError(
                f"data.hr_size: {self.data.hr_size} is not a multiple of the tokenizer downsample {down}"
            )
        grid = self.data.hr_size // down
        if vq.patch_nums[-1] != grid:
            raise ValueError(
                f"vqvae.model.patch_nums: last entry {vq.patch_nums[-1]} must equal the latent grid "
                f"data.hr_size / downsample = {self.data.hr_size} / {down} = {grid}"
            )
        if grid % self.mar.model.patch_size:
            raise ValueError(
                f"mar.model.patch_size: {self.mar.model.patch_size} does not divide the latent grid {grid}"
            )
        for stage, name in TRAINING_STAGES.items():
            train: TrainConfig = getattr(self, name).train
            res: TrainResources = getattr(self.resources, stage)
            if train.batch_size % (res.nproc * res.accum):
                raise ValueError(
                    f"{name}.train.batch_size: {train.batch_size} is not divisible by "
                    f"resources.{stage}.nproc x accum = {res.nproc} x {res.accum} (the batch "
                    "is global: the same training on any number of ranks)"
                )
        lr = self.data.hr_size // self.data.scale
        if lr < 4:
            raise ValueError(
                f"data.hr_size: {self.data.hr_size} / scale {self.data.scale} leaves a {lr}px LR"
            )
        return self


# A training stage is `train_<section>`, for each section with a `train` subsection; its resources
# are `resources.train_<section>` (a test keeps the two lists equal).
TRAINING_STAGES: dict[str, str] = {
    f"train_{name}": name
    for name, field in Params.model_fields.items()
    if "train" in getattr(field.annotation, "model_fields", {})
}


# --------------------------------------------------------------------------------------
# Which keys a stage depends on
# --------------------------------------------------------------------------------------
def _keys(model: type[BaseModel], prefix: str) -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        if (field.json_schema_extra or {}).get("runtime"):
            continue
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += _keys(sub, key)
        else:  # a leaf, or a model's hyperparameter dataclass (one key: the model is one thing)
            out.append(key)
    return out


def stage_param_keys(sections: tuple[str, ...]) -> list[str]:
    """The params.yaml keys a stage reading ``sections`` depends on (RUNTIME keys left out), as
    dvc.yaml declares them and :func:`stage_param_values` hashes them."""
    keys: list[str] = []
    for section in sections:
        field = Params.model_fields[section]
        sub = field.annotation
        keys += _keys(sub, section) if isinstance(sub, type) and issubclass(sub, BaseModel) else [section]
    return keys


def stage_param_values(params: Params, sections: tuple[str, ...]) -> dict[str, Any]:
    """``{key: value}`` (JSON-able) of :func:`stage_param_keys`: what a stage's fingerprint hashes."""
    tree = params.model_dump(mode="json")
    out = {}
    for key in stage_param_keys(sections):
        node = tree
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
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


def missing_keys(raw: dict[str, Any] | None, keys: Iterable[str]) -> list[str]:
    """The dotted ``keys`` absent from the mapping ``raw`` (defaults do not count)."""
    out = []
    for key in keys:
        node: Any = raw or {}
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                out.append(key)
                break
            node = node[part]
    return out


# ARSR_RESOURCES__<STAGE>__<KEY>=value sets resources.<stage>.<key> (see Resources).
RESOURCES_ENV_PREFIX = "ARSR_RESOURCES__"


def resource_overrides(env: Mapping[str, str] | None = None) -> dict[str, tuple[str, str, Any]]:
    """``{"resources.<stage>.<key>": (variable, text, value)}`` of the ``ARSR_RESOURCES__<STAGE>__<KEY>``
    variables in ``env`` (default: this process's), each value read as YAML (``4``, ``true``)."""
    env = os.environ if env is None else env
    out: dict[str, tuple[str, str, Any]] = {}
    for var in sorted(env):
        if not var.startswith(RESOURCES_ENV_PREFIX):
            continue
        parts = var.removeprefix(RESOURCES_ENV_PREFIX).lower().split("__")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"${var}: expected {RESOURCES_ENV_PREFIX}<STAGE>__<KEY>, e.g. "
                f"{RESOURCES_ENV_PREFIX}TRAIN_SRVAR__NPROC=4 (sets resources.train_srvar.nproc)"
            )
        text = env[var]
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        out[f"resources.{parts[0]}.{parts[1]}"] = (var, text, value)
    return out


def _with_overrides(raw: dict[str, Any] | None, overrides: dict[str, tuple[str, str, Any]]) -> dict[str, Any]:
    tree: dict[str, Any] = dict(raw or {})
    for key, (var, _text, value) in overrides.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:  # copied on the way down: the file's own mapping stays as read
            child = node.get(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"${var}: {key}: {part} is not a section in the parameters file")
            node[part] = node = dict(child)
        node[leaf] = value
    return tree


def load_params(
    path: str | Path = PARAMS_FILE,
    required: dict[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Params:
    """Read and validate params.yaml, with the ``ARSR_RESOURCES__<STAGE>__<KEY>`` variables of ``env``
    (default: this process's environment) applied; an error in one names the variable.

    ``required`` maps keys that must be *in the file* to who reads them (``{"srvar.model":
    "dvc.yaml stage train_srvar"}``): DVC takes a stage's declared params from the file itself, not
    through the schema's defaults, so the DAG's check (:mod:`arsr.stages.check`, the Snakefile) asks
    for every declared key before any stage runs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such parameters file (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    overrides = resource_overrides(env)
    try:
        params = parse_params(_with_overrides(raw, overrides), str(path))
    except ConfigError as err:
        if not overrides:
            raise
        # Name the variable on each line about a key it set (also a cross-section rule's line).
        lines = str(err).splitlines()
        for i, line in enumerate(lines[1:], 1):
            path = line.strip().split(":", 1)[0]  # the key the line is about (unknown: a prefix)
            named = [
                f"${var}={text}"
                for key, (var, text, _) in overrides.items()
                if key in line or key.startswith(f"{path}.")
            ]
            if named:
                lines[i] = f"{line} (set by {', '.join(named)} in the environment)"
        raise ConfigError("\n".join(lines)) from None
    absent = missing_keys(raw, required or {})
    if absent:
        lines = [f"  {key}: missing ({required[key]} reads it)" for key in absent]  # type: ignore[index]
        raise ConfigError("\n".join([f"invalid parameters in {path}:", *lines]))
    return params


def tool_eval_config(
    params_path: str | Path,
    sampling: dict[str, dict[str, Any]],
    protocol: str | None = None,
    seed: int | None = None,
) -> EvalConfig:
    """The ``eval`` settings of the standalone tools (``arsr upscale``, ``arsr evaluate --hr-dir``):
    ``params_path``'s eval section, or the schema's defaults (= params.yaml's) when there is no such
    file (the tools work outside a project too), with ``sampling`` ({family: {field: value}}),
    ``protocol`` and ``seed`` applied. A file that exists is read strictly: a bad key is a ConfigError
    naming it (settings silently falling back to defaults would make outputs nobody asked for)."""
    path = Path(params_path)
    tree = (load_params(path).eval if path.is_file() else EvalConfig()).model_dump()
    for family, over in sampling.items():
        tree[family] = {**tree[family], **over}
    tree |= {k: v for k, v in (("protocol", protocol), ("seed", seed)) if v is not None}
    # Validated as the whole file is, so an override out of range names its key like a params error.
    return parse_params({"eval": tree}, f"{path} with the command-line options").eval


__all__ = [
    "RESOURCES_ENV_PREFIX",
    "RUNTIME",
    "TRAINING_STAGES",
    "BaseSection",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "MARSection",
    "Params",
    "Resources",
    "SRVARSection",
    "ShardResources",
    "TokenizeResources",
    "TrainConfig",
    "TrainResources",
    "VQVAESection",
    "load_params",
    "missing_keys",
    "parse_params",
    "resource_overrides",
    "stage_param_keys",
    "stage_param_values",
    "tool_eval_config",
]


# --------------------------------------------------------------------------------------
# Named configurations: override files applied as DVC experiments
# --------------------------------------------------------------------------------------
def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= _flatten(value, path + ".")
        else:
            out[path] = value
    return out


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _deep_merge(out[key], value) if both else value
    return out


def override_args(path: str | Path, params_path: str | Path = PARAMS_FILE) -> list[str]:
    """An override file (a nested subset of params.yaml, e.g. configs/bsd400.yaml) as the
    ``-S key=value`` arguments of ``dvc exp run``, after checking that params.yaml with the
    overrides applied is valid (an error names the file and key)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such override file")
    over = yaml.safe_load(path.read_text()) or {}
    if not isinstance(over, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    current = yaml.safe_load(Path(params_path).read_text()) or {}
    parse_params(_deep_merge(current, over), f"{params_path} + {path}")
    args = []
    for key, value in _flatten(over).items():
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        args += ["-S", f"{key}={text}"]
    return args


if __name__ == "__main__":  # python -m arsr.config --overrides FILE: print dvc's -S arguments
    import shlex
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "--overrides":
        sys.exit("usage: python -m arsr.config --overrides configs/NAME.yaml")
    try:
        print(shlex.join(override_args(sys.argv[2])))
    except ConfigError as err:
        sys.exit(f"arsr config: error: {err}")
