#include "ops/sparse_dot_cpu.h"

#include <algorithm>
#include <vector>

#include "ops/blocksparse_matmul_cpu_isa.h"

namespace blocksparse {
namespace {

// Output block columns per task: their slice of y (n x 8 blocks) stays in L2 while the input
// blocks stream past.
constexpr int64_t kOutputBlocksPerTask = 8;

// For every block column of a mask, the examples where it is active, as 64-bit words of bits.
std::vector<uint64_t> ActiveExamples(const float* mask, int64_t n, int64_t blocks, int64_t words) {
  std::vector<uint64_t> bits(blocks * words, 0);
  for (int64_t r = 0; r < n; ++r) {
    const float* row = mask + r * blocks;
    for (int64_t b = 0; b < blocks; ++b) {
      if (row[b] != 0.f) bits[b * words + r / 64] |= uint64_t{1} << (r % 64);
    }
  }
  return bits;
}

}  // namespace

void SparseDotCpu(const float* x, const float* w, const float* in_mask, const float* out_mask,
                  float* y, int64_t n, int64_t m, int64_t p, int64_t bs,
                  const ParallelFor& parallel_for) {
  const CpuKernels& kernels = BestCpuKernels();
  const int64_t in_blocks = m / bs, out_blocks = p / bs, words = (n + 63) / 64;
  const std::vector<uint64_t> in_bits = ActiveExamples(in_mask, n, in_blocks, words);
  const std::vector<uint64_t> out_bits = ActiveExamples(out_mask, n, out_blocks, words);
  // A task owns a range of output block columns.  Input blocks run in the outer loop so the
  // x block column being read stays in cache while every output block of the range uses it.
  const int64_t ranges = (out_blocks + kOutputBlocksPerTask - 1) / kOutputBlocksPerTask;
  parallel_for(ranges, 2 * n * m * bs * kOutputBlocksPerTask / 4, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> rows;
    rows.reserve(n);
    for (int64_t range = begin; range < end; ++range) {
      const int64_t j0 = range * kOutputBlocksPerTask;
      const int64_t j1 = std::min(out_blocks, j0 + kOutputBlocksPerTask);
      for (int64_t r = 0; r < n; ++r) std::fill(y + r * p + j0 * bs, y + r * p + j1 * bs, 0.f);
      for (int64_t i = 0; i < in_blocks; ++i) {
        for (int64_t j = j0; j < j1; ++j) {
          rows.clear();
          for (int64_t word = 0; word < words; ++word) {
            for (uint64_t both = in_bits[i * words + word] & out_bits[j * words + word]; both;
                 both &= both - 1) {
              rows.push_back(static_cast<int32_t>(word * 64 + __builtin_ctzll(both)));
            }
          }
          if (rows.empty()) continue;
          kernels.gathered_rows_accumulate(x + i * bs, m, rows.data(), rows.size(),
                                           w + i * bs * p + j * bs, p, bs, y + j * bs, p);
        }
      }
    }
  });
}

}  // namespace blocksparse
