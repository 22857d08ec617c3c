// TensorFlow registration of the block-sparse 2-D convolution (NHWC, CPU):
//
//   BlocksparseConv2D:            y  = conv(x, W)
//   BlocksparseConv2DGradInput:   dx = the input gradient of conv for dy
//   BlocksparseConv2DGradKernel:  dw = the kernel gradient for x and dy, stored blocks only,
//                                 for the kernel size given as an input
//
// W (kh, kw, C, K) has the channel layout `layout` (blocks, 2) at every tap and is stored as
// w (blocks, kh, kw, bs, bs).  Padding is explicit, [top, bottom, left, right] (the Python
// wrapper computes SAME and VALID amounts).  The gradients are registered in
// blocksparse_tf/conv.py.

#include <cstdint>
#include <limits>
#include <memory>
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
#include "tensorflow/core/framework/tensor_shape.h"

namespace blocksparse {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

// Largest stride, dilation and padding amount: far beyond any real image, and small enough
// that the pixel arithmetic stays far from int64 overflow.
constexpr int64_t kMaxSpatialAttr = std::numeric_limits<int32_t>::max();

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
  const auto check = [](const char* name, const std::vector<int64_t>& v, size_t count,
                        int64_t least, const char* axes) {
    bool ok = v.size() == count;
    for (int64_t e : v) ok &= e >= least && e <= kMaxSpatialAttr;
    if (ok) return absl::OkStatus();
    return absl::InvalidArgumentError(std::string(name) + " must be " + std::to_string(count) +
                                      " integers in [" + std::to_string(least) + ", " +
                                      std::to_string(kMaxSpatialAttr) + "] (" + axes +
                                      "); got " + Join(v));
  };
  TF_RETURN_IF_ERROR(check("strides", a.strides, 2, 1, "height, width"));
  TF_RETURN_IF_ERROR(check("dilations", a.dilations, 2, 1, "height, width"));
  return check("padding", a.padding, 4, 0, "top, bottom, left, right");
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

// Output length of the spatial dimension `name`: an error when the padded input is smaller
// than the dilated kernel, or when either overflows int64 (ConvOutputSize).
absl::Status OutputLength(const std::string& name, int64_t in, int64_t kernel, int64_t stride,
                          int64_t dilation, int64_t before, int64_t after, int64_t* size) {
  const std::string sizes = "the input " + name + " " + std::to_string(in) + " padded by " +
                            std::to_string(before) + " + " + std::to_string(after);
  const std::string dilated = "the dilated kernel " + name + " (" + std::to_string(kernel) +
                              " taps, dilation " + std::to_string(dilation) + ")";
  if (!ConvOutputSize(in, kernel, stride, dilation, before, after, size)) {
    return absl::InvalidArgumentError(sizes + " or " + dilated + " overflows int64");
  }
  if (*size < 1) return absl::InvalidArgumentError(sizes + " is smaller than " + dilated);
  return absl::OkStatus();
}

// One output dimension for the shape functions: unknown stays unknown.
absl::Status OutputDim(InferenceContext* c, const std::string& name, DimensionHandle in,
                       int64_t kernel, int64_t stride, int64_t dilation, int64_t before,
                       int64_t after, DimensionHandle* out) {
  if (!c->ValueKnown(in) || kernel < 0) {
    *out = c->UnknownDim();
    return absl::OkStatus();
  }
  int64_t size;
  TF_RETURN_IF_ERROR(
      OutputLength(name, c->Value(in), kernel, stride, dilation, before, after, &size));
  *out = c->MakeDim(size);
  return absl::OkStatus();
}

// `shape` from sizes taken from inputs or attributes, or an error naming them where
// TensorShape's constructor would abort the process (a negative size, or more elements than
// int64 counts).
absl::Status ShapeOf(const std::string& what, const std::vector<int64_t>& sizes,
                     TensorShape* shape) {
  const absl::Status status = ::tensorflow::TensorShapeUtils::MakeShape(sizes, shape);
  if (status.ok()) return status;
  return absl::InvalidArgumentError(what + " " + Join(sizes) + " is not a valid shape: " +
                                    std::string(status.message()));
}

// (N, Ho, Wo, K) for an NHWC input shape and kernel (kh, kw); kernel sizes < 0 are unknown.
absl::Status OutputShape(InferenceContext* c, ShapeHandle x, const ConvAttrs& a, int64_t kh,
                         int64_t kw, ShapeHandle* y) {
  DimensionHandle ho, wo;
  TF_RETURN_IF_ERROR(OutputDim(c, "height", c->Dim(x, 1), kh, a.strides[0], a.dilations[0],
                               a.padding[0], a.padding[1], &ho));
  TF_RETURN_IF_ERROR(OutputDim(c, "width", c->Dim(x, 2), kw, a.strides[1], a.dilations[1],
                               a.padding[2], a.padding[3], &wo));
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
  // As the kernels refuse it when run; an empty kernel would also give OutputShape a negative
  // reach (an output larger than the image).
  if (*kh == 0 || *kw == 0) {
    return absl::InvalidArgumentError(
        "w must have shape (blocks, kh, kw, block_size, block_size) with kh, kw >= 1; got " +
        c->DebugString(w));
  }
  return absl::OkStatus();
}

// dy against the output shape that the image x (NHWC) and the kernel (kh, kw; < 0 unknown)
// give: the same batch, the same output height and width where known, and a kernel that fits
// the padded image.
absl::Status OutputGradientMatches(InferenceContext* c, ShapeHandle x, ShapeHandle dy,
                                   const ConvAttrs& a, int64_t kh, int64_t kw) {
  ShapeHandle expected, unused;
  TF_RETURN_IF_ERROR(OutputShape(c, x, a, kh, kw, &expected));
  if (!c->Merge(dy, expected, &unused).ok()) {
    return absl::InvalidArgumentError("dy must have the output shape " +
                                      c->DebugString(expected) + " of the images " +
                                      c->DebugString(x) + "; got " + c->DebugString(dy));
  }
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
      TF_RETURN_IF_ERROR(OutputGradientMatches(c, dx, dy, a, kh, kw));
      c->set_output(0, dx);
      return absl::OkStatus();
    })
    .Doc(R"doc(
Input gradient of BlocksparseConv2D: dx (input_sizes = (N, H, W, C)) from dy (N, Ho, Wo, K).
)doc");

// The kernel size is an input rather than an attribute so that the gradient of
// BlocksparseConv2D can pass tf.shape(w) when w's shape is unknown while the graph is built.
REGISTER_OP("BlocksparseConv2DGradKernel")
    .Input("x: T")
    .Input("dy: T")
    .Input("layout: int32")
    .Input("kernel_size: int32")
    .Output("dw: T")
    .BLOCKSPARSE_CONV_ATTRS
    .SetShapeFn([](InferenceContext* c) {
      ConvAttrs a;
      TF_RETURN_IF_ERROR(ReadConvAttrs(c, &a));
      ShapeHandle x, dy, layout, sizes, kernel;
      TF_RETURN_IF_ERROR(ImageShape(c, c->input(0), a.C, &x));
      TF_RETURN_IF_ERROR(ImageShape(c, c->input(1), a.K, &dy));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &layout));
      DimensionHandle unused;
      TF_RETURN_IF_ERROR(c->Merge(c->Dim(layout, 1), c->MakeDim(2), &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 1, &sizes));
      TF_RETURN_IF_ERROR(c->WithValue(c->Dim(sizes, 0), 2, &unused));
      // (kh, kw) as far as kernel_size's value is known (a constant, or the shape of a kernel
      // whose size is known); unknown otherwise.
      TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(3, &kernel));
      TF_RETURN_IF_ERROR(c->WithRank(kernel, 2, &kernel));
      for (int d = 0; d < 2; ++d) {
        if (c->ValueKnown(c->Dim(kernel, d)) && c->Value(c->Dim(kernel, d)) < 1) {
          return absl::InvalidArgumentError("kernel_size must be 2 positive integers; got " +
                                            c->DebugString(kernel));
        }
      }
      auto known = [&](int d) {
        return c->ValueKnown(c->Dim(kernel, d)) ? c->Value(c->Dim(kernel, d)) : int64_t{-1};
      };
      TF_RETURN_IF_ERROR(OutputGradientMatches(c, x, dy, a, known(0), known(1)));
      const int64_t bs = a.block_size;
      c->set_output(0, c->MakeShape({c->Dim(layout, 0), c->Dim(kernel, 0), c->Dim(kernel, 1),
                                     c->MakeDim(bs), c->MakeDim(bs)}));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Kernel gradient of BlocksparseConv2D at the stored blocks only: dw (blocks, kh, kw, bs, bs)
for kernel_size = (kh, kw).
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

  // The layout input's tables (checked), built only for a layout none of the recent calls
  // had (see LayoutCache).
  absl::Status CachedLayout(const Tensor& t, std::shared_ptr<const BlockLayout>* layout) {
    return layouts_.Get(t, /*constant=*/false, [&](BlockLayout* l) {
      return LayoutFromTensor(t, attrs_.C / bs(), attrs_.K / bs(), bs(), l);
    }, layout);
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

  // An image of `channels` channels, NHWC.  Checked before the layout's tables are built:
  // they take memory in proportion to C and K, which a wrong input should not get to allocate.
  static absl::Status CheckChannels(const std::string& name, const TensorShape& t,
                                    int64_t channels) {
    if (t.dims() == 4 && t.dim_size(3) == channels) return absl::OkStatus();
    return absl::InvalidArgumentError(name + " must have shape (batch, height, width, " +
                                      std::to_string(channels) + "); got " + t.DebugString());
  }

  // Fills the input and output sizes from the NHWC input shape (batch, H, W, C) once the
  // kernel size is known; the padded input must hold the dilated kernel.
  absl::Status SetInputShape(const TensorShape& x, ConvGeometry* g) const {
    TF_RETURN_IF_ERROR(CheckChannels("the input", x, attrs_.C));
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
    TF_RETURN_IF_ERROR(OutputLength("height", g->in_height, g->kernel_height, s[0], d[0], p[0],
                                    p[1], &g->out_height));
    return OutputLength("width", g->in_width, g->kernel_width, s[1], d[1], p[2], p[3],
                        &g->out_width);
  }

  // The output shape (batch, Ho, Wo, K) of the geometry.
  absl::Status OutputTensorShape(const ConvGeometry& g, TensorShape* shape) const {
    return ShapeOf("the output shape", {g.batch, g.out_height, g.out_width, attrs_.K}, shape);
  }

  // dy must be (batch, Ho, Wo, K) for the geometry.
  absl::Status CheckOutputGradient(const Tensor& dy, const ConvGeometry& g) const {
    TensorShape expected;
    TF_RETURN_IF_ERROR(OutputTensorShape(g, &expected));
    if (dy.shape() != expected) {
      return absl::InvalidArgumentError("dy must have the output shape " +
                                        expected.DebugString() + "; got " +
                                        dy.shape().DebugString());
    }
    return absl::OkStatus();
  }

  ConvAttrs attrs_;

 private:
  LayoutCache<BlockLayout> layouts_;
};

template <typename T>
class BlocksparseConv2DOp : public ConvOpBase {
 public:
  using ConvOpBase::ConvOpBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& w = ctx->input(1);
    std::shared_ptr<const BlockLayout> layout;
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, CheckChannels("the input", x.shape(), attrs_.C));
    OP_REQUIRES_OK(ctx, CachedLayout(ctx->input(2), &layout));
    OP_REQUIRES_OK(ctx, KernelSizeOf(w, *layout, &g));
    OP_REQUIRES_OK(ctx, SetInputShape(x.shape(), &g));
    TensorShape y_shape;
    OP_REQUIRES_OK(ctx, OutputTensorShape(g, &y_shape));
    Tensor* y;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, y_shape, &y));
    if (y->NumElements() == 0) return;
    Tensor x_scratch, w_scratch;
    const float* xf = AsFloat<T>(ctx, x, &x_scratch);
    const float* wf = AsFloat<T>(ctx, w, &w_scratch);
    if (!ctx->status().ok()) return;
    WriteAsT<T>(ctx, y, [&](float* yf) {
      RunProduct(ctx, [&](const ParallelFor& parallel_for, const ScratchAllocator& scratch) {
        return BlocksparseConv2DCpu(xf, wf, yf, g, *layout, parallel_for, scratch);
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
    std::shared_ptr<const BlockLayout> layout;
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, CheckChannels("dy", dy.shape(), attrs_.K));
    OP_REQUIRES_OK(ctx, CachedLayout(ctx->input(3), &layout));
    OP_REQUIRES_OK(ctx, KernelSizeOf(w, *layout, &g));
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
        return BlocksparseConv2DGradInputCpu(dyf, wf, dxf, g, *layout, parallel_for, scratch);
      });
    });
  }

 private:
  // input_sizes must be 4 sizes that make a valid shape.
  static absl::Status InputShapeOf(const Tensor& sizes, TensorShape* shape) {
    if (sizes.dims() != 1 || sizes.NumElements() != 4) {
      return absl::InvalidArgumentError(
          "input_sizes must be a vector of 4 integers (batch, height, width, channels); got "
          "shape " + sizes.shape().DebugString());
    }
    const auto v = sizes.vec<int32_t>();
    return ShapeOf("input_sizes", {v(0), v(1), v(2), v(3)}, shape);
  }
};

template <typename T>
class BlocksparseConv2DGradKernelOp : public ConvOpBase {
 public:
  using ConvOpBase::ConvOpBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    std::shared_ptr<const BlockLayout> layout;
    ConvGeometry g;
    OP_REQUIRES_OK(ctx, CheckChannels("the input", x.shape(), attrs_.C));
    OP_REQUIRES_OK(ctx, CheckChannels("dy", dy.shape(), attrs_.K));
    OP_REQUIRES_OK(ctx, CachedLayout(ctx->input(2), &layout));
    OP_REQUIRES_OK(ctx, KernelSizeFrom(ctx->input(3), &g));
    OP_REQUIRES_OK(ctx, SetInputShape(x.shape(), &g));
    OP_REQUIRES_OK(ctx, CheckOutputGradient(dy, g));
    TensorShape dw_shape;
    OP_REQUIRES_OK(ctx, ShapeOf("dw's shape (blocks, kh, kw, block_size, block_size)",
                                {layout->blocks, g.kernel_height, g.kernel_width, bs(), bs()},
                                &dw_shape));
    Tensor* dw;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, dw_shape, &dw));
    Tensor x_scratch, dy_scratch;
    const float* xf = AsFloat<T>(ctx, x, &x_scratch);
    const float* dyf = AsFloat<T>(ctx, dy, &dy_scratch);
    if (!ctx->status().ok()) return;
    WriteAsT<T>(ctx, dw, [&](float* dwf) {
      RunProduct(ctx, [&](const ParallelFor& parallel_for, const ScratchAllocator& scratch) {
        return BlocksparseConv2DGradKernelCpu(xf, dyf, dwf, g, *layout, parallel_for, scratch);
      });
    });
  }

 private:
  // kernel_size must be 2 positive integers (kh, kw).
  static absl::Status KernelSizeFrom(const Tensor& t, ConvGeometry* g) {
    if (t.dims() != 1 || t.NumElements() != 2) {
      return absl::InvalidArgumentError(
          "kernel_size must be a vector of 2 integers (height, width); got shape " +
          t.shape().DebugString());
    }
    const auto v = t.vec<int32_t>();
    if (v(0) < 1 || v(1) < 1) {
      return absl::InvalidArgumentError("kernel_size must be 2 positive integers; got [" +
                                        std::to_string(v(0)) + ", " + std::to_string(v(1)) +
                                        "]");
    }
    g->kernel_height = v(0);
    g->kernel_width = v(1);
    return absl::OkStatus();
  }
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
  REGISTER_KERNEL_BUILDER(Name("BlocksparseConv2DGradKernel")                                \
                              .Device(DEVICE_CPU)                                            \
                              .TypeConstraint<T>("T")                                        \
                              .HostMemory("kernel_size"),                                    \
                          BlocksparseConv2DGradKernelOp<T>);

REGISTER_CPU(float);
REGISTER_CPU(Eigen::half);
REGISTER_CPU(Eigen::bfloat16);

}  // namespace
}  // namespace blocksparse
