// CUDA kernels of sparse_dot, the conditional-computation product, behind a plain C++
// interface (no TensorFlow or CUDA headers; see blocksparse_matmul_gpu.h for the conventions:
// device pointers, `CUstream_st*` stream, 0 or a cudaError_t value returned, asynchronous).
//
// Semantics (the same as the CPU kernel, ops/sparse_dot_cpu.h):
//   x (n, m), in_mask (n, m / bs), out_mask (n, p / bs); masks are float32, nonzero = active;
//   expand() repeats each mask entry over its bs features.
//   LaunchSparseDot:      y (n, p) = ((x * expand(in_mask)) . W) * expand(out_mask),
//                         W = w (m, p), or w^T when transpose_w (w is then (p, m)).
//   LaunchSparseDotGradW: dw (m, p) = (x * expand(in_mask))^T . (dy * expand(out_mask)).
//   Every element of the output is written; accumulation is float32 in a fixed order, so
//   results are bitwise reproducible run to run.  dtype: float32, float16 or bfloat16 for x, w
//   (dy) and the output; bs in {1, 8, 16, 32, 64}, dividing m and p.
//
// How work is skipped.  The output features are cut into tile columns of W = max(bs, 16)
// features.  A first kernel lists, for every tile column, the examples with at least one
// active output block in it (ascending).  The products then run over tiles of 64 listed
// examples, and within a tile skip every input tile of W features that none of its examples
// uses.  So the cost follows the active output fraction exactly and the active input fraction
// as far as the examples of a tile agree on their inputs (for independent random masks with
// 64 examples per tile almost no input tile is skipped).  All products run on tensor cores
// (mma.sync, sm_80+): 16-bit inputs directly, float32 as "3xTF32" (operands split into TF32
// high and residual parts, float32 accumulation: float32-level accuracy, not TF32's).  On
// Hopper the 16-bit forward (and so the input gradient) with bs >= 8 and m, p multiples of 64
// runs on wgmma instead, over tiles of 64 output features x 128 listed examples, with no
// input tile skipped (masked-off chunks of x are still never read).
//
// `workspace` (device memory, at least SparseDotWorkspaceBytes(n, p, bs) bytes, any content)
// holds the example lists; it must not be shared by calls that may run concurrently.
#ifndef BLOCKSPARSE_OPS_SPARSE_DOT_GPU_H_
#define BLOCKSPARSE_OPS_SPARSE_DOT_GPU_H_

#include <cstdint>

#include "ops/blocksparse_matmul_gpu.h"

struct CUstream_st;

namespace blocksparse {
namespace gpu {

// Bytes of workspace for n examples and p output features (of the forward product or of dw).
int64_t SparseDotWorkspaceBytes(int64_t n, int64_t p, int64_t bs);

int LaunchSparseDot(DType dtype, const void* x, const void* w, const float* in_mask,
                    const float* out_mask, void* y, int64_t n, int64_t m, int64_t p, int64_t bs,
                    bool transpose_w, void* workspace, int64_t workspace_bytes,
                    CUstream_st* stream);

int LaunchSparseDotGradW(DType dtype, const void* x, const void* dy, const float* in_mask,
                         const float* out_mask, void* dw, int64_t n, int64_t m, int64_t p,
                         int64_t bs, void* workspace, int64_t workspace_bytes,
                         CUstream_st* stream);

}  // namespace gpu
}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_SPARSE_DOT_GPU_H_
