"""One training step of a zoo ViT side by side with timm's same model: vitcore's `torch`, `triton` and `auto`
backends, each eager and under torch.compile, against timm (eager with SDPA attention, and torch.compile'd);
img/s and MFU, in one process, on the same batch held on the GPU.

    python -m benchmarks.bench_train_compare --quick    # ViT-B_16 224 px bf16 batch 256, all 8 variants; then
                                                         # ViT-L_16 batch 128 (4) as far as --deadline_s allows
    python -m benchmarks.bench_train_compare --model_type ViT-L_16 --batch_size 128 --variants auto timm
    python -m benchmarks.bench_train_compare --quick --warm_only   # fill Inductor's caches for a later run

A step is what fine-tuning runs: forward under autocast, cross-entropy, backward, global-norm clip to 1, SGD
with momentum, zero_grad. Every variant gets `warmup` untimed steps (compilation, autotuning and `auto`'s
first-use timing happen there), then `iters` steps, each timed with CUDA events; the row holds their median
(and the spread, max/min - 1). MFU counts the FLOPs of the model's forward and backward (vitcore.flops, counted
on vitcore's model) against the GPU's dense peak; timm's model has the same layers, so the same count is used
for it. Rows go to
<results>/bench_train_compare.csv after every variant, `auto`'s per-layer choices to
<results>/backend_report.txt; the last line printed is the headline (`headline()`).
Targets on an H100/H200, ViT-B_16: auto >= 1.25x timm eager, >= 1.0x timm compiled, >= 50% MFU.
Exits 0 with a message where there is no CUDA device.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import traceback
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import vitcore
from benchmarks.common import device_name, print_table, require_cuda, results_dir, write_csv
from vitcore.fileio import atomic_write
from vitcore.precision import PRECISIONS, autocast_dtype

__all__ = ["VARIANTS", "TIMM_NAMES", "make_batch", "make_step", "time_steps", "run_variant", "headline", "main"]

# Variant name -> (library, backend, compiled), in the order they run: the headline's three rows first, so a
# run cut short by its time cap still has them.
VARIANTS: dict[str, tuple[str, str, bool]] = {
    "auto": ("vitcore", "auto", False),
    "timm": ("timm", "sdpa", False),
    "timm+compile": ("timm", "sdpa", True),
    "triton": ("vitcore", "triton", False),
    "torch": ("vitcore", "torch", False),
    "auto+compile": ("vitcore", "auto", True),
    "triton+compile": ("vitcore", "triton", True),
    "torch+compile": ("vitcore", "torch", True),
}
# vitcore zoo name -> the timm model with the same layers (timm's GELU is erf, ours tanh: same FLOPs).
TIMM_NAMES = {"ViT-B_16": "vit_base_patch16_224", "ViT-L_16": "vit_large_patch16_224",
              "ViT-H_14": "vit_huge_patch14_224", "ViT-S_16": "vit_small_patch16_224",
              "ViT-Ti_16": "vit_tiny_patch16_224", "ViT-B_32": "vit_base_patch32_224"}
# --quick: the headline run, then ViT-L_16's main rows where the time cap (--deadline_s) leaves room for them.
QUICK = {"runs": [{"model_type": "ViT-B_16", "img_size": 224, "batch_size": 256, "variants": list(VARIANTS)},
                  {"model_type": "ViT-L_16", "img_size": 224, "batch_size": 128,
                   "variants": ["auto", "timm", "timm+compile", "auto+compile"]}],
         "precision": "bf16", "warmup": 3, "iters": 10}
DEVICE = "cuda"  # a module constant so the CPU dry run (benchmarks/dry_run.py) can swap it


def build_vitcore(cfg: vitcore.ViTConfig, img_size: int, num_classes: int, backend: str,
                  dropout: float = 0.0) -> nn.Module:
    # No dropout by default: timm's defaults have none either, and it is noise in a speed comparison.
    cfg = cfg.replace(dropout=dropout, attention_dropout=0.0)
    return vitcore.VisionTransformer(cfg, img_size=img_size, num_classes=num_classes, backend=backend)


def build_timm(model_type: str, img_size: int, num_classes: int) -> nn.Module:
    """timm's model for `model_type` with SDPA attention in every block; ImportError/KeyError say why not."""
    import timm  # the GPU machine has it; vitcore does not depend on it

    if model_type not in TIMM_NAMES:
        raise KeyError(f"no timm model is listed for {model_type} (TIMM_NAMES)")

    model = timm.create_model(TIMM_NAMES[model_type], pretrained=False, num_classes=num_classes, img_size=img_size)
    fused = [m for m in model.modules() if hasattr(m, "fused_attn")]
    if not fused:
        raise RuntimeError("timm's attention modules have no `fused_attn` switch: cannot force SDPA")
    for m in fused:
        m.fused_attn = True  # F.scaled_dot_product_attention, whatever TIMM_FUSED_ATTN says
    return model


def make_step(model: nn.Module, compiled: bool, precision: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One fine-tuning step on (x, y), as train.finetune runs it: autocast forward, cross-entropy, backward (scaled
    in fp16), global-norm clip to 1, SGD momentum."""
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    params = [p for p in model.parameters() if p.requires_grad]
    device_type = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
    dtype = autocast_dtype(precision)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device_type, dtype=dtype, enabled=precision != "fp32"):
            logits = forward(x)  # (B, num_classes)
        scaler.scale(F.cross_entropy(logits.float(), y)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(step: Callable[[torch.Tensor, torch.Tensor], None], x: torch.Tensor, y: torch.Tensor,
               warmup: int, iters: int) -> tuple[list[float], float]:
    """(ms of each of `iters` timed steps, seconds of the `warmup` untimed ones before them)."""
    cuda = x.device.type == "cuda"
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(x, y)
    if cuda:
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    if not cuda:
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            step(x, y)
            times.append(1000 * (time.perf_counter() - t))
        return times, warm_s
    # Events on the stream, no host sync between steps: the GPU's own time per step, launch gaps included.
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        step(x, y)
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events], warm_s


def _flops():
    # FLOPs and peaks are shared with the fine-tune's MFU line.
    from vitcore import flops

    return flops


def run_variant(variant: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor,
                report_lines: list[str]) -> dict:
    """One CSV row for `variant`: timings, or a status saying why it did not run."""
    library, backend, compiled = VARIANTS[variant]
    cfg = vitcore.CONFIGS[args.model_type]
    row = _base_row(variant, args, "ok")
    model = step = None
    try:
        if library == "timm":
            model = build_timm(args.model_type, args.img_size, args.num_classes)
        else:
            model = build_vitcore(cfg, args.img_size, args.num_classes, backend, getattr(args, "dropout", 0.0))
        model = model.to(x.device).train()
        step = make_step(model, compiled, args.precision)
        if x.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, warm_s = time_steps(step, x, y, args.warmup, args.iters)
    except ImportError as e:
        row["status"] = f"{library} not installed ({e})"
    except torch.OutOfMemoryError:
        row["status"] = f"out of memory at batch {args.batch_size}"
    except Exception as e:  # one broken variant must not cost the others their rows
        traceback.print_exc()
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    else:
        ms = statistics.median(times)
        ips = args.batch_size * 1000.0 / ms
        flops = _flops()
        util = flops.mfu(ips, cfg, args.img_size, args.num_classes, device_name(), args.precision)
        row.update(ms_per_step=ms, img_per_s=ips, mfu=util if util is not None else "",
                   tflops=ips * flops.train_flops(cfg, args.img_size, args.num_classes) / 1e12,
                   spread=max(times) / min(times) - 1, warmup_s=warm_s,
                   peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if x.device.type == "cuda" else "")
        if backend == "auto" and hasattr(model, "backend_report"):
            report_lines += [f"# {args.model_type} {variant}", str(model.backend_report()).rstrip(), ""]
    finally:
        del model, step
        gc.collect()
        if compiled:
            torch._dynamo.reset()  # drop the graphs (and their memory) before the next model
        if x.device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _ratio(rows: Sequence[dict], variant: str, base: str) -> float | None:
    """img/s of `variant` over `base` among `rows` (one model's run), None unless both were measured."""
    by = {r["variant"]: r for r in rows if r.get("status") == "ok"}
    if variant in by and base in by:
        return float(by[variant]["img_per_s"]) / float(by[base]["img_per_s"])
    return None


def headline(rows: Sequence[dict], model: str | None = None, variant: str = "auto") -> str:
    """'ViT-B_16 224 px bf16 training: N img/s (M% MFU), X× timm eager, Y× timm compiled' from `variant`'s row in
    the first run of `model` (default: the first row's); what was not measured reads 'not measured'."""
    if not rows:
        return "training step: not measured"
    first = next((r for r in rows if r["model"] == (model or rows[0]["model"])), None)
    if first is None:
        return f"{model} training: not measured"
    run = lambda r: (r["model"], str(r["img_size"]), str(r["batch"]))
    rows = [r for r in rows if run(r) == run(first)]  # one run: that model at one size and batch
    what = f"{first['model']} {first['img_size']} px {first['precision']} training"
    ok = [r for r in rows if r.get("status") == "ok" and r["variant"] == variant]
    if not ok:
        return f"{what}: {variant} not measured"
    r = ok[0]
    mfu = f"{100 * float(r['mfu']):.1f}% MFU" if r["mfu"] not in ("", None) else "MFU unknown for this GPU"
    fmt = lambda v: f"{v:.2f}×" if v is not None else "not measured"
    return (f"{what}: {float(r['img_per_s']):.0f} img/s ({mfu}), {fmt(_ratio(rows, variant, 'timm'))} timm eager, "
            f"{fmt(_ratio(rows, variant, 'timm+compile'))} timm compiled")


def _cost_scale(first: dict, run: dict) -> float:
    """How much longer a variant of `run` should take than the same variant of `first` (FLOPs x batch, >= 1)."""
    flops = _flops()
    work = lambda r: flops.train_flops(vitcore.CONFIGS[r["model_type"]], r["img_size"], 10) * r["batch_size"]
    return max(1.0, work(run) / work(first))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_type", "--model-type", default="ViT-B_16", choices=list(vitcore.CONFIGS))
    p.add_argument("--img_size", "--img-size", type=int, default=224)
    p.add_argument("--batch_size", "--batch-size", type=int, default=256)
    p.add_argument("--precision", choices=list(PRECISIONS), default="bf16")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--num_classes", "--num-classes", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline_s", "--deadline-s", type=float, default=None,
                   help="start no variant that would not finish this many seconds after the start (estimated "
                        "from the first run's same variant); those get a 'skipped' row")
    p.add_argument("--quick", action="store_true",
                   help="ViT-B_16 224 px batch 256 (8 variants), then ViT-L_16 batch 128 (4), bf16, 3 + 10 steps")
    p.add_argument("--warm_only", "--warm-only", action="store_true",
                   help="only compile the torch.compile variants that hold no vitcore Triton kernel (two steps each), "
                        "so a later process finds Inductor's on-disk caches warm; nothing is timed or written")
    args = p.parse_args()
    require_cuda("bench_train_compare")
    base = {k: getattr(args, k) for k in ("model_type", "img_size", "batch_size", "variants")}
    runs = [base]
    if args.quick:
        runs = QUICK["runs"]
        args.precision, args.warmup, args.iters = QUICK["precision"], QUICK["warmup"], QUICK["iters"]
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores, as the peak table assumes
    torch.backends.cudnn.allow_tf32 = True
    if args.warm_only:
        warm_caches(runs, args)
        return
    out = os.path.join(results_dir(), "bench_train_compare.csv")
    report_path = os.path.join(results_dir(), "backend_report.txt")
    t_start = time.time()
    rows: list[dict] = []
    report_lines: list[str] = []
    wall: dict[str, float] = {}  # the first run's wall seconds per variant, for the deadline's estimates
    for i, run in enumerate(runs):
        for key in ("model_type", "img_size", "batch_size"):
            setattr(args, key, run[key])
        x, y = make_batch(args)
        scale = _cost_scale(runs[0], run)
        mine: list[dict] = []
        for variant in run["variants"]:
            estimate = wall.get(variant, 30.0) * scale
            t0 = time.time()
            if args.deadline_s is not None and t0 - t_start + estimate > args.deadline_s:
                row = _base_row(variant, args, f"skipped: about {estimate:.0f}s needed, the time cap leaves "
                                               f"{args.deadline_s - (t0 - t_start):.0f}s")
            else:
                row = run_variant(variant, args, x, y, report_lines)
                if i == 0:
                    wall[variant] = time.time() - t0
            mine.append(row)
            for r in mine:  # ratios against the baselines measured so far
                for b in ("timm", "timm+compile"):
                    ratio = _ratio(mine, r["variant"], b)
                    r[f"vs_{b}"] = ratio if ratio is not None else ""
            print(f"  {args.model_type} {variant}: {row['status']}"
                  + (f", {row['img_per_s']:.0f} img/s" if row["status"] == "ok" else "")
                  + f" ({time.time() - t0:.0f}s incl. warm-up)", flush=True)
            write_csv(out, [_full(r) for r in rows + mine])  # after every variant: a cut-short run keeps its rows
            if report_lines:
                with atomic_write(report_path, "w") as f:
                    f.write("\n".join(report_lines) + "\n")
        rows += mine
        del x, y
        cols = ("variant", "status", "ms_per_step", "img_per_s", "mfu", "vs_timm", "vs_timm+compile", "spread",
                "warmup_s", "peak_mem_gib")
        print_table([{c: str(r.get(c, ""))[:60] if c == "status" else r.get(c, "") for c in cols} for r in mine],
                    title=f"train step {args.model_type} {args.img_size}px {args.precision} batch {args.batch_size}")
    print(headline(rows))


_COLUMNS = ("model", "img_size", "batch", "precision", "variant", "library", "backend", "compiled", "status",
            "ms_per_step", "img_per_s", "tflops", "mfu", "vs_timm", "vs_timm+compile", "spread", "warmup_s",
            "peak_mem_gib")


def make_batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The one batch every variant of a run trains on, from the seed, on the device."""
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen).to(DEVICE)  # (B, 3, S, S)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen).to(DEVICE)  # (B,)
    return x, y


def warm_caches(runs: Sequence[dict], args: argparse.Namespace) -> None:
    """Compile the variants of `runs` whose torch.compile graph holds no vitcore Triton kernel (timm's, torch's, and
    auto's, which is the torch path under torch.compile), one step each, and discard the timings: Inductor's caches
    on disk are then warm for the process that measures. The Triton kernels are left out so that their autotuning
    (cached on disk too) happens only in that process, on an otherwise idle GPU."""
    args.warmup, args.iters = 1, 1
    for run in runs:
        for key in ("model_type", "img_size", "batch_size"):
            setattr(args, key, run[key])
        x, y = make_batch(args)
        for variant in run["variants"]:
            _, backend, compiled = VARIANTS[variant]
            if compiled and backend != "triton":
                t0 = time.time()
                row = run_variant(variant, args, x, y, [])
                print(f"  warmed {args.model_type} {variant}: {row['status']} ({time.time() - t0:.0f}s)", flush=True)


def _base_row(variant: str, args: argparse.Namespace, status: str) -> dict:
    library, backend, compiled = VARIANTS[variant]
    return {"model": args.model_type, "img_size": args.img_size, "batch": args.batch_size,
            "precision": args.precision, "variant": variant, "library": library, "backend": backend,
            "compiled": compiled, "status": status}


def _full(row: dict) -> dict:
    """`row` with every CSV column, in one order (a skipped row has no timings)."""
    return {c: row.get(c, "") for c in _COLUMNS}


if __name__ == "__main__":
    main()
