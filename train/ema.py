"""An exponential moving average of a model's weights (timm's `--model-ema`), updated every optimizer step.

ema <- D * ema + (1 - D) * weights for every floating-point tensor of the state dict (parameters and float
buffers); integer buffers are copied. The average starts at the weights it is built from (the pretrained
ones), so after n steps it is D^n w_0 + (1 - D) sum_t D^(n - t) w_t: no bias correction, as timm.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """`module` is an eval-mode, gradient-free copy of the model holding the average; `update` after each step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of `model` (the raw model, not a DDP/compile wrapper) into the average."""
        ours, theirs = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in ours.items() if v.is_floating_point()]
        if floats:
            # One fused lerp over all tensors: ema + (1 - D) (w - ema) = D ema + (1 - D) w.
            torch._foreach_lerp_([ours[k] for k in floats], [theirs[k] for k in floats], 1.0 - self.decay)
        for k, v in ours.items():
            if not v.is_floating_point():
                v.copy_(theirs[k])

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)
