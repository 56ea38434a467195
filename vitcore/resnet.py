"""The ResNet root of the hybrids (R50+ViT-B_16, R26+ViT-S_32, R+ViT-Ti_16...), as in the official
`vit_jax/models_resnet.py` and the root block of `models_vit.py`.

Differences from torchvision's ResNet that the checkpoints depend on: weight-standardised convs,
GroupNorm (32 groups, eps 1e-6) instead of BatchNorm, TF-style SAME padding (asymmetric for
stride 2, padding at the bottom/right first) and the stride on the 3x3 conv of each bottleneck.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResNetRoot", "ResidualUnit", "StdConv2d", "pad_same"]


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad (B, C, H, W) like TF/flax padding="SAME": output ceil(n / stride), the odd pixel at the end."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad wants the last dim first
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2d(nn.Conv2d):
    """Bias-free conv whose kernel is standardised per output channel before use.

    Official formula (models_resnet.weight_standardize): (w - mean) / (std + 1e-5) over H, W, I
    with the population std; the stored kernel is the raw, unstandardised one.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> None:
        super().__init__(in_ch, out_ch, kernel, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), correction=0, keepdim=True)
        w = (w - mean) / (std + 1e-5)
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w, None, self.stride)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)  # flax.linen.GroupNorm defaults


class ResidualUnit(nn.Module):
    """Bottleneck unit: 1x1 -> 3x3 (stride) -> 1x1 (4x features), projection when the shape changes."""

    def __init__(self, in_ch: int, features: int, stride: int) -> None:
        super().__init__()
        out_ch = 4 * features
        self.needs_projection = in_ch != out_ch or stride != 1
        if self.needs_projection:
            self.conv_proj = StdConv2d(in_ch, out_ch, 1, stride)
            self.gn_proj = _group_norm(out_ch)
        self.conv1 = StdConv2d(in_ch, features, 1)
        self.gn1 = _group_norm(features)
        self.conv2 = StdConv2d(features, features, 3, stride)
        self.gn2 = _group_norm(features)
        self.conv3 = StdConv2d(features, out_ch, 1)
        self.gn3 = _group_norm(out_ch)
        # Official init: the last GroupNorm's scale starts at zero, so each unit starts as identity-ish.
        nn.init.zeros_(self.gn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.gn_proj(self.conv_proj(x)) if self.needs_projection else x
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))  # (B, features, H/stride, W/stride)
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)


class ResNetRoot(nn.Module):
    """Stem (7x7/2 conv, GroupNorm, ReLU, 3x3/2 max-pool) and bottleneck stages; (B, 3, H, W) -> (B, C, H/s, W/s).

    `stages[i][j]` holds the official `block{i+1}/unit{j+1}`; stage i has 64*width*2^i features, its
    units output 4x that, and every stage after the first halves the grid. `layers=()` is the root alone
    (stem and max-pool, 64*width channels at /4), as R+ViT-Ti_16 uses it.
    """

    def __init__(self, layers: tuple[int, ...], width_factor: float, in_ch: int = 3) -> None:
        super().__init__()
        width = int(64 * width_factor)
        self.conv_root = StdConv2d(in_ch, width, 7, stride=2)
        self.gn_root = _group_norm(width)
        self.stages = nn.ModuleList()
        ch = width
        for i, depth in enumerate(layers):
            features = width * 2**i
            units = []
            for j in range(depth):
                units.append(ResidualUnit(ch, features, stride=2 if (i > 0 and j == 0) else 1))
                ch = 4 * features
            self.stages.append(nn.ModuleList(units))
        self.out_channels = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn_root(self.conv_root(x)))  # (B, width, H/2, W/2)
        x = F.max_pool2d(pad_same(x, 3, 2, value=-math.inf), 3, 2)  # (B, width, H/4, W/4)
        for stage in self.stages:
            for unit in stage:
                x = unit(x)
        return x  # (B, out_channels, H/stride, W/stride)
