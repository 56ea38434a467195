"""The LayerNorm and Linear+GELU kernels as torch.library custom ops: schemas and fake (meta) implementations
checked by torch.library.opcheck, and torch.compile graphs around them (fullgraph: no graph breaks) computing
the same values and gradients as eager mode. Also, without a GPU: every kernel (attention's in bf16) compiles for
an H100 (sm_90)
with the ptxas shipped in the triton wheel, catching what the interpreter forgives (run as
`python tests/test_custom_ops.py` for the per-kernel registers and shared memory).
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels

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
    torch.library.opcheck(torch.ops.vitcore.layer_norm_bwd.default, (dy, x, w, mean, rstd))


@pytest.mark.parametrize("backward", ["cublas", "triton"])
def test_opcheck_linear_gelu(gen, backward):
    x = _randn(2, 7, 20, gen=gen)
    w, b = _randn(24, 20, gen=gen), _randn(24, gen=gen)
    torch.library.opcheck(torch.ops.vitcore.linear_gelu_fwd.default, (x, w, b, "tanh", False))
    torch.library.opcheck(torch.ops.vitcore.linear_gelu_fwd.default, (x, w, b, "tanh", True))
    _, h = torch.ops.vitcore.linear_gelu_fwd(x, w, b, "erf", True)
    dy = _randn(2, 7, 24, gen=gen)
    torch.library.opcheck(torch.ops.vitcore.linear_gelu_bwd.default, (dy, x, w, h, "erf", backward))


def _mlp_block(x, ln_w, ln_b, fc_w, fc_b):
    # Pre-norm MLP's first half with plain torch ops around the kernels, so the compiled graph has both.
    h = kernels.layer_norm(x * 2.0, ln_w, ln_b, 1e-6)
    return kernels.linear_gelu(h, fc_w, fc_b, approximate="tanh").square().mean() + x.sum() * 0.01


def _torch_block(x, ln_w, ln_b, fc_w, fc_b):
    h = F.layer_norm(x * 2.0, (x.shape[-1],), ln_w, ln_b, 1e-6)
    return F.gelu(F.linear(h, fc_w, fc_b), approximate="tanh").square().mean() + x.sum() * 0.01


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(gen, backend):
    torch._dynamo.reset()
    params = [_randn(4, 9, 32, gen=gen), _randn(32, gen=gen), _randn(32, gen=gen), _randn(48, 32, gen=gen) * 0.2,
              _randn(48, gen=gen)]  # fmt: skip
    eager = [p.clone().requires_grad_() for p in params]
    compiled = [p.clone().requires_grad_() for p in params]
    reference = [p.clone().double().requires_grad_() for p in params]

    loss_eager = _mlp_block(*eager)
    loss_eager.backward()
    fn = torch.compile(_mlp_block, backend=backend, fullgraph=True)
    loss_compiled = fn(*compiled)
    loss_compiled.backward()
    loss_ref = _torch_block(*reference)
    loss_ref.backward()

    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss_compiled.double(), loss_ref, rtol=1e-5, atol=1e-6)
    for c, e, r in zip(compiled, eager, reference):
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


def test_compiled_graph_calls_the_custom_ops(gen):
    # Eager calls skip the op wrappers (Python overhead); under torch.compile the graph must hold the ops.
    torch._dynamo.reset()
    seen = []

    def recording_backend(gm, example_inputs):
        seen.append(gm.print_readable(print_output=False))
        return gm.forward

    params = [_randn(2, 3, 32, gen=gen), _randn(32, gen=gen), _randn(32, gen=gen), _randn(48, 32, gen=gen),
              _randn(48, gen=gen)]  # fmt: skip
    params = [p.requires_grad_() for p in params]
    torch.compile(_mlp_block, backend=recording_backend, fullgraph=True)(*params).backward()
    graph = "\n".join(seen)
    for op in ("layer_norm_fwd", "layer_norm_bwd", "linear_gelu_fwd", "linear_gelu_bwd"):
        assert f"vitcore.{op}" in graph, f"{op} missing from the compiled graph"


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
            block_n, rows, warps = ln._block_shape(n, 4096)
            compile_one(ln._layer_norm_fwd_kernel, {
                "X": f"*{dt}", "Y": f"*{dt}", "W": "*fp32", "B": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32",
                "stride_x": "i32", "M": "i32", "N": "i32", "eps": "fp32"}, {"BLOCK_N": block_n, "ROWS": rows}, warps)
            block_n, rows, warps = ln._block_shape(n, 2048)
            compile_one(ln._layer_norm_bwd_kernel, {
                "DY": f"*{dt}", "X": f"*{dt}", "W": f"*{dt}", "MEAN": "*fp32", "RSTD": "*fp32", "DX": f"*{dt}",
                "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "stride_dy": "i32", "stride_x": "i32", "M": "i32",
                "N": "i32", "rows_per_prog": "i32"}, {"BLOCK_N": block_n, "ROWS": rows}, warps)
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

    # Attention in bf16 at the GPU heuristic's configs, head_dim 64 and 80 (BLOCK_D 64, 128), unit head_dim
    # strides; fp32 (unrolled FMA code, ~20 s more to compile) is left to the GPU runs.
    lengths = ("N_Q", "N_KV", "LEN_BUCKET")  # do_not_specialize: any ViT length, no divisibility

    def attn_arg_type(name):
        if name in ("LSE", "DELTA"):
            return "*fp32"
        if name.isupper() and name not in ("H", "HEAD_DIM", *lengths):
            return "*bf16"  # tensors: Q, K, V, OUT, DO, DK, DV, DQ
        return "fp32" if name in ("scale", "qk_scale") else "i32"

    for kind, fn in (("fwd", attn._attn_fwd_kernel), ("dkdv", attn._attn_bwd_dkdv_kernel),
                     ("dq", attn._attn_bwd_dq_kernel), ("delta", attn._attn_bwd_delta_kernel)):
        for block_d in (64, 128):
            if kind == "delta":
                consts = {"BLOCK_M": 64, "BLOCK_D": block_d}
                warps, stages = 4, 3
            else:
                bm, bn, warps, stages = attn._GPU_HEURISTIC[(kind, False, block_d <= 64)]
                consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": block_d, "DOT_PRECISION": "tf32"}
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
