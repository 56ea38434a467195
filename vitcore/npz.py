"""PLACEHOLDER (replaced by the C++ reader from the foundation issue): numpy-backed load_npz."""

from __future__ import annotations

import os

import numpy as np
import torch

__all__ = ["load_npz"]


def load_npz(path: str | os.PathLike, *, keys=None, verify: bool = True) -> dict[str, torch.Tensor]:
    with np.load(path, allow_pickle=False) as f:
        names = list(f.files) if keys is None else list(keys)
        return {k: torch.from_numpy(np.ascontiguousarray(f[k])) for k in names}
