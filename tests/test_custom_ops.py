"""The kernels as torch.library custom ops (made by kernels._common.KernelOp): schemas and fake (meta)
implementations checked by torch.library.opcheck, for every combination of wanted gradients; torch.compile graphs
around them (fullgraph: no graph breaks) computing the same values and gradients as eager mode, frozen weights
included; and frozen weights launching no weight-gradient kernel. Also, without a GPU: every kernel (attention's in
bf16) compiles for an H100 (sm_90) with the ptxas shipped in the triton wheel, catching what the interpreter
forgives (run as `python tests/test_custom_ops.py` for the per-kernel registers and shared memory).
"""

import importlib
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import check_close

import kernels

ln_mod = importlib.import_module("kernels.layer_norm")  # the package re-exports the functions under these names
lg_mod = importlib.import_module("kernels.linear_gelu")
attn_mod = importlib.import_module("kernels.attention")
# Which of (x, weight, bias) want a gradient: every combination a backward can be asked for.
NEEDS = [list(c) for c in itertools.product([True, False], repeat=3) if any(c)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Under the interpreter exp runs in numpy, which warns when GELU's sigmoid meets exp(-2u) = inf for very
# negative pre-activations; inf is the right limit there (sigmoid -> 0), so the warning is noise.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_opcheck_layer_norm(gen):
    x = _randn(3, 5, 24, gen=gen)
    w, b = _randn(24, gen=gen), _randn(24, gen=gen)
    torch.library.opcheck(torch.ops.vitcore.layer_norm_fwd.default, (x, w, b, 1e-6))
    _, mean, rstd = torch.ops.vitcore.layer_norm_fwd(x, w, b, 1e-6)
    dy = _randn(3, 5, 24, gen=gen)
    for needs in NEEDS:
        torch.library.opcheck(torch.ops.vitcore.layer_norm_bwd.default, (dy, x, w, mean, rstd, needs))


@pytest.mark.parametrize("backward", ["cublas", "triton"])
def test_opcheck_linear_gelu(gen, backward):
    x = _randn(2, 7, 20, gen=gen)
    w, b = _randn(24, 20, gen=gen), _randn(24, gen=gen)
    torch.library.opcheck(torch.ops.vitcore.linear_gelu_fwd.default, (x, w, b, "tanh", False))
    torch.library.opcheck(torch.ops.vitcore.linear_gelu_fwd.default, (x, w, b, "tanh", True))
    _, h = torch.ops.vitcore.linear_gelu_fwd(x, w, b, "erf", True)
    dy = _randn(2, 7, 24, gen=gen)
    for needs in NEEDS:
        torch.library.opcheck(torch.ops.vitcore.linear_gelu_bwd.default, (dy, x, w, h, "erf", backward, needs))


def _mlp_block(x, ln_w, ln_b, fc_w, fc_b):
    # Pre-norm MLP's first half with plain torch ops around the kernels, so the compiled graph has both.
    h = kernels.layer_norm(x * 2.0, ln_w, ln_b, 1e-6)
    return kernels.linear_gelu(h, fc_w, fc_b, approximate="tanh").square().mean() + x.sum() * 0.01


def _torch_block(x, ln_w, ln_b, fc_w, fc_b):
    h = F.layer_norm(x * 2.0, (x.shape[-1],), ln_w, ln_b, 1e-6)
    return F.gelu(F.linear(h, fc_w, fc_b), approximate="tanh").square().mean() + x.sum() * 0.01


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen_weights"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(gen, backend, frozen):
    # frozen: only x wants a gradient (a linear probe's or LoRA's frozen LayerNorm and fc1).
    torch._dynamo.reset()
    params = [_randn(4, 9, 32, gen=gen), _randn(32, gen=gen), _randn(32, gen=gen), _randn(48, 32, gen=gen) * 0.2,
              _randn(48, gen=gen)]  # fmt: skip
    trained = [True] + [not frozen] * 4
    eager = [p.clone().requires_grad_(t) for p, t in zip(params, trained)]
    compiled = [p.clone().requires_grad_(t) for p, t in zip(params, trained)]
    reference = [p.clone().double().requires_grad_(t) for p, t in zip(params, trained)]

    loss_eager = _mlp_block(*eager)
    loss_eager.backward()
    fn = torch.compile(_mlp_block, backend=backend, fullgraph=True)
    loss_compiled = fn(*compiled)
    loss_compiled.backward()
    loss_ref = _torch_block(*reference)
    loss_ref.backward()

    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss_compiled.double(), loss_ref, rtol=1e-5, atol=1e-6)
    for c, e, r, t in zip(compiled, eager, reference, trained):
        if not t:
            assert c.grad is None and e.grad is None
            continue
        torch.testing.assert_close(c.grad, e.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(c.grad.double(), r.grad, rtol=1e-5, atol=1e-6)


def test_torch_compile_dynamic_shapes(gen):
    # Fake implementations must follow symbolic shapes: a second batch size reuses the dynamic graph.
    torch._dynamo.reset()
    w, b = _randn(40, 16, gen=gen), _randn(40, gen=gen)
    fn = torch.compile(lambda x: kernels.linear_gelu(kernels.layer_norm(x, w[0, :16], b[:16]), w, b),
                       backend="aot_eager", fullgraph=True, dynamic=True)
    for rows in (3, 11):
        x = _randn(rows, 16, gen=gen)
        expected = F.gelu(F.linear(F.layer_norm(x, (16,), w[0, :16], b[:16], 1e-6), w, b), approximate="tanh")
        torch.testing.assert_close(fn(x), expected, rtol=1e-5, atol=1e-5)


def _compiled_graphs(fn, *args) -> list[str]:
    """The graphs torch.compile (fullgraph) hands AOTAutograd's compilers for fn(*args) and its backward, as text."""
    from torch._functorch.aot_autograd import aot_module_simplified

    torch._dynamo.reset()
    seen = []

    def record(gm, example_inputs):
        seen.append(gm.print_readable(print_output=False))
        return gm.forward

    backend = lambda gm, inputs: aot_module_simplified(gm, inputs, fw_compiler=record, bw_compiler=record)
    torch.compile(fn, backend=backend, fullgraph=True)(*args).backward()
    return seen


def test_compiled_graph_calls_the_custom_ops(gen):
    # Eager calls skip the op wrappers (Python overhead); under torch.compile the graph must hold the ops.
    params = [_randn(2, 3, 32, gen=gen), _randn(32, gen=gen), _randn(32, gen=gen), _randn(48, 32, gen=gen),
              _randn(48, gen=gen)]  # fmt: skip
    graph = "\n".join(_compiled_graphs(_mlp_block, *(p.requires_grad_() for p in params)))
    for op in ("layer_norm_fwd", "layer_norm_bwd", "linear_gelu_fwd", "linear_gelu_bwd"):
        assert f"vitcore.{op}" in graph, f"{op} missing from the compiled graph"


def test_compiled_backward_skips_frozen_weight_gradients(gen):
    # The compiled backward passes ctx.needs_input_grad into the ops: with frozen weights, [True, False, False].
    x = _randn(2, 3, 32, gen=gen).requires_grad_()
    params = [_randn(32, gen=gen), _randn(32, gen=gen), _randn(48, 32, gen=gen), _randn(48, gen=gen)]
    backward_graph = _compiled_graphs(_mlp_block, x, *params)[-1]
    for op in ("layer_norm_bwd", "linear_gelu_bwd"):
        calls = [line for line in backward_graph.splitlines() if f"vitcore.{op}" in line]
        assert calls and all("[True, False, False]" in line for line in calls), backward_graph


@pytest.fixture
def launches(monkeypatch):
    """Names of the backward's gradient launches, in order, recorded by wrapping what starts them: LayerNorm's
    dW/dB reduction (column_sums), Linear+GELU's GEMMs (Triton roles; torch.mm for the cuBLAS variant), its dGELU
    kernel and reductions, attention's kernels."""
    seen = []

    def spy(module, name, label):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen.append(label(*args, **kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    class KernelSpy:  # stands in for a @triton.jit kernel, launched as kernel[grid](...)
        def __init__(self, kernel, label):
            self.kernel, self.label = kernel, label

        def __getitem__(self, grid):
            seen.append(self.label)
            return self.kernel[grid]

    spy(ln_mod, "column_sums", lambda partial, dtype: f"layer_norm sums x{partial.shape[0]}")
    spy(lg_mod, "column_sums", lambda partial, dtype: "linear_gelu sums")
    spy(lg_mod, "_launch_gemm", lambda role, *a, **k: f"gemm {role}")
    spy(attn_mod, "_launch", lambda kind, *a, **k: f"attention {kind}")
    # The cuBLAS GEMMs: dX = dH @ W (dH contiguous), dW = dH^T @ X (a transposed view).
    spy(torch, "mm", lambda a, b, **k: "mm dX" if a.is_contiguous() else "mm dW")
    monkeypatch.setattr(ln_mod, "_layer_norm_bwd_kernel", KernelSpy(ln_mod._layer_norm_bwd_kernel, "layer_norm bwd"))
    monkeypatch.setattr(lg_mod, "_dgelu_kernel", KernelSpy(lg_mod._dgelu_kernel, "dgelu"))
    return seen



def _backward_launches(launches, fn, inputs, trained, ref_fn):
    """Run fn forward and backward with only the `trained` inputs wanting gradients; return the backward's launches
    after checking every gradient against float64 (None for the frozen ones)."""
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip(inputs, trained)]
    out = fn(*leaves)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    launches.clear()
    out.backward(dy)
    recorded = list(launches)
    leaves64 = [t.detach().double().requires_grad_(need) for t, need in zip(inputs, trained)]
    ref_fn(*leaves64).backward(dy.double())
    for i, (ours, ref) in enumerate(zip(leaves, leaves64)):
        if trained[i]:
            check_close(f"grad {i}", ours.grad, ref.grad)
        else:
            assert ours.grad is None
    return recorded


T, F_ = True, False
LAYER_NORM_LAUNCHES = {  # (x, weight, bias) trained -> the backward's launches
    (T, T, T): ["layer_norm bwd", "layer_norm sums x2"],
    (T, F_, F_): ["layer_norm bwd"],  # frozen weight and bias: no second reduction
    (T, F_, T): ["layer_norm bwd", "layer_norm sums x1"],
    (F_, T, T): ["layer_norm bwd", "layer_norm sums x2"],  # dx comes from the same fused kernel
}
LINEAR_GELU_LAUNCHES = {  # (backward variant, (x, weight, bias) trained) -> the backward's launches
    ("cublas", (T, T, T)): ["dgelu", "mm dX", "mm dW", "linear_gelu sums"],
    ("cublas", (T, F_, F_)): ["dgelu", "mm dX"],
    ("cublas", (F_, T, T)): ["dgelu", "mm dW", "linear_gelu sums"],
    ("cublas", (T, F_, T)): ["dgelu", "mm dX", "linear_gelu sums"],
    ("triton", (T, T, T)): ["gemm dx", "gemm dw", "linear_gelu sums"],
    ("triton", (T, F_, F_)): ["gemm dx"],
    ("triton", (F_, T, T)): ["gemm dw", "linear_gelu sums"],
    ("triton", (T, F_, T)): ["dgelu", "mm dX", "linear_gelu sums"],  # bias only: dH once beats a dW GEMM
}
ATTENTION_LAUNCHES = {  # (q, k, v) trained -> the backward's launches
    (T, T, T): ["attention dkdv", "attention dq"],
    (T, F_, F_): ["attention dq"],
    (F_, T, T): ["attention dkdv"],
    (F_, F_, T): ["attention dkdv"],
}


@pytest.mark.parametrize("trained", list(LAYER_NORM_LAUNCHES))
def test_layer_norm_frozen_weights_launch_no_weight_gradient_kernel(gen, launches, trained):
    inputs = [_randn(3, 7, 40, gen=gen), 1 + _randn(40, gen=gen), _randn(40, gen=gen)]
    recorded = _backward_launches(launches, lambda x, w, b: kernels.layer_norm(x, w, b), inputs, trained,
                                  lambda x, w, b: F.layer_norm(x, (40,), w, b, 1e-6))
    assert recorded == LAYER_NORM_LAUNCHES[trained]


@pytest.mark.parametrize("backward,trained", list(LINEAR_GELU_LAUNCHES))
def test_linear_gelu_frozen_weights_launch_no_weight_gradient_kernel(gen, launches, backward, trained):
    # in_features 24: no split-K in the interpreter, so each reduction is one launch.
    inputs = [_randn(3, 5, 24, gen=gen), _randn(40, 24, gen=gen) * 0.2, _randn(40, gen=gen)]
    recorded = _backward_launches(launches, lambda x, w, b: kernels.linear_gelu(x, w, b, backward=backward),
                                  inputs, trained, lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"))
    assert recorded == LINEAR_GELU_LAUNCHES[(backward, trained)]


@pytest.mark.parametrize("trained", list(ATTENTION_LAUNCHES))
def test_attention_frozen_inputs_skip_their_kernels(gen, launches, trained):
    inputs = [_randn(1, 2, 20, 16, gen=gen) for _ in range(3)]
    ref = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v
    recorded = _backward_launches(launches, lambda q, k, v: kernels.attention(q, k, v, 0.25), inputs, trained, ref)
    assert recorded == ATTENTION_LAUNCHES[trained]


@pytest.mark.parametrize("trained", list(ATTENTION_LAUNCHES))
def test_opcheck_attention_needs(gen, trained):
    q, k, v, do = (_randn(1, 2, 20, 16, gen=gen) for _ in range(4))
    o, lse = torch.ops.vitcore.attention_fwd(q, k, v, 0.25)
    torch.library.opcheck(torch.ops.vitcore.attention_bwd.default, (do, q, k, v, o, lse, 0.25, list(trained)))


def test_autotune_results_persist_where_triton_can(monkeypatch):
    # kernels._common.autotune asks Triton (>= 3.4) to keep autotuning results on disk; an older Triton, whose
    # triton.autotune has no cache_results, gets the call without it.
    import triton

    from kernels._common import autotune

    seen = {}

    def new_triton(configs, key, prune_configs_by=None, cache_results=False):
        seen.update(cache_results=cache_results)
        return lambda fn: fn

    def old_triton(configs, key, prune_configs_by=None):
        seen.update(called_old=True)
        return lambda fn: fn

    monkeypatch.setattr(triton, "autotune", new_triton)
    autotune([], key=["M"])(None)
    assert seen == {"cache_results": True}
    monkeypatch.setattr(triton, "autotune", old_triton)
    autotune([], key=["M"], prune_configs_by=None)(None)
    assert seen == {"cache_results": True, "called_old": True}

def _compile_for_sm90(verbose: bool = False) -> None:
    """Compile each kernel at its production launch parameters for sm_90 (no device needed). Must run without
    TRITON_INTERPRET, so tests call it in a subprocess."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attn = sys.modules["kernels.attention"]
    ln = sys.modules["kernels.layer_norm"]
    lg = sys.modules["kernels.linear_gelu"]
    common = sys.modules["kernels._common"]
    target = GPUTarget("cuda", 90, 32)

    def compile_one(fn, sig, consts, warps, stages=3, unaligned=()):
        unit = {k: v for k, v in consts.items() if v == 1 and k.startswith("stride")}  # unit strides: constexpr 1
        sig = {k: v for k, v in sig.items() if k not in unit}
        # Pointers and ints 16-divisible, as a launch with aligned tensors specializes them (except `unaligned`).
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
                 if v != "fp32" and k not in unaligned}
        src = ASTSource(fn, {**sig, **{k: "constexpr" for k in consts}},
                        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
        k = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
        if verbose:
            print(fn.fn.__name__, {k: v for k, v in consts.items() if k.isupper()}, "shared", k.metadata.shared)

    for dt in ("bf16", "fp32"):
        for n in (768, 8192, 10):
            parts, rows, warps = ln._block_shape(n, 4096)
            compile_one(ln._layer_norm_fwd_kernel, {
                "X": f"*{dt}", "Y": f"*{dt}", "W": "*fp32", "B": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32",
                "stride_x": "i32", "M": "i32", "eps": "fp32"}, {"N": n, **dict(zip(("N0", "N1", "N2"), parts)),
                                                                "ROWS": rows}, warps)
            parts, rows, warps = ln._block_shape(n, 2048)
            compile_one(ln._layer_norm_bwd_kernel, {
                "DY": f"*{dt}", "X": f"*{dt}", "W": f"*{dt}", "MEAN": "*fp32", "RSTD": "*fp32", "DX": f"*{dt}",
                "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "stride_dy": "i32", "stride_x": "i32", "M": "i32",
                "rows_per_prog": "i32"}, {"N": n, **dict(zip(("N0", "N1", "N2"), parts)), "ROWS": rows}, warps)
    for num_out, block_g, block_n in ((2, 32, 128), (1, 4, 1024)):
        compile_one(common._column_sum_kernel, {"PARTIAL": "*fp32", "OUT0": "*bf16", "OUT1": "*bf16", "G": "i32",
                    "N": "i32"}, {"NUM_OUT": num_out, "BLOCK_G": block_g, "BLOCK_N": block_n}, 4)
    for tanh in (True, False):
        compile_one(lg._dgelu_kernel, {"DY": "*bf16", "H": "*bf16", "DH": "*bf16", "DB_PARTIAL": "*fp32",
                    "M": "i32", "N": "i32", "stride_dym": "i32", "stride_dyn": "i32"},
                    {"APPROX_TANH": tanh, "BLOCK_M": 64, "BLOCK_N": 128}, 8)

    roles = {  # flags and the strides that are 1 for contiguous x, weight, dy (see _linear_gelu_fwd/_bwd)
        "fwd": ({"EPILOGUE_GELU": True, "STORE_H": True, "PROLOGUE_DGELU": False, "WRITE_DB": False},
                ("stride_ak", "stride_auxk", "stride_bk")),
        "dx": ({"EPILOGUE_GELU": False, "STORE_H": False, "PROLOGUE_DGELU": True, "WRITE_DB": False},
               ("stride_ak", "stride_auxk", "stride_bn")),
        "dw": ({"EPILOGUE_GELU": False, "STORE_H": False, "PROLOGUE_DGELU": True, "WRITE_DB": True},
               ("stride_am", "stride_auxm", "stride_bn")),
    }
    for dt, cfg in (("bf16", lg._gpu_configs()[1]), ("fp32", lg._gpu_configs()[-1])):
        for role, (flags, unit) in roles.items():
            split = 4 if role == "dw" else 1
            c_dt = "fp32" if split > 1 else dt
            sig = {"A": f"*{dt}", "AUX": f"*{dt}", "B": f"*{dt}", "BIAS": f"*{dt}", "C": f"*{c_dt}", "H": f"*{dt}",
                   "DB": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_ak": "i32",
                   "stride_auxm": "i32", "stride_auxk": "i32", "stride_bk": "i32", "stride_bn": "i32"}
            consts = {**flags, **{u: 1 for u in unit}, "APPROX_TANH": role != "dx",
                      "DOT_PRECISION": "ieee" if dt == "fp32" else "tf32", **cfg.kwargs, "SPLIT_K": split}
            compile_one(lg._gemm_kernel, sig, consts, cfg.num_warps, cfg.num_stages)

    # Attention in bf16 at the GPU heuristic's configs, head_dim 64 and 80 (head-dim parts 64 and 64 + 16), unit
    # head_dim strides; fp32 (unrolled FMA code, ~20 s more to compile) is left to the GPU runs.
    lengths = ("N_Q", "N_KV", "LEN_BUCKET")  # do_not_specialize: any ViT length, no divisibility

    def attn_arg_type(name):
        if name in ("LSE", "DELTA"):
            return "*fp32"
        if name.isupper() and name not in ("H", "HEAD_DIM", *lengths):
            return "*bf16"  # tensors: Q, K, V, OUT, DO, DK, DV, DQ
        return "fp32" if name in ("scale", "qk_scale") else "i32"

    for kind, fn in (("fwd", attn._attn_fwd_kernel), ("dkdv", attn._attn_bwd_dkdv_kernel),
                     ("dq", attn._attn_bwd_dq_kernel), ("delta", attn._attn_bwd_delta_kernel)):
        for d in (64, 80):
            parts = {"HEAD_DIM": d, **attn._parts_kwargs(d)}
            if kind == "delta":
                consts = {"BLOCK_M": 64, **parts}
                warps, stages = 4, 3
            else:
                bm, bn, warps, stages = attn._config(kind, torch.bfloat16, d)
                consts = {"BLOCK_M": bm, "BLOCK_N": bn, **parts, "DOT_PRECISION": "tf32"}
            consts.update({a: 1 for a in fn.arg_names if a.startswith("stride") and a.endswith("d")})
            sig = {a: attn_arg_type(a) for a in fn.arg_names if a not in consts}
            compile_one(fn, sig, consts, warps, stages, unaligned=lengths)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile everything for real")
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


if __name__ == "__main__":
    _compile_for_sm90(verbose=True)
