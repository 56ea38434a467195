"""vitcore: Vision Transformers faithful to Google's official checkpoints, with Triton kernels."""

from .checkpoint import LoadReport, load_pretrained, save_npz
from .config import CONFIGS, ViTConfig, get_config
from .errors import CheckpointError, NpzError
from .model import VisionTransformer
from .npz import load_npz
from .rollout import attention_rollout
from .sources import pretrained

__all__ = [
    "CONFIGS",
    "CheckpointError",
    "LoadReport",
    "NpzError",
    "ViTConfig",
    "VisionTransformer",
    "attention_rollout",
    "get_config",
    "load_npz",
    "load_pretrained",
    "pretrained",
    "save_npz",
]
