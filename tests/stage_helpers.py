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


def write_tiny_srvar(
    root: Path,
    *,
    scale: int,
    patch_nums: tuple[int, ...],
    jitter: float = 0.0,
    vqvae_extra: dict[str, Any] | None = None,
    vqvae_file: bool = False,
) -> None:
    """``root/runs/srvar/model.pt``: an untrained tiny SRVAR on a tiny hr tokenizer (8 px HR, enough
    for the standalone tools), its weights jittered by ``jitter`` x N(0, 1) so decode settings matter
    (a fresh init is near-uniform); with ``vqvae_file`` also ``root/runs/vqvae/model.pt``."""
    import torch

    from arsr.data.tokens import TokenFacts
    from arsr.infer.srvar import build_srvar
    from arsr.models.srvar import SRVARConfig
    from arsr.models.vqvae import VQVAE, VQVAEConfig
    from arsr.train.checkpoint import save_model_file

    torch.manual_seed(0)
    vae = VQVAE(
        VQVAEConfig(vocab_size=32, z_channels=16, ch=8, ch_mult=(1, 2), patch_nums=patch_nums)
    ).freeze()
    facts = TokenFacts(
        hr_size=8, scale=scale, num_classes=0, patch_nums=patch_nums, vocab_size=32, Cvae=16, target="hr",
        lr_channels=16, vqvae_sha256="0" * 64, samples=1, mean=(0.0,) * 16, std=(1.0,) * 16,
    )  # fmt: skip
    model = build_srvar(SRVARConfig(depth=1, width=32), facts)
    if jitter:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * jitter)
    vqvae = {"config": vae.model_config(), "state_dict": vae.state_dict(), "extra": vqvae_extra or {}}
    if vqvae_file:
        save_model_file(root / "runs/vqvae/model.pt", kind="vqvae", **vqvae)
    save_model_file(
        root / "runs/srvar/model.pt", kind="srvar", config=model.model_config(),
        state_dict=model.state_dict(), extra={"vqvae": vqvae, "token_facts": facts.to_dict()},
    )  # fmt: skip
