"""The Vision Transformer, module for module as the official `vit_jax/models_vit.py`.

Pre-norm encoder blocks; the class token (or global average pooling); an optional `pre_logits`
(Dense + tanh) layer; a zero-initialised head. The hot layers (LayerNorm, attention, the MLP) are modules of
`vitcore.layers` that each own a backend: plain PyTorch or the Triton kernels.
Parameter names mirror the official ones so that `checkpoint.py`'s table reads naturally.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import autobackend, ops
from .config import ViTConfig
from .layers import BackendOwner, LayerNorm, MlpBlock, MultiHeadAttention, recording_attention
from .resnet import ResNetRoot

__all__ = ["VisionTransformer", "EncoderBlock", "DropPath"]


class DropPath(nn.Module):
    """Stochastic depth (timm's DropPath): in training, zero a sample's residual branch with probability `rate`
    and scale the kept ones by 1 / (1 - rate), so the expectation is unchanged; the identity in eval mode.

    The mask comes from the global torch RNG, like dropout: the training loop seeds it per step.
    """

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate {rate} must lie in [0, 1)")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # (B, 1, 1): per sample
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"


class EncoderBlock(nn.Module):
    """Pre-norm block: x + drop_path(drop(MHA(LN(x)))), then x + drop_path(MLP(LN(x))).

    With `grad_checkpointing` set (by `VisionTransformer.set_grad_checkpointing`) and autograd on, the block
    keeps only its input for the backward pass and recomputes the rest there (the RNG state is replayed, so
    dropout and drop-path masks, and hence the gradients, are those of the plain forward).
    """

    def __init__(self, config: ViTConfig, backend: str = "auto", drop_path: float = 0.0) -> None:
        super().__init__()
        dim = config.hidden_size
        self.norm1 = LayerNorm(dim, config.layer_norm_eps, backend)
        self.attn = MultiHeadAttention(dim, config.num_heads, config.attention_dropout, backend)
        self.drop = nn.Dropout(config.dropout)
        self.norm2 = LayerNorm(dim, config.layer_norm_eps, backend)
        self.mlp = MlpBlock(dim, config.mlp_dim, config.dropout, config.gelu, backend)
        self.drop_path = DropPath(drop_path)
        self.grad_checkpointing = False

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.drop(self.attn(self.norm1(x))))  # (B, N, C)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not self._recording_attention():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _recording_attention(self) -> bool:
        # Not while attention is recorded: the recomputation would take the other (probability-keeping) path.
        return any(getattr(m, "_records", None) is not None for m in self.modules())


class VisionTransformer(nn.Module):
    """ViT (or R50+ViT hybrid) classifier for (B, 3, img_size, img_size) images.

    backend: "torch" (plain PyTorch), "triton" (the fused kernels) or "auto" (resolved by each layer at forward
    time: on CUDA the faster of the two per op and shape, measured once and cached; torch otherwise; see
    `backend_report`). Every layer owns its backend; `set_backend` switches them all.
    drop_path: stochastic-depth rate of the last block, rising linearly from 0 at the first (timm's rule);
    a training-only regulariser, so checkpoints do not record it.
    """

    def __init__(self, config: ViTConfig, img_size: int = 224, num_classes: int = 1000, backend: str = "auto",
                 drop_path: float = 0.0) -> None:
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
        ops.check_backend(backend)  # the name is checked now, not at the first forward
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
        # Block i of L: R * i / (L - 1), timm's linspace (in Python: the model may be built on the meta device).
        rates = [drop_path * i / max(config.num_layers - 1, 1) for i in range(config.num_layers)]
        self.blocks = nn.ModuleList(EncoderBlock(config, backend, rate) for rate in rates)
        self.encoder_norm = LayerNorm(dim, config.layer_norm_eps, backend)

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

    def set_backend(self, backend: str) -> VisionTransformer:
        """Switch every layer that owns a backend to `backend` ("auto", "torch" or "triton"); returns self."""
        ops.check_backend(backend)
        for module in self.modules():
            if isinstance(module, BackendOwner):
                module.set_backend(backend)
        self.backend = backend
        return self

    def backend_report(self) -> str:
        """What the hot layers run on: per op the layers' backends and, for "auto", each shape class measured so
        far with its choice and both timings (vitcore.autobackend)."""
        return autobackend.backend_report(self)

    def set_grad_checkpointing(self, enable: bool = True) -> VisionTransformer:
        """Activation checkpointing per encoder block (each block owns the choice); returns self."""
        for block in self.blocks:
            block.grad_checkpointing = enable
        return self

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (3, self.img_size, self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}; "
                f"resize the images or build the model with img_size={x.shape[-1] if x.dim() == 4 else '...'}"
            )

    def _encode(self, x: torch.Tensor, return_attention: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._check_input(x)
        if self.resnet is not None:
            x = self.resnet(x)  # (B, C', H/s, W/s)
        x = self.embedding(x)  # (B, D, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, D), row-major like the official reshape
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N, D)
        x = self.pos_drop(x + self.pos_embedding)
        with recording_attention(self, return_attention) as attentions:  # per block (B, heads, N, N)
            for block in self.blocks:
                x = block(x)
        return self.encoder_norm(x), attentions

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, N, D) encoded tokens after the final LayerNorm (`encoder_norm`)."""
        return self._encode(x, return_attention=False)[0]

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
        feats, attentions = self._encode(x, return_attention)
        logits = self.forward_head(feats)
        return (logits, attentions) if return_attention else logits

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, num_classes={self.num_classes}, backend={self.backend!r}"
