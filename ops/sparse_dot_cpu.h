// CPU kernels of sparse_dot, the conditional-computation product, behind a plain C++ interface.
#ifndef BLOCKSPARSE_OPS_SPARSE_DOT_CPU_H_
#define BLOCKSPARSE_OPS_SPARSE_DOT_CPU_H_

#include <cstdint>

#include "ops/blocksparse_matmul_cpu.h"

namespace blocksparse {

// y = (x * expand(in_mask)) . W, times expand(out_mask): x is (n, m), W (m, p) is w itself, or
// w^T when transpose_w and w is (p, m) (the input gradient then reads the forward's weights as
// they are, with no transposed copy).  in_mask is (n, m / bs) and out_mask (n, p / bs), nonzero
// meaning active; expand repeats each entry over its bs features.  Work is done only for the
// (example, input block, output block) triples where both masks are active: cost ~ sum over
// examples of active_in x active_out x bs^2.  Every element of y is written; the sum over input
// blocks runs in increasing block order, one thread per output block column, so results are
// deterministic.  `threads`: how many threads parallel_for runs tasks on; the output columns are
// split into tasks by it, the results are the same whatever it is.
void SparseDotCpu(const float* x, const float* w, const float* in_mask, const float* out_mask,
                  float* y, int64_t n, int64_t m, int64_t p, int64_t bs, bool transpose_w,
                  int64_t threads, const ParallelFor& parallel_for);

// The weight gradient dw = (x * expand(in_mask))^T (dy * expand(out_mask)), (m, p), with x
// (n, m), dy (n, p) and the masks as above.  Block (c, k) of dw sums x[r, c-block]^T dy[r, k-block]
// over the examples r active in both in_mask[r, c] and out_mask[r, k] only, in increasing r, and
// is written by one thread: bitwise deterministic whatever the thread count.  Blocks with no
// such example are zero.
void SparseDotGradWCpu(const float* x, const float* dy, const float* in_mask,
                       const float* out_mask, float* dw, int64_t n, int64_t m, int64_t p,
                       int64_t bs, const ParallelFor& parallel_for);

}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_SPARSE_DOT_CPU_H_
