"""FLOPs per image, counted on the model itself, and model FLOPs utilisation (MFU) against a GPU's peak.

The count runs the real module tree on the meta device under torch's FlopCounterMode (matmuls, convolutions and
attention products; 2 FLOPs per multiply-add), so it follows the architecture, hybrids and heads included,
without a hand-written copy of it. The torch backend is counted: the Triton kernels do the same products.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import ViTConfig

__all__ = ["forward_flops", "train_flops", "peak_flops", "mfu"]

# Dense (no sparsity) peak TFLOP/s by GPU-name substring, per precision; tf32 for fp32 matmuls.
_PEAK_TFLOPS = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 183.0}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0}),
    ("V100", {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7}),
    ("4090", {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6}),
]


@functools.lru_cache(maxsize=32)
def _counted(cfg: ViTConfig, img_size: int, num_classes: int, backward: bool) -> float:
    from .model import VisionTransformer  # model imports nothing from here; late import keeps it that way

    with torch.device("meta"):
        model = VisionTransformer(cfg, img_size=img_size, num_classes=num_classes, backend="torch")
        x = torch.empty(1, 3, img_size, img_size)
    with FlopCounterMode(display=False) as counter:
        logits = model(x)  # (1, num_classes)
        if backward:
            logits.sum().backward()
    return float(counter.get_total_flops())


def forward_flops(cfg: ViTConfig, img_size: int, num_classes: int) -> float:
    """Forward FLOPs per image of `VisionTransformer(cfg, img_size, num_classes)`."""
    return _counted(cfg, img_size, num_classes, False)


def train_flops(cfg: ViTConfig, img_size: int, num_classes: int) -> float:
    """Training FLOPs per image: the forward and the backward as autograd runs them (no input-image gradient)."""
    return _counted(cfg, img_size, num_classes, True)


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a known GPU at `precision` (fp32 -> TF32 tensor cores), else None."""
    for key, table in _PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            value = table.get(precision, 0.0)
            return value * 1e12 if value else None
    return None


def mfu(img_per_s: float, cfg: ViTConfig, img_size: int, num_classes: int, device_name: str,
        precision: str) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the GPU's peak is unknown."""
    peak = peak_flops(device_name, precision)
    if peak is None:
        return None
    return img_per_s * train_flops(cfg, img_size, num_classes) / peak
