"""Backend dispatch for the encoder's hot ops: plain PyTorch ("torch") or the Triton kernels ("triton").

Both backends compute the same function; each layer (vitcore/layers.py) picks one per call (`pick_backend`).
`kernels` is imported lazily so that CPU-only users never import triton.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS", "attention", "attention_with_probs", "check_backend", "layer_norm", "linear_gelu", "pick_backend",
]

BACKENDS = ("auto", "torch", "triton")

_warned_attention_dropout = False


def check_backend(backend: str) -> None:
    """Raise a ValueError naming the choices unless `backend` is one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")


def pick_backend(backend: str, op: str, *inputs: torch.Tensor) -> str:
    """The backend ("torch" or "triton") for one call of `op` ("attention", "layer_norm", "linear_gelu").

    A forced backend is returned as it is (layers check the name when it is set); "auto" is, on CUDA, the faster
    of the two for this op and shape class, measured on first use and cached (vitcore.autobackend), torch elsewhere.
    """
    if backend != "auto":
        return backend
    from . import autobackend  # imported here because autobackend imports this module

    return autobackend.choose(op, *inputs)


def _autocast_cast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Triton kernels are opaque to autocast; cast like autocast casts F.linear so both backends
    # see the same dtypes inside `torch.autocast`.
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    """LayerNorm over the last dim."""
    if backend == "triton":
        import kernels

        return kernels.layer_norm(x, weight, bias, eps=eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str, backend: str
) -> torch.Tensor:
    """gelu(x @ weight.T + bias); approximate is "tanh" (flax.linen.gelu, official) or "erf" (exact)."""
    if approximate not in ("tanh", "erf"):
        raise ValueError(f"approximate={approximate!r} must be 'tanh' or 'erf'")
    if backend == "triton":
        import kernels

        x, weight, bias = _autocast_cast(x, weight, bias)
        return kernels.linear_gelu(x, weight, bias, approximate=approximate)
    return F.gelu(F.linear(x, weight, bias), approximate="tanh" if approximate == "tanh" else "none")


def attention_with_probs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention; returns (output, probabilities before dropout), both per head.

    q, k, v: (B, H, N, D). The official model scales the query by 1/sqrt(D) and drops out the
    probabilities themselves (not whole heads).
    """
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # (B, H, N, N)
    probs = scores.softmax(dim=-1)
    dropped = F.dropout(probs, dropout_p, training) if dropout_p > 0 else probs
    return dropped @ v, probs  # (B, H, N, D), (B, H, N, N)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, training: bool, backend: str
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with dropout on the probabilities; q, k, v (B, H, N, D) -> (B, H, N, D)."""
    active_dropout = training and dropout_p > 0
    if backend == "triton":
        if not active_dropout:
            import kernels

            return kernels.attention(q, k, v, scale=None)
        global _warned_attention_dropout
        if not _warned_attention_dropout:
            _warned_attention_dropout = True
            warnings.warn(
                "the Triton attention kernel has no dropout; attention_dropout > 0 in training falls back to "
                "the PyTorch attention (set attention_dropout=0 to use the kernel)",
                stacklevel=3,
            )
    if active_dropout:
        # Explicit softmax so the dropout mask comes from torch's generator like every other dropout.
        return attention_with_probs(q, k, v, dropout_p, training)[0]
    return F.scaled_dot_product_attention(q, k, v)
