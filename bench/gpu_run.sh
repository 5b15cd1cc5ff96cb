#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build fastlm with its CUDA extension, run the GPU tests
# (tests/test_gpu.py, tests/test_backends.py) and the GPU benches (bench/test_gpu.py), in
# one go, with logs and the benchmark JSON in $OUT (default ./gpu-out).
#
#     OUT=gpu-out bash bench/gpu_run.sh            # then: python bench/tables.py gpu-out/gpu.json
#
# TEST_K / BENCH_K select tests / benches (pytest -k); TEST_TIMEOUT / BENCH_TIMEOUT bound each
# part (seconds).
#
# Uses the machine's python3 and its torch / triton (a CUDA build); TORCH_CUDA_ARCH_LIST
# defaults to the GPU's own compute capability.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nproc
} 2>&1 | tee "$OUT/env.txt"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi
export FASTLM_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
t0=$(date +%s)
if ! "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  grep -n -i -B2 -A6 'error' "$OUT/build.log" | head -80
  echo "BUILD FAILED"
  exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
# Built in place, not installed: the Triton kernels' folder becomes fastlm.kernels by a link
# (an install maps kernels/ to fastlm/kernels, setup.py's package_dir).
[ -e fastlm/kernels ] || ln -s ../kernels fastlm/kernels
"$PY" -c "import fastlm; print(fastlm.ops.backends_status())" 2>&1 | tee -a "$OUT/env.txt"

xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-8}")
t0=$(date +%s)
tsel=()
[ -n "${TEST_K:-}" ] && tsel=(-k "$TEST_K")
timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q -rf --tb=short -p no:cacheprovider "${xdist[@]}" "${tsel[@]}" \
  tests/test_gpu.py tests/test_backends.py >"$OUT/tests.log" 2>&1
echo "tests: rc $? in $(( $(date +%s) - t0 )) s"
grep -E '^(FAILED|ERROR)' "$OUT/tests.log" | head -40
tail -3 "$OUT/tests.log"

t0=$(date +%s)
sel=()
[ -n "${BENCH_K:-}" ] && sel=(-k "$BENCH_K")
timeout "${BENCH_TIMEOUT:-300}" "$PY" -m pytest -q -p no:cacheprovider bench/test_gpu.py --benchmark-only \
  --benchmark-json="$OUT/gpu.json" "${sel[@]}" >"$OUT/bench.log" 2>&1
echo "bench: rc $? in $(( $(date +%s) - t0 )) s"
grep -E '^(FAILED|ERROR)|Error' "$OUT/bench.log" | head -20
[ -s "$OUT/gpu.json" ] && "$PY" bench/tables.py "$OUT/gpu.json"
exit 0
