// GPU kernels of BlocksparseMatmul and BlocksparseMatmulGradW (the ops are registered in
// blocksparse_matmul_ops.cc).  Built only with --config=cuda.
//
// The CUDA work lives in blocksparse_matmul_gpu*.cu behind a plain C++ interface; this file
// takes only the stream from TensorFlow (see gpu_op_util.h).
#if GOOGLE_CUDA

#define EIGEN_USE_GPU

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "ops/block_layout.h"
#include "ops/blocksparse_matmul_gpu.h"
#include "ops/blocksparse_matmul_op_base.h"
#include "ops/gpu_op_util.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace blocksparse {
namespace {

using ::tensorflow::DEVICE_GPU;

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

// The device tables of the last layout a kernel saw.  A layer's layout is normally the same
// on every call, so the tables are built on the host and copied to the GPU once, not per call.
// The cache is keyed by the layout's coordinates, compared in full.  Get() hands out a
// reference to the device buffer that the caller holds while it enqueues its kernels: if
// another call swaps in a new layout meanwhile, the old buffer is released only after this
// caller's launches are on the stream (TensorFlow's GPU allocator orders reuse on the stream).
class DeviceLayoutCache {
 public:
  template <typename Build>
  absl::Status Get(OpKernelContext* ctx, const Tensor& coords, const Build& build,
                   Tensor* storage, gpu::DeviceLayout* out) {
    const int32_t* begin = coords.flat<int32_t>().data();
    const int32_t* end = begin + coords.NumElements();
    std::lock_guard<std::mutex> lock(mu_);
    if (!valid_ || coords.shape() != shape_ || !std::equal(begin, end, key_.begin())) {
      BlockLayout layout;
      TF_RETURN_IF_ERROR(build(&layout));  // validates the coordinates
      Tensor fresh;
      gpu::DeviceLayout fresh_layout;
      TF_RETURN_IF_ERROR(UploadLayout(ctx, layout, &fresh, &fresh_layout));
      key_.assign(begin, end);
      shape_ = coords.shape();
      storage_ = fresh;
      layout_ = fresh_layout;
      valid_ = true;
    }
    *storage = storage_;
    *out = layout_;
    return absl::OkStatus();
  }

 private:
  std::mutex mu_;
  bool valid_ = false;
  TensorShape shape_;
  std::vector<int32_t> key_;
  Tensor storage_;
  gpu::DeviceLayout layout_;
};

template <typename T>
class BlocksparseMatmulGpuOp : public BlocksparseOpBase {
 public:
  using BlocksparseOpBase::BlocksparseOpBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& coords = ctx->input(2);
    Tensor storage;
    gpu::DeviceLayout device_layout;
    OP_REQUIRES_OK(ctx, cache_.Get(ctx, coords, [&](BlockLayout* l) { return BuildLayout(coords, l); },
                                   &storage, &device_layout));
    int64_t N;
    Tensor* y;
    OP_REQUIRES_OK(ctx, CheckForwardShapes(ctx, device_layout.blocks, &N, &y));
    if (N == 0) return;
    const Tensor& x = ctx->input(0);
    const Tensor& w = ctx->input(1);
    if (!transpose_w_) {
      OP_REQUIRES_OK(ctx, CudaStatus(gpu::LaunchForward(kDType<T>, x.data(), w.data(), y->data(),
                                                        N, feature_axis_, device_layout,
                                                        TfCudaStream(ctx)),
                                     "BlocksparseMatmul"));
      return;
    }
    // The layout is W^T's; the kernels read w's blocks transposed as stored.
    OP_REQUIRES_OK(ctx, CudaStatus(gpu::LaunchForwardTransposedW(
                                       kDType<T>, x.data(), w.data(), y->data(), N,
                                       feature_axis_, device_layout, TfCudaStream(ctx)),
                                   "BlocksparseMatmul (transpose_w)"));
  }

 private:
  DeviceLayoutCache cache_;
};

template <typename T>
class BlocksparseMatmulGradWGpuOp : public BlocksparseOpBase {
 public:
  using BlocksparseOpBase::BlocksparseOpBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& coords = ctx->input(2);
    Tensor storage;
    gpu::DeviceLayout device_layout;
    OP_REQUIRES_OK(ctx, cache_.Get(ctx, coords, [&](BlockLayout* l) { return BuildLayout(coords, l); },
                                   &storage, &device_layout));
    int64_t N;
    Tensor* dw;
    OP_REQUIRES_OK(ctx, CheckGradWShapes(ctx, device_layout.blocks, &N, &dw));
    OP_REQUIRES_OK(ctx, CudaStatus(gpu::LaunchGradW(kDType<T>, ctx->input(0).data(),
                                                    ctx->input(1).data(), dw->data(), N,
                                                    feature_axis_, device_layout,
                                                    TfCudaStream(ctx)),
                                   "BlocksparseMatmulGradW"));
  }

 private:
  DeviceLayoutCache cache_;
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
