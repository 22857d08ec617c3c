// GPU kernels of BlocksparseSparseDot and BlocksparseSparseDotGradW (the ops are registered in
// sparse_dot_ops.cc).  Built only with --config=cuda.  The CUDA work lives in sparse_dot_gpu.cu
// behind a plain C++ interface; this file checks the inputs (the same checks as the CPU
// kernels), allocates the example-list workspace and takes the stream from TensorFlow.
#if GOOGLE_CUDA

#define EIGEN_USE_GPU

#include <cstdint>
#include <string>

#include "ops/gpu_op_util.h"
#include "ops/sparse_dot_gpu.h"
#include "ops/sparse_dot_op_base.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace blocksparse {
namespace {

using ::tensorflow::DEVICE_GPU;

// Device scratch for the per-tile-column example lists of n examples and p output features.
absl::Status Workspace(OpKernelContext* ctx, int64_t n, int64_t p, int64_t bs, Tensor* ws) {
  const int64_t bytes = gpu::SparseDotWorkspaceBytes(n, p, bs);
  return ctx->allocate_temp(tensorflow::DT_INT8, TensorShape({bytes > 0 ? bytes : 1}), ws);
}

template <typename T>
class SparseDotGpuOp : public SparseDotKernelBase {
 public:
  explicit SparseDotGpuOp(OpKernelConstruction* ctx) : SparseDotKernelBase(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_w", &transpose_w_));
  }

  void Compute(OpKernelContext* ctx) override {
    SparseDotSizes sz;
    Tensor* y;
    OP_REQUIRES_OK(ctx, PrepareForward(ctx, transpose_w_, &sz, &y));
    if (sz.n == 0 || sz.p == 0) return;
    Tensor ws;
    OP_REQUIRES_OK(ctx, Workspace(ctx, sz.n, sz.p, block_size_, &ws));
    OP_REQUIRES_OK(ctx, CudaStatus(gpu::LaunchSparseDot(
                                         kDType<T>, ctx->input(0).data(), ctx->input(1).data(),
                                         InMask(ctx), OutMask(ctx), y->data(), sz.n, sz.m,
                                         sz.p, block_size_, transpose_w_, ws.data(),
                                         ws.NumElements(), TfCudaStream(ctx)),
                                     "BlocksparseSparseDot GPU kernel"));
  }

 private:
  bool transpose_w_;
};

template <typename T>
class SparseDotGradWGpuOp : public SparseDotKernelBase {
 public:
  using SparseDotKernelBase::SparseDotKernelBase;

  void Compute(OpKernelContext* ctx) override {
    SparseDotSizes sz;
    Tensor* dw;
    OP_REQUIRES_OK(ctx, PrepareGradW(ctx, &sz, &dw));
    if (sz.m == 0 || sz.p == 0) return;
    Tensor ws;
    OP_REQUIRES_OK(ctx, Workspace(ctx, sz.n, sz.p, block_size_, &ws));
    OP_REQUIRES_OK(ctx, CudaStatus(gpu::LaunchSparseDotGradW(
                                         kDType<T>, ctx->input(0).data(), ctx->input(1).data(),
                                         InMask(ctx), OutMask(ctx), dw->data(), sz.n,
                                         sz.m, sz.p, block_size_, ws.data(), ws.NumElements(),
                                         TfCudaStream(ctx)),
                                     "BlocksparseSparseDotGradW GPU kernel"));
  }
};

#define REGISTER_GPU(T)                                                                      \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("BlocksparseSparseDot").Device(DEVICE_GPU).TypeConstraint<T>("T"),               \
      SparseDotGpuOp<T>);                                                                    \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("BlocksparseSparseDotGradW").Device(DEVICE_GPU).TypeConstraint<T>("T"),           \
      SparseDotGradWGpuOp<T>);

REGISTER_GPU(float);
REGISTER_GPU(Eigen::half);
REGISTER_GPU(Eigen::bfloat16);

}  // namespace
}  // namespace blocksparse

#endif  // GOOGLE_CUDA
