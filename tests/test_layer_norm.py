"""kernels.layer_norm against a float64 reference: forward and every gradient, odd shapes and strided views.

fp32 must match float64 to 1e-5 (norm-wise relative error, and each element within 1e-5 of the largest); fp16/bf16
may be at most twice as far from float64 as PyTorch's own F.layer_norm at that precision, norm-wise plus a tiny floor
and element-wise plus one ulp (kernel_checks.check_close). Outputs are NaN-poisoned before each
launch (VITCORE_POISON_OUTPUTS) so an element the kernel never writes fails the comparison.
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
from kernels.layer_norm import MAX_WIDTH

pytestmark = pytest.mark.usefixtures("poison_outputs")

LAYOUTS = ("contiguous", "sliced", "transposed", "strided")
WIDTHS = st.one_of(st.sampled_from([10, 37, 768, 1024, 1280]), st.integers(1, 300))


def run_case(lead, width, layout, dtype, eps=1e-6, weight_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight_dtype = weight_dtype or dtype
    x = make_tensor((*lead, width), layout, dtype, gen).detach().requires_grad_()
    # Weights away from 1/0 so a kernel that ignores them fails.
    w = (1 + 0.5 * torch.randn(width, generator=gen)).to(weight_dtype).to(DEVICE).requires_grad_()
    b = (0.5 * torch.randn(width, generator=gen)).to(weight_dtype).to(DEVICE).requires_grad_()
    dy = make_tensor((*lead, width), layout, dtype, gen)

    y = kernels.layer_norm(x, w, b, eps)
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == weight_dtype

    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y64 = F.layer_norm(leaves64[0], (width,), leaves64[1], leaves64[2], eps)
    y64.backward(dy.double())

    lowp = None
    if dtype != torch.float32:
        # PyTorch's own result at this precision (weights in x's dtype: F.layer_norm needs one dtype).
        leaves = [x.detach().clone().requires_grad_()] + [t.detach().to(dtype).requires_grad_() for t in (w, b)]
        y_lp = F.layer_norm(leaves[0], (width,), leaves[1], leaves[2], eps)
        y_lp.backward(dy)
        lowp = [y_lp] + [t.grad for t in leaves]

    for i, (name, ours, ref) in enumerate(
        [("y", y, y64), ("dx", x.grad, leaves64[0].grad), ("dweight", w.grad, leaves64[1].grad),
         ("dbias", b.grad, leaves64[2].grad)]
    ):  # fmt: skip
        check_close(name, ours, ref, None if lowp is None else lowp[i])


@given(
    lead=st.lists(st.integers(1, 7), min_size=1, max_size=2),
    width=WIDTHS,
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_layer_norm_matches_float64(lead, width, layout, dtype, seed):
    run_case(lead, width, layout, dtype, seed=seed)


@pytest.mark.parametrize("width", [768, 1280, 37])
def test_layer_norm_vit_widths_many_rows(width):
    # Enough rows that the backward's programs each loop over several row blocks, and rows % block != 0.
    run_case((3, 23), width, "contiguous", torch.float32)


def test_layer_norm_max_width_and_eps():
    run_case((3,), MAX_WIDTH, "sliced", torch.float32, eps=1e-2)


def test_layer_norm_fp32_weights_with_half_input():
    # Mixed precision: fp32 master weights with fp16 activations; y and dx in fp16, dweight/dbias in fp32.
    run_case((2, 9), 768, "contiguous", torch.float16, weight_dtype=torch.float32)


def test_layer_norm_saves_fp32_mean_and_rstd():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 40, generator=gen).to(DEVICE, torch.float16)
    w = torch.ones(40, device=DEVICE, dtype=torch.float16)
    y, mean, rstd = torch.ops.vitcore.layer_norm_fwd(x, w, torch.zeros_like(w), 1e-6)
    assert y.shape == x.shape and mean.shape == rstd.shape == (15,)
    assert mean.dtype == rstd.dtype == torch.float32
    x64 = x.double().reshape(15, 40)
    check_close("mean", mean, x64.mean(-1), tol=1e-6, floor=1.0)  # floor 1: an absolute 1e-6 for means near 0
    check_close("rstd", rstd, (x64.var(-1, unbiased=False) + 1e-6).rsqrt(), tol=1e-5)


def test_layer_norm_errors(monkeypatch):
    x = torch.randn(4, 16, device=DEVICE)
    w, b = torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE)
    with pytest.raises(ValueError, match="shape"):
        kernels.layer_norm(x, torch.ones(15, device=DEVICE), b)
    with pytest.raises(ValueError, match="width"):
        big = torch.randn(2, MAX_WIDTH + 1, device=DEVICE)
        kernels.layer_norm(big, torch.ones(MAX_WIDTH + 1, device=DEVICE), torch.zeros(MAX_WIDTH + 1, device=DEVICE))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        kernels.layer_norm(x.to(torch.int32), w, b)
    with pytest.raises(TypeError, match="share a dtype"):
        kernels.layer_norm(x, w, b.half())
    with pytest.raises(ValueError, match="same device"):
        kernels.layer_norm(x, w.to("meta"), b)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA"):
            kernels.layer_norm(x, w, b)


@pytest.mark.gpu
@given(
    lead=st.lists(st.integers(1, 300), min_size=1, max_size=2),
    width=st.one_of(WIDTHS, st.sampled_from([4096, MAX_WIDTH])),
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_layer_norm_gpu(lead, width, layout, dtype, seed):
    # At most ~4M elements per case: the float64 reference and 100 examples must fit the GPU check's minutes.
    if math.prod(lead) * width > 2**22:
        lead = [max(1, 2**22 // width)]
    run_case(lead, width, layout, dtype, seed=seed)


@pytest.mark.gpu
def test_layer_norm_gpu_vit_b_batch():
    # The benchmark's headline shape, (256 * 197, 768) in bf16: many programs per SM, long row loops.
    run_case((256, 197), 768, "contiguous", torch.bfloat16)


def test_layer_norm_expanded_upstream_gradient():
    # y.sum().backward() hands the backward a stride-0 (expanded) dy.
    x = torch.randn(6, 50, device=DEVICE, requires_grad=True)
    w = torch.randn(50, device=DEVICE, requires_grad=True)
    b = torch.randn(50, device=DEVICE, requires_grad=True)
    kernels.layer_norm(x, w, b).sum().backward()
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    F.layer_norm(leaves64[0], (50,), leaves64[1], leaves64[2], 1e-6).sum().backward()
    for ours, ref in zip((x.grad, w.grad, b.grad), (t.grad for t in leaves64)):
        # dx is ~0 here (a row's sum does not depend on x): floor 1 makes the bound absolute there.
        check_close("grad", ours, ref, floor=1.0)


@pytest.mark.parametrize("num_out, g, n, dtype", [(2, 100, 300, torch.float32), (1, 7, 70000, torch.float16)])
def test_column_sums_second_reduction(num_out, g, n, dtype):
    # The second stage of the backward's dweight/dbias reduction (and of linear_gelu's split-K dW): loops over
    # several BLOCK_G steps and, for very wide inputs, the wide-block path.
    from kernels._common import column_sums

    partial = torch.randn(num_out, g, n, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    outs = column_sums(partial, dtype)
    assert len(outs) == num_out
    for out, part in zip(outs, partial):
        assert out.dtype == dtype
        check_close("column sums", out, part.double().sum(0), None if dtype == torch.float32 else part.sum(0).to(dtype))


def test_layer_norm_strided_weight_and_bias():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, 33, generator=gen).to(DEVICE).requires_grad_()
    wb = torch.randn(33, 2, generator=gen).to(DEVICE).requires_grad_()  # weight and bias as strided columns
    dy = torch.randn(4, 6, 33, generator=gen).to(DEVICE)
    kernels.layer_norm(x, wb[:, 0], wb[:, 1]).backward(dy)
    x64, wb64 = x.detach().double().requires_grad_(), wb.detach().double().requires_grad_()
    F.layer_norm(x64, (33,), wb64[:, 0], wb64[:, 1], 1e-6).backward(dy.double())
    check_close("dx", x.grad, x64.grad, None)
    check_close("dweight, dbias", wb.grad, wb64.grad, None)


@pytest.mark.parametrize("dtype,defect", [(torch.float32, 1e-4), (torch.float16, 4 * 2.0**-10)])
def test_check_close_catches_a_defect_confined_to_one_row(dtype, defect):
    # The shared checker's element-wise bound: one row of 300 off by `defect` (relative; fp32: 10x the tolerance,
    # fp16: 4 ulps) hides in the norm-wise error, diluted by the other rows, but not from the element-wise one.
    from kernel_checks import rel_err

    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(300, 64, generator=gen, dtype=torch.float64)
    lowp = ref.to(dtype) if dtype != torch.float32 else None  # torch at this precision: rounding only
    ours = ref.to(dtype).clone()
    ours[17] = (ref[17] * (1 + defect)).to(dtype)
    yardstick = 2 * rel_err(lowp, ref) + 1e-4 if lowp is not None else 1e-5
    assert rel_err(ours, ref) <= yardstick  # the norm-wise bound alone would pass it
    with pytest.raises(AssertionError, match="an element is off"):
        check_close("y", ours, ref, lowp)
    check_close("y", ref.to(dtype), ref, lowp)  # the same tensor without the defect passes
