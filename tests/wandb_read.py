"""Read offline W&B runs back (wandb 0.31 has no Python reader: use `wandb leet inspect`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def offline_runs(wandb_dir: Path) -> list[Path]:
    return sorted(Path(wandb_dir).glob("offline-run-*"))


def read_run(run_dir: Path) -> list[dict]:
    """All records of one offline run directory as dicts (types: run, history, summary, ...)."""
    wandb_bin = Path(sys.executable).with_name("wandb")
    out = subprocess.run(
        [str(wandb_bin), "leet", "inspect", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def history_keys(records: list[dict]) -> set[str]:
    return {k for r in records if r.get("type") == "history" for k in r["history"]["item"]}


def run_info(records: list[dict]) -> dict:
    return next(r["run"] for r in records if r.get("type") == "run")
