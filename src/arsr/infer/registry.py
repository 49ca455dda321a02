"""The SR model families: one entry each, the only list ``evaluate``, ``arsr upscale`` and the report
read. A family is the ``kind`` its training stage writes into ``model.pt``, a row label, the
dataclass of its sampling settings (params.yaml's ``eval.<name>``; ``--<name>-<field>`` options
of ``arsr upscale`` / ``arsr evaluate``), or None for a deterministic family that has none (no
``eval.<name>`` section, no options), and the function that turns its model.pt into an Upscaler.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from arsr.infer import base, mar, srvar
from arsr.infer.tiling import Upscaler
from arsr.train.checkpoint import CheckpointError, load_model_file, safe_load


@dataclass(frozen=True)
class Family:
    name: str  # model.pt kind, eval section key, method name in tables
    title: str  # how reports label its row
    # A frozen dataclass of sampling settings (defaults = params.yaml's eval.<name>); None: none.
    sampling: type | None
    make_upscaler: Callable[[dict[str, Any], Any, torch.device | str], Upscaler]


# Table order: the regression base first (next to bicubic), then the generative models.
FAMILIES: dict[str, Family] = {
    "base": Family("base", "Regression base", None, base.make_upscaler),
    "srvar": Family("srvar", "SRVAR", srvar.SRVARSampling, srvar.make_upscaler),
    "mar": Family("mar", "MAR-SR", mar.MARSampling, mar.make_upscaler),
}

# Rows that are not SR families: a reference to beat, and the tokenizer's view of the HR (the
# ceiling of token models; it sees the HR, so the report never ranks it).
REFERENCE_METHODS = {"bicubic": "Bicubic", "vqvae_rec": "Tokenizer reconstruction (ceiling)"}
CEILING_METHODS = ("vqvae_rec",)


def method_title(name: str) -> str:
    """How tables and grids label a method (its own name when unknown)."""
    return REFERENCE_METHODS.get(name) or (FAMILIES[name].title if name in FAMILIES else name)


def method_order(name: str) -> int:
    """Table order: the reference rows, then the families as registered, then anything else."""
    known = [*REFERENCE_METHODS, *FAMILIES]
    return known.index(name) if name in known else len(known)


def model_kind(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file (train it first, e.g. `dvc repro train_srvar`)")
    d = safe_load(path)
    if not isinstance(d, dict) or "kind" not in d:
        raise CheckpointError(f"{path} is not an arsr model.pt file")
    return str(d["kind"])


def load_upscaler(path: str | Path, sampling: Any, device: torch.device | str = "cpu") -> Upscaler:
    """The Upscaler of an SR model.pt of any family; ``sampling`` has one attribute per family
    (params' ``eval`` section; a family without sampling settings gets None). Another kind of
    model.pt is refused by name."""
    kind = model_kind(path)
    if kind not in FAMILIES:
        raise CheckpointError(f"{path} holds a {kind!r} model; an SR model is needed ({', '.join(FAMILIES)})")
    fam = FAMILIES[kind]
    settings = getattr(sampling, kind) if fam.sampling is not None else None
    return fam.make_upscaler(load_model_file(path, kind), settings, device)


# --------------------------------------------------------------------------------------
# Command-line options: --<family>-<field> for every sampling setting
# --------------------------------------------------------------------------------------
def _option_type(field: dataclasses.Field, hints: dict[str, Any]) -> dict[str, Any]:
    hint = hints[field.name]
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is typing.Literal:
        return {"choices": list(typing.get_args(hint))}
    return {"type": type(field.default)}


def add_sampling_args(ap: argparse.ArgumentParser) -> None:
    """``--srvar-cfg``, ``--mar-num-iter``, ...: override params.yaml's ``eval.<family>.<field>``."""
    for fam in FAMILIES.values():
        if fam.sampling is None:
            continue
        group = ap.add_argument_group(f"{fam.title} sampling (default: params.yaml's eval.{fam.name})")
        hints = typing.get_type_hints(fam.sampling, include_extras=True)
        for f in dataclasses.fields(fam.sampling):
            group.add_argument(
                f"--{fam.name}-{f.name.replace('_', '-')}", dest=f"{fam.name}__{f.name}", default=None,
                **_option_type(f, hints),
            )  # fmt: skip


def sampling_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{family: {field: value}}`` of the sampling options given on the command line."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        name, sep, field = key.partition("__")
        if sep and name in FAMILIES and FAMILIES[name].sampling is not None and value is not None:
            out.setdefault(name, {})[field] = value
    return out
