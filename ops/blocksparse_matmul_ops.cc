// TensorFlow registration of the block-sparse matrix product and its weight gradient.
//
//   BlocksparseMatmul:      y = x . W, or with transpose_w y = x . W^T (the input gradient)
//   BlocksparseMatmulGradW: dw = x^T . dy        for the stored blocks only
//
// W (C x K) is given by w (blocks, bs, bs) and `layout` (blocks, 2): block b sits at block row
// layout[b, 0] and block column layout[b, 1].  The Python wrapper (blocksparse_tf/matmul.py)
// registers the gradients.

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>

#include "ops/block_layout.h"
#include "ops/blocksparse_matmul_amx.h"
#include "ops/blocksparse_matmul_cpu.h"
#include "ops/blocksparse_matmul_op_base.h"
#include "ops/cpu_kernel_util.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"

namespace blocksparse {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// Shape of x with its feature dimension (last for feature_axis 1, first for 0) checked against C.
absl::Status FeatureShape(InferenceContext* c, int input, int64_t features, int feature_axis,
                          int64_t out_features, ShapeHandle* out) {
  ShapeHandle x = c->input(input);
  if (feature_axis == 1) {
    TF_RETURN_IF_ERROR(c->WithRankAtLeast(x, 2, &x));
    DimensionHandle last;
    TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, -1), c->MakeDim(features), &last));
    if (out_features < 0) return absl::OkStatus();
    return c->ReplaceDim(x, -1, c->MakeDim(out_features), out);
  }
  TF_RETURN_IF_ERROR(c->WithRank(x, 2, &x));
  DimensionHandle first;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(x, 0), c->MakeDim(features), &first));
  if (out_features < 0) return absl::OkStatus();
  return c->ReplaceDim(x, 0, c->MakeDim(out_features), out);
}

// x (input 0) and dy (input 1) of the weight gradient describe the same examples: their
// dimensions other than the feature dimension must agree (already checked for rank).
absl::Status BatchDimsAgree(InferenceContext* c, int feature_axis) {
  ShapeHandle x = c->input(0), dy = c->input(1), unused;
  if (feature_axis == 0) {
    DimensionHandle n;
    return c->Merge(c->Dim(x, 1), c->Dim(dy, 1), &n);
  }
  if (!c->RankKnown(x) || !c->RankKnown(dy)) return absl::OkStatus();
  ShapeHandle x_batch, dy_batch;
  TF_RETURN_IF_ERROR(c->Subshape(x, 0, -1, &x_batch));
  TF_RETURN_IF_ERROR(c->Subshape(dy, 0, -1, &dy_batch));
  return c->Merge(x_batch, dy_batch, &unused);
}

struct OpAttrs {
  int64_t block_size, C, K, feature_axis;
};

absl::Status GetAttrs(InferenceContext* c, OpAttrs* a) {
  TF_RETURN_IF_ERROR(c->GetAttr("block_size", &a->block_size));
  TF_RETURN_IF_ERROR(c->GetAttr("C", &a->C));
  TF_RETURN_IF_ERROR(c->GetAttr("K", &a->K));
  TF_RETURN_IF_ERROR(c->GetAttr("feature_axis", &a->feature_axis));
  return CheckAttrs(a->block_size, a->C, a->K, a->feature_axis);
}

// w is (blocks, bs, bs) and layout is (blocks, 2), with the same number of blocks.
absl::Status WeightShape(InferenceContext* c, int w_input, int layout_input, int64_t bs,
                         ShapeHandle* w_out) {
  ShapeHandle w, layout;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(w_input), 3, &w));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(layout_input), 2, &layout));
  DimensionHandle blocks, unused;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(w, 0), c->Dim(layout, 0), &blocks));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(w, 1), c->MakeDim(bs), &unused));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(w, 2), c->MakeDim(bs), &unused));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(layout, 1), c->MakeDim(2), &unused));
  *w_out = c->MakeShape({blocks, c->MakeDim(bs), c->MakeDim(bs)});
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("BlocksparseMatmul")
    .Input("x: T")
    .Input("w: T")
    .Input("layout: int32")
    .Output("y: T")
    .Attr("T: {float, half, bfloat16}")
    .Attr("block_size: int")
    .Attr("C: int")
    .Attr("K: int")
    .Attr("feature_axis: int = 1")
    .Attr("transpose_w: bool = false")
    .Attr("constant_layout: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      OpAttrs a;
      TF_RETURN_IF_ERROR(GetAttrs(c, &a));
      bool transpose_w;
      TF_RETURN_IF_ERROR(c->GetAttr("transpose_w", &transpose_w));
      ShapeHandle w, y;
      TF_RETURN_IF_ERROR(WeightShape(c, 1, 2, a.block_size, &w));
      TF_RETURN_IF_ERROR(FeatureShape(c, 0, transpose_w ? a.K : a.C, a.feature_axis,
                                      transpose_w ? a.C : a.K, &y));
      c->set_output(0, y);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Block-sparse product y = x . W, W of shape (C, K) stored as its nonzero (bs x bs) blocks.
feature_axis=1: x (..., C) -> y (..., K).  feature_axis=0: x (C, N) -> y (K, N).
transpose_w: y = x . W^T instead (x (..., K) -> y (..., C)), reading w as stored: the input
gradient dy . W^T with no transposed copy of w made beforehand.
constant_layout: the caller promises that the layout tensor's memory is never written while
the tensor lives (true of constants), so the kernel knows a layout it has seen by its address
instead of comparing every coordinate on each call.
)doc");

REGISTER_OP("BlocksparseMatmulGradW")
    .Input("x: T")
    .Input("dy: T")
    .Input("layout: int32")
    .Output("dw: T")
    .Attr("T: {float, half, bfloat16}")
    .Attr("block_size: int")
    .Attr("C: int")
    .Attr("K: int")
    .Attr("feature_axis: int = 1")
    .Attr("constant_layout: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      OpAttrs a;
      TF_RETURN_IF_ERROR(GetAttrs(c, &a));
      ShapeHandle unused, layout;
      TF_RETURN_IF_ERROR(FeatureShape(c, 0, a.C, a.feature_axis, -1, &unused));
      TF_RETURN_IF_ERROR(FeatureShape(c, 1, a.K, a.feature_axis, -1, &unused));
      TF_RETURN_IF_ERROR(BatchDimsAgree(c, a.feature_axis));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &layout));
      DimensionHandle pair;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(layout, 1), c->MakeDim(2), &pair));
      c->set_output(0, c->MakeShape({c->Dim(layout, 0), c->MakeDim(a.block_size),
                                     c->MakeDim(a.block_size)}));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Weight gradient of BlocksparseMatmul for the stored blocks only: dw[b] = x[:, c]^T . dy[:, k].
constant_layout: as BlocksparseMatmul's.
)doc");

namespace {

template <typename T>
class BlocksparseMatmulOp : public BlocksparseOpBase {
 public:
  using BlocksparseOpBase::BlocksparseOpBase;

  void Compute(OpKernelContext* ctx) override {
    std::shared_ptr<const BlockLayout> layout;
    int64_t N;
    Tensor* y;
    OP_REQUIRES_OK(ctx, PrepareForward(ctx, &layout, &N, &y));
    if (N == 0) return;
    const Tensor& x = ctx->input(0);
    const Tensor& w = ctx->input(1);
    if constexpr (std::is_same_v<T, Eigen::bfloat16>) {
      if (AmxBf16Serves(layout->block_size)) {
        RunProduct(ctx, [&](const ParallelFor& parallel_for, const ScratchAllocator& scratch) {
          return BlocksparseMatmulAmxBf16(HalfBits<T>(x), HalfBits<T>(w), HalfBits<T>(y),
                                          N, feature_axis_, *layout, parallel_for, scratch,
                                          transpose_w_);
        });
        return;
      }
    }
    Tensor x_scratch, w_scratch;
    const float* xf = AsFloat<T>(ctx, x, &x_scratch);
    const float* wf = AsFloat<T>(ctx, w, &w_scratch);
    if (!ctx->status().ok()) return;
    WriteAsT<T>(ctx, y, [&](float* yf) {
      RunProduct(ctx, [&](const ParallelFor& parallel_for, const ScratchAllocator& scratch) {
        return BlocksparseMatmulCpu(xf, wf, yf, N, feature_axis_, *layout, parallel_for,
                                    scratch, transpose_w_);
      });
    });
  }
};

template <typename T>
class BlocksparseMatmulGradWOp : public BlocksparseOpBase {
 public:
  using BlocksparseOpBase::BlocksparseOpBase;

  void Compute(OpKernelContext* ctx) override {
    std::shared_ptr<const BlockLayout> layout;
    int64_t N;
    Tensor* dw;
    OP_REQUIRES_OK(ctx, PrepareGradW(ctx, &layout, &N, &dw));
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    if constexpr (std::is_same_v<T, Eigen::bfloat16>) {
      if (AmxBf16Serves(layout->block_size)) {
        RunProduct(ctx, [&](const ParallelFor& parallel_for, const ScratchAllocator& scratch) {
          return BlocksparseMatmulGradWAmxBf16(HalfBits<T>(x), HalfBits<T>(dy), HalfBits<T>(dw),
                                               N, feature_axis_, *layout, parallel_for,
                                               scratch);
        });
        return;
      }
    }
    Tensor x_scratch, dy_scratch;
    const float* xf = AsFloat<T>(ctx, x, &x_scratch);
    const float* dyf = AsFloat<T>(ctx, dy, &dy_scratch);
    if (!ctx->status().ok()) return;
    WriteAsT<T>(ctx, dw, [&](float* dwf) {
      RunProduct(ctx, [&](const ParallelFor& parallel_for, const ScratchAllocator& scratch) {
        return BlocksparseMatmulGradWCpu(xf, dyf, dwf, N, feature_axis_, *layout, parallel_for,
                                         scratch);
      });
    });
  }
};

#define REGISTER_CPU(T)                                                                     \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("BlocksparseMatmul").Device(DEVICE_CPU).TypeConstraint<T>("T"),                  \
      BlocksparseMatmulOp<T>);                                                              \
  REGISTER_KERNEL_BUILDER(                                                                  \
      Name("BlocksparseMatmulGradW").Device(DEVICE_CPU).TypeConstraint<T>("T"),             \
      BlocksparseMatmulGradWOp<T>);

REGISTER_CPU(float);
REGISTER_CPU(Eigen::half);
REGISTER_CPU(Eigen::bfloat16);

}  // namespace
}  // namespace blocksparse

// For the tests (through ctypes): layout tables built so far, and alive now (how many, and their
// bytes with their coordinates), by every kernel of the library (LayoutCache).
extern "C" int64_t blocksparse_tf_layout_tables_built() {
  return blocksparse::g_layout_tables_built.load();
}
extern "C" int64_t blocksparse_tf_layout_tables_alive() {
  return blocksparse::g_layout_tables_alive.load();
}
extern "C" int64_t blocksparse_tf_layout_tables_bytes_alive() {
  return blocksparse::g_layout_table_bytes_alive.load();
}
