// Block-sparse products on Hopper's warpgroup MMA (wgmma, sm_90a) for 16-bit inputs: the
// forward for both feature axes with N > 64 (the dispatch's default on sm_90; dx is this same
// product) for bs 64 below 512 rows (below) and bs 16 / 32 (WgmmaForwardNarrowKernel, which
// also runs bs 32 and 64 with N <= 64 and bs 64 from 512 rows), and dW for bs 16 / 32 / 64, both
// feature axes (WgmmaGradWColumnKernel); and the bs-32 forward over groups of block columns
// (WgmmaForwardGroupedKernel, from 1000 rows on layouts whose neighbouring columns share rows).
//
// Why: the mma.sync kernels issue one instruction per 16 x 8 x 16 product plus the ldmatrix
// loads that feed it, and measured on an H200 they are bound by instruction issue (see
// docs/benchmarks_gpu.md).  One wgmma multiplies 64 x N x 16 with both operands read from
// shared memory.  The narrow forward (below) copies through the copy engine where it can
// (blocksparse_matmul_gpu_tma.cuh); the others copy with cp.async.
//
// bs-64 forward: the product is computed transposed, y^T = W^T x^T, so that the 64 x 64 weight
// block is the 64-row A operand and 128 batch rows are wgmma's N: one warpgroup (the CTA)
// computes y[n0 .. n0 + 128, block column k]^T.  Per stored block of the column, in increasing
// block row (a fixed order of sums, so results are deterministic):
//   acc[64 x 128] += W(c, k)^T (A: 64 x 64, stored M-contiguous: the transpose flag)
//                  * x[n0.., c-block]^T (B: 64 x 128; feature axis 1: K-contiguous, no
//                    transpose; feature axis 0: N-contiguous, transposed)
// as four k16 slices.  Operands stream through a kStages-deep cp.async pipeline into shared
// memory in the 128-byte swizzle that the descriptors name: a 64-element (128-byte) row r
// keeps its 16-byte chunk c at position c ^ (r % 8); tiles start on 1024-byte boundaries and
// 8-row groups are 1024 bytes apart (the stride byte offset).  A k16 slice advances an
// MN-contiguous tile (W; x with feature axis 0) by two 8-row groups (2048 bytes) and a
// K-contiguous tile (x with feature axis 1) by 32 bytes inside its swizzled rows.  With
// feature axis 0 the x tile is two 64-column swizzle atoms, 8 KiB apart (the leading byte
// offset).  One wgmma group stays in flight while the next step's copies are issued, so
// copies run kStages - 2 steps ahead.  A CTA may loop over several tiles (persistent CTAs, see
// WgmmaForwardKernel), its copies running on into the next tile.
#ifndef BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_WGMMA_CUH_
#define BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_WGMMA_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <climits>
#include <type_traits>

#include "ops/blocksparse_matmul_gpu_mma.cuh"
#include "ops/blocksparse_matmul_gpu_tma.cuh"

namespace blocksparse {
namespace gpu {
namespace wgmma_impl {

using mma_impl::CpAsync16;
using mma_impl::CpAsyncCommit;
using mma_impl::CpAsyncWait;
using mma_impl::FindColumnRun;
using mma_impl::FindColumnRunLongestFirst;
using mma_impl::FromF;
using mma_impl::PackPair;
using mma_impl::Params;
using mma_impl::SmemAddr;
using mma_impl::StoreChunk;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BSMM_HAS_WGMMA 1
#else
#define BSMM_HAS_WGMMA 0
#endif

constexpr int kBS = 64;  // block size

// One warpgroup, 128 batch rows, kStagesT pipeline stages.
template <int kStagesT>
struct FwdCfg {
  static constexpr int kBM = 128;  // batch rows per CTA: wgmma N
  static constexpr int kThreads = 128;
  static constexpr int kStages = kStagesT;
  static constexpr int kWBytes = kBS * kBS * 2;  // weight block, 8 KiB
  static constexpr int kXBytes = kBM * kBS * 2;  // x tile, 16 KiB
  static constexpr int kStageBytes = kWBytes + kXBytes;
  // Epilogue staging rows (elements of T) in a free pipeline stage, padded by 16 bytes for
  // conflict-free writes: feature axis 1 stages y rows (64 features), feature axis 0 y^T rows
  // (128 batch entries).
  static constexpr int kStageLd1 = kBS + 8, kStageLd0 = kBM + 8;
  static_assert(kBM * kStageLd1 * 2 <= kStageBytes && kBS * kStageLd0 * 2 <= kStageBytes,
                "the output tile is staged in one pipeline stage");
  static constexpr int kSmemBytes = 1024 + kStages * kStageBytes;
  static_assert(kStages >= 3, "one wgmma group in flight needs a third stage");
};

// Swizzled tiles must start on 1024-byte boundaries: the dynamic shared memory rounded up to
// one (the configurations reserve 1024 bytes for this).
__device__ __forceinline__ unsigned char* Align1024(unsigned char* raw, uint32_t* shared_addr) {
  const uint32_t a = SmemAddr(raw);
  const uint32_t pad = (1024 - (a & 1023)) & 1023;
  *shared_addr = a + pad;
  return raw + pad;
}

// Byte offset of 16-byte chunk c of row r in a tile of kRowBytes-byte rows in the kRowBytes
// swizzle (128, 64 or 32 bytes): the chunk index is XORed with bits of r / (128 / kRowBytes),
// so the pattern repeats every 8 rows (1024 address bytes, bits 7-9 onto bits 4-6).
template <int kRowBytes>
__device__ __forceinline__ int SwizzledR(int r, int c) {
  static_assert(kRowBytes == 128 || kRowBytes == 64 || kRowBytes == 32, "swizzle widths");
  constexpr int kShift = kRowBytes == 128 ? 0 : kRowBytes == 64 ? 1 : 2;
  return r * kRowBytes + ((c ^ ((r >> kShift) & (kRowBytes / 16 - 1))) << 4);
}
// Descriptor of a tile of kRowBytes-byte rows in that swizzle (modes 1, 2, 3 for 128, 64, 32
// bytes): 8-row groups are 8 kRowBytes apart (the stride offset).  The leading offset is the
// distance between swizzle atoms (kRowBytes / 2 elements) along the contiguous dimension of an
// N-contiguous operand wider than one atom; unused otherwise (then set to the stride).
template <int kRowBytes>
__device__ __forceinline__ uint64_t DescriptorR(uint32_t smem_addr,
                                                uint32_t lead_bytes = 8 * kRowBytes) {
  constexpr uint64_t kGroup = (8 * kRowBytes) >> 4;
  constexpr uint64_t kMode = kRowBytes == 128 ? 1 : kRowBytes == 64 ? 2 : 3;
  return (static_cast<uint64_t>(smem_addr >> 4) & 0x3FFF) |
         (static_cast<uint64_t>((lead_bytes >> 4) & 0x3FFF) << 16) | (kGroup << 32) |
         (kMode << 62);
}


#define BSMM_ACC8(i)                                                                           \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define BSMM_ACC32(i) BSMM_ACC8(i), BSMM_ACC8(i + 8), BSMM_ACC8(i + 16), BSMM_ACC8(i + 24)
#define BSMM_REGS8 "%0, %1, %2, %3, %4, %5, %6, %7"
#define BSMM_REGS16 BSMM_REGS8 ", %8, %9, %10, %11, %12, %13, %14, %15"
#define BSMM_REGS32                                                                 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, " \
  "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define BSMM_REGS64                                                                        \
  BSMM_REGS32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, "    \
              "%46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, " \
              "%61, %62, %63"
// D (64 x N, float) += A (64 x 16) * B (16 x N); A stored K-contiguous (TA "0") or
// M-contiguous (TA "1", the transpose flag), B K-contiguous (TB "0") or N-contiguous (TB "1").
#define BSMM_WGMMA(SHAPE, TYPES, TA, TB, REGS, A, B, SCALE, ...)                         \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                        \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPES " {" REGS "}, " A     \
               ", " B ", p, 1, 1, " TA ", " TB ";\n}\n"                                 \
               : __VA_ARGS__                                                             \
               : "l"(a), "l"(b), "r"(1))
#define BSMM_WGMMA_TYPES_TA(SHAPE, TA, TB, REGS, A, B, SCALE, ...)                        \
  if constexpr (std::is_same<T, __nv_bfloat16>::value)                                    \
    BSMM_WGMMA(SHAPE, "bf16.bf16", TA, TB, REGS, A, B, SCALE, __VA_ARGS__);               \
  else                                                                                    \
    BSMM_WGMMA(SHAPE, "f16.f16", TA, TB, REGS, A, B, SCALE, __VA_ARGS__)

// D (64 x N, float) += A (64 x 16) * B (16 x N), N in {16, 32, 64, 128}: A stored
// K-contiguous (kTA false) or M-contiguous (true: the transpose flag), B K-contiguous (kTB
// false) or N-contiguous (true).
#define BSMM_WGMMA_FLAGS(SHAPE, REGS, A, B, SCALE, ...)                            \
  if constexpr (kTA && kTB) {                                                      \
    BSMM_WGMMA_TYPES_TA(SHAPE, "1", "1", REGS, A, B, SCALE, __VA_ARGS__);          \
  } else if constexpr (kTA) {                                                      \
    BSMM_WGMMA_TYPES_TA(SHAPE, "1", "0", REGS, A, B, SCALE, __VA_ARGS__);          \
  } else if constexpr (kTB) {                                                      \
    BSMM_WGMMA_TYPES_TA(SHAPE, "0", "1", REGS, A, B, SCALE, __VA_ARGS__);          \
  } else {                                                                         \
    BSMM_WGMMA_TYPES_TA(SHAPE, "0", "0", REGS, A, B, SCALE, __VA_ARGS__);          \
  }
template <typename T, int N, bool kTA, bool kTB>
__device__ __forceinline__ void Wgmma(float* d, uint64_t a, uint64_t b) {
#if BSMM_HAS_WGMMA
  if constexpr (N == 16) {
    BSMM_WGMMA_FLAGS("m64n16k16", BSMM_REGS8, "%8", "%9", "%10", BSMM_ACC8(0));
  } else if constexpr (N == 32) {
    BSMM_WGMMA_FLAGS("m64n32k16", BSMM_REGS16, "%16", "%17", "%18", BSMM_ACC8(0),
                     BSMM_ACC8(8));
  } else if constexpr (N == 64) {
    BSMM_WGMMA_FLAGS("m64n64k16", BSMM_REGS32, "%32", "%33", "%34", BSMM_ACC32(0));
  } else {
    static_assert(N == 128, "the shapes these kernels use");
    BSMM_WGMMA_FLAGS("m64n128k16", BSMM_REGS64, "%64", "%65", "%66", BSMM_ACC32(0),
                     BSMM_ACC32(32));
  }
#else
  (void)d;
  (void)a;
  (void)b;
#endif
}
#undef BSMM_WGMMA_FLAGS
#undef BSMM_WGMMA_TYPES_TA
#undef BSMM_WGMMA
#undef BSMM_REGS64
#undef BSMM_REGS32
#undef BSMM_REGS16
#undef BSMM_REGS8
#undef BSMM_ACC32
#undef BSMM_ACC8

__device__ __forceinline__ void WgmmaFence() {
#if BSMM_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void WgmmaCommit() {
#if BSMM_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void WgmmaWait() {
#if BSMM_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}
// Stores four 8 x 8 16-bit matrices transposed: register m holds this thread's pair of matrix
// m (row lane / 4, columns 2 (lane % 4) + {0, 1}, the mma fragment layout); lane 8 m + j
// gives the shared-memory address of row j of stored matrix m (column j of the fragment).
__device__ __forceinline__ void StoreMatrixX4Trans(uint32_t smem_addr, uint32_t r0, uint32_t r1,
                                                   uint32_t r2, uint32_t r3) {
#if BSMM_HAS_WGMMA
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                   smem_addr),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
#else
  (void)smem_addr, (void)r0, (void)r1, (void)r2, (void)r3;
#endif
}
// Makes this thread's completed shared-memory writes (cp.async) visible to wgmma's reads.
__device__ __forceinline__ void FenceSharedForAsyncProxy() {
#if BSMM_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Stages an accumulator of y^T (64 output features x kN batch rows, m64nkNk16 fragments:
// this thread holds features m and m + 8 of batch rows 8 i + n and 8 i + n + 1) as rows of y:
// staged row r (L elements apart) is batch row r, its 64 features rounded to T.
template <typename T, int kN, int L>
__device__ __forceinline__ void StageTransposedAcc(const float* acc, T* Cs, int m, int n) {
#pragma unroll
  for (int i = 0; i < kN / 8; ++i) {
    T* r = Cs + (8 * i + n) * L + m;
    r[0] = FromF<T>(acc[4 * i]);
    r[L] = FromF<T>(acc[4 * i + 1]);
    r[8] = FromF<T>(acc[4 * i + 2]);
    r[L + 8] = FromF<T>(acc[4 * i + 3]);
  }
}

// Copies a staged output tile to y in 16-byte chunks; staged rows are kWidth elements, L
// apart.  Feature axis 1 (y (N, K)): staged row r is batch row n0 + r, written from column
// col0 up to col0 + width (a multiple of 8); rows at or past N are skipped.  Feature axis 0
// (y (K, N)): staged row r is output feature col0 + r, written from batch entry n0; chunks at
// or past N are skipped (N % 8 == 0).
template <typename T, int FA, int kRows, int kWidth, int L, int kThreads>
__device__ __forceinline__ void CopyOutStagedTile(const T* Cs, T* gy, int tid, int64_t n0,
                                                  int64_t N, int64_t K, int64_t col0,
                                                  int64_t width = kWidth) {
  for (int q = tid; q < kRows * (kWidth / 8); q += kThreads) {
    const int row = q / (kWidth / 8), c8 = (q % (kWidth / 8)) * 8;
    T* dst;
    if constexpr (FA == 1) {
      if (n0 + row >= N) break;  // rows only grow with q
      if (c8 >= width) continue;
      dst = gy + (n0 + row) * K + col0 + c8;
    } else {
      if (n0 + c8 >= N) continue;
      dst = gy + (col0 + row) * N + n0 + c8;
    }
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(Cs + row * L + c8);
  }
}

// The forward.  Tile t (of KB x ceil(N / 128)) is block column t % KB, batch rows
// 128 (t / KB) ..; CTA i takes tiles i, i + gridDim.x, ... (persistent when the grid is smaller
// than the tile count).  The copies run through this CTA's steps in that order without stopping
// at tile ends, so the next tile's first steps are in flight during a tile's epilogue.  Step j
// of the CTA (counted over its tiles) uses pipeline stage j % kStages; at an epilogue, after g
// steps, copies are in flight into stages g .. g + kStages - 3 (mod kStages), so stage
// g + kStages - 1 is free and stages the tile's output (as T: rounded exactly as stored).
// Needs sm_90a; with feature axis 0, N % 8 == 0 (as for the mma.sync kernels).
// With kTransW each stored block holds the transpose of the product's block (the input
// gradient's weights, read as stored): the same copies, A (W^T) read K-contiguous (32 bytes
// into its rows per k16 slice) instead of M-contiguous, the same sums.
template <typename T, int FA, class Cfg, bool kTransW = false>
__global__ void __launch_bounds__(Cfg::kThreads) WgmmaForwardKernel(const Params p) {
#if BSMM_HAS_WGMMA
  constexpr int kBM = Cfg::kBM, kStages = Cfg::kStages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint32_t smem_base;  // shared-memory address of smem
  unsigned char* smem = Align1024(smem_raw, &smem_base);

  const T* __restrict__ gx = static_cast<const T*>(p.x);
  const T* __restrict__ gw = static_cast<const T*>(p.w);
  T* __restrict__ gy = static_cast<T*>(p.y);
  const int64_t N = p.N, C = p.C, K = p.K;
  const int64_t KB = K / kBS, tiles = KB * ((N + kBM - 1) / kBM);
  const int tid = threadIdx.x;

  // Copies: W rows tid / 8 + 16 j, chunk tid % 8.  x, feature axis 1: batch rows
  // tid / 8 + 16 j, chunk tid % 8; feature axis 0: feature rows tid / 16 + 8 j, 16-byte chunk
  // tid % 16 of the 128 batch entries (atom chunk / 8, chunk % 8 inside it).  A row
  // r + 16 j (r + 8 j) keeps row r's swizzle, since r % 8 does not change.
  const int w_chunk = tid & 7, w_row0 = tid >> 3;
  const T* const w_src = gw + w_row0 * kBS + w_chunk * 8;
  constexpr int kXRowStep = FA == 1 ? 16 : 8;
  const int x_chunk = FA == 1 ? tid & 7 : tid & 15, x_row0 = FA == 1 ? tid >> 3 : tid >> 4;
  const int x_dst0 = FA == 1 ? SwizzledR<128>(x_row0, x_chunk)
                             : (x_chunk >> 3) * (kBS * 128) + SwizzledR<128>(x_row0, x_chunk & 7);
  // Copies of the step of block b at block row c, for batch rows n0.., into stage buf.
  auto load_step = [&](int c, int b, int64_t n0, int buf) {
    unsigned char* Ws = smem + buf * Cfg::kStageBytes;
    unsigned char* Xs = Ws + Cfg::kWBytes;
    const T* wsrc = w_src + static_cast<int64_t>(b) * (kBS * kBS);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      CpAsync16(Ws + SwizzledR<128>(w_row0 + 16 * j, w_chunk), wsrc + 16 * j * kBS, true);
    if constexpr (FA == 1) {  // rows at or past N are zero-filled
      const int64_t rows_left = N - n0 - x_row0;
      const T* xsrc = gx + (n0 + x_row0) * C + static_cast<int64_t>(c) * kBS + x_chunk * 8;
#pragma unroll
      for (int j = 0; j < kBM / kXRowStep; ++j) {
        const bool v = kXRowStep * j < rows_left;
        CpAsync16(Xs + x_dst0 + kXRowStep * j * 128,
                  v ? xsrc + static_cast<int64_t>(kXRowStep * j) * C : gx, v);
      }
    } else {  // chunks at or past N are zero-filled
      const bool v = n0 + x_chunk * 8 < N;
      const T* xsrc = gx + (static_cast<int64_t>(c) * kBS + x_row0) * N + n0 + x_chunk * 8;
#pragma unroll
      for (int j = 0; j < kBS / kXRowStep; ++j)
        CpAsync16(Xs + x_dst0 + kXRowStep * j * 128,
                  v ? xsrc + static_cast<int64_t>(kXRowStep * j) * N : gx, v);
    }
  };

  // The copy cursor: tile lt, its step ls of lsteps (list positions lpbeg ..).
  int64_t lt = blockIdx.x, ln0 = 0;
  int ls = 0, lsteps = 0, lpbeg = 0;
  auto open_tile = [&](int64_t t, int& pbeg, int& steps, int64_t& n0) {
    const int kc = static_cast<int>(t % KB);
    pbeg = __ldg(p.col_ptr + kc);
    steps = __ldg(p.col_ptr + kc + 1) - pbeg;
    n0 = (t / KB) * kBM;
  };
  auto seek = [&]() {  // to the next step that exists, or lt >= tiles
    while (lt < tiles && ls >= lsteps) {
      lt += gridDim.x;
      ls = 0;
      if (lt < tiles) open_tile(lt, lpbeg, lsteps, ln0);
    }
  };
  // The cursor step's block row and block, read one step ahead of its copies so that the
  // copies (issued before the wgmma of each step) never wait for these loads.
  int lc = 0, lb = 0;
  auto fetch_index = [&]() {
    if (lt < tiles) {
      lc = __ldg(p.col_row + lpbeg + ls);
      lb = __ldg(p.col_block + lpbeg + ls);
    }
  };
  auto issue_next_copy = [&](int buf) {
    if (lt < tiles) {
      load_step(lc, lb, ln0, buf);
      ++ls;
      seek();
      fetch_index();
    }
    CpAsyncCommit();  // one group per step, empty or not, so the waits count steps
  };
  if (lt < tiles) open_tile(lt, lpbeg, lsteps, ln0);
  seek();
  fetch_index();
#pragma unroll
  for (int s = 0; s < kStages - 2; ++s) issue_next_copy(s);

  const int lane = tid & 31, m = 16 * (tid >> 5) + (lane >> 2), n = 2 * (lane & 3);
  int g = 0;  // steps computed by this CTA so far
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    int pbeg, steps;
    int64_t n0;
    open_tile(t, pbeg, steps, n0);
    const int kcol = static_cast<int>(t % KB);
    float acc[kBM / 2];
#pragma unroll
    for (int e = 0; e < kBM / 2; ++e) acc[e] = 0.f;
    for (int s = 0; s < steps; ++s, ++g) {
      CpAsyncWait<kStages - 3>();  // this thread's copies of step g have landed
      FenceSharedForAsyncProxy();
      __syncthreads();  // everyone's have; and step g - 2's wgmma (waited below) is done
      issue_next_copy((g + kStages - 2) % kStages);  // into the stage step g - 2 read
      const uint32_t w_base = smem_base + (g % kStages) * Cfg::kStageBytes;
      const uint32_t x_base = w_base + Cfg::kWBytes;
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kBS / 16; ++kk) {
        const uint64_t ad = DescriptorR<128>(w_base + (kTransW ? kk * 32 : kk * 2048));
        if constexpr (FA == 1)
          Wgmma<T, kBM, !kTransW, false>(acc, ad, DescriptorR<128>(x_base + kk * 32));
        else
          Wgmma<T, kBM, !kTransW, true>(acc, ad, DescriptorR<128>(x_base + kk * 2048, kBS * 128));
      }
      WgmmaCommit();
      WgmmaWait<1>();  // step g - 1's group is done; step g's may still run
    }
    WgmmaWait<0>();
    __syncthreads();  // the previous epilogue's reads of the staging stage are done

    // Epilogue: acc holds y^T (64 output features x 128 batch rows); thread t holds features
    // m (+ 8) of batch rows 8 i + n (+ 1).  Stage rows of the output's layout, then copy
    // 16-byte chunks out.
    T* Cs = reinterpret_cast<T*>(smem + ((g + kStages - 1) % kStages) * Cfg::kStageBytes);
    if constexpr (FA == 1) {  // y (N, K): staged rows are batch rows
      constexpr int L = Cfg::kStageLd1;
      StageTransposedAcc<T, kBM, L>(acc, Cs, m, n);
      __syncthreads();
      CopyOutStagedTile<T, 1, kBM, kBS, L, Cfg::kThreads>(Cs, gy, tid, n0, N, K,
                                                           static_cast<int64_t>(kcol) * kBS);
    } else {  // y (K, N): staged rows are output features
      constexpr int L = Cfg::kStageLd0;
#pragma unroll
      for (int i = 0; i < kBM / 8; ++i) {
        *reinterpret_cast<uint32_t*>(Cs + m * L + 8 * i + n) =
            PackPair<T>(acc[4 * i], acc[4 * i + 1]);
        *reinterpret_cast<uint32_t*>(Cs + (m + 8) * L + 8 * i + n) =
            PackPair<T>(acc[4 * i + 2], acc[4 * i + 3]);
      }
      __syncthreads();
      CopyOutStagedTile<T, 0, kBS, kBM, L, Cfg::kThreads>(Cs, gy, tid, n0, N, K,
                                                           static_cast<int64_t>(kcol) * kBS);
    }
  }
  CpAsyncWait<0>();
#else
  (void)p;
  __trap();
#endif
}

// ---- bs-16 / bs-32 forward (and bs 32 / 64 with small batches, bs 64 with long ones) ----
// 16-bit, both feature axes: bs 16 or 32 with N > 64, bs 32 or 64 with N <= 64 (one 64-row
// tile per block column), and bs 64 from 512 rows (the dispatch's choice: there it ran faster
// than the transposed bs-64 kernel above).  A bs 16 / 32 block is too short for wgmma's 64-row
// operand, so this product is not transposed: per stored block of the column, in the list's order,
//   y[n0 + 64 h .., k-block] += x[n0 + 64 h .., c-block] (A: 64 batch rows x BS)
//                              * W(c, k) (B: BS x BS, N-contiguous: the transpose flag)
// as BS / 16 m64nBSk16 slices, for the kBM / 64 row groups h of the CTA (which share each
// weight block read).  A pipeline step holds kBlocksPerStep blocks (their x tiles, then their
// weight blocks).  Shared memory (rows of R bytes in the R-byte swizzle, see SwizzledR):
//   x, feature axis 1 (A K-contiguous): R = 2 BS (the block's features); a k16 slice starts
//     32 bytes into the rows.
//   x, feature axis 0 (A M-contiguous, the transpose flag): per row group one 128-byte atom of
//     BS feature rows x 64 batch entries; a k16 slice is 16 rows (2 KiB) on.
//   W: R = 2 BS; a k16 slice is 16 rows on.
// Either way a row group's x tile is 128 BS bytes.  Same cp.async pipeline as the bs-64
// forward; one CTA, or one cluster, per tile (grid: KB split x ceil(N / kBM)); the output is
// staged (as T) after the pipeline drains.  A tile may be split over a cluster (launched with
// cluster dimension `split`): rank r sums the r-th of `split` runs of the column's list, the
// partial sums are staged as float and each rank adds them in rank order for its share of the
// output, so the result does not depend on timing.  With feature axis 0, N % 8 == 0.
// With kTensorMapCopies, a fifth warp issues the copies on the copy engine (per block one
// instruction for the weights and one per x tile: one, or one per row group with feature
// axis 0; into the same swizzled layouts) from the
// tensor maps in Params, each stage guarded by a `full` mbarrier (its bytes landed) and an
// `empty` one (the wgmma group that read it is done), so copies run up to kStages steps ahead
// and the four MMA warps only wait, multiply and release.
// With kTransW each stored block holds the transpose of the product's block (the input
// gradient's weights, read as stored): the same copies, the weight operand read K-contiguous
// (its rows are the product's output features) instead of N-contiguous, the same sums.
template <int BST, int kStagesT, int kBMT, int kBlocksPerStepT = 1, bool kTensorMapCopiesT = false,
          bool kTransWT = false>
struct NarrowFwdCfg {
  static constexpr int BS = BST;
  static constexpr bool kTransW = kTransWT;
  static constexpr int kBM = kBMT;  // batch rows per CTA
  static constexpr bool kTensorMapCopies = kTensorMapCopiesT;
  static constexpr int kMmaThreads = 128;  // the warpgroup that multiplies
  static constexpr int kThreads = kMmaThreads + (kTensorMapCopies ? 32 : 0);
  static constexpr int kStages = kStagesT;
  static constexpr int kBlocksPerStep = kBlocksPerStepT;  // a step's x tiles, then its blocks
  static constexpr int kXBytes = kBM * BS * 2;
  static constexpr int kWBytes = BS * BS * 2;
  // Stages start on 1024-byte boundaries (the x tile's swizzle atoms).
  static constexpr int kStageBytes =
      (kBlocksPerStep * (kXBytes + kWBytes) + 1023) / 1024 * 1024;
  // Staged output rows (elements), padded by 16 bytes for conflict-free writes: feature axis 1
  // stages y rows (BS features), feature axis 0 y^T rows (kBM batch entries).
  static constexpr int kStageLd1 = BS + 8, kStageLd0 = kBM + 8;
  // A tile split over a cluster stages float partial sums, rows of BS + 4 floats.
  static constexpr int kSplitLd = BS + 4;
  // With copy-engine copies and several blocks per step, a zero-filled x tile follows the
  // stages: a last step's missing blocks multiply it (x and w operands alike) instead of being
  // skipped, since there a data-dependent branch makes ptxas serialize the wgmmas (info C7520).
  // (The cp.async configurations skip them: no such report, and no room for the tile in the
  // bs-64 one.)
  static constexpr int kZeroOffset = kStages * kStageBytes;
  static constexpr int kZeroBytes = kBlocksPerStep > 1 && kTensorMapCopies ? kXBytes : 0;
  // The mbarriers (full, then empty, 8 bytes each) follow.
  static constexpr int kBarrierOffset = kZeroOffset + kZeroBytes;
  static constexpr int kSmemBytes =
      1024 + kBarrierOffset + (kTensorMapCopies ? 16 * kStages : 0);
  static_assert(32 % kBlocksPerStep == 0, "steps do not straddle the copy warp's index batches");
  static_assert(kBM * kSplitLd * 4 <= kStages * kStageBytes, "partial sums fit the pipeline");
  static_assert(BS == 16 || BS == 32 || BS == 64, "block sizes");
  static_assert(kBM % 64 == 0 && kXBytes % 1024 == 0, "x tiles on 1024-byte boundaries");
  static_assert(kWBytes <= kXBytes, "the zero tile also serves as a weight block");
  static_assert(kBM * kStageLd1 * 2 <= kStages * kStageBytes &&
                    BS * kStageLd0 * 2 <= kStages * kStageBytes,
                "the output tile is staged in the drained pipeline");
  static_assert(kStages >= 3, "one wgmma group in flight needs a third stage");
};

// Needs sm_90a.
// The narrow forward's parameters: the products' Params and the copy engine's tensor maps of x
// and w (filled on the host by EncodeNarrowMaps; unused with cp.async copies).  Passed as a
// __grid_constant__, so the maps are read where the launch put them.
struct NarrowParams {
  Params base;
  tma::TensorMap x_map, w_map;
};

// Where each CTA's run of its column's block list starts, for the small-batch forward: CTA i
// sums list positions start[i] .. start[i + 1] (as it would compute them from col_ptr).  Filled
// on the host from the list bounds (Params::host_col_ptr) for grids of at most kMaxCtas CTAs,
// so that a CTA's first copies wait only for its block indices, not first for col_ptr (each
// dependent load from memory costs about half a microsecond, docs/benchmark_history_gpu.md);
// ctas 0: the kernel reads col_ptr.  With one CTA per column these are col_ptr itself, which
// the grouped forward takes so (GroupedParams).
struct RunStarts {
  static constexpr int kMaxCtas = 512;
  int32_t ctas;
  int32_t start[kMaxCtas + 1];
};
// The small-batch forward's parameters (about 2.5 KiB, within the 4 KiB every launch takes).
struct SmallBatchParams {
  NarrowParams narrow;
  RunStarts runs;
};
static_assert(sizeof(SmallBatchParams) <= 4096, "kernel parameters within the 4 KiB limit");
__device__ __forceinline__ const NarrowParams& NarrowOf(const NarrowParams& p) { return p; }
__device__ __forceinline__ const NarrowParams& NarrowOf(const SmallBatchParams& p) {
  return p.narrow;
}

// This CTA's run of its column's list: from the launch's RunStarts where it has them, else
// rank r of a cluster of `split` takes the r-th of `split` runs of the list at col_ptr.
template <class KP>
__device__ __forceinline__ void ColumnRun(const KP& kp, int kcol, int split, int rank,
                                          int* pbeg, int* count) {
  if constexpr (std::is_same<KP, SmallBatchParams>::value) {
    if (kp.runs.ctas == static_cast<int>(gridDim.x)) {
      *pbeg = kp.runs.start[blockIdx.x];
      *count = kp.runs.start[blockIdx.x + 1] - *pbeg;
      return;
    }
  }
  const int32_t* col_ptr = NarrowOf(kp).base.col_ptr;
  const int col_beg = __ldg(col_ptr + kcol), col_count = __ldg(col_ptr + kcol + 1) - col_beg;
  *pbeg = col_beg + rank * col_count / split;
  *count = col_beg + (rank + 1) * col_count / split - *pbeg;
}

template <typename T, int FA, class Cfg, class KP = NarrowParams>
__global__ void __launch_bounds__(Cfg::kThreads)
    WgmmaForwardNarrowKernel(const __grid_constant__ KP kp) {
#if BSMM_HAS_WGMMA
  constexpr int BS = Cfg::BS, kBM = Cfg::kBM, kStages = Cfg::kStages, kGroups = kBM / 64;
  constexpr int P = Cfg::kBlocksPerStep;
  constexpr int kGroupBytes = 64 * BS * 2;  // one row group's x tile
  constexpr int kWRowBytes = BS * 2;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint32_t smem_base;  // shared-memory address of smem
  unsigned char* smem = Align1024(smem_raw, &smem_base);

  const NarrowParams& np = NarrowOf(kp);
  const Params& p = np.base;
  const T* __restrict__ gx = static_cast<const T*>(p.x);
  const T* __restrict__ gw = static_cast<const T*>(p.w);
  T* __restrict__ gy = static_cast<T*>(p.y);
  const int64_t N = p.N, C = p.C, K = p.K;
  const int tid = threadIdx.x;
  // A tile split over a cluster: rank r takes the r-th of `split` runs of the column's blocks.
  int split, rank;
  mma_impl::ClusterInfo(split, rank);
  const int kcol = blockIdx.x / split;
  const int64_t n0 = (p.n_tile_base + blockIdx.y) * static_cast<int64_t>(kBM);
  int pbeg, col_blocks;
  ColumnRun(kp, kcol, split, rank, &pbeg, &col_blocks);
  const int steps = (col_blocks + P - 1) / P;

  float acc[kGroups][BS / 2];
#pragma unroll
  for (int h = 0; h < kGroups; ++h)
#pragma unroll
    for (int e = 0; e < BS / 2; ++e) acc[h][e] = 0.f;
  const uint32_t zero_tile = smem_base + Cfg::kZeroOffset;
  if constexpr (Cfg::kZeroBytes > 0) {
    // Visible to the wgmmas after the barrier that precedes the first step's multiply.
    for (int i = tid; i < Cfg::kZeroBytes / 16; i += Cfg::kThreads)
      reinterpret_cast<uint4*>(smem + Cfg::kZeroOffset)[i] = make_uint4(0, 0, 0, 0);
    FenceSharedForAsyncProxy();
  }
  constexpr int kRowBytes = FA == 1 ? BS * 2 : 128;  // x tile rows
  // Step s's wgmma group on the stage at shared address `stage`.
  auto multiply_step = [&](int s, uint32_t stage) {
    WgmmaFence();
#pragma unroll
    for (int q = 0; q < P; ++q) {
      // A last step's missing blocks are skipped (uniform over the CTA) or multiply the zero
      // tile: adding zero products leaves the sums bitwise as they were.
      if constexpr (Cfg::kZeroBytes == 0)
        if (P > 1 && s * P + q >= col_blocks) break;
      const bool stored = Cfg::kZeroBytes == 0 || s * P + q < col_blocks;
      const uint32_t x_base = stored ? stage + q * Cfg::kXBytes : zero_tile;
      const uint32_t w_base = stored ? stage + P * Cfg::kXBytes + q * Cfg::kWBytes : zero_tile;
#pragma unroll
      for (int kk = 0; kk < BS / 16; ++kk) {
        // k16 slice kk of the weights: 16 rows on (N-contiguous), or with kTransW 32 bytes
        // into every row (K-contiguous, as x's rows with feature axis 1).
        const uint64_t bd = DescriptorR<kWRowBytes>(
            w_base + (Cfg::kTransW ? kk * 32 : kk * 16 * kWRowBytes));
#pragma unroll
        for (int h = 0; h < kGroups; ++h) {
          if constexpr (FA == 1)
            Wgmma<T, BS, false, !Cfg::kTransW>(
                acc[h], DescriptorR<kRowBytes>(x_base + h * kGroupBytes + kk * 32), bd);
          else
            Wgmma<T, BS, true, !Cfg::kTransW>(
                acc[h], DescriptorR<128>(x_base + h * kGroupBytes + kk * 2048), bd);
        }
      }
    }
    WgmmaCommit();
  };

  if constexpr (Cfg::kTensorMapCopies) {
    // Barriers: full[i] at bars + 8 i, empty[i] at bars + 8 (kStages + i).
    const uint32_t bars = smem_base + Cfg::kBarrierOffset;
    if (tid == 0) tma::InitStageBarriers(bars, kStages, Cfg::kMmaThreads / 32);
    __syncthreads();
    const int lane = tid & 31;
    // Rows past N arrive as zeros.  A single 64-row tile's box (feature axis 1) holds only the
    // batch rows rounded up to 8; the rows past it keep stale data, which reaches only output
    // rows that are never stored (the box sizes are those of EncodeNarrowMaps).
    const int x_rows =
        FA == 1 && kBM == 64 ? static_cast<int>(N >= 64 ? 64 : (N + 7) / 8 * 8) : kBM;
    const uint32_t step_bytes = x_rows * BS * 2 + Cfg::kWBytes;  // per block
    if (tid >= Cfg::kMmaThreads) {
      // The copy warp: indices for 32 blocks at a time (one per lane), lane 0 issues a step's
      // copies once the wgmma group that read its stage kStages steps ago is done.
      if (lane == 0) {
        tma::PrefetchTensorMap(&np.x_map);
        tma::PrefetchTensorMap(&np.w_map);
      }
      for (int base = 0; base < col_blocks; base += 32) {
        int my_c = 0, my_b = 0;
        if (base + lane < col_blocks) {
          my_c = __ldg(p.col_row + pbeg + base + lane);
          my_b = __ldg(p.col_block + pbeg + base + lane);
        }
        const int batch = min(32, col_blocks - base);
        for (int i = 0; i < batch; i += P) {
          int c[P], b[P];
#pragma unroll
          for (int q = 0; q < P; ++q) {
            c[q] = __shfl_sync(0xffffffffu, my_c, i + q);
            b[q] = __shfl_sync(0xffffffffu, my_b, i + q);
          }
          if (lane == 0) {
            const int s = (base + i) / P, buf = s % kStages;
            const int count = min(P, batch - i);
            if (s >= kStages) tma::MbarWait(bars + 8 * (kStages + buf), ((s / kStages) + 1) & 1);
            tma::MbarArriveExpectTx(bars + 8 * buf, count * step_bytes);
            const uint32_t stage = smem_base + buf * Cfg::kStageBytes;
            for (int q = 0; q < count; ++q) {
              if constexpr (FA == 1) {
                tma::CopyTile2D(stage + q * Cfg::kXBytes, &np.x_map, c[q] * BS,
                                static_cast<int>(n0), bars + 8 * buf);
              } else {
#pragma unroll
                for (int h = 0; h < kGroups; ++h)
                  tma::CopyTile2D(stage + q * Cfg::kXBytes + h * kGroupBytes, &np.x_map,
                                  static_cast<int>(n0) + 64 * h, c[q] * BS, bars + 8 * buf);
              }
              tma::CopyTile2D(stage + P * Cfg::kXBytes + q * Cfg::kWBytes, &np.w_map, 0,
                              b[q] * BS, bars + 8 * buf);
            }
          }
          __syncwarp();
        }
      }
    } else {
      for (int s = 0; s < steps; ++s) {
        const int buf = s % kStages;
        tma::MbarWait(bars + 8 * buf, (s / kStages) & 1);
        multiply_step(s, smem_base + buf * Cfg::kStageBytes);
        WgmmaWait<1>();  // step s - 1's group is done: its stage may be refilled
        if (s > 0 && lane == 0) tma::MbarArrive(bars + 8 * (kStages + (s - 1) % kStages));
      }
      WgmmaWait<0>();
    }
    __syncthreads();  // every copy landed and was read; the stages may now stage the output
  } else {  // cp.async copies, issued by the MMA warps between their steps
    // Copies.  W: the first kWCopies threads (bs 64: all, in kWPasses passes), row
    // tid / (BS / 8), chunk tid % (BS / 8).
    // x, feature axis 1: batch rows tid / kChunks + kRowStep j, chunk tid % kChunks; feature
    // axis 0: feature rows tid / kChunks + kRowStep j, 16-byte chunk tid % kChunks of the kBM
    // batch entries (row group chunk / 8, chunk % 8 inside its atom).
    constexpr int kWCopies = BS * BS * 2 / 16;
    // bs 64: four passes of 16 rows (the swizzle repeats every 8 rows).
    constexpr int kWPasses = (kWCopies + Cfg::kThreads - 1) / Cfg::kThreads;
    constexpr int kWPassRows = Cfg::kThreads / (BS / 8);
    static_assert(kWCopies <= Cfg::kThreads || kWCopies % Cfg::kThreads == 0, "whole passes");
    const int w_chunk = tid % (BS / 8), w_row = tid / (BS / 8);
    const T* const w_src = gw + w_row * BS + w_chunk * 8;
    const int w_dst = P * Cfg::kXBytes + SwizzledR<kWRowBytes>(w_row, w_chunk);
    constexpr int kChunks = FA == 1 ? BS / 8 : kBM / 8;  // per copied x row
    constexpr int kRowStep = Cfg::kThreads / kChunks;
    constexpr int kXCopies = (FA == 1 ? kBM : BS) / kRowStep;
    static_assert(Cfg::kThreads % kChunks == 0 && kXCopies * kRowStep == (FA == 1 ? kBM : BS),
                  "whole rows per pass");
    // The swizzles repeat every 8 rows: x_dst_base[e] serves the rows r with r % 8 ==
    // x_row0 % 8 + 4 e (kRowStep is a multiple of 4), less r times the row bytes.
    static_assert(kRowStep % 4 == 0, "two swizzle phases");
    const int x_chunk = tid % kChunks, x_row0 = tid / kChunks;
    int x_dst_base[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int r = x_row0 + 4 * e;
      x_dst_base[e] = (FA == 1 ? SwizzledR<kRowBytes>(r, x_chunk)
                               : (x_chunk >> 3) * kGroupBytes + SwizzledR<128>(r, x_chunk & 7)) -
                      r * kRowBytes;
    }
    auto x_dst = [&](int j) {  // j is a compile-time constant after unrolling
      return x_dst_base[((kRowStep * j) >> 2) & 1] + (x_row0 + kRowStep * j) * kRowBytes;
    };
    // This thread's first x element of block row 0 and, with feature axis 1, its rows left.
    const T* const x_src = FA == 1 ? gx + (n0 + x_row0) * C + x_chunk * 8
                                   : gx + static_cast<int64_t>(x_row0) * N + n0 + x_chunk * 8;
    const int64_t x_rows_left = N - n0 - x_row0;
    const bool x_chunk_valid = n0 + x_chunk * 8 < N;  // feature axis 0
    // Block q of a step: x tile at q kXBytes, weights at P kXBytes + q kWBytes.
    auto load_block = [&](int c, int b, int buf, int q) {
      unsigned char* st = smem + buf * Cfg::kStageBytes;
#pragma unroll
      for (int j = 0; j < kWPasses; ++j)
        if (kWCopies >= Cfg::kThreads || tid < kWCopies)
          CpAsync16(st + w_dst + q * Cfg::kWBytes + j * kWPassRows * kWRowBytes,
                    w_src + static_cast<int64_t>(b) * (BS * BS) + j * kWPassRows * BS, true);
      st += q * Cfg::kXBytes;
      // Rows (feature axis 1) or chunks (feature axis 0) at or past N are zero-filled.
      const T* xsrc = x_src + static_cast<int64_t>(c) * BS * (FA == 1 ? 1 : N);
#pragma unroll
      for (int j = 0; j < kXCopies; ++j) {
        const bool v = FA == 1 ? kRowStep * j < x_rows_left : x_chunk_valid;
        CpAsync16(st + x_dst(j),
                  v ? xsrc + static_cast<int64_t>(kRowStep * j) * (FA == 1 ? C : N) : gx, v);
      }
    };

    // Step s's block rows and blocks; the loop reads them one step ahead of their copies, so the
    // copies (issued before each step's wgmma) never wait for these loads.  The last step may
    // hold fewer than P blocks.
    int nc[P] = {}, nb[P] = {};
    auto index = [&](int s) {
#pragma unroll
      for (int q = 0; q < P; ++q)
        if (s * P + q < col_blocks) {
          nc[q] = __ldg(p.col_row + pbeg + s * P + q);
          nb[q] = __ldg(p.col_block + pbeg + s * P + q);
        }
    };
    auto load_step = [&](int s, int buf) {
#pragma unroll
      for (int q = 0; q < P; ++q)
        if (s * P + q < col_blocks) load_block(nc[q], nb[q], buf, q);
    };
#pragma unroll
    for (int s = 0; s < kStages - 2; ++s) {
      index(s);
      if (s < steps) load_step(s, s);
      CpAsyncCommit();  // one group per step, empty or not, so the waits count steps
    }
    index(kStages - 2);
    for (int s = 0; s < steps; ++s) {
      CpAsyncWait<kStages - 3>();  // this thread's copies of step s have landed
      FenceSharedForAsyncProxy();
      __syncthreads();  // everyone's have; and step s - 2's wgmma (waited below) is done
      const int nxt = s + kStages - 2;
      if (nxt < steps) load_step(nxt, nxt % kStages);  // into the stage step s - 2 read
      CpAsyncCommit();
      index(nxt + 1);
      multiply_step(s, smem_base + (s % kStages) * Cfg::kStageBytes);
      WgmmaWait<1>();  // step s - 1's group is done; step s's may still run
    }
    WgmmaWait<0>();
    CpAsyncWait<0>();
    __syncthreads();
  }

  // Epilogue: group h holds y rows 64 h + r0 (+ 8), columns 8 i + c0 (+ 1) in
  // acc[h][4 i .. 4 i + 3].  Only the MMA warps hold sums (the copy warp, if any, only joins the
  // barriers).
  const int lane = tid & 31;
  const bool mma_thread = tid < Cfg::kMmaThreads;
  if (split > 1) {
    // Stage the float partial sums as (batch row, feature); each rank adds the cluster's
    // partials in rank order for its share of the output's 16-byte chunks.
    constexpr int L = Cfg::kSplitLd;
    float* Cf = reinterpret_cast<float*>(smem);
    const int r0 = 16 * (tid >> 5) + (lane >> 2), c0 = 2 * (lane & 3);
    if (mma_thread) {
#pragma unroll
      for (int h = 0; h < kGroups; ++h)
#pragma unroll
        for (int i = 0; i < BS / 8; ++i) {
          float* r = Cf + (64 * h + r0) * L + 8 * i + c0;
          *reinterpret_cast<float2*>(r) = make_float2(acc[h][4 * i], acc[h][4 * i + 1]);
          *reinterpret_cast<float2*>(r + 8 * L) =
              make_float2(acc[h][4 * i + 2], acc[h][4 * i + 3]);
        }
    }
    mma_impl::ClusterSync();
    constexpr int kChunks = kBM * BS / 8;
    const int qbeg = rank * kChunks / split, qend = (rank + 1) * kChunks / split;
    for (int q = qbeg + tid; mma_thread && q < qend; q += Cfg::kMmaThreads) {
      // Feature axis 1: chunk q is batch row q / (BS / 8), features 8 (q % (BS / 8)) ..;
      // feature axis 0: feature q / (kBM / 8), batch rows 8 (q % (kBM / 8)) ...
      const int row = FA == 1 ? q / (BS / 8) : 8 * (q % (kBM / 8));
      const int col = FA == 1 ? 8 * (q % (BS / 8)) : q / (kBM / 8);
      if (n0 + row >= N) continue;
      float v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = 0.f;
      for (int src = 0; src < split; ++src) {
        const float* Cq = mma_impl::ClusterPeer(Cf, src) + row * L + col;
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] += FA == 1 ? Cq[e] : Cq[e * L];
      }
      T* dst = FA == 1 ? gy + (n0 + row) * K + static_cast<int64_t>(kcol) * BS + col
                       : gy + (static_cast<int64_t>(kcol) * BS + col) * N + n0 + row;
      StoreChunk<T>(dst, v);
    }
    mma_impl::ClusterSync();  // peers may still be reading this CTA's shared memory
    return;
  }
  T* Cs = reinterpret_cast<T*>(smem);
  if constexpr (FA == 1) {  // y (N, K): staged rows are batch rows
    constexpr int L = Cfg::kStageLd1;
    const int r0 = 16 * (tid >> 5) + (lane >> 2), c0 = 2 * (lane & 3);
    if (mma_thread) {
#pragma unroll
      for (int h = 0; h < kGroups; ++h)
#pragma unroll
        for (int i = 0; i < BS / 8; ++i) {
          T* r = Cs + (64 * h + r0) * L + 8 * i + c0;
          *reinterpret_cast<uint32_t*>(r) = PackPair<T>(acc[h][4 * i], acc[h][4 * i + 1]);
          *reinterpret_cast<uint32_t*>(r + 8 * L) =
              PackPair<T>(acc[h][4 * i + 2], acc[h][4 * i + 3]);
        }
    }
    __syncthreads();
    if (mma_thread)
      CopyOutStagedTile<T, 1, kBM, BS, L, Cfg::kMmaThreads>(Cs, gy, tid, n0, N, K,
                                                            static_cast<int64_t>(kcol) * BS);
  } else {  // y (K, N): staged rows are output features
    // stmatrix.trans turns the fragments' 8 x 8 (batch x feature) pieces around; call q of
    // group h stores features 16 q .. 16 q + 15 (lane 8 m + j: feature 16 q + 8 (m / 2) + j,
    // batch rows + 8 (m % 2) of the warp's 16).
    constexpr int L = Cfg::kStageLd0;
    const int m = lane >> 3, j = lane & 7;
    if (mma_thread) {
#pragma unroll
      for (int h = 0; h < kGroups; ++h)
#pragma unroll
        for (int q = 0; q < BS / 16; ++q) {
          const float* a = acc[h] + 8 * q;
          const int feature = 16 * q + 8 * (m >> 1) + j;
          const int batch = 64 * h + 16 * (tid >> 5) + 8 * (m & 1);
          StoreMatrixX4Trans(smem_base + 2 * (feature * L + batch), PackPair<T>(a[0], a[1]),
                             PackPair<T>(a[2], a[3]), PackPair<T>(a[4], a[5]),
                             PackPair<T>(a[6], a[7]));
        }
    }
    __syncthreads();
    if (mma_thread)
      CopyOutStagedTile<T, 0, BS, kBM, L, Cfg::kMmaThreads>(Cs, gy, tid, n0, N, K,
                                                            static_cast<int64_t>(kcol) * BS);
  }
#else
  (void)kp;
  __trap();
#endif
}

// ---- bs-32 forward over groups of block columns (16-bit, feature axis 1, N > 64) ----
// A CTA computes kCols neighbouring block columns (output features 32 kCols g ..) for 128
// batch rows.  Per block row present in any of its columns, in increasing order (the merge of
// the columns' lists), one pipeline step holds that block row's x tile and the kCols weight
// blocks side by side, zeros where a column has no block there:
//   y[n0 + 64 h .., group g] += x[n0 + 64 h .., c-block] (A: 64 rows x 32, K-contiguous)
//                              * [W(c, k0) .. W(c, k0 + kCols - 1)] (B: 32 x 32 kCols)
// as two m64n(32 kCols)k16 slices, warpgroup h (of two) taking rows 64 h ...  So an x tile
// is read once for all the group's columns that have a block in its row.  Why: the narrow
// kernel reads the x tile of every stored block, 1/32 byte per flop at bs 32, which at the
// L2's throughput caps random layouts near 42% of dense cuBLAS (docs/benchmark_history_gpu.md,
// "Copy-engine copies for the narrow forward"); small-world layouts (a block row's blocks in
// neighbouring columns) share most x tiles within a group (tools/layout_x_reuse.py), at the
// price of products with the zero blocks.
// Shared memory per stage: the x tile (128 rows of 64 bytes, 64-byte swizzle, two 4 KiB row
// groups), then the kCols weight blocks (32 rows of 64 bytes each, 2 KiB apart).  As B (N-
// contiguous, the transpose flag) the blocks are kCols swizzle atoms along N, 2 KiB apart (the
// leading byte offset); with kTransW (the blocks hold the product's blocks transposed) B is
// K-contiguous: 32 kCols rows of 64 bytes, 8-row groups 512 bytes apart.
// Copies: a copy warp walks the group's column lists (lanes 8 q .. 8 q + 7 hold the next
// eight entries of column q; 16 lanes and entries per column for groups of two) and per step
// issues the x tile's copy and one per weight block on the copy engine; an absent block's copy
// asks for a box before the start of w, which the copy engine fills with zeros (counted in the
// stage's bytes like any other).  The end of the CTA's list: the copy warp completes the
// next stage's `end` barrier (each completes at most once), then its `full` one without
// copies; the MMA warps test a stage's `end` after its `full`.  (A word per stage written by
// the copy warp and read by the MMA warps orders the same way, through the barriers, but
// compute-sanitizer's racecheck does not follow that order and reports it as a race.)  The
// copy warp can reach that stage's last step only after the MMA warps have freed its
// previous step, so they never see an `end` meant for a later step.
// Against latency, which the kernel waits on (the history section): the launch passes the
// list bounds (col_ptr) in its parameters where the host has them; the copy warp loads each
// column's next window of entries while it copies from the current one (no round trip to
// memory when a window runs out); the MMA warps wait for each step's products before freeing
// its stage, so every stage but the one being multiplied stays open to copies.  (Freeing a
// stage one step later, so that a step's products overlap the wait for the next, and loading
// a window when the last one ran out took 1.05-1.09x the time on an H100.)
// Sums: each output column adds its stored blocks' products in increasing block row, with
// zero products between them (an infinity or NaN in x reaches the group's other columns as
// NaN, as in a dense product, see blocksparse_matmul_gpu.h).  Deterministic.
template <int kColsT, int kStagesT, bool kTransWT>
struct GroupedFwdCfg {
  static constexpr int BS = 32;
  static constexpr int kCols = kColsT;           // block columns per CTA
  static constexpr int kWidth = BS * kCols;      // output features per CTA (wgmma's N)
  static constexpr bool kTransW = kTransWT;
  static constexpr int kBM = 128;                // batch rows per CTA: 64 per warpgroup
  static constexpr int kMmaThreads = 256;
  static constexpr int kThreads = kMmaThreads + 32;  // and the copy warp
  static constexpr int kStages = kStagesT;
  static constexpr int kXBytes = kBM * BS * 2;
  static constexpr int kWBytes = BS * BS * 2;
  static constexpr int kStageBytes = kXBytes + kCols * kWBytes;
  static constexpr int kStageLd = kWidth + 8;    // staged output rows, padded by 16 bytes
  // The barriers after the stages: full, empty and end, kStages of each.
  static constexpr int kBarrierOffset = kStages * kStageBytes;
  static constexpr int kSmemBytes = 1024 + kBarrierOffset + 24 * kStages;
  static_assert(kCols == 2 || kCols == 4, "wgmma's N: 64 or 128");
  static_assert(kStageBytes % 1024 == 0, "stages on 1024-byte boundaries");
  static_assert(kBM * kStageLd * 2 <= kStages * kStageBytes, "output staged in the pipeline");
  static_assert(kStages >= 2, "one stage multiplied while the next is copied");
};

// The grouped forward's parameters: where bounds.ctas is the layout's block-column count,
// bounds.start holds the list bounds, col_ptr (so a CTA's first copies wait for its entries
// only); else the kernel reads them from Params::col_ptr.
struct GroupedParams {
  NarrowParams narrow;
  RunStarts bounds;
};
static_assert(sizeof(GroupedParams) <= 4096, "kernel parameters within the 4 KiB limit");

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    WgmmaForwardGroupedKernel(const __grid_constant__ GroupedParams gp) {
#if BSMM_HAS_WGMMA
  constexpr int BS = Cfg::BS, kCols = Cfg::kCols, kStages = Cfg::kStages;
  constexpr int kWin = 32 / kCols;  // list entries a column's lanes hold
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint32_t smem_base;
  unsigned char* smem = Align1024(smem_raw, &smem_base);
  const NarrowParams& np = gp.narrow;
  const Params& p = np.base;
  T* __restrict__ gy = static_cast<T*>(p.y);
  const int64_t N = p.N, K = p.K, KB = K / BS;
  const int tid = threadIdx.x, lane = tid & 31;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kCols;  // first block column
  const int64_t n0 = (p.n_tile_base + blockIdx.y) * static_cast<int64_t>(Cfg::kBM);
  // Barriers: full[i] at bars + 8 i, empty[i] at bars + 8 (kStages + i), end[i] at ends + 8 i.
  const uint32_t bars = smem_base + Cfg::kBarrierOffset, ends = bars + 16 * kStages;
  if (tid == 0) {
    for (int i = 0; i < kStages; ++i) tma::MbarInit(ends + 8 * i, 1);
    tma::InitStageBarriers(bars, kStages, Cfg::kMmaThreads / 32);  // and fences all
  }
  __syncthreads();

  float acc[Cfg::kWidth / 2];
#pragma unroll
  for (int e = 0; e < Cfg::kWidth / 2; ++e) acc[e] = 0.f;
  if (tid >= Cfg::kMmaThreads) {
    // The copy warp.  Lanes kWin q .. kWin q + kWin - 1 hold entries pos .. pos + kWin - 1 of
    // column q's list (INT_MAX rows past its end); off is the column's next entry among them.
    if (lane == 0) {
      tma::PrefetchTensorMap(&np.x_map);
      tma::PrefetchTensorMap(&np.w_map);
    }
    const int q = lane / kWin, leader = lane & ~(kWin - 1);
    int pos = 0, end = 0;
    if (col0 + q < KB) {
      const bool given = gp.bounds.ctas == KB;  // by the launch
      pos = given ? gp.bounds.start[col0 + q] : __ldg(p.col_ptr + col0 + q);
      end = given ? gp.bounds.start[col0 + q + 1] : __ldg(p.col_ptr + col0 + q + 1);
    }
    // The window's entries, and the next window's (loaded a window ahead).
    int off = 0, my_row = INT_MAX, my_block = 0, next_row = INT_MAX, next_block = 0;
    auto load_window = [&](int at, int* row, int* block) {
      const int e = at + (lane - leader);
      *row = e < end ? __ldg(p.col_row + e) : INT_MAX;
      *block = e < end ? __ldg(p.col_block + e) : 0;
    };
    load_window(pos, &my_row, &my_block);
    load_window(pos + kWin, &next_row, &next_block);
    constexpr uint32_t kStepBytes = Cfg::kXBytes + kCols * Cfg::kWBytes;
    for (int s = 0;; ++s) {
      const int head_row = __shfl_sync(0xffffffffu, my_row, leader + off);
      const int head_block = __shfl_sync(0xffffffffu, my_block, leader + off);
      const int row = __reduce_min_sync(0xffffffffu, head_row);  // the step's block row
      const int buf = s % kStages;
      const uint32_t full = bars + 8 * buf;
      if (s >= kStages) tma::MbarWait(bars + 8 * (kStages + buf), ((s / kStages) + 1) & 1);
      if (row == INT_MAX) {  // every list is done: tell the MMA warps
        if (lane == 0) {
          tma::MbarArrive(ends + 8 * buf);
          tma::MbarArrive(full);
        }
        break;
      }
      if (lane == 0) tma::MbarArriveExpectTx(full, kStepBytes);
      __syncwarp();
      const uint32_t stage = smem_base + buf * Cfg::kStageBytes;
      if (lane == 0)
        tma::CopyTile2D(stage, &np.x_map, row * BS, static_cast<int>(n0), full);
      const bool stored = head_row == row;
      if (lane == leader)  // outer coordinate -BS: a box wholly before w, all zeros
        tma::CopyTile2D(stage + Cfg::kXBytes + q * Cfg::kWBytes, &np.w_map, 0,
                        stored ? head_block * BS : -BS, full);
      if (stored && ++off == kWin) {  // the same for the column's lanes
        pos += kWin;
        off = 0;
        my_row = next_row;
        my_block = next_block;
        load_window(pos + kWin, &next_row, &next_block);
      }
      __syncwarp();
    }
  } else {
    const int h = tid / 128;  // the warpgroup's 64 rows
    for (int s = 0;; ++s) {
      const int buf = s % kStages;
      tma::MbarWait(bars + 8 * buf, (s / kStages) & 1);
      if (tma::MbarTestWait(ends + 8 * buf, 0)) break;
      const uint32_t stage = smem_base + buf * Cfg::kStageBytes;
      const uint32_t w_tile = stage + Cfg::kXBytes;
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < BS / 16; ++kk) {
        const uint64_t a = DescriptorR<64>(stage + h * (Cfg::kXBytes / 2) + kk * 32);
        // k16 slice kk: 16 rows on (N-contiguous), or 32 bytes into every row (kTransW).
        const uint64_t b = Cfg::kTransW ? DescriptorR<64>(w_tile + kk * 32)
                                        : DescriptorR<64>(w_tile + kk * 16 * 64, Cfg::kWBytes);
        Wgmma<T, Cfg::kWidth, false, !Cfg::kTransW>(acc, a, b);
      }
      WgmmaCommit();
      WgmmaWait<0>();  // step s's products are done: its stage may be refilled
      __syncwarp();
      if (lane == 0) tma::MbarArrive(bars + 8 * (kStages + buf));
    }
  }
  __syncthreads();  // every copy landed and was read; the stages may stage the output

  // Warpgroup h holds rows 64 h + r0 (+ 8), columns 8 i + c0 (+ 1) in acc[4 i .. 4 i + 3].
  constexpr int L = Cfg::kStageLd;
  T* Cs = reinterpret_cast<T*>(smem);
  if (tid < Cfg::kMmaThreads) {
    const int r0 = 16 * (tid >> 5) + (lane >> 2), c0 = 2 * (lane & 3);
#pragma unroll
    for (int i = 0; i < Cfg::kWidth / 8; ++i) {
      T* r = Cs + r0 * L + 8 * i + c0;
      *reinterpret_cast<uint32_t*>(r) = PackPair<T>(acc[4 * i], acc[4 * i + 1]);
      *reinterpret_cast<uint32_t*>(r + 8 * L) = PackPair<T>(acc[4 * i + 2], acc[4 * i + 3]);
    }
  }
  __syncthreads();
  // Rows below N, block columns below KB (the last group may hold fewer than kCols).
  CopyOutStagedTile<T, 1, Cfg::kBM, Cfg::kWidth, L, Cfg::kThreads>(
      Cs, gy, tid, n0, N, K, col0 * BS, min(static_cast<int64_t>(Cfg::kWidth), K - col0 * BS));
#else
  (void)gp;
  __trap();
#endif
}

// Keeps the CTAs of a persistent grid within a few batch steps of each other.  Time is
// counted in batch steps t over all of a CTA's groups (every group has the same steps), cut
// into epochs of kEpochSteps; arrivals[e] counts the CTAs that have finished epoch e.  A CTA
// starting epoch e arrives for e - 1, then waits (thread 0 polls) until every CTA has
// arrived for e - 1 - slack, so it runs at most about slack + 1 epochs ahead of the slowest
// (slack: Params::epoch_slack, which the launch sets; kSlack for bs 16).  It only paces the
// CTAs: the sums do not depend on it.  A wait gives up after about kSpinLimit polls (a CTA
// that never got an SM, say) and the CTA runs on unpaced, so it never hangs.  A CTA out of
// groups arrives for all later epochs.
struct EpochThrottle {
  static constexpr int kEpochSteps = 4;
  static constexpr int kSlack = 1;
  static constexpr int kSpinLimit = 1 << 14;
  uint32_t* arrivals;
  int64_t epochs;
  int slack;
  bool paced;  // thread 0: still waiting for the others
  __device__ EpochThrottle(uint32_t* a, int64_t e, int sl)
      : arrivals(a), epochs(e), slack(sl), paced(true) {}

  __device__ __forceinline__ void AtStep(int64_t t) {
    if (arrivals == nullptr || threadIdx.x != 0 || t % kEpochSteps != 0 || t == 0) return;
    const int64_t done = t / kEpochSteps - 1;  // the epoch just finished
    if (done >= epochs) return;
    atomicAdd(arrivals + done, 1u);
    const int64_t wait_for = done - slack;
    if (!paced || wait_for < 0) return;
    int spins = 0;
    while (*reinterpret_cast<const volatile uint32_t*>(arrivals + wait_for) < gridDim.x) {
      if (++spins == kSpinLimit) {
        paced = false;
        break;
      }
      __nanosleep(64);
    }
  }
  // After the CTA's last group, t being its steps in all; every thread calls it.
  __device__ __forceinline__ void Finish(int64_t t) {
    if (arrivals == nullptr) return;
    const int64_t first = t > 0 ? (t - 1) / kEpochSteps : 0;  // not yet arrived for
    for (int64_t e = first + threadIdx.x; e < epochs; e += blockDim.x) atomicAdd(arrivals + e, 1u);
  }
};

// ---- dW by block-column groups ----
// dw[b] = x[:, c-block]^T dy[:, k-block] (feature axis 1; x[c-block, :] dy[k-block, :]^T with
// feature axis 0) for the stored blocks, 16-bit, bs 16 / 32 / 64.  The blocks of each block
// column's list are cut into groups of up to G * P consecutive blocks (P = 64 / bs), and a CTA
// takes one group (all of column k).  Packs of P blocks put their x slabs side by side, so a
// pack is a 64-feature wgmma operand; per batch step of kRows (64) rows, in increasing row,
//   acc_j (64 packed features x bs) += [x_c1 | .. | x_cP]^T (A: 64 x 16, per k16 slice)
//                                      * dy_k (B: 16 x bs)
// for the G packs j, all reading one dy tile: a step copies G * P x slabs and one dy slab
// (the mma.sync dW tiles read a dy slab per one, two or four blocks).
// Shared memory per stage: G pack tiles of kRows x 64 elements (8 KiB), then the dy tile.
// (Steps of 32 rows with 6-8 stages measured no faster on an H200.)
//   Feature axis 1: rows are batch rows; a pack row holds block s's bs features in its 16-byte
//     chunks s bs / 8 ..; A is M-contiguous (transpose flag), B (64 rows of 2 bs bytes in the
//     2 bs-byte swizzle) N-contiguous; a k16 slice is 16 rows on.
//   Feature axis 0: rows are features (pack row s bs + f: feature f of block s; dy row f) of
//     64 batch entries, K-contiguous for both; a k16 slice is 32 bytes into the rows.
// Rows (feature axis 1) or chunks (feature axis 0) at or past N are zero-filled.  Slots of a
// pack past the group's end keep stale data: they only reach accumulator rows that are never
// stored.  With too few groups to fill the GPU, `split` CTAs of a cluster share a group (rank
// r takes steps r, r + split, ..) and the partial sums are added in rank order through
// distributed shared memory, so results do not depend on timing.
// With kTensorMapCopies, a fifth warp issues the copies on the copy engine, one per x slab and
// one for the dy slab, from the tensor maps of NarrowParams (x_map; w_map maps dy), with the
// narrow forward's full / empty mbarriers per stage.  Feature axis 0: a slab is BS rows of
// 128 bytes, so the pack is as above.  Feature axis 1: the copy engine writes a box of kRows
// rows of one block's 2 BS bytes in the 2 BS-byte swizzle, so a pack holds its P slabs one
// after another (kSlabBytes apart) instead of side by side in 128-byte rows, and the pack's
// descriptor steps from one slab to the next along the 64 features by its leading offset.
// Same products in the same order: the same sums.
// With kConsumers warpgroups, warpgroup w multiplies packs w G / kConsumers .. (w + 1) G /
// kConsumers - 1 of every stage (their accumulators split between them), all reading the same
// dy slab: a group of more blocks than one warpgroup's registers hold.
template <int BST, int kPacksT, int kRowsT, int kStagesT, bool kTensorMapCopiesT = false,
          int kConsumersT = 1>
struct ColumnGradCfg {
  static constexpr int BS = BST;
  static constexpr int kPerPack = 64 / BS;                // blocks per pack
  static constexpr int kPacks = kPacksT;                  // G
  static constexpr int kGroupBlocks = kPacks * kPerPack;  // blocks per CTA at most
  static constexpr bool kTensorMapCopies = kTensorMapCopiesT;
  static constexpr int kConsumers = kConsumersT;        // warpgroups that multiply
  static constexpr int kPacksPerConsumer = kPacks / kConsumers;
  static constexpr int kMmaThreads = 128 * kConsumers;
  static constexpr int kThreads = kMmaThreads + (kTensorMapCopies ? 32 : 0);
  static constexpr int kStages = kStagesT;
  static constexpr int kRows = kRowsT;  // batch rows per step
  static constexpr int kPackBytes = kRows * 64 * 2;
  static constexpr int kSlabBytes = kRows * BS * 2;  // one block's x slab (copy engine)
  static constexpr int kDyBytes = kRows * BS * 2;
  // The kernel's parameters: with the copy engine, the products' Params and the tensor maps.
  using KernelParams = std::conditional_t<kTensorMapCopies, NarrowParams, Params>;
  static constexpr int kStageBytes = kPacks * kPackBytes + (kDyBytes + 1023) / 1024 * 1024;
  static constexpr int kCLd = BS + 4;  // staged partial sums (float), padded
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static constexpr int kEpiBytes = kPacks * 64 * kCLd * 4;
  static constexpr int kSmemBytes = 1024 + (kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes);
  static_assert(BS == 16 || BS == 32 || BS == 64, "tensor-core block sizes");
  static_assert(kRows == 32 || kRows == 64, "steps of two or four k16 slices");
  static_assert(kStages >= 3, "one wgmma group in flight needs a third stage");
  static_assert(kPacks % kConsumers == 0, "each warpgroup multiplies as many packs");
};

// Descriptor of an M-contiguous pack of 64 / BS slabs, each BS features (one swizzle atom of
// kRowBytes = 2 BS bytes) by its rows, kAtomBytes apart (the leading offset); 8-row groups are
// 8 kRowBytes apart (the stride offset).
template <int kRowBytes, int kAtomBytes>
__device__ __forceinline__ uint64_t DescriptorAtoms(uint32_t smem_addr) {
  static_assert(kAtomBytes % 16 == 0 && (kAtomBytes >> 4) <= 0x3FFF, "leading offset fits");
  constexpr uint64_t kGroup = (8 * kRowBytes) >> 4;
  constexpr uint64_t kMode = kRowBytes == 128 ? 1 : kRowBytes == 64 ? 2 : 3;
  return (static_cast<uint64_t>(smem_addr >> 4) & 0x3FFF) |
         (static_cast<uint64_t>(kAtomBytes >> 4) << 16) | (kGroup << 32) | (kMode << 62);
}

__device__ __forceinline__ const Params& ParamsOf(const Params& p) { return p; }
__device__ __forceinline__ const Params& ParamsOf(const NarrowParams& np) { return np.base; }

template <typename T, int FA, class Cfg, bool kPaced = false>
__global__ void __launch_bounds__(Cfg::kThreads)
    WgmmaGradWColumnKernel(const __grid_constant__ typename Cfg::KernelParams kp) {
#if BSMM_HAS_WGMMA
  constexpr int BS = Cfg::BS, G = Cfg::kPacks, P = Cfg::kPerPack, kStages = Cfg::kStages;
  constexpr int GW = Cfg::kPacksPerConsumer;  // packs per warpgroup
  constexpr int kDyRowBytes = FA == 1 ? BS * 2 : 2 * Cfg::kRows;
  static_assert(!Cfg::kTensorMapCopies || !kPaced, "copy-engine copies: one group per CTA");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int s_run[3], s_warp[Cfg::kThreads / 32];
  __shared__ int s_c[Cfg::kGroupBlocks], s_b[Cfg::kGroupBlocks];
  __shared__ __align__(8) uint64_t s_bars[2 * kStages];  // copy engine: full, then empty
  uint32_t smem_base;  // shared-memory address of smem
  unsigned char* smem = Align1024(smem_raw, &smem_base);
  const Params& p = ParamsOf(kp);

  const T* __restrict__ gx = static_cast<const T*>(p.x);
  const T* __restrict__ gdy = static_cast<const T*>(p.w);
  T* __restrict__ gdw = static_cast<T*>(p.y);
  const int64_t N = p.N, C = p.C, K = p.K;
  const int tid = threadIdx.x;
  const int pack0 = tid < Cfg::kMmaThreads ? (tid / 128) * GW : 0;  // this warpgroup's first
  int split, rank;
  mma_impl::ClusterInfo(split, rank);
  const int64_t total_steps = (N + Cfg::kRows - 1) / Cfg::kRows;
  const int steps = static_cast<int>((total_steps - rank + split - 1) / split);
  EpochThrottle throttle(p.epoch_arrivals, p.epochs, p.epoch_slack);
  int64_t t0 = 0;  // this CTA's steps in earlier groups
  // One group per CTA, or (kPaced: a persistent grid, split 1) groups blockIdx.x + i gridDim.x.
  for (int64_t group = blockIdx.x / split;; group += gridDim.x / split, t0 += steps) {
    if (kPaced && group != blockIdx.x) __syncthreads();  // the last group's epilogue is done
    if (kPaced)  // a wave's CTAs then take equally long per step (see the function)
      FindColumnRunLongestFirst(p.col_ptr, K / BS, group, Cfg::kGroupBlocks, P, s_run, s_warp);
    else
      FindColumnRun(p.col_ptr, K / BS, group, Cfg::kGroupBlocks, s_run, s_warp);
    const int kcol = s_run[0];
    if (kcol < 0) break;  // uniform over the cluster: its CTAs share blockIdx.x / split
    const int pbeg = s_run[1], nblk = s_run[2] - s_run[1];
    if (tid < Cfg::kGroupBlocks) {
      const bool v = tid < nblk;
      s_b[tid] = v ? __ldg(p.col_block + pbeg + tid) : 0;
      s_c[tid] = v ? __ldg(p.col_row + pbeg + tid) : -1;
    }
    __syncthreads();
    float acc[GW][BS / 2];
#pragma unroll
    for (int j = 0; j < GW; ++j)
#pragma unroll
      for (int e = 0; e < BS / 2; ++e) acc[j][e] = 0.f;

    if constexpr (Cfg::kTensorMapCopies) {
      const uint32_t bars = SmemAddr(s_bars);  // full[i] at bars + 8 i, empty[i] + 8 kStages
      if (tid == 0) tma::InitStageBarriers(bars, kStages, Cfg::kMmaThreads / 32);
      __syncthreads();
      const int lane = tid & 31;
      if (tid >= Cfg::kMmaThreads) {
        // The copy warp's lane 0 fills a stage once the wgmma group that read it is done.
        // Rows past N arrive as zeros (and count as bytes); slots past the group's end are not
        // copied: they keep stale data, which reaches only accumulator rows never stored.
        if (lane == 0) {
          tma::PrefetchTensorMap(&kp.x_map);
          tma::PrefetchTensorMap(&kp.w_map);
          const uint32_t step_bytes = (nblk + 1) * Cfg::kSlabBytes;
          for (int s = 0; s < steps; ++s) {
            const int buf = s % kStages;
            const uint32_t full = bars + 8 * buf;
            if (s >= kStages) tma::MbarWait(bars + 8 * (kStages + buf), ((s / kStages) + 1) & 1);
            tma::MbarArriveExpectTx(full, step_bytes);
            const int n0 = static_cast<int>((static_cast<int64_t>(s) * split + rank) * Cfg::kRows);
            const uint32_t st = smem_base + buf * Cfg::kStageBytes;
            // Box coordinates (inner, outer): (feature, batch row), or (batch, feature) with
            // feature axis 0.
            for (int b = 0; b < nblk; ++b) {
              const uint32_t dst = st + (b / P) * Cfg::kPackBytes + (b % P) * Cfg::kSlabBytes;
              if constexpr (FA == 1)
                tma::CopyTile2D(dst, &kp.x_map, s_c[b] * BS, n0, full);
              else
                tma::CopyTile2D(dst, &kp.x_map, n0, s_c[b] * BS, full);
            }
            if constexpr (FA == 1)
              tma::CopyTile2D(st + G * Cfg::kPackBytes, &kp.w_map, kcol * BS, n0, full);
            else
              tma::CopyTile2D(st + G * Cfg::kPackBytes, &kp.w_map, n0, kcol * BS, full);
          }
        }
        __syncwarp();
      } else {
        for (int s = 0; s < steps; ++s) {
          const int buf = s % kStages;
          tma::MbarWait(bars + 8 * buf, (s / kStages) & 1);
          const uint32_t st = smem_base + buf * Cfg::kStageBytes;
          const uint32_t dys = st + G * Cfg::kPackBytes;
          WgmmaFence();
#pragma unroll
          for (int kk = 0; kk < Cfg::kRows / 16; ++kk) {
            // As with cp.async but for feature axis 1's packs, whose slabs lie one after another.
            const uint64_t bd =
                DescriptorR<kDyRowBytes>(dys + (FA == 1 ? kk * 16 * kDyRowBytes : kk * 32));
#pragma unroll
            for (int j = 0; j < GW; ++j) {
              const uint32_t a =
                  st + (pack0 + j) * Cfg::kPackBytes + (FA == 1 ? kk * 16 * (2 * BS) : kk * 32);
              const uint64_t ad = FA == 1 ? DescriptorAtoms<2 * BS, Cfg::kSlabBytes>(a)
                                          : DescriptorR<2 * Cfg::kRows>(a);
              Wgmma<T, BS, FA == 1, FA == 1>(acc[j], ad, bd);
            }
          }
          WgmmaCommit();
          WgmmaWait<1>();  // step s - 1's group is done: its stage may be refilled
          if (s > 0 && lane == 0) tma::MbarArrive(bars + 8 * (kStages + (s - 1) % kStages));
        }
        WgmmaWait<0>();
      }
      __syncthreads();  // every copy landed and was read: the stages may stage the sums
    } else {
      const int packs = (nblk + P - 1) / P;

      // Copies: 16-byte chunk tid % kChunks of rows tid / kChunks + (128 / kChunks) i, kChunks
      // being the chunks of a tile row.  Pack tiles: kRows batch rows of 128 bytes (feature axis
      // 1) or 64 feature rows of 2 kRows bytes (feature axis 0); dy tiles: kRows rows of 2 BS
      // bytes or BS rows of 2 kRows bytes.
      constexpr int kRows = Cfg::kRows;
      constexpr int kPackRowBytes = FA == 1 ? 128 : 2 * kRows;
      constexpr int kXChunks = kPackRowBytes / 16, kXRowStep = Cfg::kMmaThreads / kXChunks;
      constexpr int kXPasses = (FA == 1 ? kRows : 64) / kXRowStep;
      constexpr int kDyChunks = kDyRowBytes / 16, kDyRowStep = Cfg::kMmaThreads / kDyChunks;
      constexpr int kDyTileRows = FA == 1 ? kRows : BS;
      constexpr int kDyPasses = (kDyTileRows + kDyRowStep - 1) / kDyRowStep;
      static_assert(kXPasses * kXRowStep == (FA == 1 ? kRows : 64), "whole pack rows per pass");
      const int q = tid % kXChunks, r0 = tid / kXChunks;
      const int dq = tid % kDyChunks, dr0 = tid / kDyChunks;
      const T* const dy_src = FA == 1
                                  ? gdy + dr0 * K + static_cast<int64_t>(kcol) * BS + dq * 8
                                  : gdy + (static_cast<int64_t>(kcol) * BS + dr0) * N + dq * 8;
      // This thread's x chunks, worked out once: pack j's block at slot s (feature axis 1: the
      // slot of chunk q; feature axis 0: rows r0 + kXRowStep i lie in slot kXRowStep i / BS, as
      // r0 < kXRowStep and BS is a multiple of kXRowStep) starts at x_src[j][s] for batch row 0
      // (null for a slot past the group's end).  The swizzle repeats every 8 rows, so rows
      // r0 + kXRowStep i land at x_dst0 plus whole rows.
      static_assert(kXRowStep % 8 == 0 && (FA == 1 || BS % kXRowStep == 0),
                    "each pass's rows keep the swizzle phase and lie in one slot");
      constexpr int kSlots = FA == 1 ? 1 : P;
      const T* x_src[G][kSlots];
#pragma unroll
      for (int j = 0; j < G; ++j)
#pragma unroll
        for (int e = 0; e < kSlots; ++e) {
          const int slot = FA == 1 ? q / (BS / 8) : e;
          const int c = s_c[j * P + slot];
          x_src[j][e] = c < 0 ? nullptr
                        : FA == 1 ? gx + r0 * C + static_cast<int64_t>(c) * BS + (q % (BS / 8)) * 8
                                  : gx + (static_cast<int64_t>(c) * BS + r0) * N + q * 8;
        }
      const int x_dst0 = SwizzledR<kPackRowBytes>(r0, q);
      auto load_step = [&](int s, int buf) {
        const int64_t n0 = (static_cast<int64_t>(s) * split + rank) * kRows;
        unsigned char* st = smem + buf * Cfg::kStageBytes;
        unsigned char* dys = st + G * Cfg::kPackBytes;
#pragma unroll
        for (int i = 0; i < kDyPasses; ++i) {
          const int r = dr0 + kDyRowStep * i;
          if (kDyTileRows % kDyRowStep != 0 && r >= kDyTileRows) break;
          bool v;
          int64_t off;
          if constexpr (FA == 1) {
            v = n0 + r < N;
            off = (n0 + kDyRowStep * i) * K;
          } else {
            v = n0 + dq * 8 < N;
            off = static_cast<int64_t>(kDyRowStep * i) * N + n0;
          }
          CpAsync16(dys + SwizzledR<kDyRowBytes>(r, dq), v ? dy_src + off : gdy, v);
        }
        const int64_t x_step = FA == 1 ? n0 * C : n0;
        const bool x_chunk_valid = n0 + q * 8 < N;  // feature axis 0
#pragma unroll
        for (int j = 0; j < G; ++j) {
          if (j >= packs) break;
#pragma unroll
          for (int i = 0; i < kXPasses; ++i) {
            const T* base = x_src[j][FA == 1 ? 0 : kXRowStep * i / BS];
            if (base == nullptr) continue;  // a slot past the group's end
            // Rows (feature axis 1) or chunks (feature axis 0) at or past N are zero-filled.
            const bool v = FA == 1 ? kXRowStep * i < N - n0 - r0 : x_chunk_valid;
            const int64_t off = FA == 1 ? x_step + static_cast<int64_t>(kXRowStep * i) * C
                                        : x_step + static_cast<int64_t>(kXRowStep * i % BS) * N;
            CpAsync16(st + j * Cfg::kPackBytes + x_dst0 + kXRowStep * i * kPackRowBytes,
                      v ? base + off : gx, v);
          }
        }
      };

#pragma unroll
      for (int s = 0; s < kStages - 2; ++s) {
        if (s < steps) load_step(s, s);
        CpAsyncCommit();  // one group per step, empty or not, so the waits count steps
      }
      for (int s = 0; s < steps; ++s) {
        CpAsyncWait<kStages - 3>();  // this thread's copies of step s have landed
        FenceSharedForAsyncProxy();
        if (kPaced) throttle.AtStep(t0 + s);
        __syncthreads();  // everyone's have; and step s - 2's wgmma (waited below) is done
        const int nxt = s + kStages - 2;
        if (nxt < steps) load_step(nxt, nxt % kStages);  // into the stage step s - 2 read
        CpAsyncCommit();
        const uint32_t st = smem_base + (s % kStages) * Cfg::kStageBytes;
        const uint32_t dys = st + G * Cfg::kPackBytes;
        WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < kRows / 16; ++kk) {
          // A k16 slice is 16 rows on (feature axis 1) or 32 bytes into the rows (feature axis 0).
          const uint64_t bd =
              DescriptorR<kDyRowBytes>(dys + (FA == 1 ? kk * 16 * kDyRowBytes : kk * 32));
#pragma unroll
          for (int j = 0; j < GW; ++j) {
            const uint32_t a =
                st + (pack0 + j) * Cfg::kPackBytes + (FA == 1 ? kk * 16 * 128 : kk * 32);
            Wgmma<T, BS, FA == 1, FA == 1>(acc[j], DescriptorR<kPackRowBytes>(a), bd);
          }
        }
        WgmmaCommit();
        WgmmaWait<1>();  // step s - 1's group is done; step s's may still run
      }
      WgmmaWait<0>();
      CpAsyncWait<0>();
      __syncthreads();
    }  // cp.async copies

    // Epilogue: pack pack0 + j's acc holds rows 16 warp + lane / 4 (+ 8) (warp within the
    // warpgroup; block slot row / BS, its feature row % BS), columns 8 i + 2 (lane % 4) (+ 1)
    // of dw.  Stage the float partial sums as rows 64 (pack0 + j) + row, then each rank of the
    // cluster sums (in rank order) and writes its share of the 16-byte output chunks.
    float* Cs = reinterpret_cast<float*>(smem);
    if (tid < Cfg::kMmaThreads) {
      const int lane = tid & 31, row = 16 * ((tid & 127) >> 5) + (lane >> 2);
      const int col = 2 * (lane & 3);
#pragma unroll
      for (int j = 0; j < GW; ++j)
#pragma unroll
        for (int i = 0; i < BS / 8; ++i) {
          float* r = Cs + (64 * (pack0 + j) + row) * Cfg::kCLd + 8 * i + col;
          *reinterpret_cast<float2*>(r) = make_float2(acc[j][4 * i], acc[j][4 * i + 1]);
          *reinterpret_cast<float2*>(r + 8 * Cfg::kCLd) =
              make_float2(acc[j][4 * i + 2], acc[j][4 * i + 3]);
        }
    }
    if (split > 1) {
      mma_impl::ClusterSync();
    } else {
      __syncthreads();
    }
    const int chunks = nblk * BS * (BS / 8);
    const int qbeg = rank * chunks / split, qend = (rank + 1) * chunks / split;
    for (int cq = qbeg + tid; cq < qend; cq += Cfg::kThreads) {
      const int row = cq / (BS / 8), c8 = (cq % (BS / 8)) * 8;
      float v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = 0.f;
      for (int src = 0; src < split; ++src) {
        const float* Cq = split > 1 ? mma_impl::ClusterPeer(Cs, src) : Cs;
        const float4 lo = *reinterpret_cast<const float4*>(Cq + row * Cfg::kCLd + c8);
        const float4 hi = *reinterpret_cast<const float4*>(Cq + row * Cfg::kCLd + c8 + 4);
        v[0] += lo.x; v[1] += lo.y; v[2] += lo.z; v[3] += lo.w;
        v[4] += hi.x; v[5] += hi.y; v[6] += hi.z; v[7] += hi.w;
      }
      const int b = s_b[row / BS];
      StoreChunk<T>(gdw + (static_cast<int64_t>(b) * BS + row % BS) * BS + c8, v);
    }
    if (split > 1) mma_impl::ClusterSync();  // peers may still be reading this shared memory
    if (!kPaced) break;
  }  // groups
  if (kPaced) throttle.Finish(t0);
#else
  (void)kp;
  __trap();
#endif
}

}  // namespace wgmma_impl
}  // namespace gpu
}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_WGMMA_CUH_
