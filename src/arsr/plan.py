"""The whole plan for the target machines, checked before anything runs.

    arsr check --nodes 2 --gpus-per-node 4     # the check stage, for a 2-node job with 4 GPUs each

params.yaml's schema (:mod:`arsr.config`) checks what the file alone decides, for the ranks
``resources.<stage>.nproc`` of one node. Whether the same params suit the machines a training job
will get is a question of the target: each training stage runs on ``nodes`` nodes with
``ranks_per_node`` ranks each (on GPU nodes: one rank per GPU, whatever ``nproc`` says) and
``resources.<stage>.accum`` micro-steps per optimizer step, so its global batch must divide into
``nodes x ranks_per_node x accum`` micro-batches. :func:`plan_problems` lists every problem, each
naming the setting to change and suggesting a value; :func:`plan_summary` says what each training
stage will run.

Not checked, because it is no limit: the shard count. A rank's loader reads any sample of any shard
(a global permutation of sample offsets, :mod:`arsr.data.loader`), so ranks x loader workers may
exceed the shards of a split.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from arsr.config import TRAINING_STAGES, Params

GIB = 1 << 30
MIN_FREE_ENV = "ARSR_MIN_FREE_GB"
DEFAULT_MIN_FREE_GB = 1.0
# The workspace's output folders: one may be a link to another filesystem (scratch).
OUTPUT_DIRS = ("data", "runs", "eval", "reports")


@dataclass(frozen=True)
class StageTarget:
    """Where one training stage runs: ``nodes`` x ``ranks_per_node`` ranks, ``accum`` micro-steps."""

    stage: str  # train_srvar
    section: str  # srvar: its global batch is <section>.train.batch_size
    batch_size: int
    nodes: int
    ranks_per_node: int  # the node's GPUs when gpus_per_node > 0, else resources.<stage>.nproc
    accum: int
    gpus_per_node: int = 0  # 0: CPU ranks
    nproc: int = 1  # resources.<stage>.nproc (replaced by the GPU count on GPU nodes)
    # Where the target's nodes and GPUs per node are set (`arsr check`'s options, or Snakemake's config)
    setting_names: tuple[str, str] = ("--nodes", "--gpus-per-node")

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step, over all ranks."""
        return self.world_size * self.accum

    @property
    def micro_batch(self) -> int | None:
        """Samples per rank and micro-step (None: the batch does not divide)."""
        return None if self.batch_size % self.micro_batches else self.batch_size // self.micro_batches

    def _ranks_text(self) -> str:
        if self.gpus_per_node:
            nproc = f"resources.{self.stage}.nproc {self.nproc}"
            replaced = "" if self.nproc == self.gpus_per_node else f", not {nproc}"
            return f"{self.ranks_per_node} ranks per node (the node's GPUs{replaced})"
        return f"{self.ranks_per_node} ranks per node (resources.{self.stage}.nproc)"

    def summary(self) -> str:
        mb, n = self.micro_batch, self.micro_batches
        split = (
            f"{n} micro-batches of {mb} (per rank and micro-step)"
            if mb
            else f"does not divide into {n} micro-batches"
        )
        return (
            f"{self.stage}: {self.nodes} node(s) x {self._ranks_text()} x accum {self.accum}: "
            f"global batch {self.batch_size} ({self.section}.train.batch_size): {split}"
        )

    def problem(self) -> str | None:
        """Why the global batch does not fit this target (naming the keys to change), or None."""
        b, d = self.batch_size, self.micro_batches
        if b % d == 0:
            return None
        key, res = f"{self.section}.train.batch_size", f"resources.{self.stage}"
        nodes_name, gpus_name = self.setting_names
        ranks = gpus_name if self.gpus_per_node else f"{res}.nproc"
        below = b - b % d
        nearest = sorted({below, below + d} - {0}, key=lambda v: (abs(v - b), v))
        fix = f"set {key} to a multiple of {d} (nearest: {' or '.join(map(str, nearest))})"
        if b % self.world_size == 0:  # an accum that divides the per-rank batch would do too
            per_rank = b // self.world_size
            accum = max(a for a in range(1, self.accum + 1) if per_rank % a == 0)
            fix += f", or {res}.accum to {accum} (a divisor of the {per_rank} samples per rank)"
        others = f"{nodes_name} or {ranks}" if self.gpus_per_node else f"{ranks}, {res}.accum or {nodes_name}"
        return (
            f"{key}: {b} is not divisible by {self.nodes} node(s) ({nodes_name}) x "
            f"{self.ranks_per_node} ranks per node ({ranks}) x accum {self.accum} ({res}.accum) = {d}; "
            f"{fix}; or change {others}"
        )


def stage_targets(
    params: Params, nodes: int = 1, gpus_per_node: int = 0, setting_names: tuple[str, str] | None = None
) -> list[StageTarget]:
    """One :class:`StageTarget` per training stage, for jobs of ``nodes`` nodes with ``gpus_per_node``
    GPUs each (0: CPU nodes, ranks from ``resources.<stage>.nproc``); ``setting_names``: where those
    two are set, for the messages (default: `arsr check`'s options)."""
    names = {"setting_names": setting_names} if setting_names else {}
    if nodes < 1:
        raise ValueError(f"nodes: {nodes} must be at least 1")
    if gpus_per_node < 0:
        raise ValueError(f"gpus_per_node: {gpus_per_node} must be 0 (CPU) or more")
    out = []
    for stage, section in TRAINING_STAGES.items():
        res = getattr(params.resources, stage)
        out.append(
            StageTarget(
                stage=stage, section=section, batch_size=getattr(params, section).train.batch_size,
                nodes=nodes, ranks_per_node=gpus_per_node or res.nproc, accum=res.accum,
                gpus_per_node=gpus_per_node, nproc=res.nproc, **names,
            )
        )  # fmt: skip
    return out


def min_free_bytes(env: Mapping[str, str] | None = None) -> int:
    """The free disk a run needs at least: ``$ARSR_MIN_FREE_GB`` GiB, else 1 GiB."""
    env = os.environ if env is None else env
    text = env.get(MIN_FREE_ENV, "").strip()
    if not text:
        return int(DEFAULT_MIN_FREE_GB * GIB)
    try:
        gib = float(text)
    except ValueError:
        gib = -1.0
    if not gib >= 0:  # (NaN too)
        raise ValueError(f"${MIN_FREE_ENV}: {text!r} is not a number of GiB (0 or more)")
    return int(gib * GIB)


def workspace_paths(workspace: str | Path = ".") -> list[Path]:
    """The workspace and those of its output folders that exist, one per filesystem."""
    root = Path(workspace)
    seen, out = set(), []
    for path in [root, *(root / d for d in OUTPUT_DIRS)]:
        try:
            dev = path.stat().st_dev
        except OSError:
            continue
        if dev not in seen:
            seen.add(dev)
            out.append(path)
    return out


def disk_problems(paths: Iterable[str | Path], min_free: int) -> list[str]:
    """One problem per path whose filesystem has no more than ``min_free`` bytes free."""
    out = []
    for path in paths:
        free = shutil.disk_usage(path).free
        if free <= min_free:
            out.append(
                f"free disk: {Path(path).resolve()} has {free / GIB:.2f} GiB free, at least "
                f"{min_free / GIB:.2f} GiB needed; free some space (${MIN_FREE_ENV} sets the minimum)"
            )
    return out


def plan_problems(
    params: Params,
    nodes: int = 1,
    gpus_per_node: int = 0,
    workspace: str | Path = ".",
    min_free: int | None = None,
    env: Mapping[str, str] | None = None,
    setting_names: tuple[str, str] | None = None,
) -> list[str]:
    """Every problem of running ``params``' DAG on jobs of ``nodes`` nodes with ``gpus_per_node``
    GPUs each (0: CPU) in ``workspace``; empty if none. Each names the key or setting to change.
    ``min_free`` (bytes) defaults to ``$ARSR_MIN_FREE_GB`` of ``env`` (this process's), else 1 GiB."""
    targets = stage_targets(params, nodes, gpus_per_node, setting_names)
    problems = [p for t in targets if (p := t.problem())]
    if min_free is None:
        try:
            min_free = min_free_bytes(env)
        except ValueError as err:
            return [*problems, str(err)]
    return problems + disk_problems(workspace_paths(workspace), min_free)


def plan_summary(params: Params, nodes: int = 1, gpus_per_node: int = 0) -> list[str]:
    """One line per training stage: nodes x ranks per node x accum, and the micro-batch per rank."""
    return [t.summary() for t in stage_targets(params, nodes, gpus_per_node)]


__all__ = [
    "DEFAULT_MIN_FREE_GB",
    "MIN_FREE_ENV",
    "StageTarget",
    "disk_problems",
    "min_free_bytes",
    "plan_problems",
    "plan_summary",
    "stage_targets",
    "workspace_paths",
]
