"""Training precisions by name, and the torch dtype autocast runs each one in."""

from __future__ import annotations

import torch

__all__ = ["PRECISIONS", "autocast_dtype"]

# fp32: no autocast; bf16: autocast to bfloat16; fp16: autocast to float16 with a GradScaler.
PRECISIONS = ("fp32", "bf16", "fp16")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str) -> torch.dtype:
    """torch dtype of a precision name ("fp32", "bf16", "fp16")."""
    try:
        return _DTYPES[precision]
    except KeyError:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}") from None
