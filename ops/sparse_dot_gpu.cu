// CUDA kernels of sparse_dot (see sparse_dot_gpu.h for the semantics and the strategy).
//
// Five kernels:
//   ListActiveRowsKernel: per tile column of W output features, the examples with an active
//     output block there (ascending), then the others.
//   SparseDotWgmmaKernel: the 16-bit forward on Hopper (wgmma) where bs >= 8 and m, p are
//     multiples of 64: tiles of 64 output features x 128 listed examples (see there).
//   SparseDotWgmmaGradWKernel: the 16-bit dW on Hopper (wgmma) under the same conditions,
//     tiles of 128 input x 64 output features (see there).
//   SparseDotKernel:  one CTA per (tile column j, tile of 64 listed examples): it finds the
//     input tiles used by any of its examples, then accumulates x_tile . W_tile over them.
//     Tiles made only of inactive examples just write zeros.
//   SparseDotGradWKernel: one CTA per (64 input features, tile column j) of dw: accumulates
//     x^T . dy over the examples listed for j, 64 at a time, skipping groups of 64 in which no
//     example uses those input features.
// Operands stream through a cp.async pipeline in shared memory (two to four stages), with the
// masks applied on the way: a masked-off x chunk is zero-filled, never read (masks narrower than
// a 16-byte chunk are applied element-wise once the chunk has landed).  Everything runs on the
// tensor cores: mma.sync (sm_80+) with 16-bit inputs directly and float32 as 3xTF32, wgmma
// (sm_90a) for SparseDotWgmmaKernel and SparseDotWgmmaGradWKernel.
#include "ops/sparse_dot_gpu.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "ops/block_layout.h"
#include "ops/blocksparse_matmul_gpu_internal.cuh"
#include "ops/blocksparse_matmul_gpu_mma.cuh"
#include "ops/blocksparse_matmul_gpu_wgmma.cuh"

namespace blocksparse {
namespace gpu {
namespace {

using mma_impl::CpAsync16;
using mma_impl::CpAsyncCommit;
using mma_impl::CpAsyncWait;
using mma_impl::FromF;
using mma_impl::LdMatrixX4;
using mma_impl::MmaOp;
using mma_impl::MmaTf32;
using mma_impl::SplitTf32;
using mma_impl::StoreChunk;
using mma_impl::ToF;

constexpr int kRows = 64;          // examples per tile
constexpr int kThreads = 128;      // threads per CTA of the product kernels
constexpr int kListThreads = 256;  // threads per CTA of the listing kernel

// Features per tile: the mask block, but at least one MMA's 16.
constexpr int64_t TileWidth(int64_t bs) { return bs > 16 ? bs : 16; }

struct Problem {
  const void* a;            // x
  const void* b;            // forward: w;  grad: dy
  const float* in_mask;     // (n, m / bs)
  const float* out_mask;    // (n, p / bs)
  void* out;                // forward: y (n, p);  grad: dw (m, p)
  const int32_t* rows;      // per tile column j: rows[j * n ...], see ListActiveRowsKernel
  const int32_t* counts;    // per tile column: number of listed active examples
  int64_t n, m, p;
  int bs;
  int bs_shift;             // log2(bs): mask indices by shifting (bs is a power of two)
  bool transpose_w;         // forward: w is (p, m)
  bool vec;                 // 16-byte loads and stores are safe (aligned, rows of whole chunks)
};

// ------------------------------------------------------------------------------------------
// Example lists.  rows[j * n + 0 .. counts[j]) = examples with an active output block in tile
// column j, ascending; rows[j * n + counts[j] .. n) = the other examples.
__global__ void __launch_bounds__(kListThreads)
    ListActiveRowsKernel(const float* __restrict__ out_mask, int64_t n, int64_t p_blocks,
                         int blocks_per_tile, int32_t* __restrict__ rows,
                         int32_t* __restrict__ counts) {
  constexpr int kPerThread = 8;  // rows whose masks a thread loads at once
  __shared__ int warp_active[kListThreads / 32], warp_inactive[kListThreads / 32];
  const int64_t j = blockIdx.x;
  const int64_t b0 = j * blocks_per_tile;
  const int nb = static_cast<int>(p_blocks - b0 < blocks_per_tile ? p_blocks - b0 : blocks_per_tile);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lower = (1u << lane) - 1u;
  int32_t* list = rows + j * n;
  int64_t n_active = 0, n_inactive = 0;
  for (int64_t base = 0; base < n; base += kPerThread * kListThreads) {
    bool act[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t r = base + u * kListThreads + threadIdx.x;
      act[u] = false;
      if (r < n)
        for (int t = 0; t < nb; ++t) act[u] |= __ldg(out_mask + r * p_blocks + b0 + t) != 0.f;
    }
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t r = base + u * kListThreads + threadIdx.x;
      const unsigned a = __ballot_sync(0xffffffffu, act[u]);
      const unsigned ina = __ballot_sync(0xffffffffu, r < n && !act[u]);
      if (lane == 0) {
        warp_active[warp] = __popc(a);
        warp_inactive[warp] = __popc(ina);
      }
      __syncthreads();
      int before_a = 0, before_i = 0, total_a = 0, total_i = 0;
      for (int w = 0; w < kListThreads / 32; ++w) {
        if (w < warp) {
          before_a += warp_active[w];
          before_i += warp_inactive[w];
        }
        total_a += warp_active[w];
        total_i += warp_inactive[w];
      }
      if (r < n) {
        if (act[u]) {
          list[n_active + before_a + __popc(a & lower)] = static_cast<int32_t>(r);
        } else {
          list[n - 1 - (n_inactive + before_i + __popc(ina & lower))] = static_cast<int32_t>(r);
        }
      }
      n_active += total_a;
      n_inactive += total_i;
      __syncthreads();  // warp_active is rewritten next round
    }
  }
  if (threadIdx.x == 0) counts[j] = static_cast<int32_t>(n_active);
}

// ------------------------------------------------------------------------------------------
// Chunk helpers: a chunk is 16 bytes of consecutive features of one row.
template <typename T>
struct Chunk {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
};

// Reads src[0 .. CE) (features f0 .. f0 + CE of a row of `limit` features), zero past `limit`
// and where active(feature) is false (only asked when `masked`).  A chunk whose mask block is
// inactive is not read.
template <typename T, typename Active>
__device__ __forceinline__ uint4 LoadChunk(const T* src, int64_t f0, int64_t limit, int bs,
                                           bool vec, bool masked, const Active& active) {
  constexpr int CE = Chunk<T>::kElems;
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (vec) {  // rows hold whole chunks: the chunk is entirely inside or outside
    if (f0 >= limit) return v;
    if (masked && bs >= CE && !active(f0)) return v;
    v = __ldg(reinterpret_cast<const uint4*>(src));
    if (!masked || bs >= CE) return v;
  }
  T* e = reinterpret_cast<T*>(&v);
#pragma unroll
  for (int i = 0; i < CE; ++i) {
    const bool keep = f0 + i < limit && (!masked || active(f0 + i));
    if (vec) {
      if (!keep) e[i] = FromF<T>(0.f);
    } else {
      e[i] = keep ? src[i] : FromF<T>(0.f);
    }
  }
  return v;
}
struct AllActive {
  __device__ bool operator()(int64_t) const { return true; }
};

template <typename T>
__device__ __forceinline__ void StoreOut(T* dst, const float* v, int64_t f0, int64_t limit,
                                         bool vec) {
  constexpr int CE = Chunk<T>::kElems;
  if (vec) {
    if (f0 < limit) StoreChunk<T>(dst, v);
    return;
  }
#pragma unroll
  for (int i = 0; i < CE; ++i)
    if (f0 + i < limit) dst[i] = FromF<T>(v[i]);
}

// ------------------------------------------------------------------------------------------
// Tile geometry of one (dtype, tile width, product).  Every step reduces over 64: forward,
// 64 input features (64 / W listed input tiles); dW, 64 listed examples.
//   Forward: A = x rows [64 examples][64 features]; B = w [64 features][W outputs], or with
//            kBT (w given transposed) [W outputs][64 features].  Output tile 64 x W.
//   dW:      A = x rows [64 examples][64 input features]; B = dy rows [64 examples][W outputs].
//            Output tile 64 x W.
template <typename T, int W, bool kGrad, bool kBTrans = false>
struct Cfg {
  static constexpr bool kBT = kBTrans;
  static constexpr bool kF32 = sizeof(T) == 4;
  static constexpr int kCE = Chunk<T>::kElems;
  static constexpr int kKS = 64;                     // reduction extent of one step
  static constexpr int kKT = kGrad ? 1 : kKS / W;    // forward: input tiles per step
  static constexpr int kBM = 64;                     // output tile rows
  static constexpr int kAW = 64;                     // A row length (elements)
  static constexpr int kBW = kBT ? kKS : W;          // B row length
  static constexpr int kBRowsN = kBT ? W : kKS;      // B rows
  // Row padding (16-byte multiples) that keeps the fragment loads free of bank conflicts:
  // 16-bit rows are read by ldmatrix (8 elements); float32 fragments are read one element per
  // thread, 4 floats for K-contiguous rows, 8 for M/N-contiguous ones.
  static constexpr bool kAKContig = !kGrad, kBKContig = kBT;
  static constexpr int kAPad = kF32 ? (kAKContig ? 4 : 8) : 8;
  static constexpr int kBPad = kF32 ? (kBKContig ? 4 : 8) : 8;
  static constexpr int kALd = kAW + kAPad, kBLd = kBW + kBPad;
  static constexpr int kAElems = kRows * kALd, kBElems = kBRowsN * kBLd;
  static constexpr int kStageElems = kAElems + kBElems;
  // Warps: WM x WN split the output tile.
  static constexpr int kWM = (kGrad && W > 16) ? 2 : 4;
  static constexpr int kWN = 4 / kWM;
  static constexpr int kMT = kBM / kWM / 16, kNT = W / kWN / 8;
  static constexpr int kCLd = W + 4;  // epilogue staging rows (floats)
  static constexpr int kStages = kF32 ? 2 : 3;  // cp.async pipeline depth
  static constexpr int kPipeBytes = kStages * kStageElems * static_cast<int>(sizeof(T));
  static constexpr int kEpiBytes = kBM * kCLd * 4;
  static constexpr int kSmemBytes = kPipeBytes > kEpiBytes ? kPipeBytes : kEpiBytes;
  // 16-byte chunks of the A and B tiles; per thread and step.
  static constexpr int kACPR = kAW / kCE, kBCPR = kBW / kCE;  // chunks per row
  static constexpr int kAChunks = kRows * kACPR, kBChunks = kBRowsN * kBCPR;
  static constexpr int kAPer = (kAChunks + kThreads - 1) / kThreads;
  static constexpr int kBPer = (kBChunks + kThreads - 1) / kThreads;
  static_assert(kBM % (16 * kWM) == 0 && kNT % 2 == 0, "warp tiles");
  static_assert(kKT >= 1 && kKT * W <= kKS, "a forward step holds whole input tiles");
};

// The per-CTA accumulators, filled on the tensor cores: 16-bit inputs with m16n8k16 MMAs,
// float32 as 3xTF32 (each operand split into a TF32 high part and residual, three m16n8k8
// MMAs, float32 accumulation), which keeps float32 accuracy.
template <typename C, typename T>
struct Accumulator {
  using Tile = float[C::kMT][C::kNT][4];  // one warp's MMA fragments
  Tile acc;

  static __device__ __forceinline__ void Zero(Tile& t) {
#pragma unroll
    for (int a = 0; a < C::kMT; ++a)
#pragma unroll
      for (int b = 0; b < C::kNT; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) t[a][b][e] = 0.f;
  }
  __device__ __forceinline__ void Zero() { Zero(acc); }

  // acc += A . B for one stage (layouts in Cfg).
  __device__ __forceinline__ void Step(const T* As, const T* Bs, int tid) {
    const int lane = tid & 31, warp = tid >> 5;
    const int wm = warp / C::kWN, wn = warp % C::kWN;
    if constexpr (!C::kF32) {
      const int li = lane >> 3, lr = lane & 7;
#pragma unroll
      for (int kk = 0; kk < C::kKS / 16; ++kk) {
        uint32_t af[C::kMT][4], bf[C::kNT][2];
#pragma unroll
        for (int mt = 0; mt < C::kMT; ++mt) {
          const int mb = wm * (C::kBM / C::kWM) + mt * 16;
          if constexpr (C::kAKContig) {  // x rows
            LdMatrixX4<false>(af[mt], As + (mb + (lane & 15)) * C::kALd + kk * 16 + (lane >> 4) * 8);
          } else {  // x^T
            LdMatrixX4<true>(af[mt], As + (kk * 16 + lr + (li >> 1) * 8) * C::kALd + mb + (li & 1) * 8);
          }
        }
#pragma unroll
        for (int np = 0; np < C::kNT / 2; ++np) {
          const int nb = wn * (C::kNT * 8) + np * 16;
          uint32_t r[4];
          if constexpr (!C::kBKContig) {  // K x N, N contiguous
            LdMatrixX4<true>(r, Bs + (kk * 16 + lr + (li & 1) * 8) * C::kBLd + nb + (li >> 1) * 8);
          } else {  // N x K, K contiguous
            LdMatrixX4<false>(r, Bs + (nb + lr + (li >> 1) * 8) * C::kBLd + kk * 16 + (li & 1) * 8);
          }
          bf[2 * np][0] = r[0];
          bf[2 * np][1] = r[1];
          bf[2 * np + 1][0] = r[2];
          bf[2 * np + 1][1] = r[3];
        }
#pragma unroll
        for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
          for (int nt = 0; nt < C::kNT; ++nt)
            MmaOp<T>::Run(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
      }
    } else {
      // The MMA units do not round float32 sums the IEEE way; each step's products are summed
      // from zero and added to the accumulators with ordinary float32 adds.
      const int grp = lane >> 2, tig = lane & 3;
      const uint32_t* Au = reinterpret_cast<const uint32_t*>(As);
      const uint32_t* Bu = reinterpret_cast<const uint32_t*>(Bs);
      Tile part;
      Zero(part);
#pragma unroll 2
      for (int kk = 0; kk < C::kKS / 8; ++kk) {
        const int k0 = kk * 8;
        uint32_t ah[C::kMT][4], al[C::kMT][4], bh[C::kNT][2], bl[C::kNT][2];
#pragma unroll
        for (int mt = 0; mt < C::kMT; ++mt) {
          const int m0 = wm * (C::kBM / C::kWM) + mt * 16 + grp;
          // a0 (m0, k0+tig), a1 (m0+8, k0+tig), a2 (m0, k0+tig+4), a3 (m0+8, k0+tig+4)
          uint32_t a[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int m = m0 + (e & 1) * 8, k = k0 + tig + (e >> 1) * 4;
            a[e] = C::kAKContig ? Au[m * C::kALd + k] : Au[k * C::kALd + m];
            SplitTf32(a[e], ah[mt][e], al[mt][e]);
          }
        }
#pragma unroll
        for (int nt = 0; nt < C::kNT; ++nt) {
          const int n = wn * (C::kNT * 8) + nt * 8 + grp;
          // b0 (k0+tig, n), b1 (k0+tig+4, n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int k = k0 + tig + e * 4;
            const uint32_t v = C::kBKContig ? Bu[n * C::kBLd + k] : Bu[k * C::kBLd + n];
            SplitTf32(v, bh[nt][e], bl[nt][e]);
          }
        }
#pragma unroll
        for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
          for (int nt = 0; nt < C::kNT; ++nt) {
            MmaTf32(part[mt][nt], al[mt], bh[nt][0], bh[nt][1]);
            MmaTf32(part[mt][nt], ah[mt], bl[nt][0], bl[nt][1]);
            MmaTf32(part[mt][nt], ah[mt], bh[nt][0], bh[nt][1]);
          }
      }
#pragma unroll
      for (int a = 0; a < C::kMT; ++a)
#pragma unroll
        for (int b = 0; b < C::kNT; ++b)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[a][b][e] += part[a][b][e];
    }
  }

  // Writes the tile as floats to Cs[row][col] (row stride kCLd).
  __device__ __forceinline__ void Stage(float* Cs, int tid) const {
    const int lane = tid & 31, warp = tid >> 5;
    const int wm = warp / C::kWN, wn = warp % C::kWN;
    const int grp = lane >> 2, tig = lane & 3;
#pragma unroll
    for (int mt = 0; mt < C::kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < C::kNT; ++nt) {
        const int row = wm * (C::kBM / C::kWM) + mt * 16 + grp;
        const int col = wn * (C::kNT * 8) + nt * 8 + 2 * tig;
        Cs[row * C::kCLd + col] = acc[mt][nt][0];
        Cs[row * C::kCLd + col + 1] = acc[mt][nt][1];
        Cs[(row + 8) * C::kCLd + col] = acc[mt][nt][2];
        Cs[(row + 8) * C::kCLd + col + 1] = acc[mt][nt][3];
      }
  }
};

// CE staged outputs of row `row` from column `col`.
template <typename C>
__device__ __forceinline__ void ReadStaged(const float* Cs, int row, int col, float (&v)[C::kCE]) {
#pragma unroll
  for (int e = 0; e < C::kCE; ++e) v[e] = Cs[row * C::kCLd + col + e];
}

template <typename T>
__device__ __forceinline__ void PutChunk(T* dst, const uint4& v) {
  *reinterpret_cast<uint4*>(dst) = v;
}

// Copies one chunk into shared memory: on the vector path with cp.async, zero-filled when
// invalid, past `limit` or masked off as a whole (`base` is any valid address of the tensor);
// otherwise with plain element loads.
template <typename T, typename Active>
__device__ __forceinline__ void CopyChunk(T* dst, const T* src, const T* base, bool valid,
                                          int64_t f0, int64_t limit, int bs, bool vec,
                                          bool masked, const Active& active) {
  constexpr int CE = Chunk<T>::kElems;
  if (vec) {
    const bool on = valid && f0 < limit && (!masked || bs < CE || active(f0));
    CpAsync16(dst, on ? src : base, on);
  } else {
    PutChunk(dst, valid ? LoadChunk<T>(src, f0, limit, bs, false, masked, active)
                        : make_uint4(0u, 0u, 0u, 0u));
  }
}

// Zeroes the elements of a landed chunk whose mask block is off (mask blocks narrower than a
// chunk, vector path).
template <typename T, typename Active>
__device__ __forceinline__ void MaskChunk(T* dst, int64_t f0, const Active& active) {
#pragma unroll
  for (int e = 0; e < Chunk<T>::kElems; ++e)
    if (!active(f0 + e)) dst[e] = FromF<T>(0.f);
}

// The cp.async pipeline shared by both products: step s is copied into stage s % kStages
// kStages - 1 steps ahead of its MMAs; one barrier per step.  `fix`: after a step's copies
// land, each thread masks its own chunks element-wise before the barrier.
template <typename C, typename T, typename Issue>
__device__ __forceinline__ void RunSteps(int steps, bool fix, T* smem, const Issue& issue,
                                         Accumulator<C, T>& acc, int tid) {
  constexpr int S = C::kStages;
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < steps) issue(s, s, false);
    CpAsyncCommit();
  }
  for (int s = 0; s < steps; ++s) {
    CpAsyncWait<S - 2>();
    if (fix) issue(s, s % S, true);
    __syncthreads();
    const int nxt = s + S - 1;
    if (nxt < steps) issue(nxt, nxt % S, false);
    CpAsyncCommit();
    const T* As = smem + (s % S) * C::kStageElems;
    acc.Step(As, As + C::kAElems, tid);
  }
  CpAsyncWait<0>();
}

// Mask bytes cached per CTA: 64 examples x this many mask blocks.
constexpr int kMaskBlocks = 256;

// ------------------------------------------------------------------------------------------
// Forward: y rows of one tile of listed examples (blockIdx.y), tile column j (blockIdx.x).
template <typename T, int W, bool kBT>
__global__ void __launch_bounds__(kThreads) SparseDotKernel(const Problem P) {
  using C = Cfg<T, W, false, kBT>;
  constexpr int CE = C::kCE;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  __shared__ int rows_s[kRows];
  __shared__ uint8_t mask_s[kRows][kMaskBlocks];  // in_mask of the chunk, active examples
  __shared__ int used_s[kMaskBlocks];             // input tiles of the chunk in use ...
  __shared__ int list_s[kMaskBlocks];             // ... and their list
  __shared__ int nlist_s;
  const T* __restrict__ x = static_cast<const T*>(P.a);
  const T* __restrict__ w = static_cast<const T*>(P.b);
  T* __restrict__ y = static_cast<T*>(P.out);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t n = P.n, m = P.m, p = P.p;
  const int bs = P.bs, sh = P.bs_shift, bpt = W / bs;  // bpt: mask blocks per input tile
  const int chunk_tiles = kMaskBlocks / bpt;
  const int64_t MB = m / bs, PB = p / bs, MI = (m + W - 1) / W;
  const int64_t j = blockIdx.x, g0 = j * W;  // tile column, its first output feature
  const int32_t* listed = P.rows + j * n;
  const int64_t count = P.counts[j];
  const int64_t row_tiles = (n + kRows - 1) / kRows;
  for (int64_t t = blockIdx.y; t < row_tiles; t += gridDim.y) {
    const int64_t r0 = t * kRows;
    __syncthreads();  // the previous tile is done with the shared arrays
    if (tid < kRows) rows_s[tid] = r0 + tid < n ? listed[r0 + tid] : -1;
    const int n_act =
        static_cast<int>(count - r0 <= 0 ? 0 : (count - r0 < kRows ? count - r0 : kRows));
    __syncthreads();
    // Offsets in x of the rows of this thread's A chunks (-1: inactive example), fixed for
    // the whole tile.
    int64_t x_row[C::kAPer];
#pragma unroll
    for (int k = 0; k < C::kAPer; ++k) {
      const int i = (k * kThreads + tid) / C::kACPR;
      x_row[k] = i < n_act ? rows_s[i] * m : -1;
    }
    Accumulator<C, T> acc;
    acc.Zero();
    for (int64_t ci0 = 0; n_act > 0 && ci0 < MI; ci0 += chunk_tiles) {
      // Cache the chunk's in_mask and list its input tiles used by any active example.
      const int nci = static_cast<int>(MI - ci0 < chunk_tiles ? MI - ci0 : chunk_tiles);
      for (int e = tid; e < nci; e += kThreads) used_s[e] = 0;
      __syncthreads();
      const int64_t blk0 = ci0 * bpt;
      const int nblk = static_cast<int>((ci0 + nci) * bpt < MB ? nci * bpt : MB - blk0);
      // Eight independent loads in flight per thread (a plain loop would wait for each).
      for (int q0 = 0; q0 < n_act * nblk; q0 += 8 * kThreads) {
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int q = q0 + u * kThreads + tid;
          v[u] = q < n_act * nblk ? __ldg(P.in_mask + rows_s[q / nblk] * MB + blk0 + q % nblk) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int q = q0 + u * kThreads + tid;
          if (q >= n_act * nblk) break;
          const bool on = v[u] != 0.f;
          mask_s[q / nblk][q % nblk] = on;
          if (on) used_s[(q % nblk) / bpt] = 1;
        }
      }
      __syncthreads();
      if (warp == 0) {
        int c = 0;
        for (int b = 0; b < nci; b += 32) {
          const bool f = b + lane < nci && used_s[b + lane] != 0;
          const unsigned bal = __ballot_sync(0xffffffffu, f);
          if (f) list_s[c + __popc(bal & ((1u << lane) - 1u))] = static_cast<int>(ci0 + b + lane);
          c += __popc(bal);
        }
        if (lane == 0) nlist_s = c;
      }
      __syncthreads();
      const int nlist = nlist_s;
      // Copies of step s (listed input tiles s*KT .. s*KT + KT - 1) into stage `buf`; with
      // `fix`, masks the landed x chunks element by element instead (bs below a chunk).
      auto issue = [&](int s, int buf, bool fix) {
        T* As = smem + buf * C::kStageElems;
        T* Bs = As + C::kAElems;
#pragma unroll
        for (int k = 0; k < C::kAPer; ++k) {
          const int q = k * kThreads + tid;
          if (q >= C::kAChunks) continue;
          const int i = q / C::kACPR, c = (q % C::kACPR) * CE;
          const int e = s * C::kKT + c / W;
          const bool valid = x_row[k] >= 0 && e < nlist;
          const int64_t f0 = valid ? (int64_t)list_s[e] * W + c % W : 0;
          const uint8_t* mrow = mask_s[i];
          const auto active = [&](int64_t f) { return mrow[(f >> sh) - blk0] != 0; };
          T* dst = As + i * C::kALd + c;
          if (fix) {
            if (valid && f0 < m) MaskChunk<T>(dst, f0, active);
          } else {
            CopyChunk<T>(dst, x + (valid ? x_row[k] + f0 : 0), x, valid, f0, m, bs, P.vec, true,
                         active);
          }
        }
        if (fix) return;
#pragma unroll
        for (int k = 0; k < C::kBPer; ++k) {
          const int q = k * kThreads + tid;
          if (q >= C::kBChunks) continue;
          const int r = q / C::kBCPR, c = (q % C::kBCPR) * CE;
          T* dst = Bs + r * C::kBLd + c;
          if constexpr (!kBT) {  // w (m, p): row = input feature, columns g0 + c ..
            const int e = s * C::kKT + r / W;
            const int64_t f = e < nlist ? (int64_t)list_s[e] * W + r % W : m;
            CopyChunk<T>(dst, w + (f < m ? f * p + g0 + c : 0), w, f < m, g0 + c, p, bs, P.vec,
                         false, AllActive());
          } else {  // w (p, m): row g0 + r, the step's input features
            const int e = s * C::kKT + c / W;
            const bool valid = e < nlist && g0 + r < p;
            const int64_t f0 = valid ? (int64_t)list_s[e] * W + c % W : 0;
            CopyChunk<T>(dst, w + (valid ? (g0 + r) * m + f0 : 0), w, valid, f0, m, bs, P.vec,
                         false, AllActive());
          }
        }
      };
      RunSteps<C, T>((nlist + C::kKT - 1) / C::kKT, P.vec && bs < CE, smem, issue, acc, tid);
      __syncthreads();  // mask_s / list_s and the stage buffers are reused next
    }
    float* Cs = reinterpret_cast<float*>(smem_raw);
    acc.Stage(Cs, tid);
    __syncthreads();
    for (int q = tid; q < kRows * (W / CE); q += kThreads) {
      const int i = q / (W / CE), c = (q % (W / CE)) * CE;
      const int64_t rr = rows_s[i];
      if (rr < 0) continue;
      float v[CE];
      ReadStaged<C>(Cs, i, c, v);
      if (i >= n_act) {
#pragma unroll
        for (int e = 0; e < CE; ++e) v[e] = 0.f;
      } else if (bs < W) {  // the tile column spans several output blocks
#pragma unroll
        for (int e = 0; e < CE; ++e)
          if (g0 + c + e < p && __ldg(P.out_mask + rr * PB + ((g0 + c + e) >> sh)) == 0.f) v[e] = 0.f;
      }
      StoreOut<T>(y + rr * p + g0 + c, v, g0 + c, p, P.vec);
    }
  }
}

// ------------------------------------------------------------------------------------------
// The pipelined steps of this file's wgmma kernels: issue(s) copies step s into stage
// s % kStages as one cp.async group (empty past the last step), ahead of step s's wgmma
// group, mma(stage).  On return every copy has landed and every stage is free.
// How a step's copies and wgmma group interleave (kPipe): kSerialPipe issues the copies of a
// later step, kStages - 1 ahead, then runs the step's group and waits for it; kInFlightPipe
// leaves one group in flight while the next step's copies are issued (so they run only
// kStages - 2 ahead, never refilling the stage of the group still running); kIssueUnderMma
// starts the step's group first and issues the copies, kStages - 1 ahead, while it runs.  The
// same wgmma groups in the same order in every case.  With CUDA 13.0, ptxas reports C7514
// (wgmma serialized: "non wgmma instructions reading accumulator registers ... between start
// and end of the pipeline stage") for the kInFlightPipe kernels only; the dW gains from that
// pipeline all the same (see kTuningSparseDotWgmmaGradWSerial).
constexpr int kSerialPipe = 0, kInFlightPipe = 1, kIssueUnderMma = 2;
template <int kStages, int kPipe, typename Issue, typename Mma>
__device__ __forceinline__ void WgmmaSteps(int steps, const Issue& issue, const Mma& mma) {
#if BSMM_HAS_WGMMA
  using namespace wgmma_impl;
  constexpr int kAhead = kPipe == kInFlightPipe ? kStages - 2 : kStages - 1;
#pragma unroll
  for (int s = 0; s < kAhead; ++s) issue(s);
  for (int s = 0; s < steps; ++s) {
    CpAsyncWait<kAhead - 1>();  // this thread's copies of step s have landed
    FenceSharedForAsyncProxy();
    // Everyone's have; and the group that last read the stage refilled below is done (step
    // s - 1's, or with kInFlightPipe step s - 2's: waited below).
    __syncthreads();
    if (kPipe != kIssueUnderMma) issue(s + kAhead);
    WgmmaFence();
    mma(s % kStages);
    WgmmaCommit();
    if (kPipe == kIssueUnderMma) issue(s + kAhead);
    WgmmaWait<kPipe == kInFlightPipe ? 1 : 0>();
  }
  WgmmaWait<0>();
  CpAsyncWait<0>();
  __syncthreads();
#else
  (void)steps, (void)issue, (void)mma;
#endif
}

// ------------------------------------------------------------------------------------------
// Forward of 16-bit products on Hopper (wgmma, sm_90a), for bs >= 8, m and p multiples of 64
// and 16-byte aligned x, w and y (the vector path).
// Tile columns are 64 output features wide (the examples listed per 64-wide column); a CTA
// computes the transpose of one tile, y^T[64 features][128 listed examples], as the bs-64
// block-sparse forward does (blocksparse_matmul_gpu_wgmma.cuh): per step of 64 input features,
// in increasing order,
//   acc (64 x 128) += W^T tile (A: 64 outputs x 64 inputs; w (m, p) stored M-contiguous: the
//                    transpose flag; w (p, m) with transpose_w K-contiguous)
//                   * x^T tile (B: 64 inputs x 128 examples, the listed examples' rows
//                    gathered, K-contiguous)
// as four k16 slices, both operands in the 128-byte swizzle, copied by cp.async kSdStages - 1
// steps ahead of their wgmma group, issued while the step's group runs (kIssueUnderMma;
// kTuningSparseDotWgmmaForwardSerial: issued before it; kTuningSparseDotWgmmaForwardOverlap:
// kSdStages - 2 ahead, one group left in flight meanwhile).  The input mask is applied as
// the rows are copied: a 16-byte chunk (8 features, within one mask block as bs >= 8) of an
// inactive block, or of a position past the listed examples, is zero-filled and never read;
// each thread reads the mask entries of its chunks one step ahead of their copies.  The
// output mask is applied as the tile is stored: chunks of inactive blocks are written as
// zeros, so every element of y is written.  Tiles whose positions all lie past the listed
// examples write zeros only.
constexpr int kSdCols = 64;    // output features per tile: wgmma's M
constexpr int kSdRows = 128;   // listed examples per tile: wgmma's N
constexpr int kSdStages = 4;
constexpr int kSdThreads = 128;
constexpr int kSdWBytes = kSdCols * 64 * 2, kSdXBytes = kSdRows * 64 * 2;
constexpr int kSdStageBytes = kSdWBytes + kSdXBytes;
constexpr int kSdSmemBytes = 1024 + kSdStages * kSdStageBytes;
constexpr int kSdStageLd = kSdCols + 8;  // staged output rows, padded by 16 bytes
static_assert(kSdRows * kSdStageLd * 2 <= kSdStageBytes, "the output tile fits one stage");
template <typename T, bool kTransW, int kPipe>
struct SdWgmmaTag {};  // PrepareKernel's flags, one per instantiation

template <typename T, bool kTransW, int kPipe>
__global__ void __launch_bounds__(kSdThreads) SparseDotWgmmaKernel(const Problem P) {
#if BSMM_HAS_WGMMA
  using namespace wgmma_impl;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint32_t smem_base;
  unsigned char* smem = Align1024(smem_raw, &smem_base);
  const T* __restrict__ x = static_cast<const T*>(P.a);
  const T* __restrict__ w = static_cast<const T*>(P.b);
  T* __restrict__ y = static_cast<T*>(P.out);
  const int64_t n = P.n, m = P.m, p = P.p, MB = m / P.bs, PB = p / P.bs;
  const int sh = P.bs_shift, tid = threadIdx.x;
  const int64_t g0 = static_cast<int64_t>(blockIdx.x) * kSdCols;  // first output feature
  const int32_t* listed = P.rows + static_cast<int64_t>(blockIdx.x) * n;
  const int64_t count = P.counts[blockIdx.x];
  const int steps = static_cast<int>(m / 64);
  // Copies: W rows w_row0 + 16 i, x rows (positions) x_row0 + 16 i, chunk tid % 8 of each.
  // A row r + 16 i keeps row r's swizzle (r % 8 does not change).
  const int chunk = tid & 7, row0 = tid >> 3;
  const int dst0 = SwizzledR<128>(row0, chunk);
  // W rows: input features (w (m, p)) or output features (w (p, m)), 64 elements each.
  const T* const w_src = kTransW ? w + (g0 + row0) * m + chunk * 8 : w + row0 * p + g0 + chunk * 8;
  const int64_t w_row_step = kTransW ? 16 * m : 16 * p;   // between a thread's rows
  const int64_t w_step = kTransW ? 64 : 64 * p;           // between steps
  const int lane = tid & 31, fm = 16 * (tid >> 5) + (lane >> 2), fn = 2 * (lane & 3);

  for (int64_t t = blockIdx.y; t * kSdRows < n; t += gridDim.y) {
    const int64_t r0 = t * kSdRows;
    // This thread's x rows (examples), -1 past the listed examples.
    int32_t x_row[kSdRows / 16];
#pragma unroll
    for (int i = 0; i < kSdRows / 16; ++i) {
      const int64_t pos = r0 + row0 + 16 * i;
      x_row[i] = pos < count ? __ldg(listed + pos) : -1;
    }
    const int tile_steps = r0 < count ? steps : 0;
    // Whether each of this thread's x chunks of the next step to copy is active.
    bool on[kSdRows / 16];
    auto read_mask = [&](int s) {
      const int64_t blk = (static_cast<int64_t>(s) * 64 + chunk * 8) >> sh;
#pragma unroll
      for (int i = 0; i < kSdRows / 16; ++i)
        on[i] = s < tile_steps && x_row[i] >= 0 &&
                __ldg(P.in_mask + static_cast<int64_t>(x_row[i]) * MB + blk) != 0.f;
    };
    auto issue = [&](int s) {  // copies of step s into its stage, then the next step's masks
      if (s < tile_steps) {
        unsigned char* Ws = smem + (s % kSdStages) * kSdStageBytes;
        unsigned char* Xs = Ws + kSdWBytes;
        const T* ws = w_src + s * w_step;
#pragma unroll
        for (int i = 0; i < 4; ++i) CpAsync16(Ws + dst0 + 16 * i * 128, ws + i * w_row_step, true);
        const int64_t f0 = static_cast<int64_t>(s) * 64 + chunk * 8;
#pragma unroll
        for (int i = 0; i < kSdRows / 16; ++i)
          CpAsync16(Xs + dst0 + 16 * i * 128, on[i] ? x + x_row[i] * m + f0 : x, on[i]);
        read_mask(s + 1);
      }
      CpAsyncCommit();  // one group per step, empty or not, so the waits count steps
    };
    __syncthreads();  // the previous tile's epilogue is done with the stages
    read_mask(0);
    float acc[kSdRows / 2];
#pragma unroll
    for (int e = 0; e < kSdRows / 2; ++e) acc[e] = 0.f;
    WgmmaSteps<kSdStages, kPipe>(tile_steps, issue, [&](int stage) {
      const uint32_t w_base = smem_base + stage * kSdStageBytes;
      const uint32_t x_base = w_base + kSdWBytes;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint64_t ad = DescriptorR<128>(w_base + (kTransW ? kk * 32 : kk * 2048));
        Wgmma<T, kSdRows, !kTransW, false>(acc, ad, DescriptorR<128>(x_base + kk * 32));
      }
    });

    // Epilogue: stage y's rows of the tile (position r: row r), then store 16-byte chunks
    // where the output mask is on, zeros elsewhere.
    T* Cs = reinterpret_cast<T*>(smem);
    StageTransposedAcc<T, kSdRows, kSdStageLd>(acc, Cs, fm, fn);
    __syncthreads();
    for (int q = tid; q < kSdRows * (kSdCols / 8); q += kSdThreads) {
      const int r = q / (kSdCols / 8), c8 = (q % (kSdCols / 8)) * 8;
      const int64_t pos = r0 + r;
      if (pos >= n) break;  // positions only grow with q
      const int64_t row = __ldg(listed + pos);
      const bool active =
          pos < count && __ldg(P.out_mask + row * PB + ((g0 + c8) >> sh)) != 0.f;
      *reinterpret_cast<uint4*>(y + row * p + g0 + c8) =
          active ? *reinterpret_cast<const uint4*>(Cs + r * kSdStageLd + c8)
                 : make_uint4(0u, 0u, 0u, 0u);
    }
  }
#else
  (void)P;
  __trap();
#endif
}

// ------------------------------------------------------------------------------------------
// dW of 16-bit products on Hopper (wgmma, sm_90a), for bs >= 8, m and p multiples of 64 and
// 16-byte aligned x, dy and dw (the vector path).  The default there since 2026-12-07 (see
// kTuningSparseDotMma); SetTuning(36) makes its CTAs loop over several tiles each way.
// The examples are listed per 64-wide tile column of outputs, as for the wgmma forward.  A CTA
// computes the transpose of one dw tile, dw^T[64 outputs][128 inputs], over the column's listed
// examples, 64 per step, in increasing list order:
//   acc (64 x 128) += dy tile^T (A: 64 listed examples x 64 outputs, M-contiguous: the
//                     transpose flag)
//                   * x tile (B: 64 listed examples x 128 inputs, N-contiguous: two 64-wide
//                     swizzle atoms, 8 KiB apart, the leading byte offset)
// as four k16 slices, both operands in the 128-byte swizzle, copied by cp.async
// kSgStages - 2 steps ahead of their wgmma group, one group left in flight meanwhile
// (kTuningSparseDotWgmmaGradWSerial: kSgStages - 1 ahead, none in flight).  The masks are
// applied as the rows are copied: a 16-byte chunk (8 features, within one mask block as
// bs >= 8) of an inactive block or of a position past the listed examples is zero-filled and
// never read.  Each thread copies
// the same four positions of a step for both operands, so it loads their example indices once,
// two steps ahead of the copies, and their mask entries one step ahead (each load then has a
// step's time to land before anything waits for it).  The tile is stored whole (zeros where
// no example is listed), so every element of dw is written.
constexpr int kSgOut = 64;    // output features per tile: wgmma's M
constexpr int kSgIn = 128;    // input features per tile: wgmma's N
constexpr int kSgRows = 64;   // listed examples per step: four k16 slices
constexpr int kSgStages = 4;
constexpr int kSgThreads = 128;
constexpr int kSgDyBytes = kSgRows * kSgOut * 2, kSgXBytes = kSgRows * kSgIn * 2;
constexpr int kSgAtomBytes = kSgRows * 128;  // one 64-feature swizzle atom of the x tile
constexpr int kSgStageBytes = kSgDyBytes + kSgXBytes;
constexpr int kSgSmemBytes = 1024 + kSgStages * kSgStageBytes;
constexpr int kSgStageLd = kSgOut + 8;  // staged dw rows, padded by 16 bytes
static_assert(kSgIn * kSgStageLd * 2 <= kSgStageBytes, "the output tile fits one stage");
static_assert(kSgXBytes == 2 * kSgAtomBytes, "the x tile is two swizzle atoms");
template <typename T, int kPipe>
struct SgWgmmaTag {};  // PrepareKernel's flags, one per instantiation

template <typename T, int kPipe>
__global__ void __launch_bounds__(kSgThreads) SparseDotWgmmaGradWKernel(const Problem P) {
#if BSMM_HAS_WGMMA
  using namespace wgmma_impl;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint32_t smem_base;
  unsigned char* smem = Align1024(smem_raw, &smem_base);
  const T* __restrict__ x = static_cast<const T*>(P.a);
  const T* __restrict__ dy = static_cast<const T*>(P.b);
  T* __restrict__ dw = static_cast<T*>(P.out);
  const int64_t n = P.n, m = P.m, p = P.p, MB = m / P.bs, PB = p / P.bs;
  const int sh = P.bs_shift, tid = threadIdx.x;
  const int64_t columns = p / kSgOut, in_tiles = (m + kSgIn - 1) / kSgIn;
  // Copies: positions row0 + 16 i (i < 4) of each step; chunk c = tid % 8 of dy's 64 outputs,
  // and chunk c of each of x's two atoms (inputs 8 c and 64 + 8 c of the tile).  A row
  // r + 16 i keeps row r's swizzle (r % 8 does not change).
  const int chunk = tid & 7, row0 = tid >> 3;
  const int dst0 = SwizzledR<128>(row0, chunk);
  // With bs 64 a listed example's only output block in the column is active.
  const bool out_masked = P.bs < kSgOut;
  const int lane = tid & 31, fm = 16 * (tid >> 5) + (lane >> 2), fn = 2 * (lane & 3);

  for (int64_t j = blockIdx.y; j < columns; j += gridDim.y) {
    const int64_t g0 = j * kSgOut;  // first output feature
    const int32_t* listed = P.rows + j * n;
    const int64_t count = P.counts[j];
    const int steps = static_cast<int>((count + kSgRows - 1) / kSgRows);
    const T* const dy_src = dy + g0 + chunk * 8;
    const int64_t out_blk = (g0 + chunk * 8) >> sh;
    for (int64_t t = blockIdx.x; t < in_tiles; t += gridDim.x) {
      const int64_t fa = t * kSgIn + chunk * 8, fb = fa + 64;  // this thread's x chunks
      const bool has_b = fb < m;  // m % 128 == 64: the last tile's second atom is past m
      const int64_t blk_a = fa >> sh, blk_b = fb >> sh;
      // Example indices (-1 past the listed ones): of the step whose copies are issued next
      // (`copy`) and of the step after it (`ahead`); whether each chunk of `copy` is active.
      int32_t copy[4], ahead[4];
      bool on_dy[4], on_a[4], on_b[4];
      auto load_rows = [&](int s, int32_t (&dst)[4]) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t pos = static_cast<int64_t>(s) * kSgRows + row0 + 16 * i;
          dst[i] = s < steps && pos < count ? __ldg(listed + pos) : -1;
        }
      };
      auto read_masks = [&]() {  // of the step in `copy`
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t e = copy[i];
          on_dy[i] = e >= 0 && (!out_masked || __ldg(P.out_mask + e * PB + out_blk) != 0.f);
          on_a[i] = e >= 0 && __ldg(P.in_mask + e * MB + blk_a) != 0.f;
          on_b[i] = e >= 0 && has_b && __ldg(P.in_mask + e * MB + blk_b) != 0.f;
        }
      };
      auto issue = [&](int s) {  // copies of step s into its stage, then step s + 1's masks
        if (s < steps) {
          unsigned char* Ds = smem + (s % kSgStages) * kSgStageBytes;
          unsigned char* Xs = Ds + kSgDyBytes;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int64_t e = copy[i];
            const int off = dst0 + 16 * i * 128;
            CpAsync16(Ds + off, on_dy[i] ? dy_src + e * p : dy, on_dy[i]);
            CpAsync16(Xs + off, on_a[i] ? x + e * m + fa : x, on_a[i]);
            CpAsync16(Xs + kSgAtomBytes + off, on_b[i] ? x + e * m + fb : x, on_b[i]);
          }
#pragma unroll
          for (int i = 0; i < 4; ++i) copy[i] = ahead[i];
          read_masks();
          load_rows(s + 2, ahead);
        }
        CpAsyncCommit();  // one group per step, empty or not, so the waits count steps
      };
      __syncthreads();  // the previous tile's epilogue is done with the stages
      load_rows(0, copy);
      read_masks();
      load_rows(1, ahead);
      float acc[kSgIn / 2];
#pragma unroll
      for (int e = 0; e < kSgIn / 2; ++e) acc[e] = 0.f;
      WgmmaSteps<kSgStages, kPipe>(steps, issue, [&](int stage) {
        const uint32_t a_base = smem_base + stage * kSgStageBytes;
        const uint32_t b_base = a_base + kSgDyBytes;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          Wgmma<T, kSgIn, true, true>(acc, DescriptorR<128>(a_base + kk * 2048),
                                      DescriptorR<128>(b_base + kk * 2048, kSgAtomBytes));
        }
      });

      // Epilogue: acc holds dw^T (64 outputs x 128 inputs); staged row r is dw's row
      // t * 128 + r (input feature), its 64 outputs; rows at or past m are not stored.
      T* Cs = reinterpret_cast<T*>(smem);
      StageTransposedAcc<T, kSgIn, kSgStageLd>(acc, Cs, fm, fn);
      __syncthreads();
      for (int q = tid; q < kSgIn * (kSgOut / 8); q += kSgThreads) {
        const int r = q / (kSgOut / 8), c8 = (q % (kSgOut / 8)) * 8;
        const int64_t f = t * kSgIn + r;
        if (f >= m) break;  // rows only grow with q
        *reinterpret_cast<uint4*>(dw + f * p + g0 + c8) =
            *reinterpret_cast<const uint4*>(Cs + r * kSgStageLd + c8);
      }
    }
  }
#else
  (void)P;
  __trap();
#endif
}

// Listed examples whose rows and input-tile mask bytes a dW CTA caches at once, and the input
// features of a dW tile.
constexpr int kGradRows = 256;
constexpr int kGradM = 64;

// ------------------------------------------------------------------------------------------
// dw tile (input features 64 ii .. 64 ii + 63, ii = blockIdx.x; tile column j = blockIdx.y).
template <typename T, int W>
__global__ void __launch_bounds__(kThreads) SparseDotGradWKernel(const Problem P) {
  using C = Cfg<T, W, true>;
  constexpr int CE = C::kCE;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  __shared__ int rows_s[kGradRows];
  __shared__ uint8_t mask_s[kGradRows][kGradM];  // in_mask blocks of the tile's input features
  __shared__ int64_t x_off_s[kGradRows], dy_off_s[kGradRows];  // row offsets in x and dy
  __shared__ int used_s[kGradRows / kRows], list_s[kGradRows / kRows];
  __shared__ int nlist_s;
  const T* __restrict__ x = static_cast<const T*>(P.a);
  const T* __restrict__ dy = static_cast<const T*>(P.b);
  T* __restrict__ dw = static_cast<T*>(P.out);
  const int tid = threadIdx.x;
  const int64_t n = P.n, m = P.m, p = P.p;
  const int bs = P.bs, sh = P.bs_shift, bpt = kGradM / bs;  // bpt: mask blocks per tile
  const int64_t MB = m / bs, PB = p / bs, PJ = (p + W - 1) / W;
  const int64_t ii = blockIdx.x, f0 = ii * kGradM;  // first input feature of the tile
  const int64_t blk0 = ii * bpt;                     // its first mask block
  for (int64_t j = blockIdx.y; j < PJ; j += gridDim.y) {
    const int64_t g0 = j * W;
    const int32_t* listed = P.rows + j * n;
    const int64_t count = P.counts[j];
    Accumulator<C, T> acc;
    acc.Zero();
    for (int64_t base = 0; base < count; base += kGradRows) {
      const int nrows = static_cast<int>(count - base < kGradRows ? count - base : kGradRows);
      __syncthreads();  // the previous chunk (or tile) is done with the shared arrays
      if (tid < kGradRows / kRows) used_s[tid] = 0;
      for (int i = tid; i < nrows; i += kThreads) {
        const int64_t rr = __ldg(listed + base + i);
        rows_s[i] = static_cast<int>(rr);
        x_off_s[i] = rr * m;
        dy_off_s[i] = rr * p;
      }
      __syncthreads();
      const int bpt_shift = 6 - sh;  // bpt = 64 / bs
      for (int q0 = 0; q0 < nrows * bpt; q0 += 8 * kThreads) {  // 8 loads in flight
        float v[8];
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int q = q0 + u * kThreads + tid;
          const int64_t blk = blk0 + (q & (bpt - 1));
          v[u] = q < nrows * bpt && blk < MB
                     ? __ldg(P.in_mask + rows_s[q >> bpt_shift] * MB + blk) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const int q = q0 + u * kThreads + tid;
          if (q >= nrows * bpt) break;
          mask_s[q >> bpt_shift][q & (bpt - 1)] = v[u] != 0.f;
          if (v[u] != 0.f) used_s[(q >> bpt_shift) / kRows] = 1;
        }
      }
      __syncthreads();
      if (tid == 0) {  // groups of 64 examples of which at least one uses the tile's inputs
        int c = 0;
        for (int g = 0; g < (nrows + kRows - 1) / kRows; ++g)
          if (used_s[g]) list_s[c++] = g;
        nlist_s = c;
      }
      __syncthreads();
      // Copies of the s-th used group of 64 listed examples into stage `buf` (or, with `fix`,
      // element-wise masking of the landed chunks).
      auto issue = [&](int s, int buf, bool fix) {
        const int g = list_s[s];
        T* As = smem + buf * C::kStageElems;
        T* Bs = As + C::kAElems;
#pragma unroll
        for (int k = 0; k < C::kAPer; ++k) {
          const int q = k * kThreads + tid;
          if (q >= C::kAChunks) continue;
          const int r = q / C::kACPR, c = (q % C::kACPR) * CE, i = g * kRows + r;
          const bool valid = i < nrows;
          const uint8_t* mrow = mask_s[valid ? i : 0];
          const auto active = [&](int64_t f) { return mrow[(f >> sh) - blk0] != 0; };
          T* dst = As + r * C::kALd + c;
          if (fix) {
            if (valid && f0 + c < m) MaskChunk<T>(dst, f0 + c, active);
          } else {
            CopyChunk<T>(dst, x + (valid ? x_off_s[i] + f0 + c : 0), x, valid, f0 + c, m, bs,
                         P.vec, true, active);
          }
        }
#pragma unroll
        for (int k = 0; k < C::kBPer; ++k) {
          const int q = k * kThreads + tid;
          if (q >= C::kBChunks) continue;
          const int r = q / C::kBCPR, c = (q % C::kBCPR) * CE, i = g * kRows + r;
          const bool valid = i < nrows;
          const float* omask = P.out_mask + (valid ? rows_s[i] : 0) * PB;
          const auto active = [&](int64_t f) { return __ldg(omask + (f >> sh)) != 0.f; };
          T* dst = Bs + r * C::kBLd + c;
          // With bs >= W a listed example's only block in the tile column is active.
          if (fix) {
            if (valid && bs < W && g0 + c < p) MaskChunk<T>(dst, g0 + c, active);
          } else {
            CopyChunk<T>(dst, dy + (valid ? dy_off_s[i] + g0 + c : 0), dy, valid, g0 + c, p,
                         bs, P.vec, bs < W, active);
          }
        }
      };
      RunSteps<C, T>(nlist_s, P.vec && bs < CE, smem, issue, acc, tid);
    }
    __syncthreads();
    float* Cs = reinterpret_cast<float*>(smem_raw);
    acc.Stage(Cs, tid);
    __syncthreads();
    for (int q = tid; q < kGradM * (W / CE); q += kThreads) {
      const int i = q / (W / CE), c = (q % (W / CE)) * CE;
      if (f0 + i >= m) continue;
      float v[CE];
      ReadStaged<C>(Cs, i, c, v);
      StoreOut<T>(dw + (f0 + i) * p + g0 + c, v, g0 + c, p, P.vec);
    }
    __syncthreads();  // Cs is overwritten by the next tile's stages
  }
}

// ------------------------------------------------------------------------------------------
bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
int64_t RoundUp256(int64_t v) { return (v + 255) / 256 * 256; }

// Lets `kernel` use more than 48 KB of dynamic shared memory, once per device.  `Tag` makes
// the flags separate for each kernel instantiation.
// Lets `kernel` use its dynamic shared memory on top of its static arrays (past 48 KB in all
// needs the opt-in), once per device.  `Tag` keeps the flags apart per kernel instantiation.
template <typename Tag, typename K>
cudaError_t PrepareKernel(K kernel, int smem_bytes) {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  static std::atomic<uint64_t> done{0};  // one bit per device
  const uint64_t bit = device < 64 ? 1ull << device : 0ull;
  if (bit != 0 && (done.load() & bit)) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (e == cudaSuccess) done.fetch_or(bit);
  return e;
}

template <typename C, typename K>
int Launch(K kernel, dim3 grid, const Problem& P, cudaStream_t stream) {
  cudaError_t e = PrepareKernel<C>(kernel, C::kSmemBytes);
  if (e != cudaSuccess) return e;
  kernel<<<grid, kThreads, C::kSmemBytes, stream>>>(P);
  return cudaGetLastError();
}

template <typename T, int W>
int RunProduct(const Problem& P, bool grad, cudaStream_t stream) {
  const int64_t PJ = (P.p + W - 1) / W;  // tile columns of the output
  if (grad) {
    const int64_t MG = (P.m + kGradM - 1) / kGradM;
    const dim3 grid(static_cast<unsigned>(MG), static_cast<unsigned>(PJ < 65535 ? PJ : 65535));
    return Launch<Cfg<T, W, true>>(SparseDotGradWKernel<T, W>, grid, P, stream);
  }
  const int64_t tiles = (P.n + kRows - 1) / kRows;
  const dim3 grid(static_cast<unsigned>(PJ), static_cast<unsigned>(tiles < 65535 ? tiles : 65535));
  if (P.transpose_w) return Launch<Cfg<T, W, false, true>>(SparseDotKernel<T, W, true>, grid, P, stream);
  return Launch<Cfg<T, W, false, false>>(SparseDotKernel<T, W, false>, grid, P, stream);
}

template <typename T>
int RunTyped(const Problem& P, bool grad, cudaStream_t stream) {
  switch (TileWidth(P.bs)) {
    case 16: return RunProduct<T, 16>(P, grad, stream);
    case 32: return RunProduct<T, 32>(P, grad, stream);
    case 64: return RunProduct<T, 64>(P, grad, stream);
  }
  return cudaErrorInvalidValue;
}

int ElementBytes(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// Checks the arguments common to both products.  `out_rows` x p is the output.
int CheckArgs(DType dt, int64_t n, int64_t m, int64_t p, int64_t bs, int64_t workspace_bytes) {
  if (dt != DType::kFloat32 && dt != DType::kFloat16 && dt != DType::kBFloat16)
    return cudaErrorInvalidValue;
  if (!IsSupportedBlockSize(bs)) return cudaErrorInvalidValue;
  if (n < 0 || m < 0 || p < 0 || m % bs != 0 || p % bs != 0) return cudaErrorInvalidValue;
  if (n > INT32_MAX) return cudaErrorInvalidValue;  // example lists are int32
  const int64_t kLimit = int64_t(1) << 40;
  if (m > kLimit || p > kLimit || (n > 0 && (m > (kLimit << 20) / n || p > (kLimit << 20) / n)) ||
      (m > 0 && p > (kLimit << 20) / m))
    return cudaErrorInvalidValue;
  if (workspace_bytes < SparseDotWorkspaceBytes(n, p, bs)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

// SetTuning(33): the forward and the dW on the mma.sync kernels wherever wgmma would run
// (benchmarks, tests); SetTuning(34): the wgmma forward's grid at most 2 row tiles high, so
// that each CTA loops over several tiles (tests).  SetTuning(35): the defaults (the dW's
// switch while it was not one, kept for scripts that name it); SetTuning(36): the wgmma dW
// (SparseDotWgmmaGradWKernel) on a grid of at most 2 x 2 CTAs, each looping over several
// tiles both ways (tests).  The wgmma dW is the default since it ran on an H100
// (2026-12-07): checks, memcheck and racecheck clean, 1.03-3.62x faster than the mma.sync dW
// in every cell of tools/gpu_check_sparse_dot.py --side-by-side.  The block-sparse kernels'
// switches of wgmma apply too (internal::WgmmaEnabled: off under SetTuning(1-4);
// SetTuning(19) runs as compute capability 8.6).
constexpr int kTuningSparseDotMma = 33;
constexpr int kTuningSparseDotFewRowTiles = 34;
constexpr int kTuningSparseDotWgmmaGradWLoops = 36;
// WgmmaSteps' kInFlightPipe: one wgmma group left in flight while the next step's copies are
// issued, two steps ahead rather than three.  Side by side on an H100 (2026-12-07, bfloat16,
// 1024 and 4096 examples x 4096 x 4096, bs 16 / 32 / 64, six activity settings; `python3
// tools/gpu_check_sparse_dot.py --pipeline-side-by-side`), the dW 1.01-1.13x faster with it in
// 28 of 36 cells (most with 4096 examples and every block active) and 0.98-1.00x in the rest
// (1024 examples, mostly at 10% active outputs: few steps a tile), the forward and the input
// gradient 0.91-0.98x (their gathered rows of x want the third step of lead).  So the dW
// overlaps by default (38 turns that off); 37 gives the forward the same pipeline.
constexpr int kTuningSparseDotWgmmaForwardOverlap = 37;
constexpr int kTuningSparseDotWgmmaGradWSerial = 38;
// kIssueUnderMma: the forward's default.  Side by side on an H100 (2026-12-07, the same
// command and grid as above, one run): the forward 1.01-1.09x and the input gradient
// 1.01-1.07x faster than kSerialPipe in all 36 cells, the dW 0.93-1.03x its kInFlightPipe
// default (slower with 4096 examples); as the default, in a second run, 1.01-1.13x and
// 1.01-1.09x faster than kSerialPipe, the dW's two orders within 0.96-1.08x of each other.
// 39 runs the dW that way too; 40 runs the forward on kSerialPipe, its default before.
constexpr int kTuningSparseDotWgmmaIssueUnderMma = 39;
constexpr int kTuningSparseDotWgmmaForwardSerial = 40;

// Whether the products (the forward and the dW alike) run on the wgmma kernels: 16-bit,
// bs >= 8 (a copied chunk lies in one mask block), m and p multiples of 64, the vector path, a
// Hopper GPU.
bool WgmmaPath(DType dt, const Problem& P) {
  if (dt == DType::kFloat32 || P.bs < 8 || P.m % 64 != 0 || P.p % 64 != 0 || !P.vec ||
      internal::Tuning() == kTuningSparseDotMma) {
    return false;
  }
  internal::DeviceInfo di;
  int device = 0;
  return internal::GetDeviceInfo(&di, &device) == cudaSuccess && internal::WgmmaEnabled(di);
}

template <typename T, int kPipe>
int LaunchWgmmaForward(const Problem& P, dim3 grid, cudaStream_t stream) {
  const cudaError_t e =
      P.transpose_w ? PrepareKernel<SdWgmmaTag<T, true, kPipe>>(
                          SparseDotWgmmaKernel<T, true, kPipe>, kSdSmemBytes)
                    : PrepareKernel<SdWgmmaTag<T, false, kPipe>>(
                          SparseDotWgmmaKernel<T, false, kPipe>, kSdSmemBytes);
  if (e != cudaSuccess) return e;
  if (P.transpose_w) {
    SparseDotWgmmaKernel<T, true, kPipe><<<grid, kSdThreads, kSdSmemBytes, stream>>>(P);
  } else {
    SparseDotWgmmaKernel<T, false, kPipe><<<grid, kSdThreads, kSdSmemBytes, stream>>>(P);
  }
  return cudaGetLastError();
}

template <typename T>
int LaunchWgmmaForward(const Problem& P, cudaStream_t stream) {
  const int64_t row_tiles = (P.n + kSdRows - 1) / kSdRows;
  const int64_t most = internal::Tuning() == kTuningSparseDotFewRowTiles ? 2 : 65535;
  const dim3 grid(static_cast<unsigned>(P.p / kSdCols),
                  static_cast<unsigned>(row_tiles < most ? row_tiles : most));
  switch (internal::Tuning()) {
    case kTuningSparseDotWgmmaForwardOverlap:
      return LaunchWgmmaForward<T, kInFlightPipe>(P, grid, stream);
    case kTuningSparseDotWgmmaForwardSerial:
      return LaunchWgmmaForward<T, kSerialPipe>(P, grid, stream);
    default:
      return LaunchWgmmaForward<T, kIssueUnderMma>(P, grid, stream);
  }
}

template <typename T, int kPipe>
int LaunchWgmmaGradW(const Problem& P, dim3 grid, cudaStream_t stream) {
  const cudaError_t e =
      PrepareKernel<SgWgmmaTag<T, kPipe>>(SparseDotWgmmaGradWKernel<T, kPipe>, kSgSmemBytes);
  if (e != cudaSuccess) return e;
  SparseDotWgmmaGradWKernel<T, kPipe><<<grid, kSgThreads, kSgSmemBytes, stream>>>(P);
  return cudaGetLastError();
}

template <typename T>
int LaunchWgmmaGradW(const Problem& P, cudaStream_t stream) {
  const int64_t in_tiles = (P.m + kSgIn - 1) / kSgIn, columns = P.p / kSgOut;
  const bool loops = internal::Tuning() == kTuningSparseDotWgmmaGradWLoops;
  const int64_t most_x = loops ? 2 : INT32_MAX, most_y = loops ? 2 : 65535;
  const dim3 grid(static_cast<unsigned>(in_tiles < most_x ? in_tiles : most_x),
                  static_cast<unsigned>(columns < most_y ? columns : most_y));
  switch (internal::Tuning()) {
    case kTuningSparseDotWgmmaGradWSerial:
      return LaunchWgmmaGradW<T, kSerialPipe>(P, grid, stream);
    case kTuningSparseDotWgmmaIssueUnderMma:
      return LaunchWgmmaGradW<T, kIssueUnderMma>(P, grid, stream);
    default:
      return LaunchWgmmaGradW<T, kInFlightPipe>(P, grid, stream);
  }
}

int Run(DType dt, const Problem& P0, bool grad, void* workspace, CUstream_st* stream_handle) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const bool wgmma = WgmmaPath(dt, P0);
  const int64_t W = wgmma ? kSdCols : TileWidth(P0.bs), PJ = (P0.p + W - 1) / W;
  // Grid x dimensions: tile columns (forward) and 64-feature input tiles (dW); the mma.sync
  // forward lists input tiles of W features as int32 in shared memory, and the wgmma forward
  // counts its steps of 64 input features in an int.
  if (PJ > INT32_MAX || (P0.m + kGradM - 1) / kGradM > INT32_MAX ||
      (P0.m + W - 1) / W > INT32_MAX)
    return cudaErrorInvalidValue;
  Problem P = P0;
  P.counts = static_cast<const int32_t*>(workspace);
  P.rows = reinterpret_cast<const int32_t*>(static_cast<char*>(workspace) + RoundUp256(PJ * 4));
  const int64_t PB = P.p / P.bs;
  ListActiveRowsKernel<<<static_cast<unsigned>(PJ), kListThreads, 0, stream>>>(
      P.out_mask, P.n, PB, static_cast<int>(W / P.bs), const_cast<int32_t*>(P.rows),
      const_cast<int32_t*>(P.counts));
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  if (wgmma && grad) {
    return dt == DType::kFloat16 ? LaunchWgmmaGradW<__half>(P, stream)
                                 : LaunchWgmmaGradW<__nv_bfloat16>(P, stream);
  }
  if (wgmma) {
    return dt == DType::kFloat16 ? LaunchWgmmaForward<__half>(P, stream)
                                 : LaunchWgmmaForward<__nv_bfloat16>(P, stream);
  }
  switch (dt) {
    case DType::kFloat32: return RunTyped<float>(P, grad, stream);
    case DType::kFloat16: return RunTyped<__half>(P, grad, stream);
    case DType::kBFloat16: return RunTyped<__nv_bfloat16>(P, grad, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t SparseDotWorkspaceBytes(int64_t n, int64_t p, int64_t bs) {
  if (n < 0 || p < 0 || bs < 1) return 0;
  const int64_t W = TileWidth(bs), PJ = (p + W - 1) / W;
  return RoundUp256(PJ * 4) + PJ * n * 4;
}

int LaunchSparseDot(DType dtype, const void* x, const void* w, const float* in_mask,
                    const float* out_mask, void* y, int64_t n, int64_t m, int64_t p, int64_t bs,
                    bool transpose_w, void* workspace, int64_t workspace_bytes,
                    CUstream_st* stream) {
  int e = CheckArgs(dtype, n, m, p, bs, workspace_bytes);
  if (e != cudaSuccess) return e;
  if (n == 0 || p == 0) return cudaSuccess;  // y is empty
  if (y == nullptr || out_mask == nullptr) return cudaErrorInvalidValue;
  if (m == 0)  // nothing to sum: y = 0
    return cudaMemsetAsync(y, 0, n * p * ElementBytes(dtype),
                           reinterpret_cast<cudaStream_t>(stream));
  if (x == nullptr || w == nullptr || in_mask == nullptr || workspace == nullptr)
    return cudaErrorInvalidValue;
  const int ce = 16 / ElementBytes(dtype);
  Problem P{x, w, in_mask, out_mask, y, nullptr, nullptr, n, m, p, static_cast<int>(bs),
            __builtin_ctzll(bs), transpose_w,
            Aligned16(x) && Aligned16(w) && Aligned16(y) && m % ce == 0 && p % ce == 0};
  return Run(dtype, P, false, workspace, stream);
}

int LaunchSparseDotGradW(DType dtype, const void* x, const void* dy, const float* in_mask,
                         const float* out_mask, void* dw, int64_t n, int64_t m, int64_t p,
                         int64_t bs, void* workspace, int64_t workspace_bytes,
                         CUstream_st* stream) {
  int e = CheckArgs(dtype, n, m, p, bs, workspace_bytes);
  if (e != cudaSuccess) return e;
  if (m == 0 || p == 0) return cudaSuccess;  // dw is empty
  if (dw == nullptr) return cudaErrorInvalidValue;
  if (n == 0)  // no examples: dw = 0
    return cudaMemsetAsync(dw, 0, m * p * ElementBytes(dtype),
                           reinterpret_cast<cudaStream_t>(stream));
  if (x == nullptr || dy == nullptr || in_mask == nullptr || out_mask == nullptr ||
      workspace == nullptr)
    return cudaErrorInvalidValue;
  const int ce = 16 / ElementBytes(dtype);
  Problem P{x, dy, in_mask, out_mask, dw, nullptr, nullptr, n, m, p, static_cast<int>(bs),
            __builtin_ctzll(bs), false,
            Aligned16(x) && Aligned16(dy) && Aligned16(dw) && m % ce == 0 && p % ce == 0};
  return Run(dtype, P, true, workspace, stream);
}

}  // namespace gpu
}  // namespace blocksparse
