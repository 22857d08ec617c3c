// CUDA block-sparse matrix products: argument checks, device queries, kernel selection, and
// the CUDA-core kernels.  The tensor-core kernel template lives in
// blocksparse_matmul_gpu_mma.cuh, its tile configurations in blocksparse_matmul_gpu_dispatch.cuh
// (instantiated per dtype in blocksparse_matmul_gpu_{f32,f16,bf16}.cu).  See
// blocksparse_matmul_gpu.h for the semantics.
#include "ops/blocksparse_matmul_gpu.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>

#include "ops/blocksparse_matmul_gpu_internal.cuh"

namespace blocksparse {
namespace gpu {
namespace {

// ------------------------------------------------------------------------------------------
// Device attributes, queried once per device.
using internal::DeviceInfo;
constexpr int kMaxDevices = 64;

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
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------------
// CUDA-core kernels: every dtype and block size; also the fallback for unaligned pointers.
// One thread per output element, float32 accumulation in a fixed order.
using mma_impl::FromF;
using mma_impl::ToF;

// y[n, col] (feature axis 1, index n*K + col) or y[col, n] (feature axis 0, index col*N + n).
template <typename T, int FA>
__global__ void ForwardSimpleKernel(const T* __restrict__ x, const T* __restrict__ w,
                                    T* __restrict__ y, int64_t N, int64_t C, int64_t K, int bs,
                                    const int32_t* __restrict__ col_ptr,
                                    const int32_t* __restrict__ col_row,
                                    const int32_t* __restrict__ col_block) {
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
      const T* wb = w + (int64_t)col_block[pi] * bs * bs + j;
      if (FA == 1) {
        const T* xr = x + n * C + c * bs;
        for (int i = 0; i < bs; ++i) acc = fmaf(ToF(xr[i]), ToF(wb[(int64_t)i * bs]), acc);
      } else {
        const T* xc = x + c * bs * N + n;
        for (int i = 0; i < bs; ++i) acc = fmaf(ToF(xc[i * N]), ToF(wb[(int64_t)i * bs]), acc);
      }
    }
    y[idx] = FromF<T>(acc);
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

int SimpleGrid(int64_t total, const DeviceInfo& di) {
  const int64_t want = (total + 255) / 256;
  const int64_t cap = (int64_t)di.sm_count * 32;
  return static_cast<int>(want < cap ? (want > 0 ? want : 1) : cap);
}

template <typename T>
int LaunchForwardSimple(const void* x, const void* w, void* y, int64_t N, int fa,
                        const DeviceLayout& L, const DeviceInfo& di, cudaStream_t s) {
  const int64_t C = L.CB * L.block_size, K = L.KB * L.block_size;
  const int grid = SimpleGrid(N * K, di);
  const int bs = static_cast<int>(L.block_size);
  if (fa == 1) {
    ForwardSimpleKernel<T, 1><<<grid, 256, 0, s>>>(
        static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), N, C, K, bs,
        L.col_ptr, L.col_row, L.col_block);
  } else {
    ForwardSimpleKernel<T, 0><<<grid, 256, 0, s>>>(
        static_cast<const T*>(x), static_cast<const T*>(w), static_cast<T*>(y), N, C, K, bs,
        L.col_ptr, L.col_row, L.col_block);
  }
  return cudaGetLastError();
}

template <typename T>
int LaunchGradWSimple(const void* x, const void* dy, void* dw, int64_t N, int fa,
                      const DeviceLayout& L, const DeviceInfo& di, cudaStream_t s) {
  const int64_t C = L.CB * L.block_size, K = L.KB * L.block_size;
  const int grid = SimpleGrid(L.blocks * L.block_size * L.block_size, di);
  const int bs = static_cast<int>(L.block_size);
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
bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

bool IsSupportedBlockSize(int64_t bs) {
  return bs == 1 || bs == 8 || bs == 16 || bs == 32 || bs == 64;
}

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
  if (L.CB < 1 || L.KB < 1 || L.blocks < 0 || L.blocks > L.CB * L.KB) return cudaErrorInvalidValue;
  if (L.blocks > INT32_MAX || L.CB * bs > (int64_t(1) << 40) || L.KB * bs > (int64_t(1) << 40))
    return cudaErrorInvalidValue;
  // Element counts must fit in int64 with room to spare.
  const int64_t C = L.CB * bs, K = L.KB * bs;
  if (N > 0 && (C > INT64_MAX / 4 / N || K > INT64_MAX / 4 / N)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

// With w_transposed (w holds the transposes of the product's blocks), only the tensor-core
// kernels that read them so launch; otherwise internal::kNeedsTransposedCopy, nothing launched.
template <typename T>
int ForwardTyped(const void* x, const void* w, void* y, int64_t N, int fa, const DeviceLayout& L,
                 int device, const DeviceInfo& di, cudaStream_t s, DType dt,
                 bool w_transposed = false) {
  const bool aligned = Aligned16(x) && Aligned16(w) && Aligned16(y);
  if (aligned && MmaEligible(dt, N, fa, L.block_size, di)) {
    mma_impl::Params p{x, w, y, N, L.CB * L.block_size, L.KB * L.block_size, L.col_ptr,
                       L.col_row, L.col_block, L.block_row, L.block_col, L.blocks, 0};
    return internal::ForwardMma<T>(p, fa, N, L.block_size, L.KB, L.blocks, device, di, s,
                                   w_transposed);
  }
  if (w_transposed) return internal::kNeedsTransposedCopy;
  return LaunchForwardSimple<T>(x, w, y, N, fa, L, di, s);
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
// Per-block transposes (BlocksparseMatmul's transpose_w), moving elements of E's size.
// Blocks of 32 and more: 32 x 32 tiles through shared memory, so reads and writes both run
// along rows.  grid = (blocks, tiles per block), 32 x 8 threads.
template <typename E>
__global__ void TransposeBlockTiles(const E* __restrict__ w, E* __restrict__ w_t, int bs) {
  __shared__ E tile[32][33];  // a padding column: the column reads hit distinct banks
  const int tiles = bs / 32;
  const int ti = blockIdx.y / tiles, tj = blockIdx.y % tiles;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * bs * bs;
  for (int r = threadIdx.y; r < 32; r += 8)
    tile[r][threadIdx.x] = w[base + (ti * 32 + r) * bs + tj * 32 + threadIdx.x];
  __syncthreads();
  for (int r = threadIdx.y; r < 32; r += 8)
    w_t[base + (tj * 32 + r) * bs + ti * 32 + threadIdx.x] = tile[threadIdx.x][r];
}

// Smaller blocks: kSmallRun / (BS BS) whole blocks per CTA, read and written as one
// contiguous run of kSmallRun elements each way, transposed in shared memory (each block's
// rows padded by one element so that the column reads hit distinct banks).  256 threads,
// each with 16 loads in flight.
constexpr int kSmallRun = 4096;
template <typename E, int BS>
__global__ void __launch_bounds__(256) TransposeSmallBlocks(const E* __restrict__ w,
                                                            E* __restrict__ w_t,
                                                            int64_t elements) {
  constexpr int kArea = BS * BS, kPadded = BS * (BS + 1);
  __shared__ E staged[kSmallRun / kArea * kPadded];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kSmallRun;
#pragma unroll
  for (int e = threadIdx.x; e < kSmallRun; e += 256) {
    const int b = e / kArea, i = e % kArea / BS, j = e % BS;
    if (base + e < elements) staged[b * kPadded + i * (BS + 1) + j] = w[base + e];
  }
  __syncthreads();
#pragma unroll
  for (int e = threadIdx.x; e < kSmallRun; e += 256) {
    const int b = e / kArea, j = e % kArea / BS, i = e % BS;  // w_t[b][j][i] = w[b][i][j]
    if (base + e < elements) w_t[base + e] = staged[b * kPadded + i * (BS + 1) + j];
  }
}

template <typename E>
int TransposeBlocksTyped(const void* w, void* w_t, int64_t blocks, int64_t bs,
                         cudaStream_t s) {
  const E* in = static_cast<const E*>(w);
  E* out = static_cast<E*>(w_t);
  if (bs >= 32) {
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>((bs / 32) * (bs / 32)));
    TransposeBlockTiles<E><<<grid, dim3(32, 8), 0, s>>>(in, out, static_cast<int>(bs));
  } else {
    const int64_t elements = blocks * bs * bs;
    const unsigned grid = static_cast<unsigned>((elements + kSmallRun - 1) / kSmallRun);
    if (bs == 1) {  // 1 x 1 blocks are their own transposes
      return cudaMemcpyAsync(out, in, elements * sizeof(E), cudaMemcpyDeviceToDevice, s);
    }
    if (bs == 8) TransposeSmallBlocks<E, 8><<<grid, 256, 0, s>>>(in, out, elements);
    if (bs == 16) TransposeSmallBlocks<E, 16><<<grid, 256, 0, s>>>(in, out, elements);
  }
  return cudaGetLastError();
}

}  // namespace

int LaunchTransposeBlocks(DType dtype, const void* w, void* w_t, int64_t blocks, int64_t bs,
                          CUstream_st* stream) {
  if (blocks < 0 || blocks > INT32_MAX || !IsSupportedBlockSize(bs)) return cudaErrorInvalidValue;
  if (blocks == 0) return cudaSuccess;
  if (!w || !w_t) return cudaErrorInvalidValue;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return TransposeBlocksTyped<uint32_t>(w, w_t, blocks, bs, s);
    case DType::kFloat16:
    case DType::kBFloat16: return TransposeBlocksTyped<uint16_t>(w, w_t, blocks, bs, s);
  }
  return cudaErrorInvalidValue;
}

namespace {
// w_transposed: w holds the transposes of the product's blocks, and transposed_copy room for
// a transposed copy of them where the kernel that runs cannot read them so.
int LaunchForwardImpl(DType dtype, const void* x, const void* w, void* y, int64_t N,
                      int feature_axis, const DeviceLayout& layout, CUstream_st* stream,
                      bool w_transposed, void* transposed_copy) {
  int e = CheckCommon(dtype, N, feature_axis, layout);
  if (e) return e;
  if (N == 0) return cudaSuccess;  // y is empty
  if (!x || !y || !layout.col_ptr) return cudaErrorInvalidValue;
  if (layout.blocks > 0 && (!w || !layout.col_row || !layout.col_block))
    return cudaErrorInvalidValue;
  if (w_transposed && layout.blocks > 0 && !transposed_copy) return cudaErrorInvalidValue;
  DeviceInfo di;
  int device = 0;
  if ((e = GetDeviceInfo(&di, &device))) return e;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  auto run = [&](const void* weights, bool transposed) {
    switch (dtype) {
      case DType::kFloat32:
        return ForwardTyped<float>(x, weights, y, N, feature_axis, layout, device, di, s, dtype,
                                   transposed);
      case DType::kFloat16:
        return ForwardTyped<__half>(x, weights, y, N, feature_axis, layout, device, di, s,
                                    dtype, transposed);
      case DType::kBFloat16:
        return ForwardTyped<__nv_bfloat16>(x, weights, y, N, feature_axis, layout, device, di,
                                           s, dtype, transposed);
    }
    return static_cast<int>(cudaErrorInvalidValue);
  };
  e = run(w, w_transposed);
  if (e != internal::kNeedsTransposedCopy) return e;
  if ((e = LaunchTransposeBlocks(dtype, w, transposed_copy, layout.blocks, layout.block_size,
                                 stream)))
    return e;
  return run(transposed_copy, false);
}
}  // namespace

int LaunchForward(DType dtype, const void* x, const void* w, void* y, int64_t N,
                  int feature_axis, const DeviceLayout& layout, CUstream_st* stream) {
  return LaunchForwardImpl(dtype, x, w, y, N, feature_axis, layout, stream, false, nullptr);
}

int LaunchForwardTransposedW(DType dtype, const void* x, const void* w, void* y, int64_t N,
                             int feature_axis, const DeviceLayout& layout, void* workspace,
                             CUstream_st* stream) {
  return LaunchForwardImpl(dtype, x, w, y, N, feature_axis, layout, stream, true, workspace);
}

int LaunchGradW(DType dtype, const void* x, const void* dy, void* dw, int64_t N,
                int feature_axis, const DeviceLayout& layout, CUstream_st* stream) {
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
  switch (dtype) {
    case DType::kFloat32: return GradWTyped<float>(x, dy, dw, N, feature_axis, layout, device, di, s, dtype);
    case DType::kFloat16: return GradWTyped<__half>(x, dy, dw, N, feature_axis, layout, device, di, s, dtype);
    case DType::kBFloat16: return GradWTyped<__nv_bfloat16>(x, dy, dw, N, feature_axis, layout, device, di, s, dtype);
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
