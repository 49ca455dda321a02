"""Where training numbers go: W&B (rank 0, offline by default), dvc plots, and the console.

- :func:`init_wandb` / :class:`WandbRun`: a W&B run whose methods never raise. Any failure
  (bad ``WANDB_MODE``, unreachable server, init timeout) logs one warning and turns the run
  into a no-op, so W&B can never stop training. Runs are named ``<stage>-<params hash>``
  (:func:`run_name`); inputs and outputs are reference artifacts (:meth:`WandbRun.use_artifact`,
  :meth:`WandbRun.log_artifact`, :func:`declare_artifacts` for a run another module starts).
- :class:`MetricMeter`: sums of per-step metrics between two log steps (the logged value is
  the mean over that window: a smoothed value that is also exactly reproducible on resume).
- :class:`PlotWriter`: ``plots/<name>.tsv`` files (``step`` + value columns) for ``dvc plots``,
  truncated to the resumed step so a resumed run continues them consistently.
- :class:`Progress`: tqdm on a terminal; one plain line per log step in batch logs (SLURM, dvc).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arsr.train.checkpoint import NOT_DATA

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# W&B
# --------------------------------------------------------------------------------------
def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip() or "nogit"
    except (OSError, subprocess.SubprocessError):
        return "nogit"


def pipeline_group(params_file: str | Path = "params.yaml") -> str:
    """``WANDB_RUN_GROUP``, or an id derived from params.yaml and the git commit.

    Every stage of one pipeline run computes the same id without talking to the others.
    """
    if os.environ.get("WANDB_RUN_GROUP"):
        return os.environ["WANDB_RUN_GROUP"]
    p = Path(params_file)
    params = p.read_bytes() if p.is_file() else b""
    digest = hashlib.sha256(params + b"\0" + _git_commit().encode()).hexdigest()
    return f"pipe-{digest[:10]}"


def run_name(stage: str, config: dict[str, Any]) -> str:
    """``<stage>-<8 hex>``: a hash of the stage's params values, so a run says which settings made
    it (the same settings, the same name, in any pipeline group) instead of W&B's random words.

    ``config`` is the stage's params values, or a training fingerprint (``{"stage", "params",
    "inputs"}``), of which only ``params`` counts: the name is the settings', not the inputs'."""
    values = config["params"] if {"stage", "params", "inputs"} <= set(config) else config
    text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return f"{stage}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


# (artifact name, type, paths): files and folders a stage reads or writes, e.g.
# ("shards", "dataset", ["data/shards"]). W&B records them as references with checksums.
ArtifactSpec = tuple[str, str, Sequence["str | Path"]]

_declared: dict[str, list[ArtifactSpec]] = {"uses": [], "logs": []}


def declare_artifacts(uses: Sequence[ArtifactSpec] = (), logs: Sequence[ArtifactSpec] = ()) -> None:
    """The lineage of the next run :func:`init_wandb` starts in this process, for a stage whose run
    another module starts (the training engine): ``uses`` are recorded at its start, ``logs`` when it
    finishes with exit code 0 (after the outputs are written; an interrupted run has none)."""
    _declared["uses"], _declared["logs"] = list(uses), list(logs)


def _reference_artifact(name: str, type_: str, paths: Sequence[str | Path]) -> Any:
    """A draft W&B artifact of ``file://`` references to every file of ``paths`` (absolute, as the
    workspace names them: a DVC cache link is not followed), or None when none exists.

    W&B stores each file's checksum, never its bytes (DVC already keeps them), so the artifact's
    digest is a function of the paths and contents: the stage that writes the files and every stage
    that reads them build the same digest. Runner bookkeeping (a Snakemake timestamp that appears
    in a folder after its producer finished) is left out, or readers would see other contents."""
    import wandb

    art = wandb.Artifact(name, type=type_)
    for p in (Path(os.path.abspath(x)) for x in paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.name not in NOT_DATA)
            entries = [(f, f"{p.name}/{f.relative_to(p).as_posix()}") for f in files]
        else:
            entries = [(p, p.name)] if p.is_file() else []
        for f, entry in entries:
            art.add_reference(f"file://{f}", name=entry)
    return art if art.manifest.entries else None


class WandbRun:
    """A W&B run (or a no-op one); no method raises."""

    def __init__(self, run: Any = None, logs_at_finish: Sequence[ArtifactSpec] = ()):
        self._run = run
        self._logs_at_finish = list(logs_at_finish)

    @property
    def id(self) -> str | None:
        return self._run.id if self._run is not None else None

    @property
    def enabled(self) -> bool:
        return self._run is not None

    def _guard(self, what: str, fn: Any, keep_run: bool = False) -> None:
        if self._run is None:
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - W&B must never stop training
            if keep_run:  # lineage is extra: its failure leaves the metrics flowing
                log.warning("W&B %s failed (%s: %s)", what, type(err).__name__, err)
                return
            log.warning(
                "W&B %s failed (%s: %s); W&B is off for the rest of this run", what, type(err).__name__, err
            )
            self._run = None

    def log_artifact(self, name: str, type: str, paths: Sequence[str | Path]) -> None:  # noqa: A002
        """Record ``paths`` as this run's output artifact ``name`` (file references with checksums:
        nothing is uploaded). Files of the same contents again make no new version."""

        def go() -> None:
            art = _reference_artifact(name, type, paths)
            if art is not None:
                self._run.log_artifact(art)

        self._guard(f"log_artifact {name}", go, keep_run=True)

    def use_artifact(self, name: str, type: str, paths: Sequence[str | Path]) -> None:  # noqa: A002
        """Record ``paths`` as an input of this run: the artifact ``name`` built from the files as
        they are now, which W&B resolves by its digest to the version the producing run logged.

        No ``name:version`` lookup, which needs the server (an offline run has none) and could pick
        another experiment's newer version. Online this is ``run.use_artifact(draft)``. Offline
        ``run.use_artifact`` refuses, so this makes the very call it makes online for a draft: an
        artifact record flagged user-created and use-after-commit goes into the run's .wandb file,
        and ``wandb sync`` creates it with digest deduplication (the producer's version when the
        producer's run was synced first) and then marks that version used by this run."""

        def go() -> None:
            art = _reference_artifact(name, type, paths)
            if art is None:
                return
            if self._run.offline:
                self._run._log_artifact(art, is_user_created=True, use_after_commit=True)
            else:
                self._run.use_artifact(art)

        self._guard(f"use_artifact {name}", go, keep_run=True)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self._guard("log", lambda: self._run.log(metrics, step=step))

    def _log_media(self, what: str, data: Any, step: int | None) -> None:
        # Without a step, media join the row being built instead of committing one of their
        # own: a commit would advance W&B's step, and the trainer's next log at the same
        # optimizer step would be dropped as going backwards.
        kwargs = {"step": step} if step is not None else {"commit": False}
        self._guard(what, lambda: self._run.log(data(), **kwargs))

    def log_images(
        self, key: str, images: Sequence[Any], captions: Sequence[str] | None = None, step: int | None = None
    ) -> None:
        """``images``: HWC uint8 arrays/tensors, PIL images or image file paths."""

        def data() -> dict[str, Any]:
            import wandb

            caps = list(captions) if captions is not None else [None] * len(images)
            items = [
                wandb.Image(im.cpu().numpy() if isinstance(im, torch.Tensor) else im, caption=c)
                for im, c in zip(images, caps)
            ]
            return {key: items}

        self._log_media("log_images", data, step)

    def log_table(
        self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None
    ) -> None:
        """A W&B Table; cells that are uint8 image arrays ((H, W) or (H, W, 3)) become wandb.Images."""

        def cell(v: Any) -> Any:
            import wandb

            if isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim in (2, 3):
                return wandb.Image(v)
            return v

        def data() -> dict[str, Any]:
            import wandb

            return {key: wandb.Table(columns=list(columns), data=[[cell(v) for v in r] for r in rows])}

        self._log_media("log_table", data, step)

    def summary_update(self, values: dict[str, Any]) -> None:
        self._guard("summary_update", lambda: self._run.summary.update(values))

    def finish(self, exit_code: int | None = None) -> None:
        if not exit_code:  # a failed or interrupted stage has no outputs to record
            for spec in self._logs_at_finish:
                self.log_artifact(*spec)
        self._logs_at_finish = []
        self._guard("finish", lambda: self._run.finish(exit_code=exit_code))
        self._run = None


def wandb_service_alive() -> bool:
    """Whether the service named by WANDB_SERVICE belongs to this process (wandb sets it at init)
    and, for a unix-socket service, its socket still exists (an idle service can exit, e.g. while a
    test runner waits minutes on a subprocess, leaving the variable behind)."""
    token = os.environ.get("WANDB_SERVICE", "")
    if f"-{os.getpid()}-" not in token:
        return False
    unix = re.search(r"-\d+-unix-(.+)$", token)
    return unix is None or Path(unix.group(1)).exists()


def init_wandb(
    stage: str,
    config: dict[str, Any],
    *,
    out_dir: str | Path = "runs",
    rank: int = 0,
    run_id: str | None = None,
) -> WandbRun:
    """Start (or, with ``run_id``, continue) this stage's W&B run; a no-op run off rank 0.

    Mode from ``WANDB_MODE`` (default offline), files under ``<out_dir>/wandb``, project from
    ``WANDB_PROJECT`` (default arsr), group from :func:`pipeline_group`, ``job_type=stage``, name
    from :func:`run_name`. Artifacts declared by :func:`declare_artifacts` are used at the start
    and logged by a successful :meth:`WandbRun.finish`.
    """
    uses, logs = _declared["uses"], _declared["logs"]
    declare_artifacts()  # consumed by this run, whatever happens: never inherited by the next one
    mode = os.environ.get("WANDB_MODE", "offline")
    if rank != 0 or mode == "disabled":
        return WandbRun(None)
    out = Path(out_dir).resolve()
    # Keep W&B's staging, cache and downloads under the run folder (hermetic CI, nothing written to
    # ~/.local or ~/.cache). Not WANDB_CONFIG_DIR: it holds the user's settings, e.g. the server of
    # `wandb login --host`, which must keep applying; W&B only reads it here.
    for var, sub in [
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ]:
        os.environ.setdefault(var, str(out / "wandb" / "_env" / sub))
    os.environ.setdefault("WANDB_SILENT", "true")
    # A WANDB_SERVICE inherited from a parent process (a test runner, a notebook) points at a
    # service socket that may be gone; every arsr process starts its own service.
    if os.environ.get("WANDB_SERVICE") and not wandb_service_alive():
        os.environ.pop("WANDB_SERVICE")
    try:
        import wandb

        (out / "wandb").mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "arsr"),
            group=pipeline_group(),
            job_type=stage,
            name=run_name(stage, config),
            config=config,
            dir=str(out),
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(silent=True, console="off"),
        )
    except Exception as err:  # noqa: BLE001 - W&B must never stop training
        log.warning("W&B init failed (%s: %s); going on without W&B", type(err).__name__, err)
        return WandbRun(None)
    wrun = WandbRun(run, logs_at_finish=logs)
    for spec in uses:
        wrun.use_artifact(*spec)
    return wrun


# --------------------------------------------------------------------------------------
# Metrics between log steps
# --------------------------------------------------------------------------------------
class MetricMeter:
    """Per-key sums and counts since the last :meth:`flush` (kept as tensors: no sync per step)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def update(self, metrics: dict[str, float | torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def flush(self) -> dict[str, tuple[float, int]]:
        """Local ``{key: (sum, count)}``, then reset."""
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k].reshape(()).cpu() for k in keys]).tolist() if keys else []
        out = {k: (v, self.counts[k]) for k, v in zip(keys, values)}
        self.sums, self.counts = {}, {}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.counts = dict(state["sums"]), dict(state["counts"])


def merge_sums(per_rank: list[dict[str, tuple[float, float]]]) -> dict[str, float]:
    """Means over all ranks of ``{key: (sum, count)}`` dicts."""
    tot: dict[str, list[float]] = {}
    for d in per_rank:
        for k, (s, n) in d.items():
            acc = tot.setdefault(k, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(n)
    return {k: s / n for k, (s, n) in sorted(tot.items()) if n > 0}


# --------------------------------------------------------------------------------------
# dvc metrics and plots
# --------------------------------------------------------------------------------------
_PER_SCALE = re.compile(r"_s\d+$")


def final_metrics(step: int, train: dict[str, float], val: dict[str, float]) -> dict[str, Any]:
    """A training stage's ``metrics.json``, what ``dvc exp show`` / ``dvc metrics diff`` compare: the
    final validation values and training loss. Per-scale breakdowns (``*_s<k>``), the lr and the
    gradient norm stay in ``plots/`` and W&B, so experiments compare in a terminal's width."""
    out: dict[str, Any] = {"step": step, "val": {k: v for k, v in val.items() if not _PER_SCALE.search(k)}}
    if "loss" in train:
        out["train"] = {"loss": train["loss"]}
    return out


def _plot_name(key: str) -> str:
    return key.replace("/", "_")


class PlotWriter:
    """``<plots_dir>/<name>.tsv`` with a header ``step<TAB><name>`` and one row per logged step."""

    def __init__(self, plots_dir: str | Path):
        self.dir = Path(plots_dir)

    def truncate_after(self, step: int) -> None:
        """Drop rows beyond ``step`` (and any half-written last line) before a run continues."""
        if not self.dir.is_dir():
            return
        for f in sorted(self.dir.glob("*.tsv")):
            lines = f.read_text().splitlines(keepends=True)
            kept = lines[:1]
            for line in lines[1:]:
                parts = line.rstrip("\n").split("\t")
                if line.endswith("\n") and len(parts) == 2 and parts[0].isdigit() and int(parts[0]) <= step:
                    kept.append(line)
            if kept != lines:
                f.write_text("".join(kept))

    def append(self, step: int, values: dict[str, float]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for key, value in values.items():
            name = _plot_name(key)
            f = self.dir / f"{name}.tsv"
            new = not f.exists()
            with open(f, "a") as fh:
                if new:
                    fh.write(f"step\t{name}\n")
                fh.write(f"{step}\t{value!r}\n")


# --------------------------------------------------------------------------------------
# Console
# --------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}"


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Rank-0 progress with smoothed values, it/s and ETA; silent elsewhere."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.step, self.enabled = total, initial, enabled
        self.bar = None
        self._mark = (time.perf_counter(), initial)
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.step)
        self.step = step

    def show(self, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        text = {k: _fmt(v) for k, v in values.items()}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=True)
            return
        now = time.perf_counter()
        t0, s0 = self._mark
        rate = (self.step - s0) / max(now - t0, 1e-9)
        self._mark = (now, self.step)
        eta = (self.total - self.step) / rate if rate > 0 else float("inf")
        body = "  ".join(f"{k} {v}" for k, v in text.items())
        print(
            f"step {self.step}/{self.total}  {body}  | {rate:.2f} it/s  ETA {_hms(eta)}",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
