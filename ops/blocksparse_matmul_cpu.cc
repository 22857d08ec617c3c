#include "ops/blocksparse_matmul_cpu.h"

#include <algorithm>
#include <vector>

#include "ops/blocksparse_matmul_cpu_isa.h"

namespace blocksparse {
namespace {

const CpuKernels& Kernels() {
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

LayoutView ViewOf(const BlockLayout& l) {
  return LayoutView{l.CB,           l.KB,           l.block_size,    l.blocks,
                    l.block_row.data(), l.block_col.data(), l.col_ptr.data(),
                    l.col_row.data(), l.col_block.data()};
}

// Rows of x that share one packed panel set while every weight column streams past them:
// 64 rows of a 4096-wide x is 1 MiB, which stays in a core's L2.
constexpr int64_t kRowsPerGroup = 64;
// Columns of y one feature_axis=0 task covers.
constexpr int64_t kColumnsPerTask = 256;

// out (cols, rows) = in (rows, cols)^T, in tiles so both sides stay in cache.
void Transpose(const float* in, int64_t rows, int64_t cols, float* out,
               const ParallelFor& parallel_for) {
  constexpr int64_t kTile = 32;
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  parallel_for(row_tiles, kTile * cols * 4, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin * kTile; r0 < std::min(rows, end * kTile); r0 += kTile) {
      const int64_t r1 = std::min(rows, r0 + kTile);
      for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
        const int64_t c1 = std::min(cols, c0 + kTile);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = c0; c < c1; ++c) out[c * rows + r] = in[r * cols + c];
      }
    }
  });
}

void ForwardFeatureAxis1(const float* x, const float* w, float* y, int64_t N,
                         const BlockLayout& layout, const ParallelFor& parallel_for) {
  const CpuKernels& kernels = Kernels();
  const int64_t bs = layout.block_size, C = layout.CB * bs;
  const int64_t tile = kernels.row_tile;
  const int64_t tiles = (N + tile - 1) / tile;
  // Panels: x re-laid so the tile's rows for one input feature are adjacent (zero-padded).
  std::vector<float> panels(tiles * tile * C);
  parallel_for(tiles, tile * C * 2, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* panel = panels.data() + t * tile * C;
      const int64_t rows = std::min(tile, N - t * tile);
      for (int64_t m = 0; m < rows; ++m) {
        const float* row = x + (t * tile + m) * C;
        for (int64_t c = 0; c < C; ++c) panel[c * tile + m] = row[c];
      }
      for (int64_t m = rows; m < tile; ++m)
        for (int64_t c = 0; c < C; ++c) panel[c * tile + m] = 0.f;
    }
  });
  const LayoutView view = ViewOf(layout);
  const int64_t tiles_per_group = std::max<int64_t>(1, kRowsPerGroup / tile);
  const int64_t groups = (tiles + tiles_per_group - 1) / tiles_per_group;
  const int64_t KB = layout.KB;
  const int64_t cost = 2 * kRowsPerGroup * bs * bs * std::max<int64_t>(1, layout.blocks / KB);
  parallel_for(groups * KB, cost, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / KB, k = task % KB;
      const int64_t t0 = g * tiles_per_group, t1 = std::min(tiles, t0 + tiles_per_group);
      kernels.forward_axis1(panels.data(), w, y, N, &view, t0, t1, k);
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

}  // namespace

void BlocksparseMatmulCpu(const float* x, const float* w, float* y, int64_t N, int feature_axis,
                          const BlockLayout& layout, const ParallelFor& parallel_for) {
  if (feature_axis == 1) {
    ForwardFeatureAxis1(x, w, y, N, layout, parallel_for);
  } else {
    ForwardFeatureAxis0(x, w, y, N, layout, parallel_for);
  }
}

void BlocksparseMatmulGradWCpu(const float* x, const float* dy, float* dw, int64_t N,
                               int feature_axis, const BlockLayout& layout,
                               const ParallelFor& parallel_for) {
  const int64_t bs = layout.block_size, C = layout.CB * bs, K = layout.KB * bs;
  std::vector<float> x_rows, dy_rows;
  if (feature_axis == 0) {
    // The kernel reads both operands row by row over N: transpose (C, N) -> (N, C) once.
    x_rows.resize(N * C);
    dy_rows.resize(N * K);
    Transpose(x, C, N, x_rows.data(), parallel_for);
    Transpose(dy, K, N, dy_rows.data(), parallel_for);
    x = x_rows.data();
    dy = dy_rows.data();
  }
  const CpuKernels& kernels = Kernels();
  const LayoutView view = ViewOf(layout);
  // Tasks walk the blocks column by column, so neighbouring tasks share dy's block column.
  parallel_for(layout.blocks, 2 * N * bs * bs, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) kernels.grad_w_axis1(x, dy, dw, N, &view, q);
  });
}

const char* BlocksparseCpuIsa() { return Kernels().isa; }

}  // namespace blocksparse
