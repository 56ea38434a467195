#!/usr/bin/env bash
# One GPU pass, sized for a short lease (< 8 minutes on an H100): build, GPU-marked and kernel
# tests with the `thorough` hypothesis profile, then every benchmark in its --quick form.
# Usage: benchmarks/gpu_check.sh [RESULTS_DIR]   (default gpu-results/)
# Writes env.txt, build.log, tests.log, bench.log and csv.tar.gz (one CSV per benchmark) into RESULTS_DIR;
# prints a summary last.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=$(realpath -m "${1:-gpu-results}")
mkdir -p "$RESULTS"
export BENCH_OUT="$RESULTS" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# Per-step wall-clock caps (seconds) so one slow step cannot eat the lease.
TEST_BUDGET=${TEST_BUDGET:-180}
BENCH_BUDGET=${BENCH_BUDGET:-50}  # the train-step benchmark gets twice this
status=0

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'device', torch.cuda.get_device_name())"
} 2>&1 | tee "$RESULTS/env.txt"

echo "== build"
$PY -m pip install -q --no-build-isolation --no-deps -e . > "$RESULTS/build.log" 2>&1 \
  || { echo "build failed"; tail -30 "$RESULTS/build.log"; exit 1; }

echo "== tests (thorough profile: kernels in fp32/fp16/bf16, GPU-marked model tests)"
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-thorough} timeout "$TEST_BUDGET" \
  $PY -m pytest -q -x --durations=15 ${GPU_TESTS:-tests/test_attention.py tests/test_layer_norm.py tests/test_linear_gelu.py tests/test_custom_ops.py tests/test_model_triton.py tests/test_train_gpu.py} \
  > "$RESULTS/tests.log" 2>&1
rc=$?; [ $rc -ne 0 ] && status=1
echo "tests exit $rc"; tail -25 "$RESULTS/tests.log"

echo "== benchmarks"
for b in ${BENCHES:-bench_attention bench_layer_norm bench_linear_gelu bench_input_pipeline bench_train_step}; do
  echo "-- $b"
  budget=$BENCH_BUDGET; [ "$b" = bench_train_step ] && budget=$((2 * BENCH_BUDGET))
  timeout "$budget" $PY -m benchmarks.$b --quick >> "$RESULTS/bench.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && { status=1; echo "$b exit $rc"; }
done

# The lease returns at most 8 files: bundle the CSVs into one archive.
(cd "$RESULTS" && ls *.csv >/dev/null 2>&1 && tar czf csv.tar.gz *.csv && rm -f *.csv)

echo "== summary ($(tail -1 "$RESULTS/env.txt"))"
grep -v -E "^\s*$" "$RESULTS/bench.log" | tail -80
exit $status
