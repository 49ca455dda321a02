"""Checkpoint files: atomic writes, safe loads, fingerprints and compatibility checks.

Two files per training stage, both plain dicts of tensors and JSON-like values, so they load
with ``torch.load(weights_only=True)`` and nothing in them can run code:

- ``ckpt/last.pt``: everything needed to resume exactly (see ``Trainer._checkpoint``).
- ``model.pt``: ``{"format", "kind", "config", "state_dict" (EMA), "extra", "step", "fingerprint"}``,
  self-contained for inference (``extra`` holds e.g. the VQVAE weights and latent stats).

A checkpoint belongs to one run *fingerprint* (the stage's params and the hashes of its
inputs), and ``ckpt/`` is a cache keyed by it: a rerun with the same fingerprint resumes;
another fingerprint moves the old checkpoint (and the files that go with it, e.g. the plots) to
``ckpt/stale-<fp>/`` and takes back ``ckpt/stale-<its fp>/`` when there is one (a reverted
param resumes there; a finished run just rewrites its outputs), else starts fresh. The newest
``keep_stale`` stale folders are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from arsr.io import atomic_write

MODEL_FORMAT = "arsr-model-v1"
CKPT_FORMAT = "arsr-ckpt-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that must not be used: unsafe, or made for another model."""


# --------------------------------------------------------------------------------------
# Atomic writes and safe loads
# --------------------------------------------------------------------------------------
def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that leaves the old file or the new one, never half of one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def safe_load(path: str | Path, allow: Iterable[type] = ()) -> Any:
    """``torch.load(weights_only=True)`` on CPU; a file holding any other pickled object is refused.

    ``allow`` adds classes an official checkpoint needs (e.g. ``argparse.Namespace``).
    """
    allow = list(allow)
    ctx = torch.serialization.safe_globals(allow) if allow else nullcontext()
    try:
        with ctx:
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        reason = next(
            (ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else ""
        )
        raise CheckpointError(
            f"refusing to load {path}: it holds a pickled object that weights_only loading does not "
            f"allow ({reason.strip()}); only tensors and plain containers are accepted"
        ) from None


# --------------------------------------------------------------------------------------
# Fingerprints and compatibility
# --------------------------------------------------------------------------------------
def fingerprint_id(fingerprint: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able fingerprint dict."""
    blob = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# Runner bookkeeping inside output folders, not data: Snakemake marks every directory() output.
NOT_DATA = frozenset({".snakemake_timestamp"})


def hash_paths(*paths: str | Path) -> dict[str, str]:
    """sha256 of each file (a folder: of its files' relative names and contents), for fingerprints.
    A folder hashes the same whichever runner (DVC, Snakemake) wrote it."""
    out = {}
    for p in map(Path, paths):
        h = hashlib.sha256()
        files = [p]
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.name not in NOT_DATA)
        for f in files:
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    h.update(chunk)
        out[str(p)] = h.hexdigest()
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: list(d) if isinstance(d, tuple) else d}


def config_diff(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, e.g. ``["depth: 4 != 6", "heads: missing in checkpoint"]``."""
    a, b = _flatten(saved), _flatten(wanted)
    diffs = []
    for k in sorted(a.keys() | b.keys()):
        if k not in a:
            diffs.append(f"{k}: missing in checkpoint")
        elif k not in b:
            diffs.append(f"{k}: not expected (checkpoint has {a[k]!r})")
        elif a[k] != b[k]:
            diffs.append(f"{k}: checkpoint {a[k]!r} != expected {b[k]!r}")
    return diffs


def check_compatible(
    saved: dict[str, Any], kind: str, config: dict[str, Any] | None, path: str | Path
) -> None:
    """Refuse a checkpoint of another model kind or config, naming what differs."""
    if saved.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {saved.get('kind')!r} model, not a {kind!r} model")
    if config is not None:
        diffs = config_diff(saved.get("config", {}), config)
        if diffs:
            raise CheckpointError(f"{path} was made for another {kind} config: " + "; ".join(diffs))


# --------------------------------------------------------------------------------------
# model.pt (inference) files
# --------------------------------------------------------------------------------------
def save_model_file(
    path: str | Path,
    *,
    kind: str,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    extra: dict[str, Any] | None = None,
    step: int = 0,
    fingerprint: dict[str, Any] | None = None,
) -> None:
    atomic_save(
        {
            "format": MODEL_FORMAT,
            "kind": kind,
            "config": config,
            "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
            "extra": extra or {},
            "step": step,
            "fingerprint": fingerprint or {},
        },
        path,
    )


def load_model_file(path: str | Path, kind: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a model.pt made by :func:`save_model_file`; refuse another kind (or config, if given).

    Returns the dict: rebuild with ``Model(ModelConfig(**d["config"]), <facts from d["extra"]>)``
    and ``load_state_dict(d["state_dict"])`` (the inference layer does it for every model kind).
    """
    d = safe_load(path)
    if not isinstance(d, dict) or d.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is not an arsr model file (format {MODEL_FORMAT})")
    check_compatible(d, kind, config, path)
    return d


# --------------------------------------------------------------------------------------
# Resume decisions
# --------------------------------------------------------------------------------------
def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def set_aside(ckpt_path: Path, fp_id: str, keep_with: Sequence[Path] = ()) -> Path:
    """Move a stale checkpoint, then the existing ``keep_with`` paths (files that belong to its run,
    e.g. the plots folder), to ``ckpt/stale-<fp>/`` (replacing an older one there)."""
    dest_dir = ckpt_path.parent / f"stale-{fp_id}"
    if dest_dir.exists():
        shutil.rmtree(dest_dir)
    dest_dir.mkdir(parents=True)
    dest = dest_dir / ckpt_path.name
    os.replace(ckpt_path, dest)  # first: the checkpoint is what makes the folder an entry
    for path in keep_with:
        if path.exists():
            os.replace(path, dest_dir / path.name)
    return dest


def restore(stale_path: Path, ckpt_path: Path, keep_with: Sequence[Path] = ()) -> None:
    """Move ``ckpt/stale-<fp>/last.pt`` back to ``ckpt_path``, with its ``keep_with`` companions
    (replacing the current ones: they belonged to no checkpoint, or were just set aside with
    theirs), and drop the folder."""
    src_dir = stale_path.parent
    for path in keep_with:
        if (src_dir / path.name).exists():
            _remove(path)
            os.replace(src_dir / path.name, path)
    # Last: a restore cut short leaves the checkpoint in the stale folder, and the rerun restores again.
    os.replace(stale_path, ckpt_path)
    shutil.rmtree(src_dir)


def prune_stale(ckpt_dir: Path, keep: int) -> list[str]:
    """Remove all but the ``keep`` most recently set aside ``stale-*`` folders; returns their names."""
    folders = [p for p in ckpt_dir.glob("stale-*") if p.is_dir()]
    folders.sort(key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
    for p in folders[keep:]:
        shutil.rmtree(p)
    return [p.name for p in folders[keep:]]


def _load_ckpt(path: Path) -> dict[str, Any]:
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not an arsr training checkpoint (format {CKPT_FORMAT})")
    return state


def load_for_resume(
    ckpt_path: Path,
    *,
    kind: str,
    config: dict[str, Any],
    fingerprint: dict[str, Any],
    keep_stale: int = 2,
    keep_with: Sequence[Path] = (),
) -> tuple[dict[str, Any] | None, str]:
    """Decide whether ``ckpt_path`` (or a stale checkpoint of this fingerprint) resumes this run;
    returns ``(state or None, message)``, the message saying what was moved, restored and pruned.

    Another model kind is refused outright (never moved aside: it is not this stage's file).
    Another fingerprint moves the checkpoint aside, with ``keep_with``; then ``ckpt/stale-<this
    fp>/``, when there is one, is moved back and resumed. The same fingerprint but another model
    config means the stage's fingerprint misses a key: refused, naming the keys. Stale folders
    beyond the newest ``keep_stale`` are removed.
    """
    new_id = fingerprint_id(fingerprint)
    notes: list[str] = []
    if ckpt_path.is_file():
        state = _load_ckpt(ckpt_path)
        if state.get("kind") != kind:
            check_compatible(state, kind, None, ckpt_path)
        old_id = state.get("fingerprint_id")
        if old_id == new_id:
            check_compatible(state, kind, config, ckpt_path)
            return state, f"resuming from {ckpt_path} at step {state['step']}"
        dest = set_aside(ckpt_path, old_id, keep_with)
        diffs = config_diff(state.get("fingerprint", {}), fingerprint)
        why = "; ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else "")
        notes.append(f"checkpoint fingerprint {old_id} != {new_id} ({why}): moved it to {dest}")
    state = None
    stale = ckpt_path.parent / f"stale-{new_id}" / ckpt_path.name
    if stale.is_file():
        candidate = _load_ckpt(stale)
        if candidate.get("kind") == kind and candidate.get("fingerprint_id") == new_id:
            check_compatible(candidate, kind, config, stale)
            restore(stale, ckpt_path, keep_with)
            state = candidate
            notes.append(f"restored this fingerprint's checkpoint {stale}: resuming at step {state['step']}")
        else:  # not what its folder's name says (moved there by hand?): left alone
            notes.append(f"ignoring {stale}: a {candidate.get('kind')!r} checkpoint of fingerprint "
                         f"{candidate.get('fingerprint_id')}")  # fmt: skip
    if state is None:
        notes[-1:] = [f"{notes[-1]}, starting fresh"] if notes else ["no checkpoint: starting fresh"]
    pruned = prune_stale(ckpt_path.parent, keep_stale)
    if pruned:
        notes.append(f"removed stale checkpoint(s) beyond the newest {keep_stale}: {', '.join(pruned)}")
    return state, "\n".join(notes)
