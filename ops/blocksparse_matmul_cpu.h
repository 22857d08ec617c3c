// CPU block-sparse matrix products behind a plain C++ interface (no TensorFlow headers):
// the TensorFlow kernels, and any test harness, call these with raw float32 pointers.
#ifndef BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_CPU_H_
#define BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_CPU_H_

#include <cstdint>
#include <functional>
#include <string>

#include "ops/block_layout.h"

namespace blocksparse {

// Runs work(begin, end) over [0, tasks) on some threads; cost_per_task is a hint in flops.
// Results never depend on how the range is split: every output element is written by
// exactly one task, summing in a fixed order, so the products are bitwise deterministic.
using ParallelFor = std::function<void(int64_t tasks, int64_t cost_per_task,
                                       const std::function<void(int64_t, int64_t)>& work)>;

// Hands out `count` floats of scratch memory, 64-byte aligned, valid until the product
// returns; nullptr if it cannot.  (TensorFlow's allocator reuses memory between calls, where
// fresh operating-system pages would cost a page fault each.)
using ScratchAllocator = std::function<float*(int64_t count)>;

// y = x . W where W (C x K) holds the layout's blocks, w has shape (blocks, bs, bs).
// feature_axis 1: x is (N, C), y is (N, K).  feature_axis 0: x is (C, N), y is (K, N).
// The input gradient dx = dy . W^T is this same product on the transposed layout: with
// w_transposed, block b of w holds the transpose of the product's block b (W's blocks as
// stored, `layout` being W^T's; see BuildTransposedBlockLayout), and each is transposed on
// the way in.  Returns false, writing nothing, if scratch memory could not be had.
bool BlocksparseMatmulCpu(const float* x, const float* w, float* y, int64_t N, int feature_axis,
                          const BlockLayout& layout, const ParallelFor& parallel_for,
                          const ScratchAllocator& scratch, bool w_transposed = false);

// dw[b] = x[:, c-block]^T . dy[:, k-block] for every stored block b = (c, k) only.
// feature_axis as above: x is (N, C) / (C, N), dy is (N, K) / (K, N); dw is (blocks, bs, bs).
bool BlocksparseMatmulGradWCpu(const float* x, const float* dy, float* dw, int64_t N,
                               int feature_axis, const BlockLayout& layout,
                               const ParallelFor& parallel_for, const ScratchAllocator& scratch);

// out[i] = in[i] for i < n: bfloat16 (as its bits) widened to float32, exactly, and float32
// narrowed to bfloat16, rounded to nearest even (a NaN to the quiet NaN of its sign), as
// Eigen converts them; in tasks of parallel_for, vectorized for the kernels' instruction set.
void BFloat16ToFloat(const uint16_t* in, float* out, int64_t n, const ParallelFor& parallel_for);
void FloatToBFloat16(const float* in, uint16_t* out, int64_t n, const ParallelFor& parallel_for);
// The same for float16: widened exactly, narrowed to nearest even (subnormal results kept,
// infinity past the largest finite value, a NaN to a NaN of its sign), as Eigen converts them.
void HalfToFloat(const uint16_t* in, float* out, int64_t n, const ParallelFor& parallel_for);
void FloatToHalf(const float* in, uint16_t* out, int64_t n, const ParallelFor& parallel_for);

// The instruction set named by the environment variable BLOCKSPARSE_TF_CPU_ISA ("" if unset),
// read once: the one place it is read (BestCpuKernels, AmxBf16Enabled).
const std::string& RequestedCpuIsa();

// Name of the instruction set of the kernels in use ("amx", "avx512", "avx2", "generic"): the
// best this processor has, or a narrower one named by BLOCKSPARSE_TF_CPU_ISA, read on first
// use.  "amx" is AVX-512's kernels with AMX tiles for bfloat16 products (blocksparse_matmul_amx.h).
const char* BlocksparseCpuIsa();

}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_CPU_H_
