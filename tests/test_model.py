"""VisionTransformer against the independent float64 reference, the zoo, and input validation."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import reference_vit as ref
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import vitcore
from vitcore import VisionTransformer, ViTConfig


def rel_err(a: torch.Tensor | np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a.detach().double() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@st.composite
def model_cases(draw):
    """A small config (plain ViT or tiny R50 hybrid), image size, class count, file flavour."""
    heads, head_dim = draw(st.sampled_from([(1, 8), (2, 4), (3, 8), (1, 64), (2, 64), (1, 80), (2, 80)]))
    hybrid = draw(st.sampled_from([False, False, True]))
    common = dict(
        hidden_size=heads * head_dim,
        num_heads=heads,
        mlp_dim=draw(st.sampled_from([8, 24, 64, 96])),
        num_layers=draw(st.integers(1, 2)),
        representation_size=draw(st.sampled_from([None, None, 5, 16])),
        classifier=draw(st.sampled_from(["token", "gap"])),
        gelu=draw(st.sampled_from(["tanh", "tanh", "erf"])),
    )
    if hybrid:
        cfg = ViTConfig(
            patch_size=draw(st.sampled_from([1, 2])),
            resnet_layers=draw(st.sampled_from([(1,), (1, 1)])),
            resnet_width=0.5,
            **common,
        )
    else:
        cfg = ViTConfig(patch_size=draw(st.sampled_from([1, 2, 4, 8, 16])), **common)
    # A 1x1 ResNet grid leaves GroupNorm one value per group (zero variance: ill-conditioned, not a bug).
    grid = draw(st.integers(2 if hybrid else 1, 3))
    return dict(
        cfg=cfg,
        img_size=grid * cfg.input_stride,
        num_classes=draw(st.integers(1, 12)),
        pre_linen=draw(st.booleans()),
        compressed=draw(st.booleans()),
        gn_4d=hybrid and draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# The ci profile's few draws are all plain ViTs: pin a hybrid read from a pre-linen file with 4-D GroupNorms.
@example(
    case=dict(
        cfg=ViTConfig(
            patch_size=1, hidden_size=8, num_heads=2, mlp_dim=8, num_layers=2, resnet_layers=(1, 1), resnet_width=0.5
        ),
        img_size=16,
        num_classes=3,
        pre_linen=True,
        compressed=True,
        gn_4d=True,
        seed=0,
    )
)
@given(case=model_cases())
def test_matches_float64_reference_after_loading_official_npz(case):
    cfg, img = case["cfg"], case["img_size"]
    rng = np.random.default_rng(case["seed"])
    params = ref.random_params(cfg, img, case["num_classes"], rng, gn_4d=case["gn_4d"])
    stored = ref.to_pre_linen(params) if case["pre_linen"] else params
    images = rng.standard_normal((2, 3, img, img)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.npz")
        (np.savez_compressed if case["compressed"] else np.savez)(path, **stored)
        model = VisionTransformer(cfg, img_size=img, num_classes=case["num_classes"], backend="torch").eval()
        report = vitcore.load_pretrained(model, path)
    assert sorted(report.loaded) == sorted(stored) and not report.resized and not report.reinitialized
    want_logits, want_tokens, want_probs = ref.forward(params, cfg, images)
    with torch.no_grad():
        x = torch.from_numpy(images)
        tokens = model.forward_features(x)
        logits, probs = model(x, return_attention=True)
    assert tokens.shape == want_tokens.shape
    assert rel_err(tokens, want_tokens) < 1e-5
    assert rel_err(logits, want_logits) < 1e-5
    assert rel_err(model.forward_head(tokens), want_logits) < 1e-5
    assert len(probs) == cfg.num_layers
    for got, want in zip(probs, want_probs):
        assert rel_err(got, want) < 1e-5
    # In float64 the two must agree to rounding: any difference in the function itself (an eps,
    # a padding) shows here even where float32 noise would hide it.
    with torch.no_grad():
        logits64 = model.double()(x.double())
    assert rel_err(logits64, want_logits) < 1e-10


def test_full_depth_r50_root_matches_reference_in_float64():
    """The official R50 root (3, 4, 9): 16 bottleneck units, SAME padding at every stride."""
    cfg = ViTConfig(patch_size=1, hidden_size=64, mlp_dim=16, num_heads=1, num_layers=1, resnet_layers=(3, 4, 9))
    rng = np.random.default_rng(0)
    params = ref.random_params(cfg, 48, 7, rng)
    images = rng.standard_normal((2, 3, 48, 48))
    model = VisionTransformer(cfg, img_size=48, num_classes=7, backend="torch").eval()
    vitcore.load_pretrained(model, params)
    want, _, _ = ref.forward(params, cfg, images)
    with torch.no_grad():
        assert rel_err(model.double()(torch.from_numpy(images)), want) < 1e-10


# Official parameter counts (224 px, 1000 classes, no representation layer), as published for
# the JAX models / timm ports (e.g. ViT-B_16 86,567,656; R50+ViT-B_16 98.95M at 384 px).
OFFICIAL_PARAMS = {
    "ViT-Ti_16": 5_717_416,
    "ViT-S_16": 22_050_664,
    "ViT-S_32": 22_878_952,
    "ViT-B_16": 86_567_656,
    "ViT-B_32": 88_224_232,
    "ViT-L_16": 304_326_632,
    "ViT-L_32": 306_535_400,
    "ViT-H_14": 632_045_800,
    "R50-ViT-B_16": 98_659_112,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_counts_match_official(name):
    with torch.device("meta"):  # counting needs no memory
        model = VisionTransformer(vitcore.CONFIGS[name], img_size=224, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


def test_r50_hybrid_at_384_matches_published_count():
    with torch.device("meta"):
        model = VisionTransformer(vitcore.CONFIGS["R50-ViT-B_16"], img_size=384, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 98_950_952  # timm vit_base_r50_s16_384: 98.95M


# Every config keeps its widths and its ResNet root but only 2 blocks: the blocks are identical, and full
# depth on 2 shared CPU cores would cost minutes for no extra coverage.
@pytest.mark.parametrize("name", vitcore.config.OFFICIAL_NAMES)
def test_zoo_forward_backward_in_train_mode(name):
    cfg = vitcore.CONFIGS[name]
    cfg = cfg.replace(num_layers=min(cfg.num_layers, 2))
    cfg = cfg.replace(dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    img = 2 * cfg.input_stride if not cfg.is_hybrid else 32
    model = VisionTransformer(cfg, img_size=img, num_classes=10, backend="torch").train()
    torch.nn.init.normal_(model.head.weight)  # the zero head would stop gradients reaching the encoder
    x = torch.randn(2, 3, img, img)
    logits = model(x)
    assert logits.shape == (2, 10)
    logits.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    if cfg.is_hybrid:
        assert model.resnet.conv_root.weight.grad.abs().sum() > 0
    # Dropout is active in train mode and off in eval mode.
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


def test_hybrid_accepts_multiples_of_its_stride():
    cfg = vitcore.CONFIGS["R50-ViT-B_16"].replace(num_layers=1)
    assert cfg.input_stride == 16
    model = VisionTransformer(cfg, img_size=48, num_classes=3, backend="torch").eval()
    assert model.pos_embedding.shape == (1, 1 + 9, 768)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 3)


@pytest.mark.parametrize(
    "name, img_size, match",
    [
        ("ViT-B_16", 100, "multiple of the patch size \\(16\\)"),
        ("ViT-H_14", 224 + 7, "multiple of the patch size \\(14\\)"),
        ("R50-ViT-B_16", 40, "multiple of the ResNet stride x patch \\(16\\)"),
        ("ViT-B_16", 0, "positive multiple"),
        ("ViT-B_16", (224, 224), "positive multiple"),
    ],
)
def test_bad_img_size_is_a_clear_error(name, img_size, match):
    with torch.device("meta"), pytest.raises(ValueError, match=match):
        VisionTransformer(vitcore.CONFIGS[name], img_size=img_size)


def test_bad_arguments_are_clear_errors():
    cfg = vitcore.CONFIGS["testing"]
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        VisionTransformer(cfg, img_size=32, backend="cuda")
    with pytest.raises(ValueError, match="num_classes=0 must be an int >= 1"):
        VisionTransformer(cfg, img_size=32, num_classes=0)
    with pytest.raises(TypeError, match="must be a ViTConfig"):
        VisionTransformer("ViT-B_16")
    model = VisionTransformer(cfg, img_size=32, num_classes=2)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\), got \(1, 3, 48, 48\)"):
        model(torch.randn(1, 3, 48, 48))


def test_return_attention_shapes_and_probabilities():
    cfg = ViTConfig(patch_size=4, hidden_size=16, mlp_dim=8, num_heads=2, num_layers=3)
    model = VisionTransformer(cfg, img_size=12, num_classes=5, backend="torch").eval()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        logits, attentions = model(x, return_attention=True)
        assert torch.allclose(logits, model(x), atol=1e-6)  # same function with or without the probabilities
    assert len(attentions) == 3
    for a in attentions:
        assert a.shape == (4, 2, 10, 10)
        assert torch.allclose(a.sum(-1), torch.ones(4, 2, 10), atol=1e-5)


def test_auto_backend_is_torch_on_cpu(monkeypatch):
    import kernels

    def no_kernels(*args, **kwargs):
        raise AssertionError("auto on CPU must not call a Triton kernel")

    for name in ("attention", "layer_norm", "linear_gelu"):
        monkeypatch.setattr(kernels, name, no_kernels)
    model = VisionTransformer(vitcore.CONFIGS["testing"], img_size=32, num_classes=2)
    assert model.backend == "auto"
    assert vitcore.ops.pick_backend("auto", "layer_norm", torch.zeros(1)) == "torch"
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)


FLAX_CASES = {
    "token_pre_logits": (
        ViTConfig(patch_size=4, hidden_size=64, mlp_dim=96, num_heads=2, num_layers=2, representation_size=16),
        16,
    ),
    "gap_erf_head_dim_80": (
        ViTConfig(patch_size=8, hidden_size=80, mlp_dim=32, num_heads=1, num_layers=1, classifier="gap", gelu="erf"),
        24,
    ),
    "tiny_hybrid": (
        ViTConfig(
            patch_size=1, hidden_size=32, mlp_dim=16, num_heads=2, num_layers=1, resnet_layers=(1, 1), resnet_width=0.5
        ),
        40,
    ),
    "r50_stem": (
        ViTConfig(patch_size=1, hidden_size=64, mlp_dim=16, num_heads=1, num_layers=1, resnet_layers=(3, 4, 9)),
        48,
    ),
}


@pytest.mark.parametrize("case", list(FLAX_CASES))
def test_matches_real_flax_modules(case):
    """Where flax is installed (not in CI): the architecture built from flax.linen's own layers."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # exact fp32 matmuls; leave the GPU to torch
    pytest.importorskip("flax")
    import jax

    cfg, img = FLAX_CASES[case]
    module = ref.flax_vit(cfg, num_classes=7)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, img, img, 3)).astype(np.float32)  # NHWC, as JAX
    params = module.init(jax.random.PRNGKey(0), x)["params"]
    # Perturb everything: flax initialises the head (and biases) to zero.
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * rng.standard_normal(p.shape).astype(np.float32), params)
    want = np.asarray(module.apply({"params": params}, x), dtype=np.float64)
    official = ref.flax_params_to_official(params)
    # flax's own names and shapes are the ones the numpy reference draws.
    drawn = ref.random_params(cfg, img, 7, rng)
    assert {k: v.shape for k, v in official.items()} == {k: v.shape for k, v in drawn.items()}

    model = VisionTransformer(cfg, img_size=img, num_classes=7, backend="torch").eval()
    report = vitcore.load_pretrained(model, official)
    assert sorted(report.loaded) == sorted(official)
    with torch.no_grad():
        got = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    # Both sides compute in float32 (flax's norms with the fast E[x^2] - E[x]^2 variance); through the
    # 16 GroupNorm'd units of the R50 root each is ~1e-5 off the float64 value (vitcore alone: 6-8e-6 vs
    # the numpy reference; 1e-5 failed once against flax on an H100 box). The float64 check of this root,
    # test_full_depth_r50_root_matches_reference_in_float64, holds it to 1e-10.
    tol = 5e-5 if cfg.resnet_layers == (3, 4, 9) else 1e-5
    assert rel_err(got, want) < tol
    numpy_logits, _, _ = ref.forward(official, cfg, x.transpose(0, 3, 1, 2))
    assert rel_err(numpy_logits, want) < tol
