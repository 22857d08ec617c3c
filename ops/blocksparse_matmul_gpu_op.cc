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
#include <memory>
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

// The five device tables of `l` at d, in UploadLayout's order; out points at them.
const int32_t* PointAt(const BlockLayout& l, const int32_t* d, gpu::DeviceLayout* out) {
  out->col_ptr = d;
  out->col_row = out->col_ptr + l.col_ptr.size();
  out->col_block = out->col_row + l.blocks;
  out->block_row = out->col_block + l.blocks;
  out->block_col = out->block_row + l.blocks;
  out->CB = l.CB;
  out->KB = l.KB;
  out->block_size = l.block_size;
  out->blocks = l.blocks;
  return out->block_col + l.blocks;
}

// A layout's tables in device memory: the buffer (kept alive while a call holds it) and the
// view the kernels take, with its 64-wide cover's (layout.coarse points at cover; see
// gpu::DeviceLayout) for 8-, 16- and 32-wide blocks whose grid 64-wide blocks divide; and the
// host copies of both col_ptr tables and of the layout's col_row, which the views point at too
// (host_col_ptr, host_col_row).
struct DeviceTables {
  DeviceTables() = default;
  DeviceTables(const DeviceTables&) = delete;  // the views point into this object
  DeviceTables& operator=(const DeviceTables&) = delete;

  Tensor storage;
  gpu::DeviceLayout layout, cover;
  std::vector<int32_t> host_col_ptr, host_col_row, host_cover_col_ptr;
};

// Copies the tables of a layout and, if given, of its 64-wide cover into one device buffer
// (kept alive by tables->storage) and points tables' DeviceLayouts at them (layout.coarse at
// cover) and at host copies of their col_ptr tables.  The copy is queued on TensorFlow's
// stream (the buffer may be memory that earlier kernels there still read), and the call waits
// for it before the host vector goes: cudaMemcpyAsync need not have read its source when it
// returns (from page-locked memory it reads it later).  This runs only for a layout the kernel
// has not seen recently.
absl::Status UploadLayout(OpKernelContext* ctx, const BlockLayout& l, const BlockLayout* cover,
                          DeviceTables* tables) {
  Tensor* storage = &tables->storage;
  std::vector<int32_t> packed;
  for (const BlockLayout* layout : {&l, cover}) {
    if (layout == nullptr) continue;
    for (const auto* table : {&layout->col_ptr, &layout->col_row, &layout->col_block,
                              &layout->block_row, &layout->block_col}) {
      packed.insert(packed.end(), table->begin(), table->end());
    }
  }
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_INT32,
                                        TensorShape({(int64_t)packed.size()}), storage));
  int32_t* d = storage->flat<int32_t>().data();
  TF_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(d, packed.data(), packed.size() * sizeof(int32_t),
                                                cudaMemcpyHostToDevice, TfCudaStream(ctx)),
                                "copying the layout to the GPU"));
  TF_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(TfCudaStream(ctx)),
                                "waiting for the layout's copy to the GPU"));
  const int32_t* rest = PointAt(l, d, &tables->layout);
  tables->host_col_ptr = l.col_ptr;
  tables->layout.host_col_ptr = tables->host_col_ptr.data();
  tables->host_col_row = l.col_row;
  tables->layout.host_col_row = tables->host_col_row.data();
  if (l.block_size == 32)  // once per layout, not on each call (see gpu::DeviceLayout)
    tables->layout.column_group_rows =
        ColumnGroupRows(l.col_ptr.data(), l.col_row.data(), l.CB, l.KB, l.blocks, 4);
  if (cover != nullptr) {
    PointAt(*cover, rest, &tables->cover);
    tables->host_cover_col_ptr = cover->col_ptr;
    tables->cover.host_col_ptr = tables->host_cover_col_ptr.data();
    tables->layout.coarse = &tables->cover;
  }
  return absl::OkStatus();
}

// Device scratch for a call that runs its layout as 64-wide blocks or on transposed batches
// (gpu::WorkspaceBytes); none (data nullptr, bytes 0) where the call takes none.  Always
// passed where asked for, so that a call's results never depend on whether memory was at hand
// (out of memory is an error).
struct Workspace {
  Tensor storage;
  void* data = nullptr;
  int64_t bytes = 0;
};

absl::Status AllocateWorkspace(OpKernelContext* ctx, gpu::DType dtype, int64_t N,
                               int feature_axis, const gpu::DeviceLayout& layout, bool grad_w,
                               Workspace* workspace) {
  workspace->bytes = gpu::WorkspaceBytes(dtype, N, feature_axis, layout, grad_w);
  if (workspace->bytes == 0) return absl::OkStatus();
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensorflow::DT_INT8, TensorShape({workspace->bytes}),
                                        &workspace->storage));
  workspace->data = workspace->storage.data();
  return absl::OkStatus();
}

// The device memory of `tables` (what LayoutCache counts against its bounds).
int64_t TableBytes(const DeviceTables& tables) {
  return static_cast<int64_t>(tables.storage.TotalBytes());
}

// Base of the GPU kernels: the layout's device tables, built on the host and copied to the
// GPU only for a layout none of the recent calls had (see LayoutCache).
class BlocksparseGpuOpBase : public BlocksparseOpBase {
 public:
  using BlocksparseOpBase::BlocksparseOpBase;

 protected:
  absl::Status DeviceTablesOf(OpKernelContext* ctx, const Tensor& coords,
                              std::shared_ptr<const DeviceTables>* out) {
    return device_tables_.Get(coords, constant_layout_, [&](DeviceTables* tables) {
      BlockLayout layout, cover;
      TF_RETURN_IF_ERROR(BuildLayout(coords, &layout));  // validates the coordinates
      const bool covered =
          HasCover(layout.block_size) && CoarseLayoutOf(layout, kCoverBlockSize, &cover);
      return UploadLayout(ctx, layout, covered ? &cover : nullptr, tables);
    }, out);
  }

 private:
  LayoutCache<DeviceTables> device_tables_;
};

template <typename T>
class BlocksparseMatmulGpuOp : public BlocksparseGpuOpBase {
 public:
  using BlocksparseGpuOpBase::BlocksparseGpuOpBase;

  void Compute(OpKernelContext* ctx) override {
    std::shared_ptr<const DeviceTables> tables;
    int64_t N;
    OP_REQUIRES_OK(ctx, ForwardRows(ctx, &N));  // before the layout, as PrepareForward does
    OP_REQUIRES_OK(ctx, DeviceTablesOf(ctx, ctx->input(2), &tables));
    const gpu::DeviceLayout& device_layout = tables->layout;
    Tensor* y;
    OP_REQUIRES_OK(ctx, CheckWAndAllocateY(ctx, device_layout.blocks, &y));
    if (N == 0) return;
    const Tensor& x = ctx->input(0);
    const Tensor& w = ctx->input(1);
    Workspace workspace;
    OP_REQUIRES_OK(ctx, AllocateWorkspace(ctx, kDType<T>, N, feature_axis_, device_layout, false,
                                          &workspace));
    if (!transpose_w_) {
      OP_REQUIRES_OK(ctx, CudaStatus(gpu::LaunchForward(kDType<T>, x.data(), w.data(), y->data(),
                                                        N, feature_axis_, device_layout,
                                                        TfCudaStream(ctx), workspace.data,
                                                        workspace.bytes),
                                     "BlocksparseMatmul"));
      return;
    }
    // The layout is W^T's; the kernels read w's blocks transposed as stored.
    OP_REQUIRES_OK(ctx, CudaStatus(gpu::LaunchForwardTransposedW(
                                       kDType<T>, x.data(), w.data(), y->data(), N,
                                       feature_axis_, device_layout, TfCudaStream(ctx),
                                       workspace.data, workspace.bytes),
                                   "BlocksparseMatmul (transpose_w)"));
  }
};

template <typename T>
class BlocksparseMatmulGradWGpuOp : public BlocksparseGpuOpBase {
 public:
  using BlocksparseGpuOpBase::BlocksparseGpuOpBase;

  void Compute(OpKernelContext* ctx) override {
    std::shared_ptr<const DeviceTables> tables;
    int64_t N;
    OP_REQUIRES_OK(ctx, GradWRows(ctx, &N));  // before the layout, as PrepareGradW does
    OP_REQUIRES_OK(ctx, DeviceTablesOf(ctx, ctx->input(2), &tables));
    const gpu::DeviceLayout& device_layout = tables->layout;
    Tensor* dw;
    OP_REQUIRES_OK(ctx, AllocateDw(ctx, device_layout.blocks, &dw));
    Workspace workspace;
    OP_REQUIRES_OK(ctx, AllocateWorkspace(ctx, kDType<T>, N, feature_axis_, device_layout, true,
                                          &workspace));
    OP_REQUIRES_OK(ctx, CudaStatus(gpu::LaunchGradW(kDType<T>, ctx->input(0).data(),
                                                    ctx->input(1).data(), dw->data(), N,
                                                    feature_axis_, device_layout,
                                                    TfCudaStream(ctx), workspace.data,
                                                    workspace.bytes),
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
