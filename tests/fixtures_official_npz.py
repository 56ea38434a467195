"""An official-format (imagenet21k, pre-linen names) .npz for a small config, written with numpy alone."""

from __future__ import annotations

import numpy as np

from vitcore.config import ViTConfig

__all__ = ["make_official_npz"]


def make_official_npz(path: str, cfg: ViTConfig, img_size: int = 224, num_classes: int = 21843,
                      seed: int = 0) -> str:
    """Random weights under the names and layouts of the published imagenet21k files (HWIO conv,
    (D, heads, head_dim) q/k/v, pre_logits only when the config has a representation layer)."""
    rng = np.random.default_rng(seed)
    d, h, mlp, p = cfg.hidden_size, cfg.num_heads, cfg.mlp_dim, cfg.patch_size
    hd = d // h

    def w(*shape: int, std: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    grid = img_size // p
    arrays = {
        "embedding/kernel": w(p, p, 3, d, std=0.05),
        "embedding/bias": w(d, std=0.01),
        "cls": w(1, 1, d, std=0.02),
        "Transformer/posembed_input/pos_embedding": w(1, grid * grid + 1, d, std=0.02),
        "Transformer/encoder_norm/scale": np.ones(d, np.float32),
        "Transformer/encoder_norm/bias": np.zeros(d, np.float32),
    }
    for i in range(cfg.num_layers):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            arrays[b + ln + "/scale"] = 1.0 + w(d, std=0.05)
            arrays[b + ln + "/bias"] = w(d, std=0.05)
        att = b + "MultiHeadDotProductAttention_1/"
        for name in ("query", "key", "value"):
            arrays[att + name + "/kernel"] = w(d, h, hd)
            arrays[att + name + "/bias"] = w(h, hd, std=0.01)
        arrays[att + "out/kernel"] = w(h, hd, d)
        arrays[att + "out/bias"] = w(d, std=0.01)
        arrays[b + "MlpBlock_3/Dense_0/kernel"] = w(d, mlp)
        arrays[b + "MlpBlock_3/Dense_0/bias"] = w(mlp, std=0.01)
        arrays[b + "MlpBlock_3/Dense_1/kernel"] = w(mlp, d)
        arrays[b + "MlpBlock_3/Dense_1/bias"] = w(d, std=0.01)
    rep = cfg.representation_size or d
    arrays["pre_logits/kernel"] = w(d, rep)
    arrays["pre_logits/bias"] = w(rep, std=0.01)
    arrays["head/kernel"] = w(rep, num_classes, std=0.01)
    arrays["head/bias"] = np.zeros(num_classes, np.float32)
    np.savez(path, **arrays)
    return path
