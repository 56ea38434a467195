"""The GPU benchmark scripts' logic, run on CPU with tiny shapes and a stand-in timer.

GPU time is short: a script that breaks after the first measurement wastes a lease. These runs exercise
argument parsing, every implementation's forward/backward call, the table and the CSV; the timings
themselves mean nothing here (do_bench is replaced by one call of the function).
"""

import csv
import importlib
import sys

import pytest
import torch
import triton.testing


@pytest.fixture()
def cpu_bench(monkeypatch, tmp_path):
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup=25, rep=100, return_mode="median": (fn(), 1.0)[1])
    monkeypatch.setenv("BENCH_OUT", str(tmp_path))

    def load(name: str, **overrides):
        mod = importlib.import_module(f"benchmarks.{name}")
        monkeypatch.setattr(mod, "require_cuda", lambda script: None)
        monkeypatch.setattr(mod, "DEVICE", "cpu")
        for key, value in overrides.items():
            monkeypatch.setattr(mod, key, value)
        return mod

    def rows(csv_name: str) -> list[dict]:
        with open(tmp_path / csv_name) as f:
            return list(csv.DictReader(f))

    return load, rows, monkeypatch


def test_bench_layer_norm_runs_end_to_end(cpu_bench):
    load, rows, monkeypatch = cpu_bench
    mod = load("bench_layer_norm", QUICK=[("tiny", 48, 5, 3)], QUICK_DTYPES=[torch.float32],
               copy_bandwidth=lambda: 1.0)
    monkeypatch.setattr(sys, "argv", ["bench_layer_norm", "--quick", "--no-compile"])
    mod.main()
    got = rows("bench_layer_norm.csv")
    assert {(r["impl"], r["mode"]) for r in got} == {(i, m) for i in ("triton", "torch") for m in mod.MODES}
    assert all(r["device"] == "cpu" and float(r["ms"]) == 1.0 for r in got)


def test_bench_linear_gelu_runs_end_to_end(cpu_bench):
    load, rows, monkeypatch = cpu_bench
    mod = load("bench_linear_gelu", QUICK=[("tiny", 2, 5, 16, 32)], QUICK_DTYPES=[torch.float32])
    monkeypatch.setattr(sys, "argv", ["bench_linear_gelu", "--quick", "--no-compile"])
    mod.main()
    impls = {r["impl"] for r in rows("bench_linear_gelu.csv")}
    assert impls == {"triton-bwd=cublas", "triton-bwd=triton", "torch"}


def test_bench_attention_runs_end_to_end(cpu_bench):
    load, rows, monkeypatch = cpu_bench
    mod = load("bench_attention", QUICK_SHAPES=[("tiny", 2, 2, 9, 16)], QUICK_DTYPES=[torch.float32])
    monkeypatch.setattr(sys, "argv", ["bench_attention", "--quick", "--no-compile", "--no-autotune"])
    mod.main()
    got = rows("bench_attention.csv")
    impls = {r["impl"] for r in got}
    assert "triton" in impls and any(i.startswith("sdpa-") for i in impls), impls
    assert {r["mode"] for r in got} == set(mod.MODES)
