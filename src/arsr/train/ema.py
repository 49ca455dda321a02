"""Exponential moving average of a model's weights (what model.pt ships).

The decay is warmed up, ``min(decay, (1 + step) / (10 + step))``: 0.1 at step 0, 0.5 at step 8,
0.9 at step 80, so a short run's EMA follows the trained weights instead of staying stuck near
the random initialisation (MAR's fixed 0.9999 needs ~10k steps to forget it).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """ema = d * ema + (1 - d) * model for parameters; buffers are copied.

        Buffers are state, not weights: averaging them is wrong and can be undefined (an
        attention mask holding -inf becomes NaN, since -inf - -inf is NaN).
        """
        d = self.decay_at(step)
        ema_p = [e for e in self.model.parameters()]
        new_p = [p.detach() for p in model.parameters()]
        if ema_p:
            torch._foreach_lerp_(ema_p, new_p, 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
