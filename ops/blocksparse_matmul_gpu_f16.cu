// Tensor-core kernels for __half (explicit instantiation; see blocksparse_matmul_gpu_dispatch.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ops/blocksparse_matmul_gpu_dispatch.cuh"

namespace blocksparse {
namespace gpu {
namespace internal {

template int ForwardMma<__half>(const mma_impl::Params&, int, int64_t, int64_t, int64_t, int64_t,
                             int, const DeviceInfo&, cudaStream_t, bool);
template int GradWMma<__half>(const mma_impl::Params&, int, int64_t, int64_t, int64_t, int,
                           const DeviceInfo&, cudaStream_t);

}  // namespace internal
}  // namespace gpu
}  // namespace blocksparse
