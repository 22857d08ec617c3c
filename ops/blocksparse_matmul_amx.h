// bfloat16 block-sparse products on Intel AMX tiles (plain C++, no TensorFlow headers).
//
// AMX's TDPBF16PS multiplies bfloat16 pairs and sums them in float32 in hardware, 16 x 16
// outputs at a time, where the AVX-512 kernels widen bfloat16 to float32 first and compute in
// float32 vectors: on processors that have it (Intel Xeon from Sapphire Rapids on) it is the
// unit dense bfloat16 matrix products run on.  As on that unit everywhere, bfloat16 inputs
// and float32 partial sums that are subnormal count as zero, and the sums are added in an
// order of the hardware's (the same every run, on any number of threads); each output is
// rounded to bfloat16 once, to nearest even.
#ifndef BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_AMX_H_
#define BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_AMX_H_

#include <cstdint>

#include "ops/block_layout.h"
#include "ops/blocksparse_matmul_cpu.h"

namespace blocksparse {

// Whether these kernels run for bfloat16 products: the processor has AMX-TILE and AMX-BF16,
// the operating system let this process use the tile registers, and BLOCKSPARSE_TF_CPU_ISA
// is unset or "amx" (any narrower name turns them off).  Decided once, on first use.
bool AmxBf16Enabled();

// Whether they serve a product of block size bs: enabled, and bs 16, 32 or 64 (the others run
// the float32 kernels on widened copies).
bool AmxBf16Serves(int64_t bs);

// BlocksparseMatmulCpu for bfloat16 (as its bits): with feature_axis 1 x is (N, C) and y
// (N, K), with 0 x is (C, N) and y (K, N); w (blocks, bs, bs); with w_transposed, the input
// gradient as there.  Returns false, writing nothing, if scratch memory could not be had.
bool BlocksparseMatmulAmxBf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t N,
                              int feature_axis, const BlockLayout& layout,
                              const ParallelFor& parallel_for, const ScratchAllocator& scratch,
                              bool w_transposed);

// BlocksparseMatmulGradWCpu for bfloat16: x (N, C) and dy (N, K) with feature_axis 1, (C, N)
// and (K, N) with 0.
bool BlocksparseMatmulGradWAmxBf16(const uint16_t* x, const uint16_t* dy, uint16_t* dw,
                                   int64_t N, int feature_axis, const BlockLayout& layout,
                                   const ParallelFor& parallel_for,
                                   const ScratchAllocator& scratch);

}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_AMX_H_
