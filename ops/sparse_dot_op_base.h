// Input checks and output allocation shared by the CPU kernels (sparse_dot_ops.cc) and the GPU
// kernels (sparse_dot_gpu_op.cc) of BlocksparseSparseDot and BlocksparseSparseDotGradW.
#ifndef BLOCKSPARSE_OPS_SPARSE_DOT_OP_BASE_H_
#define BLOCKSPARSE_OPS_SPARSE_DOT_OP_BASE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "ops/blocksparse_matmul_cpu.h"
#include "ops/blocksparse_matmul_op_base.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace blocksparse {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

inline std::string ShapeOf(const Tensor& t) { return t.shape().DebugString(); }

// Kernel check: mask is (n, features / bs); `features` names the dimension in the message.
inline absl::Status CheckMask(const Tensor& mask, const char* name, int64_t n, int64_t blocks,
                              const char* features) {
  // Compared dimension by dimension: a TensorShape of (n, blocks) aborts the process where
  // their product overflows.
  if (mask.dims() == 2 && mask.dim_size(0) == n && mask.dim_size(1) == blocks) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(std::string(name) + " must have shape (n, " + features +
                                    " / block_size) = (" + std::to_string(n) + ", " +
                                    std::to_string(blocks) + "); got " + ShapeOf(mask));
}

// What both ops check once the operands' n, m and p are known (x and its partner named for the
// messages): block_size divides m and p, the masks' shapes, n fits int32 row indices.
inline absl::Status CheckBlocksAndMasks(const Tensor& x, const Tensor& other,
                                        const char* other_name, const Tensor& in_mask,
                                        const Tensor& out_mask, int64_t n, int64_t m, int64_t p,
                                        int64_t bs) {
  if (m % bs != 0 || p % bs != 0) {
    return absl::InvalidArgumentError("block_size " + std::to_string(bs) +
                                      " must divide m and p; got x " + ShapeOf(x) + " and " +
                                      other_name + " " + ShapeOf(other));
  }
  TF_RETURN_IF_ERROR(CheckMask(in_mask, "in_mask", n, m / bs, "m"));
  TF_RETURN_IF_ERROR(CheckMask(out_mask, "out_mask", n, p / bs, "p"));
  if (n >= INT32_MAX) return absl::InvalidArgumentError("x has too many rows: " + ShapeOf(x));
  return absl::OkStatus();
}

// Allocates output 0 as a (rows, cols) matrix, or says why it cannot be one (more elements
// than a tensor can hold) where TensorShape's constructor would abort the process.
inline absl::Status AllocateMatrix(OpKernelContext* ctx, const char* name, int64_t rows,
                                   int64_t cols, Tensor** out) {
  TensorShape shape;
  const absl::Status status =
      ::tensorflow::TensorShapeUtils::MakeShape(std::vector<int64_t>{rows, cols}, &shape);
  if (!status.ok()) {
    return absl::InvalidArgumentError(std::string(name) + " would have shape (" +
                                      std::to_string(rows) + ", " + std::to_string(cols) +
                                      "), too many elements for a tensor");
  }
  return ctx->allocate_output(0, shape, out);
}

// Sizes of one call: x (n, m), y or dy (n, p), w or dw (m, p).
struct SparseDotSizes {
  int64_t n = 0, m = 0, p = 0;
};

// Reads and checks the attrs; checks the inputs and allocates the output of either op.
class SparseDotKernelBase : public OpKernel {
 public:
  explicit SparseDotKernelBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_size_));
    OP_REQUIRES_OK(ctx, CheckBlockSize(block_size_));
  }

 protected:
  // BlocksparseSparseDot: x (n, m), w (m, p) or (p, m) when transpose_w, masks; y (n, p).
  absl::Status PrepareForward(OpKernelContext* ctx, bool transpose_w, SparseDotSizes* sz,
                              Tensor** y) const {
    const Tensor& x = ctx->input(0);
    const Tensor& w = ctx->input(1);
    const int m_axis = transpose_w ? 1 : 0;  // w's axis of length m
    if (x.dims() != 2 || w.dims() != 2 || x.dim_size(1) != w.dim_size(m_axis)) {
      return absl::InvalidArgumentError(
          std::string("x (n, m) and w ") + (transpose_w ? "(p, m)" : "(m, p)") +
          " must be matrices with matching m; got x " + ShapeOf(x) + " and w " + ShapeOf(w));
    }
    sz->n = x.dim_size(0);
    sz->m = x.dim_size(1);
    sz->p = w.dim_size(1 - m_axis);
    TF_RETURN_IF_ERROR(CheckBlocksAndMasks(x, w, "w", ctx->input(2), ctx->input(3), sz->n,
                                           sz->m, sz->p, block_size_));
    return AllocateMatrix(ctx, "y", sz->n, sz->p, y);
  }

  // BlocksparseSparseDotGradW: x (n, m), dy (n, p), masks; dw (m, p).
  absl::Status PrepareGradW(OpKernelContext* ctx, SparseDotSizes* sz, Tensor** dw) const {
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    if (x.dims() != 2 || dy.dims() != 2 || x.dim_size(0) != dy.dim_size(0)) {
      return absl::InvalidArgumentError(
          "x (n, m) and dy (n, p) must be matrices with the same n; got x " + ShapeOf(x) +
          " and dy " + ShapeOf(dy));
    }
    sz->n = x.dim_size(0);
    sz->m = x.dim_size(1);
    sz->p = dy.dim_size(1);
    TF_RETURN_IF_ERROR(CheckBlocksAndMasks(x, dy, "dy", ctx->input(2), ctx->input(3), sz->n,
                                           sz->m, sz->p, block_size_));
    return AllocateMatrix(ctx, "dw", sz->m, sz->p, dw);
  }

  // The masks' data (inputs 2 and 3, float32, already checked).
  static const float* InMask(OpKernelContext* ctx) { return ctx->input(2).flat<float>().data(); }
  static const float* OutMask(OpKernelContext* ctx) { return ctx->input(3).flat<float>().data(); }

  int64_t block_size_;
};

}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_SPARSE_DOT_OP_BASE_H_
