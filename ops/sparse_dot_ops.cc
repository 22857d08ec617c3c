// TensorFlow registration of BlocksparseSparseDot, the conditional-computation product
// (Bengio et al., "Conditional Computation in Neural Networks for faster models"):
//
//   y = (x * expand(in_mask)) . w * expand(out_mask)
//
// with per-example block masks; inactive blocks cost nothing.  The Python wrapper
// (blocksparse_tf/conditional.py) adds the bias and registers the gradients.

#include <cstdint>
#include <string>

#include "ops/cpu_kernel_util.h"
#include "ops/sparse_dot_cpu.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace blocksparse {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

std::string Shape(const Tensor& t) { return t.shape().DebugString(); }

}  // namespace

REGISTER_OP("BlocksparseSparseDot")
    .Input("x: T")
    .Input("w: T")
    .Input("in_mask: float")
    .Input("out_mask: float")
    .Output("y: T")
    .Attr("T: {float, half, bfloat16}")
    .Attr("block_size: int >= 1")
    .SetShapeFn([](InferenceContext* c) {
      int64_t bs;
      TF_RETURN_IF_ERROR(c->GetAttr("block_size", &bs));
      ShapeHandle x, w, in_mask, out_mask;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &w));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &in_mask));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &out_mask));
      DimensionHandle n, m, unused;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 0), c->Dim(in_mask, 0), &n));
      TF_RETURN_IF_ERROR(c->Merge(n, c->Dim(out_mask, 0), &n));
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 1), c->Dim(w, 0), &m));
      c->set_output(0, c->Matrix(n, c->Dim(w, 1)));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Per-example block-masked product y = (x * expand(in_mask)) . w * expand(out_mask).
x (n, m), w (m, p), in_mask (n, m / block_size), out_mask (n, p / block_size).
)doc");

namespace {

template <typename T>
class SparseDotOp : public OpKernel {
 public:
  explicit SparseDotOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_size_));
    OP_REQUIRES(ctx, IsSupportedBlockSize(block_size_),
                absl::InvalidArgumentError("block_size must be one of 1, 8, 16, 32, 64; got " +
                                           std::to_string(block_size_)));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& w = ctx->input(1);
    const Tensor& in_mask = ctx->input(2);
    const Tensor& out_mask = ctx->input(3);
    const int64_t bs = block_size_;
    OP_REQUIRES(ctx, x.dims() == 2 && w.dims() == 2 && x.dim_size(1) == w.dim_size(0),
                absl::InvalidArgumentError("x (n, m) and w (m, p) must be matrices with matching "
                                           "m; got x " + Shape(x) + " and w " + Shape(w)));
    const int64_t n = x.dim_size(0), m = x.dim_size(1), p = w.dim_size(1);
    OP_REQUIRES(ctx, m % bs == 0 && p % bs == 0,
                absl::InvalidArgumentError("block_size " + std::to_string(bs) +
                                           " must divide m and p; got x " + Shape(x) +
                                           " and w " + Shape(w)));
    OP_REQUIRES(ctx, in_mask.shape() == TensorShape({n, m / bs}),
                absl::InvalidArgumentError("in_mask must have shape (n, m / block_size) = (" +
                                           std::to_string(n) + ", " + std::to_string(m / bs) +
                                           "); got " + Shape(in_mask)));
    OP_REQUIRES(ctx, out_mask.shape() == TensorShape({n, p / bs}),
                absl::InvalidArgumentError("out_mask must have shape (n, p / block_size) = (" +
                                           std::to_string(n) + ", " + std::to_string(p / bs) +
                                           "); got " + Shape(out_mask)));
    OP_REQUIRES(ctx, n < INT32_MAX,
                absl::InvalidArgumentError("x has too many rows: " + Shape(x)));
    Tensor* y;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({n, p}), &y));
    if (n == 0 || p == 0) return;
    Tensor x_scratch, w_scratch;
    const float* xf = AsFloat<T>(ctx, x, &x_scratch);
    const float* wf = AsFloat<T>(ctx, w, &w_scratch);
    if (!ctx->status().ok()) return;
    WriteAsT<T>(ctx, y, [&](float* yf) {
      SparseDotCpu(xf, wf, in_mask.flat<float>().data(), out_mask.flat<float>().data(), yf, n, m,
                   p, bs, CpuParallelFor(ctx));
    });
  }

 private:
  int64_t block_size_;
};

#define REGISTER_CPU(T)                                                                   \
  REGISTER_KERNEL_BUILDER(Name("BlocksparseSparseDot").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
                          SparseDotOp<T>);

REGISTER_CPU(float);
REGISTER_CPU(Eigen::half);
REGISTER_CPU(Eigen::bfloat16);

}  // namespace
}  // namespace blocksparse
