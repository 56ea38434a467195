"""kernels.attention at head dims that are not powers of two (ViT-H's 80, and 96, 112), which the kernels split into
power-of-two column parts (64 + 16, 64 + 32, 64 + 32 + 16) instead of padding to 128: forward and dq, dk, dv against
float64, in fp32 and fp16 (the interpreter on CPU), with the shared checker (norm-wise and element-wise bounds).

That no tensor-core work is spent on padding is checked where it can be seen, in the compiled code:
tests/test_kernel_resources.py reads the dot shapes of the sm_90 compiles (useful MMA at head_dim 80).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import (
    DEVICE,
    check_close,
    poison_outputs,  # noqa: F401  (fixture, used through pytestmark)
)

from kernels import attention

attn_mod = importlib.import_module("kernels.attention")  # the package re-exports the function under the same name

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.usefixtures("poison_outputs")

# Gradients exactly 0 in float64 leave only rounding residue: below this magnitude a reference counts as 0-sized
# (real gradients here have entries of 0.03-3).
FLOOR = 0.05


@pytest.mark.parametrize("d,parts", [
    (1, (16, 0, 0)), (16, (16, 0, 0)), (33, (32, 16, 0)), (64, (64, 0, 0)), (72, (64, 16, 0)), (80, (64, 16, 0)),
    (96, (64, 32, 0)), (100, (64, 32, 16)), (112, (64, 32, 16)), (128, (128, 0, 0)),
])
def test_head_dim_parts(d, parts):
    assert attn_mod._head_dim_parts(d) == parts


def test_head_dim_parts_cover_without_padding():
    """For every supported head_dim: powers of two >= 16, largest first, covering it with less than 16 columns to
    spare (the rounding up to a multiple of 16 that the smallest tl.dot operand needs, nothing more)."""
    for d in range(1, 129):
        parts = [p for p in attn_mod._head_dim_parts(d) if p]
        assert parts == sorted(parts, reverse=True) and len(set(parts)) == len(parts), (d, parts)
        assert all(p >= 16 and p & (p - 1) == 0 for p in parts), (d, parts)
        assert 0 <= sum(parts) - d < 16 or (d < 16 and sum(parts) == 16), (d, parts)


def _qkv(B, H, n, d, dtype, gen):
    """q, k, v as views of one fused (B, N, 3, H, D) projection, as vitcore's attention passes them."""
    base = torch.randn(B, n, 3, H, d, generator=gen).to(dtype).to(DEVICE)
    return base.permute(2, 0, 3, 1, 4).unbind(0)


def _run(fn, q, k, v, scale, do):
    """fn's output and (dq, dk, dv) at fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, scale)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return [out.detach(), *(g.detach() for g in grads)]


def _math(q, k, v, scale):
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _torch_lowp(q, k, v, scale, do) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PyTorch's own results at the inputs' precision, per output (out, dq, dk, dv): its explicit math and its SDPA
    (the yardstick of tests/test_attention.py)."""
    return list(zip(_run(_math, q, k, v, scale, do), _run(_sdpa, q, k, v, scale, do)))


def check_head_dim(d: int, dtype: torch.dtype, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(1, 2, n, d, dtype, gen)
    do = torch.randn(q.shape, generator=gen).to(DEVICE)
    scale = d**-0.5
    ours = _run(attention, q, k, v, scale, do)
    ref = _run(_math, q.double(), k.double(), v.double(), scale, do.double())
    lowp = [None] * 4 if dtype == torch.float32 else _torch_lowp(q, k, v, scale, do)
    for name, a, r, t in zip(["out", "dq", "dk", "dv"], ours, ref, lowp):
        check_close(f"{name} d={d}", a, r, t, floor=FLOOR)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("d", [80, 96, 112])
def test_split_head_dims_match_float64(d, dtype):
    """Two and three parts, forward and backward; N = 50 leaves partial query and key blocks."""
    check_head_dim(d, dtype, n=50, seed=d)


@pytest.mark.parametrize("d", [72, 100])
def test_overhanging_last_part_matches_float64(d):
    """A head_dim that is not a multiple of 16: the last part overhangs it and its columns past head_dim are masked
    (72 = 64 + 8 of 16; 100 = 64 + 32 + 4 of 16)."""
    check_head_dim(d, torch.float32, n=37, seed=d)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter check of the block logic; on CUDA the configs run for real")
@pytest.mark.parametrize("kind,config", [("fwd", (64, 64, 4, 3)), ("dkdv", (32, 64, 4, 3)), ("dq", (64, 32, 4, 3))])
def test_split_head_dim_at_gpu_blocks(kind, config):
    """ViT-H's head_dim 80 at the GPU's block shapes for it (larger than the interpreter's), at ViT-H's N = 257."""
    gen = torch.Generator().manual_seed(257)
    q, k, v = _qkv(1, 1, 257, 80, torch.float32, gen)
    do = torch.randn(q.shape, generator=gen).to(DEVICE)
    scale = 80**-0.5
    ref = _run(_math, q.double(), k.double(), v.double(), scale, do.double())
    out, lse = attn_mod._attention_forward(q, k, v, scale, config=config if kind == "fwd" else None)
    check_close("out", out, ref[0], floor=FLOOR)
    if kind != "fwd":
        dq, dk, dv = attn_mod._attention_backward(do, q, k, v, out, lse, scale, configs={kind: config})
        checked = [("dq", dq, ref[1])] if kind == "dq" else [("dk", dk, ref[2]), ("dv", dv, ref[3])]
        for name, g, r in checked:
            check_close(name, g, r, floor=FLOOR)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [80, 96, 112])
def test_split_head_dims_gpu(d, dtype):
    """ViT-H's shape (B 4, H 16, N 257) on the GPU, where the sm_90 kernels with their real blocks run."""
    gen = torch.Generator().manual_seed(d)
    q, k, v = _qkv(4, 16, 257, d, dtype, gen)
    do = torch.randn(q.shape, generator=gen).to(DEVICE)
    scale = d**-0.5
    ours = _run(attention, q, k, v, scale, do)
    ref = _run(_math, q.double(), k.double(), v.double(), scale, do.double())
    for name, a, r, t in zip(["out", "dq", "dk", "dv"], ours, ref, _torch_lowp(q, k, v, scale, do)):
        check_close(f"{name} d={d}", a, r, t, floor=FLOOR)
