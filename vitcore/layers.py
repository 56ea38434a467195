"""The encoder's hot layers as modules that own their backend: LayerNorm, the MLP, and attention.

Each layer keeps a `backend` ("auto", "torch" or "triton") and resolves it per call (`ops.pick_backend`), so
`forward` takes only tensors, hooks fire as on any module, and a module swapped in for a sub-layer (a LoRA
wrapper around `fc1`, a quantised Linear) is called like any other. The MLP fuses `fc1` and its GELU into one
kernel only when that is invisible: `fc1` is a plain `nn.Linear` without hooks and `act` the stock GELU;
otherwise it calls `fc1` and `act` as modules, so a hook on `fc1` sees the pre-activation (as in timm) and LoRA
adds its update inside the GELU, where LoRA belongs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules import module as _module_globals

from . import ops

__all__ = ["BackendOwner", "LayerNorm", "MlpBlock", "MultiHeadAttention", "SelfAttention", "recording_attention"]


class BackendOwner:
    """Mixin for a layer that runs on a backend it owns; `set_backend` checks the name."""

    backend: str = "auto"

    def set_backend(self, backend: str) -> None:
        ops.check_backend(backend)
        self.backend = backend


def _has_hooks(module: nn.Module) -> bool:
    """Any hook that would observe `module` being called, its own or global."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or _module_globals._global_forward_hooks
        or _module_globals._global_forward_pre_hooks or _module_globals._global_backward_hooks
        or _module_globals._global_backward_pre_hooks
    )


class LayerNorm(BackendOwner, nn.LayerNorm):
    """nn.LayerNorm over the last dim whose forward runs on its own backend (fp32 statistics on both)."""

    def __init__(self, dim: int, eps: float, backend: str = "auto") -> None:
        super().__init__(dim, eps=eps)
        self.set_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = ops.pick_backend(self.backend, "layer_norm", x, self.weight, self.bias)
        return ops.layer_norm(x, self.weight, self.bias, self.eps, backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"


class MlpBlock(BackendOwner, nn.Module):
    """Dense (fc1) -> GELU (act) -> dropout -> Dense (fc2) -> dropout; fc1 + GELU fused when nothing can tell."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float, gelu: str, backend: str = "auto") -> None:
        super().__init__()
        if gelu not in ("tanh", "erf"):
            raise ValueError(f"gelu={gelu!r} must be 'tanh' (flax.linen.gelu, official) or 'erf' (exact)")
        self.gelu = gelu
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop = nn.Dropout(dropout)
        for fc in (self.fc1, self.fc2):  # official: xavier_uniform kernels, normal(1e-6) biases
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)
        self.set_backend(backend)

    def _fusable(self) -> bool:
        # Exact types: a subclass or wrapper (LoRA, quantisation, parametrisation) has its own forward to honour.
        fc1, act = self.fc1, self.act
        return (type(fc1) is nn.Linear and fc1.bias is not None and type(act) is nn.GELU
                and not _has_hooks(fc1) and not _has_hooks(act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable():
            fc1 = self.fc1
            backend = ops.pick_backend(self.backend, "linear_gelu", x, fc1.weight, fc1.bias)
            h = ops.linear_gelu(x, fc1.weight, fc1.bias, self.gelu, backend)  # (B, N, mlp_dim)
        else:
            h = self.act(self.fc1(x))  # (B, N, mlp_dim)
        return self.drop(self.fc2(self.drop(h)))  # (B, N, C)


class SelfAttention(BackendOwner, nn.Module):
    """softmax(q k^T / sqrt(D)) v per head, with dropout on the probabilities (the official placement).

    q, k, v: (B, H, N, D) -> (B, H, N, D). No parameters. While `recording_attention` is active it also keeps
    each call's probabilities (before dropout) for `return_attention`.
    """

    def __init__(self, dropout: float, backend: str = "auto") -> None:
        super().__init__()
        self.dropout = dropout
        self._records: list[torch.Tensor] | None = None
        self.set_backend(backend)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self._records is not None:
            y, probs = ops.attention_with_probs(q, k, v, self.dropout, self.training)
            self._records.append(probs)  # (B, H, N, N)
            return y
        if self.backend == "auto" and self.training and self.dropout > 0:
            backend = "torch"  # the kernel has no dropout: nothing to measure (a forced "triton" warns instead)
        else:
            backend = ops.pick_backend(self.backend, "attention", q, k, v)
        return ops.attention(q, k, v, self.dropout, self.training, backend)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, backend={self.backend!r}"


class MultiHeadAttention(nn.Module):
    """Self-attention with one fused q/k/v projection (one GEMM), the attention core and an output projection."""

    def __init__(self, dim: int, num_heads: int, attention_dropout: float, backend: str = "auto") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # rows: query, key, value; each (heads * head_dim)
        self.core = SelfAttention(attention_dropout, backend)
        self.out = nn.Linear(dim, dim)
        # flax initialises query, key and value as separate (D, D) kernels; keep that for the fused weight.
        with torch.no_grad():
            for part in self.qkv.weight.chunk(3, dim=0):
                nn.init.xavier_uniform_(part)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh), views of one buffer
        y = self.core(q, k, v).transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.out(y)


@contextlib.contextmanager
def recording_attention(model: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """Collect the attention probabilities of every `SelfAttention` in `model`, in call order, while active."""
    records: list[torch.Tensor] = []
    cores = [m for m in model.modules() if isinstance(m, SelfAttention)] if enabled else []
    for core in cores:
        core._records = records
    try:
        yield records
    finally:
        for core in cores:
            core._records = None
