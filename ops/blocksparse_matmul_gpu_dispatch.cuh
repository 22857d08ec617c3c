// Tile configurations and launch code of the tensor-core kernels, included once per element
// type by blocksparse_matmul_gpu_{f32,f16,bf16}.cu (so the three compile in parallel).
#ifndef BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_DISPATCH_CUH_
#define BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_DISPATCH_CUH_

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "ops/block_layout.h"
#include "ops/blocksparse_matmul_gpu_gradw_small_batch.cuh"
#include "ops/blocksparse_matmul_gpu_internal.cuh"
#include "ops/blocksparse_matmul_gpu_mma.cuh"
#include "ops/blocksparse_matmul_gpu_wgmma.cuh"

namespace blocksparse {
namespace gpu {
namespace internal {

using mma_impl::Config;
using mma_impl::kForward;
using mma_impl::kGradW;
using mma_impl::Params;

// Batches up to this size use the small-batch forward tiles (BM = 64).
constexpr int64_t kSmallBatch = 64;

// Forward tiles: <T, mode, FA, BS, BM, BN, blocks per step, warps M x N x K, stages>.
// Small batches with bs 32: six stages for 16-bit inputs, three for float32, not four.
// Measured on an H100 (N = 64, C = K = 4096, feature axis 1, medians of three): three stages
// against four, bfloat16 forward 18-23% faster at 10-100% density (43.3 -> 35.9 us at 100%),
// float32 0-10% (108.0 -> 101.1 us).  On an H200 (2026-12-01, the same problem, fastest of
// three medians, variants alternated in one process): six stages against three, bfloat16
// 1.00-1.11x (11.6 -> 10.5 us at 10%, 16.1 -> 15.1 at 25%), float16 1.00-1.11x, float32
// 0.94-1.11x (kept at three); four stages 0.82-0.89x.  bs 16 and 64 keep four stages (six
// measured 0.92-1.07x and 0.77-0.99x at 5-100% density).
template <typename T, int FA, int BS, bool kSmall, bool kF32 = (sizeof(T) == 4)>
struct FwdCfg;
// 16-bit inputs (m16n8k16).
template <typename T, int FA> struct FwdCfg<T, FA, 16, false, false> { using type = Config<T, kForward, FA, 16, 128, 16, 4, 4, 1, 1, 3>; };
template <typename T, int FA> struct FwdCfg<T, FA, 16, true, false> { using type = Config<T, kForward, FA, 16, 64, 16, 4, 4, 1, 1, 4>; };
template <typename T, int FA> struct FwdCfg<T, FA, 32, false, false> { using type = Config<T, kForward, FA, 32, 128, 32, 2, 4, 1, 1, 3>; };
template <typename T, int FA> struct FwdCfg<T, FA, 32, true, false> { using type = Config<T, kForward, FA, 32, 64, 32, 2, 2, 2, 1, 6>; };
template <typename T, int FA> struct FwdCfg<T, FA, 64, false, false> { using type = Config<T, kForward, FA, 64, 128, 64, 1, 2, 2, 1, 4>; };
template <typename T, int FA> struct FwdCfg<T, FA, 64, true, false> { using type = Config<T, kForward, FA, 64, 64, 64, 1, 2, 2, 1, 4>; };
// 16-bit tiles with BM = 256 rows (half the weight traffic per flop of BM = 128, but fewer
// CTAs per SM).  Measured on an H200 (docs/benchmarks_gpu.md): 2-17% faster for bs 32 with
// feature axis 1 (the default there), slower for bs 64 and for feature axis 0.
// SetTuning(1) swaps the default and the alternative, for benchmarking.
template <typename T, int FA, int BS> struct FwdCfgWide;
template <typename T, int FA> struct FwdCfgWide<T, FA, 32> { using type = Config<T, kForward, FA, 32, 256, 32, 2, 8, 1, 1, 2>; };
template <typename T, int FA> struct FwdCfgWide<T, FA, 64> { using type = Config<T, kForward, FA, 64, 256, 64, 1, 4, 2, 1, 2>; };
// SetTuning(2), bs 64: 32 x 32 warp tiles (8 warps, 3 stages) instead of the default 64 x 32
// (4 warps, 4 stages; measured equal to 10% faster on an H200).
template <typename T, int FA> struct FwdCfgWarp64 { using type = Config<T, kForward, FA, 64, 128, 64, 1, 4, 2, 1, 3>; };
// float32 (3xTF32, m16n8k8).
template <typename T, int FA> struct FwdCfg<T, FA, 16, false, true> { using type = Config<T, kForward, FA, 16, 128, 16, 2, 4, 1, 1, 4>; };
// bs 16 with more than kF32Bs16WideMinBatch rows: 256 batch rows, one block per step, 64 x 16
// warp tiles, two stages.  Measured on an H200 (C = K = 4096, the tile sets alternated in one
// process; docs/benchmarks_gpu.md) against the 128-row tiles above: N = 4096, 1.21-1.53x
// faster with feature axis 1 and 1.17-1.48x with feature axis 0 at 2-100% density (a warp's
// weight fragments, split into TF32 parts, serve 64 rows, not 32); N = 192 to 1024 at 10% and
// 50%, 1.00-1.30x; but N = 80 and 128, 0.63-0.85x (most of a 256-row tile computes nothing).
template <typename T, int FA> struct FwdCfgF32Bs16Wide { using type = Config<T, kForward, FA, 16, 256, 16, 1, 4, 1, 1, 2>; };
constexpr int64_t kF32Bs16WideMinBatch = 128;
// bs 16 with 65 to kF32Bs16WideMinBatch rows, feature axis 1: 128 rows, two blocks per step,
// four warps of 64 x 16 (two row halves, each block of a step to its own warp, their sums
// added at the end), three stages.  Measured on an H200 (C = K = 4096, 2-100% density, the
// tile sets alternated in one process) against the 128-row tiles of four warps of 32 x 16:
// N = 80 1.10-1.20x faster, N = 128 1.10-1.15x.  With feature axis 0 it measured 0.96-1.04x,
// so that axis keeps the 32 x 16 warps.
template <typename T, int FA> struct FwdCfgF32Bs16Mid { using type = Config<T, kForward, FA, 16, 128, 16, 2, 2, 1, 2, 3>; };
template <typename T, int FA> struct FwdCfg<T, FA, 16, true, true> { using type = Config<T, kForward, FA, 16, 64, 16, 2, 4, 1, 1, 4>; };
// bs 16 with small batches (N <= kSmallBatch), the default above (four warps of 16 x 16) but:
// from kF32Bs16SmallDenseMinBlocksPerColumn blocks per column, two warps of 64 x 16, each
// taking one block of a step (FwdCfgF32Bs16SmallDense); below that with feature axis 0, four
// warps of 32 x 16 taking two of a step's four blocks each, three stages
// (FwdCfgF32Bs16SmallFa0).  Measured on an H200 (C = K = 4096, N = 16 / 32 / 64, the tile sets
// alternated in one process) against the default: the first 1.07-1.31x faster with feature axis
// 1 and 1.12-1.19x with feature axis 0 at 25-100% density (64 and more blocks per column), but
// 0.88-1.08x at 2-10%; the second 1.02-1.12x with feature axis 0 at 2-10% but for one cell
// (0.96x).  With feature axis 1 at 2-10% none of five tile sets beat the default by more than
// 1.08x in every cell.
template <typename T, int FA> struct FwdCfgF32Bs16SmallDense { using type = Config<T, kForward, FA, 16, 64, 16, 2, 1, 1, 2, 4>; };
template <typename T, int FA> struct FwdCfgF32Bs16SmallFa0 { using type = Config<T, kForward, FA, 16, 64, 16, 4, 2, 1, 2, 3>; };
constexpr double kF32Bs16SmallDenseMinBlocksPerColumn = 40.0;
// bs 32: two stages, not four.  Measured on an H200 (C = K = 4096, the stage counts alternated
// in one process): N = 4096 1.05-1.21x faster at 2-100% density, both feature axes (2% 112.1 ->
// 92.8 us, 100% 3.29 -> 3.13 ms with feature axis 1); N = 512 1.02-1.06x; three stages 0.92-1.13x.
template <typename T, int FA> struct FwdCfg<T, FA, 32, false, true> { using type = Config<T, kForward, FA, 32, 128, 32, 1, 4, 1, 1, 2>; };
template <typename T, int FA> struct FwdCfg<T, FA, 32, true, true> { using type = Config<T, kForward, FA, 32, 64, 32, 1, 2, 2, 1, 3>; };
template <typename T, int FA> struct FwdCfg<T, FA, 64, false, true> { using type = Config<T, kForward, FA, 64, 64, 64, 1, 2, 2, 1, 3>; };
// bs 64 from kF32Bs64TallMinBatch rows (columns not very sparse): 128 rows on four warps of
// 64 x 32, two stages, against the 64-row tiles above.  Measured on an H200 (C = K = 4096, the
// tile sets alternated in one process): N = 4096 1.13-1.20x faster with feature axis 1 and
// 1.05-1.20x with feature axis 0 at 5-100% density; N = 2048 1.08x at 5-10%, 1.14x at 50%; but
// N = 1024 0.91-0.99x at 2-10% and N = 512 0.75-0.99x there (too few tiles for the SMs), and
// at 2% density (1.3 blocks per column, where the 64-row tiles take two stages) 0.88-0.97x.
template <typename T, int FA> struct FwdCfgF32Bs64Tall { using type = Config<T, kForward, FA, 64, 128, 64, 1, 2, 2, 1, 2>; };
constexpr int64_t kF32Bs64TallMinBatch = 2048;
template <typename T, int FA> struct FwdCfg<T, FA, 64, true, true> { using type = Config<T, kForward, FA, 64, 64, 64, 1, 2, 2, 1, 3>; };

// GradW tiles: <.., BS, BM, BN, batch rows per step, warps, stages>.  BM = G * BS groups G
// stored blocks of one block column per tile (they share the dy slab).
template <typename T, int FA, int BS, bool kF32 = (sizeof(T) == 4)>
struct GradCfg;
template <typename T, int FA> struct GradCfg<T, FA, 16, false> { using type = Config<T, kGradW, FA, 16, 64, 16, 64, 4, 1, 2, 4>; };
template <typename T, int FA> struct GradCfg<T, FA, 32, false> { using type = Config<T, kGradW, FA, 32, 64, 32, 64, 2, 2, 2, 4>; };
template <typename T, int FA> struct GradCfg<T, FA, 64, false> { using type = Config<T, kGradW, FA, 64, 128, 64, 64, 4, 2, 1, 3>; };
template <typename T, int FA> struct GradCfg<T, FA, 16, true> { using type = Config<T, kGradW, FA, 16, 64, 16, 32, 2, 1, 2, 4>; };
template <typename T, int FA> struct GradCfg<T, FA, 32, true> { using type = Config<T, kGradW, FA, 32, 64, 32, 64, 2, 1, 2, 3>; };
// float32 bs 64: four warps of 64 x 32 for pairs of blocks (grouped) and of 32 x 32 for single
// blocks, where eight warps (pairs: 32 x 32 tiles; singles: two splitting each step's rows) ran
// before.  Measured on an H200 (C = K = 4096, dW, the tile sets alternated in one process):
// pairs at 100% density 1.21x faster with feature axis 1 and 1.12x with 0 at N = 4096, 1.19-1.24x
// at N = 512 / 1000; singles 1.07-1.09x at 5-50% density with feature axis 1, 1.07-1.12x with 0,
// 1.39-1.43x at 2%, 1.08-1.14x at N = 512 / 1000 / 16384 (64-row steps or two stages: within 3%).
template <typename T, int FA> struct GradCfg<T, FA, 64, true> { using type = Config<T, kGradW, FA, 64, 128, 64, 32, 2, 2, 1, 3>; };

// float32 bs 32 (3xTF32) uses 32 x 32 warp tiles in both: each warp splits every operand
// fragment it loads into two TF32 parts, and a 32 x 32 tile (2 x 4 MMA tiles) does 24 MMAs per
// 16 fragments split where 16 x 16 or 32 x 16 tiles did 6 per 8 or 12 per 12.  Measured on an
// H200 (C = K = 4096, dW time over the forward's, both feature axes, the tile sets alternated
// in one process), against 16 x 16 warp tiles (one block) and 32 x 16 (groups of two): N = 4096
// at 5 / 10 / 25 / 50 / 100% density, feature axis 1: 1.41 / 1.49 / 1.56 / 1.39 / 1.30 ->
// 1.01 / 1.02 / 1.08 / 1.09 / 1.09; feature axis 0: 1.27 / 1.34 / 1.41 / 1.22 / 1.22 -> 1.00 /
// 1.05 / 1.07 / 1.06 / 1.05.  Single blocks split each 64-row step over 4 warps, 2 stages (3
// stages, 4, or 32-row steps took up to 1.18x, 1.48x, 1.15x as long); groups of 4 blocks were
// 1-2% faster at 100% but 7-14% slower at 25-50% (docs/benchmarks_gpu.md).

// Ungrouped (one stored block per tile): better when block columns hold few blocks, since a
// grouped tile whose blocks fall in different columns makes one pass per column.
template <typename T, int FA, int BS, bool kF32 = (sizeof(T) == 4)>
struct GradCfgSingle;
template <typename T, int FA> struct GradCfgSingle<T, FA, 16, false> { using type = Config<T, kGradW, FA, 16, 16, 16, 128, 1, 1, 4, 4>; };
template <typename T, int FA> struct GradCfgSingle<T, FA, 32, false> { using type = Config<T, kGradW, FA, 32, 32, 32, 64, 2, 2, 2, 4>; };
template <typename T, int FA> struct GradCfgSingle<T, FA, 64, false> { using type = Config<T, kGradW, FA, 64, 64, 64, 64, 2, 2, 2, 3>; };
template <typename T, int FA> struct GradCfgSingle<T, FA, 16, true> { using type = Config<T, kGradW, FA, 16, 16, 16, 64, 1, 1, 4, 4>; };
template <typename T, int FA> struct GradCfgSingle<T, FA, 32, true> { using type = Config<T, kGradW, FA, 32, 32, 32, 64, 1, 1, 4, 2>; };
template <typename T, int FA> struct GradCfgSingle<T, FA, 64, true> { using type = Config<T, kGradW, FA, 64, 64, 64, 32, 2, 2, 1, 3>; };
// Average blocks per block column from which grouped tiles were faster (H200 measurements in
// docs/benchmarks_gpu.md).
template <typename T, int BS>
constexpr double GroupedGradMinBlocksPerColumn() {
  if (sizeof(T) == 4) return BS == 16 ? 40.0 : 48.0;
  return BS == 16 ? 8.0 : 24.0;
}

// float32 bs 16 (GradCfg above): groups of four blocks on warp tiles of 32 x 16 (two blocks;
// four warps, a step's batch rows split between two), and from 96 blocks per column groups of
// eight on four warps of 32 x 16.  Measured on an H200 (N = 4096, C = K = 4096, the tile sets
// alternated in one process; time against the default of then: single blocks below 48 blocks
// per column, else groups of four on eight warps of 16 x 16): four-block groups 1.11-1.17x
// faster at 10% density (25.6 blocks per column), 1.23-1.31x at 25%, 0.90-0.96x at 5%;
// eight-block groups 1.27-1.31x at 50% and 1.32-1.40x at 100%, against 1.15-1.27x for the
// four-block groups there.  The four-block groups start at 40 blocks per column, since pairs
// (below) measured faster at 10% and 15% density.
template <typename T, int FA> struct GradCfgF32Bs16Group8 { using type = Config<T, kGradW, FA, 16, 128, 16, 32, 4, 1, 1, 3>; };
constexpr double kGradF32Bs16Group8MinBlocksPerColumn = 96.0;
// float32 bs 16 from kGradF32Bs16PairMinBlocksPerColumn blocks per column to the grouped
// tiles' threshold: pairs of blocks of a column on one warp tile of 32 x 16, four warps
// splitting each step's 64 batch rows, three stages.  Measured on an H200 (N = 4096, C = K =
// 4096, the tile sets alternated in one process) against single blocks at 5% density (12.8
// blocks per column), 1.11x faster with feature axis 1 and 1.18x with 0, and against groups of
// four at 10% (25.6), 1.08x and 1.02x; at 2% (5.1) 0.80-0.83x the singles' speed, at 25% (64)
// 0.94-0.95x the groups of four.  A sweep of 2-25% density (N = 4096 and 512, both feature
// axes) placed the changes between 5.1 and 10.2 blocks per column (even at 7.7) and between
// 38 and 51.
template <typename T, int FA> struct GradCfgF32Bs16Pair { using type = Config<T, kGradW, FA, 16, 32, 16, 64, 1, 1, 4, 3>; };
constexpr double kGradF32Bs16PairMinBlocksPerColumn = 8.0;

// 16-bit bs 32 with dense columns: four blocks of a column per tile (five slabs read for four
// blocks instead of four for two).  Measured on an H200 (bf16, feature axis 1), dW time over
// the forward's: N=4096, C=K=4096: 1.37 -> 1.26 at 25% density, 1.35 -> 1.14 at 50%;
// N=16384, C=K=8192: 1.61 -> 1.42 and 1.75 -> 1.46; slower than two-block tiles below about
// 32 blocks per column (1.48 -> 1.88 at 10%, 12.8 blocks per column).
template <typename T, int FA> struct GradCfgGroup4 { using type = Config<T, kGradW, FA, 32, 128, 32, 64, 4, 1, 1, 3>; };
constexpr double kGradGroup4MinBlocksPerColumn = 32.0;

// Short batches (N <= kShortGradBatch): one block per tile and two stages, so many more CTAs
// fit on an SM; not for 16-bit bs 32 and 64, where the long-batch tiles (grouped when the
// columns are dense) were faster.  Measured on an H200 (C = K = 4096, medians of three), dW
// time over the forward's: N = 64, bf16 bs 32 at 25 / 50 / 100% density 1.34 / 1.61 / 2.02
// (short tiles) against 1.12 / 1.22 / 1.37 (long-batch tiles); N = 256, bf16 bs 16 at 100%
// 1.65 against 1.15, float32 bs 32 1.83 against 1.52; short tiles stay ahead at N = 64 for
// bs 16 (bf16 1.15 against 1.38 at 10%) and for float32 bs 64 (0.96 against 1.14 at 100%).
template <typename T, int FA, int BS, bool kF32 = (sizeof(T) == 4)>
struct GradCfgShort;
template <typename T, int FA> struct GradCfgShort<T, FA, 16, false> { using type = Config<T, kGradW, FA, 16, 16, 16, 64, 1, 1, 4, 2>; };
template <typename T, int FA> struct GradCfgShort<T, FA, 32, false> { using type = Config<T, kGradW, FA, 32, 32, 32, 64, 2, 2, 2, 2>; };
template <typename T, int FA> struct GradCfgShort<T, FA, 64, false> { using type = Config<T, kGradW, FA, 64, 64, 64, 64, 2, 2, 2, 2>; };
template <typename T, int FA> struct GradCfgShort<T, FA, 16, true> { using type = Config<T, kGradW, FA, 16, 16, 16, 32, 1, 1, 4, 2>; };
template <typename T, int FA> struct GradCfgShort<T, FA, 32, true> { using type = Config<T, kGradW, FA, 32, 32, 32, 32, 2, 2, 2, 2>; };
template <typename T, int FA> struct GradCfgShort<T, FA, 64, true> { using type = Config<T, kGradW, FA, 64, 64, 64, 32, 2, 2, 2, 2>; };
constexpr int64_t kShortGradBatch = 64;


// The same tiles with another pipeline depth.
template <typename C, int NS>
struct WithStages;
template <typename T, int M, int F, int B, int BM, int BN, int KS, int WM, int WN, int WK, int ST,
          bool TW, int NS>
struct WithStages<Config<T, M, F, B, BM, BN, KS, WM, WN, WK, ST, TW>, NS> {
  using type = Config<T, M, F, B, BM, BN, KS, WM, WN, WK, NS, TW>;
};
// The same forward tiles reading w's blocks transposed as stored (kTransW), or as they are.
template <typename C, bool kTransW>
struct WithTransposedW;
template <typename T, int M, int F, int B, int BM, int BN, int KS, int WM, int WN, int WK, int ST,
          bool TW, bool kTransW>
struct WithTransposedW<Config<T, M, F, B, BM, BN, KS, WM, WN, WK, ST, TW>, kTransW> {
  using type = Config<T, M, F, B, BM, BN, KS, WM, WN, WK, ST, kTransW>;
};

// Cluster split: with too few tiles to fill the GPU, let 2, 4 or 8 CTAs share each tile, as
// long as all CTAs still fit on the GPU at once (`capacity` = resident CTAs per SM x SMs) and
// each still gets at least one step on average; at most max_split.  Depends only on the
// problem sizes and the device, so repeated runs split identically.
inline int ChooseSplit(int64_t tiles, double avg_steps, int64_t capacity, const DeviceInfo& di,
                       int max_split = 8) {
  if (di.cc_major < 9) return 1;
  int s = 1;
  while (s < max_split && tiles * 2 * s <= capacity && 2.0 * s <= avg_steps) s *= 2;
  return s;
}

// Raises `kernel`'s dynamic shared memory limit to smem where needed and returns how many
// of its CTAs fit on one SM (at least 1); both cached per device.  Tag: one type per kernel.
template <typename Tag, typename KernelParams>
int PrepareKernel(void (*kernel)(KernelParams), int threads, int smem, int device,
                  const DeviceInfo& di, int* per_sm) {
  if (smem > di.max_smem_optin) return cudaErrorInvalidConfiguration;
  if (smem > 48 * 1024) {
    static std::atomic<uint64_t> done{0};  // one bit per device
    const uint64_t bit = 1ull << device;
    if (!(done.load() & bit)) {
      cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           smem);
      if (e != cudaSuccess) return e;
      done.fetch_or(bit);
    }
  }
  static std::atomic<int> resident[64];  // per device; 0: not queried yet
  int n = resident[device].load();
  if (n == 0) {
    cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem);
    if (e != cudaSuccess) return e;
    if (n < 1) n = 1;
    resident[device].store(n);
  }
  *per_sm = n;
  return cudaSuccess;
}

// The Params inside a kernel's parameters (Params itself, or the narrow forward's NarrowParams).
inline Params& BaseParams(Params& p) { return p; }
inline Params& BaseParams(wgmma_impl::NarrowParams& p) { return p.base; }
inline Params& BaseParams(wgmma_impl::SmallBatchParams& p) { return p.narrow.base; }
inline Params& BaseParams(wgmma_impl::GroupedParams& p) { return p.narrow.base; }

// Whether the small-batch forward takes its CTAs' runs from the launch's parameters where the
// host passed col_ptr (SetTuning(43): no).  Measured on an H200 (2026-12-07, bf16, C = K =
// 4096, N = 64 unless noted, `tools/gpu_variants.py`, the two alternated in one process,
// fastest of five medians, results equal bit for bit; us, from col_ptr -> from the
// parameters): bs 64 at 2% 6.8 -> 6.6, 10% 8.4 -> 8.1, 25% 12.9 -> 12.5, 100% 18.1 -> 17.7;
// feature axis 0 at 10% 9.5 -> 9.0; bs 32 at 2% 6.8 -> 6.4, 25% 11.3 -> 10.9; N = 16, bs 64
// at 100% 16.7 -> 16.2 (0.93-0.99x the time in every cell).
constexpr int kTuningNoRunStarts = 43;
inline bool RunStartsEnabled() { return Tuning() != kTuningNoRunStarts; }

// Fills `runs` for a grid of `tiles` block columns, each split over `split` CTAs, from the
// host's col_ptr of a layout of `blocks` blocks (with split 1: the list bounds themselves);
// leaves none (ctas 0: the kernel reads col_ptr) where there is no host copy, the grid has more
// CTAs than RunStarts holds, or the copy is not a valid list of bounds.
inline void FillRunStarts(wgmma_impl::RunStarts* runs, const int32_t* col_ptr, int64_t blocks,
                          int64_t tiles, int split) {
  runs->ctas = 0;
  if (col_ptr == nullptr || tiles * split > wgmma_impl::RunStarts::kMaxCtas) return;
  for (int64_t k = 0; k < tiles; ++k) {
    const int64_t beg = col_ptr[k], count = col_ptr[k + 1] - beg;
    if (beg < 0 || count < 0 || col_ptr[k + 1] > blocks) return;
    for (int r = 0; r < split; ++r)  // as ColumnRun computes them from col_ptr
      runs->start[k * split + r] = static_cast<int32_t>(beg + r * count / split);
  }
  runs->start[tiles * split] = col_ptr[tiles];
  runs->ctas = static_cast<int32_t>(tiles * split);
}
// Kernel parameters that depend on the cluster split: only SmallBatchParams' RunStarts.
template <typename KernelParams>
inline void SetSplit(KernelParams&, int64_t, int) {}
inline void SetSplit(wgmma_impl::SmallBatchParams& p, int64_t tiles, int split) {
  if (RunStartsEnabled())
    FillRunStarts(&p.runs, p.narrow.base.host_col_ptr, p.narrow.base.blocks, tiles, split);
  else
    p.runs.ctas = 0;
}

// Launches `kernel` (threads per CTA, dynamic shared memory) on a grid of tiles x batch_tiles
// CTAs, each tile split over a cluster of ChooseSplit() CTAs (pass avg_steps 0 for kernels
// that cannot split).  Tag: one type per kernel, keying the per-device caches.
template <typename Tag, typename KernelParams>
int LaunchTiles(void (*kernel)(KernelParams), int threads, int smem, int64_t tiles,
                int64_t batch_tiles, double avg_steps, const KernelParams& p0, int device,
                const DeviceInfo& di, cudaStream_t s, int64_t working_tiles = -1,
                int max_split = 8) {
  int per_sm = 0;
  cudaError_t e0 = static_cast<cudaError_t>(
      PrepareKernel<Tag>(kernel, threads, smem, device, di, &per_sm));
  if (e0 != cudaSuccess) return e0;
  if (tiles <= 0 || batch_tiles <= 0) return cudaSuccess;
  // working_tiles: how many of the tiles have work, for kernels launched on a bound.
  const int split = ChooseSplit(working_tiles >= 0 ? working_tiles : tiles * batch_tiles,
                                avg_steps, (int64_t)per_sm * di.sm_count, di, max_split);
  if (tiles * split > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  KernelParams p = p0;
  SetSplit(p, tiles, split);
  for (int64_t base = 0; base < batch_tiles; base += 65535) {
    const int64_t gy = batch_tiles - base < 65535 ? batch_tiles - base : 65535;
    BaseParams(p).n_tile_base = base;
    const dim3 grid(static_cast<unsigned>(tiles * split), static_cast<unsigned>(gy));
    cudaError_t e;
    if (split == 1) {
      kernel<<<grid, threads, smem, s>>>(p);
      e = cudaGetLastError();
    } else {
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = grid;
      cfg.blockDim = dim3(threads);
      cfg.dynamicSmemBytes = smem;
      cfg.stream = s;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = split;
      attr[0].val.clusterDim.y = 1;
      attr[0].val.clusterDim.z = 1;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      e = cudaLaunchKernelEx(&cfg, kernel, p);
    }
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// Launches the mma.sync tiles Cfg; on a GPU that allows a CTA less shared memory than Cfg's
// pipeline takes (some bs-64 tiles need 104-108 KiB), the same tiles with one stage fewer, down
// to two.  Only tiles above kSmallestSmemOptin get the shallower copies compiled.  Fewer
// stages change when data arrives, not the sums: the results are the same bit for bit.
template <typename Cfg>
int LaunchMma(const Params& p, int64_t tiles, int64_t batch_tiles, double avg_steps,
              int device, const DeviceInfo& di, cudaStream_t s) {
  if constexpr (Cfg::kStages > 2 && Cfg::kSmemBytes > kSmallestSmemOptin) {
    if (Cfg::kSmemBytes > di.max_smem_optin) {
      return LaunchMma<typename WithStages<Cfg, Cfg::kStages - 1>::type>(
          p, tiles, batch_tiles, avg_steps, device, di, s);
    }
  }
  return LaunchTiles<Cfg>(mma_impl::BlocksparseMmaKernel<Cfg>, Cfg::kThreads, Cfg::kSmemBytes,
                          tiles, batch_tiles, avg_steps, p, device, di, s);
}

// How many consecutive block columns one CTA of the float32 mma.sync forward computes (see
// BlocksparseMmaKernel; 1: a CTA per output tile).  Tiles that qualify: one block per step,
// a whole block wide, y (N, K), no split of the steps over warps.  Two columns per CTA for bs
// 32 / 64 from kColumnRunsMinBatch rows where columns hold at most kColumnRunsMaxBlocks blocks:
// there a tile's few steps leave its pipeline fill and its stores exposed.  Measured on an H100
// (C = K = 4096, feature axis 1, the variants alternated in one process, fastest of two
// medians; us, one column per CTA -> two / four / eight): N = 4096 at 2% bs 32 95.9 -> 85.7 /
// 87.1 / 91.0, bs 64 92.8 -> 77.4 / 83.8 / 87.9; bs 64 at 5% 176.8 -> 167.9 / 187.1 / 183.8;
// from 10% within 0.98-1.04x for two columns, up to 1.11x slower for more; bs 16 slower
// everywhere (two columns 1.00-1.05x the time, eight 1.08-1.52x); N = 1024 bs 32 at 2% 32.8 ->
// 33.6 (two), N = 512 bs 64 at 5% 38.7 -> 40.0 (too few CTAs to gain); N = 16384, C = K = 8192,
// bs 32 at 2% 1122 -> 1075.
constexpr int64_t kColumnRunsMinBatch = 2048;
constexpr double kColumnRunsMaxBlocks = 4.0;
template <typename Cfg>
int64_t ForwardColumnsPerCta(int64_t N, double blocks_per_col) {
  constexpr bool kQualifies = Cfg::kF32 && Cfg::kBPS == 1 && Cfg::kBN == Cfg::kBS &&
                              !Cfg::kCMContig && Cfg::kWK == 1;
  if (!kQualifies) return 1;
  switch (Tuning()) {
    case 15: return 2;
    case 16: return 4;
    case 17: return 8;
    case 18: return 1;
    default:
      return Cfg::kBS >= 32 && N >= kColumnRunsMinBatch && blocks_per_col <= kColumnRunsMaxBlocks
                 ? 2
                 : 1;
  }
}

// The mma.sync forward: one CTA per (output tile, batch tile), an output tile BN columns of one
// block column; or one CTA per run of ForwardColumnsPerCta block columns and batch tile.
// kTransW: p.w holds the transposes of the product's blocks, read so.
template <typename Cfg, bool kTransW>
int LaunchMmaForward(const Params& p, int64_t N, int64_t KB, double blocks_per_col, int device,
                     const DeviceInfo& di, cudaStream_t s) {
  using Tiles = typename WithTransposedW<Cfg, kTransW>::type;
  const int64_t batch_tiles = (N + Cfg::kBM - 1) / Cfg::kBM;
  const int64_t runs = ForwardColumnsPerCta<Tiles>(N, blocks_per_col);
  if (runs > 1) {  // no cluster split (avg_steps 0): the kernel's column runs need split 1
    Params q = p;
    q.columns_per_cta = runs;
    return LaunchMma<Tiles>(q, (KB + runs - 1) / runs, batch_tiles, 0.0, device, di, s);
  }
  return LaunchMma<Tiles>(p, KB * (Cfg::kBS / Cfg::kBN), batch_tiles, blocks_per_col / Cfg::kBPS,
                          device, di, s);
}

// The mma.sync dW: one CTA per tile, a tile kGroup stored blocks (grouped configurations) or a
// BM x BN part of one block, its steps walking the batch.
template <typename Cfg>
int LaunchMmaGradW(const Params& p, int64_t N, int64_t blocks, int device, const DeviceInfo& di,
                   cudaStream_t s) {
  const int64_t tiles = Cfg::kGroup > 1
                            ? (blocks + Cfg::kGroup - 1) / Cfg::kGroup
                            : blocks * (Cfg::kBS / Cfg::kBM) * (Cfg::kBS / Cfg::kBN);
  return LaunchMma<Cfg>(p, tiles, 1, static_cast<double>((N + Cfg::kKS - 1) / Cfg::kKS), device,
                        di, s);
}

// The wgmma kernels (ops/blocksparse_matmul_gpu_wgmma.cuh): 16-bit, on sm_90; N > 64 but for
// the bs-16 dW with full columns and the bs-32 / bs-64 forwards.
// bs-64 forward with 64 < N < kBs64NarrowMinBatch (above that the narrow kernel runs it, see
// LaunchWgmmaForwardBs64Narrow): one warpgroup per 128 batch rows and 4 stages (97 KiB of
// shared memory, so two CTAs share an SM) measured fastest on an H200 (bf16, feature axis 1)
// among 128 / 256 rows per warpgroup, one or two warpgroups, and 4 or 5 stages.
using WgmmaFwdCfg = wgmma_impl::FwdCfg<4>;
// Keys the per-device caches of PrepareKernel / LaunchTiles for kernels that are not
// BlocksparseMmaKernel: element type, configuration, and a kind (the feature axis plus 0 for
// the bs-64 wgmma forward, 10 the narrow wgmma forward, 20 the wgmma dW, 30 the small-batch dW,
// 40 the bs-64 wgmma forward reading w transposed, 50 the wgmma dW on the copy engine).
template <typename T, class Cfg, int kKind>
struct KernelTag {};

inline bool UseWgmma(int64_t N, const DeviceInfo& di) {
  return WgmmaEnabled(di) && N > kSmallBatch;
}

// Up to 16 waves of tiles, persistent CTAs (as many as fit on the GPU at once, each looping
// over tiles: the next tile's copies overlap a tile's epilogue and pipeline fill); beyond
// that, one CTA per tile (fresh CTAs balance the load).  Measured on an H200 (bf16 and fp16,
// both feature axes, 2-100% density, the two launches alternated in one process): persistent
// 1.00-1.08x at N = 1000 and N = 4096 (C = K = 4096: 2 and 8 waves) in 21 of 24 cells (0.98-
// 0.99x in 3), but one CTA per tile 1.01-1.11x faster in 6 of 8 cells at N = 16384,
// C = K = 8192 (62 waves).
// SetTuning(5) launches one CTA per tile everywhere.  Results are the same either way.
constexpr int64_t kWgmmaPersistentMaxWaves = 16;

template <typename T, int FA, bool kTransW = false>
int LaunchWgmmaForward(const Params& p, int64_t N, int64_t KB, int device, const DeviceInfo& di,
                       cudaStream_t s) {
  using Cfg = WgmmaFwdCfg;
  using Tag = KernelTag<T, Cfg, (kTransW ? 40 : 0) + FA>;
  auto kernel = wgmma_impl::WgmmaForwardKernel<T, FA, Cfg, kTransW>;
  const int64_t tiles = KB * ((N + Cfg::kBM - 1) / Cfg::kBM);
  int per_sm = 0;
  const int e = PrepareKernel<Tag>(kernel, Cfg::kThreads, Cfg::kSmemBytes, device, di, &per_sm);
  if (e != cudaSuccess) return e;
  const int64_t resident = static_cast<int64_t>(per_sm) * di.sm_count;
  int64_t grid = tiles;
  if (Tuning() != 5 && tiles <= kWgmmaPersistentMaxWaves * resident && grid > resident)
    grid = resident;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  return LaunchTiles<Tag>(kernel, Cfg::kThreads, Cfg::kSmemBytes, grid, 1, 0.0, p, device, di,
                          s);
}

// The bs-16 / bs-32 forward: one CTA per tile of 256 batch rows of one block column.  bs 32:
// 3 stages (55 KiB of shared memory, four CTAs per SM).  Among 3 or 4 stages x 128 or 256 rows,
// measured side by side on an H200 (bf16 both feature axes, fp16 feature axis 1; N = 1000,
// 4096, 16384; 2-100% density: 28 cells), it ran at 0.89-1.00x the fastest variant's speed in
// every cell, where 4 x 256 fell to 0.67x at N = 1000 (too few tiles for three CTAs per SM).
// bs 16: 4 stages (a stage is 9 KiB); other shapes not measured.
// bs 16 against the mma.sync forward (H200, bf16 / fp16, feature axis 1, N = 4096 / 16384):
// 1.21-1.60x at 2-50% density but 0.88-0.92x at 100%, where the mma.sync kernel's several
// blocks per step read contiguous 64-128-byte pieces of x rows (one bs-16 block row is 32
// bytes).  So columns fuller than this fraction keep the mma.sync kernel (the threshold lies
// between the measured 50% and 100%).
constexpr double kWgmmaBs16MaxColumnFill = 0.75;
constexpr int kSmallBatchMaxSplit = 2;  // see LaunchWgmmaSmallBatchForward
template <int BS, bool kCopyEngine, bool kTransW = false>
using NarrowFwdCfgOf = wgmma_impl::NarrowFwdCfg<BS, BS == 32 ? 3 : 4, 256, 1, kCopyEngine, kTransW>;
using wgmma_impl::NarrowParams;
using wgmma_impl::SmallBatchParams;
// The narrow forward's kernel-cache key: 10 + FA, or 60 + FA for its small-batch launches.
template <typename T, int FA, class Cfg, class KP>
using NarrowTag = KernelTag<T, Cfg, (std::is_same<KP, SmallBatchParams>::value ? 60 : 10) + FA>;
template <typename T, int FA, int BS, class Cfg, class KP = NarrowParams>
int LaunchWgmmaForwardNarrow(const KP& p, int64_t N, int64_t KB, int device,
                             const DeviceInfo& di, cudaStream_t s, double split_steps = 0.0) {
  return LaunchTiles<NarrowTag<T, FA, Cfg, KP>>(
      wgmma_impl::WgmmaForwardNarrowKernel<T, FA, Cfg, KP>, Cfg::kThreads, Cfg::kSmemBytes, KB,
      (N + Cfg::kBM - 1) / Cfg::kBM, split_steps, p, device, di, s, -1, kSmallBatchMaxSplit);
}

// bs 16 / 32 / 64 with small batches (N <= kSmallBatch, 16-bit, Hopper): the same kernel with one
// 64-row tile per block column, so a CTA streams its column's weights, several blocks per
// pipeline step (fewer waits and barriers per block; at N = 64 a step, not the MMAs, set the
// pace).  Long columns are split over a cluster of two CTAs (half the steps each; partial
// sums added in rank order; for bs 32 the split configuration fits two CTAs per SM).
// Measured on an H200 (C = K = 4096, N = 64 and 16, bf16 both feature axes and fp16, 2-100%
// density, variants alternated in one process, fastest of three medians) against one block per
// step with 16 stages (bs 32) and the mma.sync small-batch tiles (bs 64):
// docs/benchmarks_gpu.md.  Chosen:
//   bs 32: 8 blocks per step, 4 stages (193 KiB; 197 with the copy engine's zero tile) below
//     kSmallBatchSplitBlocks32 blocks per column; from there 4 blocks per step, 4 stages
//     (97 KiB), split (at 50-100% density 1.25-1.59x the previous default, where the 8-block
//     steps unsplit made 1.26-1.43x);
//   bs 64: 2 blocks per step, 7 stages (225 KiB), split from kSmallBatchSplitBlocks64 blocks
//     per column.  Clusters of four (97 KiB configurations) ran up to 2.4x slower at 10%
//     density, so splits stop at two.
// With copy-engine copies (kCopyEngine) bs 64 takes two blocks per step and 6 stages (201 KiB
// with the zero tile) instead of two and 7; from 2026-12-07, before that one block and 12
// stages (193 KiB), which measured on an H200 (bf16, C = K = 4096, N = 64 unless noted, the
// two alternated in one process, fastest of five medians, the same results bit for bit; us)
// 8.4 -> 8.0 at 10% density, 12.9 -> 11.4 at 25%, 18.1 -> 17.5 at 100%, 6.8 -> 6.9 at 2%;
// feature axis 0 at 10% 9.5 -> 8.7; N = 16 at 100% 16.7 -> 15.7.  Four blocks and 3 stages
// measured about as two blocks (0.87-1.00x the one-block times).
// bs 16 (from 2026-12-06; the mma.sync small-batch tiles before), where Bs16SmallBatchOnWgmma
// says: 8 blocks per step, 4 stages (81-83 KiB, two CTAs per SM), one CTA per column; or 4
// blocks per step, 4 stages (41-43 KiB), split over a cluster of two where the GPU has room
// (SplitsBs16SmallBatch); copies as bs 32's (copy engine from kCopyEngineMinBlocks32 blocks
// per column).  Measured on an
// H100 (C = K = 4096 and 1024, N = 16 / 32 / 64, bf16 and fp16, forward and dx, 2-100%
// density, eight configurations alternated in one process, against the mma.sync tiles;
// docs/benchmark_history_gpu.md "bs-16 forward with small batches on wgmma"): feature axis 0
// split 0.59-0.97x the time (0.68x at 50%, 0.59x at 100%); feature axis 1 with N = 64 unsplit
// 0.79-0.90x at 10-75% density, but 1.09x at 100%, where the mma.sync kernel's several blocks
// per step read x rows in contiguous 64-128-byte pieces (one bs-16 block row is 32 bytes): so
// full columns (kWgmmaBs16MaxColumnFill) keep the mma.sync tiles there, as with N > 64; with
// N = 16 split 0.89x at 50% and 0.93x at 100% (unsplit 1.09-1.13x there).
// kTransW: the weights read transposed as stored (see NarrowFwdCfg).
// SetTuning(41) / (42): the copy-engine bs-64 configuration with 1 block per step and 12
// stages (the default until 2026-12-07) / 4 blocks and 3 (the same bytes in flight as the
// default's 2 and 6; the same sums in the same order).
constexpr int kTuningSmallBatchBs64OneBlock = 41, kTuningSmallBatchBs64FourBlocks = 42;
template <bool kCopyEngineT, bool kTransW = false>
struct SmallBatchCfgs {
  static constexpr bool kCopyEngine = kCopyEngineT;
  using Bs16 = wgmma_impl::NarrowFwdCfg<16, 4, 64, 8, kCopyEngine, kTransW>;
  using Bs16Split = wgmma_impl::NarrowFwdCfg<16, 4, 64, 4, kCopyEngine, kTransW>;
  using Bs32 = wgmma_impl::NarrowFwdCfg<32, 4, 64, 8, kCopyEngine, kTransW>;
  using Bs32Split = wgmma_impl::NarrowFwdCfg<32, 4, 64, 4, kCopyEngine, kTransW>;
  using Bs64 = typename std::conditional<
      kCopyEngine, wgmma_impl::NarrowFwdCfg<64, 6, 64, 2, true, kTransW>,
      wgmma_impl::NarrowFwdCfg<64, 7, 64, 2, false, kTransW>>::type;
  using Bs64One = wgmma_impl::NarrowFwdCfg<64, 12, 64, 1, kCopyEngine, kTransW>;
  using Bs64Four = wgmma_impl::NarrowFwdCfg<64, 3, 64, 4, kCopyEngine, kTransW>;
};
constexpr double kSmallBatchSplitBlocks32 = 64, kSmallBatchSplitBlocks64 = 32;
// The bs-16 small-batch forward's split configuration serves feature axis 0 (x tiles of 16
// feature rows, each 2 * N contiguous bytes) and batches of at most this many rows.
constexpr int64_t kSmallBatchBs16SplitMaxRows = 16;
constexpr bool SplitsBs16SmallBatch(int FA, int64_t N) {
  return FA == 0 || N <= kSmallBatchBs16SplitMaxRows;
}
// Where the bs-16 small-batch forward runs the wgmma kernel, else the mma.sync tiles: feature
// axis 0 always; feature axis 1 with N > 16 where columns are not full, and with N <= 16 from
// kSmallBatchBs16FewRowsMinBlocks blocks per column (N = 16 on an H100: 0.92x and 0.97x the
// mma.sync tiles' speed at 2% and 10% density, about 5 and 26 blocks per column, 1.07-1.10x
// at 50-100%).
constexpr double kSmallBatchBs16FewRowsMinBlocks = 32;
constexpr bool Bs16SmallBatchOnWgmma(int FA, int64_t N, double blocks_per_col,
                                     bool full_columns) {
  if (FA == 0) return true;
  if (N <= kSmallBatchBs16SplitMaxRows) return blocks_per_col >= kSmallBatchBs16FewRowsMinBlocks;
  return !full_columns;
}
// Their shared memory fits every sm_90 GPU's opt-in limit (227 KiB): asserted here, so that a
// configuration outgrowing it fails to compile instead of silently falling back; checked at
// run time too, so a GPU with less keeps the mma.sync tiles.
constexpr bool SmallBatchWgmmaFits(int64_t smem_limit) {
  using CE = SmallBatchCfgs<true>;
  using Async = SmallBatchCfgs<false>;
  for (int64_t bytes : {CE::Bs16::kSmemBytes, CE::Bs16Split::kSmemBytes, CE::Bs32::kSmemBytes,
                        CE::Bs32Split::kSmemBytes, CE::Bs64::kSmemBytes, CE::Bs64One::kSmemBytes,
                        CE::Bs64Four::kSmemBytes, Async::Bs16::kSmemBytes,
                        Async::Bs16Split::kSmemBytes, Async::Bs32::kSmemBytes,
                        Async::Bs32Split::kSmemBytes, Async::Bs64::kSmemBytes})
    if (bytes > smem_limit) return false;
  return true;
}
static_assert(SmallBatchWgmmaFits(227 * 1024),
              "the small-batch wgmma forwards fit an sm_90 GPU's shared memory");
inline bool SmallBatchWgmmaFits(const DeviceInfo& di) {
  return SmallBatchWgmmaFits(di.max_smem_optin);
}

// The narrow wgmma forwards copy on the copy engine (ops/blocksparse_matmul_gpu_tma.cuh) where
// the driver encodes the tensor maps, but with N <= 64 only from these many blocks per column:
// measured on an H200 (bf16 both feature axes, fp16, N = 16, 40 and 64, C = K = 4096, the two
// alternated in one process, fastest of three medians), cp.async -> copy engine: bs 64 at 2-5%
// density 0.90-0.96x, 10% 1.01-1.08x, 50-100% 1.09-1.15x; bs 32 below 10% 0.93-1.04x, at 10%
// 0.95-1.10x, 25-100% 0.96-1.17x (1.04-1.17x at 100%).  With N > 64 (bs 16 / 32, N = 4096 and
// 16384): 0.97-1.09x, 1.33x for bs 32 at 100% with feature axis 0.  Results are the same bit
// for bit (the same sums in the same order); SetTuning(6) keeps cp.async everywhere.
constexpr double kCopyEngineMinBlocks32 = 24, kCopyEngineMinBlocks64 = 6;
inline bool CopyEngineEnabled() { return Tuning() != 6; }

// A map of the activation matrix `a` (x or dy) for copies of box_batch batch rows by one
// block's BS features: a is (N, features) with feature axis 1, else (features, N), and its
// boxes then BS feature rows of box_batch batch entries.  False where the copy engine cannot
// serve: a not 16-byte aligned, a dimension of 2^31 or more, or (feature axis 0) rows whose
// bytes are not a multiple of 16.
template <typename T, int FA, int BS>
bool EncodeActivationMap(tma::TensorMap* map, const void* a, uint64_t features, uint64_t N,
                         uint32_t box_batch) {
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  if (reinterpret_cast<uintptr_t>(a) % 16 || N >= (1ull << 31) || features >= (1ull << 31))
    return false;
  if (FA == 1) return tma::EncodeTiles16(map, kBf16, a, features, N, features * 2, BS, box_batch);
  return N % 8 == 0 && tma::EncodeTiles16(map, kBf16, a, N, features, N * 2, box_batch, BS);
}

// Fills p's tensor maps for the copy-engine narrow forward with kBM batch rows per tile: x
// boxes of kBM batch rows x BS features (feature axis 1; a single 64-row tile only the rows up
// to N rounded to 8) or BS features x 64 batch entries (feature axis 0, one per row group), and
// whole weight blocks.  False where the copy engine cannot serve (the caller keeps cp.async).
template <typename T, int FA, int BS, int kBM>
bool EncodeNarrowMaps(NarrowParams* np) {
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  const Params& p = np->base;
  const uint64_t N = p.N, rows = static_cast<uint64_t>(p.blocks) * BS;
  if (reinterpret_cast<uintptr_t>(p.w) % 16 || p.blocks <= 0 || rows >= (1ull << 31))
    return false;
  const uint32_t x_batch =
      FA == 0 ? 64 : kBM == 64 && N < 64 ? static_cast<uint32_t>((N + 7) / 8 * 8) : kBM;
  return EncodeActivationMap<T, FA, BS>(&np->x_map, p.x, p.C, N, x_batch) &&
         tma::EncodeTiles16(&np->w_map, kBf16, p.w, BS, rows, BS * 2, BS, BS);
}

template <typename T, int FA, int BS, class Cfgs>
int LaunchSmallBatchCfgs(const SmallBatchParams& p, int64_t N, int64_t KB, double blocks_per_col,
                         int device, const DeviceInfo& di, cudaStream_t s) {
  if constexpr (BS == 16) {
    if (SplitsBs16SmallBatch(FA, N)) {
      using Cfg = typename Cfgs::Bs16Split;
      return LaunchWgmmaForwardNarrow<T, FA, 16, Cfg>(p, N, KB, device, di, s,
                                                      blocks_per_col / Cfg::kBlocksPerStep);
    }
    return LaunchWgmmaForwardNarrow<T, FA, 16, typename Cfgs::Bs16>(p, N, KB, device, di, s);
  } else if constexpr (BS == 64) {
    const bool split = blocks_per_col >= kSmallBatchSplitBlocks64;
    auto launch = [&](auto cfg) {
      using Cfg = decltype(cfg);
      return LaunchWgmmaForwardNarrow<T, FA, 64, Cfg>(
          p, N, KB, device, di, s, split ? blocks_per_col / Cfg::kBlocksPerStep : 0.0);
    };
    if constexpr (Cfgs::kCopyEngine) {
      if (Tuning() == kTuningSmallBatchBs64OneBlock) return launch(typename Cfgs::Bs64One{});
      if (Tuning() == kTuningSmallBatchBs64FourBlocks) return launch(typename Cfgs::Bs64Four{});
    }
    return launch(typename Cfgs::Bs64{});
  } else {
    // The 4-block steps only where LaunchTiles will split them (not when the grid is too wide
    // for two CTAs per tile, e.g. K > 4224 on an H200).
    using Cfg = typename Cfgs::Bs32Split;
    const double steps = blocks_per_col / Cfg::kBlocksPerStep;
    int per_sm = 0;
    if (blocks_per_col >= kSmallBatchSplitBlocks32 &&
        PrepareKernel<NarrowTag<T, FA, Cfg, SmallBatchParams>>(
            wgmma_impl::WgmmaForwardNarrowKernel<T, FA, Cfg, SmallBatchParams>, Cfg::kThreads,
            Cfg::kSmemBytes, device, di, &per_sm) == cudaSuccess &&
        ChooseSplit(KB, steps, static_cast<int64_t>(per_sm) * di.sm_count, di,
                    kSmallBatchMaxSplit) > 1)
      return LaunchWgmmaForwardNarrow<T, FA, 32, Cfg>(p, N, KB, device, di, s, steps);
    return LaunchWgmmaForwardNarrow<T, FA, 32, typename Cfgs::Bs32>(p, N, KB, device, di, s);
  }
}

template <typename T, int FA, int BS, bool kTransW = false>
int LaunchWgmmaSmallBatchForward(const Params& p, int64_t N, int64_t KB, double blocks_per_col,
                                 int device, const DeviceInfo& di, cudaStream_t s) {
  SmallBatchParams sp{{p, {}, {}}, {}};  // RunStarts: filled at the launch (SetSplit)
  NarrowParams& np = sp.narrow;
  if (CopyEngineEnabled() &&
      blocks_per_col >= (BS == 64 ? kCopyEngineMinBlocks64 : kCopyEngineMinBlocks32) &&
      EncodeNarrowMaps<T, FA, BS, 64>(&np))
    return LaunchSmallBatchCfgs<T, FA, BS, SmallBatchCfgs<true, kTransW>>(
        sp, N, KB, blocks_per_col, device, di, s);
  return LaunchSmallBatchCfgs<T, FA, BS, SmallBatchCfgs<false, kTransW>>(
      sp, N, KB, blocks_per_col, device, di, s);
}

// The bs-16 / bs-32 forward with N > 64.
template <typename T, int FA, int BS, bool kTransW = false>
int LaunchWgmmaForwardLong(const Params& p, int64_t N, int64_t KB, int device,
                           const DeviceInfo& di, cudaStream_t s) {
  NarrowParams np{p, {}, {}};
  if (CopyEngineEnabled() && EncodeNarrowMaps<T, FA, BS, 256>(&np))
    return LaunchWgmmaForwardNarrow<T, FA, BS, NarrowFwdCfgOf<BS, true, kTransW>>(np, N, KB,
                                                                                 device, di, s);
  return LaunchWgmmaForwardNarrow<T, FA, BS, NarrowFwdCfgOf<BS, false, kTransW>>(np, N, KB,
                                                                                device, di, s);
}

// The bs-32 forward over groups of kCols block columns (WgmmaForwardGroupedKernel; 16-bit,
// feature axis 1, N > 64, Hopper, copy engine): one CTA per group and 128 batch rows.  False
// (nothing launched) where the copy engine cannot serve; the caller then takes the narrow
// kernel.  The default takes groups of four columns where they read at most
// kGroupedMaxRowsPerBlock x tiles per stored block (the narrow kernel reads one) and the
// batch has at least kGroupedMinBatch rows: small-world layouts, whose neighbouring columns
// share most block rows.  The count is ColumnGroupRows, which DeviceLayout::column_group_rows
// holds where the layout's owner counted it, else counted on the call from the layout's host
// copies (without them: the narrow kernel).  The sums are the narrow kernel's bit for bit
// (each column's blocks in increasing block row; the zero blocks' products add exact zeros)
// but for infinities and NaNs in x.  Measured on an H100 (2026-12-07, bf16, C = K = 4096
// unless noted, `tools/gpu_variants.py`, side by side; ring = small-world layouts; x tiles
// per block, then time against the narrow kernel's): ring 8.6% 0.41, 0.97x; 10% 0.40, 0.94x
// (fp16 0.89x, dx 0.92x); 15% 0.38, 0.89x; 25% 0.36, 0.85x; 50% 0.32, 0.77x; random 65% 0.38,
// 0.88x; full 0.25, 0.58x; N = 16384, C = K = 8192: ring 5% 0.40, 0.86x, 10% 0.37, 0.84x,
// 25% 0.34, 0.80x.  Not taken (groups of four there, against the narrow kernel): ring 5.5%
// 0.45, 1.01x; ring 10% with twice the rewiring 0.48, 1.11x; random 50% 0.47, 1.12x; random
// 10% 0.86, 1.99x.  Rows (ring 10%): 512 1.19x (128 CTAs for 132 SMs), 1000 0.92x, 2048
// 0.93x.  Details in docs/benchmark_history_gpu.md, "bs-32 forward over groups of block
// columns".  SetTuning(44) / (45) take groups of 4 / 2 columns wherever the kernel can run,
// (46) never (the narrow kernel, the default before).
// The rule's bounds: kGroupedMaxRowsPerBlock, kGroupedMinBatch (GroupedRuleHolds in
// blocksparse_matmul_gpu_internal.cuh).
constexpr int kTuningGroupedBs32Cols4 = 44, kTuningGroupedBs32Cols2 = 45,
              kTuningGroupedBs32Never = 46;
// Block columns per group for this call (0: the narrow kernel).
inline int GroupedColumns(const Params& p, int64_t N, int64_t KB) {
  const int t = Tuning();
  if (t == kTuningGroupedBs32Cols4) return 4;
  if (t == kTuningGroupedBs32Cols2) return 2;
  if (t == kTuningGroupedBs32Never) return 0;
  return GroupedRuleHolds(N, p.C / 32, KB, p.blocks, p.column_group_rows, p.host_col_ptr,
                          p.host_col_row)
             ? 4
             : 0;
}

template <typename T, int kCols, bool kTransW>
bool LaunchWgmmaForwardGrouped(const Params& p, int64_t N, int64_t KB, int device,
                               const DeviceInfo& di, cudaStream_t s, int* status) {
  using Cfg = wgmma_impl::GroupedFwdCfg<kCols, 6, kTransW>;
  wgmma_impl::GroupedParams gp{{p, {}, {}}, {}};
  if (!CopyEngineEnabled() || !EncodeNarrowMaps<T, 1, 32, Cfg::kBM>(&gp.narrow)) return false;
  FillRunStarts(&gp.bounds, p.host_col_ptr, p.blocks, KB, 1);  // the list bounds
  *status = LaunchTiles<KernelTag<T, Cfg, 70>>(wgmma_impl::WgmmaForwardGroupedKernel<T, Cfg>,
                                               Cfg::kThreads, Cfg::kSmemBytes,
                                               (KB + kCols - 1) / kCols,
                                               (N + Cfg::kBM - 1) / Cfg::kBM, 0.0, gp, device,
                                               di, s);
  return true;
}

// The bs-64 forward from kBs64NarrowMinBatch rows: the narrow kernel (not transposed: x's
// 64-row groups are wgmma's A, the weight block its B), one CTA per tile of kBM batch rows,
// copies on the copy engine.  Measured on an H100 (2026-12-06, `tools/gpu_variants.py --close`,
// the configurations alternated in one process, fastest of two medians, bf16 unless noted,
// C = K = 4096, us, transposed persistent kernel -> this): N = 4096, feature axis 1, 2% 26.5
// -> 24.7, 5% 38.1 -> 33.7, 10% 54.8 -> 49.5, 25% 115.4 -> 104.9, 50% 208.8 -> 194.4, 100%
// 350.0 -> 294.1; feature axis 0 and fp16 alike (0.84-0.99x the time); N = 16384, C = K = 8192,
// 2% 243.7 -> 206.7, 10% 666.9 -> 601.8, 100% 6685 -> 5576; N = 1000, 100% 93.5 -> 77.8; N = 512,
// 100% 47.9 -> 35.7; the input gradient alike.  Below 512 rows (N = 130, 264) the transposed
// persistent kernel was 1.07-1.43x faster than the 128- to 256-row configurations (64 rows:
// 1.03x slower and 0.96x).  Among the
// configurations (64 / 128 / 192 / 256 rows, 3-6 stages): 128 rows x 3 stages (72 KiB, three
// CTAs per SM) for columns of at most kBs64NarrowFewBlocks blocks; else 192 rows x 3 stages
// (96 KiB) from kBs64NarrowTallMinBatch rows, 128 x 4 below (a 192-row tile of N = 1000 is
// 15% padding).  Every configuration, and the cp.async copies that serve where the copy engine
// cannot, sums the same products in the same order: the results are the same bit for bit.
constexpr int64_t kBs64NarrowMinBatch = 512, kBs64NarrowTallMinBatch = 4096;
constexpr double kBs64NarrowFewBlocks = 6.0;
template <bool kCopyEngine, bool kTransW, int kBM = 128, int kStages = 3>
using Bs64NarrowCfg = wgmma_impl::NarrowFwdCfg<64, kStages, kBM, 1, kCopyEngine, kTransW>;

template <typename T, int FA, class Cfg>
int LaunchBs64NarrowCopyEngine(const Params& p, int64_t N, int64_t KB, int device,
                               const DeviceInfo& di, cudaStream_t s) {
  NarrowParams np{p, {}, {}};
  if (!CopyEngineEnabled() || !EncodeNarrowMaps<T, FA, 64, Cfg::kBM>(&np)) {
    using CpAsync = Bs64NarrowCfg<false, Cfg::kTransW>;
    return LaunchWgmmaForwardNarrow<T, FA, 64, CpAsync>(np, N, KB, device, di, s);
  }
  return LaunchWgmmaForwardNarrow<T, FA, 64, Cfg>(np, N, KB, device, di, s);
}

// SetTuning(21) / (22) force the 128 x 4 / 192 x 3 configurations wherever N > 64 (tests).
template <typename T, int FA, bool kTransW>
int LaunchWgmmaForwardBs64Narrow(const Params& p, int64_t N, int64_t KB, double blocks_per_col,
                                 int device, const DeviceInfo& di, cudaStream_t s) {
  using Rows128Stages3 = Bs64NarrowCfg<true, kTransW, 128, 3>;
  using Rows128Stages4 = Bs64NarrowCfg<true, kTransW, 128, 4>;
  using Rows192Stages3 = Bs64NarrowCfg<true, kTransW, 192, 3>;
  const bool few_blocks = blocks_per_col <= kBs64NarrowFewBlocks;
  if (Tuning() == 21 || (Tuning() != 22 && !few_blocks && N < kBs64NarrowTallMinBatch))
    return LaunchBs64NarrowCopyEngine<T, FA, Rows128Stages4>(p, N, KB, device, di, s);
  if (Tuning() == 22 || !few_blocks)
    return LaunchBs64NarrowCopyEngine<T, FA, Rows192Stages3>(p, N, KB, device, di, s);
  return LaunchBs64NarrowCopyEngine<T, FA, Rows128Stages3>(p, N, KB, device, di, s);
}

// dW (16-bit, sm_90): groups of up to G x 64 / bs blocks of one block column per
// CTA, sharing the dy slab (WgmmaGradWColumnKernel), 64 batch rows per step.  Measured side
// by side on an H200 (bf16 both feature axes, fp16; N = 1000, 4096 and 16384; 2-100%
// density) among G = 1, 2, 4, 8 and 3-8 stages of 32 or 64 rows, these were fastest or within
// a few percent in most cells: bs 16: 2 packs (8 blocks), 4 stages (72 KiB of shared memory);
// bs 32: 4 packs (8 blocks), 3 stages (109 KiB); bs 64: 2 blocks, 4 stages (97 KiB).  Against
// the mma.sync dW: docs/benchmarks_gpu.md.
template <int BS>
struct ColumnGradCfgOf;
template <> struct ColumnGradCfgOf<16> { using type = wgmma_impl::ColumnGradCfg<16, 2, 64, 4>; };
template <> struct ColumnGradCfgOf<32> { using type = wgmma_impl::ColumnGradCfg<32, 4, 64, 3>; };
template <> struct ColumnGradCfgOf<64> { using type = wgmma_impl::ColumnGradCfg<64, 2, 64, 4>; };
// bs 16 over long batches: 4 packs (16 blocks) per CTA with 3 stages (103 KiB).  Measured on an
// H200 against the default (bf16, feature axis 1, N = 16384, C = K = 8192): 1.40x at 2%
// density, 1.13-1.17x at 5-50%, 1.66x at 100%; at N = 4096 (C = K = 4096) 0.74-1.12x and at
// N = 1000 0.96-1.05x, so only from kColumnGradBs16LongBatch rows.
using ColumnGradCfgBs16Long = wgmma_impl::ColumnGradCfg<16, 4, 64, 3>;
constexpr int64_t kColumnGradBs16LongBatch = 8192;
// bs 32: groups as long as the columns are, on average: 8 blocks from 8 blocks per column, else
// 4 blocks (2 packs, 4 stages: 81 KiB) from 4, else 2 (1 pack, 6 stages: 73 KiB).  Shorter
// columns in 8-block groups leave pack slots empty (their wgmmas still run) and few CTAs
// (a cluster split then shares a group); in shorter groups the columns' CTAs are more and
// shallower, with more stages.  Measured on an H200 (bf16, the variants alternated in one
// process; dW us, 8-block groups or, below 6 blocks per column, the mma.sync dW that ran there
// before -> the configuration chosen here):
//   about 2.6 blocks per column (2% density, C = K = 4096): N = 1000 14.9 -> 12.3, N = 4096
//     44.5 -> 31.8 (4-block groups: 19.2 and 44.2);
//   5.1 (2%, C = K = 8192): N = 4096 162.5 -> 89.1, N = 16384 636.0 -> 348.8;
//   6.4 (5%, C = K = 4096): N = 1000 27.2 -> 16.2, N = 4096 75.6 -> 45.0 (feature axis 0 88.0
//     -> 44.6; 2-block groups 22.1 and 66.2);
//   12.8 (10% at C = K = 4096, 5% at 8192) and longer, 8-block groups stay: 4-block ones
//     measured 0.77-1.14x their speed at N = 1000 / 4096 (median 0.93) and 0.71-0.95x at
//     N = 16384.
// Until then bs 32 below 6 blocks per column ran the mma.sync dW.
using ColumnGradCfgBs32Four = wgmma_impl::ColumnGradCfg<32, 2, 64, 4>;
using ColumnGradCfgBs32Two = wgmma_impl::ColumnGradCfg<32, 1, 64, 6>;
constexpr double kColumnGradBs32EightBlocks = 8.0, kColumnGradBs32FourBlocks = 4.0;
// With feature axis 0 (x (C, N), each block's x rows N long) 4-block groups are faster than
// 8-block ones over long batches on long columns: from 4096 batch rows where a column's
// blocks times the batch rows reach kColumnGradBs32FourBlocksAxis0Work.  Measured on an H200
// (bf16 unless noted, the group sizes alternated in one process, dW us, 8 -> 4-block groups;
// the same results bit for bit): N = 4096, C = K = 4096 at 25% 200.1 -> 174.5 (fp16 198.3 ->
// 181.2), 50% 347.3 -> 300.8, 100% 592.6 -> 574.2 (fp16 618.7 -> 578.7), but 10% 68.9 -> 74.7;
// N = 16384, C = K = 8192 at 5% 626.6 -> 564.8, 10% 1220.0 -> 1019.7, 25% 2980.0 -> 2553.5;
// N = 1000 at 10-50% 0.99-1.05x.  With feature axis 1 they were slower (N = 4096: 10% 1.20x,
// 100% 1.19x the time; N = 16384, C = K = 8192: 10% 1.21x, 25% 1.50x; at 5% 0.84x in one run
// and 1.11x in another, on another random layout).
constexpr int64_t kColumnGradBs32FourBlocksAxis0Rows = 4096;
constexpr double kColumnGradBs32FourBlocksAxis0Work = 24.0 * 4096;

// bs 64 (2-block groups above), feature axis 1: where x is several times the L2
// (kColumnGradBs64EightL2Multiple) and columns average 12 blocks or more (shorter ones leave
// many of a group's slots empty), groups of 8 blocks on two warpgroups (4 each, sharing every
// step's dy slab), 64-row steps, 3 stages (217 KiB); on long columns elsewhere
// (kColumnGradBs64FourBlocks), groups of 4 on one warpgroup, 32-row steps, 5 stages (101 KiB).
// Every block reads its x slab once per step whatever the group; dy's slab is read once per
// group: 1.5 slab reads per block with 2-block groups, 1.25 and 1.125 with these, against the
// forward's one.  With feature axis 0 they ran slower or even.  The same sums in the same
// order (bit for bit the 2-block groups' where no group is split over a cluster).  Measured:
// docs/benchmark_history_gpu.md, section "bs-64 dW in groups of 4 and 8 blocks".
using ColumnGradCfgBs64Eight = wgmma_impl::ColumnGradCfg<64, 8, 64, 3, false, 2>;
using ColumnGradCfgBs64Four = wgmma_impl::ColumnGradCfg<64, 4, 32, 5>;
constexpr double kColumnGradBs64EightL2Multiple = 4.0;
constexpr double kColumnGradBs64EightBlocks = 12.0, kColumnGradBs64FourBlocks = 40.0;
// Blocks per group of the 16-bit bs-64 wgmma dW (N > 64): 8, 4 or 2.  SetTuning(23): 2
// everywhere; (24) / (26): 8 everywhere, (25) / (27): 4 everywhere (26 and 27 copying with
// cp.async).
template <typename T, int FA>
int Bs64GradGroupBlocks(int64_t N, int64_t C, double per_col, const DeviceInfo& di) {
  const int t = Tuning();
  if (t == 23) return 2;
  const double x_bytes = static_cast<double>(N) * static_cast<double>(C) * sizeof(T);
  const bool x_far_over_l2 =
      x_bytes >= kColumnGradBs64EightL2Multiple * static_cast<double>(di.l2_bytes);
  if (t == 24 || t == 26 || (FA == 1 && x_far_over_l2 && per_col >= kColumnGradBs64EightBlocks))
    return 8;
  if (t == 25 || t == 27 || (FA == 1 && per_col >= kColumnGradBs64FourBlocks)) return 4;
  return 2;
}

// The wgmma dW on the copy engine: the same configuration with a copy warp, where the driver
// encodes the tensor maps (x and dy 16-byte aligned, and with feature axis 0 N a multiple of
// 8).  Bit for bit the results of its cp.async copies.  Measured on an H200 (bf16 unless
// noted, dW us, cp.async -> copy engine, the two alternated in one process): feature axis 1,
// N = 4096, C = K = 4096: bs 32 at 2% 32.3 -> 31.2, 10% 148.8 -> 100.5, 25% 245.4 -> 175.4
// (fp16 249.5 -> 177.0), 100% 723.1 -> 569.6; bs 64 at 2% 22.4 -> 23.0, 10% 54.0 -> 41.6, 25%
// 129.4 -> 100.5, 100% 402.7 -> 332.1; N = 16384, C = K = 8192: bs 64 at 10% 769.6 -> 626.8,
// but bs 32 at 2% 338.4 -> 492.3 and 10% 1685.1 -> 2021.7, its x eight times the L2; bs 16
// slower (25% 515.4 -> 548.3, 100% 1071.5 -> 2040.0); feature axis 0 0.95-1.14x the time.
// Later (H200, bf16 bs 32 at 10% unless noted, dW us, default / copy engine / cp.async, the
// three alternated in one process; x's size in brackets, the L2 being 50 MB): C = K = 4096,
// N = 2048 (16 MB) 36.7 / 36.8 / 45.2, N = 4096 (32 MB) 65.0 / 64.9 / 85.4, N = 8192 (64 MB)
// 298.5 / 188.1 / 299.4 (123.1 / 123.2 / 164.8 in another run; fp16 123.4 / 123.3 / 163.9),
// N = 16384 (128 MB) 328.9 / 241.0 / 329.1, N = 32768 (256 MB, paced) 684.6 / 512.3 / 686.1;
// C = K = 8192, N = 4096 (64 MB) 352.9 / 259.5 / 352.7, but N = 12288 (192 MB) 1410.9 with
// the copy engine against 1181.3, and N = 16384 (256 MB, paced) 1613.3 / 2039.1 / 1613.0, at
// 2% 336.5 / 484.8 / 335.7.  So by default with feature axis 1 for bs 64, and for bs 32 where x
// is under kCopyEngineGradWBs32MaxL2Multiple times the L2 (every such cell measured faster;
// the first slower one, C = K = 8192, at 3.8 times); SetTuning(13) takes it wherever it can
// serve, SetTuning(14) nowhere.
constexpr double kCopyEngineGradWBs32MaxL2Multiple = 3.0;
template <int FA, int BS>
bool CopyEngineGradW(double x_bytes, const DeviceInfo& di) {
  if (Tuning() == 13 || Tuning() == 14) return Tuning() == 13;
  if (Tuning() == 26 || Tuning() == 27) return false;
  return FA == 1 &&
         (BS == 64 || (BS == 32 && x_bytes < kCopyEngineGradWBs32MaxL2Multiple *
                                                 static_cast<double>(di.l2_bytes)));
}
template <class Cfg>
struct ColumnGradOnCopyEngine {
  using type = wgmma_impl::ColumnGradCfg<Cfg::BS, Cfg::kPacks, Cfg::kRows, Cfg::kStages, true,
                                          Cfg::kConsumers>;
};
// Fills np's tensor maps for it: boxes of kRows batch rows by one block's BS features (feature
// axis 0: BS feature rows of kRows batch entries), of x (x_map) and of dy (w_map).  False where
// the copy engine cannot serve.
template <typename T, int FA, int BS, int kRows>
bool EncodeColumnGradMaps(NarrowParams* np) {
  const Params& p = np->base;
  return EncodeActivationMap<T, FA, BS>(&np->x_map, p.x, p.C, p.N, kRows) &&
         EncodeActivationMap<T, FA, BS>(&np->w_map, p.w, p.K, p.N, kRows);
}

// The wgmma dW with more column groups (`groups`, a bound) than CTAs fit on the GPU at once
// (`resident`): a persistent grid of `resident` CTAs, each taking groups blockIdx.x + i
// resident, paced by per-epoch counters (wgmma_impl::EpochThrottle) so that all of them move
// through the batch rows together and find x's rows in L2.  With one group per CTA the CTAs
// of later waves started at the first rows while others were at the last, and x came from
// memory again for almost every block: Nsight Compute on an H200 (bf16, bs 16, N = 16384,
// C = K = 8192, 10% density) measured 22 GB read from DRAM and an L2 hit rate of 14%.
// Sets *launched = false (nothing launched) where the counters cannot be allocated.
template <class Cfg, typename Kernel>
int LaunchPacedColumnGroups(Kernel kernel, const Params& p0, int64_t groups, int64_t resident,
                            int64_t steps, int slack, cudaStream_t s, bool* launched) {
  constexpr int64_t kE = wgmma_impl::EpochThrottle::kEpochSteps;
  *launched = false;
  if (resident > 0x7fffffffLL) return cudaSuccess;
  const int64_t rounds = (groups + resident - 1) / resident;
  const int64_t epochs = (rounds * steps + kE - 1) / kE;
  const size_t bytes = static_cast<size_t>(epochs) * sizeof(uint32_t);
  void* arrivals = nullptr;
  if (cudaMallocAsync(&arrivals, bytes, s) != cudaSuccess) {
    cudaGetLastError();  // clear it: the caller launches unpaced
    return cudaSuccess;
  }
  *launched = true;
  Params p = p0;
  p.epoch_arrivals = static_cast<uint32_t*>(arrivals);
  p.epochs = epochs;
  p.epoch_slack = slack;
  cudaError_t e = cudaMemsetAsync(arrivals, 0, bytes, s);
  if (e == cudaSuccess) {
    kernel<<<static_cast<unsigned>(resident), Cfg::kThreads, Cfg::kSmemBytes, s>>>(p);
    e = cudaGetLastError();
  }
  const cudaError_t f = cudaFreeAsync(arrivals, s);
  return e != cudaSuccess ? e : f;
}

// Pacing (LaunchPacedColumnGroups) pays where x is several times the L2 and the columns'
// groups are many.  Measured on an H200 (bs 16, feature axis 1, N = 16384, C = K = 8192; one
// group per CTA -> paced, alternating processes, dW us): bf16 2% density 1445 -> 1170, 5% 3897
// -> 2108, 10% 7368 -> 3895, 25% 14922 -> 8340, 50% 23020 -> 14883; fp16 10% 7352 -> 3864.
// Where it does not pay it costs (paced against one group per CTA, an earlier run): 100%
// density 17.5 -> 22.7 ms (the groups of a wave are all whole there, so they keep together),
// x in L2 (N = 4096, C = K = 4096) 0.73-0.88x the speed, feature axis 0 0.74-0.89x, bs 32
// 0.69-0.87x; those keep one group per CTA.
constexpr double kPacedColumnGroupsMaxDensity = 0.5;
constexpr int64_t kPacedColumnGroupsMinL2Multiple = 4;
// bs 32 (8-block groups) pays where the groups are at least kPacedBs32MinRounds times the CTAs
// that fit (so that unpaced, CTAs of many waves would drift apart), up to 75% density, with x
// as above; its CTAs may run kPacedBs32Slack epochs ahead of the slowest (bs 16: one).
// Measured on an H100 (bf16, feature axis 1, one group per CTA -> paced with a slack of 4,
// 2026-12-06, dW us; about 264 CTAs fit): N = 16384, C = K = 8192 (x five times the L2) at 15%
// density (4.8 rounds of groups) 2775 -> 2600, 20% (6.8) 4260 -> 3037, 25% 5230 -> 3832 (fp16
// 4952 -> 3866), 35% 7261 -> 5375, 50% 10186 -> 7486, 75% 12916 -> 10876, but 100% 9744 ->
// 13940, 10% (3.9 rounds) 1419 -> 1843 and 5% 1050 -> 1316; N = 8192, C = K = 16384 at 10%
// (25 rounds) 5191 -> 3399, 25% 12529 -> 8403; N = 32768, C = K = 4096 at 25% (1.9 rounds)
// 1746 -> 2509 and 50% (3.9) 3103 -> 4162.  A slack of 1 / 8 / 16 epochs at N = 16384, C = K
// = 8192: 25% 4297 / 4188 / 4030 against 4201 with 4, 50% 8035 / 7896 / 7760 against 7366.
constexpr double kPacedBs32MaxDensity = 0.75;
constexpr double kPacedBs32MinRounds = 6.0;
constexpr int kPacedBs32Slack = 4;
// The paced grid under SetTuning(9) (tests): small enough for racecheck.
constexpr int64_t kRaceCheckPacedCtas = 3;

template <typename T, int FA, int BS, class Cfg = typename ColumnGradCfgOf<BS>::type,
          bool kMayPace = false>
int LaunchWgmmaGradWColumns(const Params& p, int64_t N, int64_t blocks, int device,
                            const DeviceInfo& di, cudaStream_t s) {
  const int64_t per = Cfg::kGroupBlocks, KB = p.K / BS;
  // Runs of `per` blocks of one column: at most one partial run per non-empty column.  The
  // grid covers that bound (CTAs past the last run return at once); the cluster split is
  // chosen from the count expected with evenly filled columns.
  const int64_t filled = KB < blocks ? KB : blocks;
  const int64_t bound = (blocks + per - 1) / per + filled;
  const int64_t per_col = filled > 0 ? (blocks + filled - 1) / filled : 0;
  const int64_t expected = filled * ((per_col + per - 1) / per);
  const double steps = static_cast<double>((N + Cfg::kRows - 1) / Cfg::kRows);
  const double x_bytes = static_cast<double>(N) * p.C * sizeof(T);
  if constexpr (kMayPace) {
    const double density = static_cast<double>(blocks) / (static_cast<double>(p.C / BS) * KB);
    const bool x_far_over_l2 =
        x_bytes >= static_cast<double>(kPacedColumnGroupsMinL2Multiple) * di.l2_bytes;
    const bool forced = Tuning() == 8 || Tuning() == 9;
    const bool may_pay =
        Tuning() != 7 && x_far_over_l2 &&
        density <= (BS == 16 ? kPacedColumnGroupsMaxDensity : kPacedBs32MaxDensity);
    if (forced || may_pay) {
      const auto paced = wgmma_impl::WgmmaGradWColumnKernel<T, FA, Cfg, true>;
      int per_sm = 0;
      const int e = PrepareKernel<KernelTag<T, Cfg, 40 + FA>>(paced, Cfg::kThreads,
                                                              Cfg::kSmemBytes, device, di,
                                                              &per_sm);
      if (e != cudaSuccess) return e;
      int64_t resident = static_cast<int64_t>(per_sm) * di.sm_count;
      if (Tuning() == 9 && resident > kRaceCheckPacedCtas) resident = kRaceCheckPacedCtas;
      const bool pays = BS == 16 || static_cast<double>(expected) >=
                                        kPacedBs32MinRounds * static_cast<double>(resident);
      if ((forced || pays) && bound > resident && ChooseSplit(expected, steps, resident, di) == 1) {
        bool launched = false;
        const int slack = BS == 16 ? wgmma_impl::EpochThrottle::kSlack : kPacedBs32Slack;
        const int r = LaunchPacedColumnGroups<Cfg>(paced, p, bound, resident,
                                                   static_cast<int64_t>(steps), slack, s,
                                                   &launched);
        if (launched || r != cudaSuccess) return r;
      }
    }
  }
  {
    using OnCopyEngine = typename ColumnGradOnCopyEngine<Cfg>::type;
    NarrowParams np{p, {}, {}};
    if (CopyEngineGradW<FA, BS>(x_bytes, di) &&
        EncodeColumnGradMaps<T, FA, BS, Cfg::kRows>(&np))
      return LaunchTiles<KernelTag<T, OnCopyEngine, 50 + FA>>(
          wgmma_impl::WgmmaGradWColumnKernel<T, FA, OnCopyEngine>, OnCopyEngine::kThreads,
          OnCopyEngine::kSmemBytes, bound, 1, steps, np, device, di, s, expected);
  }
  return LaunchTiles<KernelTag<T, Cfg, 20 + FA>>(
      wgmma_impl::WgmmaGradWColumnKernel<T, FA, Cfg>, Cfg::kThreads, Cfg::kSmemBytes, bound, 1,
      steps, p, device, di, s, expected);
}

// dW with small batches (N <= kSmallBatch; 16-bit, and float32 with bs 16 / 32), on sm_90: runs
// of blocks of one column streamed through one CTA each (SmallBatchGradWKernel), batch steps of
// 16, 32 or 64 rows (the smallest that holds N), 3 stages (2 with 64 rows for bs 32 and for
// float32).  Runs are made long enough that about one wave of CTAs covers the blocks: two
// waves and fixed runs of 64 blocks measured 1.0-1.25x and 1.1-2.5x slower.  Measured on an H200 (C = K = 4096, bf16 both
// feature axes and fp16, N = 64 and 16, 2-100% density; variants alternated in one process)
// against the previous defaults (the mma.sync dW tiles; for bs 16 with at least 32 blocks per
// column the wgmma column groups): from 6 blocks per column 1.09-2.5x faster (N = 64, 100%:
// bs 16 1.18x, bs 32 1.51x, bs 64 1.89x; N = 16 up to 2.5x); below that 0.93-1.0x, so those
// keep the mma.sync tiles.  For bs 32 with 64 rows, 2 stages ran 0.93-1.10x the speed of 3
// (faster in 8 of 11 cells); 4 stages were slower in most cells.  float32 (3xTF32; bs 64 would
// hold too many dy fragments and keeps the mma.sync tiles, at most 1.02x its forward's time)
// against the mma.sync dW, same run (N = 64, both feature axes, and N = 16): 1.07-2.9x faster,
// at N = 64 and 100% bs 16 1.75x, bs 32 1.90x; at most 1.05x its forward's time.
constexpr double kSmallGradMinBlocksPerColumn = 6.0;
template <typename T, int BS, int ROWS>
using SmallGradCfg = mma_impl::SmallGradCfg<sizeof(T), BS, ROWS, 64,
                                            (BS == 32 || sizeof(T) == 4) && ROWS == 64 ? 2 : 3>;
template <typename T, int FA, class Cfg>
int LaunchSmallBatchGradWCfg(const Params& p0, int64_t blocks, int device, const DeviceInfo& di,
                             cudaStream_t s) {
  using Tag = KernelTag<T, Cfg, 30 + FA>;
  auto kernel = mma_impl::SmallBatchGradWKernel<T, FA, Cfg>;
  constexpr int kSmem = Cfg::template kSmemBytes<FA>;
  int per_sm = 0;
  const int e = PrepareKernel<Tag>(kernel, Cfg::kThreads, kSmem, device, di, &per_sm);
  if (e != cudaSuccess) return e;
  const int64_t resident = static_cast<int64_t>(per_sm) * di.sm_count;
  int64_t run = (blocks + resident - 1) / resident;
  run = (run + Cfg::kPerStep - 1) / Cfg::kPerStep * Cfg::kPerStep;  // whole steps
  run = run < Cfg::kPerStep ? Cfg::kPerStep : run > Cfg::kMaxRun ? Cfg::kMaxRun : run;
  Params p = p0;
  p.run_blocks = run;
  // At most one partial run per non-empty column: CTAs past the last run return at once.
  const int64_t KB = p.K / Cfg::kBS;
  const int64_t bound = (blocks + run - 1) / run + (KB < blocks ? KB : blocks);
  return LaunchTiles<Tag>(kernel, Cfg::kThreads, kSmem, bound, 1, 0.0, p, device, di, s);
}
template <typename T, int FA, int BS>
int LaunchSmallBatchGradW(const Params& p, int64_t N, int64_t blocks, int device,
                          const DeviceInfo& di, cudaStream_t s) {
  if (N <= 16)
    return LaunchSmallBatchGradWCfg<T, FA, SmallGradCfg<T, BS, 16>>(p, blocks, device, di, s);
  if (N <= 32)
    return LaunchSmallBatchGradWCfg<T, FA, SmallGradCfg<T, BS, 32>>(p, blocks, device, di, s);
  return LaunchSmallBatchGradWCfg<T, FA, SmallGradCfg<T, BS, 64>>(p, blocks, device, di, s);
}

// The float32 bs-16 forward's tiles by batch size (configurations above); with 65 to
// kF32Bs16WideMinBatch rows and feature axis 0, ForwardMmaBs's defaults.
template <typename T, int FA, bool kTransW>
int ForwardF32Bs16(const Params& p, int64_t N, int64_t KB, double blocks_per_col, int device,
                   const DeviceInfo& di, cudaStream_t s) {
  if (N <= kSmallBatch) {
    if (blocks_per_col >= kF32Bs16SmallDenseMinBlocksPerColumn) {
      using Cfg = typename FwdCfgF32Bs16SmallDense<T, FA>::type;
      return LaunchMmaForward<Cfg, kTransW>(p, N, KB, blocks_per_col, device, di, s);
    }
    if (FA == 0) {
      using Cfg = typename FwdCfgF32Bs16SmallFa0<T, FA>::type;
      return LaunchMmaForward<Cfg, kTransW>(p, N, KB, blocks_per_col, device, di, s);
    }
    using Cfg = typename FwdCfg<T, FA, 16, true>::type;
    return LaunchMmaForward<Cfg, kTransW>(p, N, KB, blocks_per_col, device, di, s);
  }
  if (N > kF32Bs16WideMinBatch) {
    using Cfg = typename FwdCfgF32Bs16Wide<T, FA>::type;
    return LaunchMmaForward<Cfg, kTransW>(p, N, KB, blocks_per_col, device, di, s);
  }
  using Cfg = typename FwdCfgF32Bs16Mid<T, FA>::type;
  return LaunchMmaForward<Cfg, kTransW>(p, N, KB, blocks_per_col, device, di, s);
}

// The wgmma forwards (16-bit, sm_90), where one applies: launches it and returns its status,
// else kNoWgmma.  kTransW: p.w holds the transposes of the product's blocks, read so.
constexpr int kNoWgmma = -2;
template <typename T, int FA, int BS, bool kTransW>
int ForwardWgmmaBs(const Params& p, int64_t N, int64_t KB, double blocks_per_col, int device,
                   const DeviceInfo& di, cudaStream_t s) {
  if constexpr (sizeof(T) == 2 && BS == 64) {
    const bool narrow = Tuning() == 21 || Tuning() == 22 ||
                        (Tuning() != 20 && N >= kBs64NarrowMinBatch);
    if (UseWgmma(N, di) && narrow)
      return LaunchWgmmaForwardBs64Narrow<T, FA, kTransW>(p, N, KB, blocks_per_col, device, di,
                                                          s);
    if (UseWgmma(N, di)) return LaunchWgmmaForward<T, FA, kTransW>(p, N, KB, device, di, s);
  }
  const bool full_columns =
      BS == 16 && blocks_per_col > kWgmmaBs16MaxColumnFill * static_cast<double>(p.C / BS);
  if constexpr (sizeof(T) == 2 && BS == 32 && FA == 1) {
    const int cols = UseWgmma(N, di) ? GroupedColumns(p, N, KB) : 0;
    int status = 0;
    if (cols == 4 && LaunchWgmmaForwardGrouped<T, 4, kTransW>(p, N, KB, device, di, s, &status))
      return status;
    if (cols == 2 && LaunchWgmmaForwardGrouped<T, 2, kTransW>(p, N, KB, device, di, s, &status))
      return status;
  }
  if constexpr (sizeof(T) == 2 && BS <= 32) {
    if (UseWgmma(N, di) && !full_columns)
      return LaunchWgmmaForwardLong<T, FA, BS, kTransW>(p, N, KB, device, di, s);
  }
  if constexpr (sizeof(T) == 2 && BS >= 16) {
    if (N <= kSmallBatch && WgmmaEnabled(di) && SmallBatchWgmmaFits(di) &&
        (BS >= 32 || Bs16SmallBatchOnWgmma(FA, N, blocks_per_col, full_columns)))
      return LaunchWgmmaSmallBatchForward<T, FA, BS, kTransW>(p, N, KB, blocks_per_col, device,
                                                              di, s);
  }
  return kNoWgmma;
}

// kTransW: p.w holds the transposes of the product's blocks; every kernel reads them so, with
// the same sums as on a transposed copy.
template <typename T, int FA, int BS, bool kTransW>
int ForwardMmaBs(const Params& p, int64_t N, int64_t KB, int64_t blocks, int device,
                 const DeviceInfo& di, cudaStream_t s) {
  const double blocks_per_col = static_cast<double>(blocks) / static_cast<double>(KB);
  const int wgmma = ForwardWgmmaBs<T, FA, BS, kTransW>(p, N, KB, blocks_per_col, device, di, s);
  if (wgmma != kNoWgmma) return wgmma;
  if constexpr (sizeof(T) == 4 && BS == 16) {
    if (N <= kSmallBatch || N > kF32Bs16WideMinBatch || FA == 1)
      return ForwardF32Bs16<T, FA, kTransW>(p, N, KB, blocks_per_col, device, di, s);
  }
  if (N <= kSmallBatch) {
    using Cfg = typename FwdCfg<T, FA, BS, true>::type;
    return LaunchMmaForward<Cfg, kTransW>(p, N, KB, blocks_per_col, device, di, s);
  }
  // Very sparse columns (about two steps per tile or fewer): a deep pipeline only costs
  // shared memory; two stages let twice as many CTAs share an SM and overlap their latency.
  using Base = typename FwdCfg<T, FA, BS, false>::type;
  if ((Tuning() == 0 || Tuning() >= 3) && blocks_per_col / Base::kBPS <= 2.5) {
    using Cfg = typename WithStages<Base, 2>::type;
    return LaunchMmaForward<Cfg, kTransW>(p, N, KB, blocks_per_col, device, di, s);
  }
  if constexpr (sizeof(T) == 4 && BS == 64) {
    using Tall = typename FwdCfgF32Bs64Tall<T, FA>::type;
    // Two stages already: where its 104 KiB do not fit, the 64-row tiles below.
    if (N >= kF32Bs64TallMinBatch && Tall::kSmemBytes <= di.max_smem_optin) {
      using Cfg = Tall;
      return LaunchMmaForward<Cfg, kTransW>(p, N, KB, blocks_per_col, device, di, s);
    }
  }
  if constexpr (sizeof(T) == 2 && BS == 64) {
    if (Tuning() == 2) {
      using Cfg = typename FwdCfgWarp64<T, FA>::type;
      return LaunchMmaForward<Cfg, kTransW>(p, N, KB, blocks_per_col, device, di, s);
    }
  }
  if constexpr (sizeof(T) == 2 && BS >= 32) {
    const bool wide_default = FA == 1 && BS == 32;
    if (wide_default != (Tuning() == 1)) {
      using Cfg = typename FwdCfgWide<T, FA, BS>::type;
      return LaunchMmaForward<Cfg, kTransW>(p, N, KB, blocks_per_col, device, di, s);
    }
  }
  using Cfg = typename FwdCfg<T, FA, BS, false>::type;
  return LaunchMmaForward<Cfg, kTransW>(p, N, KB, blocks_per_col, device, di, s);
}

template <typename T, int FA, bool kTransW>
int ForwardMmaFa(const Params& p, int64_t N, int64_t bs, int64_t KB, int64_t blocks, int device,
                 const DeviceInfo& di, cudaStream_t s) {
  switch (bs) {
    case 16: return ForwardMmaBs<T, FA, 16, kTransW>(p, N, KB, blocks, device, di, s);
    case 32: return ForwardMmaBs<T, FA, 32, kTransW>(p, N, KB, blocks, device, di, s);
    case 64: return ForwardMmaBs<T, FA, 64, kTransW>(p, N, KB, blocks, device, di, s);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int FA, int BS>
int GradWMmaBs(const Params& p, int64_t N, int64_t blocks, int device, const DeviceInfo& di,
               cudaStream_t s) {
  const double per_col = static_cast<double>(blocks) / static_cast<double>(p.K / BS);
  if constexpr (sizeof(T) == 2 || BS <= 32) {
    if (N <= kSmallBatch && WgmmaEnabled(di) && per_col >= kSmallGradMinBlocksPerColumn)
      return LaunchSmallBatchGradW<T, FA, BS>(p, N, blocks, device, di, s);
  }
  if constexpr (sizeof(T) == 2) {
    if (WgmmaEnabled(di) && N > kSmallBatch) {
      if constexpr (BS == 16) {
        if (N >= kColumnGradBs16LongBatch)
          return LaunchWgmmaGradWColumns<T, FA, 16, ColumnGradCfgBs16Long, FA == 1>(
              p, N, blocks, device, di, s);
      }
      if constexpr (BS == 32) {
        if (per_col < kColumnGradBs32FourBlocks || Tuning() == 12)
          return LaunchWgmmaGradWColumns<T, FA, 32, ColumnGradCfgBs32Two>(p, N, blocks, device,
                                                                          di, s);
        const bool long_axis0 = FA == 0 && N >= kColumnGradBs32FourBlocksAxis0Rows &&
                                per_col * N >= kColumnGradBs32FourBlocksAxis0Work;
        if (per_col < kColumnGradBs32EightBlocks || long_axis0 || Tuning() == 11)
          return LaunchWgmmaGradWColumns<T, FA, 32, ColumnGradCfgBs32Four>(p, N, blocks, device,
                                                                           di, s);
      }
      if constexpr (BS == 64) {
        const int group = Bs64GradGroupBlocks<T, FA>(N, p.C, per_col, di);
        if (group == 8)
          return LaunchWgmmaGradWColumns<T, FA, 64, ColumnGradCfgBs64Eight>(p, N, blocks,
                                                                            device, di, s);
        if (group == 4)
          return LaunchWgmmaGradWColumns<T, FA, 64, ColumnGradCfgBs64Four>(p, N, blocks,
                                                                           device, di, s);
      }
      if constexpr (BS == 32)  // 8-block groups, paced over long batches (feature axis 1)
        return LaunchWgmmaGradWColumns<T, FA, 32, typename ColumnGradCfgOf<32>::type, FA == 1>(
            p, N, blocks, device, di, s);
      return LaunchWgmmaGradWColumns<T, FA, BS>(p, N, blocks, device, di, s);
    }
  }
  if (N <= kShortGradBatch && !(sizeof(T) == 2 && BS >= 32)) {
    using Cfg = typename GradCfgShort<T, FA, BS>::type;
    return LaunchMmaGradW<Cfg>(p, N, blocks, device, di, s);
  }
  if constexpr (sizeof(T) == 2 && BS == 32) {
    if (per_col >= kGradGroup4MinBlocksPerColumn) {
      using Cfg = typename GradCfgGroup4<T, FA>::type;
      return LaunchMmaGradW<Cfg>(p, N, blocks, device, di, s);
    }
  }
  if constexpr (sizeof(T) == 4 && BS == 16) {
    if (per_col >= kGradF32Bs16Group8MinBlocksPerColumn) {
      using Cfg = typename GradCfgF32Bs16Group8<T, FA>::type;
      return LaunchMmaGradW<Cfg>(p, N, blocks, device, di, s);
    }
    if (per_col >= kGradF32Bs16PairMinBlocksPerColumn &&
        per_col < GroupedGradMinBlocksPerColumn<T, BS>()) {
      using Cfg = typename GradCfgF32Bs16Pair<T, FA>::type;
      return LaunchMmaGradW<Cfg>(p, N, blocks, device, di, s);
    }
  }
  if (per_col < GroupedGradMinBlocksPerColumn<T, BS>()) {
    using Cfg = typename GradCfgSingle<T, FA, BS>::type;
    return LaunchMmaGradW<Cfg>(p, N, blocks, device, di, s);
  }
  using Cfg = typename GradCfg<T, FA, BS>::type;
  static_assert(Cfg::kGroup > 1, "long-batch gradw tiles group blocks");
  return LaunchMmaGradW<Cfg>(p, N, blocks, device, di, s);
}

template <typename T, int FA>
int GradWMmaFa(const Params& p, int64_t N, int64_t bs, int64_t blocks, int device,
               const DeviceInfo& di, cudaStream_t s) {
  switch (bs) {
    case 16: return GradWMmaBs<T, FA, 16>(p, N, blocks, device, di, s);
    case 32: return GradWMmaBs<T, FA, 32>(p, N, blocks, device, di, s);
    case 64: return GradWMmaBs<T, FA, 64>(p, N, blocks, device, di, s);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
int ForwardMma(const Params& p, int feature_axis, int64_t N, int64_t bs, int64_t KB,
               int64_t blocks, int device, const DeviceInfo& di, cudaStream_t stream,
               bool w_transposed) {
  if (w_transposed) {
    return feature_axis == 1 ? ForwardMmaFa<T, 1, true>(p, N, bs, KB, blocks, device, di, stream)
                             : ForwardMmaFa<T, 0, true>(p, N, bs, KB, blocks, device, di, stream);
  }
  return feature_axis == 1 ? ForwardMmaFa<T, 1, false>(p, N, bs, KB, blocks, device, di, stream)
                           : ForwardMmaFa<T, 0, false>(p, N, bs, KB, blocks, device, di, stream);
}

template <typename T>
int GradWMma(const Params& p, int feature_axis, int64_t N, int64_t bs, int64_t blocks,
             int device, const DeviceInfo& di, cudaStream_t stream) {
  return feature_axis == 1 ? GradWMmaFa<T, 1>(p, N, bs, blocks, device, di, stream)
                           : GradWMmaFa<T, 0>(p, N, bs, blocks, device, di, stream);
}

}  // namespace internal
}  // namespace gpu
}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_DISPATCH_CUH_
