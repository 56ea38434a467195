"""Resizing learned position embeddings to a new patch grid, as the official fine-tuning code does."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["resize_grid", "resize_pos_embedding"]


def resize_grid(grid: torch.Tensor, new_size: int) -> torch.Tensor:
    """Resize a (gs, gs, C) grid to (new_size, new_size, C) like `scipy.ndimage.zoom(grid, (r, r, 1), order=1)`.

    scipy's zoom (grid_mode=False) maps output pixel o to input coordinate o * (old - 1) / (new - 1)
    and interpolates linearly: that is bilinear interpolation with align_corners=True. Computed in
    float64 so the result does not depend on the storage dtype.
    """
    x = grid.to(torch.float64).permute(2, 0, 1).unsqueeze(0)  # (1, C, gs, gs)
    x = F.interpolate(x, size=(new_size, new_size), mode="bilinear", align_corners=True)
    return x[0].permute(1, 2, 0).to(grid.dtype)  # (new, new, C)


def resize_pos_embedding(posemb: torch.Tensor, num_prefix_tokens: int, new_grid: int) -> torch.Tensor:
    """(1, prefix + gs*gs, C) -> (1, prefix + new_grid**2, C): prefix (class) tokens kept, the grid resized.

    Raises ValueError when the stored grid is not square (the official code cannot resize it either).
    """
    tokens, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
    old = math.isqrt(grid.shape[0])
    if old * old != grid.shape[0] or old == 0:
        raise ValueError(
            f"position embedding has {grid.shape[0]} grid tokens (after {num_prefix_tokens} class token(s)), "
            "which is not a square grid"
        )
    grid = resize_grid(grid.reshape(old, old, -1), new_grid).reshape(1, new_grid * new_grid, -1)
    return torch.cat([tokens, grid], dim=1)
