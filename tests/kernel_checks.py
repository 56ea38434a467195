"""Helpers shared by the kernel tests: error measure, layouts, tolerances.

fp32 must match float64 to FP32_TOL (norm-wise relative error); fp16/bf16 may be at most twice as far
from float64 as PyTorch's own op at that precision, plus HALF_FLOOR.
"""

import pytest
import torch

from kernels._common import POISON_ENV

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5
HALF_FLOOR = 1e-4


@pytest.fixture()
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element the kernels never write fails the comparison."""
    monkeypatch.setenv(POISON_ENV, "1")


def rel_err(actual: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """||actual - ref|| / ||ref||, in float64; NaN anywhere gives inf. `floor` > 0 keeps the denominator at
    least that of a tensor whose entries are all `floor` (for references that may be exactly 0)."""
    diff = (actual.detach().double() - ref.detach().double()).norm().item()
    if diff != diff:
        return float("inf")
    return diff / max(ref.detach().double().norm().item(), floor * max(ref.numel(), 1) ** 0.5, 1e-30)


def make_tensor(shape, layout: str, dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """A random tensor of `shape` laid out as requested: "contiguous"; "sliced" (row stride > width);
    "transposed" (leading dims swapped, or the last dim strided for 2-D); "strided" (every other row)."""
    shape = tuple(shape)
    randn = lambda *s: (scale * torch.randn(*s, generator=gen, dtype=torch.float32)).to(dtype=dtype, device=DEVICE)
    if layout == "sliced":
        return randn(*shape[:-1], shape[-1] + 3)[..., 1 : 1 + shape[-1]]
    if layout == "transposed" and len(shape) >= 3:
        return randn(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    if layout == "transposed" and len(shape) == 2:
        return randn(shape[1], shape[0]).t()
    if layout == "strided" and len(shape) >= 2:
        return randn(shape[0] * 2, *shape[1:])[::2]
    return randn(*shape)


def check_close(name: str, ours: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor | None) -> None:
    """fp32 (torch_lowp None): ours within FP32_TOL of float64. Half: within 2x PyTorch's own error + floor."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    err = rel_err(ours, ref64)
    if torch_lowp is None:
        assert err <= FP32_TOL, f"{name}: relative error {err:.3g} > {FP32_TOL}"
    else:
        bound = 2 * rel_err(torch_lowp, ref64) + HALF_FLOOR
        assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g} (2x torch's own + floor)"
