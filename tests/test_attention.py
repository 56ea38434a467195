"""kernels.attention against a float64 reference: forward and dq, dk, dv, over shapes, layouts, dtypes.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so the default
`ci` profile keeps shapes small; ViT's awkward lengths (50, 197; 257 and 577 forward-only) always
run as explicit examples. The `thorough` profile (GPU runs) draws N up to 600 and head_dim up to 128.
Tolerances (kernel_checks.check_close, norm-wise and element-wise): fp32 1e-5 relative; fp16/bf16 at
most 2x PyTorch's own error computed in the same low precision, both measured against float64.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kernel_checks import (
    DEVICE,
    check_close,
    poison_outputs,  # noqa: F401  (fixture, used through pytestmark)
)

from kernels import attention

attn_mod = importlib.import_module("kernels.attention")  # the package re-exports the function under the same name

HAS_CUDA = torch.cuda.is_available()
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE", "ci") == "thorough"
MAX_N = 600 if THOROUGH else 72  # the interpreter is slow; long lengths come from explicit examples
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
LAYOUTS = ["contiguous", "fused_qkv", "bnhd", "padded", "d_strided"]


pytestmark = pytest.mark.usefixtures("poison_outputs")


def make_qkv(B, H, n, d, dtype, layout, gen, n_kv=None):
    """Leaf tensor `base` and q, k, v views of it in the requested memory layout."""
    n_kv = n if n_kv is None else n_kv

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)

    if layout == "fused_qkv":  # the ViT projection: (B, N, 3, H, D) -> 3 x (B, H, N, D) views
        assert n_kv == n
        base = randn(B, n, 3, H, d).to(DEVICE).requires_grad_()
        q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
        return base, (q, k, v)
    bases, views = [], []
    for rows in (n, n_kv, n_kv):
        if layout == "contiguous":
            base = randn(B, H, rows, d).to(DEVICE).requires_grad_()
            view = base
        elif layout == "bnhd":  # heads interleaved with tokens: (B, N, H, D).transpose(1, 2)
            base = randn(B, rows, H, d).to(DEVICE).requires_grad_()
            view = base.transpose(1, 2)
        elif layout == "padded":  # odd row stride and a gap after head_dim
            base = randn(B, H, rows, d + 3).to(DEVICE).requires_grad_()
            view = base[..., 1:d + 1]
        elif layout == "d_strided":  # head_dim not unit-stride: (B, H, D, N).transpose(-1, -2)
            base = randn(B, H, d, rows).to(DEVICE).requires_grad_()
            view = base.transpose(-1, -2)
        else:
            raise ValueError(layout)
        bases.append(base)
        views.append(view)
    return bases, tuple(views)


def reference(q, k, v, scale):
    """Plain softmax attention in the inputs' dtype: float64 for the reference, fp16/bf16 for PyTorch's
    own low-precision error (its matmuls and softmax round to that dtype)."""
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# Errors are measured as if the reference had entries of at least 0.05: a gradient that is exactly 0 in
# float64 (dq, dk with a single key) leaves only fp32 rounding residue (about 1e-7 per entry, 2e-6 relative to
# that floor). Real gradients here have entries of 0.03-3 (0.1 at N = 197), so the floor barely touches them.
FLOOR = 0.05


def run_all(q, k, v, scale, do, fn):
    """Output and (dq, dk, dv) of fn at inputs detached from any graph, as fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, scale)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def check_against_float64(q, k, v, scale, do, fp32_like_torch=False):
    """The kernel's output and gradients within tolerance of float64 (and of torch's own error)."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    out, grads = run_all(q, k, v, scale, do, lambda a, b, c, sc: attention(a, b, c, sc))
    ref_out, ref_grads = run_all(q.double(), k.double(), v.double(), s, do.double(), reference)
    names = ["out", "dq", "dk", "dv"]
    if q.dtype == torch.float32 and not fp32_like_torch:
        for name, a, r in zip(names, [out, *grads], [ref_out, *ref_grads]):
            check_close(name, a, r, floor=FLOOR)
        return
    # PyTorch's own error at this precision: the larger of its two attentions, the explicit math (which
    # rounds the scores and probabilities) and F.scaled_dot_product_attention (a flash kernel on CPU and
    # GPU alike). They differ on tiny saturating problems (N = 2, scale 1): there delta = rowsum(dO * O)
    # read from the rounded O, as in every FlashAttention (SDPA's and ours), costs a few units of
    # roundoff that the explicit math does not pay. At real sizes ours is below the math's error
    # (N = 197 fp16: 3.7e-4 vs 6e-4) and level with SDPA's.
    math_out, math_grads = run_all(q, k, v, s, do, reference)
    sdpa_out, sdpa_grads = run_all(q, k, v, s, do, sdpa)
    slack = {torch.float32: 1e-5, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[q.dtype]  # storing costs ~1 ulp
    for name, a, m, f, r in zip(names, [out, *grads], [math_out, *math_grads], [sdpa_out, *sdpa_grads],
                                [ref_out, *ref_grads]):
        check_close(name, a, r, [m, f], floor=FLOOR, slack=slack)


def _head_dim_for(dtype):
    # fp32 down to head_dim 1. In 16-bit the draw is 16..128 (the range; every real ViT uses 64 or
    # 80): with a handful of dims, delta from the rounded O no longer averages out, and on CUDA SDPA runs
    # head dims that are not multiples of 8 through its upcasting math kernel, which leaves the explicit
    # math as the only low-precision yardstick (see check_against_float64).
    return st.integers(1 if dtype == torch.float32 else 16, 128)


shapes = st.sampled_from(DTYPES).flatmap(lambda dtype: st.fixed_dictionaries({
    "B": st.integers(1, 2),
    "H": st.integers(1, 3),
    "n": st.integers(1, MAX_N),
    "d": _head_dim_for(dtype),
    "dtype": st.just(dtype),
    "layout": st.sampled_from(LAYOUTS),
    "scale": st.sampled_from([None, 0.05, 0.3, 1.0]),
    "seed": st.integers(0, 2**16),
}))


# On a GPU most drawn cases compile new kernel variants (dtype, padded head_dim, stride alignment):
# cap the examples there so the `thorough` profile fits the GPU check's time budget.
# Measured on an H100 (cold Triton cache): 3-4 s per new 16-bit variant, several seconds per fp32 one.
GPU_EXAMPLES = int(os.environ.get("ATTN_GPU_EXAMPLES", "12"))


def _gpu_only_examples(test):
    """ViT-H (257, head_dim 80) and ViT-B at 384 px (577) in the main test, where the GPU makes them cheap."""
    if HAS_CUDA:
        test = example({"B": 2, "H": 3, "n": 577, "d": 64, "dtype": torch.float16, "layout": "fused_qkv",
                        "scale": None, "seed": 5})(test)
        test = example({"B": 2, "H": 3, "n": 257, "d": 80, "dtype": torch.bfloat16, "layout": "fused_qkv",
                        "scale": None, "seed": 6})(test)
    return test


@_gpu_only_examples
@given(shapes)
@settings(max_examples=min(settings.default.max_examples, GPU_EXAMPLES) if HAS_CUDA else settings.default.max_examples)
@example({"B": 1, "H": 2, "n": 50, "d": 64, "dtype": torch.float32, "layout": "fused_qkv", "scale": None, "seed": 0})
@example({"B": 1, "H": 1, "n": 197, "d": 80, "dtype": torch.float32, "layout": "fused_qkv", "scale": None, "seed": 1})
@example({"B": 2, "H": 1, "n": 197, "d": 64, "dtype": torch.float16, "layout": "bnhd", "scale": None, "seed": 2})
@example({"B": 1, "H": 1, "n": 50, "d": 80, "dtype": torch.float16, "layout": "padded", "scale": 0.3, "seed": 3})
@example({"B": 1, "H": 1, "n": 1, "d": 16, "dtype": torch.float32, "layout": "contiguous", "scale": None, "seed": 4})
@example({"B": 1, "H": 2, "n": 64, "d": 33, "dtype": torch.float16, "layout": "d_strided", "scale": 1.0, "seed": 5})
@example({"B": 1, "H": 1, "n": 128, "d": 128, "dtype": torch.float32, "layout": "padded", "scale": 1.0, "seed": 6})
def test_matches_float64(case):
    gen = torch.Generator().manual_seed(case["seed"])
    _, (q, k, v) = make_qkv(case["B"], case["H"], case["n"], case["d"], case["dtype"], case["layout"], gen)
    do = torch.randn(q.shape, generator=gen).to(DEVICE)
    check_against_float64(q, k, v, case["scale"], do)


@pytest.mark.parametrize("n", [257, 577])
def test_long_vit_lengths_forward(n):
    """ViT-H (257) and ViT-B/16 at 384 px (577): forward only, one head, to stay cheap on the interpreter."""
    gen = torch.Generator().manual_seed(n)
    _, (q, k, v) = make_qkv(1, 1, n, 64, torch.float32, "fused_qkv", gen)
    out = attention(q, k, v)
    ref = reference(q.double(), k.double(), v.double(), 64 ** -0.5)
    check_close("out", out, ref, floor=FLOOR)


@pytest.mark.parametrize("n_q,n_kv", [(37, 70), (70, 19)])
def test_cross_lengths(n_q, n_kv):
    """N_Q != N_KV exercises the query and key masks independently."""
    gen = torch.Generator().manual_seed(n_q)
    _, (q, k, v) = make_qkv(1, 2, n_q, 40, torch.float32, "contiguous", gen, n_kv=n_kv)
    do = torch.randn(q.shape, generator=gen).to(DEVICE)
    check_against_float64(q, k, v, 0.2, do)


# The interpreter's numpy reports the overflow of padded key rows in the dK/dV kernel (inf * 0 there):
# those rows are never stored, which is exactly what the NaN checks below establish.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype,d,scale", [(torch.float32, 64, 1.0), (torch.float16, 16, 0.25)])
def test_very_negative_scores(dtype, d, scale):
    """Every score of a row far below 0 (lse about -100 or less): padded keys then score exp2(-lse), which
    overflows; it must be masked out rather than turn into inf * 0 = NaN. N = 50 leaves a padded block."""
    gen = torch.Generator().manual_seed(d)
    c = 3.0 if dtype == torch.float32 else 4.0
    q = (c + 0.1 * torch.randn(1, 2, 50, d, generator=gen)).to(dtype).to(DEVICE)
    k = (-c + 0.1 * torch.randn(1, 2, 50, d, generator=gen)).to(dtype).to(DEVICE)
    v = torch.randn(1, 2, 50, d, generator=gen).to(dtype).to(DEVICE)
    do = torch.randn(1, 2, 50, d, generator=gen).to(DEVICE)
    lse = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1)
    assert lse.max() < (-90 if dtype == torch.float32 else -12)  # the regime this test is about
    # fp32 resolves a score of magnitude |s| only to |s| * 2**-24 and exp makes that a relative error, so
    # the flat 1e-5 bound (ordinary scores) gives way to the 2x-torch rule here, in fp32 as in fp16.
    check_against_float64(q, k, v, scale, do, fp32_like_torch=True)


def _all_gpu_configs():
    """Every block config the GPU may use (heuristic and autotune choices), as (kind, config) pairs."""
    seen = set()
    for (kind, _, _), cfg in attn_mod._GPU_HEURISTIC.items():
        seen.add((kind, cfg))
    for kind, cfgs in attn_mod._AUTOTUNE_CHOICES.items():
        seen.update((kind, c) for c in cfgs)
    return sorted(seen)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter check of the block logic; on CUDA the configs run for real")
@pytest.mark.parametrize("kind,config", _all_gpu_configs())
def test_gpu_block_configs(kind, config):
    """The GPU's block shapes (larger than the interpreter's default) are correct too: run each one in the
    interpreter, at a length no block divides and with head_dim 80 (two column parts, 64 + 16). (On CUDA, fp32 at the
    largest of them would exceed shared memory; there the heuristic runs in every test, the autotuned
    choice in test_autotuned_configs_gpu.)"""
    gen = torch.Generator().manual_seed(7)
    _, (q, k, v) = make_qkv(1, 1, 197, 80, torch.float32, "fused_qkv", gen)
    q, k, v = (t.detach() for t in (q, k, v))
    scale = 80 ** -0.5
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref = reference(qd, kd, vd, scale)
    do = torch.randn(ref.shape, generator=gen).to(DEVICE)
    ref_grads = torch.autograd.grad(ref, (qd, kd, vd), do.double())
    out, lse = attn_mod._attention_forward(q, k, v, scale, config=config if kind == "fwd" else None)
    check_close("out", out, ref.detach(), floor=FLOOR)
    ref_lse = torch.logsumexp((qd @ kd.transpose(-1, -2)) * scale, dim=-1)
    check_close("lse", lse, ref_lse.detach(), tol=1e-6, floor=FLOOR)
    if kind != "fwd":
        dq, dk, dv = attn_mod._attention_backward(do, q, k, v, out, lse, scale, configs={kind: config})
        for name, a, r in zip(["dq", "dk", "dv"], [dq, dk, dv], ref_grads):
            check_close(name, a, r, floor=FLOOR)


@pytest.mark.parametrize("shape", [(33, 24), (3, 33, 24), (2, 2, 2, 33, 24)])
def test_leading_shapes(shape):
    gen = torch.Generator().manual_seed(len(shape))
    q, k, v = (torch.randn(shape, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    out = attention(q, k, v)
    assert out.shape == shape and out.is_contiguous()
    ref = reference(q.double(), k.double(), v.double(), 24 ** -0.5)
    check_close("out", out, ref, floor=FLOOR)
    out.sum().backward()  # a .sum() upstream gradient has all-zero strides
    qd = q.detach().double().requires_grad_()
    reference(qd, k.double(), v.double(), 24 ** -0.5).sum().backward()
    check_close("dq", q.grad, qd.grad, floor=FLOOR)


def test_empty_query():
    q = torch.randn(1, 2, 0, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 5, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 2, 5, 16, device=DEVICE, requires_grad=True)
    out = attention(q, k, v)
    assert out.shape == (1, 2, 0, 16)
    out.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


def test_torch_compile_aot_eager():
    """The custom op lets torch.compile trace around the kernels, forward and backward."""
    gen = torch.Generator().manual_seed(11)
    _, (q, k, v) = make_qkv(2, 2, 50, 32, torch.float32, "fused_qkv", gen)
    compiled = torch.compile(lambda a, b, c: attention(a, b, c).sum(), backend="aot_eager", fullgraph=True)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    compiled(*leaves).backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference(*ref_leaves, 32 ** -0.5).sum().backward()
    for name, a, r in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        check_close(name, a.grad, r.grad, floor=FLOOR)


def test_compiled_graph_calls_the_custom_ops():
    """Eager calls skip the op wrappers; under torch.compile the graph must hold the ops (forward and backward)."""
    torch._dynamo.reset()
    seen = []

    def recording_backend(gm, example_inputs):
        seen.append(gm.print_readable(print_output=False))
        return gm.forward

    q, k, v = (torch.randn(1, 2, 20, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    compiled = torch.compile(lambda a, b, c: attention(a, b, c).sum(), backend=recording_backend, fullgraph=True)
    compiled(q, k, v).backward()
    graph = "\n".join(seen)
    for op in ("attention_fwd", "attention_bwd"):
        assert f"vitcore.{op}" in graph, f"{op} missing from the compiled graph"


def test_custom_op_registration():
    """torch.library.opcheck: schemas and fake (meta) implementations agree with the real ops. Gradients
    come from the autograd formula KernelOp puts around the ops, as for layer_norm and linear_gelu (the other
    combinations of wanted gradients: test_custom_ops)."""
    gen = torch.Generator().manual_seed(12)
    q, k, v, do = (torch.randn(1, 2, 20, 16, generator=gen).to(DEVICE) for _ in range(4))
    torch.library.opcheck(torch.ops.vitcore.attention_fwd.default, (q, k, v, 0.25))
    o, lse = torch.ops.vitcore.attention_fwd(q, k, v, 0.25)
    torch.library.opcheck(torch.ops.vitcore.attention_bwd.default, (do, q, k, v, o, lse, 0.25, [True] * 3))


@pytest.mark.parametrize("args,error,match", [
    (((2, 3, 8, 16), (2, 3, 8, 16), (2, 3, 8)), ValueError, "same leading|same shape"),
    (((8,), (8,), (8,)), ValueError, r"\(\.\.\., N, head_dim\)"),
    (((1, 2, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16)), ValueError, "leading"),
    (((1, 2, 8, 16), (1, 2, 8, 32), (1, 2, 8, 32)), ValueError, "head_dim"),
    (((1, 2, 8, 16), (1, 2, 9, 16), (1, 2, 8, 16)), ValueError, "k and v"),
    (((1, 1, 8, 129), (1, 1, 8, 129), (1, 1, 8, 129)), ValueError, "head_dim must be in 1..128"),
    (((1, 1, 8, 16), (1, 1, 0, 16), (1, 1, 0, 16)), ValueError, "no keys"),
])
def test_bad_shapes(args, error, match):
    q, k, v = (torch.randn(s, device=DEVICE) for s in args)
    with pytest.raises(error, match=match):
        attention(q, k, v)


def test_bad_dtypes_and_devices():
    x = torch.randn(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        attention(x.double(), x.double(), x.double())
    with pytest.raises(TypeError, match="int32"):
        attention(x.int(), x.int(), x.int())
    with pytest.raises(TypeError, match="share one dtype"):
        attention(x, x.half(), x)
    with pytest.raises(ValueError, match="same device"):
        attention(x, x.to("meta"), x)
    with pytest.raises(ValueError, match="finite"):
        attention(x, x, x, scale=float("inf"))


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        attention(x, x, x)


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_cpu_bfloat16_refused():
    """The interpreter mangles bfloat16 silently; the op must refuse it rather than return garbage."""
    x = torch.randn(1, 1, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        attention(x, x, x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,n,d", [(8, 12, 197, 64), (8, 16, 257, 80), (8, 12, 577, 64)])
def test_vit_shapes_gpu(B, H, n, d, dtype):
    gen = torch.Generator().manual_seed(n + d)
    _, (q, k, v) = make_qkv(B, H, n, d, dtype, "fused_qkv", gen)
    do = torch.randn(q.shape, generator=gen).to(DEVICE)
    check_against_float64(q, k, v, None, do)


@pytest.mark.gpu
def test_autotuned_configs_gpu(monkeypatch):
    """With VITCORE_ATTN_AUTOTUNE=1 whichever config the autotuner picks is still correct."""
    monkeypatch.setenv("VITCORE_ATTN_AUTOTUNE", "1")
    gen = torch.Generator().manual_seed(5)
    _, (q, k, v) = make_qkv(4, 12, 197, 64, torch.bfloat16, "fused_qkv", gen)
    do = torch.randn(q.shape, generator=gen).to(DEVICE)
    check_against_float64(q, k, v, None, do)
