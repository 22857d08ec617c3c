// CPU kernel of sparse_dot, the conditional-computation product, behind a plain C++ interface.
#ifndef BLOCKSPARSE_OPS_SPARSE_DOT_CPU_H_
#define BLOCKSPARSE_OPS_SPARSE_DOT_CPU_H_

#include <cstdint>

#include "ops/blocksparse_matmul_cpu.h"

namespace blocksparse {

// y = (x * expand(in_mask)) . w, times expand(out_mask): x is (n, m), w is (m, p) dense,
// in_mask is (n, m / bs) and out_mask (n, p / bs), nonzero meaning active; expand repeats each
// entry over its bs features.  Work is done only for the (example, input block, output block)
// triples where both masks are active: cost ~ sum over examples of active_in x active_out x bs^2.
// Every element of y is written; the sum over input blocks runs in increasing block order, one
// thread per output block column, so results are deterministic.
void SparseDotCpu(const float* x, const float* w, const float* in_mask, const float* out_mask,
                  float* y, int64_t n, int64_t m, int64_t p, int64_t bs,
                  const ParallelFor& parallel_for);

}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_SPARSE_DOT_CPU_H_
