// Internal declarations shared by the CUDA translation units of the block-sparse products
// (not part of the public interface; see blocksparse_matmul_gpu.h).
#ifndef BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_INTERNAL_CUH_
#define BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_INTERNAL_CUH_

#include <cuda_runtime.h>
#include <stdint.h>

#include "ops/block_layout.h"
#include "ops/blocksparse_matmul_gpu_mma.cuh"

namespace blocksparse {
namespace gpu {
namespace internal {

// Device attributes, queried with cudaDeviceGetAttribute once per device.
struct DeviceInfo {
  int sm_count = 0, cc_major = 0, cc_minor = 0, max_smem_optin = 0, l2_bytes = 0;
};

// The least shared memory a CTA may opt in to among the GPUs the kernels are built for:
// compute capability 8.6, 8.9 and 12.x allow 99 KiB (8.0 163 KiB, 9.0 227 KiB).
constexpr int kSmallestSmemOptin = 99 * 1024;

// Tile-configuration variant for benchmarking (0 = default); see SetTuning in the header.
int Tuning();

// The current device (into *device) and its attributes, queried once per device; under
// SetTuning(19) those of a compute capability 8.6 GPU.  cudaErrorNoKernelImageForDevice below
// compute capability 8.0.
int GetDeviceInfo(DeviceInfo* out, int* device);

// Whether the 16-bit products may run on Hopper's wgmma kernels (SetTuning 1-4 turn them off).
inline bool WgmmaEnabled(const DeviceInfo& di) {
  return (Tuning() == 0 || Tuning() >= 5) && di.cc_major == 9;
}

// The default's rule for the 16-bit bs-32 forward over groups of four block columns (feature
// axis 1, Hopper; measurements at LaunchWgmmaForwardGrouped in the dispatch): the batch has at
// least kGroupedMinBatch rows and the groups read at most kGroupedMaxRowsPerBlock x tiles per
// stored block.  That count (ColumnGroupRows) is `counted_rows` where the layout's owner
// counted it (-1: not), else counted here from the host copies of the column view; false
// without either.
constexpr double kGroupedMaxRowsPerBlock = 0.42;
constexpr int64_t kGroupedMinBatch = 1000;
inline bool GroupedRuleHolds(int64_t N, int64_t CB, int64_t KB, int64_t blocks,
                             int64_t counted_rows, const int32_t* host_col_ptr,
                             const int32_t* host_col_row) {
  if (N < kGroupedMinBatch) return false;
  const bool counted = counted_rows >= 0;
  if (!counted && (host_col_ptr == nullptr || host_col_row == nullptr)) return false;
  const int64_t rows =
      counted ? counted_rows : ColumnGroupRows(host_col_ptr, host_col_row, CB, KB, blocks, 4);
  return rows >= 0 &&
         static_cast<double>(rows) <= kGroupedMaxRowsPerBlock * static_cast<double>(blocks);
}

// Tensor-core launches, one explicit instantiation per element type (float, __half,
// __nv_bfloat16) in blocksparse_matmul_gpu_{f32,f16,bf16}.cu.  `blocks` is the number of
// stored blocks (forward uses it to size the split over clusters).
// With w_transposed, p.w holds the transposes of the product's blocks, and every kernel reads
// them so (the same sums as on a transposed copy).
template <typename T>
int ForwardMma(const mma_impl::Params& p, int feature_axis, int64_t N, int64_t bs, int64_t KB,
               int64_t blocks, int device, const DeviceInfo& di, cudaStream_t stream,
               bool w_transposed = false);
template <typename T>
int GradWMma(const mma_impl::Params& p, int feature_axis, int64_t N, int64_t bs,
             int64_t blocks, int device, const DeviceInfo& di, cudaStream_t stream);

}  // namespace internal
}  // namespace gpu
}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_INTERNAL_CUH_
