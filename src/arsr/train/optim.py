"""AdamW with per-model weight-decay groups, and the lr schedule.

lr follows VAR and MAR: ``peak = base_lr * global_batch / 256``; a linear warm-up over
``warmup_steps``; then either ``lin0`` (VAR: hold the peak for 5% of the remaining steps, then
fall linearly) or ``cos`` (half a cosine), both ending at ``END_RATIO * peak``. The lr is a pure
function of the step, so resuming needs only the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # config imports models and infer; only the type is needed here
    from arsr.config import TrainConfig


NoDecayRule = Callable[[str, nn.Parameter], bool]

BETAS = (0.9, 0.95)  # VAR and MAR both use beta2 = 0.95
END_RATIO = 0.01  # lr at the last step, as a fraction of the peak (VAR's wpe)
LIN0_HOLD = 0.05  # lin0 stays at the peak for this fraction of the post-warm-up steps


def default_no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """The rule every model starts from: no decay on biases, norms' gains and other 1-D params."""
    return param.ndim <= 1 or name.endswith("bias")


def param_groups(model: nn.Module, weight_decay: float, no_weight_decay: NoDecayRule) -> list[dict]:
    """Two AdamW groups, decayed and exempt, over the trainable parameters."""
    decay, exempt = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (exempt if no_weight_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": exempt, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, no_weight_decay: NoDecayRule) -> torch.optim.AdamW:
    fused = next(model.parameters()).is_cuda  # fused kernels on GPU; the foreach path on CPU
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, no_weight_decay), lr=peak_lr(cfg), betas=BETAS, fused=fused
    )


def peak_lr(cfg: TrainConfig) -> float:
    return cfg.base_lr * cfg.batch_size / 256


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr for the update that step ``step`` (0-based) makes."""
    warm = cfg.warmup_steps
    if step < warm:
        return (step + 1) / warm
    decay_steps = max(1, cfg.max_steps - warm)
    t = min(1.0, (step - warm) / decay_steps)  # 0 -> 1 over the post-warm-up steps
    if cfg.schedule == "lin0":
        t = max(0.0, (t - LIN0_HOLD) / (1 - LIN0_HOLD))
        return 1 - (1 - END_RATIO) * t
    return END_RATIO + (1 - END_RATIO) * 0.5 * (1 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
