"""kernels.linear_gelu against a float64 reference: forward and every gradient, both backward variants.

fp32 must match float64 to 1e-5 (norm-wise relative error, and each element within 1e-5 of the largest);
fp16/bf16 may be at most twice as far from float64 as PyTorch's own F.linear + F.gelu at that precision, norm-wise
plus a tiny floor and element-wise plus one ulp (kernel_checks.check_close). Outputs are NaN-poisoned before each
launch (VITCORE_POISON_OUTPUTS) so an element the kernels never write fails the comparison.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from kernel_checks import (
    DEVICE,
    check_close,
    make_tensor,
    poison_outputs,  # noqa: F401  (fixture, used through pytestmark)
)

import kernels
from kernels.linear_gelu import _AUTOTUNE_MIN_MACS, BACKWARD_ENV, BACKWARD_VARIANTS

# Under the interpreter exp runs in numpy, which warns when GELU's sigmoid meets exp(-2u) = inf for very
# negative pre-activations; inf is the right limit there (sigmoid -> 0), so the warning is noise.
pytestmark = [
    pytest.mark.usefixtures("poison_outputs"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]
# Features: a few powers of two / ViT-ish sizes and arbitrary ones (not multiples of 16 or of any block).
FEATURES = st.one_of(st.sampled_from([16, 37, 64, 100]), st.integers(1, 80))
X_LAYOUTS = ("contiguous", "sliced", "transposed")


def run_case(lead, k, n, approximate, backward, dtype, x_layout="contiguous", w_layout="contiguous",
             dy_layout="contiguous", seed=0):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    x = make_tensor((*lead, k), x_layout, dtype, gen).detach().requires_grad_()
    # nn.Linear-like scale keeps h = O(1), where GELU is curved and both of its branches matter.
    w = make_tensor((n, k), w_layout, dtype, gen, scale=k**-0.5).detach().requires_grad_()
    b = make_tensor((n,), "contiguous", dtype, gen, scale=0.5).detach().requires_grad_()
    dy = make_tensor((*lead, n), dy_layout, dtype, gen)

    y = kernels.linear_gelu(x, w, b, approximate=approximate, backward=backward)
    y.backward(dy)
    assert y.dtype == dtype and y.shape == (*lead, n)

    torch_approx = "tanh" if approximate == "tanh" else "none"
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y64 = F.gelu(F.linear(*leaves64), approximate=torch_approx)
    y64.backward(dy.double())

    lowp = None
    if dtype != torch.float32:
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        y_lp = F.gelu(F.linear(*leaves), approximate=torch_approx)
        y_lp.backward(dy)
        lowp = [y_lp] + [t.grad for t in leaves]

    for i, (name, ours, ref) in enumerate(
        [("y", y, y64), ("dx", x.grad, leaves64[0].grad), ("dweight", w.grad, leaves64[1].grad),
         ("dbias", b.grad, leaves64[2].grad)]
    ):  # fmt: skip
        check_close(f"{name} [{backward}]", ours, ref, None if lowp is None else lowp[i])


@given(
    lead=st.lists(st.integers(1, 9), min_size=1, max_size=2),
    k=FEATURES,
    n=FEATURES,
    approximate=st.sampled_from(["tanh", "erf", "none"]),
    backward=st.sampled_from(BACKWARD_VARIANTS),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    x_layout=st.sampled_from(X_LAYOUTS),
    w_layout=st.sampled_from(["contiguous", "transposed"]),
    dy_layout=st.sampled_from(X_LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_linear_gelu_matches_float64(lead, k, n, approximate, backward, dtype, x_layout, w_layout, dy_layout, seed):
    run_case(lead, k, n, approximate, backward, dtype, x_layout, w_layout, dy_layout, seed)


@pytest.mark.parametrize("backward", BACKWARD_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_gelu_both_backwards(backward, dtype):
    # Each variant for sure (hypothesis may draw only one), with M, N, K off every block multiple.
    run_case((5, 7), 45, 70, "tanh", backward, dtype, "sliced", "transposed", "transposed")


@pytest.mark.parametrize("backward", BACKWARD_VARIANTS)
def test_linear_gelu_vit_b_mlp_width(backward):
    # ViT-B's MLP shape 768 -> 3072 once, with few rows so the interpreter stays quick.
    run_case((3,), 768, 3072, "tanh", backward, torch.float32)


def test_linear_gelu_backward_env(monkeypatch):
    x = torch.randn(2, 16, device=DEVICE)
    w, b = torch.randn(16, 16, device=DEVICE), torch.randn(16, device=DEVICE)
    monkeypatch.setenv(BACKWARD_ENV, "bogus")
    with pytest.raises(ValueError, match=BACKWARD_ENV):
        kernels.linear_gelu(x, w, b)
    monkeypatch.setenv(BACKWARD_ENV, "triton")
    assert torch.isfinite(kernels.linear_gelu(x, w, b)).all()


def test_linear_gelu_errors(monkeypatch):
    x = torch.randn(4, 16, device=DEVICE)
    w, b = torch.randn(32, 16, device=DEVICE), torch.randn(32, device=DEVICE)
    with pytest.raises(ValueError, match="shapes do not match"):
        kernels.linear_gelu(x, w.t(), b)
    with pytest.raises(ValueError, match="shapes do not match"):
        kernels.linear_gelu(x, w, b[:-1])
    with pytest.raises(TypeError, match="share a dtype"):
        kernels.linear_gelu(x.half(), w, b)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        kernels.linear_gelu(x.double(), w.double(), b.double())
    with pytest.raises(TypeError, match="bias is required"):
        kernels.linear_gelu(x, w, None)
    with pytest.raises(ValueError, match="approximate"):
        kernels.linear_gelu(x, w, b, approximate="sigmoid")
    with pytest.raises(ValueError, match="backward"):
        kernels.linear_gelu(x, w, b, backward="cudnn")
    with pytest.raises(ValueError, match="same device"):
        kernels.linear_gelu(x, w.to("meta"), b)
    if DEVICE == "cpu":
        with pytest.raises(TypeError, match="bfloat16 is not supported by the Triton interpreter"):
            kernels.linear_gelu(x.bfloat16(), w.bfloat16(), b.bfloat16())  # its tl.dot is garbage in bf16
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA"):
            kernels.linear_gelu(x, w, b)


@pytest.mark.gpu
@given(
    lead=st.lists(st.integers(1, 300), min_size=1, max_size=2),
    k=st.one_of(FEATURES, st.sampled_from([768, 1024, 1280])),
    n=st.one_of(FEATURES, st.sampled_from([3072, 4096, 5120])),
    approximate=st.sampled_from(["tanh", "erf"]),
    backward=st.sampled_from(BACKWARD_VARIANTS),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    x_layout=st.sampled_from(X_LAYOUTS),
    w_layout=st.sampled_from(["contiguous", "transposed"]),
    seed=st.integers(0, 2**16),
)
def test_linear_gelu_gpu(lead, k, n, approximate, backward, dtype, x_layout, w_layout, seed):
    # Stay under the autotuning threshold: every new big shape would autotune (seconds each) and 100 examples
    # would not fit the GPU check. The autotuned path has its own test below.
    if math.prod(lead) * k * n >= _AUTOTUNE_MIN_MACS:
        lead = [max(1, _AUTOTUNE_MIN_MACS // (k * n) - 1)]
    run_case(lead, k, n, approximate, backward, dtype, x_layout, w_layout, "contiguous", seed)


@pytest.mark.gpu
@pytest.mark.parametrize("backward", BACKWARD_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_gelu_gpu_vit_b_autotuned(backward, dtype):
    # Big enough to take the autotuned path (M * N * K >= 2**27), which the small cases never reach.
    run_case((64, 197), 768, 3072, "tanh", backward, dtype)


@pytest.mark.parametrize("backward", BACKWARD_VARIANTS)
def test_linear_gelu_expanded_upstream_gradient(backward):
    # y.sum().backward() hands the backward a stride-0 (expanded) dy.
    inputs = [torch.randn(3, 5, 24, device=DEVICE), torch.randn(40, 24, device=DEVICE) * 0.2,
                    torch.randn(40, device=DEVICE)]  # fmt: skip
    ours = [t.clone().requires_grad_() for t in inputs]
    ref = [t.double().requires_grad_() for t in inputs]
    kernels.linear_gelu(*ours, backward=backward).sum().backward()
    F.gelu(F.linear(*ref), approximate="tanh").sum().backward()
    for name, o, r in zip(("dx", "dweight", "dbias"), ours, ref):
        check_close(name, o.grad, r.grad, None)


def test_linear_gelu_inference_skips_pre_activation():
    # Under no_grad the forward does not store h (one (M, N) write less) and still computes y.
    x, w, b = torch.randn(4, 24, device=DEVICE), torch.randn(40, 24, device=DEVICE), torch.randn(40, device=DEVICE)
    y, h = torch.ops.vitcore.linear_gelu_fwd(x, w, b, "tanh", False)
    assert h.shape == (0, 40)
    with torch.no_grad():
        y_nograd = kernels.linear_gelu(x, w.requires_grad_(), b)
    check_close("y", y_nograd, F.gelu(F.linear(x.double(), w.double(), b.double()), approximate="tanh"), None)
    torch.testing.assert_close(y, y_nograd, rtol=0, atol=0)


def test_autotune_configs_per_dtype():
    # The GPU autotuner's candidate tiles: fp32 ("ieee", FMA) keeps the small BLOCK_K = 32 tiles, halves the
    # wgmma-sized BLOCK_K = 64 ones; every tile is a power of two >= 16 as tl.dot needs.
    from kernels.linear_gelu import _gpu_configs, _prune_configs

    configs = _gpu_configs()
    for c in configs:
        for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            v = c.kwargs[key]
            assert v >= 16 and v & (v - 1) == 0
    for dtype, bk in ((torch.float32, 32), (torch.bfloat16, 64), (torch.float16, 64)):
        kept = _prune_configs(configs, {"B": torch.empty(0, dtype=dtype)})
        assert kept and all(c.kwargs["BLOCK_K"] == bk for c in kept)


def test_linear_gelu_strided_bias():
    gen = torch.Generator().manual_seed(5)
    bias_base = torch.randn(2 * 40, generator=gen).to(DEVICE)
    x, w = torch.randn(6, 24, generator=gen).to(DEVICE), torch.randn(40, 24, generator=gen).to(DEVICE) * 0.2
    y = kernels.linear_gelu(x, w, bias_base[::2])
    check_close("y", y, F.gelu(F.linear(x.double(), w.double(), bias_base[::2].double()), approximate="tanh"), None)


def test_linear_gelu_under_autocast():
    # fp32 parameters, autocast to fp16: computed in fp16 like F.linear, gradients reach the fp32 leaves in fp32.
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 32, generator=gen).to(DEVICE).requires_grad_()
    w = (torch.randn(48, 32, generator=gen) * 0.2).to(DEVICE).requires_grad_()
    b = torch.randn(48, generator=gen).to(DEVICE).requires_grad_()
    dy = torch.randn(5, 48, generator=gen).to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = kernels.linear_gelu(x, w, b)
        y_torch = F.gelu(F.linear(x, w, b), approximate="tanh")
    assert y.dtype == y_torch.dtype == torch.float16
    y.backward(dy.half())
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    F.gelu(F.linear(*leaves64), approximate="tanh").backward(dy.half().double())
    for name, ours, ref in zip(("dx", "dweight", "dbias"), (x.grad, w.grad, b.grad), (t.grad for t in leaves64)):
        check_close(name, ours, ref, tol=5e-3)
