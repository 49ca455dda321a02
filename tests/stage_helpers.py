"""What the stage tests share: one torch thread per test, and params.yaml files from a tiny base."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a busy 2-core machine: a second intra-op thread only adds spin-waits.
    Autouse in every test module that imports it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_params_file(folder: Path, base: dict[str, Any], **over: Any) -> Path:
    """``folder/params.yaml`` = ``base`` with dotted overrides (``"srvar.train.max_steps": 4``)."""
    params = yaml.safe_load(yaml.safe_dump(base))
    for dotted, value in over.items():
        node = params
        *path, last = dotted.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def last_plotted(run_dir: Path, name: str) -> float:
    """The last value of ``run_dir/plots/<name>.tsv`` (per-scale and lr/grad-norm values live in the
    plots, metrics.json holds the final headline values only)."""
    rows = (run_dir / "plots" / f"{name}.tsv").read_text().splitlines()
    return float(rows[-1].split("\t")[1])
