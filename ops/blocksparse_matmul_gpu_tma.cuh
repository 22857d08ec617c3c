// Hopper's copy engine (TMA): 2-D tile copies from global into swizzled shared memory that
// complete on an mbarrier, for the small-batch wgmma forward (blocksparse_matmul_gpu_wgmma.cuh).
//
// Why: at N <= 64 the forward streams the weights, and its cp.async copies (16 bytes per
// thread and instruction, through the load/store unit) kept too few bytes in flight per SM:
// Nsight Compute on an H200 (bf16, bs 64, 100% density, N = 64) showed DRAM at 43% of peak
// with instruction issue at 17% and most warp cycles waiting.  One copy-engine instruction
// moves a whole x tile or weight block and needs no thread until it lands.
//
// Host side: a tensor map describes a row-major 2-D array and the box a copy moves; it is
// encoded by the driver's cuTensorMapEncodeTiled, fetched at run time through the runtime (so
// nothing links against the driver library), and passed to the kernel inside Params.
#ifndef BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_TMA_CUH_
#define BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_TMA_CUH_

#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <cstring>

namespace blocksparse {
namespace gpu {
namespace tma {

// A CUtensorMap (the driver's opaque 128-byte tensor-map type) as a kernel parameter: the copy
// engine reads it on a 64-byte boundary (CUDA 13's CUtensorMap asks 128 on the host, where the
// encoder fills an aligned one).
struct alignas(64) TensorMap {
  uint64_t words[16];
};
static_assert(sizeof(TensorMap) == sizeof(CUtensorMap) && alignof(TensorMap) >= 64,
              "TensorMap holds a CUtensorMap");

// ---- host ----
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's encoder, or null where the driver lacks it (callers then keep cp.async); looked
// up once per process.
inline EncodeTiledFn EncodeTiled() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000,
                                                           cudaEnableDefault, &found);
    if (e == cudaSuccess && found == cudaDriverEntryPointSuccess && f)
      return reinterpret_cast<EncodeTiledFn>(f);
    cudaGetLastError();  // clear the lookup's error, if any
    return static_cast<EncodeTiledFn>(nullptr);
  }();
  return fn;
}

// A map of the 16-bit row-major array base[outer][inner] (rows row_bytes apart, a multiple of
// 16; base 16-byte aligned) whose copies move box_outer x box_inner tiles into shared memory
// rows of box_inner elements in the swizzle of that many bytes (32, 64 or 128).  Rows and
// columns past the array's end arrive as zeros.  False if the driver refuses it.
inline bool EncodeTiles16(TensorMap* map, bool bf16, const void* base, uint64_t inner,
                          uint64_t outer, uint64_t row_bytes, uint32_t box_inner,
                          uint32_t box_outer) {
  const EncodeTiledFn encode = EncodeTiled();
  if (!encode) return false;
  const uint32_t swizzle_bytes = box_inner * 2;
  const CUtensorMapSwizzle swizzle = swizzle_bytes == 128  ? CU_TENSOR_MAP_SWIZZLE_128B
                                     : swizzle_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                     : swizzle_bytes == 32 ? CU_TENSOR_MAP_SWIZZLE_32B
                                                           : CU_TENSOR_MAP_SWIZZLE_NONE;
  if (swizzle == CU_TENSOR_MAP_SWIZZLE_NONE) return false;
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {row_bytes};
  const cuuint32_t box[2] = {box_inner, box_outer};
  const cuuint32_t element_strides[2] = {1, 1};
  CUtensorMap encoded;
  if (encode(&encoded, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
             2, const_cast<void*>(base), dims, strides, box, element_strides,
             CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
    return false;
  std::memcpy(map, &encoded, sizeof(encoded));
  return true;
}

// ---- device (sm_90) ----
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define BSMM_HAS_TMA 1
#else
#define BSMM_HAS_TMA 0
#endif

// An mbarrier (8 bytes of shared memory at address bar) expecting `count` arrivals per phase.
__device__ __forceinline__ void MbarInit(uint32_t bar, int count) {
#if BSMM_HAS_TMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
// Makes the initialised barriers visible to the copy engine and the other threads.
__device__ __forceinline__ void FenceMbarInit() {
#if BSMM_HAS_TMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// One arrival that also announces `bytes` more to come from copies completing on bar.
__device__ __forceinline__ void MbarArriveExpectTx(uint32_t bar, uint32_t bytes) {
#if BSMM_HAS_TMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
#if BSMM_HAS_TMA
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}
// Whether the phase of parity `parity` has completed (without waiting).
__device__ __forceinline__ bool MbarTestWait(uint32_t bar, uint32_t parity) {
#if BSMM_HAS_TMA
  uint32_t done = 0;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
#else
  return false;
#endif
}
// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
#if BSMM_HAS_TMA
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
#endif
}
// A pipeline's barriers at bars: full[i] (one arrival, the copy warp's, plus the stage's
// bytes) at bars + 8 i, empty[i] (one arrival per consuming warp) at bars + 8 (stages + i).
// Called by thread 0 before a barrier of the whole CTA.
__device__ __forceinline__ void InitStageBarriers(uint32_t bars, int stages, int consumer_warps) {
  for (int i = 0; i < stages; ++i) {
    MbarInit(bars + 8 * i, 1);
    MbarInit(bars + 8 * (stages + i), consumer_warps);
  }
  FenceMbarInit();
}
// Starts fetching the tensor map at `map` (a kernel parameter) before its first copy.
__device__ __forceinline__ void PrefetchTensorMap(const TensorMap* map) {
#if BSMM_HAS_TMA
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#endif
}
// Copies the box at element coordinates (inner, outer) of `map` to shared memory at dst
// (aligned to the swizzle's repeat: 1024 bytes serve all), completing on bar.
__device__ __forceinline__ void CopyTile2D(uint32_t dst, const TensorMap* map, int inner,
                                           int outer, uint32_t bar) {
#if BSMM_HAS_TMA
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(inner), "r"(outer), "r"(bar)
      : "memory");
#endif
}

}  // namespace tma
}  // namespace gpu
}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_TMA_CUH_
