// Attribute and input checks shared by the CPU and GPU kernels of the block-sparse ops.
#ifndef BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_OP_BASE_H_
#define BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_OP_BASE_H_

#include <cstdint>
#include <string>

#include "ops/block_layout.h"
#include "ops/blocksparse_matmul_cpu.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace blocksparse {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

inline absl::Status CheckAttrs(int64_t block_size, int64_t C, int64_t K, int64_t feature_axis) {
  if (!IsSupportedBlockSize(block_size)) {
    return absl::InvalidArgumentError("block_size must be one of 1, 8, 16, 32, 64; got " +
                                      std::to_string(block_size));
  }
  if (C < 1 || K < 1 || C % block_size != 0 || K % block_size != 0) {
    return absl::InvalidArgumentError(
        "C and K must be positive multiples of block_size " + std::to_string(block_size) +
        "; got C=" + std::to_string(C) + ", K=" + std::to_string(K));
  }
  if (feature_axis != 0 && feature_axis != 1) {
    return absl::InvalidArgumentError("feature_axis must be 0 or 1; got " +
                                      std::to_string(feature_axis));
  }
  return absl::OkStatus();
}

// Validates a layout input (blocks, 2) of block coordinates and builds its lookup tables:
// those of the transpose's layout (K x C) with `transposed`.
inline absl::Status LayoutFromTensor(const Tensor& t, int64_t CB, int64_t KB, int64_t block_size,
                                     BlockLayout* layout, bool transposed = false) {
  if (t.dims() != 2 || t.dim_size(1) != 2) {
    return absl::InvalidArgumentError("layout must have shape (blocks, 2); got " +
                                      t.shape().DebugString());
  }
  const int32_t* coords = t.flat<int32_t>().data();
  const std::string error =
      transposed ? BuildTransposedBlockLayout(coords, t.dim_size(0), CB, KB, block_size, layout)
                 : BuildBlockLayout(coords, t.dim_size(0), CB, KB, block_size, layout);
  if (!error.empty()) return absl::InvalidArgumentError(error);
  return absl::OkStatus();
}

// Base of every block-sparse kernel: reads and checks the attributes, checks the layout
// input and builds its tables, and checks the activations' shapes.
class BlocksparseOpBase : public OpKernel {
 public:
  explicit BlocksparseOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_size_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("C", &C_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("K", &K_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("feature_axis", &feature_axis_));
    OP_REQUIRES_OK(ctx, CheckAttrs(block_size_, C_, K_, feature_axis_));
    if (ctx->HasAttr("transpose_w")) {
      OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_w", &transpose_w_));
    }
  }

 protected:
  // Validates the layout input and builds the lookup tables of the product's weights: W's,
  // or with transpose_w those of W^T (block b then holds the transpose of W^T's block b).
  absl::Status BuildLayout(const Tensor& t, BlockLayout* layout) const {
    return LayoutFromTensor(t, C_ / block_size_, K_ / block_size_, block_size_, layout,
                            transpose_w_);
  }

  // Number of feature vectors N in x, after checking its feature dimension equals `features`.
  absl::Status RowsOf(const char* name, const Tensor& x, int64_t features, int64_t* N) const {
    if (feature_axis_ == 1) {
      if (x.dims() < 2 || x.dim_size(x.dims() - 1) != features) {
        return absl::InvalidArgumentError(std::string(name) + " must have shape (..., " +
                                          std::to_string(features) +
                                          ") for feature_axis=1; got " + x.shape().DebugString());
      }
      *N = x.NumElements() / features;
    } else {
      if (x.dims() != 2 || x.dim_size(0) != features) {
        return absl::InvalidArgumentError(std::string(name) + " must have shape (" +
                                          std::to_string(features) +
                                          ", N) for feature_axis=0; got " + x.shape().DebugString());
      }
      *N = x.dim_size(1);
    }
    return absl::OkStatus();
  }

  // Checks BlocksparseMatmul's inputs (x, w, layout); gives the layout and N, and allocates y.
  absl::Status PrepareForward(OpKernelContext* ctx, BlockLayout* layout, int64_t* N,
                              Tensor** y) const {
    TF_RETURN_IF_ERROR(BuildLayout(ctx->input(2), layout));
    return CheckForwardShapes(ctx, layout->blocks, N, y);
  }

  // The same checks given the number of blocks of an already validated layout.
  absl::Status CheckForwardShapes(OpKernelContext* ctx, int64_t blocks, int64_t* N,
                                  Tensor** y) const {
    const Tensor& x = ctx->input(0);
    const Tensor& w = ctx->input(1);
    if (w.shape() != TensorShape({blocks, block_size_, block_size_})) {
      return absl::InvalidArgumentError(
          "w must have shape (blocks, block_size, block_size) = (" + std::to_string(blocks) +
          ", " + std::to_string(block_size_) + ", " + std::to_string(block_size_) + "); got " +
          w.shape().DebugString());
    }
    // y = x . W^T with transpose_w: x has K features and y C.
    TF_RETURN_IF_ERROR(RowsOf("x", x, transpose_w_ ? K_ : C_, N));
    TensorShape y_shape = x.shape();
    y_shape.set_dim(feature_axis_ == 1 ? x.dims() - 1 : 0, transpose_w_ ? C_ : K_);
    return ctx->allocate_output(0, y_shape, y);
  }

  // Checks BlocksparseMatmulGradW's inputs (x, dy, layout); gives the layout and N, and
  // allocates dw.
  absl::Status PrepareGradW(OpKernelContext* ctx, BlockLayout* layout, int64_t* N,
                            Tensor** dw) const {
    TF_RETURN_IF_ERROR(BuildLayout(ctx->input(2), layout));
    return CheckGradWShapes(ctx, layout->blocks, N, dw);
  }

  // The same checks given the number of blocks of an already validated layout.
  absl::Status CheckGradWShapes(OpKernelContext* ctx, int64_t blocks, int64_t* N,
                                Tensor** dw) const {
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    int64_t N_dy;
    TF_RETURN_IF_ERROR(RowsOf("x", x, C_, N));
    TF_RETURN_IF_ERROR(RowsOf("dy", dy, K_, &N_dy));
    if (*N != N_dy || (feature_axis_ == 1 && x.dims() != dy.dims())) {
      return absl::InvalidArgumentError("x " + x.shape().DebugString() + " and dy " +
                                        dy.shape().DebugString() +
                                        " must hold the same number of rows");
    }
    return ctx->allocate_output(0, TensorShape({blocks, block_size_, block_size_}), dw);
  }

  int64_t block_size_, C_, K_, feature_axis_;
  bool transpose_w_ = false;  // BlocksparseMatmul's attribute (the other ops have none)
};

}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_OP_BASE_H_
