"""What every stage CLI shares: argument parsing, error reporting, paths, fingerprints.

A stage module declares ``PARAMS``, the params.yaml sections it reads (dvc.yaml declares their
keys: :func:`arsr.config.stage_param_keys`), defines ``run(args, params) -> None`` and ends with::

    def main(argv=None) -> int:
        return stage_main("train_mar", __doc__, run, argv, add_args=_add_args)

Errors a user can fix (a bad params key, a missing input, a checkpoint of another model)
exit with status 2 and one line ``arsr <stage>: error: ...`` instead of a traceback.

Command lines are parsed by argparse only (``--x=y`` and ``--x y`` alike, abbreviations too);
nothing here looks for a literal token in argv. The standalone tools (``arsr upscale``,
``arsr evaluate --hr-dir``) take their settings through :func:`tool_settings`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from arsr.config import (
    TRAINING_STAGES,
    ConfigError,
    EvalConfig,
    Params,
    load_params,
    parse_params,
    stage_param_values,
    tool_eval_config,
)
from arsr.data.tokens import TokenFactsError
from arsr.eval.perceptual import WeightsCorrupt, WeightsMissing
from arsr.proc import fit_threads
from arsr.runlock import RunLocked, run_lock
from arsr.train.checkpoint import CheckpointError, hash_paths
from arsr.train.dist import DistInfo

# DAG paths (DESIGN §1); stages take them as defaults of their CLI options.
SHARDS_DIR = Path("data/shards")
TOKENS_DIR = Path("data/tokens")
RUNS_DIR = Path("runs")
EVAL_DIR = Path("eval")
REPORTS_DIR = Path("reports")


# W&B lineage: the DAG's data as reference artifacts (name, type, paths), logged by the stage that
# writes them and used by every stage that reads them, under one name per output (README "W&B").
def shards_artifact(shards: str | Path) -> tuple[str, str, list[Path]]:
    return "shards", "dataset", [Path(shards)]


def tokens_artifact(tokens: str | Path) -> tuple[str, str, list[Path]]:
    return "tokens", "dataset", [Path(tokens)]


def model_artifact(kind: str, model_pt: str | Path) -> tuple[str, str, list[Path]]:
    """``<kind>-model``: base, vqvae, srvar, mar (a training stage's kind, an SR family's name)."""
    return f"{kind}-model", "model", [Path(model_pt)]


def eval_artifact(eval_dir: str | Path) -> tuple[str, str, list[Path]]:
    d = Path(eval_dir)
    return "eval", "evaluation", [d / "metrics.json", d / "per_image.csv", d / "samples"]


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


def stage_parser(
    name: str, doc: str | None, add_args: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.ArgumentParser:
    """``arsr <name>``'s parser: ``--params`` and the stage's own options."""
    ap = argparse.ArgumentParser(prog=f"arsr {name}", description=(doc or "").strip().split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    if add_args is not None:
        add_args(ap)
    return ap


def _command_process() -> bool:
    """Whether this process is an arsr command (``python -m arsr.<...>``, the ``arsr`` script), not a
    program that calls a stage's ``main`` itself (a test sets its own thread count)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return (spec is not None and spec.name.startswith("arsr.")) or Path(sys.argv[0]).name == "arsr"


def report_errors(name: str, fn: Callable[[], Any]) -> int:
    """``fn()``'s exit status (None = 0); a user error is one line ``arsr <name>: error: ...``, status 2.

    A stage that is its process's command first sizes the process's threads: the CPUs it may use
    shared with its sibling ranks (torchrun's ``LOCAL_WORLD_SIZE``), whichever runner started it."""
    if _command_process():
        try:
            fit_threads(int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
        except ValueError as err:  # a bad $ARSR_CPUS or $ARSR_THREADS_PER_RANK
            print(f"arsr {name}: error: {err}", file=sys.stderr)
            return 2
    try:
        return int(fn() or 0)
    except USER_ERRORS as err:
        print(f"arsr {name}: error: {err}", file=sys.stderr)
        return 2


def stage_lock_folder(name: str, args: argparse.Namespace) -> Path:
    """The run folder whose lock (:func:`arsr.runlock.run_lock`) a run of stage ``name`` holds: a
    training stage's ``--out`` (``runs/<section>``), else ``<--runs>/<name>`` (``runs/shard``,
    ``runs/tokenize``, ``runs/evaluate``, ``runs/report``, where timing.json and W&B files go). Neither
    is a DVC output itself, and no declared directory output (``runs/<section>/ckpt``, ``plots``,
    ``data/shards``, ``reports``, ...) is the folder or contains it (tests/test_run_lock.py)."""
    if name in TRAINING_STAGES:
        return Path(args.out)
    return Path(getattr(args, "runs", None) or RUNS_DIR) / name


def run_stage(name: str, run: Callable[[argparse.Namespace, Params], Any], args: argparse.Namespace) -> int:
    """Load ``args.params``, run the stage (what ``run`` returns is not an exit status), report errors.

    The run holds its run folder's lock (:func:`stage_lock_folder`): a second run of the stage on the
    same folder fails, naming the first. Not a torchrun rank (``$LOCAL_RANK``): its launcher holds it."""

    def go() -> int:
        params = load_params(args.params)
        if "LOCAL_RANK" in os.environ:
            run(args, params)
            return 0
        try:
            with run_lock(stage_lock_folder(name, args), f"arsr {name}"):
                run(args, params)
        except RunLocked as err:
            raise StageError(str(err)) from None
        return 0

    return report_errors(name, go)


def stage_main(
    name: str,
    doc: str | None,
    run: Callable[[argparse.Namespace, Params], Any],
    argv: list[str] | None = None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse ``--params`` (+ the stage's own options), load params, run, report user errors."""
    return run_stage(name, run, stage_parser(name, doc, add_args).parse_args(argv))


def stage_option(argv: list[str], name: str, default: str) -> str:
    """The ``--<name>`` value of a stage's command line (``--name F``, ``--name=F``, an abbreviation),
    parsed as the stage's own parser will; ``default`` when absent. For the launcher, which must read
    some of them before the stage runs."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument(f"--{name}", default=default)
    return getattr(ap.parse_known_args(argv)[0], name)


def params_option(argv: list[str]) -> str:
    """The ``--params`` file of a stage's command line: the launcher reads ``resources.<stage>.nproc``."""
    return stage_option(argv, "params", "params.yaml")


def out_option(argv: list[str], default: str | Path) -> Path:
    """The ``--out`` folder of a training stage's command line: the run folder whose lock the
    launcher holds."""
    return Path(stage_option(argv, "out", str(default)))


# --------------------------------------------------------------------------------------
# The standalone tools' settings: one rule for `arsr upscale` and `arsr evaluate --hr-dir`
# --------------------------------------------------------------------------------------
def add_tool_args(ap: argparse.ArgumentParser) -> None:
    """Options both tools take over params' eval section (the per-family sampling options come
    from the SR family registry: the tool adds them)."""
    ap.add_argument("--seed", type=int, help="sampling seed (default: params' eval.seed)")
    ap.add_argument(
        "--batch-size",
        type=int,
        help="tiles super-resolved together (memory and speed only: each tile has its own seed; "
        "default: params' resources.evaluate.batch_size)",
    )


def tool_batch_size(args: argparse.Namespace) -> int:
    """Tiles a standalone tool runs together: ``--batch-size``, else ``args.params``'
    ``resources.evaluate.batch_size`` (its environment override applies), else the default."""
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size: {args.batch_size} must be at least 1")
        return args.batch_size
    path = Path(args.params)
    return (load_params(path) if path.is_file() else parse_params({})).resources.evaluate.batch_size


def settings_summary(cfg: EvalConfig) -> dict[str, Any]:
    """The settings that decide a tool's SR outputs: seed, tiling, each family's sampling."""
    out: dict[str, Any] = {"seed": cfg.seed, "tile_overlap": cfg.tile_overlap}
    for name in EvalConfig.model_fields:
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(value):  # a family's sampling settings (eval.srvar, eval.mar)
            out[name] = dataclasses.asdict(value)
    return out


def tool_settings(tool: str, args: argparse.Namespace, sampling: dict[str, dict[str, Any]]) -> EvalConfig:
    """The eval settings of a standalone tool: ``args.params``' eval section (the schema's defaults,
    which are params.yaml's, when the file does not exist), then ``--protocol`` / ``--seed`` and the
    ``sampling`` options ({family: {field: value}}). Echoed as one line on stderr, so a log shows
    what the outputs were made with."""
    protocol, seed = getattr(args, "protocol", None), getattr(args, "seed", None)
    cfg = tool_eval_config(args.params, sampling, protocol, seed)
    found = Path(args.params).is_file()
    source = f"{args.params}'s eval section" if found else f"the defaults ({args.params} not found)"
    flags = [f"--{fam}-{field.replace('_', '-')}" for fam, over in sampling.items() for field in over]
    flags += [f"--{k}" for k in ("protocol", "seed") if getattr(args, k, None) is not None]
    if flags:
        source += f", overridden by {' '.join(flags)}"
    parts = []
    for key, value in settings_summary(cfg).items():
        if isinstance(value, dict):
            parts.append(f"{key}(" + ", ".join(f"{k}={v}" for k, v in value.items()) + ")")
        else:
            parts.append(f"{key}={value}")
    print(f"{tool}: settings from {source}: {' '.join(parts)}", file=sys.stderr, flush=True)
    return cfg


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
    # Imported here: the standalone tools (upscale, evaluate --hr-dir) import this module, and the
    # loaders are pipeline-only (WebDataset, the [pipeline] extra).
    from arsr.data.loader import train_loader

    return lambda k: iter(
        train_loader(
            urls, decode=decode, micro_batch=micro_batch, seed=seed, rank=dist.rank,
            world_size=dist.world_size, workers=workers, start_step=k,
        )
    )  # fmt: skip
