// TensorFlow registration of BlocksparseSparseDot, the conditional-computation product
// (Bengio et al., "Conditional Computation in Neural Networks for faster models"):
//
//   y = (x * expand(in_mask)) . w * expand(out_mask)
//
// with per-example block masks (an entry is 1 where nonzero, NaN included, and 0 where zero;
// inactive blocks cost nothing); and of its weight gradient BlocksparseSparseDotGradW,
// dw = (x * expand(in_mask))^T . (dy * expand(out_mask)), over the same active blocks.  The
// Python wrapper (blocksparse_tf/conditional.py) adds the bias and registers the gradients.

#include <cstdint>
#include <string>

#include "ops/cpu_kernel_util.h"
#include "ops/sparse_dot_cpu.h"
#include "ops/sparse_dot_op_base.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace blocksparse {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Shape function check: mask is (n, features / bs), with bs dividing features.
absl::Status CheckMaskShape(InferenceContext* c, int mask_input, DimensionHandle features,
                            int64_t bs, DimensionHandle* n) {
  ShapeHandle mask;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(mask_input), 2, &mask));
  TF_RETURN_IF_ERROR(c->Merge(*n, c->Dim(mask, 0), n));
  DimensionHandle blocks, unused;
  TF_RETURN_IF_ERROR(c->Divide(features, bs, /*evenly_divisible=*/true, &blocks));
  return c->Merge(blocks, c->Dim(mask, 1), &unused);
}

// Runs fn(a, b, out) on float32 views of a and b (copies when T is half or bfloat16), writing
// the float32 result into out (of T).
template <typename T, typename Fn>
void InFloat32(OpKernelContext* ctx, const Tensor& a, const Tensor& b, Tensor* out, Fn&& fn) {
  Tensor a_scratch, b_scratch;
  const float* af = AsFloat<T>(ctx, a, &a_scratch);
  const float* bf = AsFloat<T>(ctx, b, &b_scratch);
  if (!ctx->status().ok()) return;
  WriteAsT<T>(ctx, out, [&](float* of) { fn(af, bf, of); });
}

}  // namespace

REGISTER_OP("BlocksparseSparseDot")
    .Input("x: T")
    .Input("w: T")
    .Input("in_mask: float")
    .Input("out_mask: float")
    .Output("y: T")
    .Attr("T: {float, half, bfloat16}")
    .Attr("block_size: int >= 1")
    .Attr("transpose_w: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      int64_t bs;
      bool transpose_w;
      TF_RETURN_IF_ERROR(c->GetAttr("block_size", &bs));
      TF_RETURN_IF_ERROR(CheckBlockSize(bs));
      TF_RETURN_IF_ERROR(c->GetAttr("transpose_w", &transpose_w));
      ShapeHandle x, w;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &w));
      DimensionHandle n = c->Dim(x, 0), m;
      const DimensionHandle p = c->Dim(w, transpose_w ? 0 : 1);
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 1), c->Dim(w, transpose_w ? 1 : 0), &m));
      TF_RETURN_IF_ERROR(CheckMaskShape(c, 2, m, bs, &n));
      TF_RETURN_IF_ERROR(CheckMaskShape(c, 3, p, bs, &n));
      c->set_output(0, c->Matrix(n, p));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Per-example block-masked product y = (x * expand(in_mask)) . W * expand(out_mask), a mask
entry counting as 1 where nonzero (NaN included) and 0 where zero.
x (n, m), in_mask (n, m / block_size), out_mask (n, p / block_size); W is w (m, p), or w^T for
w (p, m) when transpose_w.
)doc");

REGISTER_OP("BlocksparseSparseDotGradW")
    .Input("x: T")
    .Input("dy: T")
    .Input("in_mask: float")
    .Input("out_mask: float")
    .Output("dw: T")
    .Attr("T: {float, half, bfloat16}")
    .Attr("block_size: int >= 1")
    .SetShapeFn([](InferenceContext* c) {
      int64_t bs;
      TF_RETURN_IF_ERROR(c->GetAttr("block_size", &bs));
      TF_RETURN_IF_ERROR(CheckBlockSize(bs));
      ShapeHandle x, dy;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &dy));
      DimensionHandle n;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 0), c->Dim(dy, 0), &n));
      TF_RETURN_IF_ERROR(CheckMaskShape(c, 2, c->Dim(x, 1), bs, &n));
      TF_RETURN_IF_ERROR(CheckMaskShape(c, 3, c->Dim(dy, 1), bs, &n));
      c->set_output(0, c->Matrix(c->Dim(x, 1), c->Dim(dy, 1)));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Weight gradient of BlocksparseSparseDot: dw = (x * expand(in_mask))^T . (dy * expand(out_mask)),
summed only over the examples active in both masks of each block; x (n, m), dy (n, p),
in_mask (n, m / block_size), out_mask (n, p / block_size), dw (m, p).
)doc");

namespace {

template <typename T>
class SparseDotOp : public SparseDotKernelBase {
 public:
  explicit SparseDotOp(OpKernelConstruction* ctx) : SparseDotKernelBase(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_w", &transpose_w_));
  }

  void Compute(OpKernelContext* ctx) override {
    SparseDotSizes sz;
    Tensor* y;
    OP_REQUIRES_OK(ctx, PrepareForward(ctx, transpose_w_, &sz, &y));
    const int64_t n = sz.n, m = sz.m, p = sz.p;
    if (n == 0 || p == 0) return;
    InFloat32<T>(ctx, ctx->input(0), ctx->input(1), y, [&](const float* xf, const float* wf, float* yf) {
      RunProduct(ctx, [&](const ParallelFor& parallel_for, const ScratchAllocator&) {
        SparseDotCpu(xf, wf, InMask(ctx), OutMask(ctx), yf, n, m, p, block_size_, transpose_w_,
                     ctx->device()->tensorflow_cpu_worker_threads()->num_threads, parallel_for);
        return true;
      });
    });
  }

 private:
  bool transpose_w_;
};

template <typename T>
class SparseDotGradWOp : public SparseDotKernelBase {
 public:
  using SparseDotKernelBase::SparseDotKernelBase;

  void Compute(OpKernelContext* ctx) override {
    SparseDotSizes sz;
    Tensor* dw;
    OP_REQUIRES_OK(ctx, PrepareGradW(ctx, &sz, &dw));
    const int64_t n = sz.n, m = sz.m, p = sz.p;
    if (m == 0 || p == 0) return;
    InFloat32<T>(ctx, ctx->input(0), ctx->input(1), dw, [&](const float* xf, const float* dyf, float* dwf) {
      RunProduct(ctx, [&](const ParallelFor& parallel_for, const ScratchAllocator&) {
        SparseDotGradWCpu(xf, dyf, InMask(ctx), OutMask(ctx), dwf, n, m, p, block_size_,
                          parallel_for);
        return true;
      });
    });
  }
};

#define REGISTER_CPU(T)                                                                        \
  REGISTER_KERNEL_BUILDER(                                                                     \
      Name("BlocksparseSparseDot").Device(DEVICE_CPU).TypeConstraint<T>("T"), SparseDotOp<T>); \
  REGISTER_KERNEL_BUILDER(                                                                     \
      Name("BlocksparseSparseDotGradW").Device(DEVICE_CPU).TypeConstraint<T>("T"),             \
      SparseDotGradWOp<T>);

REGISTER_CPU(float);
REGISTER_CPU(Eigen::half);
REGISTER_CPU(Eigen::bfloat16);

}  // namespace
}  // namespace blocksparse
