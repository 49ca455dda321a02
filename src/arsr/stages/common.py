"""What every stage CLI shares: argument parsing, error reporting, paths, fingerprints.

A stage module declares ``PARAMS``, the params.yaml sections it reads (dvc.yaml declares their
keys: :func:`arsr.config.stage_param_keys`), defines ``run(args, params) -> None`` and ends with::

    def main(argv=None) -> int:
        return stage_main("train_mar", __doc__, run, argv, add_args=_add_args)

Errors a user can fix (a bad params key, a missing input, a checkpoint of another model)
exit with status 2 and one line ``arsr <stage>: error: ...`` instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from arsr.config import ConfigError, Params, load_params, stage_param_values
from arsr.data.loader import train_loader
from arsr.data.tokens import TokenFactsError
from arsr.eval.perceptual import WeightsCorrupt, WeightsMissing
from arsr.train.checkpoint import CheckpointError, hash_paths
from arsr.train.dist import DistInfo

# DAG paths (DESIGN §1); stages take them as defaults of their CLI options.
SHARDS_DIR = Path("data/shards")
TOKENS_DIR = Path("data/tokens")
RUNS_DIR = Path("runs")
EVAL_DIR = Path("eval")
REPORTS_DIR = Path("reports")


def default_device() -> torch.device:
    """Where a single-process stage (tokenize, evaluate, upscale) runs: the GPU when there is one.
    ``ARSR_DEVICE`` (e.g. ``cpu``) overrides."""
    name = os.environ.get("ARSR_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class StageError(RuntimeError):
    """A problem the user can fix; reported as one line, exit status 2."""


USER_ERRORS = (
    ConfigError, StageError, CheckpointError, TokenFactsError, FileNotFoundError,
    WeightsMissing, WeightsCorrupt,
)  # fmt: skip


def stage_main(
    name: str,
    doc: str | None,
    run: Callable[[argparse.Namespace, Params], Any],
    argv: list[str] | None = None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse ``--params`` (+ the stage's own options), load params, run, report user errors."""
    ap = argparse.ArgumentParser(prog=f"arsr {name}", description=(doc or "").strip().split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    if add_args is not None:
        add_args(ap)
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        run(args, params)
    except USER_ERRORS as err:
        print(f"arsr {name}: error: {err}", file=sys.stderr)
        return 2
    return 0


def fingerprint(
    stage: str, params: Params, sections: tuple[str, ...], inputs: list[str | Path]
) -> dict[str, Any]:
    """What a training checkpoint must match to be resumed: the values of the params keys the stage
    depends on (those dvc.yaml declares; RUNTIME keys such as ``log_every`` are not among them)
    and its inputs' hashes."""
    missing = [str(p) for p in inputs if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"{stage}: input(s) not found: {', '.join(missing)} (run the earlier stages)")
    return {"stage": stage, "params": stage_param_values(params, sections), "inputs": hash_paths(*inputs)}


def rank_train_iters(
    urls: list[str], decode: Callable[[dict], dict], micro_batch: int, seed: int, dist: DistInfo, workers: int
) -> Callable[[int], Iterator]:
    """The engine's ``make_train_iter`` for this rank: ``start_micro_step -> iterator`` of micro-batches."""
    return lambda k: iter(
        train_loader(
            urls, decode=decode, micro_batch=micro_batch, seed=seed, rank=dist.rank,
            world_size=dist.world_size, workers=workers, start_step=k,
        )
    )  # fmt: skip

