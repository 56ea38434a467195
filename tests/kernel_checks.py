"""Helpers shared by the kernel and model tests: the one closeness check, error measures, layouts, tolerances.

`check_close` bounds an error two ways, so that neither a diffuse error nor one confined to a few rows can hide:
norm-wise (relative error of the whole tensor) and element-wise (the largest single deviation).
- Against a trusted reference alone (fp32 kernels against float64, the triton model against the torch one):
  norm-wise relative error <= tol, and every element within tol x max|ref|.
- With PyTorch's own result at the same low precision (fp16/bf16; flash-attention's rule): norm-wise at most twice
  PyTorch's relative error plus `slack`, and element-wise max|ours - ref| <= 2 x max|torch - ref| + one ulp of
  ours' dtype at the magnitude of ref (what storing the result may cost).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
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


def _f64(t: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(t.detach() if isinstance(t, torch.Tensor) else t).to("cpu", torch.float64)


def rel_err(actual: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray, floor: float = 0.0) -> float:
    """||actual - ref|| / ||ref||, in float64; NaN anywhere gives inf. `floor` > 0 keeps the denominator at
    least that of a tensor whose entries are all `floor` (for references that may be exactly 0)."""
    a, r = _f64(actual), _f64(ref)
    diff = (a - r).norm().item()
    if diff != diff:
        return float("inf")
    return diff / max(r.norm().item(), floor * max(r.numel(), 1) ** 0.5, 1e-30)


def max_err(actual: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    """max |actual - ref| in float64; NaN anywhere gives inf."""
    diff = (_f64(actual) - _f64(ref)).abs()
    if diff.numel() == 0:
        return 0.0
    if diff.isnan().any():
        return float("inf")
    return diff.max().item()


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """The spacing of `dtype`'s values at `magnitude` (one unit in the last place)."""
    info = torch.finfo(dtype)
    magnitude = max(abs(magnitude), info.tiny)
    return info.eps * 2.0 ** math.floor(math.log2(magnitude))


def check_close(
    name: str,
    ours: torch.Tensor,
    ref: torch.Tensor,
    lowp: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    tol: float = FP32_TOL,
    floor: float = 0.0,
    slack: float = HALF_FLOOR,
) -> None:
    """Assert `ours` is close to the reference `ref` (float64, or another trusted result) norm-wise and
    element-wise, as the module docstring says. `lowp`: PyTorch's result at ours' precision (several: the largest
    of their errors is the yardstick); without it the bound is `tol`. `floor`: the magnitude below which the
    reference counts as zero-sized (gradients that are exactly 0 in float64 leave only rounding residue)."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert not torch.as_tensor(ours).isnan().any(), f"{name} has NaN (an element never written, or inf - inf)"
    scale = max(_f64(ref).abs().max().item() if ref.numel() else 0.0, floor)
    err, worst = rel_err(ours, ref, floor), max_err(ours, ref)
    if lowp is None:
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"
        assert worst <= tol * scale, f"{name}: an element is off by {worst:.3g} > {tol:.3g} x max|ref| {scale:.3g}"
        return
    lowps = [lowp] if isinstance(lowp, torch.Tensor) else list(lowp)
    torch_err = max(rel_err(t, ref, floor) for t in lowps)
    torch_worst = max(max_err(t, ref) for t in lowps)
    bound = 2 * torch_err + slack
    assert err <= bound, (
        f"{name} ({ours.dtype}): relative error {err:.3g} > {bound:.3g} (2x torch's {torch_err:.3g} + {slack:.3g})"
    )
    worst_bound = 2 * torch_worst + ulp(ours.dtype, scale)
    assert worst <= worst_bound, (
        f"{name} ({ours.dtype}): an element is off by {worst:.3g} > {worst_bound:.3g} "
        f"(2x torch's largest {torch_worst:.3g} + 1 ulp at {scale:.3g})"
    )


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
