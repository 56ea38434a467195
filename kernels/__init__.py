"""Triton kernels for the ViT encoder's hot paths; each op is differentiable.

Imports only torch and triton. Nothing is compiled or launched at import time.
"""

from .attention import attention
from .layer_norm import layer_norm
from .linear_gelu import linear_gelu

__all__ = ["attention", "layer_norm", "linear_gelu"]
