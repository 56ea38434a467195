#!/usr/bin/env bash
# The GPU pass of issue 14, one prepared run on an H100/H200 inside 8 minutes (cold Triton and Inductor compiles
# included): every part has its own time cap, and the caps together fit TOTAL_BUDGET.
#
#   bash benchmarks/gpu_check.sh OUT              # all parts; the device tool: timeout_s 540
#   PARTS="train" bash benchmarks/gpu_check.sh OUT   # the planned rerun of one part (names below)
#   DRY_RUN=1 bash benchmarks/gpu_check.sh OUT    # every part on the CPU with tiny shapes (tests/test_benchmarks.py)
#
# Parts, in the order they run; tests and finetune check correctness only, so they share the GPU (with the train
# part's cache warm-up and the JPEG folder's writing), and the timed parts then run one at a time:
#   tests     the GPU tests (bf16 kernels vs float64 references, model triton vs torch, auto's choices), quick
#             `ci` hypothesis profile                                                     -> tests.log
#   finetune  tests/test_train_gpu.py: 200-step fine-tunes on GPU-resident synthetic CIFAR with both backends
#             from one seed (loss curves within bf16 noise), short bf16/fp16 runs         -> finetune.log
#   train     benchmarks.bench_train_compare --quick: the ViT-B_16 training step, vitcore torch/triton/auto,
#             eager and compiled, against timm eager (SDPA) and compiled; ViT-L_16 if time is left
#   micro     bench_attention, bench_layer_norm, bench_linear_gelu --quick (ViT-B/16 and ViT-H/14 shapes)
#   input     bench_input_pipeline --quick on the GPU (CIFAR path), and over a generated JPEG folder with 16
#             workers once the script has --imagefolder                                   -> bench.log (all three)
# OUT receives at most 8 files: env.txt, tests.log, finetune.log, bench.log, summary.md (the README tables,
# from benchmarks/gpu_summary.py) and tables.tar.gz (every CSV, the loss curves, auto's report, part timings).
# Exit status: 0 when every part that ran exited 0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-gpu-results}")
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vitcore-gpu-check.XXXXXX")
TABLES="$WORK/tables"
mkdir -p "$TABLES"
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
PARTS=${PARTS:-tests finetune train micro input}
export PYTHONUNBUFFERED=1 BENCH_OUT="$TABLES" HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
export VITCORE_CACHE="$WORK/vitcore-cache"  # fresh: `auto` times its choices in this pass, and they are kept
# Seconds per part (the two correctness parts run side by side); their sum plus ~15 s stays under TOTAL_BUDGET.
# Expected on an H100/H200 (cold caches): correctness ~100 s, train ~120 s (ViT-L_16 in what is left of its cap),
# micro ~110 s, input ~50 s, env and summary ~10 s. These are estimates: no part has run on a GPU yet.
TOTAL_BUDGET=${TOTAL_BUDGET:-470}
TESTS_GPU_BUDGET=${TESTS_GPU_BUDGET:-45}    # } one after the other,
TESTS_REST_BUDGET=${TESTS_REST_BUDGET:-60}  # } beside the fine-tune
FINETUNE_BUDGET=${FINETUNE_BUDGET:-105}
TRAIN_WARM_BUDGET=${TRAIN_WARM_BUDGET:-105}  # beside the two above: compiles only
TRAIN_BUDGET=${TRAIN_BUDGET:-155}
ATTENTION_BUDGET=${ATTENTION_BUDGET:-55}
LAYER_NORM_BUDGET=${LAYER_NORM_BUDGET:-25}
LINEAR_GELU_BUDGET=${LINEAR_GELU_BUDGET:-50}
INPUT_BUDGET=${INPUT_BUDGET:-20}
INPUT_JPEG_BUDGET=${INPUT_JPEG_BUDGET:-45}
if [ "$DRY_RUN" = 1 ]; then
  BENCH="$PY -m benchmarks.dry_run benchmarks"  # CPU stand-ins, tiny shapes: the structure, not the speed
  export TRITON_INTERPRET=1
else
  BENCH="$PY -m benchmarks"
fi
START=$(date +%s)
echo "part,budget_s,wall_s,rc" > "$TABLES/parts.csv"

wants() { [[ " $PARTS " == *" $1 "* ]]; }
elapsed() { echo $(( $(date +%s) - START )); }
# cap BUDGET: the part's budget, shortened so the pass still ends inside TOTAL_BUDGET (15 s kept for the summary).
cap() { local left=$(( TOTAL_BUDGET - 15 - $(elapsed) )); echo $(( $1 < left ? $1 : left )); }

# run NAME BUDGET LOG CMD...: CMD under its time cap, output appended to LOG, one line in parts.csv.
run() {
  local name=$1 budget=$2 log=$3; shift 3
  local limit t0 rc
  limit=$(cap "$budget")
  if [ "$limit" -lt 5 ]; then
    echo "$name,$budget,0,skipped" >> "$TABLES/parts.csv"
    echo "-- $name: skipped, no time left in TOTAL_BUDGET=$TOTAL_BUDGET" | tee -a "$log"
    return 0
  fi
  t0=$(date +%s)
  echo "-- $name (cap ${limit}s, at $(elapsed)s): $*" >> "$log"
  timeout -k 5 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  [ $rc -eq 124 ] && echo "-- $name: stopped at its ${limit}s cap" >> "$log"
  echo "$name,$budget,$(( $(date +%s) - t0 )),$rc" >> "$TABLES/parts.csv"  # parts run in subshells too:
  echo "-- $name: exit $rc after $(( $(date +%s) - t0 ))s"                  # the exit status is read from here
  return 0
}

echo "== env"
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'none (no nvidia-smi)')"
  echo "clocks: $(nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader 2>/dev/null || echo unknown)"
  $PY - <<'EOF'
import hashlib, importlib, pathlib, platform
import torch
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
print("torch:", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
for name in ("triton", "timm"):
    try:
        print(f"{name}:", importlib.import_module(name).__version__)
    except ImportError:
        print(f"{name}: not installed")
print("python:", platform.python_version())
# The working tree travels without .git: a digest of the code identifies the revision measured.
code = sorted(p for d in ("kernels", "vitcore", "train", "benchmarks") for p in pathlib.Path(d).glob("*.py"))
print("code sha256:", hashlib.sha256(b"".join(p.read_bytes() for p in code)).hexdigest()[:16])
EOF
  echo "rev: ${VITCORE_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "dry run: $([ "$DRY_RUN" = 1 ] && echo "yes (CPU, tiny shapes, stand-in timer: no number here is a measurement)" || echo no)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# -- correctness, side by side -----------------------------------------------------------------------------
# The kernels' and the model's test files, and any other file with GPU-marked tests (the fine-tune's run apart).
GPU_TESTS=${GPU_TESTS:-$(for f in tests/test_attention*.py tests/test_layer_norm*.py tests/test_linear_gelu*.py \
    tests/test_custom_ops.py tests/test_model_triton.py tests/test_autobackend*.py $(grep -l "mark.gpu" tests/test_*.py)
    do [ -f "$f" ] && [ "$f" != tests/test_train_gpu.py ] && echo "$f"; done | awk '!seen[$0]++' | tr '\n' ' ')}
FINETUNE_TESTS="tests/test_train_gpu.py::test_triton_loss_curve_matches_torch_over_200_steps
tests/test_train_gpu.py::test_short_cuda_finetune_learns tests/test_train_gpu.py::test_augment_on_cuda_matches_cpu"
echo "== correctness: tests (${GPU_TESTS}) and finetune, side by side"
: > "$OUT/tests.log"; : > "$OUT/finetune.log"; : > "$OUT/bench.log"
# -v: one line per test as it ends, so a run stopped at its cap still shows what passed and failed.
PYTEST="$PY -m pytest -v -p no:cacheprovider -rfEs"
if [ "$DRY_RUN" = 1 ]; then
  # No GPU: check the selections collect (imports, names), and run the loss-curve comparison's CPU form.
  COLLECT="$PY -m pytest -q -p no:cacheprovider --collect-only"  # one node id a line
  wants tests && { run tests-gpu "$TESTS_GPU_BUDGET" "$OUT/tests.log" $COLLECT -m gpu $GPU_TESTS
    run tests-rest "$TESTS_REST_BUDGET" "$OUT/tests.log" $COLLECT -m "not gpu" $GPU_TESTS; } &
  wants finetune && { run finetune "$FINETUNE_BUDGET" "$OUT/finetune.log" $COLLECT $FINETUNE_TESTS
    run finetune-curves "$FINETUNE_BUDGET" "$OUT/finetune.log" \
      env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" $PY tests/test_train_gpu.py --dry-run; } &
else
  XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")  # Triton compiles dominate: 4 processes share them
  # The GPU-marked checks first (bf16 kernels vs float64, the bf16 model triton vs torch), then the rest of the
  # kernel and `auto` tests, which run on CUDA too when it is there.
  wants tests && { run tests-gpu "$TESTS_GPU_BUDGET" "$OUT/tests.log" $PYTEST --durations=5 $XDIST -m gpu $GPU_TESTS
    run tests-rest "$TESTS_REST_BUDGET" "$OUT/tests.log" $PYTEST --durations=10 $XDIST -m "not gpu" $GPU_TESTS; } &
  wants finetune && run finetune "$FINETUNE_BUDGET" "$OUT/finetune.log" $PYTEST --durations=5 $FINETUNE_TESTS &
fi
# Meanwhile, Inductor compiles the train part's torch.compile graphs that hold no vitcore Triton kernel (timm's,
# torch's, auto's) into its on-disk caches, so the timed part spends ~10 s per compiled variant instead of ~50; our
# kernels' autotuning stays in the timed part, on an otherwise idle GPU (a separate `auto` cache: nothing measured).
if wants train; then
  run train-warm "$TRAIN_WARM_BUDGET" "$OUT/bench.log" env VITCORE_CACHE="$WORK/warm-cache" \
    TORCHINDUCTOR_COMPILE_THREADS=8 $BENCH.bench_train_compare --quick --warm_only &
fi
# The input part's JPEG folder, written on the CPU meanwhile (ImageNet-sized photos; see benchmarks/jpeg_folder.py).
JPEGS="$WORK/jpegs"
if wants input; then
  if [ "$DRY_RUN" = 1 ]; then JPEG_ARGS="--images 32 --size 64 48 --workers 2"; else JPEG_ARGS="--images 2048"; fi
  run jpeg-folder "$TRAIN_WARM_BUDGET" "$OUT/bench.log" $PY -m benchmarks.jpeg_folder "$JPEGS" $JPEG_ARGS &
fi
wait
wants tests && grep -E "^=+ .* in [0-9.]+s" "$OUT/tests.log"
wants finetune && grep -E "^=+ .* in [0-9.]+s" "$OUT/finetune.log"

# -- timed parts, one at a time ------------------------------------------------------------------------------
if wants train; then
  echo "== train step"
  limit=$(cap "$TRAIN_BUDGET")
  # --deadline_s a little inside the cap: ViT-L_16's variants start only when they should finish in time.
  run train "$TRAIN_BUDGET" "$OUT/bench.log" $BENCH.bench_train_compare --quick \
    --deadline_s $(( limit > 30 ? limit - 10 : limit ))
fi
if wants micro; then
  echo "== microbenchmarks"
  # --no-autotune: the model runs the default tiles; the autotuned rows are the full benchmark's business.
  run attention "$ATTENTION_BUDGET" "$OUT/bench.log" $BENCH.bench_attention --quick --no-autotune
  run layer_norm "$LAYER_NORM_BUDGET" "$OUT/bench.log" $BENCH.bench_layer_norm --quick
  run linear_gelu "$LINEAR_GELU_BUDGET" "$OUT/bench.log" $BENCH.bench_linear_gelu --quick
fi
if wants input; then
  echo "== input pipeline"
  if [ "$DRY_RUN" = 1 ]; then INPUT_ARGS="--device cpu --batch_size 16 --iters 1"; WORKERS=2; PHOTOS="--photos 4"
  else INPUT_ARGS=""; WORKERS=16; PHOTOS=""; fi
  run input "$INPUT_BUDGET" "$OUT/bench.log" $PY -m benchmarks.bench_input_pipeline --quick $INPUT_ARGS
  # Each run writes bench_input_pipeline.csv: keep each under its own name.
  mv "$TABLES/bench_input_pipeline.csv" "$TABLES/input_cifar.csv" 2>/dev/null
  # The streaming path over the JPEG folder, once bench_input_pipeline has it (the data engineer's --imagefolder).
  HELP=$($PY -m benchmarks.bench_input_pipeline --help 2>&1)
  if [[ "$HELP" == *--imagefolder* ]]; then
    [[ "$HELP" == *--photos* ]] || PHOTOS=""
    run input-jpeg "$INPUT_JPEG_BUDGET" "$OUT/bench.log" $PY -m benchmarks.bench_input_pipeline --quick $INPUT_ARGS \
      --imagefolder "$JPEGS" --num_workers $WORKERS $PHOTOS
    mv "$TABLES/bench_input_pipeline.csv" "$TABLES/input_jpeg.csv" 2>/dev/null
  else
    echo "input-jpeg,0,0,missing" >> "$TABLES/parts.csv"
    echo "-- input-jpeg: bench_input_pipeline has no --imagefolder yet: the JPEG-folder row is not measured" \
      | tee -a "$OUT/bench.log"
  fi
fi

# -- tables --------------------------------------------------------------------------------------------------
status=$(awk -F, 'NR > 1 && $4 != "0" && $4 != "skipped" && $4 != "missing" { bad = 1 } END { print bad ? 1 : 0 }' \
  "$TABLES/parts.csv")
[ -d "$VITCORE_CACHE" ] && cp -r "$VITCORE_CACHE" "$TABLES/vitcore-cache"
$PY -m benchmarks.gpu_summary "$OUT" "$TABLES" > "$WORK/summary.md" 2> "$WORK/summary.err" \
  || { status=1; echo "summary failed:"; cat "$WORK/summary.err"; }
cp "$WORK/summary.md" "$OUT/summary.md"
tar czf "$OUT/tables.tar.gz" -C "$TABLES" .
n=$(find "$OUT" -type f | wc -l)
[ "$n" -gt 8 ] && { echo "OUT holds $n files: the lease returns at most 8"; status=1; }
echo "== summary (total $(elapsed)s of TOTAL_BUDGET=${TOTAL_BUDGET}s; exit $status)"
cat "$OUT/summary.md"
rm -rf "$WORK"
exit $status
