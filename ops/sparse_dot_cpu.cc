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
class ActiveExamples {
 public:
  ActiveExamples(const float* mask, int64_t n, int64_t blocks)
      : words_((n + 63) / 64), bits_(blocks * words_, 0) {
    for (int64_t r = 0; r < n; ++r) {
      const float* row = mask + r * blocks;
      for (int64_t b = 0; b < blocks; ++b) {
        if (row[b] != 0.f) bits_[b * words_ + r / 64] |= uint64_t{1} << (r % 64);
      }
    }
  }

  // The examples active in both this mask's block b and other's block other_b, ascending.
  void ActiveInBoth(int64_t b, const ActiveExamples& other, int64_t other_b,
                    std::vector<int32_t>* rows) const {
    rows->clear();
    const uint64_t* mine = bits_.data() + b * words_;
    const uint64_t* theirs = other.bits_.data() + other_b * words_;
    for (int64_t word = 0; word < words_; ++word) {
      for (uint64_t both = mine[word] & theirs[word]; both; both &= both - 1) {
        rows->push_back(static_cast<int32_t>(word * 64 + __builtin_ctzll(both)));
      }
    }
  }

 private:
  int64_t words_;
  std::vector<uint64_t> bits_;
};

// Runs work(i, j0, j1) for every block row i and every range [j0, j1) of kOutputBlocksPerTask
// block columns, over the thread pool; `cost` is the flop estimate of one (i, range) task.
template <typename Work>
void ForRowsAndColumnRanges(int64_t row_blocks, int64_t col_blocks, int64_t cost,
                            const ParallelFor& parallel_for, const Work& work) {
  const int64_t ranges = (col_blocks + kOutputBlocksPerTask - 1) / kOutputBlocksPerTask;
  parallel_for(row_blocks * ranges, cost, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / ranges, j0 = (task % ranges) * kOutputBlocksPerTask;
      work(i, j0, std::min(col_blocks, j0 + kOutputBlocksPerTask));
    }
  });
}

// block (bs x bs, row stride bs) = the transpose of the bs x bs block at src (row stride src_rs).
// The scattered writes stay in L1.  Each source row is a short run far from the previous one,
// out of the hardware prefetchers' sight, so the block to its right (the next one the caller
// transposes) is fetched while this one is copied.
void TransposeBlock(const float* src, int64_t src_rs, int64_t bs, float* block) {
  constexpr int64_t kFloatsPerLine = 16;
  for (int64_t r = 0; r < bs; ++r, src += src_rs) {
    for (int64_t c = 0; c < bs; c += kFloatsPerLine) __builtin_prefetch(src + bs + c);
    for (int64_t c = 0; c < bs; ++c) block[c * bs + r] = src[c];
  }
}

}  // namespace

void SparseDotCpu(const float* x, const float* w, const float* in_mask, const float* out_mask,
                  float* y, int64_t n, int64_t m, int64_t p, int64_t bs, bool transpose_w,
                  const ParallelFor& parallel_for) {
  const CpuKernels& kernels = BestCpuKernels();
  const int64_t in_blocks = m / bs, out_blocks = p / bs;
  const ActiveExamples active_in(in_mask, n, in_blocks);
  const ActiveExamples active_out(out_mask, n, out_blocks);
  // A task owns a range of output block columns, so each element of y has one writer.  Input
  // blocks run in the outer loop so the x block column being read stays in cache while every
  // output block of the range uses it.
  ForRowsAndColumnRanges(1, out_blocks, 2 * n * m * bs * kOutputBlocksPerTask / 4, parallel_for,
                         [&](int64_t, int64_t j0, int64_t j1) {
    std::vector<int32_t> rows;
    rows.reserve(n);
    std::vector<float> transposed(transpose_w ? bs * bs : 0);
    for (int64_t r = 0; r < n; ++r) std::fill(y + r * p + j0 * bs, y + r * p + j1 * bs, 0.f);
    for (int64_t i = 0; i < in_blocks; ++i) {
      for (int64_t j = j0; j < j1; ++j) {
        active_in.ActiveInBoth(i, active_out, j, &rows);
        if (rows.empty()) continue;
        // W's block (i, j): a block of w, or the transpose of w's block (j, i), made only when
        // some example uses it.
        const float* block = w + i * bs * p + j * bs;
        int64_t block_rs = p;
        if (transpose_w) {
          TransposeBlock(w + j * bs * m + i * bs, m, bs, transposed.data());
          block = transposed.data();
          block_rs = bs;
        }
        kernels.gathered_rows_accumulate(x + i * bs, m, rows.data(), rows.size(), block, block_rs,
                                         bs, y + j * bs, p);
      }
    }
  });
}

void SparseDotGradWCpu(const float* x, const float* dy, const float* in_mask,
                       const float* out_mask, float* dw, int64_t n, int64_t m, int64_t p,
                       int64_t bs, const ParallelFor& parallel_for) {
  const CpuKernels& kernels = BestCpuKernels();
  const int64_t in_blocks = m / bs, out_blocks = p / bs;
  const ActiveExamples active_in(in_mask, n, in_blocks);
  const ActiveExamples active_out(out_mask, n, out_blocks);
  // A task owns the blocks (i, j0..j1) of dw: x's block column i is read once for all of them.
  ForRowsAndColumnRanges(in_blocks, out_blocks, n * bs * bs * kOutputBlocksPerTask / 2,
                         parallel_for, [&](int64_t i, int64_t j0, int64_t j1) {
    std::vector<int32_t> rows;
    rows.reserve(n);
    for (int64_t j = j0; j < j1; ++j) {
      float* block = dw + i * bs * p + j * bs;
      active_in.ActiveInBoth(i, active_out, j, &rows);
      if (rows.empty()) {
        for (int64_t r = 0; r < bs; ++r) std::fill_n(block + r * p, bs, 0.f);
        continue;
      }
      kernels.gathered_rows_grad_w(x + i * bs, m, dy + j * bs, p, rows.data(), rows.size(), bs,
                                   block, p);
    }
  });
}

}  // namespace blocksparse
