"""Learning-rate schedule of the official fine-tuning code: linear warmup, then cosine or linear decay."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["WarmupDecaySchedule"]


class WarmupDecaySchedule:
    """lr(step) for steps counted from 1, as vit_jax `create_learning_rate_schedule`:

    progress = clip((step - warmup) / (total - warmup), 0, 1); cosine: base * (1 + cos(pi * progress)) / 2,
    linear: end + (base - end) * (1 - progress); then times min(1, step / warmup) when warmup > 0.
    """

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int, decay_type: str = "cosine",
                 linear_end: float = 1e-5) -> None:
        if decay_type not in ("cosine", "linear"):
            raise ValueError(f"decay_type must be 'cosine' or 'linear', got {decay_type!r}")
        self.base_lr, self.total_steps, self.warmup_steps = base_lr, total_steps, warmup_steps
        self.decay_type, self.linear_end = decay_type, linear_end

    def __call__(self, step: int) -> float:
        # max(1, ...) only guards warmup >= total, where the official code would divide by zero.
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if self.decay_type == "linear":
            lr = self.linear_end + (self.base_lr - self.linear_end) * (1.0 - progress)
        else:
            lr = self.base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.warmup_steps:
            lr *= min(1.0, step / self.warmup_steps)
        return lr

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and a string: loads under torch.load(weights_only=True)."""
        return dict(base_lr=self.base_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                    decay_type=self.decay_type, linear_end=self.linear_end)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__init__(**state)
