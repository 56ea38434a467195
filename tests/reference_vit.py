"""An independent float64 reference of the official ViT / R50+ViT forward pass, in numpy.

Written from `vit_jax/models_vit.py` and `models_resnet.py` directly on the official parameter
dict ('/'-joined linen names, HWIO conv kernels, (D, heads, head_dim) attention kernels), the
way the JAX code computes it: einsums on the stored layouts, NHWC activations. It shares no code
with vitcore, and `random_params` draws parameters from a config alone, never from a module.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["forward", "random_params", "to_pre_linen"]


# ----------------------------------------------------------------------------- parameters


def random_params(
    cfg, img_size: int, num_classes: int, rng: np.random.Generator, gn_4d: bool = False
) -> dict[str, np.ndarray]:
    """Random float32 parameters with official linen names and shapes for `cfg` (a ViTConfig)."""
    p: dict[str, np.ndarray] = {}

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def kernel(shape, fan_in):
        return normal(shape, 1.0 / math.sqrt(fan_in))

    def norm(prefix, c, four_d=False):
        shape = (1, 1, 1, c) if four_d else (c,)
        p[f"{prefix}/scale"] = (1.0 + normal(shape, 0.2)).astype(np.float32)
        p[f"{prefix}/bias"] = normal(shape, 0.2)

    D, H = cfg.hidden_size, cfg.num_heads
    hd = D // H
    in_ch = 3
    if cfg.resnet_layers is not None:
        width = int(64 * cfg.resnet_width)
        p["conv_root/kernel"] = kernel((7, 7, 3, width), 49 * 3)
        norm("gn_root", width, gn_4d)
        in_ch = width
        for i, depth in enumerate(cfg.resnet_layers):
            f = width * 2**i
            for j in range(depth):
                u = f"block{i + 1}/unit{j + 1}"
                if j == 0:  # in practice unit1 always changes the channels or the stride
                    p[f"{u}/conv_proj/kernel"] = kernel((1, 1, in_ch, 4 * f), in_ch)
                    norm(f"{u}/gn_proj", 4 * f, gn_4d)
                p[f"{u}/conv1/kernel"] = kernel((1, 1, in_ch, f), in_ch)
                p[f"{u}/conv2/kernel"] = kernel((3, 3, f, f), 9 * f)
                p[f"{u}/conv3/kernel"] = kernel((1, 1, f, 4 * f), f)
                for g, c in (("gn1", f), ("gn2", f), ("gn3", 4 * f)):
                    norm(f"{u}/{g}", c, gn_4d)
                in_ch = 4 * f
    ps = cfg.patch_size
    p["embedding/kernel"] = kernel((ps, ps, in_ch, D), ps * ps * in_ch)
    p["embedding/bias"] = normal((D,), 0.1)
    # The token grid, counted from the layers (not from cfg.input_stride, which is under test):
    # SAME stem conv /2, max-pool /2, a stride-2 unit opening each later stage, then the patch conv.
    # With no stages at all (R+ViT-Ti_16) the root alone halves twice.
    grid = img_size
    if cfg.resnet_layers is not None:
        for _ in range(2 + max(len(cfg.resnet_layers) - 1, 0)):
            grid = -(-grid // 2)
    grid //= ps
    n_tok = grid * grid
    if cfg.classifier == "token":
        p["cls"] = normal((1, 1, D), 1.0)
        n_tok += 1
    p["Transformer/posembed_input/pos_embedding"] = normal((1, n_tok, D), 0.5)
    for layer in range(cfg.num_layers):
        b = f"Transformer/encoderblock_{layer}"
        norm(f"{b}/LayerNorm_0", D)
        norm(f"{b}/LayerNorm_1", D)
        for name in ("query", "key", "value"):
            p[f"{b}/MultiHeadDotProductAttention_0/{name}/kernel"] = kernel((D, H, hd), D)
            p[f"{b}/MultiHeadDotProductAttention_0/{name}/bias"] = normal((H, hd), 0.1)
        p[f"{b}/MultiHeadDotProductAttention_0/out/kernel"] = kernel((H, hd, D), D)
        p[f"{b}/MultiHeadDotProductAttention_0/out/bias"] = normal((D,), 0.1)
        p[f"{b}/MlpBlock_0/Dense_0/kernel"] = kernel((D, cfg.mlp_dim), D)
        p[f"{b}/MlpBlock_0/Dense_0/bias"] = normal((cfg.mlp_dim,), 0.1)
        p[f"{b}/MlpBlock_0/Dense_1/kernel"] = kernel((cfg.mlp_dim, D), cfg.mlp_dim)
        p[f"{b}/MlpBlock_0/Dense_1/bias"] = normal((D,), 0.1)
    norm("Transformer/encoder_norm", D)
    rep_in = D
    if cfg.representation_size is not None:
        p["pre_logits/kernel"] = kernel((D, cfg.representation_size), D)
        p["pre_logits/bias"] = normal((cfg.representation_size,), 0.1)
        rep_in = cfg.representation_size
    p["head/kernel"] = kernel((rep_in, num_classes), rep_in)
    p["head/bias"] = normal((num_classes,), 0.1)
    return p


def to_pre_linen(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename linen block modules to the pre-linen names of the original imagenet21k files."""
    renames = {
        "/MultiHeadDotProductAttention_0/": "/MultiHeadDotProductAttention_1/",
        "/LayerNorm_1/": "/LayerNorm_2/",
        "/MlpBlock_0/": "/MlpBlock_3/",
    }
    out = {}
    for key, value in params.items():
        if key.startswith("Transformer/encoderblock_"):
            for old, new in renames.items():
                key = key.replace(old, new)
        out[key] = value
    return out


# ----------------------------------------------------------------------------- forward


def _same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    total = max((-(-n // s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _windows(x: np.ndarray, k: int, s: int, padding: str, fill: float) -> np.ndarray:
    """(B, H, W, C) -> (B, Ho, Wo, C, k, k) patches, flax/TF "SAME" or "VALID"."""
    if padding == "SAME":
        ph, pw = _same_pads(x.shape[1], k, s), _same_pads(x.shape[2], k, s)
        x = np.pad(x, ((0, 0), ph, pw, (0, 0)), constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    return win[:, ::s, ::s]


def _conv(x: np.ndarray, kernel: np.ndarray, stride: int, padding: str) -> np.ndarray:
    kh = kernel.shape[0]
    return np.einsum("bhwcij,ijco->bhwo", _windows(x, kh, stride, padding, 0.0), kernel)


def _std_conv(x, kernel, stride):
    # models_resnet.weight_standardize over H, W, I with eps 1e-5 added to the population std.
    k = kernel - kernel.mean(axis=(0, 1, 2))
    k = k / (k.std(axis=(0, 1, 2)) + 1e-5)
    return _conv(x, k, stride, "SAME")


def _group_norm(x, scale, bias, groups=32, eps=1e-6):
    B, H, W, C = x.shape
    g = x.reshape(B, H, W, groups, C // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / np.sqrt(var + eps)
    return g.reshape(B, H, W, C) * scale.reshape(-1) + bias.reshape(-1)


def _layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _gelu(x, kind):
    if kind == "tanh":  # flax.linen.gelu(approximate=True)
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _relu(x):
    return np.maximum(x, 0.0)


def _resnet(p, x, cfg):
    x = _relu(_group_norm(_std_conv(x, p["conv_root/kernel"], 2), p["gn_root/scale"], p["gn_root/bias"]))
    x = _windows(x, 3, 2, "SAME", -np.inf).max(axis=(-1, -2))  # max-pool 3x3/2 SAME
    for i, depth in enumerate(cfg.resnet_layers):
        for j in range(depth):
            u = f"block{i + 1}/unit{j + 1}"
            stride = 2 if (i > 0 and j == 0) else 1

            def gn(y, name, u=u):
                return _group_norm(y, p[f"{u}/{name}/scale"], p[f"{u}/{name}/bias"])

            residual = x
            if f"{u}/conv_proj/kernel" in p:
                residual = gn(_std_conv(x, p[f"{u}/conv_proj/kernel"], stride), "gn_proj")
            y = _relu(gn(_std_conv(x, p[f"{u}/conv1/kernel"], 1), "gn1"))
            y = _relu(gn(_std_conv(y, p[f"{u}/conv2/kernel"], stride), "gn2"))
            y = gn(_std_conv(y, p[f"{u}/conv3/kernel"], 1), "gn3")
            x = _relu(residual + y)
    return x


def _attention(p, x, prefix):
    q = np.einsum("bnd,dhk->bnhk", x, p[f"{prefix}/query/kernel"]) + p[f"{prefix}/query/bias"]
    k = np.einsum("bnd,dhk->bnhk", x, p[f"{prefix}/key/kernel"]) + p[f"{prefix}/key/bias"]
    v = np.einsum("bnd,dhk->bnhk", x, p[f"{prefix}/value/kernel"]) + p[f"{prefix}/value/bias"]
    q = q / math.sqrt(q.shape[-1])
    logits = np.einsum("bqhk,bmhk->bhqm", q, k)
    logits = logits - logits.max(-1, keepdims=True)
    w = np.exp(logits)
    w = w / w.sum(-1, keepdims=True)
    out = np.einsum("bhqm,bmhk->bqhk", w, v)
    return np.einsum("bqhk,hkd->bqd", out, p[f"{prefix}/out/kernel"]) + p[f"{prefix}/out/bias"], w


def forward(params: dict[str, np.ndarray], cfg, images_nchw: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    """Eval-mode forward in float64: (logits (B, classes), encoded tokens (B, N, D), attention probs per layer)."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    x = np.asarray(images_nchw, dtype=np.float64).transpose(0, 2, 3, 1)  # NHWC like JAX
    if cfg.resnet_layers is not None:
        x = _resnet(p, x, cfg)
    ps = cfg.patch_size
    x = _conv(x, p["embedding/kernel"], ps, "VALID") + p["embedding/bias"]
    B, gh, gw, D = x.shape
    x = x.reshape(B, gh * gw, D)
    if cfg.classifier == "token":
        x = np.concatenate([np.broadcast_to(p["cls"], (B, 1, D)), x], axis=1)
    x = x + p["Transformer/posembed_input/pos_embedding"]
    eps = cfg.layer_norm_eps
    probs = []
    for layer in range(cfg.num_layers):
        b = f"Transformer/encoderblock_{layer}"
        y = _layer_norm(x, p[f"{b}/LayerNorm_0/scale"], p[f"{b}/LayerNorm_0/bias"], eps)
        y, w = _attention(p, y, f"{b}/MultiHeadDotProductAttention_0")
        probs.append(w)
        x = x + y
        y = _layer_norm(x, p[f"{b}/LayerNorm_1/scale"], p[f"{b}/LayerNorm_1/bias"], eps)
        y = _gelu(y @ p[f"{b}/MlpBlock_0/Dense_0/kernel"] + p[f"{b}/MlpBlock_0/Dense_0/bias"], cfg.gelu)
        y = y @ p[f"{b}/MlpBlock_0/Dense_1/kernel"] + p[f"{b}/MlpBlock_0/Dense_1/bias"]
        x = x + y
    encoded = _layer_norm(x, p["Transformer/encoder_norm/scale"], p["Transformer/encoder_norm/bias"], eps)
    pooled = encoded[:, 0] if cfg.classifier == "token" else encoded.mean(axis=1)
    if "pre_logits/kernel" in p:
        pooled = np.tanh(pooled @ p["pre_logits/kernel"] + p["pre_logits/bias"])
    logits = pooled @ p["head/kernel"] + p["head/bias"]
    return logits, encoded, probs


# ----------------------------------------------------------------------------- flax (optional)


def flax_vit(cfg, num_classes: int):
    """The official architecture built from real flax.linen layers (where flax is installed).

    Mirrors vit_jax/models_vit.py and models_resnet.py module for module and name for name, so
    that flax itself supplies the semantics under test: SAME padding, GroupNorm, the attention
    module's layouts and scaling, `nn.gelu`. Returns a flax Module; apply it to NHWC images.
    """
    import flax.linen as nn
    import jax.numpy as jnp

    class StdConv(nn.Conv):
        def param(self, name, init_fn, *args, **kwargs):
            p = super().param(name, init_fn, *args, **kwargs)
            if name == "kernel":  # weight standardisation, as models_resnet.weight_standardize
                p = p - jnp.mean(p, axis=(0, 1, 2))
                p = p / (jnp.std(p, axis=(0, 1, 2)) + 1e-5)
            return p

    class ResidualUnit(nn.Module):
        features: int
        strides: tuple = (1, 1)

        @nn.compact
        def __call__(self, x):
            residual = x
            if x.shape[-1] != 4 * self.features or self.strides != (1, 1):
                residual = StdConv(4 * self.features, (1, 1), self.strides, use_bias=False, name="conv_proj")(x)
                residual = nn.GroupNorm(name="gn_proj")(residual)
            y = StdConv(self.features, (1, 1), use_bias=False, name="conv1")(x)
            y = nn.relu(nn.GroupNorm(name="gn1")(y))
            y = StdConv(self.features, (3, 3), self.strides, use_bias=False, name="conv2")(y)
            y = nn.relu(nn.GroupNorm(name="gn2")(y))
            y = StdConv(4 * self.features, (1, 1), use_bias=False, name="conv3")(y)
            y = nn.GroupNorm(name="gn3")(y)
            return nn.relu(residual + y)

    class MlpBlock(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Dense(cfg.mlp_dim)(x)
            y = nn.gelu(y, approximate=cfg.gelu == "tanh")
            return nn.Dense(x.shape[-1])(y)

    class Encoder1DBlock(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            x = nn.LayerNorm(epsilon=cfg.layer_norm_eps)(inputs)
            x = nn.MultiHeadDotProductAttention(num_heads=cfg.num_heads)(x, x)
            x = x + inputs
            y = nn.LayerNorm(epsilon=cfg.layer_norm_eps)(x)
            return x + MlpBlock()(y)

    class AddPositionEmbs(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], x.shape[2]))

    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = AddPositionEmbs(name="posembed_input")(x)
            for i in range(cfg.num_layers):
                x = Encoder1DBlock(name=f"encoderblock_{i}")(x)
            return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="encoder_norm")(x)

    class ResNetStage(nn.Module):
        depth: int
        features: int
        first_stride: tuple

        @nn.compact
        def __call__(self, x):
            for j in range(self.depth):
                x = ResidualUnit(self.features, self.first_stride if j == 0 else (1, 1), name=f"unit{j + 1}")(x)
            return x

    class VisionTransformer(nn.Module):
        @nn.compact
        def __call__(self, x):
            if cfg.resnet_layers is not None:
                width = int(64 * cfg.resnet_width)
                x = StdConv(width, (7, 7), (2, 2), use_bias=False, name="conv_root")(x)
                x = nn.relu(nn.GroupNorm(name="gn_root")(x))
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
                for i, depth in enumerate(cfg.resnet_layers):
                    stride = (2, 2) if i > 0 else (1, 1)
                    x = ResNetStage(depth, width * 2**i, stride, name=f"block{i + 1}")(x)
            p = cfg.patch_size
            x = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", name="embedding")(x)
            n, h, w, c = x.shape
            x = jnp.reshape(x, (n, h * w, c))
            if cfg.classifier == "token":
                cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
                x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
            x = Encoder(name="Transformer")(x)
            x = x[:, 0] if cfg.classifier == "token" else jnp.mean(x, axis=1)
            if cfg.representation_size is not None:
                x = jnp.tanh(nn.Dense(cfg.representation_size, name="pre_logits")(x))
            return nn.Dense(num_classes, name="head")(x)

    return VisionTransformer()


def flax_params_to_official(params) -> dict[str, np.ndarray]:
    """Flatten a flax parameter tree to '/'-joined names and float32 numpy arrays."""
    from flax.traverse_util import flatten_dict

    return {"/".join(path): np.asarray(v, dtype=np.float32) for path, v in flatten_dict(params).items()}
