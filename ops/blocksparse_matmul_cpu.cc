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
  std::vector<float> x_panels(N * C), dy_panels(N * K);
  PackBlockColumns(x, N, C, bs, feature_axis, x_panels.data(), parallel_for);
  PackBlockColumns(dy, N, K, bs, feature_axis, dy_panels.data(), parallel_for);
  const CpuKernels& kernels = Kernels();
  const LayoutView view = ViewOf(layout);
  // Tasks walk the blocks column by column, so neighbouring tasks share a dy panel.
  parallel_for(layout.blocks, 2 * N * bs * bs, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      kernels.grad_w(x_panels.data(), dy_panels.data(), dw, N, &view, q);
    }
  });
}

const char* BlocksparseCpuIsa() { return Kernels().isa; }

}  // namespace blocksparse
