"""vitcore.load_npz against np.load + torch.from_numpy on a ViT-B_16-sized checkpoint.

    python -m benchmarks.bench_npz [--cache-dir .bench-cache] [--runs 7] [--fresh 3]

Generates once, into the cache dir, an npz with ViT-B_16's official i21k keys and shapes
(pre-linen names, pre_logits, 21843-class head; ~410 MB of float32) written by np.savez, as the
official files are. Then, with the page cache warm, times each loader (median of --runs runs,
interleaved) and prints the times and the speed-ups. With --fresh N it also times one load in
each of N fresh processes (page cache warm, allocator cold: what a training run sees).

np.savez places member data at arbitrary byte offsets, so most float32 members are not
element-aligned; load_npz views them in place all the same (torch's CPU kernels use unaligned
loads), so with verify=False nothing is read until a tensor is used.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks.common import print_table
from vitcore.fileio import atomic_write

__all__ = ["vit_b16_shapes", "write_checkpoint", "main"]


def vit_b16_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official imagenet21k ViT-B_16.npz."""
    d, mlp, heads, layers, classes = 768, 3072, 12, 12, 21843
    hd = d // heads
    shapes: dict[str, tuple[int, ...]] = {
        "cls": (1, 1, d),
        "embedding/kernel": (16, 16, 3, d),
        "embedding/bias": (d,),
        "Transformer/posembed_input/pos_embedding": (1, 197, d),
    }
    for i in range(layers):
        b = f"Transformer/encoderblock_{i}"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            shapes[f"{b}/{ln}/scale"] = (d,)
            shapes[f"{b}/{ln}/bias"] = (d,)
        att = f"{b}/MultiHeadDotProductAttention_1"
        for proj in ("query", "key", "value"):
            shapes[f"{att}/{proj}/kernel"] = (d, heads, hd)
            shapes[f"{att}/{proj}/bias"] = (heads, hd)
        shapes[f"{att}/out/kernel"] = (heads, hd, d)
        shapes[f"{att}/out/bias"] = (d,)
        shapes[f"{b}/MlpBlock_3/Dense_0/kernel"] = (d, mlp)
        shapes[f"{b}/MlpBlock_3/Dense_0/bias"] = (mlp,)
        shapes[f"{b}/MlpBlock_3/Dense_1/kernel"] = (mlp, d)
        shapes[f"{b}/MlpBlock_3/Dense_1/bias"] = (d,)
    shapes["Transformer/encoder_norm/scale"] = (d,)
    shapes["Transformer/encoder_norm/bias"] = (d,)
    shapes["pre_logits/kernel"] = (d, d)
    shapes["pre_logits/bias"] = (d,)
    shapes["head/kernel"] = (d, classes)
    shapes["head/bias"] = (classes,)
    return shapes


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: (rng.standard_normal(s, dtype=np.float32) * 0.02) for k, s in vit_b16_shapes().items()}


def write_checkpoint(path: str, arrays: dict[str, np.ndarray]) -> None:
    """np.savez(path, **arrays) through vitcore.fileio.atomic_write (no half-written cache)."""
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def _numpy_load(path: str) -> dict[str, torch.Tensor]:
    with np.load(path, allow_pickle=False) as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


def _time(fn) -> float:
    t0 = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - t0
    del result  # freed outside the timing
    return elapsed


_FRESH_CODE = """
import sys, time, numpy as np, torch, vitcore
path, how = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if how == "numpy":
    with np.load(path, allow_pickle=False) as f:
        out = {k: torch.from_numpy(f[k]) for k in f.files}
else:
    out = vitcore.load_npz(path, verify=how == "load_npz verify=True")
print(time.perf_counter() - t0)
"""


def _time_fresh(path: str, how: str, runs: int) -> list[float]:
    cmd = [sys.executable, "-c", _FRESH_CODE, path, how]
    return [float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout) for _ in range(runs)]


def main(argv: list[str] | None = None) -> None:
    import vitcore

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=".bench-cache")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--fresh", type=int, default=0, help="also time one load in each of N fresh processes")
    p.add_argument("--quick", action="store_true", help="5 runs, no fresh processes (the minimum the median needs)")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.fresh = 5, 0
    os.makedirs(args.cache_dir, exist_ok=True)
    path = os.path.join(args.cache_dir, "ViT-B_16-shapes.npz")
    if not os.path.exists(path):
        print(f"writing {path} ...")
        write_checkpoint(path, _arrays())

    rows = []
    loaders = {
        "numpy": lambda: _numpy_load(path),
        "load_npz verify=True": lambda: vitcore.load_npz(path, verify=True),
        "load_npz verify=False": lambda: vitcore.load_npz(path, verify=False),
    }
    for fn in loaders.values():  # warm the page cache and the allocator
        fn()
    times: dict[str, list[float]] = {k: [] for k in loaders}
    names = list(loaders)
    for r in range(args.runs):
        # Interleaved, so that load from other processes hits all alike, and rotated, so that
        # none always runs right after the one whose freed memory the allocator hands back.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_time(loaders[name]))
    modes = [("warm", times)]
    if args.fresh:
        modes.append(("fresh", {name: _time_fresh(path, name, args.fresh) for name in loaders}))
    for mode, results in modes:
        base = statistics.median(results["numpy"])
        for name, ts in results.items():
            med = statistics.median(ts)
            rows.append(
                {
                    "process": mode,
                    "loader": name,
                    "median_ms": med * 1e3,
                    "min_ms": min(ts) * 1e3,
                    "speedup_vs_numpy": base / med,
                }
            )
    size = os.path.getsize(path)
    print_table(rows, title=f"load ViT-B_16-shaped npz (np.savez), {size / 2**20:.0f} MiB, {os.cpu_count()} CPUs")

if __name__ == "__main__":
    main()
