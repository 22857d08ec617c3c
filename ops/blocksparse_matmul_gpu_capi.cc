// extern "C" shim over blocksparse_matmul_gpu.h and sparse_dot_gpu.h for ctypes
// (tools/gpu_check.py, tools/gpu_check_sparse_dot.py).
// dtype: 0 float32, 1 float16, 2 bfloat16.  layout: an array of 7 pointers (col_ptr, col_row,
// col_block, block_row, block_col in device memory, then the host copies of col_ptr and of
// col_row, or nulls) and 4
// sizes (CB, KB, block_size, blocks); its 64-wide cover likewise (null for none) with its block
// count.  workspace: a device pointer and its size in bytes (nullptr and 0 for none).
// Returns 0 or a cudaError_t value.
#include <cstdint>

#include "ops/block_layout.h"
#include "ops/blocksparse_matmul_gpu.h"
#include "ops/sparse_dot_gpu.h"

namespace {
blocksparse::gpu::DeviceLayout MakeLayout(const int32_t* col_ptr, const int32_t* col_row,
                                          const int32_t* col_block, const int32_t* block_row,
                                          const int32_t* block_col,
                                          const int32_t* host_col_ptr,
                                          const int32_t* host_col_row, int64_t CB, int64_t KB,
                                          int64_t bs, int64_t blocks) {
  blocksparse::gpu::DeviceLayout L;
  L.host_col_ptr = host_col_ptr;
  L.host_col_row = host_col_row;
  L.col_ptr = col_ptr;
  L.col_row = col_row;
  L.col_block = col_block;
  L.block_row = block_row;
  L.block_col = block_col;
  L.CB = CB;
  L.KB = KB;
  L.block_size = bs;
  L.blocks = blocks;
  return L;
}

// A layout and its 64-wide cover (tables `cover`: col_ptr, col_row, col_block, block_row,
// block_col, host col_ptr, host col_row; cover_blocks < 0 or null tables: none).  Lives for
// one call.
struct LayoutWithCover {
  blocksparse::gpu::DeviceLayout layout, cover;

  LayoutWithCover(const int32_t* const* tables, int64_t CB, int64_t KB, int64_t bs,
                  int64_t blocks, const int32_t* const* cover_tables, int64_t cover_blocks)
      : layout(MakeLayout(tables[0], tables[1], tables[2], tables[3], tables[4], tables[5],
                          tables[6], CB, KB, bs, blocks)) {
    if (cover_tables != nullptr && cover_blocks >= 0 && blocksparse::HasCover(bs)) {
      const int64_t f = blocksparse::kCoverBlockSize / bs;
      cover = MakeLayout(cover_tables[0], cover_tables[1], cover_tables[2], cover_tables[3],
                         cover_tables[4], cover_tables[5], cover_tables[6], CB / f, KB / f,
                         blocksparse::kCoverBlockSize, cover_blocks);
      layout.coarse = &cover;
    }
  }
  LayoutWithCover(const LayoutWithCover&) = delete;  // layout.coarse points into this object
  LayoutWithCover& operator=(const LayoutWithCover&) = delete;
};
}  // namespace

extern "C" {

// tables: the layout's 7 pointers; cover: its 64-wide cover's (or null), with
// cover_blocks blocks.
int bsmm_gpu_forward(int dtype, const void* x, const void* w, void* y, int64_t N,
                     int feature_axis, const int32_t* const* tables, int64_t CB, int64_t KB,
                     int64_t bs, int64_t blocks, const int32_t* const* cover,
                     int64_t cover_blocks, void* workspace, int64_t workspace_bytes,
                     void* stream) {
  const LayoutWithCover L(tables, CB, KB, bs, blocks, cover, cover_blocks);
  return blocksparse::gpu::LaunchForward(static_cast<blocksparse::gpu::DType>(dtype), x, w, y, N,
                                         feature_axis, L.layout,
                                         static_cast<CUstream_st*>(stream), workspace,
                                         workspace_bytes);
}

int bsmm_gpu_grad_w(int dtype, const void* x, const void* dy, void* dw, int64_t N,
                    int feature_axis, const int32_t* const* tables, int64_t CB, int64_t KB,
                    int64_t bs, int64_t blocks, const int32_t* const* cover,
                    int64_t cover_blocks, void* workspace, int64_t workspace_bytes,
                    void* stream) {
  const LayoutWithCover L(tables, CB, KB, bs, blocks, cover, cover_blocks);
  return blocksparse::gpu::LaunchGradW(static_cast<blocksparse::gpu::DType>(dtype), x, dy, dw, N,
                                       feature_axis, L.layout, static_cast<CUstream_st*>(stream),
                                       workspace, workspace_bytes);
}

int bsmm_gpu_forward_transposed_w(int dtype, const void* x, const void* w, void* y, int64_t N,
                                  int feature_axis, const int32_t* const* tables, int64_t CB,
                                  int64_t KB, int64_t bs, int64_t blocks,
                                  const int32_t* const* cover, int64_t cover_blocks,
                                  void* workspace, int64_t workspace_bytes, void* stream) {
  const LayoutWithCover L(tables, CB, KB, bs, blocks, cover, cover_blocks);
  return blocksparse::gpu::LaunchForwardTransposedW(
      static_cast<blocksparse::gpu::DType>(dtype), x, w, y, N, feature_axis, L.layout,
      static_cast<CUstream_st*>(stream), workspace, workspace_bytes);
}

int64_t bsmm_gpu_workspace_bytes(int dtype, int64_t N, int feature_axis,
                                 const int32_t* const* tables, int64_t CB, int64_t KB,
                                 int64_t bs, int64_t blocks, const int32_t* const* cover,
                                 int64_t cover_blocks, int grad_w) {
  const LayoutWithCover L(tables, CB, KB, bs, blocks, cover, cover_blocks);
  return blocksparse::gpu::WorkspaceBytes(static_cast<blocksparse::gpu::DType>(dtype), N,
                                          feature_axis, L.layout, grad_w != 0);
}

const char* bsmm_gpu_error_string(int code) { return blocksparse::gpu::ErrorString(code); }

int bsmm_gpu_selected_path(int dtype, int64_t N, int feature_axis, int64_t bs, int grad_w) {
  return blocksparse::gpu::SelectedPath(static_cast<blocksparse::gpu::DType>(dtype), N,
                                        feature_axis, bs, grad_w != 0);
}

void bsmm_gpu_set_tuning(int variant) { blocksparse::gpu::SetTuning(variant); }

int64_t sdot_gpu_workspace_bytes(int64_t n, int64_t p, int64_t bs) {
  return blocksparse::gpu::SparseDotWorkspaceBytes(n, p, bs);
}

int sdot_gpu_forward(int dtype, const void* x, const void* w, const float* in_mask,
                     const float* out_mask, void* y, int64_t n, int64_t m, int64_t p, int64_t bs,
                     int transpose_w, void* workspace, int64_t workspace_bytes, void* stream) {
  return blocksparse::gpu::LaunchSparseDot(
      static_cast<blocksparse::gpu::DType>(dtype), x, w, in_mask, out_mask, y, n, m, p, bs,
      transpose_w != 0, workspace, workspace_bytes, static_cast<CUstream_st*>(stream));
}

int sdot_gpu_grad_w(int dtype, const void* x, const void* dy, const float* in_mask,
                    const float* out_mask, void* dw, int64_t n, int64_t m, int64_t p, int64_t bs,
                    void* workspace, int64_t workspace_bytes, void* stream) {
  return blocksparse::gpu::LaunchSparseDotGradW(
      static_cast<blocksparse::gpu::DType>(dtype), x, dy, in_mask, out_mask, dw, n, m, p, bs,
      workspace, workspace_bytes, static_cast<CUstream_st*>(stream));
}

}  // extern "C"
