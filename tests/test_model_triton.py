"""The whole model with backend="triton" computes what backend="torch" computes, forward and backward.

On CPU this runs the kernels in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so the
models are tiny; the `gpu` test repeats the comparison in bf16 at ViT-B_16 width on CUDA.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from kernel_checks import check_close, rel_err

import vitcore
from vitcore import VisionTransformer, ViTConfig, ops

# Without CUDA the kernels run in the interpreter in exact fp32; on a GPU, fp32 tl.dot may use TF32.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FWD_TOL, GRAD_TOL = (1e-5, 1e-4) if DEVICE == "cpu" else (5e-3, 1e-2)

CASES = {
    "head_dim_8": (ViTConfig(patch_size=4, hidden_size=16, mlp_dim=24, num_heads=2, num_layers=2), 8),
    "head_dim_80_gap_erf": (
        ViTConfig(patch_size=4, hidden_size=80, mlp_dim=32, num_heads=1, num_layers=1, classifier="gap", gelu="erf"),
        8,
    ),
    "head_dim_64_pre_logits": (
        ViTConfig(patch_size=8, hidden_size=128, mlp_dim=16, num_heads=2, num_layers=1, representation_size=8),
        16,
    ),
    "r50_hybrid": (
        ViTConfig(
            patch_size=1, hidden_size=16, mlp_dim=16, num_heads=2, num_layers=1, resnet_layers=(1,), resnet_width=0.5
        ),
        8,
    ),
}


def twin_models(cfg: ViTConfig, img: int, device: str = DEVICE) -> tuple[VisionTransformer, VisionTransformer]:
    torch.manual_seed(0)
    ref = VisionTransformer(cfg, img_size=img, num_classes=5, backend="torch").to(device)
    with torch.no_grad():
        for p in ref.parameters():  # random everything, including the zero-initialised head
            p.add_(torch.randn_like(p) * 0.1)
    fast = VisionTransformer(cfg, img_size=img, num_classes=5, backend="triton").to(device)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("case", list(CASES))
def test_triton_backend_matches_torch_forward_and_gradients(case):
    cfg, img = CASES[case]
    ref, fast = twin_models(cfg, img)
    x = torch.randn(2, 3, img, img, device=DEVICE)
    grads = {}
    for name, model in (("torch", ref), ("triton", fast)):
        model.train()  # dropout is 0 in these configs: train mode only exercises the training branches
        out = model(x)
        out.square().sum().backward()
        grads[name] = (out.detach(), {n: p.grad for n, p in model.named_parameters()})
    check_close("logits", grads["triton"][0], grads["torch"][0], tol=FWD_TOL)
    for n, g in grads["torch"][1].items():
        check_close(n, grads["triton"][1][n], g, tol=GRAD_TOL)


def test_triton_attention_dropout_falls_back_to_torch_and_warns_once(monkeypatch):
    cfg = CASES["head_dim_8"][0].replace(attention_dropout=0.5, dropout=0.1)
    ref, fast = twin_models(cfg, 8)
    ref.train(), fast.train()
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    monkeypatch.setattr(ops, "_warned_attention_dropout", False)
    torch.manual_seed(1)
    want = ref(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(1)  # same dropout masks: the fallback draws them exactly like the torch path
        got = fast(x)
        fast(x)
    messages = [str(w.message) for w in caught if "attention_dropout" in str(w.message)]
    assert len(messages) == 1 and "falls back" in messages[0]
    check_close("logits", got.detach(), want.detach(), tol=FWD_TOL)


def test_triton_return_attention_gives_the_torch_probabilities():
    cfg, img = CASES["head_dim_8"]
    ref, fast = twin_models(cfg, img)
    x = torch.randn(1, 3, img, img, device=DEVICE)
    with torch.no_grad():
        want_logits, want = ref.eval()(x, return_attention=True)
        got_logits, got = fast.eval()(x, return_attention=True)
    check_close("logits", got_logits, want_logits, tol=FWD_TOL)
    for a, b in zip(got, want):
        check_close("probs", a, b, tol=FWD_TOL)


# Full-width layers of the zoo (two blocks each, to keep the GPU check short): ViT-B_16, ViT-H_14 (head_dim 80),
# and a hybrid with a ResNet stem.
BF16_CASES = {
    "vit_b16": (vitcore.CONFIGS["ViT-B_16"].replace(num_layers=2), 224),
    "vit_h14": (vitcore.CONFIGS["ViT-H_14"].replace(num_layers=2, dropout=0.0), 224),
    "hybrid": (ViTConfig(patch_size=1, resnet_layers=(1, 1), resnet_width=1.0, num_layers=2), 64),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(BF16_CASES))
def test_triton_bf16_error_is_bounded_by_torch_bf16_error_on_cuda(case):
    """Zoo-width layers under bf16 autocast: triton's error vs fp32 <= 2x torch's own bf16 error (+ slack)."""
    cfg, img = BF16_CASES[case]
    ref, fast = twin_models(cfg, img, device="cuda")
    x = torch.randn(8, 3, img, img, device="cuda")

    def run(model, autocast):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        out.float().square().mean().backward()
        return out.float().detach(), {n: p.grad.float() for n, p in model.named_parameters()}

    exact_out, exact_grads = run(ref, autocast=False)  # fp32 torch: the reference
    torch_out, torch_grads = run(ref, autocast=True)
    fast_out, fast_grads = run(fast, autocast=True)

    assert rel_err(fast_out, exact_out) <= 2 * rel_err(torch_out, exact_out) + 1e-3
    for n, g in exact_grads.items():
        assert rel_err(fast_grads[n], g) <= 2 * rel_err(torch_grads[n], g) + 1e-3, n


def test_triton_backend_really_calls_the_kernels(monkeypatch):
    import kernels

    calls = {"attention": 0, "layer_norm": 0, "linear_gelu": 0}

    def counting(name, real):
        def counted(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return counted

    for name in calls:
        monkeypatch.setattr(kernels, name, counting(name, getattr(kernels, name)))
    cfg, img = CASES["head_dim_8"]
    _, fast = twin_models(cfg, img)
    fast(torch.randn(1, 3, img, img, device=DEVICE)).sum().backward()
    # Per block: 2 LayerNorms, 1 attention, 1 Dense+GELU; plus the final encoder_norm.
    assert calls == {"attention": 2, "layer_norm": 5, "linear_gelu": 2}
