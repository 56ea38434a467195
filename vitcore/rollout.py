"""Attention rollout (Abnar & Zuidema, 2020): how much each patch flows into the class token."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["attention_rollout", "rollout_matrix"]


def rollout_matrix(attentions: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per layer (B, heads, N, N) probabilities -> (B, N, N) rollout; every row sums to 1.

    Each layer: mean over heads, add the identity for the residual connection, renormalise the
    rows; then the layers are multiplied, last layer on the left.
    """
    if len(attentions) == 0:
        raise ValueError("attention_rollout needs at least one layer's attention probabilities")
    shape = attentions[0].shape
    if len(shape) != 4 or shape[-1] != shape[-2] or any(a.shape != shape for a in attentions):
        raise ValueError(
            f"expected a list of (B, heads, N, N) tensors of one shape, got {[tuple(a.shape) for a in attentions]}; "
            "use model(x, return_attention=True)"
        )
    eye = torch.eye(shape[-1], dtype=torch.float64, device=attentions[0].device)
    result = None
    for a in attentions:
        a = a.detach().to(torch.float64).mean(dim=1) + eye  # (B, N, N)
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def attention_rollout(attentions: Sequence[torch.Tensor], num_prefix_tokens: int = 1) -> torch.Tensor:
    """The class token's rollout row over the patches, as a (B, gh, gw) map (float32).

    `attentions` is what `model(x, return_attention=True)` returns; the model must have a class
    token (classifier="token").
    """
    rollout = rollout_matrix(attentions)  # (B, N, N)
    n = rollout.shape[-1] - num_prefix_tokens
    side = math.isqrt(max(n, 0))
    if num_prefix_tokens < 1 or side * side != n or n == 0:
        raise ValueError(
            f"cannot read a square patch grid from {rollout.shape[-1]} tokens with {num_prefix_tokens} class "
            "token(s); attention rollout needs a model with a class token (classifier='token')"
        )
    return rollout[:, 0, num_prefix_tokens:].reshape(-1, side, side).float()  # (B, gh, gw)
