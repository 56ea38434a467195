"""The Vision Transformer, module for module as the official `vit_jax/models_vit.py`.

Pre-norm encoder blocks; the class token (or global average pooling); an optional `pre_logits`
(Dense + tanh) layer; a zero-initialised head. The hot ops (LayerNorm, attention, Dense + GELU)
go through `vitcore.ops`, which runs them in plain PyTorch or in the Triton kernels.
Parameter names mirror the official ones so that `checkpoint.py`'s table reads naturally.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import ops
from .config import ViTConfig
from .resnet import ResNetRoot

__all__ = ["VisionTransformer", "EncoderBlock", "MultiHeadAttention", "MlpBlock"]


def _xavier_uniform_rows(weight: torch.Tensor, groups: int) -> None:
    # flax initialises query, key and value as separate (D, D) kernels; keep that for the fused weight.
    with torch.no_grad():
        for part in weight.chunk(groups, dim=0):
            nn.init.xavier_uniform_(part)


class MultiHeadAttention(nn.Module):
    """Self-attention with one fused q/k/v projection (one GEMM) and an output projection."""

    def __init__(self, dim: int, num_heads: int, attention_dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim)  # rows: query, key, value; each (heads * head_dim)
        self.out = nn.Linear(dim, dim)
        _xavier_uniform_rows(self.qkv.weight, 3)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, x: torch.Tensor, backend: str, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh), views of one buffer
        if need_weights:
            y, probs = ops.attention_with_probs(q, k, v, self.attention_dropout, self.training)
        else:
            y, probs = ops.attention(q, k, v, self.attention_dropout, self.training, backend), None
        y = y.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.out(y), probs


class MlpBlock(nn.Module):
    """Dense -> GELU -> dropout -> Dense -> dropout."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float, gelu: str) -> None:
        super().__init__()
        self.gelu = gelu
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop = nn.Dropout(dropout)
        for fc in (self.fc1, self.fc2):  # official: xavier_uniform kernels, normal(1e-6) biases
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        h = ops.linear_gelu(x, self.fc1.weight, self.fc1.bias, self.gelu, backend)  # (B, N, mlp_dim)
        return self.drop(self.fc2(self.drop(h)))  # (B, N, C)


class EncoderBlock(nn.Module):
    """Pre-norm block: x + drop(MHA(LN(x))), then x + MLP(LN(x))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = MultiHeadAttention(dim, config.num_heads, config.attention_dropout)
        self.drop = nn.Dropout(config.dropout)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = MlpBlock(dim, config.mlp_dim, config.dropout, config.gelu)

    def forward(
        self, x: torch.Tensor, backend: str, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = ops.layer_norm(x, self.norm1.weight, self.norm1.bias, self.norm1.eps, backend)
        h, probs = self.attn(h, backend, need_weights)
        x = x + self.drop(h)
        h = ops.layer_norm(x, self.norm2.weight, self.norm2.bias, self.norm2.eps, backend)
        return x + self.mlp(h, backend), probs


class VisionTransformer(nn.Module):
    """ViT (or R50+ViT hybrid) classifier for (B, 3, img_size, img_size) images.

    backend: "torch" (plain PyTorch), "triton" (the fused kernels) or "auto" (triton when the
    parameters are on CUDA at forward time, torch otherwise).
    """

    def __init__(self, config: ViTConfig, img_size: int = 224, num_classes: int = 1000, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise TypeError(f"config must be a ViTConfig (e.g. vitcore.CONFIGS['ViT-B_16']), got {type(config)}")
        stride = config.input_stride
        if not isinstance(img_size, int) or img_size <= 0 or img_size % stride:
            what = f"the ResNet stride x patch ({stride})" if config.is_hybrid else f"the patch size ({stride})"
            raise ValueError(
                f"img_size={img_size!r} must be a positive multiple of {what}; "
                f"e.g. {max(1, round(img_size / stride)) * stride if isinstance(img_size, int) else 224}"
            )
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} must be an int >= 1")
        ops.resolve_backend(backend, torch.device("cpu"))  # validates the name now, not at first forward
        self.config = config
        self.img_size = img_size
        self.num_classes = num_classes
        self.backend = backend
        self.grid_size = img_size // stride
        self.num_prefix_tokens = 1 if config.classifier == "token" else 0
        dim = config.hidden_size

        # Patch embedding: a conv with kernel = stride = patch, on the pixels or on the ResNet's features.
        self.resnet = ResNetRoot(config.resnet_layers, config.resnet_width) if config.is_hybrid else None
        in_ch = self.resnet.out_channels if self.resnet is not None else 3
        self.embedding = nn.Conv2d(in_ch, dim, config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if self.num_prefix_tokens else None
        num_tokens = self.num_prefix_tokens + self.grid_size**2
        self.pos_embedding = nn.Parameter(torch.empty(1, num_tokens, dim))
        nn.init.normal_(self.pos_embedding, std=0.02)  # as BERT / the official posemb_init
        self.pos_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_layers))
        self.encoder_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)

        rep = config.representation_size
        self.pre_logits = nn.Linear(dim, rep) if rep is not None else None
        self.head = nn.Linear(rep or dim, num_classes)
        nn.init.zeros_(self.head.weight)  # official: zero head, so fine-tuning starts from uniform logits
        nn.init.zeros_(self.head.bias)
        self._lecun_normal(self.embedding)
        if self.pre_logits is not None:
            self._lecun_normal(self.pre_logits)

    @staticmethod
    def _lecun_normal(layer: nn.Module) -> None:
        # flax's default lecun_normal (truncated normal, variance 1 / fan_in) and zero bias.
        fan_in = layer.weight[0].numel()
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978  # undo the truncation's variance shrink
        nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(layer.bias)

    def _backend(self) -> str:
        return ops.resolve_backend(self.backend, self.pos_embedding.device)

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (3, self.img_size, self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}; "
                f"resize the images or build the model with img_size={x.shape[-1] if x.dim() == 4 else '...'}"
            )

    def _encode(self, x: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._check_input(x)
        backend = self._backend()
        if self.resnet is not None:
            x = self.resnet(x)  # (B, C', H/s, W/s)
        x = self.embedding(x)  # (B, D, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, D), row-major like the official reshape
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N, D)
        x = self.pos_drop(x + self.pos_embedding)
        attentions = []
        for block in self.blocks:
            x, probs = block(x, backend, need_weights)
            if need_weights:
                attentions.append(probs)
        w, b = self.encoder_norm.weight, self.encoder_norm.bias
        return ops.layer_norm(x, w, b, self.encoder_norm.eps, backend), attentions

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, N, D) encoded tokens after the final LayerNorm (`encoder_norm`)."""
        return self._encode(x, need_weights=False)[0]

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens -> (B, num_classes) logits: pool (class token or mean), pre_logits, head."""
        x = feats[:, 0] if self.num_prefix_tokens else feats.mean(dim=1)  # (B, D)
        if self.pre_logits is not None:
            x = torch.tanh(self.pre_logits(x))  # (B, representation_size)
        return self.head(x)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, num_classes); with return_attention also each layer's probabilities (B, heads, N, N)."""
        feats, attentions = self._encode(x, need_weights=return_attention)
        logits = self.forward_head(feats)
        return (logits, attentions) if return_attention else logits

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, num_classes={self.num_classes}, backend={self.backend!r}"
