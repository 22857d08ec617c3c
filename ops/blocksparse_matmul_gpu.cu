// CUDA block-sparse matrix products: argument checks, device queries, kernel selection, and
// the CUDA-core kernels.  The tensor-core kernel template lives in
// blocksparse_matmul_gpu_mma.cuh, its tile configurations in blocksparse_matmul_gpu_dispatch.cuh
// (instantiated per dtype in blocksparse_matmul_gpu_{f32,f16,bf16}.cu).  See
// blocksparse_matmul_gpu.h for the semantics.
#include "ops/blocksparse_matmul_gpu.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>

#include "ops/block_layout.h"
#include "ops/blocksparse_matmul_gpu_internal.cuh"

namespace blocksparse {
namespace gpu {
namespace internal {

// ------------------------------------------------------------------------------------------
// Device attributes, queried once per device.
constexpr int kMaxDevices = 64;
constexpr int kTuningAsSm86 = 19;  // see SetTuning

int GetDeviceInfo(DeviceInfo* out, int* device) {
  static std::mutex mu;
  static DeviceInfo infos[kMaxDevices];
  static bool known[kMaxDevices] = {};
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev < 0 || dev >= kMaxDevices) return cudaErrorInvalidDevice;
  *device = dev;
  std::lock_guard<std::mutex> lock(mu);
  if (!known[dev]) {
    DeviceInfo d;
    if ((e = cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, dev)) ||
        (e = cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev)) ||
        (e = cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, dev)) ||
        (e = cudaDeviceGetAttribute(&d.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                    dev)) ||
        (e = cudaDeviceGetAttribute(&d.l2_bytes, cudaDevAttrL2CacheSize, dev))) {
      return e;
    }
    infos[dev] = d;
    known[dev] = true;
  }
  *out = infos[dev];
  if (internal::Tuning() == kTuningAsSm86) {  // tests: run as a compute capability 8.6 GPU
    out->cc_major = 8;
    out->cc_minor = 6;
    if (out->max_smem_optin > internal::kSmallestSmemOptin)
      out->max_smem_optin = internal::kSmallestSmemOptin;
  }
  // No kernel image is built below compute capability 8.0 (sm_80, sm_90a; see
  // third_party/cuda/cuda.bzl): refuse before any launch.
  return out->cc_major < 8 ? cudaErrorNoKernelImageForDevice : cudaSuccess;
}

}  // namespace internal

namespace {

using internal::DeviceInfo;
using internal::GetDeviceInfo;

// ------------------------------------------------------------------------------------------
// CUDA-core kernels: every dtype and block size; also the fallback for unaligned pointers.
// One thread per output element, float32 accumulation in a fixed order.
using mma_impl::FromF;
using mma_impl::ToF;

// The 8 elements at p (16-byte aligned) as floats, in 16-byte loads.
template <typename T>
__device__ __forceinline__ void LoadEight(const T* p, float (&out)[8]) {
  const uint4* v = reinterpret_cast<const uint4*>(p);
  uint4 raw[sizeof(T) / 2] = {v[0]};
  if constexpr (sizeof(T) == 4) raw[1] = v[1];
  const T* e = reinterpret_cast<const T*>(raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = ToF(e[i]);
}

// Stores 8 floats at p (16-byte aligned) as elements of T, in 16-byte stores.
template <typename T>
__device__ __forceinline__ void StoreEight(T* p, const float (&v)[8]) {
  mma_impl::StoreChunk<T>(p, v);
  if constexpr (sizeof(T) == 4) mma_impl::StoreChunk<T>(p + 4, v + 4);
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// y[n, col] (feature axis 1, index n*K + col) or y[col, n] (feature axis 0, index col*N + n).
// w_transposed: each stored block holds the transpose of the product's block (element (i, j)
// of the product's block at j*bs + i), read so: the same sums in the same order.
template <typename T, int FA>
__global__ void ForwardSimpleKernel(const T* __restrict__ x, const T* __restrict__ w,
                                    T* __restrict__ y, int64_t N, int64_t C, int64_t K, int bs,
                                    bool w_transposed, const int32_t* __restrict__ col_ptr,
                                    const int32_t* __restrict__ col_row,
                                    const int32_t* __restrict__ col_block) {
  const int64_t w_row_step = w_transposed ? 1 : bs;  // from element (i, j) to (i + 1, j)
  const int64_t x_row_step = FA == 1 ? 1 : N;        // from input feature i to i + 1
  const int64_t total = N * K;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    int64_t n, col;
    if (FA == 1) {
      n = idx / K;
      col = idx % K;
    } else {
      col = idx / N;
      n = idx % N;
    }
    const int64_t kb = col / bs;
    const int j = static_cast<int>(col % bs);
    float acc = 0.f;
    const int pend = col_ptr[kb + 1];
    for (int pi = col_ptr[kb]; pi < pend; ++pi) {
      const int64_t c = col_row[pi];
      const T* wb = w + (int64_t)col_block[pi] * bs * bs + (w_transposed ? j * bs : j);
      const T* xb = FA == 1 ? x + n * C + c * bs : x + c * bs * N + n;
      for (int i = 0; i < bs; ++i)
        acc = fmaf(ToF(xb[i * x_row_step]), ToF(wb[i * w_row_step]), acc);
    }
    y[idx] = FromF<T>(acc);
  }
}

// bs 8 with 16-byte-aligned x, w and y: one thread per (example n, block column kb) computes
// the column's 8 outputs for that example, loading each block's 64 weights as 16-byte rows
// and, with feature axis 1, the example's 8 inputs likewise: 64 multiply-adds per block for 9
// (16-bit) or 18 (float32) loads, where ForwardSimpleKernel's thread makes 8 per 16 loads.
// Consecutive threads take consecutive examples of one block column, so a warp reads the same
// blocks (broadcast) and walks one column list.  Each output sums the same products in the same
// order as ForwardSimpleKernel's (blocks in column order, input features ascending), bit for bit.
template <typename T, int FA>
__global__ void ForwardBs8Kernel(const T* __restrict__ x, const T* __restrict__ w,
                                 T* __restrict__ y, int64_t N, int64_t C, int64_t K,
                                 bool w_transposed, const int32_t* __restrict__ col_ptr,
                                 const int32_t* __restrict__ col_row,
                                 const int32_t* __restrict__ col_block) {
  const int64_t total = N * (K / 8);
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = idx % N, kb = idx / N;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    const int pend = col_ptr[kb + 1];
    for (int pi = col_ptr[kb]; pi < pend; ++pi) {
      const int64_t c = col_row[pi];
      const T* wb = w + (int64_t)col_block[pi] * 64;
      float xv[8];
      if (FA == 1) {
        LoadEight(x + n * C + c * 8, xv);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) xv[i] = ToF(x[(c * 8 + i) * N + n]);
      }
      float wr[8];
      if (!w_transposed) {  // stored row i: the weights from input i to outputs 0..7
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          LoadEight(wb + i * 8, wr);
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[j] = fmaf(xv[i], wr[j], acc[j]);
        }
      } else {  // stored row j: the weights from inputs 0..7 to output j
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          LoadEight(wb + j * 8, wr);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[j] = fmaf(xv[i], wr[i], acc[j]);
        }
      }
    }
    if (FA == 1) {
      StoreEight(y + n * K + kb * 8, acc);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) y[(kb * 8 + j) * N + n] = FromF<T>(acc[j]);
    }
  }
}

// dw[b, i, j], index (b*bs + i)*bs + j.
template <typename T, int FA>
__global__ void GradWSimpleKernel(const T* __restrict__ x, const T* __restrict__ dy,
                                  T* __restrict__ dw, int64_t N, int64_t C, int64_t K, int bs,
                                  int64_t blocks, const int32_t* __restrict__ block_row,
                                  const int32_t* __restrict__ block_col) {
  const int64_t bb = (int64_t)bs * bs, total = blocks * bb;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = idx / bb;
    const int i = static_cast<int>((idx % bb) / bs), j = static_cast<int>(idx % bs);
    const int64_t xc = (int64_t)block_row[b] * bs + i, dc = (int64_t)block_col[b] * bs + j;
    float acc = 0.f;
    if (FA == 1) {
      for (int64_t n = 0; n < N; ++n) acc = fmaf(ToF(x[n * C + xc]), ToF(dy[n * K + dc]), acc);
    } else {
      const T* xr = x + xc * N;
      const T* dr = dy + dc * N;
      for (int64_t n = 0; n < N; ++n) acc = fmaf(ToF(xr[n]), ToF(dr[n]), acc);
    }
    dw[idx] = FromF<T>(acc);
  }
}

// bs 8 with 16-byte-aligned x, dy and dw (and, with feature axis 0, N a multiple of 8): one
// thread per (stored block b, row i) computes dw[b, i, 0..7].  Feature axis 1: per example one
// input and dy's 8 outputs in a 16-byte load (eight threads share it); feature axis 0: per 8
// examples the input row's 8 values and each of dy's 8 rows' 8 in 16-byte loads.  8 or 64
// multiply-adds per 2 or 9 loads (16-bit) where GradWSimpleKernel's threads make 1 per 2.  Each
// sum runs over the examples in order, as GradWSimpleKernel's, bit for bit.
template <typename T, int FA>
__global__ void GradWBs8Kernel(const T* __restrict__ x, const T* __restrict__ dy,
                               T* __restrict__ dw, int64_t N, int64_t C, int64_t K,
                               int64_t blocks, const int32_t* __restrict__ block_row,
                               const int32_t* __restrict__ block_col) {
  const int64_t total = blocks * 8;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = idx / 8, xc = (int64_t)block_row[b] * 8 + idx % 8;
    const int64_t dc = (int64_t)block_col[b] * 8;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (FA == 1) {
      for (int64_t n = 0; n < N; ++n) {
        const float xv = ToF(x[n * C + xc]);
        float dv[8];
        LoadEight(dy + n * K + dc, dv);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = fmaf(xv, dv[j], acc[j]);
      }
    } else {
      for (int64_t n = 0; n < N; n += 8) {
        float xv[8], dv[8];
        LoadEight(x + xc * N + n, xv);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          LoadEight(dy + (dc + j) * N + n, dv);
#pragma unroll
          for (int t = 0; t < 8; ++t) acc[j] = fmaf(xv[t], dv[t], acc[j]);
        }
      }
    }
    StoreEight(dw + idx * 8, acc);
  }
}

int SimpleGrid(int64_t total, const DeviceInfo& di) {
  const int64_t want = (total + 255) / 256;
  const int64_t cap = (int64_t)di.sm_count * 32;
  return static_cast<int>(want < cap ? (want > 0 ? want : 1) : cap);
}

template <typename T>
int LaunchForwardSimple(const void* x, const void* w, void* y, int64_t N, int fa,
                        const DeviceLayout& L, bool w_transposed, const DeviceInfo& di,
                        cudaStream_t s) {
  const int64_t C = L.CB * L.block_size, K = L.KB * L.block_size;
  const int grid = SimpleGrid(N * K, di);
  const int bs = static_cast<int>(L.block_size);
  if (bs == 8 && Aligned16(x) && Aligned16(w) && Aligned16(y)) {
    const int grid8 = SimpleGrid(N * L.KB, di);
    if (fa == 1) {
      ForwardBs8Kernel<T, 1><<<grid8, 256, 0, s>>>(
          static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), N, C, K,
          w_transposed, L.col_ptr, L.col_row, L.col_block);
    } else {
      ForwardBs8Kernel<T, 0><<<grid8, 256, 0, s>>>(
          static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), N, C, K,
          w_transposed, L.col_ptr, L.col_row, L.col_block);
    }
    return cudaGetLastError();
  }
  if (fa == 1) {
    ForwardSimpleKernel<T, 1><<<grid, 256, 0, s>>>(
        static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), N, C, K, bs,
        w_transposed, L.col_ptr, L.col_row, L.col_block);
  } else {
    ForwardSimpleKernel<T, 0><<<grid, 256, 0, s>>>(
        static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), N, C, K, bs,
        w_transposed, L.col_ptr, L.col_row, L.col_block);
  }
  return cudaGetLastError();
}

template <typename T>
int LaunchGradWSimple(const void* x, const void* dy, void* dw, int64_t N, int fa,
                      const DeviceLayout& L, const DeviceInfo& di, cudaStream_t s) {
  const int64_t C = L.CB * L.block_size, K = L.KB * L.block_size;
  const int bs = static_cast<int>(L.block_size);
  if (bs == 8 && (fa == 1 || N % 8 == 0) && Aligned16(x) && Aligned16(dy) && Aligned16(dw)) {
    const int grid8 = SimpleGrid(L.blocks * 8, di);
    if (fa == 1) {
      GradWBs8Kernel<T, 1><<<grid8, 256, 0, s>>>(
          static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dw), N, C, K,
          L.blocks, L.block_row, L.block_col);
    } else {
      GradWBs8Kernel<T, 0><<<grid8, 256, 0, s>>>(
          static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dw), N, C, K,
          L.blocks, L.block_row, L.block_col);
    }
    return cudaGetLastError();
  }
  const int grid = SimpleGrid(L.blocks * L.block_size * L.block_size, di);
  if (fa == 1) {
    GradWSimpleKernel<T, 1><<<grid, 256, 0, s>>>(
        static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dw), N, C, K, bs,
        L.blocks, L.block_row, L.block_col);
  } else {
    GradWSimpleKernel<T, 0><<<grid, 256, 0, s>>>(
        static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dw), N, C, K, bs,
        L.blocks, L.block_row, L.block_col);
  }
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------
bool MmaEligible(DType dt, int64_t N, int fa, int64_t bs, const DeviceInfo& di) {
  if (bs != 16 && bs != 32 && bs != 64) return false;
  if (di.cc_major < 8) return false;
  const int64_t per16 = dt == DType::kFloat32 ? 4 : 8;  // elements per 16-byte copy
  if (fa == 0 && N % per16 != 0) return false;          // batch rows must stay 16-byte aligned
  return true;
}

int CheckCommon(DType dt, int64_t N, int fa, const DeviceLayout& L) {
  if (dt != DType::kFloat32 && dt != DType::kFloat16 && dt != DType::kBFloat16)
    return cudaErrorInvalidValue;
  if (fa != 0 && fa != 1) return cudaErrorInvalidValue;
  if (N < 0) return cudaErrorInvalidValue;
  const int64_t bs = L.block_size;
  if (!IsSupportedBlockSize(bs)) return cudaErrorInvalidValue;
  // Block rows, block columns and blocks are counted in int32 in the kernels, as the layout's
  // tables store them (a forward step's block index runs up to 64 past the last block).
  if (L.CB < 1 || L.KB < 1 || L.CB > INT32_MAX || L.KB > INT32_MAX) return cudaErrorInvalidValue;
  if (L.blocks < 0 || L.blocks > L.CB * L.KB || L.blocks > INT32_MAX - 64)
    return cudaErrorInvalidValue;
  if (L.CB * bs > (int64_t(1) << 40) || L.KB * bs > (int64_t(1) << 40))
    return cudaErrorInvalidValue;
  // Element counts must fit in int64 with room to spare.
  const int64_t C = L.CB * bs, K = L.KB * bs;
  if (N > 0 && (C > INT64_MAX / 4 / N || K > INT64_MAX / 4 / N)) return cudaErrorInvalidValue;
  // A host copy of col_ptr must at least span the blocks as the device's does.
  if (L.host_col_ptr != nullptr && (L.host_col_ptr[0] != 0 || L.host_col_ptr[L.KB] != L.blocks))
    return cudaErrorInvalidValue;
  return cudaSuccess;
}

// w_transposed: w holds the transposes of the product's blocks; every kernel reads them so.
template <typename T>
int ForwardTyped(const void* x, const void* w, void* y, int64_t N, int fa, const DeviceLayout& L,
                 int device, const DeviceInfo& di, cudaStream_t s, DType dt,
                 bool w_transposed = false) {
  const bool aligned = Aligned16(x) && Aligned16(w) && Aligned16(y);
  if (aligned && MmaEligible(dt, N, fa, L.block_size, di)) {
    mma_impl::Params p{x, w, y, N, L.CB * L.block_size, L.KB * L.block_size, L.col_ptr,
                       L.col_row, L.col_block, L.block_row, L.block_col, L.blocks, 0};
    p.host_col_ptr = L.host_col_ptr;
    p.host_col_row = L.host_col_row;
    p.column_group_rows = L.column_group_rows;
    return internal::ForwardMma<T>(p, fa, N, L.block_size, L.KB, L.blocks, device, di, s,
                                   w_transposed);
  }
  return LaunchForwardSimple<T>(x, w, y, N, fa, L, w_transposed, di, s);
}

template <typename T>
int GradWTyped(const void* x, const void* dy, void* dw, int64_t N, int fa, const DeviceLayout& L,
               int device, const DeviceInfo& di, cudaStream_t s, DType dt) {
  const bool aligned = Aligned16(x) && Aligned16(dy) && Aligned16(dw);
  if (aligned && MmaEligible(dt, N, fa, L.block_size, di)) {
    mma_impl::Params p{x, dy, dw, N, L.CB * L.block_size, L.KB * L.block_size, L.col_ptr,
                       L.col_row, L.col_block, L.block_row, L.block_col, L.blocks, 0};
    return internal::GradWMma<T>(p, fa, N, L.block_size, L.blocks, device, di, s);
  }
  return LaunchGradWSimple<T>(x, dy, dw, N, fa, L, di, s);
}

// ------------------------------------------------------------------------------------------
// Narrow blocks as 64-wide blocks.
//
// A layout of 8-, 16- or 32-wide blocks whose 64-wide cover (layout.coarse: a 64-wide block
// wherever any of the narrow blocks it spans is stored) is full enough is multiplied on that
// cover: the narrow blocks are copied into a caller's workspace as 64-wide blocks (zeros where
// none is stored), the product runs on the bs-64 kernels, and dW's 64-wide blocks are copied
// back out.  The narrow blocks' kernels fetch an x tile from L2 for every block they multiply,
// each used for only bs output features; the bs-64 kernels use theirs for 64 (and bs 8 leaves
// the CUDA cores).  The measurements behind CoarseMinRows and CoarseMinFill are in
// docs/benchmark_history_gpu.md, sections "Full layouts as 64-wide blocks" and "Partial
// layouts on their 64-wide cover".
constexpr int kTuningNoCoarse = 28, kTuningAlwaysCoarse = 29;  // see SetTuning
// SetTuning(47): the 16-bit bs-32 forward with feature axis 1 on Hopper skips the cover where
// the grouped forward's rule holds (GroupedRuleHolds), to time the two against each other.  On
// an H100 (2026-12-07, bf16, N = C = K = 4096) a small-world layout of 50% density, whose
// cover is 79% full, took 262 us on its cover and 233 us on the grouped kernel without one
// (docs/benchmark_history_gpu.md); a full layout 324 against 330-340 us.
constexpr int kTuningGroupedBeforeCover = 47;

// When a layout runs on its cover.  Where the narrow blocks fill a share `fill` of the cover's
// area, the bs-64 kernels do 1 / fill times the multiply-adds and stream 1 / fill times the
// weights, at a higher rate; the gain over the narrow blocks' kernels grows with the batch rows
// up to the ratio of the two rates.  So a cover is taken where fill >= CoarseMinFill (the rate
// ratio at long batches, with a margin) and rows x fill^p >= CoarseMinRows (p = 2 for bs 16 /
// 32, whose kernels stream the weights nearly as fast as bs 64's at few rows; p = 1 for bs 8,
// whose kernels run on the CUDA cores).  Measured on an H100, C = K = 4096, random and
// small-world layouts, either way in alternating rounds.
//
// Rows, as the full layouts (fill 1) measured them: bs 8's forward gains from 16 rows, its dW
// at 64 (0.37x; 1.08x slower at 16); bs 16 16-bit from 64 rows (forward 1.0x, dW 1.25x there),
// float32 from 128 (1.4x slower at 64); bs 32 16-bit from 512 rows (0.9-0.95x at 256),
// float32's forward from 2048, its dW from 1024.  Partial covers at 16-bit bs 16: fill 0.5
// gains 0.92-0.94x at 256 rows and loses 1.10x (dW) at 128; fill 0.25 loses 1.36-1.56x at 128
// and 256 rows.  Feature axis 0's narrow kernels multiply partial layouts' blocks faster than
// feature axis 1's, so the cover gains less there: 16-bit bs 16 at fill 1 gains from 128 rows
// (0.85-0.88x; 1.23-1.82x slower at 64), at fill 0.5 loses 1.07x at 512 rows, gains 0.75-0.82x
// at 1024; 16-bit bs 32 at fill 0.9 and 1024 rows loses 1.11x (forward).
double CoarseMinRows(DType dt, int64_t bs, int fa, bool grad_w) {
  const bool f32 = dt == DType::kFloat32;
  if (bs == 8) return grad_w ? 32 : 1;
  if (bs == 16) return f32 ? 128 : (fa == 0 ? 192 : 64);
  if (f32) return grad_w ? 1024 : 2048;
  return fa == 0 ? 1024 : 512;
}

// Fills at 4096 rows (cover / narrow time): 16-bit bs 8 at feature axis 1 0.93x at fill 0.03,
// 1.02x at 0.02 (dW 0.22-0.30x there), at feature axis 0 1.36x at 0.03 and 0.69x at 0.05;
// bs 16 1.16-1.31x at 0.12, 0.59-0.60x at 0.25 (feature axis 0: 1.17-1.24x at 0.25, 0.86-0.90x
// at 0.35); bs 32 1.10-1.13x at 0.53, 0.84-0.95x at 0.62-0.66, 0.75-0.77x at 0.75 (a
// small-world layout at 10% density, fill 0.70: 1.01-1.03x).  float32 (whose bs-64 kernels
// gain least over the narrow ones): bs 8 1.57-1.66x at 0.05, 0.91x at 0.10 (feature axis 0:
// 1.58x at 0.10, 1.09x at 0.15, 0.58-0.82x at 0.2); bs 16 1.06-1.13x at 0.5, 0.85-0.88x at
// 0.65; bs 32 1.05-1.07x at 0.75, 0.84-1.03x at 0.9, 0.79-0.88x at 0.95.
double CoarseMinFill(DType dt, int64_t bs, int fa) {
  const bool f32 = dt == DType::kFloat32;
  if (bs == 8) return f32 ? (fa == 0 ? 0.2 : 0.1) : (fa == 0 ? 0.05 : 0.03);
  if (bs == 16) return f32 ? 0.6 : (fa == 0 ? 0.33 : 0.2);
  return f32 ? 0.95 : 0.75;
}

// The most workspace a call takes: twice its weights' bytes, or up to this much however thin
// the fill (a bs-8 layout at 5% fill covers 20 times its weights), so that a large sparse layer
// never asks for memory on the scale of its dense matrix.
constexpr int64_t kCoarseMaxWeightMultiple = 2;
constexpr int64_t kCoarseAlwaysBytes = int64_t{128} << 20;

// Where a layout's 64-wide copy lives in the workspace (its blocks in the cover's order).
struct CoarsePlan {
  const DeviceLayout* coarse = nullptr;  // null: run the blocks as they are
  bool full = false;                     // the cover is completely filled (no zeros to write)
  int64_t weight_bytes = 0;
};

// The plan for running `L` on its cover, or coarse == null (no cover, or one of another grid,
// too few rows or too thin a fill, a batch the bs-64 tensor-core kernels cannot take,
// unaligned pointers).
CoarsePlan PlanCoarse(DType dt, int64_t N, int fa, const DeviceLayout& L, bool grad_w,
                      const DeviceInfo& di, const void* a, const void* b, const void* out) {
  CoarsePlan plan;
  const int64_t bs = L.block_size;
  const DeviceLayout* c = L.coarse;
  if (c == nullptr || internal::Tuning() == kTuningNoCoarse) return plan;
  if (!HasCover(bs)) return plan;
  const int64_t f = kCoverBlockSize / bs;
  if (c->block_size != kCoverBlockSize || c->CB * f != L.CB || c->KB * f != L.KB) return plan;
  // A cover holds every narrow block (so at least blocks / f^2 and at most `blocks` blocks);
  // the launches trust the rest of its tables to match the layout's, as the TensorFlow op's
  // CoarseLayoutOf makes them.
  if (c->blocks < 1 || c->blocks > c->CB * c->KB || c->blocks > L.blocks ||
      c->blocks * f * f < L.blocks)
    return plan;
  if (!c->col_ptr || !c->col_row || !c->col_block || !c->block_row || !c->block_col)
    return plan;
  const double fill = static_cast<double>(L.blocks) / static_cast<double>(c->blocks * f * f);
  const double weighted_rows = static_cast<double>(N) * (bs == 8 ? fill : fill * fill);
  if (internal::Tuning() != kTuningAlwaysCoarse &&
      (fill < CoarseMinFill(dt, bs, fa) || weighted_rows < CoarseMinRows(dt, bs, fa, grad_w)))
    return plan;
  if (internal::Tuning() == kTuningGroupedBeforeCover && dt != DType::kFloat32 && bs == 32 &&
      fa == 1 && !grad_w && internal::WgmmaEnabled(di) &&
      internal::GroupedRuleHolds(N, L.CB, L.KB, L.blocks, L.column_group_rows, L.host_col_ptr,
                                 L.host_col_row))
    return plan;
  if (N < 1 || !MmaEligible(dt, N, fa, kCoverBlockSize, di)) return plan;
  if (!Aligned16(a) || !Aligned16(b) || !Aligned16(out)) return plan;
  const int64_t elem = dt == DType::kFloat32 ? 4 : 2;
  const int64_t weight_bytes = c->blocks * kCoverBlockSize * kCoverBlockSize * elem;
  if (weight_bytes > std::max(kCoarseMaxWeightMultiple * L.blocks * bs * bs * elem,
                              kCoarseAlwaysBytes))
    return plan;
  plan.coarse = c;
  plan.full = c->blocks * f * f == L.blocks;
  plan.weight_bytes = weight_bytes;
  return plan;
}

// Copies every narrow block (bs x bs, at block_row[b], block_col[b]) into its place in the
// 64 x 64 blocks of `coarse` (kToCoarse) or back out of it: sub-block (c % f, k % f) of the
// cover's block at (c / f, k / f), f = 64 / bs, found in the cover's column view; with
// `transposed` (blocks holding the transposes of the product's blocks, as
// LaunchForwardTransposedW reads them) sub-block (k % f, c % f), so that the 64-wide block
// holds the transpose of the product's.  16 bytes per thread.
template <typename T, bool kToCoarse>
__global__ void CopyFineBlocksKernel(T* __restrict__ fine, T* __restrict__ coarse,
                                     const int32_t* __restrict__ block_row,
                                     const int32_t* __restrict__ block_col, int64_t blocks,
                                     int bs, const int32_t* __restrict__ cover_col_ptr,
                                     const int32_t* __restrict__ cover_col_row,
                                     const int32_t* __restrict__ cover_col_block,
                                     bool transposed) {
  constexpr int kPerChunk = 16 / sizeof(T);
  const int f = static_cast<int>(kCoverBlockSize) / bs, chunks_per_row = bs / kPerChunk;
  const int64_t chunks_per_block = (int64_t)bs * chunks_per_row;
  const int64_t total = blocks * chunks_per_block;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = t / chunks_per_block;
    const int rem = static_cast<int>(t % chunks_per_block);
    const int i = rem / chunks_per_row, q = rem % chunks_per_row;
    const int c = block_row[b], k = block_col[b];
    // The cover's block at (c / f, k / f), by bisection over its column's increasing rows (a
    // cover without it, which no caller should pass, drops it from the forward and gives it
    // zeros in dW).
    int lo = cover_col_ptr[k / f], hi = cover_col_ptr[k / f + 1];
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (cover_col_row[mid] < c / f) lo = mid + 1; else hi = mid;
    }
    T* fp = fine + (b * bs + i) * bs + q * kPerChunk;
    if (lo == cover_col_ptr[k / f + 1] || cover_col_row[lo] != c / f) {
      if (!kToCoarse) *reinterpret_cast<uint4*>(fp) = uint4{0, 0, 0, 0};  // dW still written
      continue;
    }
    const int64_t cb = cover_col_block[lo];
    const int64_t sub_r = transposed ? k % f : c % f, sub_c = transposed ? c % f : k % f;
    T* cp = coarse + (cb * kCoverBlockSize + sub_r * bs + i) * kCoverBlockSize + sub_c * bs +
            q * kPerChunk;
    if (kToCoarse) {
      *reinterpret_cast<uint4*>(cp) = *reinterpret_cast<const uint4*>(fp);
    } else {
      *reinterpret_cast<uint4*>(fp) = *reinterpret_cast<const uint4*>(cp);
    }
  }
}

template <typename T, bool kToCoarse>
void CopyFineBlocks(const void* fine, void* coarse, const DeviceLayout& L,
                    const DeviceLayout& cover, bool transposed, const DeviceInfo& di,
                    cudaStream_t s) {
  const int64_t chunks = L.blocks * L.block_size * L.block_size * int64_t{sizeof(T)} / 16;
  CopyFineBlocksKernel<T, kToCoarse><<<SimpleGrid(chunks, di), 256, 0, s>>>(
      const_cast<T*>(static_cast<const T*>(fine)), static_cast<T*>(coarse), L.block_row,
      L.block_col, L.blocks, static_cast<int>(L.block_size), cover.col_ptr, cover.col_row,
      cover.col_block, transposed);
}

template <typename T>
int ForwardCoarse(const CoarsePlan& plan, void* workspace, const void* x, const void* w, void* y,
                  int64_t N, int fa, const DeviceLayout& L, int device, const DeviceInfo& di,
                  cudaStream_t s, DType dt, bool w_transposed) {
  if (!plan.full) {  // the cover's blocks where no narrow block lies stay zero
    if (cudaError_t e = cudaMemsetAsync(workspace, 0, plan.weight_bytes, s)) return e;
  }
  CopyFineBlocks<T, true>(w, workspace, L, *plan.coarse, w_transposed, di, s);
  if (cudaError_t e = cudaGetLastError()) return e;
  return ForwardTyped<T>(x, workspace, y, N, fa, *plan.coarse, device, di, s, dt, w_transposed);
}

template <typename T>
int GradWCoarse(const CoarsePlan& plan, void* workspace, const void* x, const void* dy, void* dw,
                int64_t N, int fa, const DeviceLayout& L, int device, const DeviceInfo& di,
                cudaStream_t s, DType dt) {
  if (int e = GradWTyped<T>(x, dy, workspace, N, fa, *plan.coarse, device, di, s, dt)) return e;
  CopyFineBlocks<T, false>(dw, workspace, L, *plan.coarse, false, di, s);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------
// Feature axis 1 on feature axis 0's kernels.
//
// With feature axis 1 a bs-16 block's slab of x (or dy) is 32 bytes of every batch row, and
// the narrow kernels' copies ask the L2 for one 32-byte sector per row: the 16-bit bs-16
// products ran at about half the speed of feature axis 0's, whose slabs are runs of whole
// rows of x^T (H100 table, C = K = 4096, N = 4096, 10% density: forward 236 against 117 us,
// dW 298 against 141).  So where the caller passes a workspace, those products transpose x
// (and dy) into it, run on feature axis 0's kernels and transpose y back; the forward in
// passes of at most `rows` batch rows, so that the workspace stays within
// kTransposedMaxBytes.  dW sums over the whole batch in one call, so it transposes the whole
// batch, where that fits in kTransposedGradWMaxBytes (at N = 16384, C = K = 8192, 16-bit: 512
// MiB, as much as x and dy themselves).
constexpr int kTuningNoTransposed = 30, kTuningAlwaysTransposed = 31;  // see SetTuning
constexpr int kTuningTransposedPasses = 32;  // as 31, in passes of kTransposedTestRows
constexpr int64_t kTransposedMaxBytes = int64_t{256} << 20;
constexpr int64_t kTransposedGradWMaxBytes = int64_t{1} << 30;
constexpr int64_t kTransposedTestRows = 256;

// Where the transposes pay: (density - least) x N >= kTransposedMinExcess, density the stored
// blocks over CB x KB, least kTransposedMinDensity (or ...FarOverL2, below).  The transposes cost a
// pass over x and y (dy) and the products gain in proportion to their blocks, so density decides,
// and a few launches' fixed cost tips small batches.  Measured side by side on an H100 (bf16,
// C = K = 4096, random layouts, us, transposes off -> on, forward / dW): N = 4096 at 3%
// 86.7 -> 105.1 / 108.3 -> 112.6, 5% 128.9 -> 124.9 / 171.0 -> 151.0, 10%
// 235.1 -> 178.2 / 297.4 -> 200.0; N = 1024 at 5% 38.0 -> 41.8 / 44.7 -> 48.8, 10%
// 66.5 -> 56.3 / 69.8 -> 62.4; N = 512 at 10% 36.1 -> 33.9 / 38.9 -> 40.8, 15%
// 50.1 -> 39.8 / 50.3 -> 48.5; N = 256 slower up to 15% (10%: 22.8 -> 30.0), at 25%
// 45.2 -> 45.1 / 43.4 -> 46.3.  Where x outgrows the L2 (C = K = 4096, N = 4096: x is 0.64 times an
// H100's L2), feature axis 1's reads of it miss the L2 more often and the transposes pay from lower
// densities: kTransposedMinDensityFarOverL2 (C = K = 8192; N = 4096, x 1.3 times the L2: 3%
// 295 -> 258 / 579 -> 292; N = 8192: 2% 414 -> 416 / 742 -> 482, 3% 581 -> 500 / 1303 -> 620;
// N = 16384: 1% 486 -> 696 / 767 -> 888, 2% 821 -> 831 / 1001 -> 945, 3% forward 1155 -> 999, 5%
// 1824 -> 1349 / 2142 -> 1660).  The whole sweep: docs/benchmark_history_gpu.md, "Feature axis 1
// through transposed batches".
constexpr double kTransposedMinDensity = 0.04;
constexpr double kTransposedMinDensityFarOverL2 = 0.015;
constexpr double kTransposedFarOverL2 = 1.0;
constexpr double kTransposedMinExcess = 40.0;

struct TransposedPlan {
  int64_t rows = 0;   // batch rows per pass; 0: run as it is
  int64_t bytes = 0;  // workspace: x^T and y^T (dy^T) of one pass
};

TransposedPlan PlanTransposed(DType dt, int64_t N, int fa, const DeviceLayout& L, bool grad_w,
                              const DeviceInfo& di, const void* a, const void* b,
                              const void* out) {
  TransposedPlan plan;
  if (fa != 1 || dt == DType::kFloat32 || L.block_size != 16 || L.blocks < 1) return plan;
  if (internal::Tuning() == kTuningNoTransposed || !internal::WgmmaEnabled(di)) return plan;
  // Passes of whole 16-byte rows of x^T and y^T, on the tensor-core kernels.
  if (N % 8 != 0 || N <= 64 || !MmaEligible(dt, N, 0, L.block_size, di)) return plan;
  if (!Aligned16(a) || !Aligned16(b) || !Aligned16(out)) return plan;
  const bool passes = internal::Tuning() == kTuningTransposedPasses;
  const bool always = passes || internal::Tuning() == kTuningAlwaysTransposed;
  const double density =
      static_cast<double>(L.blocks) / (static_cast<double>(L.CB) * static_cast<double>(L.KB));
  const double x_bytes = static_cast<double>(N) * static_cast<double>(L.CB * L.block_size) * 2;
  const double least = x_bytes >= kTransposedFarOverL2 * static_cast<double>(di.l2_bytes)
                           ? kTransposedMinDensityFarOverL2
                           : kTransposedMinDensity;
  const double excess = (density - least) * static_cast<double>(N);
  if (!always && excess < kTransposedMinExcess) return plan;
  const int64_t row_bytes = (L.CB + L.KB) * L.block_size * 2;  // one batch row of both
  int64_t rows = N;
  if (!grad_w) {  // the forward's rows are independent: passes of about equal rows
    const int64_t fit = kTransposedMaxBytes / row_bytes / 8 * 8;
    const int64_t count = fit > 0 ? (N + fit - 1) / fit : 1;
    rows = std::min(fit, ((N + count - 1) / count + 7) / 8 * 8);
    if (passes) rows = std::min(N, kTransposedTestRows);
  }
  if (rows < 1 || rows * row_bytes > (grad_w ? kTransposedGradWMaxBytes : kTransposedMaxBytes))
    return plan;
  plan.rows = rows;
  plan.bytes = rows * row_bytes;
  return plan;
}

// out (cols x rows, row stride ld_out) = in^T (in: rows x cols, row stride ld_in), for 16-bit
// elements, rows and cols multiples of 8: 64 x 64 tiles through shared memory, 16-byte
// copies.  The tile's rows are 33 words apart so that a column's gather hits distinct banks
// but for pairs.
template <typename T>
__global__ void __launch_bounds__(256)
    TransposeKernel(const T* __restrict__ in, T* __restrict__ out, int64_t rows, int64_t cols,
                    int64_t ld_in, int64_t ld_out) {
  static_assert(sizeof(T) == 2, "16-bit elements");
  constexpr int kTile = 64, kLd = kTile + 2;
  __shared__ uint32_t tile[kTile * kLd / 2];
  const int64_t tiles_c = (cols + kTile - 1) / kTile;
  const int64_t tiles = (rows + kTile - 1) / kTile * tiles_c;
  const int chunk = threadIdx.x % 8, line = threadIdx.x / 8;  // 8 chunks of 8 per tile row
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t r0 = t / tiles_c * kTile, c0 = t % tiles_c * kTile;
    for (int i = line; i < kTile; i += 32) {
      const int64_t r = r0 + i, c = c0 + chunk * 8;
      if (r < rows && c < cols) {
        const uint4 v = *reinterpret_cast<const uint4*>(in + r * ld_in + c);
        uint32_t* dst = tile + (i * kLd + chunk * 8) / 2;
        dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
      }
    }
    __syncthreads();
    const uint16_t* t16 = reinterpret_cast<const uint16_t*>(tile);
    for (int j = line; j < kTile; j += 32) {  // output row c0 + j, its rows r0 + chunk * 8..
      const int64_t c = c0 + j, r = r0 + chunk * 8;
      if (c < cols && r < rows) {
        uint32_t packed[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const uint32_t lo = t16[(chunk * 8 + 2 * q) * kLd + j];
          const uint32_t hi = t16[(chunk * 8 + 2 * q + 1) * kLd + j];
          packed[q] = lo | hi << 16;
        }
        *reinterpret_cast<uint4*>(out + c * ld_out + r) =
            uint4{packed[0], packed[1], packed[2], packed[3]};
      }
    }
    __syncthreads();
  }
}

template <typename T>
int Transpose(const T* in, T* out, int64_t rows, int64_t cols, int64_t ld_in, int64_t ld_out,
              const DeviceInfo& di, cudaStream_t s) {
  const int64_t tiles = (rows + 63) / 64 * ((cols + 63) / 64);
  const int grid = static_cast<int>(std::min<int64_t>(tiles, int64_t{di.sm_count} * 16));
  TransposeKernel<T><<<grid, 256, 0, s>>>(in, out, rows, cols, ld_in, ld_out);
  return cudaGetLastError();
}

template <typename T>
int ForwardTransposed(const TransposedPlan& plan, void* workspace, const void* x, const void* w,
                      void* y, int64_t N, const DeviceLayout& L, int device,
                      const DeviceInfo& di, cudaStream_t s, DType dt, bool w_transposed) {
  const int64_t C = L.CB * L.block_size, K = L.KB * L.block_size;
  T* xt = static_cast<T*>(workspace);
  T* yt = xt + C * plan.rows;
  for (int64_t n0 = 0; n0 < N; n0 += plan.rows) {
    const int64_t n = std::min(plan.rows, N - n0);
    if (int e = Transpose<T>(static_cast<const T*>(x) + n0 * C, xt, n, C, C, n, di, s)) return e;
    if (int e = ForwardTyped<T>(xt, w, yt, n, 0, L, device, di, s, dt, w_transposed)) return e;
    if (int e = Transpose<T>(yt, static_cast<T*>(y) + n0 * K, K, n, n, K, di, s)) return e;
  }
  return cudaSuccess;
}

template <typename T>
int GradWTransposed(const TransposedPlan& plan, void* workspace, const void* x, const void* dy,
                    void* dw, int64_t N, const DeviceLayout& L, int device, const DeviceInfo& di,
                    cudaStream_t s, DType dt) {
  const int64_t C = L.CB * L.block_size, K = L.KB * L.block_size;
  T* xt = static_cast<T*>(workspace);
  T* dyt = xt + C * N;
  if (int e = Transpose<T>(static_cast<const T*>(x), xt, N, C, C, N, di, s)) return e;
  if (int e = Transpose<T>(static_cast<const T*>(dy), dyt, N, K, K, N, di, s)) return e;
  return GradWTyped<T>(xt, dyt, dw, N, 0, L, device, di, s, dt);
}

// What a call runs on, given a workspace: its cover, transposed batches, or neither.
struct WorkspacePlan {
  CoarsePlan coarse;
  TransposedPlan transposed;
  int64_t Bytes() const {
    return coarse.coarse != nullptr ? coarse.weight_bytes : transposed.bytes;
  }
};

WorkspacePlan PlanWorkspace(DType dt, int64_t N, int fa, const DeviceLayout& L, bool grad_w,
                            const DeviceInfo& di, const void* a, const void* b,
                            const void* out) {
  WorkspacePlan plan;
  if (L.block_row && L.block_col) plan.coarse = PlanCoarse(dt, N, fa, L, grad_w, di, a, b, out);
  if (plan.coarse.coarse == nullptr)
    plan.transposed = PlanTransposed(dt, N, fa, L, grad_w, di, a, b, out);
  return plan;
}

// The product on the layout as it is, or as `plan` says where the workspace holds it.
template <typename T>
int ForwardAny(const WorkspacePlan& plan, void* workspace, int64_t workspace_bytes,
               const void* x, const void* w, void* y, int64_t N, int fa, const DeviceLayout& L,
               int device, const DeviceInfo& di, cudaStream_t s, DType dt, bool w_transposed) {
  if (plan.Bytes() > 0 && workspace_bytes >= plan.Bytes()) {
    if (plan.coarse.coarse != nullptr)
      return ForwardCoarse<T>(plan.coarse, workspace, x, w, y, N, fa, L, device, di, s, dt,
                              w_transposed);
    if constexpr (sizeof(T) == 2)  // PlanTransposed takes 16-bit types only
      return ForwardTransposed<T>(plan.transposed, workspace, x, w, y, N, L, device, di, s, dt,
                                  w_transposed);
  }
  return ForwardTyped<T>(x, w, y, N, fa, L, device, di, s, dt, w_transposed);
}

template <typename T>
int GradWAny(const WorkspacePlan& plan, void* workspace, int64_t workspace_bytes, const void* x,
             const void* dy, void* dw, int64_t N, int fa, const DeviceLayout& L, int device,
             const DeviceInfo& di, cudaStream_t s, DType dt) {
  if (plan.Bytes() > 0 && workspace_bytes >= plan.Bytes()) {
    if (plan.coarse.coarse != nullptr)
      return GradWCoarse<T>(plan.coarse, workspace, x, dy, dw, N, fa, L, device, di, s, dt);
    if constexpr (sizeof(T) == 2)
      return GradWTransposed<T>(plan.transposed, workspace, x, dy, dw, N, L, device, di, s, dt);
  }
  return GradWTyped<T>(x, dy, dw, N, fa, L, device, di, s, dt);
}

// A workspace the kernels can use: 16-byte aligned, with room for at least one byte.
bool UsableWorkspace(const void* workspace, int64_t bytes) {
  return workspace != nullptr && bytes > 0 && Aligned16(workspace);
}

// w_transposed: w holds the transposes of the product's blocks.
int LaunchForwardImpl(DType dtype, const void* x, const void* w, void* y, int64_t N,
                      int feature_axis, const DeviceLayout& layout, CUstream_st* stream,
                      bool w_transposed, void* workspace, int64_t workspace_bytes) {
  int e = CheckCommon(dtype, N, feature_axis, layout);
  if (e) return e;
  if (N == 0) return cudaSuccess;  // y is empty
  if (!x || !y || !layout.col_ptr) return cudaErrorInvalidValue;
  if (layout.blocks > 0 && (!w || !layout.col_row || !layout.col_block))
    return cudaErrorInvalidValue;
  DeviceInfo di;
  int device = 0;
  if ((e = GetDeviceInfo(&di, &device))) return e;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  WorkspacePlan plan;
  if (UsableWorkspace(workspace, workspace_bytes))
    plan = PlanWorkspace(dtype, N, feature_axis, layout, false, di, x, w, y);
  switch (dtype) {
    case DType::kFloat32:
      return ForwardAny<float>(plan, workspace, workspace_bytes, x, w, y, N, feature_axis,
                               layout, device, di, s, dtype, w_transposed);
    case DType::kFloat16:
      return ForwardAny<__half>(plan, workspace, workspace_bytes, x, w, y, N, feature_axis,
                                layout, device, di, s, dtype, w_transposed);
    case DType::kBFloat16:
      return ForwardAny<__nv_bfloat16>(plan, workspace, workspace_bytes, x, w, y, N,
                                       feature_axis, layout, device, di, s, dtype, w_transposed);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t WorkspaceBytes(DType dtype, int64_t N, int feature_axis, const DeviceLayout& layout,
                       bool grad_w) {
  if (CheckCommon(dtype, N, feature_axis, layout)) return 0;
  DeviceInfo di;
  int device = 0;
  if (GetDeviceInfo(&di, &device)) return 0;
  // The pointers' alignment is checked at the launch: assume aligned ones here.
  static const uint4 aligned{};
  return PlanWorkspace(dtype, N, feature_axis, layout, grad_w, di, &aligned, &aligned, &aligned)
      .Bytes();
}

int LaunchForward(DType dtype, const void* x, const void* w, void* y, int64_t N,
                  int feature_axis, const DeviceLayout& layout, CUstream_st* stream,
                  void* workspace, int64_t workspace_bytes) {
  return LaunchForwardImpl(dtype, x, w, y, N, feature_axis, layout, stream, false, workspace,
                           workspace_bytes);
}

int LaunchForwardTransposedW(DType dtype, const void* x, const void* w, void* y, int64_t N,
                             int feature_axis, const DeviceLayout& layout, CUstream_st* stream,
                             void* workspace, int64_t workspace_bytes) {
  return LaunchForwardImpl(dtype, x, w, y, N, feature_axis, layout, stream, true, workspace,
                           workspace_bytes);
}

int LaunchGradW(DType dtype, const void* x, const void* dy, void* dw, int64_t N,
                int feature_axis, const DeviceLayout& layout, CUstream_st* stream,
                void* workspace, int64_t workspace_bytes) {
  int e = CheckCommon(dtype, N, feature_axis, layout);
  if (e) return e;
  if (layout.blocks == 0) return cudaSuccess;  // dw is empty
  if (!dw || !layout.block_row || !layout.block_col || !layout.col_ptr || !layout.col_row ||
      !layout.col_block)
    return cudaErrorInvalidValue;
  if (N > 0 && (!x || !dy)) return cudaErrorInvalidValue;
  DeviceInfo di;
  int device = 0;
  if ((e = GetDeviceInfo(&di, &device))) return e;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  WorkspacePlan plan;
  if (UsableWorkspace(workspace, workspace_bytes))
    plan = PlanWorkspace(dtype, N, feature_axis, layout, true, di, x, dy, dw);
  switch (dtype) {
    case DType::kFloat32:
      return GradWAny<float>(plan, workspace, workspace_bytes, x, dy, dw, N, feature_axis,
                             layout, device, di, s, dtype);
    case DType::kFloat16:
      return GradWAny<__half>(plan, workspace, workspace_bytes, x, dy, dw, N, feature_axis,
                              layout, device, di, s, dtype);
    case DType::kBFloat16:
      return GradWAny<__nv_bfloat16>(plan, workspace, workspace_bytes, x, dy, dw, N,
                                     feature_axis, layout, device, di, s, dtype);
  }
  return cudaErrorInvalidValue;
}

namespace internal {
namespace {
std::atomic<int> g_tuning{0};
}  // namespace
int Tuning() { return g_tuning.load(std::memory_order_relaxed); }
}  // namespace internal

void SetTuning(int variant) { internal::g_tuning.store(variant, std::memory_order_relaxed); }

const char* ErrorString(int code) {
  if (code == cudaErrorNoKernelImageForDevice) {
    return "no kernel image for this GPU: the GPU kernels are built for compute capability 8.0 "
           "and newer (Ampere, Ada, Hopper); on older GPUs place the op on the CPU "
           "(with tf.device('/CPU:0'))";
  }
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

int SelectedPath(DType dtype, int64_t N, int feature_axis, int64_t block_size, bool grad_w) {
  (void)grad_w;
  DeviceInfo di;
  int device = 0;
  if (GetDeviceInfo(&di, &device)) return 0;
  return MmaEligible(dtype, N, feature_axis, block_size, di) ? 1 : 0;
}

}  // namespace gpu
}  // namespace blocksparse
