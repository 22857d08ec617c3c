#include "ops/blocksparse_matmul_cpu.h"

#include <algorithm>

#include "ops/blocksparse_matmul_cpu_isa.h"

namespace blocksparse {
namespace {

const CpuKernels& Kernels() { return BestCpuKernels(); }

LayoutView ViewOf(const BlockLayout& l) {
  return LayoutView{l.CB,           l.KB,           l.block_size,      l.blocks,
                    l.block_row.data(), l.block_col.data(), l.col_ptr.data(), l.col_row.data(),
                    l.col_block.data()};
}

// At most this many rows of x share one packed panel set while every weight column streams
// past them: 96 rows of a 4096-wide x is 1.5 MiB, which stays in a core's L2.
constexpr int64_t kRowsPerGroup = 96;
// Weight bytes of the output block columns one feature_axis=1 task covers.
constexpr int64_t kWeightBytesPerRange = 512 * 1024;
// Columns of y one feature_axis=0 task covers.
constexpr int64_t kColumnsPerTask = 256;

// Block-column panels: panels[(c * N + n) * bs + i] = feature c*bs + i of vector n, so each
// block's slice of the N vectors is one contiguous (N, bs) array.  Reads x (N, F) row by row
// (feature_axis 1) or x (F, N) (feature_axis 0, a blocked transpose).
void PackBlockColumns(const float* x, int64_t N, int64_t F, int64_t bs, int feature_axis,
                      float* panels, const ParallelFor& parallel_for) {
  const int64_t block_columns = F / bs;
  parallel_for(block_columns, N * bs * 2, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      float* panel = panels + c * N * bs;
      if (feature_axis == 1) {
        for (int64_t n = 0; n < N; ++n)
          std::copy_n(x + n * F + c * bs, bs, panel + n * bs);
      } else {
        constexpr int64_t kChunk = 64;  // columns of x per pass, to keep writes in cache
        for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
          const int64_t n1 = std::min(N, n0 + kChunk);
          for (int64_t i = 0; i < bs; ++i) {
            const float* row = x + (c * bs + i) * N;
            for (int64_t n = n0; n < n1; ++n) panel[n * bs + i] = row[n];
          }
        }
      }
    }
  });
}

// out (cols, rows) = in (rows, cols)^T, in tiles so both sides stay in cache.
void Transpose(const float* in, int64_t rows, int64_t cols, float* out,
               const ParallelFor& parallel_for) {
  constexpr int64_t kTile = 32;
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  parallel_for(row_tiles, kTile * cols * 2, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin * kTile; r0 < std::min(rows, end * kTile); r0 += kTile) {
      const int64_t r1 = std::min(rows, r0 + kTile);
      for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
        const int64_t c1 = std::min(cols, c0 + kTile);
        // Contiguous writes; the tile's reads stay in L1 across its columns.
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r) out[c * rows + r] = in[r * cols + c];
      }
    }
  });
}

void ForwardFeatureAxis0(const float* x, const float* w, float* y, int64_t N,
                         const BlockLayout& layout, const ParallelFor& parallel_for) {
  const CpuKernels& kernels = Kernels();
  const LayoutView view = ViewOf(layout);
  const int64_t bs = layout.block_size, KB = layout.KB;
  const int64_t column_tasks = std::max<int64_t>(1, (N + kColumnsPerTask - 1) / kColumnsPerTask);
  const int64_t cost = 2 * kColumnsPerTask * bs * bs * std::max<int64_t>(1, layout.blocks / KB);
  parallel_for(KB * column_tasks, cost, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / column_tasks, n0 = (task % column_tasks) * kColumnsPerTask;
      kernels.forward_axis0(x, w, y, N, &view, k, n0, std::min(N, n0 + kColumnsPerTask));
    }
  });
}

bool ForwardFeatureAxis1(const float* x, const float* w, float* y, int64_t N,
                         const BlockLayout& layout, const ParallelFor& parallel_for,
                         const ScratchAllocator& scratch) {
  const CpuKernels& kernels = Kernels();
  const int64_t bs = layout.block_size, C = layout.CB * bs, K = layout.KB * bs;
  if (bs < kernels.vector_width) {
    // Narrow blocks would fill only part of each vector: compute y^T = W^T x^T instead, with
    // vectors along N, at the price of two transposes.
    float* const x_t = scratch(N * C);
    float* const y_t = scratch(N * K);
    if (x_t == nullptr || y_t == nullptr) return false;
    Transpose(x, N, C, x_t, parallel_for);
    ForwardFeatureAxis0(x_t, w, y_t, N, layout, parallel_for);
    Transpose(y_t, K, N, y, parallel_for);
    return true;
  }
  const int64_t tile = kernels.row_tile;
  const int64_t tiles = (N + tile - 1) / tile;
  // Panels: x re-laid so the tile's rows for one input feature are adjacent (zero-padded).
  float* const panels = scratch(tiles * tile * C);
  if (panels == nullptr) return false;
  parallel_for(tiles, tile * C * 2, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* panel = panels + t * tile * C;
      const int64_t rows = std::min(tile, N - t * tile);
      const float* x_tile = x + t * tile * C;
      for (int64_t c = 0; c < C; ++c, panel += tile) {  // sequential writes, `rows` read streams
        for (int64_t m = 0; m < rows; ++m) panel[m] = x_tile[m * C + c];
        for (int64_t m = rows; m < tile; ++m) panel[m] = 0.f;
      }
    }
  });
  const LayoutView view = ViewOf(layout);
  // Equal groups: each one streams all of w, so a nearly empty last group would cost as
  // much weight traffic as a full one.
  const int64_t max_tiles_per_group = std::max<int64_t>(1, kRowsPerGroup / tile);
  const int64_t groups = std::max<int64_t>(1, (tiles + max_tiles_per_group - 1) / max_tiles_per_group);
  const int64_t tiles_per_group = (tiles + groups - 1) / groups;
  // A task: one row group times a range of output block columns whose weights stay in L2
  // while the group's tiles pass over them.  Wide ranges also write y in long runs; at least
  // 8 tasks keep both cores busy.
  const int64_t KB = layout.KB;
  const int64_t column_bytes = std::max<int64_t>(1, layout.blocks * bs * bs * 4 / KB);
  int64_t per_range = std::clamp<int64_t>(kWeightBytesPerRange / column_bytes, 1, KB);
  per_range = std::min(per_range, std::max<int64_t>(1, KB * groups / 8));
  const int64_t ranges = (KB + per_range - 1) / per_range;
  const int64_t cost = 2 * kRowsPerGroup * bs * bs * layout.blocks / ranges;
  parallel_for(groups * ranges, cost, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / ranges, r = task % ranges;
      const int64_t t0 = g * tiles_per_group, t1 = std::min(tiles, t0 + tiles_per_group);
      const int64_t k0 = r * per_range, k1 = std::min(KB, k0 + per_range);
      kernels.forward_axis1(panels, w, y, N, &view, t0, t1, k0, k1);
    }
  });
  return true;
}

}  // namespace

const CpuKernels& BestCpuKernels() {
  static const CpuKernels* kernels = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) {
      return &avx512::kKernels;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &avx2::kKernels;
    return &generic::kKernels;
  }();
  return *kernels;
}

bool BlocksparseMatmulCpu(const float* x, const float* w, float* y, int64_t N, int feature_axis,
                          const BlockLayout& layout, const ParallelFor& parallel_for,
                          const ScratchAllocator& scratch) {
  if (feature_axis == 1) return ForwardFeatureAxis1(x, w, y, N, layout, parallel_for, scratch);
  ForwardFeatureAxis0(x, w, y, N, layout, parallel_for);
  return true;
}

bool BlocksparseMatmulGradWCpu(const float* x, const float* dy, float* dw, int64_t N,
                               int feature_axis, const BlockLayout& layout,
                               const ParallelFor& parallel_for, const ScratchAllocator& scratch) {
  const int64_t bs = layout.block_size, C = layout.CB * bs, K = layout.KB * bs;
  float* const x_panels = scratch(N * C);
  float* const dy_panels = scratch(N * K);
  if (x_panels == nullptr || dy_panels == nullptr) return false;
  PackBlockColumns(x, N, C, bs, feature_axis, x_panels, parallel_for);
  PackBlockColumns(dy, N, K, bs, feature_axis, dy_panels, parallel_for);
  const CpuKernels& kernels = Kernels();
  const LayoutView view = ViewOf(layout);
  // Tasks walk the blocks column by column, so neighbouring tasks share a dy panel.
  parallel_for(layout.blocks, 2 * N * bs * bs, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      kernels.grad_w(x_panels, dy_panels, dw, N, &view, q);
    }
  });
  return true;
}

const char* BlocksparseCpuIsa() { return Kernels().isa; }

}  // namespace blocksparse
