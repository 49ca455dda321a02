"""Stage `tokenize`: encode every image shard once with the trained VQVAE (DESIGN §3).

    python -m arsr.stages.tokenize [--params params.yaml] [--shards data/shards]
                                   [--model runs/vqvae/model.pt] [--out data/tokens]

Reads the image shards and the VQVAE's EMA weights (and ``resources.tokenize`` from params.yaml: no
science parameter). For every
``data/shards/{split}-NNNNNN.tar`` it writes ``data/tokens/{split}-NNNNNN.tar`` with the same
keys, in the same order:

- ``{key}.idx.npy``  int16 [L]          multi-scale token indices (scales concatenated);
- ``{key}.f.npy``    float16 [Cv, h, w] pre-quantization latent of the HR crop (of its normalised
  residual over the base for ``vqvae.target: residual``);
- ``{key}.lrf.npy``  float16 [C_lr, h, w] the LR crop's condition
  (:func:`arsr.infer.tokenizer.lr_condition`: for the residual tokenizer the base's trunk features
  pooled to the token grid; for the hr one the encoder of the MATLAB-bicubic LR), the very function
  every upscaler calls at inference;
- ``{key}.cls``      the class index, copied.

and ``latent_stats.json``, the :class:`~arsr.data.tokens.TokenFacts` every later stage reads:
per-channel mean/std of ``f`` (as stored, float16) over the train split (what MAR normalizes its
targets with), the tokenizer's facts (vocab_size, patch_nums, Cvae, the sha256 of model.pt) and the
data's (hr_size, scale, num_classes).

``resources.tokenize.workers`` processes (at most the CPUs) each take whole shards; each encodes in
batches of ``resources.tokenize.batch_size`` with one torch thread, so the bytes of every tar (mtime 0,
fixed owner, renamed into place when complete) and of latent_stats.json depend on neither (both are
resources: changing them reruns nothing). One thread: on a 2-core CPU 3 threads gave other float16
bits than 1, 2, 4 or 8. Batches: torch convolves a batch of one sample another way (its native
kernel, not oneDNN's) with other last bits, so a short batch is padded to ``MIN_ROWS`` rows.
Throughput goes to ``runs/tokenize/timing.json`` and, with the sample count and the code usage of the
tokens' last scale, to W&B (which records shards + VQVAE -> tokens).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from arsr.config import Params, stage_param_values
from arsr.data.loader import count_samples, load_shard_stats, to_unit_range
from arsr.data.shards import SPLITS, decode_png, iter_tar_samples, shard_urls
from arsr.data.tokens import TokenFacts
from arsr.infer.tokenizer import load_tokenizer_file, lr_condition
from arsr.io import file_sha256, write_json
from arsr.models.residual import SRTokenizer
from arsr.proc import spawn_pool, usable_cpus
from arsr.progress import progress
from arsr.provenance import machine_info
from arsr.stages.common import (
    RUNS_DIR,
    SHARDS_DIR,
    TOKENS_DIR,
    StageError,
    default_device,
    model_artifact,
    shards_artifact,
    stage_main,
    tokens_artifact,
)
from arsr.train.logging import init_wandb

PARAMS: tuple[str, ...] = ()  # no science parameter: the bytes follow the shards and the VQVAE

# Rows every encoded batch has at least (a short one is padded with copies of its samples): ATen
# picks oneDNN's convolution for >= 16 rows (its rule for 1x1 kernels, the strictest) and the native
# one for a single row, which gives other last bits; padded, every batch size gives the same bytes.
MIN_ROWS = 16

INT16_MAX_VOCAB = 2**15  # idx is stored as int16


def npy_bytes(arr: np.ndarray) -> bytes:
    """Deterministic .npy encoding (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@torch.no_grad()
def encode_batch(tok: SRTokenizer, samples: list[dict]) -> tuple[list[dict], np.ndarray]:
    """Raw image-shard samples -> (token-shard samples (bytes per member suffix), f as stored
    float16 [B, Cv, h, w])."""
    rows = [samples[i % len(samples)] for i in range(max(MIN_ROWS, len(samples)))]  # (see MIN_ROWS)
    hr = np.stack([decode_png(s["hr.png"]) for s in rows])
    lr = [decode_png(s["lr.png"]) for s in rows]
    device = next(tok.parameters()).device
    lr_B3hw = torch.stack([to_unit_range(a) for a in lr]).to(device) if tok.target == "residual" else None
    f_BChw = tok.img_to_f(torch.stack([to_unit_range(a) for a in hr]).to(device), lr_B3hw)
    idx_BL = torch.cat(tok.vae.f_to_idxBl(f_BChw), dim=1).to(torch.int16).cpu().numpy()
    f16 = f_BChw.to(torch.float16).cpu().numpy()
    lrf16 = lr_condition(tok, lr, hr.shape[1]).cpu().numpy()
    out = [
        {
            "__key__": s["__key__"],
            "idx.npy": npy_bytes(idx_BL[i]),
            "f.npy": npy_bytes(f16[i]),
            "lrf.npy": npy_bytes(lrf16[i]),
            "cls": s["cls"],
        }
        for i, s in enumerate(samples)
    ]
    return out, f16[: len(samples)]


# --------------------------------------------------------------------------------------
# One shard (runs in a worker process)
# --------------------------------------------------------------------------------------
_worker: dict[str, Any] = {}


def _init_worker(model_path: str, batch_size: int, counter: Any) -> None:
    torch.set_num_threads(1)  # one thread per process: bytes independent of the CPUs (module doc)
    _, tok = load_tokenizer_file(model_path, default_device())  # GPU bytes differ from CPU's in the last bits
    _worker.update(tok=tok, batch_size=batch_size, counter=counter)


def _tick(n: int) -> None:
    counter = _worker["counter"]
    if counter is not None:
        with counter.get_lock():
            counter.value += n


def _batches(samples: Any, n: int) -> Any:
    batch: list[dict] = []
    for s in samples:
        batch.append(s)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_shard(task: tuple[str, str]) -> dict[str, Any]:
    """Encode ``src`` into ``dst`` (written as ``dst.tmp``, renamed when complete).

    Returns the sample count, float64 per-channel sums of ``f`` and ``f^2`` (as stored) and how
    often each code occurs on the last scale (W&B's ``code_usage``)."""
    src, dst = task
    tok, batch_size = _worker["tok"], _worker["batch_size"]
    vae = tok.vae
    tmp = dst + ".tmp"
    n, s1, s2 = 0, np.zeros(vae.Cvae), np.zeros(vae.Cvae)
    codes, last_l = np.zeros(vae.V, dtype=np.int64), vae.patch_nums[-1] ** 2
    try:
        with open(tmp, "wb") as fh:
            writer = wds.TarWriter(fh, user="arsr", group="arsr", mode=0o444, mtime=0.0, encoder=False)
            for batch in _batches(iter_tar_samples([src]), batch_size):
                encoded, f16_BChw = encode_batch(tok, batch)
                for sample in encoded:
                    writer.write(sample)
                    idx = np.load(io.BytesIO(sample["idx.npy"]), allow_pickle=False)[-last_l:]
                    codes += np.bincount(idx.astype(np.int64), minlength=vae.V)
                for f in f16_BChw.astype(np.float64):  # sample by sample: sums that batching cannot reorder
                    s1 += f.sum(axis=(1, 2))
                    s2 += np.square(f).sum(axis=(1, 2))
                n += len(batch)
                _tick(len(batch))
            writer.close()
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"samples": n, "sum": s1, "sumsq": s2, "positions": n * last_l, "codes": codes}


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------
def _run_tasks(tasks: list[tuple[str, str]], model: Path, batch_size: int, workers: int, total: int) -> list:
    """Encode every shard with ``workers`` processes (in this process when 1), showing progress."""
    bar = progress(total=total, desc="tokenize", unit="img")
    if workers == 1:
        threads = torch.get_num_threads()
        _init_worker(str(model), batch_size, None)
        try:
            results = []
            for task in tasks:
                results.append(encode_shard(task))
                bar.update(results[-1]["samples"])
        finally:
            torch.set_num_threads(threads)
            bar.close()
        return results
    ctx = get_context("spawn")
    counter = ctx.Value("q", 0)
    # Workers that die with this process: a killed stage leaves none encoding on, or waiting forever.
    with spawn_pool(workers, _init_worker, (str(model), batch_size, counter), threads=1) as pool:
        pending = pool.map_async(encode_shard, tasks, chunksize=1)
        while not pending.ready():
            pending.wait(0.5)
            bar.update(counter.value - bar.n)
        results = pending.get()  # re-raises a worker's exception
    bar.update(total - bar.n)
    bar.close()
    return results


def token_facts(
    results: list[dict], vae_config: dict, model_sha: str, shard_stats: dict, target: str, lr_channels: int
) -> TokenFacts:
    """Per-channel mean/std of the stored train latents, plus the tokenizer's and the data's facts."""
    n = sum(r["positions"] for r in results)
    mean = sum(r["sum"] for r in results) / n
    std = np.sqrt(np.maximum(sum(r["sumsq"] for r in results) / n - mean**2, 0.0))
    return TokenFacts(
        hr_size=int(shard_stats["hr_size"]), scale=int(shard_stats["scale"]),
        num_classes=int(shard_stats.get("num_classes", 0)), patch_nums=tuple(vae_config["patch_nums"]),
        vocab_size=int(vae_config["vocab_size"]), Cvae=int(vae_config["z_channels"]), target=target,
        lr_channels=lr_channels, vqvae_sha256=model_sha,
        samples=sum(r["samples"] for r in results), mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
    )  # fmt: skip


def run_tokenize(
    params: Params,
    shards: str | Path = SHARDS_DIR,
    model: str | Path = RUNS_DIR / "vqvae" / "model.pt",
    out: str | Path = TOKENS_DIR,
    runs: str | Path = RUNS_DIR,
) -> TokenFacts:
    """Write the token shards and their facts (latent_stats.json); returns the facts."""
    cfg, shards, model, out = params.resources.tokenize, Path(shards), Path(model), Path(out)
    t0 = time.perf_counter()
    if not model.is_file():
        raise FileNotFoundError(f"{model} not found (run train_vqvae first)")
    entry, tok = load_tokenizer_file(model)
    vae_config = entry["config"]
    if vae_config["vocab_size"] > INT16_MAX_VOCAB:
        raise StageError(f"vocab_size {vae_config['vocab_size']} does not fit the int16 token files")
    urls = {split: shard_urls(shards, split) for split in SPLITS}
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(u, str(out / Path(u).name)) for split in SPLITS for u in urls[split]]
    total = sum(count_samples(u) for u, _ in tasks)
    workers = max(1, min(cfg.workers, len(tasks), usable_cpus()))  # (1 thread each)
    results = _run_tasks(tasks, model, cfg.batch_size, workers, total)

    keep = {Path(dst).name for _, dst in tasks}
    for stale in out.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if stale.name not in keep:
            stale.unlink()
    train_results = [r for (src, _), r in zip(tasks, results) if src in urls["train"]]
    facts = token_facts(
        train_results, vae_config, file_sha256(model), load_shard_stats(shards), tok.target, tok.lr_channels
    )
    facts.write(out)

    elapsed = time.perf_counter() - t0
    n = sum(r["samples"] for r in results)
    timing = {
        "seconds": round(elapsed, 3),
        "images": n,
        "images_per_s": round(n / elapsed, 2),
        "workers": workers,
        "machine": machine_info(),
    }
    write_json(Path(runs) / "tokenize" / "timing.json", timing)
    _log_wandb(params, timing, results, shards, model, out, Path(runs))
    print(f"tokenize: {n} samples in {elapsed:.1f} s ({n / elapsed:.1f} img/s, {workers} workers) -> {out}")
    return facts


def _log_wandb(
    params: Params, timing: dict, results: list[dict], shards: Path, model: Path, out: Path, runs: Path
) -> None:
    """The stage's W&B run: samples, throughput, code usage (the fraction of the V codes the tokens'
    last scale uses, train and val, as train_vqvae's ``code_usage``); shards + VQVAE -> tokens."""
    run = init_wandb("tokenize", stage_param_values(params, PARAMS), out_dir=runs)
    codes = sum(r["codes"] for r in results)
    values = {
        "samples": timing["images"], "samples_per_s": timing["images_per_s"],
        "seconds": timing["seconds"], "workers": timing["workers"],
    }  # fmt: skip
    values["code_usage"] = float((codes > 0).mean()) if len(results) else 0.0
    run.log(values)
    run.summary_update(values)
    run.use_artifact(*shards_artifact(shards))
    run.use_artifact(*model_artifact("vqvae", model))
    run.log_artifact(*tokens_artifact(out))
    run.finish()


def _add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shards", default=str(SHARDS_DIR), help="image shards (default: data/shards)")
    ap.add_argument("--model", default=str(RUNS_DIR / "vqvae" / "model.pt"), help="the VQVAE model.pt")
    ap.add_argument("--out", default=str(TOKENS_DIR), help="output folder (default: data/tokens)")
    ap.add_argument("--runs", default=str(RUNS_DIR), help="timing.json and W&B files (default: runs)")


def main(argv: list[str] | None = None) -> int:
    return stage_main(
        "tokenize", __doc__, lambda a, p: run_tokenize(p, a.shards, a.model, a.out, a.runs), argv, _add_args
    )


if __name__ == "__main__":
    sys.exit(main())
