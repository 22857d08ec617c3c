// dW for small batches (N <= kRows; 16-bit with bs 16 / 32 / 64, float32 as 3xTF32 with bs 16 /
// 32; mma.sync): a CTA computes a run of up to p.run_blocks consecutive blocks of one block
// column, several blocks per pipeline step.
//
// With a few dozen batch rows a block's dW is one short product (bs x N times N x bs), so a
// kernel that gives each block its own CTA spends its time starting CTAs and waiting for their
// first copies, and one that splits a block over several warps reads each operand from shared
// memory several times (at N = 64 shared-memory traffic, not the MMAs, set the pace).  Here:
//   - the column's dy slab is copied once per CTA, and every warp keeps its MMA fragments in
//     registers for the whole run;
//   - each warp computes 32 rows (input features; 16 for bs 16) of a block, all bs columns, so
//     every x slab is read from shared memory once; a step holds kPerStep blocks (4, or 2 for
//     bs 64), and the x slabs of the next steps are on their way while one step's MMAs run;
//   - each warp stages its results in the x slab it has just read and writes whole rows.
// Every dW element is one warp's sum over the batch in a fixed order: deterministic.
#ifndef BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_GRADW_SMALL_BATCH_CUH_
#define BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_GRADW_SMALL_BATCH_CUH_

#include "ops/blocksparse_matmul_gpu_mma.cuh"

namespace blocksparse {
namespace gpu {
namespace mma_impl {

// ES: element bytes (2 or 4).  BS: block size.  ROWS: batch rows (N <= ROWS, one MMA K extent
// of ROWS).  MAX_RUN: most blocks per CTA.  STAGES: pipeline depth, in steps of kPerStep blocks.
template <int ES, int BS, int ROWS, int MAX_RUN, int STAGES>
struct SmallGradCfg {
  static constexpr int kES = ES, kBS = BS, kRows = ROWS, kMaxRun = MAX_RUN, kStages = STAGES;
  static constexpr int kThreads = 128;
  // A warp computes kWarpRows block rows (input features) by all BS columns.
  static constexpr int kWarpRows = BS < 32 ? BS : 32;
  static constexpr int kWarpsPerBlock = BS / kWarpRows;
  static constexpr int kPerStep = 4 / kWarpsPerBlock;  // blocks per step
  static constexpr int kCE = 16 / ES;                  // elements per 16-byte copy
  static constexpr int kKSlice = ES == 4 ? 8 : 16;     // K of one MMA
  // A slab holds ROWS x BS of x or dy: feature axis 1 stores it [ROWS][BS + 8] (batch rows),
  // feature axis 0 [BS][ROWS + kCE] (feature rows); the padding keeps ldmatrix and the float32
  // scalar fragment loads conflict-free.
  template <int FA>
  static constexpr int kLd = FA == 1 ? BS + 8 : ROWS + kCE;
  // After its MMAs a warp stages its kWarpRows x BS results in the slab it read.
  static constexpr int kOutLd = BS + 8;
  static constexpr int kOutElems = kWarpsPerBlock * kWarpRows * kOutLd;
  template <int FA>
  static constexpr int kSlab = (FA == 1 ? ROWS : BS) * kLd<FA> > kOutElems
                                   ? (FA == 1 ? ROWS : BS) * kLd<FA>
                                   : kOutElems;  // elements
  template <int FA>
  static constexpr int kSmemBytes = (STAGES * kPerStep + 1) * kSlab<FA> * ES;
  static_assert(BS == 16 || BS == 32 || (BS == 64 && ES == 2), "tensor-core block sizes "
                "(float32 bs 64 would hold too many dy fragments)");
  static_assert(ROWS % 16 == 0 && STAGES >= 2 && MAX_RUN % kPerStep == 0, "config");
};

template <typename T, int FA, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) SmallBatchGradWKernel(const Params p) {
  constexpr int BS = Cfg::kBS, ROWS = Cfg::kRows, ST = Cfg::kStages, NTH = Cfg::kThreads;
  constexpr int P = Cfg::kPerStep, CE = Cfg::kCE;
  constexpr int LD = Cfg::template kLd<FA>, SLAB = Cfg::template kSlab<FA>;
  constexpr bool kF32 = sizeof(T) == 4;
  static_assert(sizeof(T) == Cfg::kES, "element size of the configuration");
  constexpr int KQ = ROWS / Cfg::kKSlice, NT = BS / 8, MT = Cfg::kWarpRows / 16;  // MMA tiles
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int s_run[3], s_warp[NTH / 32];
  __shared__ int s_b[Cfg::kMaxRun], s_c[Cfg::kMaxRun];
  T* dys = reinterpret_cast<T*>(smem_raw);  // the column's dy slab
  T* xs = dys + SLAB;                       // ST stages of P x slabs

  const T* __restrict__ gx = static_cast<const T*>(p.x);
  const T* __restrict__ gd = static_cast<const T*>(p.w);
  T* __restrict__ gdw = static_cast<T*>(p.y);
  const int64_t N = p.N, C = p.C, K = p.K;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int run = static_cast<int>(p.run_blocks);
  FindColumnRun(p.col_ptr, K / BS, blockIdx.x, run, s_run, s_warp);
  const int kcol = s_run[0];
  if (kcol < 0) return;  // past the last run (the grid is launched on a bound)
  const int pbeg = s_run[1], nblk = s_run[2] - s_run[1];
  for (int i = tid; i < nblk; i += NTH) {
    s_b[i] = __ldg(p.col_block + pbeg + i);
    s_c[i] = __ldg(p.col_row + pbeg + i);
  }
  __syncthreads();
  const int steps = (nblk + P - 1) / P;

  // Copies one slab (block `blk` of the features of g, F of them) into dst.  Rows (feature
  // axis 1) or chunks (feature axis 0) at or past N are zero-filled.
  auto load_slab = [&](T* dst, const T* g, int64_t F, int blk) {
    if constexpr (FA == 1) {  // g (N, F): ROWS rows of BS features
      constexpr int kCh = BS / CE, kTotal = ROWS * kCh;
#pragma unroll
      for (int q = tid; q < kTotal; q += NTH) {
        const int n = q / kCh, ch = q % kCh;
        const bool v = n < N;
        CpAsync16(dst + n * LD + ch * CE, v ? g + n * F + (int64_t)blk * BS + ch * CE : g, v);
      }
    } else {  // g (F, N): BS feature rows of ROWS batch entries
      constexpr int kCh = ROWS / CE, kTotal = BS * kCh;
#pragma unroll
      for (int q = tid; q < kTotal; q += NTH) {
        const int i = q / kCh, ch = q % kCh;
        const bool v = ch * CE < N;
        CpAsync16(dst + i * LD + ch * CE, v ? g + ((int64_t)blk * BS + i) * N + ch * CE : g, v);
      }
    }
  };
  auto load_step = [&](int s) {
#pragma unroll
    for (int j = 0; j < P; ++j)
      if (s * P + j < nblk) load_slab(xs + ((s % ST) * P + j) * SLAB, gx, C, s_c[s * P + j]);
  };

  load_slab(dys, gd, K, kcol);  // in the first step's group
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < steps) load_step(s);
    CpAsyncCommit();
  }
  const int slot = warp / Cfg::kWarpsPerBlock;         // the warp's block in a step
  const int m0 = (warp % Cfg::kWarpsPerBlock) * Cfg::kWarpRows;  // its first row there
  uint32_t bf[KQ][NT][2];  // dy fragments, loaded once the first group has landed
  const int grp = lane >> 2, tig = lane & 3;
  for (int s = 0; s < steps; ++s) {
    CpAsyncWait<ST - 2>();
    __syncthreads();  // step s has landed; every warp is done with step s - 1's buffers
    if (s + ST - 1 < steps) load_step(s + ST - 1);
    CpAsyncCommit();
    if (s == 0) {
      // dW block = x_slab^T dy_slab: M = input features, N = output features, K = batch rows;
      // feature axis 1 keeps both slabs batch-row-major (M / N contiguous).
#pragma unroll
      for (int kk = 0; kk < KQ; ++kk)
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          uint32_t r[4];
          if constexpr (kF32)
            LoadBFragmentPairF32<FA == 0>(r, reinterpret_cast<const uint32_t*>(dys), LD, np * 16,
                                          kk, lane);
          else
            LoadBFragmentPair<FA == 0>(r, dys, LD, np * 16, kk, lane);
          bf[kk][2 * np][0] = r[0];
          bf[kk][2 * np][1] = r[1];
          bf[kk][2 * np + 1][0] = r[2];
          bf[kk][2 * np + 1][1] = r[3];
        }
    }
    const int e = s * P + slot;
    if (e >= nblk) continue;  // the last step's missing blocks
    const T* As = xs + ((s % ST) * P + slot) * SLAB;
    float acc[MT][NT][4];
#pragma unroll
    for (int a = 0; a < MT; ++a)
#pragma unroll
      for (int b = 0; b < NT; ++b)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[a][b][q] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KQ; ++kk) {
      if constexpr (!kF32) {
        uint32_t af[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          LoadAFragment<FA == 1>(af[mt], As, LD, m0 + mt * 16, kk, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            MmaOp<T>::Run(acc[mt][nt], af[mt], bf[kk][nt][0], bf[kk][nt][1]);
      } else {  // 3xTF32: a_lo b_hi + a_hi b_lo + a_hi b_hi, from zero (N <= ROWS products)
        uint32_t ah[MT][4], al[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          uint32_t a[4];
          LoadAFragmentF32<FA == 1>(a, reinterpret_cast<const uint32_t*>(As), LD,
                                    m0 + mt * 16, kk, lane);
#pragma unroll
          for (int q = 0; q < 4; ++q) SplitTf32(a[q], ah[mt][q], al[mt][q]);
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          uint32_t bh0, bl0, bh1, bl1;
          SplitTf32(bf[kk][nt][0], bh0, bl0);
          SplitTf32(bf[kk][nt][1], bh1, bl1);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            MmaTf32(acc[mt][nt], al[mt], bh0, bh1);
            MmaTf32(acc[mt][nt], ah[mt], bl0, bl1);
            MmaTf32(acc[mt][nt], ah[mt], bh0, bh1);
          }
        }
      }
    }
    // Results -> the slab (once the block's warps are done reading it) -> 16-byte stores of
    // whole rows (fragment-sized stores would write each 32-byte sector in two halves).
    if constexpr (Cfg::kWarpsPerBlock > 1)
      asm volatile("bar.sync %0, %1;\n" ::"r"(1 + slot), "r"(32 * Cfg::kWarpsPerBlock));
    else
      __syncwarp();
    T* os = const_cast<T*>(As) + m0 * Cfg::kOutLd;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        T* o = os + (mt * 16 + grp) * Cfg::kOutLd + nt * 8 + 2 * tig;
        if constexpr (kF32) {
          *reinterpret_cast<float2*>(o) = make_float2(acc[mt][nt][0], acc[mt][nt][1]);
          *reinterpret_cast<float2*>(o + 8 * Cfg::kOutLd) =
              make_float2(acc[mt][nt][2], acc[mt][nt][3]);
        } else {
          *reinterpret_cast<uint32_t*>(o) = PackPair<T>(acc[mt][nt][0], acc[mt][nt][1]);
          *reinterpret_cast<uint32_t*>(o + 8 * Cfg::kOutLd) =
              PackPair<T>(acc[mt][nt][2], acc[mt][nt][3]);
        }
      }
    __syncwarp();
    T* dst = gdw + (int64_t)s_b[e] * BS * BS + m0 * BS;
    constexpr int kCh = BS / CE;
#pragma unroll
    for (int q = lane; q < Cfg::kWarpRows * kCh; q += 32) {
      const int r = q / kCh, ch = q % kCh;
      *reinterpret_cast<uint4*>(dst + r * BS + ch * CE) =
          *reinterpret_cast<const uint4*>(os + r * Cfg::kOutLd + ch * CE);
    }
  }
}

}  // namespace mma_impl
}  // namespace gpu
}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_GRADW_SMALL_BATCH_CUH_
