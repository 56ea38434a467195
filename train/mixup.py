"""Mixup and CutMix on whole batches on the device, with soft targets, as timm's `Mixup` in batch mode.

One draw per optimizer step: with probability `prob` the step is mixed; when both alphas are set, CutMix is
chosen with probability `switch_prob`, else Mixup; lambda ~ Beta(alpha, alpha). Every image is mixed with its
mirror in the batch (`x.flip(0)`, timm's pairing). CutMix pastes one box of area ~ (1 - lambda) and then sets
lambda to the box's exact share of the image (timm's `correct_lam`). Targets are label-smoothed one-hots mixed
with the same lambda.

The draw is a pure function of (seed, step), the same on every rank and every micro-batch of the step: a
resumed run (or one with another world size) mixes exactly as an uninterrupted one does.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np
import torch

from .recipes import smooth_one_hot

__all__ = ["MixDraw", "Mixup", "cutmix_box", "mixup_from_args"]

_STREAM = 0x6D6978  # "mix": keeps these draws apart from any other (seed, step) stream


@dataclass(frozen=True)
class MixDraw:
    """One step's mixing: `lam` is the weight of each image itself (1.0: not mixed); `box` (y0, y1, x0, x1) is
    the CutMix region taken from the partner, None for Mixup or no mixing."""

    lam: float = 1.0
    box: tuple[int, int, int, int] | None = None


def cutmix_box(lam: float, height: int, width: int, rng: np.random.Generator) -> tuple[tuple[int, int, int, int],
                                                                                       float]:
    """A box of side sqrt(1 - lam) times the image's, centred uniformly on a pixel, clipped to the image.

    Returns ((y0, y1, x0, x1), corrected lambda = 1 - box area / image area).
    """
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    x0, x1 = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


class Mixup:
    """Mixup / CutMix / label smoothing for whole batches; `draw(step, h, w)` then `apply(x, labels, draw)`."""

    def __init__(self, num_classes: int, seed: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.0) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"alphas must be >= 0, got mixup {mixup_alpha}, cutmix {cutmix_alpha}")
        self.num_classes, self.seed = num_classes, seed
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing

    def draw(self, step: int, height: int, width: int) -> MixDraw:
        """The mixing of optimizer step `step` for images of height x width (a pure function of seed, step)."""
        if self.mixup_alpha <= 0 and self.cutmix_alpha <= 0:
            return MixDraw()
        rng = np.random.default_rng([self.seed, step, _STREAM])
        if rng.random() >= self.prob:
            return MixDraw()
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not use_cutmix:
            return MixDraw(lam)
        box, lam = cutmix_box(lam, height, width, rng)
        return MixDraw(lam, box)

    def apply(self, x: torch.Tensor, labels: torch.Tensor, draw: MixDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix images x (B, C, H, W) (a fresh batch: changed in place) with x.flip(0); (B, K) soft targets."""
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)  # (B, K)
        if draw.lam == 1.0:
            return x, targets
        if draw.box is not None:
            y0, y1, x0, x1 = draw.box
            x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        else:
            partner = x.flip(0)  # a copy, taken before x is scaled in place
            x.mul_(draw.lam).add_(partner, alpha=1.0 - draw.lam)
        return x, targets * draw.lam + targets.flip(0) * (1.0 - draw.lam)


def mixup_from_args(args: argparse.Namespace, num_classes: int) -> Mixup | None:
    """The run's Mixup (which also smooths labels), or None when every soft-target flag is off: the official
    hard-label cross-entropy then runs unchanged."""
    if args.mixup <= 0 and args.cutmix <= 0 and args.label_smoothing <= 0:
        return None
    return Mixup(num_classes, args.seed, args.mixup, args.cutmix,
                 prob=1.0 if args.mixup_prob is None else args.mixup_prob,
                 switch_prob=0.5 if args.mixup_switch_prob is None else args.mixup_switch_prob,
                 label_smoothing=args.label_smoothing)
