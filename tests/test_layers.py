"""The hot layers are modules a fine-tuner can hook, wrap and swap, on both backends.

The triton backend runs in the interpreter on CPU (fp32), so every property here is checked on the fused
kernels too.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import vitcore
from vitcore.layers import BackendOwner, LayerNorm, MlpBlock, SelfAttention

BACKENDS = ["torch", "triton"]
CFG = vitcore.ViTConfig(patch_size=4, hidden_size=16, mlp_dim=24, num_heads=2, num_layers=2, representation_size=8)
IMG = 8


def make_model(backend: str, seed: int = 0) -> vitcore.VisionTransformer:
    torch.manual_seed(seed)
    model = vitcore.VisionTransformer(CFG, img_size=IMG, num_classes=3, backend=backend)
    with torch.no_grad():  # a non-zero head, so every layer reaches the logits
        model.head.weight.normal_()
    return model


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


class Lora(nn.Module):
    """A hand-made LoRA wrapper as a user would write one: base(x) + B(A(x)) * scale, base frozen."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.A = nn.Linear(base.in_features, rank, bias=False)
        self.B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.B.weight, std=0.5)  # non-zero so the wrapper changes the output at once
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.base(x) + self.B(self.A(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_linear_and_layernorm_hook_fires_once_per_forward(backend):
    model = make_model(backend).eval()
    counts: dict[str, int] = {}
    targets = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.LayerNorm))}
    # Every block's qkv/out/fc1/fc2/norm1/norm2, the encoder norm, pre_logits and the head.
    assert len(targets) == 2 * 6 + 3
    outputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs, output):
            counts[name] = counts.get(name, 0) + 1
            outputs[name] = output

        return record

    for name, m in targets.items():
        m.register_forward_hook(hook(name))
    x = images()
    with torch.no_grad():
        logits = model(x)
    assert counts == {name: 1 for name in targets}
    # fc1's hook sees the Linear's own output (pre-activation), as for any nn.Linear.
    fc1 = model.blocks[0].mlp.fc1
    h = outputs["blocks.0.norm1"]
    assert h.shape == (2, 5, 16)
    assert outputs["blocks.0.mlp.fc1"].min() < -0.2  # a GELU output would be >= -0.17
    # Hooks change nothing: the hooked model computes the same logits as an unhooked twin.
    with torch.no_grad():
        assert torch.allclose(logits, make_model(backend).eval()(x), atol=1e-5)
    assert isinstance(fc1, nn.Linear)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_forward_hook_sees_fc1_once(backend):
    model = make_model(backend).eval()
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(m) if m is model.blocks[1].mlp.fc1 else None)
    try:
        with torch.no_grad():
            model(images())
    finally:
        handle.remove()
    assert len(seen) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2"])
def test_lora_wrapper_is_called_changes_logits_and_gets_gradients(backend, where):
    model = make_model(backend).train()
    x = images()
    with torch.no_grad():
        before = model(x)
    for p in model.parameters():
        p.requires_grad_(False)
    parent_name, attr = where.split(".")
    wrappers = []
    for block in model.blocks:
        parent = getattr(block, parent_name)
        wrapper = Lora(getattr(parent, attr))
        setattr(parent, attr, wrapper)
        wrappers.append(wrapper)
    logits = model(x)
    assert all(w.calls == 1 for w in wrappers)
    assert (logits - before).abs().max() > 1e-3
    logits.square().sum().backward()
    for w in wrappers:
        assert w.A.weight.grad is not None and w.A.weight.grad.abs().sum() > 0
        assert w.B.weight.grad is not None and w.B.weight.grad.abs().sum() > 0
        assert w.base.weight.grad is None  # frozen


def test_lora_on_fc1_adds_inside_the_gelu():
    """LoRA's update belongs to the pre-activation: gelu(W x + b + BAx), not gelu(Wx + b) + BAx."""
    model = make_model("torch").eval()
    mlp = model.blocks[0].mlp
    x = torch.randn(2, 5, 16)
    lora = Lora(mlp.fc1)
    mlp.fc1 = lora
    with torch.no_grad():
        expected = mlp.fc2(torch.nn.functional.gelu(lora.base(x) + lora.B(lora.A(x)), approximate="tanh"))
        assert torch.allclose(mlp(x), expected, atol=1e-6)


def test_triton_mlp_fuses_only_when_nothing_observes_fc1(monkeypatch):
    import kernels

    calls = []
    real = kernels.linear_gelu
    monkeypatch.setattr(kernels, "linear_gelu", lambda *a, **k: calls.append(1) or real(*a, **k))
    mlp = MlpBlock(16, 24, 0.0, "tanh", backend="triton").eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        fused = mlp(x)
        assert len(calls) == 1
        handle = mlp.fc1.register_forward_hook(lambda m, i, o: None)
        unfused = mlp(x)
        handle.remove()
    assert len(calls) == 1  # the hooked fc1 ran as a module
    assert torch.allclose(fused, unfused, atol=1e-5)


def test_set_backend_switches_every_layer_and_checks_the_name():
    model = make_model("torch")
    owners = [m for m in model.modules() if isinstance(m, BackendOwner)]
    # Per block: norm1, attention core, norm2, MLP; plus the encoder norm.
    assert len(owners) == 2 * 4 + 1
    assert any(isinstance(m, SelfAttention) for m in owners) and any(isinstance(m, LayerNorm) for m in owners)
    assert model.set_backend("triton") is model
    assert {m.backend for m in owners} == {"triton"} and model.backend == "triton"
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        model.set_backend("cuda")
    assert {m.backend for m in owners} == {"triton"}


def test_set_backend_changes_which_path_runs(monkeypatch):
    import kernels

    calls = {"attention": 0, "layer_norm": 0, "linear_gelu": 0}
    for name in calls:
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _n=name, _r=real, **k: calls.__setitem__(_n, calls[_n] + 1)
                            or _r(*a, **k))
    model = make_model("torch").eval()
    x = images()
    with torch.no_grad():
        ref = model(x)
        assert sum(calls.values()) == 0
        fast = model.set_backend("triton")(x)
    assert calls == {"attention": 2, "layer_norm": 5, "linear_gelu": 2}
    assert torch.allclose(ref, fast, atol=1e-4)


def test_layers_keep_official_state_dict_names():
    model = make_model("torch")
    keys = set(model.state_dict())
    for name in ("blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.out.bias",
                 "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "encoder_norm.weight"):
        assert name in keys
    assert not any("core" in k or "act" in k for k in keys)  # parameter-free modules add no entries


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
@pytest.mark.parametrize("backend", BACKENDS)
def test_peft_lora_on_the_mlp_and_attention_linears(backend):
    from peft import LoraConfig, get_peft_model

    model = make_model(backend).train()
    x = images()
    with torch.no_grad():
        before = model(x)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["qkv", "out", "fc1", "fc2"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    logits = peft_model(x)
    assert (logits - before).abs().max() > 1e-4
    logits.square().sum().backward()
    lora_params = [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]
    assert len(lora_params) == 2 * 4 * 2  # A and B for 4 Linears in 2 blocks
    for name, p in lora_params:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    frozen = [p for n, p in peft_model.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in frozen)


def test_auto_attention_with_dropout_in_training_takes_the_torch_path_quietly(monkeypatch):
    import warnings

    from vitcore import ops

    picked = []
    monkeypatch.setattr(ops, "pick_backend", lambda backend, op, *inputs: picked.append(op) or "triton")
    core = SelfAttention(0.1, backend="auto").train()
    q = torch.randn(1, 2, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "falls back" warning for auto
        y = core(q, q, q)
    assert y.shape == q.shape and picked == []
    core.eval()
    core(q, q, q)
    assert picked == ["attention"]
