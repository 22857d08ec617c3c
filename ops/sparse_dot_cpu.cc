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

// Features of x and of dy one weight-gradient task covers: the task's slices of both (n x 256
// each, where active) are read from memory once and reused from cache by all its blocks.
constexpr int64_t kGradFeaturesPerTask = 256;

// Runs work(&scratch, i0, i1, j0, j1) over the thread pool for tiles of row_tile block rows by
// col_tile block columns covering row_blocks x col_blocks; `cost` is the flop estimate of one
// tile.  Each run of consecutive tiles shares one Scratch, so its buffers are allocated (and
// their pages touched) once per run rather than once per tile.
template <typename Scratch, typename Work>
void ForTiles(int64_t row_blocks, int64_t row_tile, int64_t col_blocks, int64_t col_tile,
              int64_t cost, const ParallelFor& parallel_for, const Work& work) {
  const int64_t row_tiles = (row_blocks + row_tile - 1) / row_tile;
  const int64_t col_tiles = (col_blocks + col_tile - 1) / col_tile;
  parallel_for(row_tiles * col_tiles, cost, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i0 = task / col_tiles * row_tile, j0 = task % col_tiles * col_tile;
      work(&scratch, i0, std::min(row_blocks, i0 + row_tile), j0,
           std::min(col_blocks, j0 + col_tile));
    }
  });
}

// Per-thread buffers of the forward: the examples of one block pair, and one packed weight
// block.
struct ForwardScratch {
  std::vector<int32_t> rows;
  std::vector<float> packed;
};

// Per-thread buffers of the weight gradient: the examples of one block pair, and their rows of
// x and dy gathered into contiguous panels, which the product reads sequentially.
struct GradWScratch {
  std::vector<int32_t> rows;
  std::vector<float> x_panel, dy_panel;
};

// Where the forward's weight blocks live: W's block (i, j) is w's block (i, j), or with
// transpose_w the transpose of w's block (j, i).
struct WeightBlocks {
  const float* w;
  int64_t m, p, bs;
  bool transpose_w;

  const float* Source(int64_t i, int64_t j) const {
    return transpose_w ? w + j * bs * m + i * bs : w + i * bs * p + j * bs;
  }
  int64_t SourceRowStride() const { return transpose_w ? m : p; }
};

// Rows up to which a weight block is read where it lies instead of packed: each of its rows is
// then read from memory once either way, and a copy would only add work.
constexpr int64_t kRowsReadInPlace = 4;

}  // namespace

void SparseDotCpu(const float* x, const float* w, const float* in_mask, const float* out_mask,
                  float* y, int64_t n, int64_t m, int64_t p, int64_t bs, bool transpose_w,
                  const ParallelFor& parallel_for) {
  const CpuKernels& kernels = BestCpuKernels();
  const int64_t in_blocks = m / bs, out_blocks = p / bs;
  const ActiveExamples active_in(in_mask, n, in_blocks);
  const ActiveExamples active_out(out_mask, n, out_blocks);
  const WeightBlocks weights{w, m, p, bs, transpose_w};
  // A task owns a range of output block columns, so each element of y has one writer.  Input
  // blocks run in the outer loop so the x block column being read stays in cache while every
  // output block of the range uses it.  Each weight block used is packed once and then serves
  // all its rows from L1.
  ForTiles<ForwardScratch>(
      1, 1, out_blocks, kOutputBlocksPerTask, 2 * n * m * bs * kOutputBlocksPerTask / 4,
      parallel_for, [&](ForwardScratch* scratch, int64_t, int64_t, int64_t j0, int64_t j1) {
    std::vector<int32_t>& rows = scratch->rows;
    rows.reserve(n);
    std::vector<float>& packed = scratch->packed;
    packed.resize(bs * bs);
    for (int64_t r = 0; r < n; ++r) std::fill(y + r * p + j0 * bs, y + r * p + j1 * bs, 0.f);
    for (int64_t i = 0; i < in_blocks; ++i) {
      for (int64_t j = j0; j < j1; ++j) {
        active_in.ActiveInBoth(i, active_out, j, &rows);
        if (rows.empty()) continue;
        const float* block = weights.Source(i, j);
        int64_t block_rs = weights.SourceRowStride();
        if (transpose_w || static_cast<int64_t>(rows.size()) > kRowsReadInPlace) {
          // The block the loops reach next, fetched while this one is packed.
          const float* next = j + 1 < j1 ? weights.Source(i, j + 1)
                                         : weights.Source(std::min(i + 1, in_blocks - 1), j0);
          kernels.pack_block(block, block_rs, bs, transpose_w, next, packed.data());
          block = packed.data();
          block_rs = bs;
        }
        kernels.exact_rows_accumulate(x + i * bs, m, rows.data(), rows.size(), block, block_rs,
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
  // A task owns a tile of dw's blocks, square in features, so that each x and dy element it
  // reads serves a whole row or column of the tile (traffic ~ n (m + p) x m p / tile area,
  // where tiles one block wide would re-read all of dy for every block row).
  const int64_t tile = std::max<int64_t>(1, kGradFeaturesPerTask / bs);
  ForTiles<GradWScratch>(
      in_blocks, tile, out_blocks, tile, n * bs * bs * tile * tile / 2, parallel_for,
      [&](GradWScratch* scratch, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    std::vector<int32_t>& rows = scratch->rows;
    rows.reserve(n);
    std::vector<float>& x_panel = scratch->x_panel;
    std::vector<float>& dy_panel = scratch->dy_panel;
    x_panel.resize(n * bs);
    dy_panel.resize(n * bs);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = j0; j < j1; ++j) {
        float* block = dw + i * bs * p + j * bs;
        active_in.ActiveInBoth(i, active_out, j, &rows);
        if (rows.empty()) {
          for (int64_t r = 0; r < bs; ++r) std::fill_n(block + r * p, bs, 0.f);
          continue;
        }
        kernels.gather_rows(x + i * bs, m, rows.data(), rows.size(), bs, x_panel.data());
        kernels.gather_rows(dy + j * bs, p, rows.data(), rows.size(), bs, dy_panel.data());
        kernels.panel_grad_w(x_panel.data(), dy_panel.data(), rows.size(), bs, block, p);
      }
    }
  });
}

}  // namespace blocksparse
