// TensorFlow registration of the block-sparse 2-D convolution (NHWC, CPU):
//
//   BlocksparseConv2D:            y  = conv(x, W)
//   BlocksparseConv2DGradInput:   dx = the input gradient of conv for dy
//   BlocksparseConv2DGradKernel:  dw = the kernel gradient for x and dy, stored blocks only
//
// W (kh, kw, C, K) has the channel layout `layout` (blocks, 2) at every tap and is stored as
// w (blocks, kh, kw, bs, bs).  Padding is explicit, [top, bottom, left, right] (the Python
// wrapper computes SAME and VALID amounts).  The gradients are registered in
// blocksparse_tf/conv.py.

#include <cstdint>
#include <string>
#include <vector>

#include "ops/block_layout.h"
#include "ops/blocksparse_conv_cpu.h"
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

// The attributes every op of the family has.
struct ConvAttrs {
  int64_t block_size = 0, C = 0, K = 0;
  std::vector<int64_t> strides, dilations, padding;
};

std::string Join(const std::vector<int64_t>& values) {
  std::string s = "[";
  for (size_t i = 0; i < values.size(); ++i) s += (i ? ", " : "") + std::to_string(values[i]);
  return s + "]";
}

absl::Status CheckConvAttrs(const ConvAttrs& a) {
  TF_RETURN_IF_ERROR(CheckAttrs(a.block_size, a.C, a.K, /*feature_axis=*/1));
  const auto all_at_least = [](const std::vector<int64_t>& v, int64_t least) {
    for (int64_t e : v) if (e < least) return false;
    return true;
  };
  if (a.strides.size() != 2 || !all_at_least(a.strides, 1)) {
    return absl::InvalidArgumentError("strides must be 2 positive integers (height, width); got " +
                                      Join(a.strides));
  }
  if (a.dilations.size() != 2 || !all_at_least(a.dilations, 1)) {
    return absl::InvalidArgumentError(
        "dilations must be 2 positive integers (height, width); got " + Join(a.dilations));
  }
  if (a.padding.size() != 4 || !all_at_least(a.padding, 0)) {
    return absl::InvalidArgumentError(
        "padding must be 4 non-negative integers (top, bottom, left, right); got " +
        Join(a.padding));
  }
  return absl::OkStatus();
}

template <typename Context>
absl::Status ReadConvAttrs(Context* c, ConvAttrs* a) {
  TF_RETURN_IF_ERROR(c->GetAttr("block_size", &a->block_size));
  TF_RETURN_IF_ERROR(c->GetAttr("C", &a->C));
  TF_RETURN_IF_ERROR(c->GetAttr("K", &a->K));
  TF_RETURN_IF_ERROR(c->GetAttr("strides", &a->strides));
  TF_RETURN_IF_ERROR(c->GetAttr("dilations", &a->dilations));
  TF_RETURN_IF_ERROR(c->GetAttr("padding", &a->padding));
  return CheckConvAttrs(*a);
}

// One output dimension for the shape functions: unknown stays unknown.
absl::Status OutputDim(InferenceContext* c, DimensionHandle in, int64_t kernel, int64_t stride,
                       int64_t dilation, int64_t before, int64_t after, DimensionHandle* out) {
  if (!c->ValueKnown(in) || kernel < 0) {
    *out = c->UnknownDim();
    return absl::OkStatus();
  }
  const int64_t size = ConvOutputSize(c->Value(in), kernel, stride, dilation, before, after);
  if (size < 1) {
    return absl::InvalidArgumentError("the padded input is smaller than the dilated kernel");
  }
  *out = c->MakeDim(size);
  return absl::OkStatus();
}

// (N, Ho, Wo, K) for an NHWC input shape and kernel (kh, kw); kernel sizes < 0 are unknown.
absl::Status OutputShape(InferenceContext* c, ShapeHandle x, const ConvAttrs& a, int64_t kh,
                         int64_t kw, ShapeHandle* y) {
  DimensionHandle ho, wo;
  TF_RETURN_IF_ERROR(OutputDim(c, c->Dim(x, 1), kh, a.strides[0], a.dilations[0], a.padding[0],
                               a.padding[1], &ho));
  TF_RETURN_IF_ERROR(OutputDim(c, c->Dim(x, 2), kw, a.strides[1], a.dilations[1], a.padding[2],
                               a.padding[3], &wo));
  *y = c->MakeShape({c->Dim(x, 0), ho, wo, c->MakeDim(a.K)});
  return absl::OkStatus();
}

// w (blocks, kh, kw, bs, bs) against layout (blocks, 2); gives kh and kw (-1 if unknown).
absl::Status KernelShape(InferenceContext* c, int w_input, int layout_input, int64_t bs,
                         int64_t* kh, int64_t* kw) {
  ShapeHandle w, layout;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(w_input), 5, &w));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(layout_input), 2, &layout));
  DimensionHandle unused;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(w, 0), c->Dim(layout, 0), &unused));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(w, 3), c->MakeDim(bs), &unused));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(w, 4), c->MakeDim(bs), &unused));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(layout, 1), c->MakeDim(2), &unused));
  *kh = c->ValueKnown(c->Dim(w, 1)) ? c->Value(c->Dim(w, 1)) : -1;
  *kw = c->ValueKnown(c->Dim(w, 2)) ? c->Value(c->Dim(w, 2)) : -1;
  return absl::OkStatus();
}

// An NHWC shape whose channel dimension is `channels`.
absl::Status ImageShape(InferenceContext* c, ShapeHandle in, int64_t channels, ShapeHandle* out) {
  TF_RETURN_IF_ERROR(c->WithRank(in, 4, out));
  DimensionHandle unused;
  return c->Merge(c->Dim(*out, 3), c->MakeDim(channels), &unused);
}

}  // namespace

#define BLOCKSPARSE_CONV_ATTRS                  \
  Attr("T: {float, half, bfloat16}")            \
      .Attr("block_size: int")                  \
      .Attr("C: int")                           \
      .Attr("K: int")                           \
      .Attr("strides: list(int) = [1, 1]")      \
      .Attr("dilations: list(int) = [1, 1]")    \
      .Attr("padding: list(int) = [0, 0, 0, 0]")

REGISTER_OP("BlocksparseConv2D")
    .Input("x: T")
    .Input("w: T")
    .Input("layout: int32")
    .Output("y: T")
    .BLOCKSPARSE_CONV_ATTRS
    .SetShapeFn([](InferenceContext* c) {
      ConvAttrs a;
      TF_RETURN_IF_ERROR(ReadConvAttrs(c, &a));
      int64_t kh, kw;
      TF_RETURN_IF_ERROR(KernelShape(c, 1, 2, a.block_size, &kh, &kw));
      ShapeHandle x, y;
      TF_RETURN_IF_ERROR(ImageShape(c, c->input(0), a.C, &x));
      TF_RETURN_IF_ERROR(OutputShape(c, x, a, kh, kw, &y));
      c->set_output(0, y);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Block-sparse 2-D convolution, NHWC: x (N, H, W, C) -> y (N, Ho, Wo, K).  The kernel's channel
layout is `layout` at every tap; w (blocks, kh, kw, bs, bs) holds its blocks.  The padding
amounts are explicit, [top, bottom, left, right].
)doc");

REGISTER_OP("BlocksparseConv2DGradInput")
    .Input("input_sizes: int32")
    .Input("w: T")
    .Input("dy: T")
    .Input("layout: int32")
    .Output("dx: T")
    .BLOCKSPARSE_CONV_ATTRS
    .SetShapeFn([](InferenceContext* c) {
      ConvAttrs a;
      TF_RETURN_IF_ERROR(ReadConvAttrs(c, &a));
      int64_t kh, kw;
      TF_RETURN_IF_ERROR(KernelShape(c, 1, 3, a.block_size, &kh, &kw));
      ShapeHandle dy, sizes, dx;
      TF_RETURN_IF_ERROR(ImageShape(c, c->input(2), a.K, &dy));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 1, &sizes));
      TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(0, &dx));
      TF_RETURN_IF_ERROR(ImageShape(c, dx, a.C, &dx));
      c->set_output(0, dx);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Input gradient of BlocksparseConv2D: dx (input_sizes = (N, H, W, C)) from dy (N, Ho, Wo, K).
)doc");

REGISTER_OP("BlocksparseConv2DGradKernel")
    .Input("x: T")
    .Input("dy: T")
    .Input("layout: int32")
    .Output("dw: T")
    .BLOCKSPARSE_CONV_ATTRS
    .Attr("kernel_size: list(int)")
    .SetShapeFn([](InferenceContext* c) {
      ConvAttrs a;
      TF_RETURN_IF_ERROR(ReadConvAttrs(c, &a));
      std::vector<int64_t> kernel_size;
      TF_RETURN_IF_ERROR(c->GetAttr("kernel_size", &kernel_size));
      if (kernel_size.size() != 2 || kernel_size[0] < 1 || kernel_size[1] < 1) {
        return absl::InvalidArgumentError("kernel_size must be 2 positive integers; got " +
                                          Join(kernel_size));
      }
      ShapeHandle x, dy, layout;
      TF_RETURN_IF_ERROR(ImageShape(c, c->input(0), a.C, &x));
      TF_RETURN_IF_ERROR(ImageShape(c, c->input(1), a.K, &dy));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &layout));
      const int64_t bs = a.block_size;
      c->set_output(0, c->MakeShape({c->Dim(layout, 0), c->MakeDim(kernel_size[0]),
                                     c->MakeDim(kernel_size[1]), c->MakeDim(bs), c->MakeDim(bs)}));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Kernel gradient of BlocksparseConv2D at the stored blocks only: dw (blocks, kh, kw, bs, bs).
)doc");

#undef BLOCKSPARSE_CONV_ATTRS

namespace {

// Base of the three kernels: attributes, and the checks of the layout, kernel and images
// that give the geometry of one call.
class ConvOpBase : public OpKernel {
 public:
  explicit ConvOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadConvAttrs(ctx, &attrs_));
  }

 protected:
  int64_t bs() const { return attrs_.block_size; }

  absl::Status BuildLayout(const Tensor& t, BlockLayout* layout) const {
    return LayoutFromTensor(t, attrs_.C / bs(), attrs_.K / bs(), bs(), layout);
  }

  // Kernel size from w, which must be (blocks, kh, kw, bs, bs).
  absl::Status KernelSizeOf(const Tensor& w, const BlockLayout& layout, ConvGeometry* g) const {
    if (w.dims() != 5 || w.dim_size(0) != layout.blocks || w.dim_size(1) < 1 ||
        w.dim_size(2) < 1 || w.dim_size(3) != bs() || w.dim_size(4) != bs()) {
      return absl::InvalidArgumentError(
          "w must have shape (blocks, kh, kw, block_size, block_size) with blocks = " +
          std::to_string(layout.blocks) + " and block_size = " + std::to_string(bs()) +
          "; got " + w.shape().DebugString());
    }
    g->kernel_height = w.dim_size(1);
    g->kernel_width = w.dim_size(2);
    return absl::OkStatus();
  }

  // Fills the input and output sizes from the NHWC input shape (batch, H, W, C) once the
  // kernel size is known; the padded input must hold the dilated kernel.
  absl::Status SetInputShape(const TensorShape& x, ConvGeometry* g) const {
    if (x.dims() != 4 || x.dim_size(3) != attrs_.C) {
      return absl::InvalidArgumentError("the input must have shape (batch, height, width, " +
                                        std::to_string(attrs_.C) + "); got " + x.DebugString());
    }
    const std::vector<int64_t>& s = attrs_.strides;
    const std::vector<int64_t>& d = attrs_.dilations;
    const std::vector<int64_t>& p = attrs_.padding;
    g->batch = x.dim_size(0);
    g->in_height = x.dim_size(1);
    g->in_width = x.dim_size(2);
    g->stride_h = s[0];
    g->stride_w = s[1];
    g->dilation_h = d[0];
    g->dilation_w = d[1];
    g->pad_top = p[0];
    g->pad_left = p[2];
    g->out_height = ConvOutputSize(g->in_height, g->kernel_height, s[0], d[0], p[0], p[1]);
    g->out_width = ConvOutputSize(g->in_width, g->kernel_width, s[1], d[1], p[2], p[3]);
    if (g->out_height < 1 || g->out_width < 1) {
      return absl::InvalidArgumentError(
          "the input " + x.DebugString() + " padded by " + Join(p) +
          " is smaller than the dilated kernel (" + std::to_string(g->kernel_height) + ", " +
          std::to_string(g->kernel_width) + ") with dilations " + Join(d));
    }
    return absl::OkStatus();
  }

  // dy must be (batch, Ho, Wo, K) for the geometry.
  absl::Status CheckOutputGradient(const Tensor& dy, const ConvGeometry& g) const {
    const TensorShape expected({g.batch, g.out_height, g.out_width, attrs_.K});
    if (dy.shape() != expected) {
      return absl::InvalidArgumentError("dy must have the output shape " +
                                        expected.DebugString() + "; got " +
                                        dy.shape().DebugString());
    }
    return absl::OkStatus();
  }

  ConvAttrs attrs_;
};

template <typename T>
class BlocksparseConv2DOp : public ConvOpBase {
 public:
  using ConvOpBase::ConvOpBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& w = ctx->input(1);
    BlockLayout layout;
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, BuildLayout(ctx->input(2), &layout));
    OP_REQUIRES_OK(ctx, KernelSizeOf(w, layout, &g));
    OP_REQUIRES_OK(ctx, SetInputShape(x.shape(), &g));
    Tensor* y;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({g.batch, g.out_height, g.out_width, attrs_.K}), &y));
    if (y->NumElements() == 0) return;
    Tensor x_scratch, w_scratch;
    const float* xf = AsFloat<T>(ctx, x, &x_scratch);
    const float* wf = AsFloat<T>(ctx, w, &w_scratch);
    if (!ctx->status().ok()) return;
    WriteAsT<T>(ctx, y, [&](float* yf) {
      RunProduct(ctx, [&](const ParallelFor& parallel_for, const ScratchAllocator& scratch) {
        return BlocksparseConv2DCpu(xf, wf, yf, g, layout, parallel_for, scratch);
      });
    });
  }
};

template <typename T>
class BlocksparseConv2DGradInputOp : public ConvOpBase {
 public:
  using ConvOpBase::ConvOpBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& sizes = ctx->input(0);
    const Tensor& w = ctx->input(1);
    const Tensor& dy = ctx->input(2);
    BlockLayout layout;
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, BuildLayout(ctx->input(3), &layout));
    OP_REQUIRES_OK(ctx, KernelSizeOf(w, layout, &g));
    TensorShape x_shape;
    OP_REQUIRES_OK(ctx, InputShapeOf(sizes, &x_shape));
    OP_REQUIRES_OK(ctx, SetInputShape(x_shape, &g));
    OP_REQUIRES_OK(ctx, CheckOutputGradient(dy, g));
    Tensor* dx;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x_shape, &dx));
    if (dx->NumElements() == 0) return;
    Tensor w_scratch, dy_scratch;
    const float* wf = AsFloat<T>(ctx, w, &w_scratch);
    const float* dyf = AsFloat<T>(ctx, dy, &dy_scratch);
    if (!ctx->status().ok()) return;
    WriteAsT<T>(ctx, dx, [&](float* dxf) {
      RunProduct(ctx, [&](const ParallelFor& parallel_for, const ScratchAllocator& scratch) {
        return BlocksparseConv2DGradInputCpu(dyf, wf, dxf, g, layout, parallel_for, scratch);
      });
    });
  }

 private:
  // input_sizes must be 4 non-negative integers.
  static absl::Status InputShapeOf(const Tensor& sizes, TensorShape* shape) {
    if (sizes.dims() != 1 || sizes.NumElements() != 4) {
      return absl::InvalidArgumentError(
          "input_sizes must be a vector of 4 integers (batch, height, width, channels); got "
          "shape " + sizes.shape().DebugString());
    }
    const auto v = sizes.vec<int32_t>();
    for (int d = 0; d < 4; ++d) {
      if (v(d) < 0) {
        return absl::InvalidArgumentError("input_sizes must not be negative; got [" +
                                          std::to_string(v(0)) + ", " + std::to_string(v(1)) +
                                          ", " + std::to_string(v(2)) + ", " +
                                          std::to_string(v(3)) + "]");
      }
    }
    *shape = TensorShape({v(0), v(1), v(2), v(3)});
    return absl::OkStatus();
  }
};

template <typename T>
class BlocksparseConv2DGradKernelOp : public ConvOpBase {
 public:
  explicit BlocksparseConv2DGradKernelOp(OpKernelConstruction* ctx) : ConvOpBase(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("kernel_size", &kernel_size_));
    OP_REQUIRES(ctx, kernel_size_.size() == 2 && kernel_size_[0] >= 1 && kernel_size_[1] >= 1,
                absl::InvalidArgumentError("kernel_size must be 2 positive integers; got " +
                                           Join(kernel_size_)));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    BlockLayout layout;
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, BuildLayout(ctx->input(2), &layout));
    g.kernel_height = kernel_size_[0];
    g.kernel_width = kernel_size_[1];
    OP_REQUIRES_OK(ctx, SetInputShape(x.shape(), &g));
    OP_REQUIRES_OK(ctx, CheckOutputGradient(dy, g));
    Tensor* dw;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({layout.blocks, g.kernel_height,
                                                             g.kernel_width, bs(), bs()}),
                                             &dw));
    Tensor x_scratch, dy_scratch;
    const float* xf = AsFloat<T>(ctx, x, &x_scratch);
    const float* dyf = AsFloat<T>(ctx, dy, &dy_scratch);
    if (!ctx->status().ok()) return;
    WriteAsT<T>(ctx, dw, [&](float* dwf) {
      RunProduct(ctx, [&](const ParallelFor& parallel_for, const ScratchAllocator& scratch) {
        return BlocksparseConv2DGradKernelCpu(xf, dyf, dwf, g, layout, parallel_for, scratch);
      });
    });
  }

 private:
  std::vector<int64_t> kernel_size_;
};

#define REGISTER_CPU(T)                                                                      \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("BlocksparseConv2D").Device(DEVICE_CPU).TypeConstraint<T>("T"),                   \
      BlocksparseConv2DOp<T>);                                                               \
  REGISTER_KERNEL_BUILDER(Name("BlocksparseConv2DGradInput")                                 \
                              .Device(DEVICE_CPU)                                            \
                              .TypeConstraint<T>("T")                                        \
                              .HostMemory("input_sizes"),                                    \
                          BlocksparseConv2DGradInputOp<T>);                                  \
  REGISTER_KERNEL_BUILDER(                                                                   \
      Name("BlocksparseConv2DGradKernel").Device(DEVICE_CPU).TypeConstraint<T>("T"),         \
      BlocksparseConv2DGradKernelOp<T>);

REGISTER_CPU(float);
REGISTER_CPU(Eigen::half);
REGISTER_CPU(Eigen::bfloat16);

}  // namespace
}  // namespace blocksparse
