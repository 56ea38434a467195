"""The model zoo: every ViT and hybrid of vit_jax/configs/models.py, with the official parameter counts, and an
official-layout checkpoint of each (depth-reduced) that loads and matches the float64 reference."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import reference_vit as ref
import torch

import vitcore
from vitcore import VisionTransformer
from vitcore.config import ALIASES, OFFICIAL_NAMES, augreg_name, canonical_name

# vit_jax/models_test.py MODEL_SIZES: the official flax models at 224 px with a 1000-class head.
OFFICIAL_PARAMS = {
    "R+ViT-Ti_16": 6_337_704,
    "R26+ViT-B_32": 101_383_976,
    "R26+ViT-S_32": 36_431_912,
    "R50+ViT-B_16": 98_659_112,
    "R50+ViT-L_32": 328_994_856,
    "ViT-B_8": 86_576_872,
    "ViT-B_16": 86_567_656,
    "ViT-B_16-gap-norep": 86_566_120,
    "ViT-B_32": 88_224_232,
    "ViT-B_32-gap-norep": 88_222_696,
    "ViT-H_14": 632_045_800,
    "ViT-L_16": 304_326_632,
    "ViT-L_32": 306_535_400,
    "ViT-S_16": 22_050_664,
    "ViT-S_16-gap-norep": 22_049_896,
    "ViT-S_32": 22_878_952,
    "ViT-S_32-gap-norep": 22_878_184,
    "ViT-Ti_16": 5_717_416,
    "testing": 21_390,
}


def test_the_zoo_is_exactly_the_official_vit_list():
    assert sorted(OFFICIAL_NAMES) == sorted(OFFICIAL_PARAMS)
    assert set(vitcore.CONFIGS) == set(OFFICIAL_NAMES) | set(ALIASES)


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_count_at_224_equals_the_official_one(name):
    with torch.device("meta"):  # counting needs no memory
        model = VisionTransformer(vitcore.CONFIGS[name], img_size=224, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


def test_strides_follow_the_layers_not_the_names():
    # Root conv /2, max-pool /2, each stage after the first /2, then the patch: R+ViT-Ti_16 is /32 (7x7 tokens at
    # 224 px, which is what its official 6,337,704 parameters count), the R26 and R50+L hybrids /32, R50+B /16.
    strides = {n: vitcore.CONFIGS[n].input_stride for n in OFFICIAL_NAMES if vitcore.CONFIGS[n].is_hybrid}
    assert strides == {"R+ViT-Ti_16": 32, "R50+ViT-B_16": 16, "R26+ViT-B_32": 32, "R26+ViT-S_32": 32,
                       "R50+ViT-L_32": 32}


def test_aliases_are_the_augreg_short_names_and_jeonsworlds_hybrid():
    assert ALIASES["Ti_16"] == "ViT-Ti_16" and ALIASES["R_Ti_16"] == "R+ViT-Ti_16"
    assert ALIASES["R26_S_32"] == "R26+ViT-S_32" and ALIASES["R50_L_32"] == "R50+ViT-L_32"
    assert ALIASES["R50-ViT-B_16"] == "R50+ViT-B_16"
    # vit_jax registers no AugReg name for these four (no AugReg checkpoints exist).
    for name in ("testing", "ViT-L_32", "R50+ViT-B_16", "ViT-H_14"):
        assert augreg_name(name) not in ALIASES
    for alias, name in ALIASES.items():
        assert vitcore.CONFIGS[alias] is vitcore.CONFIGS[name]
        assert canonical_name(alias) == name
    assert all(canonical_name(n) == n for n in OFFICIAL_NAMES)
    with pytest.raises(KeyError, match="unknown model type 'B-16'.*valid names: testing, ViT-Ti_16.*aliases: Ti_16"):
        canonical_name("B-16")


def test_official_dropout_rates():
    rates = {n: vitcore.CONFIGS[n].dropout for n in OFFICIAL_NAMES}
    with_dropout = {n for n, r in rates.items() if r}
    assert with_dropout == {"testing", "ViT-L_16", "ViT-H_14", "R50+ViT-B_16", "R50+ViT-L_32"}
    assert all(rates[n] == 0.1 for n in with_dropout)


def _reference_case(name: str) -> tuple[vitcore.ViTConfig, int]:
    cfg = vitcore.CONFIGS[name].replace(num_layers=1, dropout=0.0)
    # Two tokens a side; R+ViT-Ti_16 at its real 224 px, where its stride shows as a 7x7 grid.
    return cfg, 224 if name == "R+ViT-Ti_16" else 2 * cfg.input_stride


@pytest.mark.parametrize("name", OFFICIAL_NAMES)
def test_official_layout_checkpoint_of_each_entry_matches_the_float64_reference(tmp_path, name):
    """Depth 1, every width as published; the ResNet roots complete (R26's (2, 2, 2, 2), R50's (3, 4, 6, 3))."""
    cfg, img = _reference_case(name)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    params = ref.random_params(cfg, img, 1000, rng, gn_4d=cfg.is_hybrid)
    path = tmp_path / f"{name}.npz"
    np.savez(path, **params)
    model = VisionTransformer(cfg, img_size=img, num_classes=1000, backend="torch").eval()
    report = vitcore.load_pretrained(model, path)
    assert sorted(report.loaded) == sorted(params) and not report.resized and not report.reinitialized
    images = rng.standard_normal((2, 3, img, img))
    want, _, _ = ref.forward(params, cfg, images)
    with torch.no_grad():
        got = model.double()(torch.from_numpy(images)).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-10


@pytest.mark.parametrize("name", [n for n in OFFICIAL_NAMES if vitcore.CONFIGS[n].is_hybrid] + ["ViT-B_8"])
def test_each_hybrid_matches_real_flax_modules_in_float64(name):
    """Where flax is installed (not in CI): flax.linen's own conv, max-pool and GroupNorm decide the grid and the
    parameter shapes (R+ViT-Ti_16's 7x7 tokens at 224 px among them), and the outputs agree. In float64 on both
    sides: through R50+ViT-L_32's 16 units at a 2x2 grid float32 alone is 1e-4 off (flax 2.6e-4, vitcore 8e-5)."""
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    pytest.importorskip("flax")
    import jax

    try:  # jax >= 0.8; older releases had it under jax.experimental
        enable_x64 = jax.enable_x64
    except AttributeError:
        from jax.experimental import enable_x64

    cfg, img = _reference_case(name)
    module = ref.flax_vit(cfg, num_classes=5)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    x = rng.standard_normal((1, img, img, 3))
    params = module.init(jax.random.PRNGKey(0), x.astype(np.float32))["params"]
    params = jax.tree_util.tree_map(lambda p: np.asarray(p, np.float64) + 0.1 * rng.standard_normal(p.shape), params)
    official = ref.flax_params_to_official(params)  # float32, as a checkpoint stores them
    assert {k: v.shape for k, v in official.items()} == {
        k: v.shape for k, v in ref.random_params(cfg, img, 5, rng).items()}
    params = jax.tree_util.tree_map(lambda p: np.asarray(p, np.float32).astype(np.float64), params)
    with enable_x64():
        want = np.asarray(module.apply({"params": params}, x))
    assert want.dtype == np.float64
    model = VisionTransformer(cfg, img_size=img, num_classes=5, backend="torch").eval()
    assert not vitcore.load_pretrained(model, official).resized  # flax's grid is vitcore's
    with torch.no_grad():
        got = model.double()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-10
