"""benchmarks.kernel_resources: the compile-only sm_90 report of every kernel x config, and what CI asserts with it.

The end-to-end test compiles the --quick subset (ViT-B_16 and ViT-H_14, bf16, forward and backward, every default
and autotune config) with the installed Triton's bundled ptxas, no GPU and no interpreter, and fails on any register
spill and on useful MMA work at head_dim 80 below 75% (the head-dim split's promise). The full set (ViT-L_16 and fp16
too) is `python -m benchmarks.kernel_resources`; benchmarks/kernel_resources_results.md has its tables.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import kernel_resources as kr

ROOT = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(r"^kernel resources: (\d+) compiled, (\d+) with spills, useful MMA at head_dim 80: ([0-9.]+)$")


def test_occupancy_limits():
    """Warps per SM limited by registers (per-warp units of 256), shared memory (228 KiB, 1 KiB reserved per block)
    and the 64-warp cap, on the sm_90 numbers."""
    assert kr.occupancy(32, 4, 0) == 1.0  # 16 blocks of 4 warps: the warp cap
    assert kr.occupancy(128, 4, 0) == 0.25  # 4096 registers per warp: 16 warps
    assert kr.occupancy(255, 4, 0) == 0.125  # 256 per thread allocated: 8 warps, 2 blocks
    assert kr.occupancy(255, 8, 0) == 0.125
    assert kr.occupancy(64, 4, 100 * 1024) == 0.125  # two 101 KiB blocks fit in 228 KiB
    assert kr.occupancy(64, 4, 228 * 1024) == 0.0  # does not fit at all


def test_loop_dot_macs_reads_one_loop_body():
    """The multiply-adds of the first loop that holds dots, from TTIR text: dots outside it and later loops (the
    masked tail's copy of the same body) are not added."""
    ttir = """
    tt.func public @k() {
      %a = tt.dot %x, %y, %z : tensor<16x16xf16> * tensor<16x16xf16> -> tensor<16x16xf32>
      %r = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %z) -> (tensor<128x64xf32>) : i32 {
        %s = tt.dot %q, %k, %c {attr = {x = 1}} : tensor<128x64xbf16> * tensor<64x32xbf16> -> tensor<128x32xf32>
        %o = tt.dot %p, %v, %acc : tensor<128x32xbf16> * tensor<32x16xbf16> -> tensor<128x16xf32>
        scf.yield %o : tensor<128x64xf32>
      }
      %t = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %z) -> (tensor<128x64xf32>) : i32 {
        %s = tt.dot %q, %k, %c : tensor<128x64xbf16> * tensor<64x32xbf16> -> tensor<128x32xf32>
        scf.yield %s : tensor<128x64xf32>
      }
      tt.return
    }
    """
    assert kr.loop_dot_macs(ttir) == 128 * 64 * 32 + 128 * 32 * 16
    assert kr.loop_dot_macs("scf.for %i = %a to %b step %c : i32 {\n  scf.yield\n}\n") is None


@pytest.mark.parametrize("model", kr.MODELS)
def test_model_dims_match_the_config_zoo(model):
    from vitcore import CONFIGS

    cfg = CONFIGS[model]
    tokens = (224 // cfg.patch_size) ** 2 + 1  # + the class token
    assert kr.MODEL_DIMS[model] == (tokens, cfg.num_heads, cfg.hidden_size // cfg.num_heads, cfg.hidden_size,
                                    cfg.mlp_dim)


def test_ptxas_numbers():
    log = ("ptxas info    : Function properties for k\n"
           "    48 bytes stack frame, 48 bytes spill stores, 40 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 48 bytes cumulative stack size\n")
    assert kr._ptxas_numbers(log, "k") == (255, 48, 40)
    with pytest.raises(RuntimeError, match="no ptxas -v report"):
        kr._ptxas_numbers("", "k")


@pytest.mark.parametrize("width,parts", [(768, (512, 256, 0)), (1024, (1024, 0, 0)), (1280, (1024, 256, 0)),
                                         (384, (256, 128, 0)), (1000, (512, 256, 256)), (10, (8, 2, 0))])
def test_layer_norm_widths_leave_no_idle_lanes(width, parts):
    """ViT widths split into power-of-two column parts that add up to the width exactly (only a width with more than
    three binary digits pads, in its last part), and every thread of a block holds elements of even the smallest
    part (no replicated lanes), forward and backward."""
    ln = importlib.import_module("kernels.layer_norm")
    for tile_elems in (4096, 2048):  # the forward's and the backward's block sizes
        got, rows, warps = ln._block_shape(width, tile_elems)
        assert got == parts
        assert rows & (rows - 1) == 0 and warps & (warps - 1) == 0
        assert rows * min(p for p in got if p) >= 32 * warps, (rows, warps)
    if bin(width).count("1") <= 3:
        assert sum(parts) == width


def test_refuses_the_interpreter(monkeypatch, capsys):
    """Under TRITON_INTERPRET the kernels would not compile for sm_90: a one-line error says what to unset."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kr.main(["--quick"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


def test_quick_report_has_no_spills():
    """Every default and autotune config at ViT-B_16 and ViT-H_14 shapes, forward and backward, compiles for sm_90
    without register spills; head_dim 80 wastes no more than 25% of its MMA work."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for the kernel tests
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    m = LAST_LINE.match(lines[-1])
    assert m, f"last line {lines[-1]!r} is not the contract line\n{proc.stderr[-3000:]}"
    compiled, spilled, useful80 = int(m.group(1)), int(m.group(2)), float(m.group(3))
    spilling = [line for line in lines if re.search(r"\s(\d+)/(\d+)\s", line) and not re.search(r"\s0/0\s", line)]
    assert spilled == 0 and not spilling, "configs that spill:\n" + "\n".join(spilling)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Attention (fwd, delta, dK/dV, dQ), LayerNorm, Linear+GELU and the column sums, at two models: dozens of compiles.
    assert compiled >= 40
    names = {line.split()[0] for line in lines[2:-2]}
    assert {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_delta", "layer_norm_fwd", "layer_norm_bwd",
            "gemm", "dgelu", "column_sum"} <= names
    assert useful80 >= 0.75
