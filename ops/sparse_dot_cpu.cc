#include "ops/sparse_dot_cpu.h"

#include <algorithm>
#include <vector>

#include "ops/blocksparse_matmul_cpu_isa.h"

namespace blocksparse {
namespace {

// Output features per forward task: their slice of y (n x 512, where active) stays in L2
// while the input blocks stream past, and each weight row is read in runs of 2 KiB, long
// enough for the hardware prefetchers whatever the block size.
constexpr int64_t kOutputFeaturesPerTask = 512;
constexpr int64_t kMinForwardTasks = 8;
// Input features the forward visits together for each output block when w is read transposed:
// w's block (j, i) is then followed by (j, i + 1), the next run of the same rows, so that each
// row of w is read in 2 KiB runs rather than one block width at a time.
constexpr int64_t kTransposedInputFeaturesPerGroup = 512;

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

  // Whether some example is active in both this mask's block b and other's block other_b.
  bool AnyInBoth(int64_t b, const ActiveExamples& other, int64_t other_b) const {
    const uint64_t* mine = bits_.data() + b * words_;
    const uint64_t* theirs = other.bits_.data() + other_b * words_;
    for (int64_t word = 0; word < words_; ++word) {
      if (mine[word] & theirs[word]) return true;
    }
    return false;
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

// Asks for the bs rows (stride rs) of the block at src to be brought into the cache.
void PrefetchBlock(const float* src, int64_t rs, int64_t bs) {
  constexpr int64_t kFloatsPerLine = 16;
  for (int64_t r = 0; r < bs; ++r, src += rs) {
    for (int64_t c = 0; c < bs; c += kFloatsPerLine) __builtin_prefetch(src + c);
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
  const WeightBlocks weights{w, m, p, bs, transpose_w};
  // A task owns a range of output block columns, so each element of y has one writer.  Input
  // blocks run in the outer loop so the x block column being read stays in cache while every
  // output block of the range uses it.  Each weight block used is packed once and then serves
  // all its rows from L1.
  // At least kMinForwardTasks tasks where the layer is narrow, so every thread gets work (a
  // split that depends only on the shapes, so results do not depend on the thread count).
  const int64_t blocks_per_task = std::max<int64_t>(
      1, std::min(kOutputFeaturesPerTask / bs, out_blocks / kMinForwardTasks));
  ForTiles<ForwardScratch>(
      1, 1, out_blocks, blocks_per_task, 2 * n * m * bs * blocks_per_task / 4, parallel_for,
      [&](ForwardScratch* scratch, int64_t, int64_t, int64_t j0, int64_t j1) {
    std::vector<int32_t>& rows = scratch->rows;
    rows.reserve(n);
    std::vector<float>& packed = scratch->packed;
    packed.resize(bs * bs);
    for (int64_t r = 0; r < n; ++r) std::fill(y + r * p + j0 * bs, y + r * p + j1 * bs, 0.f);
    const int64_t rs = weights.SourceRowStride();
    // W's block (i, j) times the examples active in both, into y's block column j; (next_i,
    // next_j) is the pair the loops reach next, whose block is fetched meanwhile if used.
    auto multiply_pair = [&](int64_t i, int64_t j, int64_t next_i, int64_t next_j) {
      active_in.ActiveInBoth(i, active_out, j, &rows);
      if (rows.empty()) return;
      const bool next_used = next_i < in_blocks && active_in.AnyInBoth(next_i, active_out, next_j);
      const float* block = weights.Source(i, j);
      const float* next = next_used ? weights.Source(next_i, next_j) : block;
      int64_t block_rs = rs;
      if (transpose_w || static_cast<int64_t>(rows.size()) > kRowsReadInPlace) {
        kernels.pack_block(block, rs, bs, transpose_w, next, packed.data());
        block = packed.data();
        block_rs = bs;
      } else if (next_used) {
        PrefetchBlock(next, rs, bs);
      }
      kernels.exact_rows_accumulate(x + i * bs, m, rows.data(), rows.size(), block, block_rs, bs,
                                    y + j * bs, p);
    };
    // Every y block sums its input blocks in increasing order, whatever the grouping.
    const int64_t group =
        transpose_w ? std::max<int64_t>(1, kTransposedInputFeaturesPerGroup / bs) : 1;
    for (int64_t i0 = 0; i0 < in_blocks; i0 += group) {
      const int64_t i1 = std::min(in_blocks, i0 + group);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) {
          if (i + 1 < i1) {
            multiply_pair(i, j, i + 1, j);
          } else if (j + 1 < j1) {
            multiply_pair(i, j, i0, j + 1);
          } else {
            multiply_pair(i, j, i1, j0);
          }
        }
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
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = j0; j < j1; ++j) {
        float* block = dw + i * bs * p + j * bs;
        active_in.ActiveInBoth(i, active_out, j, &rows);
        if (rows.empty()) {
          for (int64_t r = 0; r < bs; ++r) std::fill_n(block + r * p, bs, 0.f);
          continue;
        }
        // Panels grow to the most active rows seen, not to n: cost follows the active rows.
        if (x_panel.size() < rows.size() * bs) {
          x_panel.resize(rows.size() * bs);
          dy_panel.resize(rows.size() * bs);
        }
        kernels.gather_rows(x + i * bs, m, rows.data(), rows.size(), bs, x_panel.data());
        kernels.gather_rows(dy + j * bs, p, rows.data(), rows.size(), bs, dy_panel.data());
        kernels.panel_grad_w(x_panel.data(), dy_panel.data(), rows.size(), bs, block, p);
      }
    }
  });
}

}  // namespace blocksparse
