"""ViT configurations: the dataclass and the official model zoo (vit_jax/configs/models.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["ViTConfig", "CONFIGS", "OFFICIAL_NAMES", "ALIASES", "augreg_name", "canonical_name", "find_name",
           "get_config"]


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of one Vision Transformer; field names follow the official configs."""

    patch_size: int = 16
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_heads: int = 12
    num_layers: int = 12
    representation_size: int | None = None
    classifier: str = "token"  # "token" (class token) or "gap" (global average pool)
    # Hybrid: bottleneck units per ResNet stage, e.g. (3, 4, 9) for R50+ViT-B_16; () is the root alone (R+ViT-Ti_16).
    resnet_layers: tuple[int, ...] | None = None
    resnet_width: float = 1.0  # the official `width_factor`: stem width is 64 * resnet_width
    dropout: float = 0.0
    attention_dropout: float = 0.0
    gelu: str = "tanh"  # flax.linen.gelu is the tanh approximation; "erf" is exact GELU
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        problems = []
        if self.patch_size < 1:
            problems.append(f"patch_size={self.patch_size} must be >= 1")
        if self.hidden_size < 1 or self.num_heads < 1 or self.hidden_size % self.num_heads:
            problems.append(
                f"hidden_size={self.hidden_size} must be a positive multiple of num_heads={self.num_heads}"
            )
        if self.mlp_dim < 1 or self.num_layers < 1:
            problems.append(f"mlp_dim={self.mlp_dim} and num_layers={self.num_layers} must be positive")
        if self.classifier not in ("token", "gap"):
            problems.append(f"classifier={self.classifier!r} must be 'token' or 'gap'")
        if self.gelu not in ("tanh", "erf"):
            problems.append(f"gelu={self.gelu!r} must be 'tanh' (official) or 'erf'")
        if self.representation_size is not None and self.representation_size < 1:
            problems.append(f"representation_size={self.representation_size} must be None or >= 1")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.attention_dropout < 1.0):
            problems.append("dropout and attention_dropout must lie in [0, 1)")
        if self.resnet_layers is not None:
            if any(n < 1 for n in self.resnet_layers):
                problems.append(f"resnet_layers={self.resnet_layers} must be a tuple of counts >= 1 (or () for "
                                "the ResNet root alone)")
            if self.resnet_width <= 0 or (64 * self.resnet_width) % 32:
                problems.append(
                    f"resnet_width={self.resnet_width}: 64 * width must be a multiple of 32 (GroupNorm groups)"
                )
        if problems:
            raise ValueError("invalid ViTConfig: " + "; ".join(problems))
        if self.resnet_layers is not None and not isinstance(self.resnet_layers, tuple):
            object.__setattr__(self, "resnet_layers", tuple(self.resnet_layers))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def is_hybrid(self) -> bool:
        return self.resnet_layers is not None

    @property
    def input_stride(self) -> int:
        """Pixels per token side: the patch, times the ResNet's downsampling for the hybrid."""
        if self.resnet_layers is None:
            return self.patch_size
        # As models_vit.py computes it: root conv /2, max-pool /2, then every stage after the first halves the
        # grid (unit1 of block2.. has stride 2). R+ViT-Ti_16 (no stages, 8x8 patches) is therefore /32, whatever
        # its name and the config's comment ("/16") say.
        return self.patch_size * 4 * 2 ** max(len(self.resnet_layers) - 1, 0)

    def replace(self, **changes: Any) -> ViTConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["resnet_layers"] is not None:
            d["resnet_layers"] = list(d["resnet_layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        return cls(**d)  # a JSON list for resnet_layers becomes a tuple in __post_init__


# The official zoo, vit_jax/configs/models.py MODEL_CONFIGS (ViTs and hybrids; not the Mixers or LiT), field for
# field: dropout is the official `transformer.dropout_rate` of each entry (e.g. 0.1 for ViT-L_16 and R50+ViT-B_16,
# 0.0 for ViT-L_32, whose config resets it).
_Ti16 = ViTConfig(patch_size=16, hidden_size=192, mlp_dim=768, num_heads=3, num_layers=12)
_S16 = ViTConfig(patch_size=16, hidden_size=384, mlp_dim=1536, num_heads=6, num_layers=12)
_B16 = ViTConfig(patch_size=16, hidden_size=768, mlp_dim=3072, num_heads=12, num_layers=12)
_L16 = ViTConfig(patch_size=16, hidden_size=1024, mlp_dim=4096, num_heads=16, num_layers=24, dropout=0.1)
_OFFICIAL: dict[str, ViTConfig] = {
    "testing": ViTConfig(patch_size=16, hidden_size=10, mlp_dim=10, num_heads=2, num_layers=1, dropout=0.1),
    "ViT-Ti_16": _Ti16,
    "ViT-S_16": _S16,
    "ViT-S_32": _S16.replace(patch_size=32),
    "ViT-B_8": _B16.replace(patch_size=8),
    "ViT-B_16": _B16,
    "ViT-B_32": _B16.replace(patch_size=32),
    "ViT-L_16": _L16,
    "ViT-L_32": _L16.replace(patch_size=32, dropout=0.0),
    "ViT-H_14": ViTConfig(patch_size=14, hidden_size=1280, mlp_dim=5120, num_heads=16, num_layers=32, dropout=0.1),
    "ViT-S_16-gap-norep": _S16.replace(classifier="gap"),
    "ViT-B_16-gap-norep": _B16.replace(classifier="gap"),
    "ViT-S_32-gap-norep": _S16.replace(patch_size=32, classifier="gap"),
    "ViT-B_32-gap-norep": _B16.replace(patch_size=32, classifier="gap"),
    # Hybrids: the ViT's patches cut the ResNet's feature map (see ViTConfig.input_stride for the strides).
    "R+ViT-Ti_16": _Ti16.replace(patch_size=8, resnet_layers=()),
    "R50+ViT-B_16": _B16.replace(patch_size=1, resnet_layers=(3, 4, 9), dropout=0.1),
    "R26+ViT-B_32": _B16.replace(patch_size=1, resnet_layers=(2, 2, 2, 2)),
    "R26+ViT-S_32": _S16.replace(patch_size=1, resnet_layers=(2, 2, 2, 2)),
    "R50+ViT-L_32": _L16.replace(patch_size=1, resnet_layers=(3, 4, 6, 3)),
}
OFFICIAL_NAMES: tuple[str, ...] = tuple(_OFFICIAL)

# The zoo entries with AugReg checkpoints (the official AUGREG_CONFIGS: every ViT but these four).
_NO_AUGREG = ("testing", "ViT-L_32", "R50+ViT-B_16", "ViT-H_14")


def augreg_name(name: str) -> str:
    """The AugReg file prefix of an official name (the vit_jax rule): `ViT-` dropped, `+` as `_` (R_Ti_16)."""
    return name.replace("ViT-", "").replace("+", "_")


# alias -> official name: AugReg's short names, and jeonsworld/ViT-pytorch's spelling of the R50 hybrid.
ALIASES: dict[str, str] = {augreg_name(n): n for n in OFFICIAL_NAMES if n not in _NO_AUGREG}
ALIASES["R50-ViT-B_16"] = "R50+ViT-B_16"


class _Zoo(dict):
    """A dict whose missing-key error lists the valid names."""

    def __missing__(self, name: str) -> ViTConfig:
        raise KeyError(
            f"unknown model type {name!r}; valid names: {', '.join(OFFICIAL_NAMES)} "
            f"(aliases: {', '.join(ALIASES)})"
        )


# Every official name and every alias; an alias maps to the very same ViTConfig object as its official name.
CONFIGS: dict[str, ViTConfig] = _Zoo({**_OFFICIAL, **{alias: _OFFICIAL[name] for alias, name in ALIASES.items()}})


def canonical_name(name: str) -> str:
    """The official name of a zoo name or alias (`B_16` -> `ViT-B_16`); an unknown name raises KeyError."""
    CONFIGS[name]  # the KeyError listing the valid names
    return ALIASES.get(name, name)


def get_config(name: str) -> ViTConfig:
    """The zoo config called `name`; an unknown name raises listing the valid ones."""
    return CONFIGS[name]


def find_name(config: ViTConfig) -> str | None:
    """The official name of the zoo entry with `config`'s architecture, or None.

    Compared without the training-only rates (dropout) and the representation layer, which the official code
    adds or drops per task (the i21k files of ViT-B_16 carry one, the zoo entry has none).
    """
    free = dict(dropout=0.0, attention_dropout=0.0, representation_size=None)
    want = config.replace(**free)
    return next((name for name in OFFICIAL_NAMES if _OFFICIAL[name].replace(**free) == want), None)
