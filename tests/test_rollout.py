"""Attention rollout: row-stochastic, matches a plain numpy computation, works on model output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vitcore
from vitcore import VisionTransformer, ViTConfig
from vitcore.rollout import rollout_matrix


def random_probs(rng, layers, batch, heads, n):
    logits = rng.standard_normal((layers, batch, heads, n, n)) * 3
    p = np.exp(logits)
    return [torch.from_numpy(x / x.sum(-1, keepdims=True)).float() for x in p]


def numpy_rollout(probs):
    joint = None
    for a in probs:
        a = a.double().numpy().mean(axis=1)
        a = a + np.eye(a.shape[-1])
        a = a / a.sum(-1, keepdims=True)
        joint = a if joint is None else np.einsum("bij,bjk->bik", a, joint)
    return joint


@given(
    layers=st.integers(1, 4),
    batch=st.integers(1, 3),
    heads=st.integers(1, 4),
    grid=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_rollout_rows_sum_to_one_and_match_numpy(layers, batch, heads, grid, seed):
    probs = random_probs(np.random.default_rng(seed), layers, batch, heads, 1 + grid * grid)
    joint = rollout_matrix(probs)
    np.testing.assert_allclose(joint.sum(-1).numpy(), 1.0, rtol=1e-12)
    want = numpy_rollout(probs)
    np.testing.assert_allclose(joint.numpy(), want, rtol=1e-10)
    heat = vitcore.attention_rollout(probs)
    assert heat.shape == (batch, grid, grid)
    np.testing.assert_allclose(heat.numpy(), want[:, 0, 1:].reshape(batch, grid, grid), rtol=1e-6)


def test_known_values():
    n = 5  # class token + 2x2 grid
    identity = [torch.eye(n).expand(1, 2, n, n)]
    assert torch.equal(vitcore.attention_rollout(identity), torch.zeros(1, 2, 2))
    uniform = [torch.full((1, 2, n, n), 1.0 / n)]  # (U + I) / 2: patches get 1 / (2n) each
    torch.testing.assert_close(vitcore.attention_rollout(uniform), torch.full((1, 2, 2), 0.5 / n))


def test_rollout_of_model_attention():
    cfg = ViTConfig(patch_size=4, hidden_size=16, mlp_dim=8, num_heads=2, num_layers=3)
    model = VisionTransformer(cfg, img_size=12, num_classes=3).eval()
    with torch.no_grad():
        _, attentions = model(torch.randn(2, 3, 12, 12), return_attention=True)
    heat = vitcore.attention_rollout(attentions)
    assert heat.shape == (2, 3, 3) and (heat >= 0).all()
    torch.testing.assert_close(rollout_matrix(attentions).sum(-1), torch.ones(2, 10, dtype=torch.float64))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="at least one layer"):
        vitcore.attention_rollout([])
    with pytest.raises(ValueError, match=r"\(B, heads, N, N\)"):
        vitcore.attention_rollout([torch.ones(2, 5, 5)])
    gap = [torch.full((1, 1, 4, 4), 0.25)]  # a gap model: 2x2 grid, no class token
    with pytest.raises(ValueError, match="needs a model with a class token"):
        vitcore.attention_rollout(gap)
