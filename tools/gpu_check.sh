#!/usr/bin/env bash
# Builds the CUDA kernels (ops/blocksparse_matmul_gpu*.cu + ops/block_layout.cc + the ctypes
# shim) into build/libbsmm_gpu.so and runs tools/gpu_check.py on the GPU of this machine.
# Needs nvcc, a CUDA GPU, python3 with PyTorch; no TensorFlow.
#
#   tools/gpu_check.sh [all|build|correctness|check|bench|quick|sparse_dot]
#     all (default): build, correctness, compute-sanitizer memcheck + racecheck, benchmark
#     check: build + compute-sanitizer only;  bench: build + benchmark only
#     quick: build + correctness + a short benchmark
#     sparse_dot: build + the sparse_dot kernels only (correctness, memcheck, racecheck, the
#       wgmma kernels side by side with mma.sync, benchmark)
# Logs and the benchmark table (bench.md) go to $OUT if set, else build/gpu_check/.
# SKIP_BUILD=1 reuses an existing build/libbsmm_gpu.so (several modes in one session).
# Exits non-zero if the build or any check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-all}
LOG_DIR=${OUT:-build/gpu_check}
mkdir -p "$LOG_DIR" build
NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; else NVCC=nvcc; fi
fi
SANITIZER=$(dirname "$("$NVCC" --version >/dev/null 2>&1 && command -v "$NVCC")")/compute-sanitizer
[ -x "$SANITIZER" ] || SANITIZER=compute-sanitizer
# Under compute-sanitizer PyTorch allocates every tensor on its own (no caching pool), so a
# read or write past a tensor's end is an error rather than a touch of the pool's next block.
SANITIZE=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER")
export PYTHONUNBUFFERED=1
status=0

step() { echo; echo "==== $* ===="; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || true

if [ "${SKIP_BUILD:-0}" = 1 ] && [ -f build/libbsmm_gpu.so ]; then
  echo "SKIP_BUILD=1: using the existing build/libbsmm_gpu.so"
else
step "build ($NVCC)"
t0=$(date +%s)
FLAGS=(-O3 -std=c++17 -Xcompiler -fPIC --threads 0 -lineinfo -Xptxas -v
       -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a -I.)
mkdir -p build/obj
: >"$LOG_DIR/build.log"
pids=()
for src in ops/block_layout.cc ops/blocksparse_matmul_gpu*.cu ops/sparse_dot_gpu.cu \
    ops/blocksparse_matmul_gpu_capi.cc; do
  obj=build/obj/$(basename "$src").o
  ( "$NVCC" "${FLAGS[@]}" -c "$src" -o "$obj" >"$obj.log" 2>&1 ) &
  pids+=($!)
done
build_ok=1
for pid in "${pids[@]}"; do wait "$pid" || build_ok=0; done
cat build/obj/*.log >>"$LOG_DIR/build.log"
if [ $build_ok = 1 ]; then
  "$NVCC" -shared build/obj/*.o -o build/libbsmm_gpu.so >>"$LOG_DIR/build.log" 2>&1 || build_ok=0
fi
if [ $build_ok = 0 ]; then
  grep -v "ptxas info" "$LOG_DIR/build.log" | tail -40
  echo "BUILD FAILED"
  exit 1
fi
echo "built build/libbsmm_gpu.so in $(( $(date +%s) - t0 )) s;" \
  "spill reports: $(grep 'spill stores' "$LOG_DIR/build.log" | grep -vc ' 0 bytes spill stores') non-zero" \
  "of $(grep -c 'bytes spill stores' "$LOG_DIR/build.log")"
fi
[ "$MODE" = build ] && exit 0

run() {  # run NAME CMD...
  local name=$1; shift
  step "$name"
  "$@" 2>&1 | tee "$LOG_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "[$name] exit code $rc"
  [ "$rc" -eq 0 ] || status=1
}

if [ "$MODE" = all ] || [ "$MODE" = correctness ] || [ "$MODE" = quick ]; then
  run correctness python3 tools/gpu_check.py --correctness
  # The mma.sync kernels where Hopper takes wgmma by default (what sm_80 GPUs run).
  run correctness_mma_sync python3 tools/gpu_check.py --correctness --tuning 3
  # As a compute capability 8.6 GPU (99 KiB of shared memory per CTA, no wgmma, no clusters).
  run correctness_sm86 python3 tools/gpu_check.py --correctness --quick --tuning 19
  run sparse_dot_correctness python3 tools/gpu_check_sparse_dot.py --correctness
fi
if [ "$MODE" = all ] || [ "$MODE" = check ]; then
  run memcheck "${SANITIZE[@]}" --tool memcheck --error-exitcode 3 python3 tools/gpu_check.py --check
  run racecheck "${SANITIZE[@]}" --tool racecheck --racecheck-report hazard --error-exitcode 3 \
    python3 tools/gpu_check.py --race
  run sparse_dot_memcheck "${SANITIZE[@]}" --tool memcheck --error-exitcode 3 \
    python3 tools/gpu_check_sparse_dot.py --check
  run sparse_dot_racecheck "${SANITIZE[@]}" --tool racecheck --racecheck-report hazard \
    --error-exitcode 3 python3 tools/gpu_check_sparse_dot.py --race
fi
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  run bench python3 tools/gpu_check.py --bench --out-md "$LOG_DIR/bench.md"
  run sparse_dot_bench python3 tools/gpu_check_sparse_dot.py --bench \
    --out-md "$LOG_DIR/bench_sparse_dot.md"
fi
if [ "$MODE" = sparse_dot ]; then
  run sparse_dot_correctness python3 tools/gpu_check_sparse_dot.py --correctness
  run sparse_dot_memcheck "${SANITIZE[@]}" --tool memcheck --error-exitcode 3 \
    python3 tools/gpu_check_sparse_dot.py --check
  run sparse_dot_racecheck "${SANITIZE[@]}" --tool racecheck --racecheck-report hazard \
    --error-exitcode 3 python3 tools/gpu_check_sparse_dot.py --race
  run sparse_dot_side_by_side python3 tools/gpu_check_sparse_dot.py --side-by-side
  run sparse_dot_bench python3 tools/gpu_check_sparse_dot.py --bench \
    --out-md "$LOG_DIR/bench_sparse_dot.md"
fi
if [ "$MODE" = quick ]; then
  run bench python3 tools/gpu_check.py --bench --quick --out-md "$LOG_DIR/bench.md"
fi
echo
[ "$status" -eq 0 ] && echo "gpu_check: ALL PASSED" || echo "gpu_check: FAILURES (see above)"
exit $status
