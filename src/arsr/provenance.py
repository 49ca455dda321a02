"""Where a result was measured: the machine, the software and the code.

Training numerics depend on the machine (bf16 kernels differ between Intel AMX and AMD
avx512_bf16: the same commit's SRVAR token accuracy measured 36.5% on one, 18.1% on another), so
every stage writes :func:`machine_info` into its ``runs/<stage>/timing.json`` and the report
prints it next to the numbers. No arsr imports here: every layer may use it.
"""

from __future__ import annotations

import platform
import subprocess
from functools import cache
from typing import Any

from arsr.proc import usable_cpus


def _cpu_model() -> tuple[str, set[str]]:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model or platform.machine(), flags


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


@cache
def machine_info() -> dict[str, Any]:
    """``{cpu, cpus, bf16, gpu, torch, python, commit, code_modified}`` of this process: the CPU
    model and how many CPUs it may use, the bf16 instruction set (``amx``, ``avx512_bf16`` or
    ``none``), the GPU name (None without CUDA), and the git commit with whether ``src/`` differs
    from it (None outside a git checkout)."""
    import torch

    model, flags = _cpu_model()
    bf16 = "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "none"
    cpus = usable_cpus()  # (affinity, SLURM, cgroup quota, a runner's share)
    head = _git("rev-parse", "--short=10", "HEAD")
    commit = head.stdout.strip() if head is not None and head.returncode == 0 else None
    modified = None
    if commit:
        diff = _git("diff", "--quiet", "HEAD", "--", "src")
        modified = diff is not None and diff.returncode == 1
    return {
        "cpu": model,
        "cpus": cpus,
        "bf16": bf16,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "code_modified": modified,
    }


def describe(info: dict[str, Any]) -> str:
    """One line for people, e.g. ``AMD EPYC (2 CPUs, avx512_bf16), torch 2.13.0+cpu, commit 4772b1c0de``."""
    cpu = f"{info.get('cpu', '?')} ({info.get('cpus', '?')} CPUs, {info.get('bf16', '?')})"
    where = f"{info['gpu']} GPU, {cpu}" if info.get("gpu") else cpu
    commit = info.get("commit") or "no git commit"
    if info.get("code_modified"):
        commit += " (src modified)"
    return f"{where}, torch {info.get('torch', '?')}, commit {commit}"
