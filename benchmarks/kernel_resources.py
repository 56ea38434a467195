"""Compile-only resource report of every Triton kernel x config at ViT shapes, for sm_90 (H100/H200), without a GPU.

    python -m benchmarks.kernel_resources                # ViT-B_16, ViT-L_16, ViT-H_14; fwd and bwd; bf16 and fp16
    python -m benchmarks.kernel_resources --quick        # ViT-B_16 and ViT-H_14, bf16 (what the CPU test runs)
    python -m benchmarks.kernel_resources --train-step   # what a cold ViT-B_16 bf16 training step compiles

How: the real host launchers (kernels.attention / layer_norm / linear_gelu) run on meta tensors (shapes and strides,
no data) while Triton's driver is replaced by a stand-in that reports one sm_90 GPU with 132 SMs (H100 SXM and H200
alike). Every kernel launch becomes a compile (JITFunction.run with warmup=True: the same specialisation, signature
and options a real launch would get, nothing launched), and every autotuned launch compiles each config the
autotuner would benchmark (after its own pruning). Attention runs twice: at its heuristic blocks and with
VITCORE_ATTN_AUTOTUNE=1. Linear+GELU runs both backward variants ("cublas", the default, and "triton").
Triton's bundled ptxas does the code generation, so registers, spills and shared memory are what the GPU gets from
the installed Triton. Triton's cache points at a fresh folder, so compile seconds are cold (this machine's CPU).

Columns:
    kernel, where   the Triton kernel and the (model, pass, dtype) launches that compiled it (a compile shared by
                    several launches is listed once); src: "def" = the launcher's default, "tune" = autotune config
    tile            the block constexprs (BLOCK_M x BLOCK_N [x BLOCK_K], BLOCK_G x BLOCK_N, ROWS), d = attention's
                    head-dim parts, n = LayerNorm's column parts (e.g. "4 n512+256": 4 rows of 768 as 512 + 256)
    w, st           num_warps, num_stages
    regs, spill     registers per thread and spill bytes (stores/loads) from ptxas -v
    smem            shared memory per block (KiB)
    occ             theoretical occupancy: resident warps / 64, limited by registers (allocated per warp in units
                    of 256), shared memory (228 KiB per SM, 1 KiB reserved per block) and warps (64) per SM.
                    H100 and H200 share the GH100 SM, so one number serves both
    mma             useful fraction of the MMA work each inner-loop step issues: the multiply-adds the math needs
                    at the real head_dim (attention: fwd 2, dK/dV 4, dQ 3 products of BLOCK_M x BLOCK_N x head_dim;
                    GEMM: BLOCK_M x BLOCK_N x BLOCK_K) over the sum of M x N x K of the tl.dot ops in one loop body
                    of the compiled TTIR. Sequence tails (197 rows in blocks of 128) are left out: they depend on N,
                    not on the kernel. "-" for kernels without dots
    lanes           real columns over the columns the head-dim parts (attention) or row parts (LayerNorm) cover:
                    below 1 where lanes idle on padding (a width that is not a sum of at most three powers of two)
    s               cold compile seconds
The last line reads `kernel resources: N compiled, S with spills, useful MMA at head_dim 80: F`, F the smallest mma of
the head_dim-80 attention compiles. Exit status 1 when any compile spills (the CI test relies on it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

# The fused kernels' modules: kernels/__init__ re-exports functions under the module names, so import them by path.
_MODULES = ("kernels.attention", "kernels.layer_norm", "kernels.linear_gelu")

# sm_90 (GH100) per-SM limits, for the occupancy column.
SM90_SMS = 132
_REGS_PER_SM = 65536
_REG_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)
_SMEM_PER_SM = 228 * 1024
_SMEM_RESERVED = 1024  # per block, taken by the system
_MAX_WARPS = 64
_MAX_BLOCKS = 32

BATCH = 64  # images per step: only divisibility by 16 reaches the compiler, so any batch of 16k compiles the same
# (tokens at 224 px incl. the class token, heads, head_dim, width, MLP width), as vitcore.CONFIGS has them (a test
# checks that). Spelled out so this script needs only torch and triton: it also runs in a bare venv of another Triton.
MODEL_DIMS = {
    "ViT-B_16": (197, 12, 64, 768, 3072),
    "ViT-L_16": (197, 16, 64, 1024, 4096),
    "ViT-H_14": (257, 16, 80, 1280, 5120),
}
MODELS = tuple(MODEL_DIMS)
_SHORT = {"ViT-B_16": "B16", "ViT-L_16": "L16", "ViT-H_14": "H14"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
QUICK = (("ViT-B_16", "ViT-H_14"), ("bf16",))
# Products per inner step the attention algorithm needs (each BLOCK_M x BLOCK_N x head_dim multiply-adds):
# fwd S = QK^T, O += PV; dK/dV S^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q; dQ S, dP = dO V^T, dQ += dS K.
_PRODUCTS = {"_attn_fwd_kernel": 2, "_attn_bwd_dkdv_kernel": 4, "_attn_bwd_dq_kernel": 3, "_gemm_kernel": 1}
_TILE_NAMES = ("ROWS", "BLOCK_G", "BLOCK_M", "BLOCK_N", "BLOCK_K")


@dataclass
class Compiled:
    """One compiled kernel variant and what ptxas and the TTIR say about it."""

    kernel: str
    tile: str
    warps: int
    stages: int
    regs: int
    spill_stores: int
    spill_loads: int
    smem: int
    seconds: float
    mma: float | None
    lanes: float | None
    head_dim: int | None
    where: list[str] = field(default_factory=list)
    sources: set[str] = field(default_factory=set)

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def occupancy(self) -> float:
        return occupancy(self.regs, self.warps, self.smem)


def occupancy(regs: int, warps: int, smem: int) -> float:
    """Theoretical sm_90 occupancy (resident warps / 64) of a kernel using `regs` registers per thread, `warps`
    warps and `smem` bytes of shared memory per block; 0 when the block does not fit at all."""
    per_warp = math.ceil(max(regs, 1) * 32 / _REG_UNIT) * _REG_UNIT
    by_regs = (_REGS_PER_SM // per_warp) // warps
    by_smem = _SMEM_PER_SM // (smem + _SMEM_RESERVED)
    blocks = min(by_regs, by_smem, _MAX_WARPS // warps, _MAX_BLOCKS)
    return blocks * warps / _MAX_WARPS


_DOT = re.compile(r"= tt\.dot .*: tensor<(\d+)x(\d+)x\w+> \* tensor<(\d+)x(\d+)x\w+>")


def loop_dot_macs(ttir: str) -> int | None:
    """Multiply-adds of one iteration of the first loop holding tl.dot ops in a TTIR listing (sum of M*N*K over its
    dots); None when no loop holds a dot."""
    depth, loop_depth, macs = 0, None, 0
    for line in ttir.splitlines():
        if loop_depth is None and "scf.for" in line and line.rstrip().endswith("{"):
            loop_depth = depth
        elif loop_depth is not None:
            m = _DOT.search(line)
            if m:
                rows, inner, _, cols = (int(g) for g in m.groups())
                macs += rows * inner * cols
        depth += line.count("{") - line.count("}")
        if loop_depth is not None and depth <= loop_depth:
            if macs:
                return macs
            loop_depth = None
    return None


def _ptxas_numbers(log: str, kernel: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from a ptxas -v log."""
    regs = re.search(r"Used (\d+) registers", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    if not (regs and stores and loads):
        raise RuntimeError(f"kernel_resources: no ptxas -v report for {kernel} (was it loaded from a cache?):\n{log}")
    return int(regs.group(1)), int(stores.group(1)), int(loads.group(1))


class _Sm90:
    """Stands in for Triton's CUDA driver: one sm_90 device, stream 0. Only compile paths reach it."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)  # (backend, compute capability, warp size)


class Harness:
    """Turns the kernels' launches into sm_90 compiles and collects one Compiled per distinct variant."""

    def __init__(self) -> None:
        # By the compile's hash: a launch whose options spell the same compile differently (an autotune config equal
        # to the default) is a cache hit, not a new variant.
        self.compiled: dict[str, Compiled] = {}
        self.label = ""
        self.source = "def"

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside: Triton sees an sm_90 GPU, launches compile only, autotuners compile every pruned config, and the
        kernels' SM count is an H100's. Everything is restored on exit."""
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        harness = self
        launch, tune = JITFunction.run, Autotuner.run

        def compile_only(fn, *args, grid, warmup, **kwargs):
            log = io.StringIO()
            start = time.perf_counter()
            with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
                kernel = launch(fn, *args, grid=grid, warmup=True, **kwargs)
            harness._record(fn, args, kwargs, kernel, log.getvalue(), time.perf_counter() - start)
            return kernel

        def compile_every_config(tuner, *args, grid=None, warmup=False, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)
            previous, harness.source = harness.source, "tune"
            try:
                for config in configs:
                    tuner.fn.run(*args, grid=None, warmup=True, **kwargs, **config.all_kwargs())
            finally:
                harness.source = previous
                tuner.nargs = None

        modules = [importlib.import_module(name) for name in _MODULES]
        saved_sm = [(m, m.sm_count) for m in modules if hasattr(m, "sm_count")]
        saved_env = {k: os.environ.get(k) for k in ("TRITON_DUMP_PTXAS_LOG", "TRITON_CACHE_DIR")}
        with tempfile.TemporaryDirectory(prefix="kernel-resources-") as cache:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
            os.environ["TRITON_CACHE_DIR"] = cache  # cold: nothing compiled before counts
            previous_driver = getattr(driver, "_active", None)  # None until first use: created lazily
            driver.set_active(_Sm90())
            JITFunction.run, Autotuner.run = compile_only, compile_every_config
            for m, _ in saved_sm:
                m.sm_count = lambda device: SM90_SMS
            try:
                yield
            finally:
                JITFunction.run, Autotuner.run = launch, tune
                for m, fn in saved_sm:
                    m.sm_count = fn
                driver.set_active(previous_driver)
                _restore_env(saved_env)

    def _record(self, fn, args, kwargs, kernel, log: str, seconds: float) -> None:
        known = self.compiled.get(kernel.hash)
        if known is None:
            name = fn.__name__
            values = {**dict(zip(fn.arg_names, args)), **kwargs}
            regs, stores, loads = _ptxas_numbers(log, name)
            head_dim = values.get("HEAD_DIM") if name.startswith("_attn") else None
            known = Compiled(
                kernel=name, tile=_tile(values), warps=kernel.metadata.num_warps, stages=kernel.metadata.num_stages,
                regs=regs, spill_stores=stores, spill_loads=loads, smem=kernel.metadata.shared, seconds=seconds,
                mma=_useful_mma(name, values, kernel.asm["ttir"]), lanes=_useful_lanes(values), head_dim=head_dim,
            )
            self.compiled[kernel.hash] = known
        if self.label not in known.where:
            known.where.append(self.label)
        known.sources.add(self.source)

    @contextlib.contextmanager
    def launches(self, label: str) -> Iterator[None]:
        previous, self.label = self.label, label
        try:
            yield
        finally:
            self.label = previous


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _tile(values: dict) -> str:
    tile = "x".join(str(values[n]) for n in _TILE_NAMES if n in values)
    for prefix, axis in (("d", "D"), ("n", "N")):  # attention's head-dim parts, LayerNorm's column parts
        parts = [values[f"{axis}{i}"] for i in range(3) if values.get(f"{axis}{i}")]
        if parts:
            tile += f" {prefix}" + "+".join(map(str, parts))
    if values.get("SPLIT_K", 1) > 1:
        tile += f" split{values['SPLIT_K']}"
    return tile


def _useful_lanes(values: dict) -> float | None:
    """Real columns over the columns a kernel's head-dim or row parts cover (1.0: no lane idles on padding)."""
    if "N0" in values:
        return values["N"] / (values["N0"] + values["N1"] + values["N2"])
    if "D0" in values:
        return values["HEAD_DIM"] / (values["D0"] + values["D1"] + values["D2"])
    return None


def _useful_mma(name: str, values: dict, ttir: str) -> float | None:
    if name not in _PRODUCTS:
        return None
    issued = loop_dot_macs(ttir)
    if issued is None:
        raise RuntimeError(f"kernel_resources: no tl.dot loop found in {name}'s TTIR")
    depth = values["BLOCK_K"] if name == "_gemm_kernel" else values["HEAD_DIM"]
    return _PRODUCTS[name] * values["BLOCK_M"] * values["BLOCK_N"] * depth / issued


# ---------------------------------------------------------------------------------------------------- the launches


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def launch_attention(harness: Harness, model: str, dtype_name: str, autotune: bool) -> None:
    """Forward and backward at the model's shape, q/k/v as views of one fused qkv projection (as vitcore does)."""
    attn = importlib.import_module("kernels.attention")
    n, heads, d, _, _ = MODEL_DIMS[model]
    dtype = DTYPES[dtype_name]
    qkv = _meta(BATCH, n, 3, heads, d, dtype=dtype)  # (B, N, 3, H, D)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D) views
    do = _meta(BATCH, n, heads, d, dtype=dtype).transpose(1, 2)  # the gradient of the (B, N, H, D) merge
    scale = d**-0.5
    saved = {"VITCORE_ATTN_AUTOTUNE": os.environ.get("VITCORE_ATTN_AUTOTUNE")}
    os.environ["VITCORE_ATTN_AUTOTUNE"] = "1" if autotune else "0"
    try:
        with harness.launches(f"{_SHORT[model]} attn-fwd {dtype_name}"):
            o, lse = attn._attention_forward(q, k, v, scale)
        with harness.launches(f"{_SHORT[model]} attn-bwd {dtype_name}"):
            attn._attention_backward(do, q, k, v, o, lse, scale)
    finally:
        _restore_env(saved)


def launch_layer_norm(harness: Harness, model: str, dtype_name: str, weight_dtype: torch.dtype) -> None:
    ln = importlib.import_module("kernels.layer_norm")
    n, _, _, width, _ = MODEL_DIMS[model]
    dtype = DTYPES.get(dtype_name, torch.float32)
    x = _meta(BATCH, n, width, dtype=dtype)
    w, b = _meta(width, dtype=weight_dtype), _meta(width, dtype=weight_dtype)
    with harness.launches(f"{_SHORT[model]} ln-fwd {dtype_name}"):
        _, mean, rstd = ln._layer_norm_fwd(x, w, b, 1e-6)
    with harness.launches(f"{_SHORT[model]} ln-bwd {dtype_name}"):
        ln._layer_norm_bwd(torch.empty_like(x), x, w, mean, rstd, [True, True, True])


def launch_linear_gelu(harness: Harness, model: str, dtype_name: str, backwards: tuple[str, ...]) -> None:
    lg = importlib.import_module("kernels.linear_gelu")
    n, _, _, width, mlp = MODEL_DIMS[model]
    dtype = DTYPES[dtype_name]
    x = _meta(BATCH, n, width, dtype=dtype)
    w, b = _meta(mlp, width, dtype=dtype), _meta(mlp, dtype=dtype)
    with harness.launches(f"{_SHORT[model]} mlp-fwd {dtype_name}"):
        y, h = lg._linear_gelu_fwd(x, w, b, "tanh", True)
    for variant in backwards:
        with harness.launches(f"{_SHORT[model]} mlp-bwd-{variant} {dtype_name}"):
            lg._linear_gelu_bwd(torch.empty_like(y), x, w, h, "tanh", variant, [True, True, True])


def run_all(harness: Harness, models: tuple[str, ...], dtypes: tuple[str, ...]) -> None:
    """Every kernel x config the host code can launch at these models' shapes, fwd and bwd."""
    for model in models:
        for dtype in dtypes:
            launch_attention(harness, model, dtype, autotune=False)
            launch_attention(harness, model, dtype, autotune=True)
            launch_layer_norm(harness, model, dtype, torch.float32)  # fp32 master weights, half activations
            launch_linear_gelu(harness, model, dtype, ("cublas", "triton"))


def run_train_step(harness: Harness) -> None:
    """What the first ViT-B_16 training step under bf16 autocast compiles with backend="triton": the residual
    stream stays fp32 (patch embedding + fp32 position embedding), so LayerNorm runs fp32; Linear+GELU and
    attention get bf16 (autocast's casts); attention at its heuristic blocks, the GEMM autotuned."""
    launch_layer_norm(harness, "ViT-B_16", "fp32", torch.float32)
    launch_attention(harness, "ViT-B_16", "bf16", autotune=False)
    launch_linear_gelu(harness, "ViT-B_16", "bf16", ("cublas",))


# ------------------------------------------------------------------------------------------------------ the report


def report(compiled: list[Compiled]) -> list[dict]:
    """Table rows, one per compiled variant."""
    rows = []
    for c in sorted(compiled, key=lambda c: (c.kernel, c.where[0], c.tile, c.warps, c.stages)):
        rows.append({
            "kernel": c.kernel.lstrip("_").removesuffix("_kernel"),
            "where": "; ".join(c.where),
            "src": "+".join(sorted(c.sources)),
            "tile": c.tile,
            "w": c.warps,
            "st": c.stages,
            "regs": c.regs,
            "spill": f"{c.spill_stores}/{c.spill_loads}",
            "smem_KiB": round(c.smem / 1024, 1),
            "occ": round(c.occupancy, 3),
            "mma": "-" if c.mma is None else round(c.mma, 3),
            "lanes": "-" if c.lanes is None else round(c.lanes, 3),
            "s": round(c.seconds, 2),
        })
    return rows


def summary(compiled: list[Compiled]) -> str:
    """The contract line: counts and the worst useful-MMA fraction at head_dim 80 (nan when none was compiled)."""
    spilled = sum(c.spills for c in compiled)
    at80 = [c.mma for c in compiled if c.head_dim == 80 and c.mma is not None]
    f = min(at80) if at80 else float("nan")
    return f"kernel resources: {len(compiled)} compiled, {spilled} with spills, useful MMA at head_dim 80: {f:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="ViT-B_16 and ViT-H_14 in bf16 only")
    group.add_argument("--train-step", action="store_true", help="the kernels a cold ViT-B_16 bf16 training step "
                       "compiles, and their total compile seconds")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernel_resources: TRITON_INTERPRET is set; unset it (this compiles for sm_90, no interpreter)",
              file=sys.stderr)
        return 2
    import triton

    from benchmarks.common import print_table

    harness = Harness()
    start = time.perf_counter()
    with harness.active():
        if args.train_step:
            run_train_step(harness)
        else:
            run_all(harness, *(QUICK if args.quick else (MODELS, tuple(DTYPES))))
    wall = time.perf_counter() - start
    compiled = list(harness.compiled.values())
    print(f"Triton {triton.__version__}, torch {torch.__version__}, target sm_90 (H100/H200), compile only")
    print_table(report(compiled))
    total = sum(c.seconds for c in compiled)
    if args.train_step:
        by_kernel: dict[str, list[Compiled]] = {}
        for c in compiled:
            by_kernel.setdefault(c.kernel, []).append(c)
        for name, cs in sorted(by_kernel.items()):
            print(f"  {name}: {len(cs)} compiles, {sum(c.seconds for c in cs):.1f} s")
        print(f"ViT-B_16 bf16 training step: {len(compiled)} kernels compiled cold in {total:.1f} s")
    print(f"compile seconds: {total:.1f} in kernels, {wall:.1f} wall")
    print(summary(compiled))
    return 1 if any(c.spills for c in compiled) else 0


if __name__ == "__main__":
    sys.exit(main())
