// Times one of the op's CPU micro-kernels against LIBXSMM's JIT kernel for the same product,
// on the same operands, on one thread; built and run by benchmarks/bench_libxsmm.py.
//
//   libxsmm_compare forward|grad_w BLOCK_SIZE DENSITY ROWS REPEATS
//
// forward: y (ROWS, 4096) = x . W for a random layout over 4096 x 4096, as one task of the op
//   runs it (ops/blocksparse_matmul_cpu.cc, ForwardFeatureAxis1): x as row-tile panels, the
//   output block columns in ranges of 512 KiB of weights (kWeightBytesPerRange there).
//   LIBXSMM: per output block column, one batch-reduce GEMM over the column's blocks (the
//   column's sums kept in registers across its blocks, as ours are), x as block-column panels.
// grad_w: dw = x^T . dy at every stored block, from block-column panels of ROWS rows, one
//   block at a time in layout order.  LIBXSMM: one GEMM per block (B transposed).
//
// Prints one line: "ours_s libxsmm_s flops max_abs_diff max_abs_value" (fastest of REPEATS).
// Both sides sum each element in the same order, so the two results are expected to agree
// bit for bit; the caller checks them within float32 rounding either way.

#include <libxsmm.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "ops/block_layout.h"
#include "ops/blocksparse_matmul_cpu_isa.h"

#ifndef COMPARE_ISA
#error "define COMPARE_ISA to the kernel namespace compiled alongside (avx512 or avx2)"
#endif

namespace {

using blocksparse::BlockLayout;
using blocksparse::CpuKernels;
using blocksparse::LayoutView;

constexpr int64_t kFeatures = 4096;
constexpr int64_t kWeightBytesPerRange = 512 * 1024;

double Seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

template <typename F>
double Fastest(int repeats, F&& f) {
  f();  // warm up (LIBXSMM generates its kernel on the first dispatch)
  double best = 1e30;
  for (int i = 0; i < repeats; ++i) {
    const double start = Seconds();
    f();
    best = std::min(best, Seconds() - start);
  }
  return best;
}

std::vector<float> AlignedVector(size_t n) { return std::vector<float>(n + 16); }
float* Aligned(std::vector<float>& v) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t{63});
}

struct Problem {
  int64_t bs, rows, blocks;
  BlockLayout layout;
  LayoutView view;
};

Problem RandomProblem(int64_t bs, double density, int64_t rows, std::mt19937* rng) {
  Problem p{bs, rows, 0, {}, {}};
  const int64_t nb = kFeatures / bs;
  std::vector<int32_t> coords;
  std::uniform_real_distribution<double> u(0, 1);
  for (int64_t c = 0; c < nb; ++c)
    for (int64_t k = 0; k < nb; ++k)
      if (u(*rng) < density) coords.insert(coords.end(), {int32_t(c), int32_t(k)});
  if (coords.empty()) coords = {0, 0};
  p.blocks = coords.size() / 2;
  const std::string error = blocksparse::BuildBlockLayout(coords.data(), p.blocks, nb, nb, bs,
                                                          &p.layout);
  if (!error.empty()) {
    std::fprintf(stderr, "%s\n", error.c_str());
    std::exit(2);
  }
  const BlockLayout& l = p.layout;
  p.view = {l.CB, l.KB, l.block_size, l.blocks, l.block_row.data(), l.block_col.data(),
            l.col_ptr.data(), l.col_row.data(), l.col_block.data()};
  return p;
}

void Fill(float* data, size_t n, std::mt19937* rng) {
  std::uniform_real_distribution<float> u(-1, 1);
  for (size_t i = 0; i < n; ++i) data[i] = u(*rng);
}

// x (rows, features) as block-column panels: panel c holds rows x bs floats.
void PackBlockColumns(const float* x, int64_t rows, int64_t bs, float* out) {
  for (int64_t c = 0; c < kFeatures / bs; ++c)
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(out + (c * rows + r) * bs, x + r * kFeatures + c * bs, bs * sizeof(float));
}

// x as CpuKernels::forward_axis1's row-tile panels (zero rows completing the last tile).
void PackRowTiles(const float* x, int64_t rows, int64_t bs, int64_t tile, float* out) {
  const int64_t CB = kFeatures / bs;
  for (int64_t t0 = 0; t0 < rows; t0 += tile)
    for (int64_t c = 0; c < CB; ++c)
      for (int64_t m = 0; m < tile; ++m, out += bs) {
        if (t0 + m < rows) {
          std::memcpy(out, x + (t0 + m) * kFeatures + c * bs, bs * sizeof(float));
        } else {
          std::memset(out, 0, bs * sizeof(float));
        }
      }
}

struct Result {
  double ours, theirs, flops, max_diff, max_value;
};

// Times both sides, then compares what they wrote (ours_out against theirs_out).
template <typename Ours, typename Theirs>
Result TimeAndCompare(int repeats, Ours&& ours, Theirs&& theirs, const std::vector<float>& ours_out,
                      const std::vector<float>& theirs_out, double flops) {
  Result r{Fastest(repeats, ours), Fastest(repeats, theirs), flops, 0, 0};
  for (size_t i = 0; i < ours_out.size(); ++i) {
    r.max_diff = std::max(r.max_diff, double(std::fabs(ours_out[i] - theirs_out[i])));
    r.max_value = std::max(r.max_value, double(std::fabs(ours_out[i])));
  }
  return r;
}

Result Forward(const CpuKernels& kernels, const Problem& p, int repeats, std::mt19937* rng) {
  const int64_t bs = p.bs, rows = p.rows, KB = p.layout.KB, tile = kernels.row_tile;
  const int64_t tiles = (rows + tile - 1) / tile;
  auto x_store = AlignedVector(rows * kFeatures), w_store = AlignedVector(p.blocks * bs * bs);
  auto tiles_store = AlignedVector(tiles * tile * kFeatures);
  auto columns_store = AlignedVector(rows * kFeatures);
  float *x = Aligned(x_store), *w = Aligned(w_store);
  Fill(x, rows * kFeatures, rng);
  Fill(w, p.blocks * bs * bs, rng);
  float* row_tiles = Aligned(tiles_store);
  float* block_columns = Aligned(columns_store);
  PackRowTiles(x, rows, bs, tile, row_tiles);
  PackBlockColumns(x, rows, bs, block_columns);
  std::vector<float> y_ours(rows * kFeatures), y_theirs(rows * kFeatures);

  const int64_t column_bytes = std::max<int64_t>(1, p.blocks * bs * bs * 4 / KB);
  const int64_t per_range = std::clamp<int64_t>(kWeightBytesPerRange / column_bytes, 1, KB);
  auto ours = [&] {
    for (int64_t k0 = 0; k0 < KB; k0 += per_range)
      kernels.forward_axis1(row_tiles, w, y_ours.data(), rows, &p.view, k0,
                            std::min(KB, k0 + per_range));
  };

  // Column-major terms: y^T (bs x rows, ld 4096) = sum over the column's blocks of
  // W_block^T (bs x bs, ld bs) . panel_c^T (bs x rows, ld bs).
  const libxsmm_blasint m = bs, n = rows, k = bs, lda = bs, ldb = bs, ldc = kFeatures;
  const float alpha = 1, beta = 0;
  const int flags = LIBXSMM_GEMM_FLAG_BETA_0, prefetch = LIBXSMM_GEMM_PREFETCH_NONE;
  const auto kernel = libxsmm_smmdispatch_reducebatch_addr(m, n, k, &lda, &ldb, &ldc, &alpha,
                                                           &beta, &flags, &prefetch);
  if (kernel == nullptr) {
    std::fprintf(stderr, "LIBXSMM has no batch-reduce kernel for bs %ld\n", long(bs));
    std::exit(3);
  }
  std::vector<const float*> a(p.layout.CB), b(p.layout.CB);
  auto theirs = [&] {
    for (int64_t col = 0; col < KB; ++col) {
      float* y = y_theirs.data() + col * bs;
      unsigned long long count = 0;
      for (int32_t e = p.layout.col_ptr[col]; e < p.layout.col_ptr[col + 1]; ++e, ++count) {
        a[count] = w + int64_t{p.layout.col_block[e]} * bs * bs;
        b[count] = block_columns + int64_t{p.layout.col_row[e]} * rows * bs;
      }
      if (count == 0) {
        for (int64_t r = 0; r < rows; ++r) std::memset(y + r * kFeatures, 0, bs * sizeof(float));
      } else {
        kernel(a.data(), b.data(), y, &count);
      }
    }
  };
  return TimeAndCompare(repeats, ours, theirs, y_ours, y_theirs,
                        2.0 * rows * bs * bs * p.blocks);
}

Result GradW(const CpuKernels& kernels, const Problem& p, int repeats, std::mt19937* rng) {
  const int64_t bs = p.bs, rows = p.rows, panel = rows * bs;
  auto x_store = AlignedVector(rows * kFeatures), dy_store = AlignedVector(rows * kFeatures);
  float *x_panels = Aligned(x_store), *dy_panels = Aligned(dy_store);
  Fill(x_panels, rows * kFeatures, rng);  // random panels: their layout is all that matters
  Fill(dy_panels, rows * kFeatures, rng);
  std::vector<float> dw_ours(p.blocks * bs * bs), dw_theirs(p.blocks * bs * bs);
  std::vector<int32_t> order(p.blocks);
  for (int64_t b = 0; b < p.blocks; ++b) order[b] = int32_t(b);
  // (Not for CpuKernels::row_pairs_block_size, whose panels interleave rows: main refuses it.)
  auto ours = [&] {
    for (int64_t q = 0; q < p.blocks; ++q)
      kernels.grad_w(x_panels, dy_panels, dw_ours.data(), rows, &p.view, &order[q], 1,
                     q + 1 < p.blocks ? order[q + 1] : -1);
  };
  // Column-major terms: dw_block^T (bs x bs) = dy_panel^T (bs x rows, ld bs) . x_panel
  // (rows x bs, stored as its transpose with ld bs).
  const libxsmm_blasint m = bs, n = bs, k = rows, lda = bs, ldb = bs, ldc = bs;
  const float alpha = 1, beta = 0;
  const int flags = LIBXSMM_GEMM_FLAG_TRANS_B | LIBXSMM_GEMM_FLAG_BETA_0;
  const int prefetch = LIBXSMM_GEMM_PREFETCH_NONE;
  const libxsmm_smmfunction kernel =
      libxsmm_smmdispatch(m, n, k, &lda, &ldb, &ldc, &alpha, &beta, &flags, &prefetch);
  if (kernel == nullptr) {
    std::fprintf(stderr, "LIBXSMM has no transposed-B kernel for bs %ld\n", long(bs));
    std::exit(3);
  }
  auto theirs = [&] {
    for (int64_t b = 0; b < p.blocks; ++b)
      kernel(dy_panels + p.layout.block_col[b] * panel, x_panels + p.layout.block_row[b] * panel,
             dw_theirs.data() + b * bs * bs);
  };
  return TimeAndCompare(repeats, ours, theirs, dw_ours, dw_theirs,
                        2.0 * rows * bs * bs * p.blocks);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s forward|grad_w BLOCK_SIZE DENSITY ROWS REPEATS\n", argv[0]);
    return 2;
  }
  const std::string product = argv[1];
  const int64_t bs = std::atol(argv[2]), rows = std::atol(argv[4]);
  const double density = std::atof(argv[3]);
  const int repeats = std::atoi(argv[5]);
  const CpuKernels& kernels = blocksparse::COMPARE_ISA::kKernels;
  const bool row_pairs = product == "grad_w" && bs == kernels.row_pairs_block_size;
  if (!(bs == 8 || bs == 16 || bs == 32 || bs == 64) || row_pairs || rows < 1 ||
      !(density > 0 && density <= 1) || repeats < 1 ||
      (product != "forward" && product != "grad_w")) {
    std::fprintf(stderr, "bad arguments (block sizes 8 (forward only under AVX-512), 16, 32, "
                         "64; 0 < density <= 1)\n");
    return 2;
  }
  libxsmm_init();
  std::mt19937 rng(1234);
  const Problem problem = RandomProblem(bs, density, rows, &rng);
  const Result r = product == "forward" ? Forward(kernels, problem, repeats, &rng)
                                        : GradW(kernels, problem, repeats, &rng);
  std::printf("%.9f %.9f %.0f %.9g %.9g\n", r.ours, r.theirs, r.flops, r.max_diff, r.max_value);
  libxsmm_finalize();
  return 0;
}
