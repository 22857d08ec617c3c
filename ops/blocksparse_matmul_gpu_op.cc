// GPU kernels of BlocksparseMatmul and BlocksparseMatmulGradW (the ops are registered in
// blocksparse_matmul_ops.cc).  Built only with --config=cuda.
//
// The CUDA work lives in blocksparse_matmul_gpu*.cu behind a plain C++ interface; this file
// takes only the stream from TensorFlow (never device properties: TensorFlow's CUDA 12
// cudaDeviceProp differs in layout from the CUDA 13 headers we compile with).
#if GOOGLE_CUDA

#define EIGEN_USE_GPU

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "ops/block_layout.h"
#include "ops/blocksparse_matmul_gpu.h"
#include "ops/blocksparse_matmul_op_base.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace blocksparse {
namespace {

using ::tensorflow::DEVICE_GPU;

CUstream_st* TfCudaStream(OpKernelContext* ctx) {
  return ctx->eigen_device<Eigen::GpuDevice>().stream();
}

template <typename T> constexpr gpu::DType kDType = gpu::DType::kFloat32;
template <> constexpr gpu::DType kDType<Eigen::half> = gpu::DType::kFloat16;
template <> constexpr gpu::DType kDType<Eigen::bfloat16> = gpu::DType::kBFloat16;

absl::Status CudaStatus(int code, const char* what) {
  if (code == 0) return absl::OkStatus();
  return absl::InternalError(std::string(what) + " failed: " + gpu::ErrorString(code));
}

// Copies the layout tables into one device buffer (kept alive by *storage) and points a
// DeviceLayout at it.  cudaMemcpyAsync from pageable memory returns once the host data has
// been staged, so the host vector may go right after.
absl::Status UploadLayout(OpKernelContext* ctx, const BlockLayout& l, Tensor* storage,
                          gpu::DeviceLayout* out) {
  std::vector<int32_t> packed;
  packed.reserve(l.col_ptr.size() + 4 * l.blocks);
  for (const auto* table : {&l.col_ptr, &l.col_row, &l.col_block, &l.block_row, &l.block_col}) {
    packed.insert(packed.end(), table->begin(), table->end());
  }
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_INT32,
                                        TensorShape({(int64_t)packed.size()}), storage));
  int32_t* d = storage->flat<int32_t>().data();
  TF_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(d, packed.data(), packed.size() * sizeof(int32_t),
                                                cudaMemcpyHostToDevice, TfCudaStream(ctx)),
                                "copying the layout to the GPU"));
  out->col_ptr = d;
  out->col_row = out->col_ptr + l.col_ptr.size();
  out->col_block = out->col_row + l.blocks;
  out->block_row = out->col_block + l.blocks;
  out->block_col = out->block_row + l.blocks;
  out->CB = l.CB;
  out->KB = l.KB;
  out->block_size = l.block_size;
  out->blocks = l.blocks;
  return absl::OkStatus();
}

template <typename T>
class BlocksparseMatmulGpuOp : public BlocksparseOpBase {
 public:
  using BlocksparseOpBase::BlocksparseOpBase;

  void Compute(OpKernelContext* ctx) override {
    BlockLayout layout;
    int64_t N;
    Tensor* y;
    OP_REQUIRES_OK(ctx, PrepareForward(ctx, &layout, &N, &y));
    if (N == 0) return;
    Tensor storage;
    gpu::DeviceLayout device_layout;
    OP_REQUIRES_OK(ctx, UploadLayout(ctx, layout, &storage, &device_layout));
    OP_REQUIRES_OK(ctx, CudaStatus(gpu::LaunchForward(kDType<T>, ctx->input(0).data(),
                                                      ctx->input(1).data(), y->data(), N,
                                                      feature_axis_, device_layout,
                                                      TfCudaStream(ctx)),
                                   "BlocksparseMatmul"));
  }
};

template <typename T>
class BlocksparseMatmulGradWGpuOp : public BlocksparseOpBase {
 public:
  using BlocksparseOpBase::BlocksparseOpBase;

  void Compute(OpKernelContext* ctx) override {
    BlockLayout layout;
    int64_t N;
    Tensor* dw;
    OP_REQUIRES_OK(ctx, PrepareGradW(ctx, &layout, &N, &dw));
    Tensor storage;
    gpu::DeviceLayout device_layout;
    OP_REQUIRES_OK(ctx, UploadLayout(ctx, layout, &storage, &device_layout));
    OP_REQUIRES_OK(ctx, CudaStatus(gpu::LaunchGradW(kDType<T>, ctx->input(0).data(),
                                                    ctx->input(1).data(), dw->data(), N,
                                                    feature_axis_, device_layout,
                                                    TfCudaStream(ctx)),
                                   "BlocksparseMatmulGradW"));
  }
};

#define REGISTER_GPU(T)                                                                   \
  REGISTER_KERNEL_BUILDER(Name("BlocksparseMatmul")                                       \
                              .Device(DEVICE_GPU)                                         \
                              .TypeConstraint<T>("T")                                     \
                              .HostMemory("layout"),                                      \
                          BlocksparseMatmulGpuOp<T>);                                     \
  REGISTER_KERNEL_BUILDER(Name("BlocksparseMatmulGradW")                                  \
                              .Device(DEVICE_GPU)                                         \
                              .TypeConstraint<T>("T")                                     \
                              .HostMemory("layout"),                                      \
                          BlocksparseMatmulGradWGpuOp<T>);

REGISTER_GPU(float);
REGISTER_GPU(Eigen::half);
REGISTER_GPU(Eigen::bfloat16);

}  // namespace
}  // namespace blocksparse

#endif  // GOOGLE_CUDA
