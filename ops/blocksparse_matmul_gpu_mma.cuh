// Tensor-core (mma.sync m16n8k16, 16-bit inputs, float32 accumulators) kernel template for
// the block-sparse products.  Included by blocksparse_matmul_gpu.cu only.
//
// Every product is cast as a sequence of small GEMM steps on one output tile of BM x BN:
//   acc[BM x BN] += A_s[BM x KS] * B_s[KS x BN],  s = 0 .. steps-1
// streamed through a STAGES-deep cp.async pipeline in shared memory.
//   Forward:  M = rows of the batch (N), N = output features of one block column, the K
//             extent of a step is BPS stored blocks of that column (BPS * bs).
//   GradW:    M, N = the bs x bs of one stored block, a step is BK rows of the batch.
// The operands sit in memory either K-contiguous or M/N-contiguous depending on the product
// and the feature axis; ldmatrix (with or without .trans) turns either into the mma
// fragments.  Shared-memory rows are padded so that ldmatrix and the scalar fragment loads are
// bank-conflict-free.
// float32 runs as "3xTF32": each operand is split into a TF32 high part and a TF32 residual,
// and acc += a_lo*b_hi + a_hi*b_lo + a_hi*b_hi (m16n8k8 TF32 MMAs), which keeps float32
// accuracy (the dropped a_lo*b_lo term is below float32 rounding) on the tensor cores.
// Split-K over a thread-block cluster (sm_90): when there are too few output tiles to fill the
// GPU, S CTAs of a cluster share one tile, each taking every S-th step; their float32 partial
// tiles are summed through distributed shared memory in a fixed order (rank 0, 1, ...), so the
// result does not depend on timing.
#ifndef BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_MMA_CUH_
#define BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_MMA_CUH_

#include <cuda_bf16.h>
#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace blocksparse {
namespace gpu {
namespace mma_impl {

enum Mode { kForward = 0, kGradW = 1 };

struct Params {
  const void* x;      // forward: x;  gradw: x
  const void* w;      // forward: w;  gradw: dy
  void* y;            // forward: y;  gradw: dw
  int64_t N, C, K;    // batch, input features, output features
  const int32_t* col_ptr;
  const int32_t* col_row;
  const int32_t* col_block;
  const int32_t* block_row;
  const int32_t* block_col;
  int64_t blocks;       // number of stored blocks
  int64_t n_tile_base;  // forward: first batch tile of this launch (grids are split at 65535)
  int64_t run_blocks = 0;  // small-batch dW: blocks of a column per CTA (see its kernel)
  // wgmma dW with more column groups than fit on the GPU: a counter per epoch of batch steps
  // (null: one group per CTA; see WgmmaGradWColumnKernel) and how many epochs there are.
  uint32_t* epoch_arrivals = nullptr;
  int64_t epochs = 0;
  int epoch_slack = 1;  // epochs a CTA may run ahead of the slowest (EpochThrottle)
  // forward: consecutive block columns one CTA computes, one after another (see
  // BlocksparseMmaKernel); 1: a CTA per output tile.
  int64_t columns_per_cta = 1;
  // The host's copy of col_ptr, or null (DeviceLayout::host_col_ptr): read on the host only, by
  // launches that pass their CTAs' list bounds in their parameters (see RunStarts).
  const int32_t* host_col_ptr = nullptr;
  const int32_t* host_col_row = nullptr;  // and of col_row (DeviceLayout::host_col_row)
  int64_t column_group_rows = -1;          // DeviceLayout::column_group_rows
};

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  const int bytes = valid ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(smem)),
               "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <bool kTrans>
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* p) {
  if (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(SmemAddr(p)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(SmemAddr(p)));
  }
}

// 16-bit mma.sync operand fragments from a shared-memory tile with rows of `ld` elements.
// A (16 x 16 at rows mb.., K slice kk): stored K-contiguous ([M][ld]) or M-contiguous
// ([K][ld], read transposed).
template <bool kMContig, typename T>
__device__ __forceinline__ void LoadAFragment(uint32_t (&a)[4], const T* As, int ld, int mb,
                                              int kk, int lane) {
  const int li = lane >> 3, lr = lane & 7;
  if constexpr (!kMContig) {
    LdMatrixX4<false>(a, As + (mb + (lane & 15)) * ld + kk * 16 + (lane >> 4) * 8);
  } else {
    LdMatrixX4<true>(a, As + (kk * 16 + lr + (li >> 1) * 8) * ld + mb + (li & 1) * 8);
  }
}
// B for two adjacent 8-column MMAs (16 x 16 at columns nb.., K slice kk): r[0..1] for columns
// nb.., r[2..3] for nb + 8..; stored N-contiguous ([K][ld], read transposed) or K-contiguous
// ([N][ld]).
template <bool kKContig, typename T>
__device__ __forceinline__ void LoadBFragmentPair(uint32_t (&r)[4], const T* Bs, int ld, int nb,
                                                  int kk, int lane) {
  const int li = lane >> 3, lr = lane & 7;
  if constexpr (!kKContig) {
    LdMatrixX4<true>(r, Bs + (kk * 16 + lr + (li & 1) * 8) * ld + nb + (li >> 1) * 8);
  } else {
    LdMatrixX4<false>(r, Bs + (nb + lr + (li >> 1) * 8) * ld + kk * 16 + (li & 1) * 8);
  }
}

// float32 operands (TF32 m16n8k8, the raw float bits; K slices of 8), same layouts: A (16 x 8 at
// rows mb.., slice kk) K-contiguous through ldmatrix on 32-bit pairs, M-contiguous by scalar
// loads; B for two adjacent 8-column MMAs (r[0..1] columns nb.., r[2..3] nb + 8..).
template <bool kMContig>
__device__ __forceinline__ void LoadAFragmentF32(uint32_t (&a)[4], const uint32_t* As, int ld,
                                                 int mb, int kk, int lane) {
  if constexpr (!kMContig) {
    LdMatrixX4<false>(a, As + (mb + (lane & 15)) * ld + kk * 8 + (lane >> 4) * 4);
  } else {
    const uint32_t* r0 = As + (kk * 8 + (lane & 3)) * ld + mb + (lane >> 2);
    a[0] = r0[0];
    a[1] = r0[8];
    a[2] = r0[4 * ld];
    a[3] = r0[4 * ld + 8];
  }
}
template <bool kKContig>
__device__ __forceinline__ void LoadBFragmentPairF32(uint32_t (&r)[4], const uint32_t* Bs,
                                                     int ld, int nb, int kk, int lane) {
  if constexpr (!kKContig) {
    const uint32_t* r0 = Bs + (kk * 8 + (lane & 3)) * ld + nb + (lane >> 2);
    r[0] = r0[0];
    r[1] = r0[4 * ld];
    r[2] = r0[8];
    r[3] = r0[4 * ld + 8];
  } else {
    const int li = lane >> 3, lr = lane & 7;
    LdMatrixX4<false>(r, Bs + (nb + lr + (li >> 1) * 8) * ld + kk * 8 + (li & 1) * 4);
  }
}

template <typename T>
struct MmaOp;
template <>
struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void Run(float (&d)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct MmaOp<__half> {
  static __device__ __forceinline__ void Run(float (&d)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// float32 operands: split into a TF32 high part and the residual.
// hi: x rounded to TF32's 10 mantissa bits, half away from zero, as cvt.rna.tf32 rounds finite
// values: half a TF32 unit added to the bits and the 13 low bits cleared (a carry moves into
// the exponent as it should; infinity stays infinity).  lo = x - hi, exact in float32, goes to
// the MMA as it is, which uses it at TF32 precision (at worst truncated instead of rounded: an
// error of at most 2^-10 of lo, itself at most 2^-11 of x).  Three integer and float
// instructions per element where the two cvt.rna.tf32 conversions compiled to seven, which set
// the pace of the float32 kernels (Nsight Compute, bs 32 at 2% density: the splits made about
// half of the instructions issued, the MMAs a tenth).  Measured on an H200 (C = K = 4096,
// the two builds in alternating processes, fastest of two): forward, input gradient and dW
// 0.80-0.93x the time of the cvt.rna split, the same accuracy against float64 (largest error
// over the largest reference value 2e-7 to 9e-7 either way).  A NaN in x gives a NaN lo, and an
// infinity an infinite hi with a NaN lo, as before: non-finite inputs make the sums NaN.
__device__ __forceinline__ void SplitTf32(uint32_t bits, uint32_t& hi, uint32_t& lo) {
  hi = (bits + 0x1000u) & 0xffffe000u;
  lo = __float_as_uint(__uint_as_float(bits) - __uint_as_float(hi));
}
__device__ __forceinline__ void MmaTf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T>
__device__ __forceinline__ uint32_t PackPair(float a, float b);
template <>
__device__ __forceinline__ uint32_t PackPair<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t PackPair<__half>(float a, float b) {
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Element <-> float32 conversions (round to nearest even).
template <typename T>
__device__ __forceinline__ float ToF(T v);
template <>
__device__ __forceinline__ float ToF<float>(float v) { return v; }
template <>
__device__ __forceinline__ float ToF<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float ToF<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T>
__device__ __forceinline__ T FromF(float v);
template <>
__device__ __forceinline__ float FromF<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half FromF<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 FromF<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Stores CE consecutive outputs (16 bytes) converted from float.
template <typename T>
__device__ __forceinline__ void StoreChunk(T* dst, const float* v);
template <>
__device__ __forceinline__ void StoreChunk<float>(float* dst, const float* v) {
  *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
}
template <typename T>
__device__ __forceinline__ void StoreChunk(T* dst, const float* v) {
  uint4 out;
  out.x = PackPair<T>(v[0], v[1]);
  out.y = PackPair<T>(v[2], v[3]);
  out.z = PackPair<T>(v[4], v[5]);
  out.w = PackPair<T>(v[6], v[7]);
  *reinterpret_cast<uint4*>(dst) = out;
}

// Stores two consecutive outputs converted from float.
template <typename T>
__device__ __forceinline__ void StorePair(T* dst, float a, float b) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float2*>(dst) = make_float2(a, b);
  } else {
    *reinterpret_cast<uint32_t*>(dst) = PackPair<T>(a, b);
  }
}

// Entry g of a small register array, without dynamic indexing (which would spill the array).
template <int NN>
__device__ __forceinline__ int PickReg(const int (&a)[NN], int g) {
  int v = a[0];
#pragma unroll
  for (int j = 1; j < NN; ++j) v = g == j ? a[j] : v;
  return v;
}

// Cluster helpers: on sm_80 every CTA is alone (split == 1), so they reduce to the CTA.
__device__ __forceinline__ void ClusterInfo(int& size, int& rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t n, r;
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  size = static_cast<int>(n);
  rank = static_cast<int>(r);
#else
  size = 1;
  rank = 0;
#endif
}
__device__ __forceinline__ void ClusterSync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __syncthreads();
#endif
}
__device__ __forceinline__ const float* ClusterPeer(float* p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  (void)rank;
  return p;
#endif
}

// Scans the column view for run `g` among the runs that runs_of(blocks in the column) gives:
// {how many, index of the first (in runs of `per` from the column's start)}.  Runs count in
// column order, then position.  If found, sets s_run = {column, first position, end position}
// and returns true; else returns false with g reduced by the runs scanned.  All threads of the
// CTA call it, with s_run[0] = -1 and a barrier before.
template <class RunsOf>
__device__ __forceinline__ bool ScanColumnRuns(const int32_t* __restrict__ col_ptr, int64_t KB,
                                               int64_t& g, int per, RunsOf runs_of, int* s_run,
                                               int* s_warp) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
  int64_t before = 0;  // runs in the columns already scanned
  for (int64_t base = 0; base < KB; base += blockDim.x) {
    const int64_t k = base + tid;
    int beg = 0, end = 0;
    if (k < KB) {
      beg = __ldg(col_ptr + k);
      end = __ldg(col_ptr + k + 1);
    }
    const int2 rf = runs_of(end - beg);
    const int runs = rf.x;
    int incl = runs;  // inclusive scan over the CTA: warps, then warp totals
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += v;
    }
    if (lane == 31) s_warp[warp] = incl;
    __syncthreads();
    int total = 0;
    for (int w = 0; w < warps; ++w) {
      const int v = s_warp[w];
      if (w < warp) incl += v;
      total += v;
    }
    const int64_t first = before + incl - runs;
    if (g >= first && g < first + runs) {
      const int b = beg + (rf.y + static_cast<int>(g - first)) * per;
      s_run[0] = static_cast<int>(k);
      s_run[1] = b;
      s_run[2] = min(end, b + per);
    }
    __syncthreads();  // s_run is final for this pass; s_warp may be rewritten
    if (s_run[0] >= 0) return true;
    before += total;
  }
  g -= before;
  return false;
}

// Finds run `g` of the column view, where every block column's list is cut into runs of `per`
// consecutive blocks, in column order: sets s_run = {column, first position, end position}
// (column -1 when g is past the last run).  All threads of the CTA call it.
__device__ __forceinline__ void FindColumnRun(const int32_t* __restrict__ col_ptr, int64_t KB,
                                              int64_t g, int per, int* s_run, int* s_warp) {
  if (threadIdx.x == 0) s_run[0] = -1;
  __syncthreads();
  ScanColumnRuns(
      col_ptr, KB, g, per, [per](int n) { return make_int2((n + per - 1) / per, 0); }, s_run,
      s_warp);
}

// The same runs, ordered by their length in packs of `pack` blocks, longest first: the whole
// runs in column order, then the columns' last, partial runs of per / pack packs (as long as
// whole ones), then those of per / pack - 1 packs, and so on.  For the paced wgmma dW (see
// LaunchPacedColumnGroups), whose CTAs wait for each other every few batch steps: the runs
// they take at the same time are then about equally long, so they wait little.
__device__ __forceinline__ void FindColumnRunLongestFirst(const int32_t* __restrict__ col_ptr,
                                                          int64_t KB, int64_t g, int per,
                                                          int pack, int* s_run, int* s_warp) {
  if (threadIdx.x == 0) s_run[0] = -1;
  __syncthreads();
  const int packs = per / pack;
  if (ScanColumnRuns(
          col_ptr, KB, g, per, [per](int n) { return make_int2(n / per, 0); }, s_run, s_warp))
    return;
  for (int q = packs; q >= 1; --q) {
    const auto partial_of_q = [per, pack, q](int n) {
      const int rest = n % per;
      return make_int2(rest > 0 && (rest + pack - 1) / pack == q ? 1 : 0, n / per);
    };
    if (ScanColumnRuns(col_ptr, KB, g, per, partial_of_q, s_run, s_warp)) return;
  }
}

// Compile-time description of one kernel configuration.
//   T: element type.  MODE, FA: product and feature axis.  BS: block size.  BM x BN: output
//   tile.  KSTEP: forward: blocks per step (BPS); gradw: batch rows per step (BK).
//   WM x WN x WK warps: WM x WN split the tile, WK split each step's K slices (their partial
//   sums are added in a fixed order at the end, so results stay deterministic).
//   TRANSW (forward only): each stored block holds the transpose of the product's block (the
//   input gradient's dy . W^T from w as stored), so the weight tiles are K-contiguous, read
//   like the dW's dy with feature axis 0: the same products and sums as on a transposed copy.
template <typename T, int MODE, int FA, int BS, int BM, int BN, int KSTEP, int WM, int WN,
          int WK, int STAGES, bool TRANSW = false>
struct Config {
  using Elem = T;
  static constexpr bool kF32 = sizeof(T) == 4;
  static constexpr int kES = sizeof(T), kCE = 16 / kES;  // elements per 16-byte chunk
  static constexpr int kKSlice = kF32 ? 8 : 16;          // K of one MMA
  static constexpr int kMode = MODE, kFA = FA, kBS = BS, kBM = BM, kBN = BN;
  static constexpr int kKS = MODE == kForward ? KSTEP * BS : KSTEP;  // K extent of a step
  static constexpr int kBPS = MODE == kForward ? KSTEP : 1;
  static constexpr int kWM = WM, kWN = WN, kWK = WK, kStages = STAGES;
  // GradW with BM = G * BS: one tile holds G stored blocks of one block column (consecutive
  // entries of the column view), which share the dy slab: G + 1 slabs read instead of 2 G.
  static constexpr int kGroup = (MODE == kGradW && BM > BS) ? BM / BS : 1;
  static constexpr int kThreads = 32 * WM * WN * WK;
  static constexpr int kWTM = BM / WM, kWTN = BN / WN;
  static constexpr int kMT = kWTM / 16, kNT = kWTN / 8;
  // Operand layouts in memory (and in shared memory).
  static constexpr bool kAMContig = (MODE == kForward && FA == 0) || (MODE == kGradW && FA == 1);
  static constexpr bool kBKContig = (MODE == kGradW && FA == 0) || (MODE == kForward && TRANSW);
  static constexpr bool kCMContig = (MODE == kForward && FA == 0);
  // Row padding: K-contiguous rows (read with ldmatrix) by 16 bytes; M/N-contiguous rows by
  // 8 elements (16 bytes for ldmatrix.trans; 32 bytes for float32 scalar fragment loads).
  static constexpr int kPadK = kCE, kPadMN = 8;
  static constexpr int kALd = kAMContig ? BM + kPadMN : kKS + kPadK;
  static constexpr int kBLd = kBKContig ? kKS + kPadK : BN + kPadMN;
  static constexpr int kASize = kAMContig ? kKS * kALd : BM * kALd;  // elements
  static constexpr int kBSize = kBKContig ? BN * kBLd : kKS * kBLd;
  static constexpr int kStageBytes = (kASize + kBSize) * kES;
  static constexpr int kCLd = BN + 4;  // floats
  static constexpr int kEpiBytes = WK * BM * kCLd * 4;
  static constexpr int kSmemBytes =
      STAGES * kStageBytes > kEpiBytes ? STAGES * kStageBytes : kEpiBytes;
  static_assert(BM % (16 * WM) == 0 && BN % (16 * WN) == 0, "warp tile must be 16-aligned");
  static_assert(kKS % (kKSlice * WK) == 0, "each K slice group needs whole MMA slices");
  static_assert(BS % BN == 0, "column split must divide the block");
  static_assert(MODE == kForward || !TRANSW, "only the forward reads w transposed");
  static_assert(MODE == kForward || BS % BM == 0 || (BM % BS == 0 && BN == BS),
                "gradw: row split must divide the block, or whole blocks be grouped");
};

// One CTA (or one cluster of `split` CTAs, see above) computes one output tile.
//   forward: tile = block column k * (BS / BN) + column split; blockIdx.y = batch tile.
//   gradw:   tile = block b * (BS/BM)*(BS/BN) + tile inside the block; or, with grouped tiles
//            (BM = G * BS), entries G*tile .. G*tile+G-1 of the column view.
//   blockIdx.x = tile * split + rank in the cluster.
template <typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    BlocksparseMmaKernel(const Params p) {
  using T = typename Cfg::Elem;
  constexpr int BS = Cfg::kBS, BM = Cfg::kBM, BN = Cfg::kBN, KS = Cfg::kKS, CE = Cfg::kCE;
  constexpr int BPS = Cfg::kBPS, NTH = Cfg::kThreads;
  constexpr int MT = Cfg::kMT, NT = Cfg::kNT;
  constexpr bool kFwd = Cfg::kMode == kForward;
  constexpr bool kAMC = Cfg::kAMContig, kBKC = Cfg::kBKContig, kCMC = Cfg::kCMContig;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const T* __restrict__ gx = static_cast<const T*>(p.x);
  const T* __restrict__ gw = static_cast<const T*>(p.w);
  T* __restrict__ gy = static_cast<T*>(p.y);
  const int64_t N = p.N, C = p.C, K = p.K;
  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  // (A constant 0 when the steps are not split over warps, so the MMA loops unroll fully.)
  const int wk = Cfg::kWK == 1 ? 0 : warp / (Cfg::kWM * Cfg::kWN);
  const int wmn = warp % (Cfg::kWM * Cfg::kWN);
  const int wm = wmn / Cfg::kWN, wn = wmn % Cfg::kWN;
  int split, rank;
  ClusterInfo(split, rank);
  const int tile = blockIdx.x / split;
  // Several block columns per CTA (forward, split 1, one block per step, whole blocks wide,
  // y (N, K)): the CTA's steps are the blocks of columns k_first .. k_end - 1, consecutive in
  // the column view, and its copies run on from one column into the next, so the next
  // column's first blocks load while a column ends; each column's sums go from the registers
  // straight to y as it ends (the shared memory stays with the pipeline).  Each column's sums
  // are those of a CTA of its own, in the same order.
  constexpr bool kColumnRunsOK =
      kFwd && Cfg::kBPS == 1 && BN == BS && !kCMC && Cfg::kWK == 1;
  const bool column_runs = kColumnRunsOK && p.columns_per_cta > 1;
  int k_first = 0, k_end = 0;

  // ---- what this CTA computes ----
  int64_t n0 = 0;          // forward: first batch row
  constexpr int G = Cfg::kGroup;
  int kcol = 0;                   // block column
  int gb[G], gc[G], gk[G], ng = 1;  // gradw: stored block, block row, block column of tile rows
  int m_off = 0, n_off = 0;
  int pbeg = 0, pend = 0, total_steps = 0;
  if constexpr (kFwd) {
    constexpr int kSplit = BS / BN;
    kcol = tile / kSplit;
    n_off = (tile % kSplit) * BN;
    n0 = (p.n_tile_base + blockIdx.y) * (int64_t)BM;
    if (column_runs) {
      const int64_t KB = K / BS;
      k_first = static_cast<int>(tile * p.columns_per_cta);
      k_end = static_cast<int>(KB - k_first < p.columns_per_cta ? KB : k_first + p.columns_per_cta);
      kcol = k_first;
      n_off = 0;
      pbeg = __ldg(p.col_ptr + k_first);
      pend = __ldg(p.col_ptr + k_end);
    } else {
      pbeg = __ldg(p.col_ptr + kcol);
      pend = __ldg(p.col_ptr + kcol + 1);
    }
    total_steps = (pend - pbeg + BPS - 1) / BPS;
  } else {
    if constexpr (G == 1) {
      constexpr int kMSplit = BS / BM, kNSplit = BS / BN;
      const int bidx = tile / (kMSplit * kNSplit);
      const int sub = tile % (kMSplit * kNSplit);
      m_off = (sub / kNSplit) * BM;
      n_off = (sub % kNSplit) * BN;
      gb[0] = bidx;
      gc[0] = __ldg(p.block_row + bidx);
      gk[0] = __ldg(p.block_col + bidx);
    } else {
      const int64_t e0 = (int64_t)tile * G;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const bool valid = e0 + g < p.blocks;
        const int b = valid ? __ldg(p.col_block + e0 + g) : 0;
        gb[g] = b;
        gc[g] = valid ? __ldg(p.block_row + b) : 0;
        gk[g] = valid ? __ldg(p.block_col + b) : -1;
      }
      ng = static_cast<int>(p.blocks - e0 < G ? p.blocks - e0 : G);
    }
    kcol = gk[0];
    total_steps = static_cast<int>((N + KS - 1) / KS);
  }
  // ---- forward: the step-invariant part of each thread's copy addresses ----
  // A pass of the CTA's threads over a tile covers R rows; thread tid copies the 16-byte chunk
  // tid % (chunks per row) of rows tid / (chunks per row) + j R, so per step only the block
  // row (x) or stored block (w) changes, not the thread's offsets.
  // (Tile widths and thread counts are powers of two, so a pass always covers whole rows.)
  constexpr int kXCh = KS / CE, kXRows = NTH / kXCh;  // x (N, C): chunks per row, rows per pass
  constexpr int kWCh = BN / CE, kWRows = NTH / kWCh;  // w blocks: chunks per row, rows per pass
  constexpr bool kXRowMajor = kFwd && !kAMC;          // forward with x (N, C)
  static_assert(!kXRowMajor || (NTH % kXCh == 0 && BM * kXCh <= 32 * NTH),
                "x copies: whole rows per pass, row-valid bits within 32 bits");
  static_assert(!kFwd || (NTH % kWCh == 0 && (BS % kWRows == 0 || kWRows % BS == 0)),
                "w copies: whole rows per pass, passes aligned with blocks");
  const T* x_thread = gx;  // x[n0 + tid / kXCh, column (tid % kXCh) * CE within the step]
  int64_t x_pass = 0;      // elements between rows j and j + 1 of this thread
  uint32_t x_rows_ok = 0;  // bit j: row j of this thread lies inside the batch
  int x_blk = 0;           // which of the step's BPS blocks this thread's column falls in
  int w_thread = 0;        // offset of this thread's chunk inside a block (row j = 0)
  int w_blk = 0;           // kWRows > BS: block of row j = j * kWRows / BS + w_blk
  if constexpr (kXRowMajor) {
    const int t = tid / kXCh, kc = tid % kXCh;
    x_blk = (kc * CE) / BS;
    x_thread = gx + (n0 + t) * C + (kc * CE) % BS;
    x_pass = (int64_t)kXRows * C;
#pragma unroll
    for (int j = 0; j < (BM * kXCh + NTH - 1) / NTH; ++j)
      if (n0 + t + (int64_t)j * kXRows < N) x_rows_ok |= 1u << j;
  }
  if constexpr (kFwd) {
    const int t = tid / kWCh, nc = tid % kWCh;
    w_thread = (kWRows <= BS ? t : t % BS) * BS + n_off + nc * CE;
    w_blk = kWRows <= BS ? 0 : t / BS;
  }

  // gradw: tile rows of blocks run_lo .. run_hi-1 (one block column) are being computed.
  int run_lo = 0, run_hi = 1;
  // This CTA takes steps rank, rank + split, ...
  const int steps = total_steps > rank ? (total_steps - rank + split - 1) / split : 0;

  // ---- forward: block indices (block row, stored block) of a step, fetched into registers
  // one step ahead of their use so that their latency overlaps the MMAs; -1 = no block ----
  auto fetch_idx = [&](int ls, int (&ic)[BPS], int (&ib)[BPS]) {
    const int s = rank + ls * split;
#pragma unroll
    for (int g = 0; g < BPS; ++g) {
      const int pi = pbeg + s * BPS + g;
      const bool vb = kFwd && ls < steps && pi < pend;
      ic[g] = vb ? __ldg(p.col_row + pi) : -1;
      ib[g] = vb ? __ldg(p.col_block + pi) : -1;
    }
  };

  // ---- producer: issue the cp.async copies of local step ls into stage buffer `buf` ----
  auto load_step = [&](int ls, int buf, const int (&ic)[BPS], const int (&ib)[BPS]) {
    const int s = rank + ls * split;
    T* As = smem + buf * (Cfg::kASize + Cfg::kBSize);
    T* Bs = As + Cfg::kASize;
    if constexpr (kFwd) {
      // A: x rows n0.., columns of the BPS blocks of this step.
      if constexpr (kXRowMajor) {  // x (N, C): tile [BM][KS], K contiguous
        constexpr int kTotal = BM * kXCh;
        const int c = PickReg(ic, x_blk);
        const T* src = x_thread + (int64_t)c * BS;
        T* dst = As + (tid / kXCh) * Cfg::kALd + (tid % kXCh) * CE;
#pragma unroll
        for (int j = 0; j < (kTotal + NTH - 1) / NTH; ++j) {
          if (kTotal % NTH == 0 || j * NTH + tid < kTotal) {
            const bool v = c >= 0 && ((x_rows_ok >> j) & 1u);
            CpAsync16(dst + j * kXRows * Cfg::kALd, v ? src + j * x_pass : gx, v);
          }
        }
      } else {  // x (C, N): tile [KS][BM], M contiguous
        constexpr int kCh = BM / CE, kTotal = KS * kCh;
#pragma unroll
        for (int q0 = 0; q0 < kTotal; q0 += NTH) {
          const int q = q0 + tid;
          if (kTotal % NTH == 0 || q < kTotal) {
            const int r = q / kCh, mc = q % kCh;
            const int g = r / BS, i = r % BS;
            const int c = PickReg(ic, g);
            const bool v = c >= 0 && (n0 + mc * CE < N);
            const T* src = v ? gx + ((int64_t)c * BS + i) * N + n0 + mc * CE : gx;
            CpAsync16(As + r * Cfg::kALd + mc * CE, src, v);
          }
        }
      }
      // B: the blocks themselves, rows i, columns n_off .. n_off+BN: tile [KS][BN]; or, with
      // the blocks stored transposed, their rows n_off .. n_off+BN: tile [BN][KS], K
      // contiguous.  Consecutive threads copy consecutive chunks of one stored block (its BN
      // rows of BS elements lie one after another), each row into the step's columns of it.
      if constexpr (kBKC) {
        constexpr int kBlkCh = BS / CE, kTotal = BPS * BN * kBlkCh;
#pragma unroll
        for (int q0 = 0; q0 < kTotal; q0 += NTH) {
          const int q = q0 + tid;
          if (kTotal % NTH == 0 || q < kTotal) {
            const int g = q / (BN * kBlkCh), o = q / kBlkCh % BN, i = q % kBlkCh * CE;
            const int b = PickReg(ib, g);
            const bool vb = b >= 0;
            const T* src = vb ? gw + ((int64_t)b * BS + n_off + o) * BS + i : gw;
            CpAsync16(Bs + o * Cfg::kBLd + g * BS + i, src, vb);
          }
        }
      } else {
        constexpr int kTotal = KS * kWCh;
        T* dst = Bs + (tid / kWCh) * Cfg::kBLd + (tid % kWCh) * CE;
#pragma unroll
        for (int j = 0; j < (kTotal + NTH - 1) / NTH; ++j) {
          if (kTotal % NTH == 0 || j * NTH + tid < kTotal) {
            // row j * kWRows + tid / kWCh of the step: block g, row i inside it
            int b;
            int64_t row_off;
            if constexpr (kWRows <= BS) {
              b = ib[(j * kWRows) / BS];
              row_off = ((j * kWRows) % BS) * BS;
            } else {
              b = PickReg(ib, j * (kWRows / BS) + w_blk);
              row_off = 0;
            }
            const bool vb = b >= 0;
            const T* src = vb ? gw + (int64_t)b * BS * BS + row_off + w_thread : gw;
            CpAsync16(dst + j * kWRows * Cfg::kBLd, src, vb);
          }
        }
      }
    } else {
      const int64_t k0 = (int64_t)s * KS;  // first batch row of this step
      // Batch-row-major operands (feature axis 1): thread tid copies chunk tid % (chunks per
      // row) of batch rows k0 + tid / (chunks per row) + j R, R rows per pass of the CTA.
      constexpr int kACh = BM / CE, kBCh = BN / CE;
      static_assert((!kAMC || NTH % kACh == 0) && (kBKC || NTH % kBCh == 0),
                    "batch-row copies: whole rows per pass");
      if constexpr (kAMC) {  // FA 1: x (N, C): A tile [KS][BM]
        constexpr int R = NTH / kACh, kTotal = KS * kACh;
        const int t = tid / kACh, mc = tid % kACh, g = (mc * CE) / BS;
        const bool in_run = g >= run_lo && g < run_hi;
        const T* src = gx + (k0 + t) * C + (int64_t)PickReg(gc, g) * BS + m_off + (mc * CE) % BS;
        T* dst = As + t * Cfg::kALd + mc * CE;
#pragma unroll
        for (int j = 0; j < (kTotal + NTH - 1) / NTH; ++j) {
          if (kTotal % NTH == 0 || j * NTH + tid < kTotal) {
            const bool v = in_run && k0 + t + j * R < N;
            CpAsync16(dst + j * R * Cfg::kALd, v ? src + (int64_t)j * R * C : gx, v);
          }
        }
      } else {  // FA 0: x (C, N): A tile [BM][KS], K contiguous
        constexpr int kCh = KS / CE, kTotal = BM * kCh;
#pragma unroll
        for (int q0 = 0; q0 < kTotal; q0 += NTH) {
          const int q = q0 + tid;
          if (kTotal % NTH == 0 || q < kTotal) {
            const int m = q / kCh, kc = q % kCh;
            const int g = m / BS;
            const bool v = k0 + kc * CE < N && g >= run_lo && g < run_hi;
            const T* src =
                v ? gx + ((int64_t)PickReg(gc, g) * BS + m_off + m % BS) * N + k0 + kc * CE : gx;
            CpAsync16(As + m * Cfg::kALd + kc * CE, src, v);
          }
        }
      }
      if constexpr (!kBKC) {  // FA 1: dy (N, K): B tile [KS][BN]
        constexpr int R = NTH / kBCh, kTotal = KS * kBCh;
        const int t = tid / kBCh, nc = tid % kBCh;
        const T* src = gw + (k0 + t) * K + (int64_t)kcol * BS + n_off + nc * CE;
        T* dst = Bs + t * Cfg::kBLd + nc * CE;
#pragma unroll
        for (int j = 0; j < (kTotal + NTH - 1) / NTH; ++j) {
          if (kTotal % NTH == 0 || j * NTH + tid < kTotal) {
            const bool v = k0 + t + j * R < N;
            CpAsync16(dst + j * R * Cfg::kBLd, v ? src + (int64_t)j * R * K : gw, v);
          }
        }
      } else {  // FA 0: dy (K, N): B tile [BN][KS], K contiguous
        constexpr int kCh = KS / CE, kTotal = BN * kCh;
#pragma unroll
        for (int q0 = 0; q0 < kTotal; q0 += NTH) {
          const int q = q0 + tid;
          if (kTotal % NTH == 0 || q < kTotal) {
            const int j = q / kCh, kc = q % kCh;
            const bool v = k0 + kc * CE < N;
            const T* src = v ? gw + ((int64_t)kcol * BS + n_off + j) * N + k0 + kc * CE : gw;
            CpAsync16(Bs + j * Cfg::kBLd + kc * CE, src, v);
          }
        }
      }
    }
  };

  float acc[MT][NT][4];

  // ---- consumer: MMAs on one stage buffer ----
  auto compute_step = [&](int buf) {
    const T* As = smem + buf * (Cfg::kASize + Cfg::kBSize);
    const T* Bs = As + Cfg::kASize;
    if constexpr (!Cfg::kF32) {
#pragma unroll
      for (int kq = 0; kq < KS / 16 / Cfg::kWK; ++kq) {
        const int kk = kq * Cfg::kWK + wk;
        uint32_t af[MT][4];
        uint32_t bf[NT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int mb = wm * Cfg::kWTM + mt * 16;
          LoadAFragment<kAMC>(af[mt], As, Cfg::kALd, mb, kk, lane);
        }
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          const int nb = wn * Cfg::kWTN + np * 16;
          uint32_t r[4];
          LoadBFragmentPair<kBKC>(r, Bs, Cfg::kBLd, nb, kk, lane);
          bf[2 * np][0] = r[0];
          bf[2 * np][1] = r[1];
          bf[2 * np + 1][0] = r[2];
          bf[2 * np + 1][1] = r[3];
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            MmaOp<T>::Run(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
      }
    } else {  // float32: 3xTF32
      // The MMA units do not round their float32 additions the IEEE way; over thousands of
      // products that drifts past float32 accuracy.  So each step's MMAs start from zero and
      // the step's partial sum is added to the accumulators with ordinary float32 adds.
      float part[MT][NT][4];
#pragma unroll
      for (int a = 0; a < MT; ++a)
#pragma unroll
        for (int b = 0; b < NT; ++b)
#pragma unroll
          for (int e = 0; e < 4; ++e) part[a][b][e] = 0.f;
      const uint32_t* Au = reinterpret_cast<const uint32_t*>(As);
      const uint32_t* Bu = reinterpret_cast<const uint32_t*>(Bs);
#pragma unroll
      for (int kq = 0; kq < KS / 8 / Cfg::kWK; ++kq) {
        const int kk = kq * Cfg::kWK + wk;
        uint32_t ah[MT][4], al[MT][4];
        uint32_t bh[NT][2], bl[NT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          uint32_t a[4];
          LoadAFragmentF32<kAMC>(a, Au, Cfg::kALd, wm * Cfg::kWTM + mt * 16, kk, lane);
#pragma unroll
          for (int e = 0; e < 4; ++e) SplitTf32(a[e], ah[mt][e], al[mt][e]);
        }
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          uint32_t r[4];
          LoadBFragmentPairF32<kBKC>(r, Bu, Cfg::kBLd, wn * Cfg::kWTN + np * 16, kk, lane);
          SplitTf32(r[0], bh[2 * np][0], bl[2 * np][0]);
          SplitTf32(r[1], bh[2 * np][1], bl[2 * np][1]);
          SplitTf32(r[2], bh[2 * np + 1][0], bl[2 * np + 1][0]);
          SplitTf32(r[3], bh[2 * np + 1][1], bl[2 * np + 1][1]);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            MmaTf32(part[mt][nt], al[mt], bh[nt][0], bh[nt][1]);
            MmaTf32(part[mt][nt], ah[mt], bl[nt][0], bl[nt][1]);
            MmaTf32(part[mt][nt], ah[mt], bh[nt][0], bh[nt][1]);
          }
      }
#pragma unroll
      for (int a = 0; a < MT; ++a)
#pragma unroll
        for (int b = 0; b < NT; ++b)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[a][b][e] += part[a][b][e];
    }
  };

  // Column runs: the sums of column kcol, from the registers to y (rows past N skipped), then
  // zeroed for the next column.  Each thread writes its fragments' pairs: four threads cover 32
  // contiguous bytes of a row.
  auto store_column = [&](int k) {
    const int grp = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int64_t row = n0 + wm * Cfg::kWTM + mt * 16 + grp;
        T* dst = gy + row * K + (int64_t)k * BS + wn * Cfg::kWTN + nt * 8 + 2 * tig;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (row + 8 * h < N)
            StorePair<T>(dst + 8 * h * K, acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
          acc[mt][nt][2 * h] = acc[mt][nt][2 * h + 1] = 0.f;
        }
      }
  };
  // Stores every column of the run that ends at or before column-view entry `done`.
  int run_col = k_first;
  int run_col_end = column_runs ? __ldg(p.col_ptr + k_first + 1) : 0;
  auto store_finished_columns = [&](int done) {
    while (run_col < k_end && run_col_end <= done) {
      store_column(run_col);
      if (++run_col < k_end) run_col_end = __ldg(p.col_ptr + run_col + 1);
    }
  };

  // gradw with grouped tiles: one pass per block column among the tile's blocks (usually one).
  for (;;) {
  if constexpr (!kFwd && G > 1) {
    if (run_lo >= ng) break;
    kcol = PickReg(gk, run_lo);
    run_hi = run_lo + 1;
#pragma unroll
    for (int g = 1; g < G; ++g)
      if (g == run_hi && g < ng && gk[g] == kcol) run_hi = g + 1;
  }
#pragma unroll
  for (int a = 0; a < MT; ++a)
#pragma unroll
    for (int b = 0; b < NT; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.f;

  // ---- pipeline ----
  int ic[BPS], ib[BPS];
#pragma unroll
  for (int g = 0; g < BPS; ++g) ic[g] = ib[g] = -1;
#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if constexpr (kFwd) fetch_idx(s, ic, ib);
    if (s < steps) load_step(s, s, ic, ib);
    CpAsyncCommit();
  }
  if constexpr (kFwd) fetch_idx(Cfg::kStages - 1, ic, ib);
  if (column_runs) store_finished_columns(pbeg);  // empty columns at the start
  for (int s = 0; s < steps; ++s) {
    CpAsyncWait<Cfg::kStages - 2>();
    __syncthreads();
    const int nxt = s + Cfg::kStages - 1;
    if (nxt < steps) load_step(nxt, nxt % Cfg::kStages, ic, ib);
    CpAsyncCommit();
    if constexpr (kFwd) {
      if (nxt + 1 < steps) fetch_idx(nxt + 1, ic, ib);  // consumed next iteration
    }
    compute_step(s % Cfg::kStages);
    if (column_runs) store_finished_columns(pbeg + s + 1);
  }
  CpAsyncWait<0>();
  if (column_runs) {
    store_finished_columns(pend);  // empty columns at the end
    return;
  }
  __syncthreads();

  // ---- epilogue: accumulators -> shared (fp32) -> fixed-order sum over K groups (and over
  // the CTAs of the cluster) -> global ----
  float* Cs = reinterpret_cast<float*>(smem_raw);
  {
    float* Cw = Cs + wk * BM * Cfg::kCLd;
    const int grp = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int row = wm * Cfg::kWTM + mt * 16 + grp;
        const int col = wn * Cfg::kWTN + nt * 8 + 2 * tig;
        *reinterpret_cast<float2*>(Cw + row * Cfg::kCLd + col) =
            make_float2(acc[mt][nt][0], acc[mt][nt][1]);
        *reinterpret_cast<float2*>(Cw + (row + 8) * Cfg::kCLd + col) =
            make_float2(acc[mt][nt][2], acc[mt][nt][3]);
      }
  }
  if (split > 1) {
    ClusterSync();
  } else {
    __syncthreads();
  }
  if constexpr (!kCMC) {  // output rows = tile rows, CE contiguous columns per store
    constexpr int kCh = BN / CE, kTotal = BM * kCh;
    const int qbeg = rank * kTotal / split, qend = (rank + 1) * kTotal / split;
    for (int q = qbeg + tid; q < qend; q += NTH) {
      const int m = q / kCh, nc = q % kCh;
      if constexpr (kFwd) {
        if (n0 + m >= N) continue;
      } else {
        if (m / BS < run_lo || m / BS >= run_hi) continue;
      }
      float v[CE];
#pragma unroll
      for (int e = 0; e < CE; ++e) v[e] = 0.f;
      for (int src = 0; src < split; ++src) {
        const float* Cq = split > 1 ? ClusterPeer(Cs, src) : Cs;
#pragma unroll
        for (int g = 0; g < Cfg::kWK; ++g) {
          const float* row = Cq + (g * BM + m) * Cfg::kCLd + nc * CE;
#pragma unroll
          for (int e = 0; e < CE; e += 4) {
            const float4 t = *reinterpret_cast<const float4*>(row + e);
            v[e] += t.x;
            v[e + 1] += t.y;
            v[e + 2] += t.z;
            v[e + 3] += t.w;
          }
        }
      }
      T* dst;
      if constexpr (kFwd) {
        dst = gy + (n0 + m) * K + (int64_t)kcol * BS + n_off + nc * CE;
      } else {
        dst = gy + ((int64_t)PickReg(gb, m / BS) * BS + m_off + m % BS) * BS + n_off + nc * CE;
      }
      StoreChunk<T>(dst, v);
    }
  } else {  // forward, feature axis 0: y (K, N): CE contiguous batch entries per store
    constexpr int kCh = BM / CE, kTotal = BN * kCh;
    const int qbeg = rank * kTotal / split, qend = (rank + 1) * kTotal / split;
    for (int q = qbeg + tid; q < qend; q += NTH) {
      const int j = q / kCh, mc = q % kCh;
      if (n0 + mc * CE >= N) continue;
      float v[CE];
#pragma unroll
      for (int e = 0; e < CE; ++e) v[e] = 0.f;
      for (int src = 0; src < split; ++src) {
        const float* Cq = split > 1 ? ClusterPeer(Cs, src) : Cs;
#pragma unroll
        for (int g = 0; g < Cfg::kWK; ++g)
#pragma unroll
          for (int e = 0; e < CE; ++e) v[e] += Cq[(g * BM + mc * CE + e) * Cfg::kCLd + j];
      }
      StoreChunk<T>(gy + ((int64_t)kcol * BS + n_off + j) * N + n0 + mc * CE, v);
    }
  }
  if (split > 1) ClusterSync();  // peers may still be reading this CTA's shared memory
  if constexpr (kFwd || G == 1) {
    break;
  } else {
    run_lo = run_hi;
    __syncthreads();  // the next pass refills the shared memory the epilogue just read
  }
  }  // passes
}

}  // namespace mma_impl
}  // namespace gpu
}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_MMA_CUH_
