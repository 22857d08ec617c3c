#include "ops/blocksparse_matmul_cpu.h"

#include <cpuid.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops/blocksparse_matmul_amx.h"
#include "ops/blocksparse_matmul_cpu_isa.h"

namespace blocksparse {
namespace {

const CpuKernels& Kernels() { return BestCpuKernels(); }

LayoutView ViewOf(const BlockLayout& l) {
  return LayoutView{l.CB,           l.KB,           l.block_size,      l.blocks,
                    l.block_row.data(), l.block_col.data(), l.col_ptr.data(), l.col_row.data(),
                    l.col_block.data(), l.col_of_entry.data()};
}

// Transposes the blocks col_block[q], q in [begin, end), of w into out: each to its own
// place (block b at out + b bs bs), or with column_order one after another from out (the
// block of entry q at out + (q - begin) bs bs); fetches each next one meanwhile.
void TransposeBlocksOf(const BlockLayout& layout, int64_t begin, int64_t end, const float* w,
                       float* out, bool column_order = false) {
  const int64_t bs = layout.block_size, area = bs * bs;
  for (int64_t q = begin; q < end; ++q) {
    const int64_t b = layout.col_block[q], next = layout.col_block[std::min(q + 1, end - 1)];
    float* const to = out + (column_order ? q - begin : b) * area;
    Kernels().pack_block(w + b * area, bs, bs, true, w + next * area, to, bs);
  }
}

// At least `count` floats, 64-byte aligned, of a buffer this thread keeps for its next call
// (warm in cache then, with no fresh pages to fault in).  Its only caller asks for at most
// 2 MiB (TransposedWeights::kThreadBufferBytes), so a thread keeps no more than that.
float* ThreadBuffer(int64_t count) {
  thread_local std::vector<float> buffer;
  constexpr int64_t kAlign = 16;  // floats
  if (static_cast<int64_t>(buffer.size()) < count + kAlign) buffer.resize(count + kAlign);
  const uintptr_t address = reinterpret_cast<uintptr_t>(buffer.data());
  return buffer.data() + (-(address / sizeof(float))) % kAlign;
}

// Every block of w transposed, into scratch (nullptr if it could not be had).
const float* TransposedBlocks(const float* w, const BlockLayout& layout,
                              const ParallelFor& parallel_for, const ScratchAllocator& scratch) {
  const int64_t bs = layout.block_size;
  float* const out = scratch(layout.blocks * bs * bs);
  if (out == nullptr) return nullptr;
  parallel_for(layout.blocks, 2 * bs * bs, [&](int64_t begin, int64_t end) {
    TransposeBlocksOf(layout, begin, end, w, out);
  });
  return out;
}

// At most this many rows of x, and at most kGroupBytes of them, make one task's row group,
// which stays in a core's L2 while every weight column streams past it.
constexpr int64_t kRowsPerGroup = 96;
constexpr int64_t kGroupBytes = 1536 * 1024;
// Weight bytes of the output block columns one feature_axis=1 task covers.
constexpr int64_t kWeightBytesPerRange = 512 * 1024;
// Density below which 8-wide blocks run on half-width AVX-512 vectors rather than on
// transposed operands.  Measured on the 2-core AVX-512 Xeon (C = K = 4096, fastest ms, in place
// / transposed), since the transposed path reads w's blocks where they lie for the input
// gradient and x^T of up to 96 rows in place: N = 64 at 1% 0.43-0.50 / 0.44-0.47, 2% 0.64-0.65
// / 0.52-0.54, 3% 0.78-0.80 / 0.63-0.68; N = 1024 at 1% 3.9 / 5.0-5.3, 1.5% 4.6-4.7 / 5.6-5.8,
// 2% 6.2-6.3 / 6.0-6.3, 3% 8.8-9.0 / 7.0-7.3.  (Before that the crossover lay between 3.5%
// and 7%; see docs/benchmark_history.md, section "CPU: BlocksparseMatMul".)
constexpr double kNarrowBlocksInPlaceDensity = 0.02;
// Processors that execute 512-bit vector instructions as two 256-bit halves (AMD Zen 4) do as
// much arithmetic per cycle on half-width vectors, so there the in-place product wins up to
// a higher density, and at every density once the two transposed copies (N (C + K) floats)
// outgrow the cache.  Measured on a 2-core Zen 4 with 32 MiB of L3, C = K = 4096, in place
// against transposed (ms): N = 1024 at 5% 16.5 / 29.0, 10% 28.8 / 42.1, 25% 66.9 / 80.9, 100%
// 378 / 415; N = 512 at 10% 16.8 / 19.7, 25% 38.7 / 32.5, 100% 214 / 138; N = 256 at 10%
// 10.0 / 9.4; N = 64 at 5% 1.86 / 2.65, 10% 3.57 / 2.69.
constexpr double kNarrowBlocksInPlaceDensityOnHalves = 0.07;
constexpr int64_t kTransposedCopiesInCacheBytes = int64_t{24} << 20;

// Whether this processor runs 512-bit vector instructions as two 256-bit halves: AMD family
// 19h, whose only AVX-512 members are Zen 4.
bool Avx512RunsAsHalves() {
  static const bool halves = [] {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amd = ebx == 0x68747541 && edx == 0x69746e65 && ecx == 0x444d4163;
    if (!amd || !__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
    const unsigned family = ((eax >> 8) & 0xf) + ((eax >> 20) & 0xff);
    return family == 0x19;
  }();
  return halves;
}

// The fraction of the layout's blocks that are stored.
double Density(const BlockLayout& layout) {
  return static_cast<double>(layout.blocks) /
         (static_cast<double>(layout.CB) * static_cast<double>(layout.KB));
}

// Whether blocks narrower than a vector run in place on half-width vectors rather than as the
// transposed product (see ForwardFeatureAxis1).
bool NarrowBlocksInPlace(const BlockLayout& layout, int64_t N) {
  if (layout.block_size == 1) return false;
  const double density = Density(layout);
  if (density < kNarrowBlocksInPlaceDensity) return true;
  if (!Avx512RunsAsHalves()) return false;
  const int64_t copy_bytes = N * (layout.CB + layout.KB) * layout.block_size * 4;
  return density < kNarrowBlocksInPlaceDensityOnHalves ||
         copy_bytes > kTransposedCopiesInCacheBytes;
}

// Blocks one vector wide (bs 16 under AVX-512, 8 under AVX2) fill the in-place register tiles only
// 12 rows x 1 vector, one broadcast per multiply-add; on transposed operands (as the narrower
// blocks run) their tiles take 8 rows x 3 vectors along N, one broadcast per three, which pays for
// transposing x from these densities (N up to one slab of kSlabColumns rows, whose transpose is
// cheapest, and more) short of full layouts.  Measured on the 2-core Intel Xeon (C = K = 4096,
// feature_axis 1, the two paths in alternating processes, three rounds, fastest ms, in place ->
// transposed), bs 16 under AVX-512: N = 1024 at 2% 4.1-4.2 -> 6.5-7.2, 5% 8.3-8.8 -> 10.2-11.1, 7%
// 12.2-12.7 -> 13.5-14.2, 10% 16.2-16.9 -> 15.4-17.3, 15% 24.4-25.8 -> 23.2-23.9, 25% 37.1-38.1 ->
// 31.6-35.2, 50% 80.4-82.3 -> 66.6-70.5 (input gradient at 50% 78.9-81.7 -> 64.5-68.1); N = 64 at
// 5% 0.71-0.73 -> 0.78-0.85, 7% 1.08-1.20 -> 0.99-1.06, 10% 1.35-1.43 -> 1.19-1.24, 25% 2.38-2.56
// -> 2.21-2.41 (input gradient 3.09-3.20 -> 2.31-2.36), 50% 5.06-5.60 -> 4.40-4.74; then (two
// rounds) N = 64 at 6% 0.85-0.87 -> 0.90-0.92, input gradient at 10% 1.67-1.71 -> 1.19-1.23; N =
// 256 at 50% 21.7-22.3 -> 19.6-20.1, but full layouts 43.4-45.6 -> 47.7-49.7 (N = 64: 10.5-11.6 ->
// 10.8-10.9); N = 1024, input gradient at 25% 39.1-40.2 -> 33.7-34.5.  bs 8 under AVX2 (two
// rounds): N = 1024 at 5% 17.2-18.4 -> 17.9-18.2, 10% 35.4-36.4 -> 30.9-32.2, 50% 176-182 ->
// 151-153; N = 64 at 10% 2.58-2.59 -> 2.06-2.11, 50% 13.0-13.7 -> 10.0-11.8.  The same sums in the
// same order (bitwise the same results).  Not measured where AVX-512 runs as halves (Zen 4), whose
// one-vector tiles were found to keep up (see CoarsenFullLayouts).
constexpr double kOneVectorBlocksTransposedDensity = 0.12;
constexpr double kOneVectorBlocksTransposedDensityOneSlab = 0.07;

// Calls f(std::integral_constant<int64_t, bs>{}) for the supported block sizes: copies of one
// block's row then compile to a few vector moves instead of a library call each.  Any other
// size gets f(bs), the same code with a run-time size.
template <typename F>
void WithConstantBlockSize(int64_t bs, F&& f) {
  switch (bs) {
    case 1: return f(std::integral_constant<int64_t, 1>{});
    case 8: return f(std::integral_constant<int64_t, 8>{});
    case 16: return f(std::integral_constant<int64_t, 16>{});
    case 32: return f(std::integral_constant<int64_t, 32>{});
    case 64: return f(std::integral_constant<int64_t, 64>{});
    default: return f(bs);
  }
}

// Interleaves rows n and n + 1 of a bs-8 block column (8 floats each; `second` may be a zero
// row) into the 16 floats of their row-pairs panel step (RowPairsPanelOffset).
inline void InterleaveRowPair(const float* first, const float* second, float* out) {
  typedef float Quad __attribute__((vector_size(16)));
  for (int half = 0; half < 2; ++half) {
    Quad a, b;
    std::memcpy(&a, first + 4 * half, sizeof(a));
    std::memcpy(&b, second + 4 * half, sizeof(b));
    const Quad low = __builtin_shufflevector(a, b, 0, 4, 1, 5);
    const Quad high = __builtin_shufflevector(a, b, 2, 6, 3, 7);
    std::memcpy(out + 8 * half, &low, sizeof(low));
    std::memcpy(out + 8 * half + 4, &high, sizeof(high));
  }
}

// Block-column panels c0 .. c1 - 1 of x, panel c at panels + c * rows * bs: panel[n * bs + i] =
// feature c*bs + i of vector n, so block column c's slice of the N vectors is one contiguous
// (N, bs) array (rows = N); with row_pairs (bs 8 only) rows n and n + 1 are interleaved instead
// (RowPairsPanelOffset; rows = N rounded up to even, an odd N's last row paired with zeros).
// Reads x (N, F) row by row (feature_axis 1) or x (F, N) (feature_axis 0, a blocked transpose).
void PackBlockColumns(const float* x, int64_t N, int64_t F, int64_t bs, int feature_axis,
                      bool row_pairs, int64_t c0, int64_t c1, int64_t rows, float* panels) {
  if (feature_axis == 1) {
    // Each row's piece lies on a page of its own (rows of F floats), out of the hardware
    // prefetchers' reach: the piece kPackRowsAhead rows on is fetched while this one is copied.
    // Measured on a 2-core Intel Xeon (the weight gradient, C = K = 4096, N = 1024, the two
    // settings in alternating processes, four rounds, fastest ms, without -> with): bs 32 at 2%
    // 10.7-11.6 -> 8.8-9.9, 5% 17.6-18.7 -> 14.1-17.2, 10% 27.4-29.4 -> 22.4-26.8, 50%
    // 117.8-144.1 -> 107.0-115.0; bs 64 at 10% 23.1-29.1 -> 22.3-25.8 (24 rows ahead: no gain).
    constexpr int64_t kPackRowsAhead = 8;
    const int64_t run = (c1 - c0) * bs;  // floats of each row of x these panels take
    auto fetch_ahead = [&](int64_t n) {
      if (n + kPackRowsAhead < N) {
        const float* ahead = x + (n + kPackRowsAhead) * F + c0 * bs;
        for (int64_t k = 0; k < run; k += kLineFloats) __builtin_prefetch(ahead + k);
      }
    };
    if (row_pairs) {
      static const float kZeros[8] = {};
      for (int64_t n = 0; n < N; n += 2) {
        fetch_ahead(n);
        fetch_ahead(n + 1);
        for (int64_t c = c0; c < c1; ++c) {
          const float* first = x + n * F + c * 8;
          InterleaveRowPair(first, n + 1 < N ? first + F : kZeros, panels + (c * rows + n) * 8);
        }
      }
      return;
    }
    WithConstantBlockSize(bs, [&](auto kBs) {
      for (int64_t n = 0; n < N; ++n) {
        fetch_ahead(n);
        for (int64_t c = c0; c < c1; ++c)
          std::memcpy(panels + (c * rows + n) * kBs, x + n * F + c * kBs, kBs * sizeof(float));
      }
    });
    return;
  }
  const CpuKernels& kernels = Kernels();
  if (!row_pairs && bs % kernels.vector_width == 0) {
    // Panel c is x's rows c bs .. c bs + bs - 1 (N floats each) transposed, in squares of a
    // vector's width turned around in registers.  One thread, the weight gradient alone
    // through the plain C++ interface (2-core Intel Xeon, C = K = 4096, N = 1024, 10%, fastest
    // ms, one float at a time -> squares): bs 16 37.2 -> 28.4, bs 32 37.6 -> 26.2, bs 64
    // 38.1 -> 26.8, as fast as with feature_axis 1.
    for (int64_t c = c0; c < c1; ++c)
      kernels.transpose_rect(x + c * bs * N, N, bs, N, panels + c * rows * bs, bs);
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    float* const panel = panels + c * rows * bs;
    constexpr int64_t kChunk = 64;  // columns of x per pass, to keep writes in cache
    for (int64_t n0 = 0; n0 < N; n0 += kChunk) {
      const int64_t n1 = std::min(N, n0 + kChunk);
      for (int64_t i = 0; i < bs; ++i) {
        const float* row = x + (c * bs + i) * N;
        for (int64_t n = n0; n < n1; ++n)
          panel[row_pairs ? RowPairsPanelOffset(n, i) : n * bs + i] = row[n];
      }
    }
    if (row_pairs && (N & 1)) {
      for (int64_t i = 0; i < bs; ++i) panel[RowPairsPanelOffset(N, i)] = 0.0f;
    }
  }
}

// Whether `bytes` of panels packed ahead of the products that read them stay in the
// last-level cache until then (half of it, the other half left to the operands and outputs).
// The eager packing below was measured only on a processor with a 480 MiB L3; where the panels
// would spill to memory, each is still packed just before its first use.
bool FitsInLastLevelCache(int64_t bytes) {
  static const int64_t kCacheBytes = [] {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return static_cast<int64_t>(l3 > 0 ? l3 : l2 > 0 ? l2 : 0);
  }();
  return bytes <= kCacheBytes / 2;
}

// The block-column panels (as PackBlockColumns lays them, `rows` rows each; with row_pairs, bs
// 8's interleaved row pairs; for bs 1 every column, the transposes) of x (N, C) and dy (N, K)
// for the block columns with x_needed[c] and dy_needed[k], all at once: tasks of
// kRowsPerPackTask consecutive rows of x or dy, each copying its rows' pieces of every needed
// panel.  A task reads whole rows, a few pages between them, where packing panel by panel
// visits every row's page once per panel (at 4096 features, a page per 16 KiB row for its 64
// or 128 bytes: the address translations, not the bytes, set the pace).  Measured on the
// 2-core Intel Xeon (the weight gradient alone, one thread, C = K = 4096, N = 1024, 10%):
// packing took a third as long as the products when each panel was packed just before its
// first use.
void PackNeededBlockColumns(const float* x, const float* dy, int64_t N, int64_t C, int64_t K,
                            int64_t bs, bool row_pairs, int64_t rows,
                            const std::vector<char>& x_needed,
                            const std::vector<char>& dy_needed, float* x_panels,
                            float* dy_panels, const ParallelFor& parallel_for) {
  constexpr int64_t kRowsPerPackTask = 32;
  auto listed = [](const std::vector<char>& needed) {
    std::vector<int32_t> columns;
    for (int64_t c = 0; c < static_cast<int64_t>(needed.size()); ++c)
      if (needed[c]) columns.push_back(static_cast<int32_t>(c));
    return columns;
  };
  const std::vector<int32_t> x_columns = listed(x_needed), dy_columns = listed(dy_needed);
  const int64_t chunks = (N + kRowsPerPackTask - 1) / kRowsPerPackTask;
  const int64_t cost =
      kRowsPerPackTask * static_cast<int64_t>(x_columns.size() + dy_columns.size()) * bs / 2;
  WithConstantBlockSize(bs, [&](auto kBs) {
    // Tasks [0, chunks) pack x's rows, [chunks, 2 chunks) dy's.
    parallel_for(2 * chunks, cost, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const bool of_x = task < chunks;
        const float* const src = of_x ? x : dy;
        const int64_t F = of_x ? C : K;
        float* const panels = of_x ? x_panels : dy_panels;
        const int64_t n0 = (of_x ? task : task - chunks) * kRowsPerPackTask;
        const int64_t n1 = std::min(N, n0 + kRowsPerPackTask);
        if (bs == 1) {  // the panels are the transpose: every column, in register squares
          Kernels().transpose_rect(src + n0 * F, F, n1 - n0, F, panels + n0, rows);
          continue;
        }
        for (const int32_t c : of_x ? x_columns : dy_columns) {
          if (row_pairs) {  // bs 8, rows n and n + 1 interleaved (kRowsPerPackTask is even)
            static const float kZeros[8] = {};
            for (int64_t n = n0; n < n1; n += 2) {
              const float* first = src + n * F + c * 8;
              InterleaveRowPair(first, n + 1 < N ? first + F : kZeros,
                                panels + (c * rows + n) * 8);
            }
          } else {
            for (int64_t n = n0; n < n1; ++n)
              std::memcpy(panels + (c * rows + n) * kBs, src + n * F + c * kBs,
                          kBs * sizeof(float));
          }
        }
      }
    });
  });
}

// Rows [m0, m1) of x (N, C) as the row-tile panels of CpuKernels::forward_axis1, zero rows
// completing the last tile.  The panels are written in order (a tile's block columns one
// after another), reading the tile's rows side by side.
void PackRowTilePanels(const float* x, int64_t m0, int64_t m1, int64_t C, int64_t bs,
                       int64_t tile, float* panels) {
  WithConstantBlockSize(bs, [&](auto kBs) {
    const int64_t CB = C / kBs;
    float* out = panels;
    for (int64_t t0 = m0; t0 < m1; t0 += tile) {
      const int64_t rows = std::min(tile, m1 - t0);
      for (int64_t c = 0; c < CB; ++c) {
        const float* in = x + t0 * C + c * kBs;
        for (int64_t r = 0; r < rows; ++r, out += kBs)
          std::memcpy(out, in + r * C, kBs * sizeof(float));
        for (int64_t r = rows; r < tile; ++r, out += kBs) std::memset(out, 0, kBs * sizeof(float));
      }
    }
  });
}

// out (cols, rows; row stride out_rs >= rows) = in (rows, cols)^T, in tiles so both sides
// stay in cache.  With slab_rows (a multiple of the tile), in's rows [s slab_rows,
// (s + 1) slab_rows) go to the columns of out + s slab_pitch instead, counted from the slab's
// first.
void Transpose(const float* in, int64_t rows, int64_t cols, float* out, int64_t out_rs,
               const ParallelFor& parallel_for,
               int64_t slab_rows = std::numeric_limits<int64_t>::max(), int64_t slab_pitch = 0) {
  constexpr int64_t kTile = 32;
  const CpuKernels& kernels = Kernels();
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  parallel_for(row_tiles, kTile * cols * 2, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin * kTile; r0 < std::min(rows, end * kTile); r0 += kTile) {
      const int64_t r1 = std::min(rows, r0 + kTile), slab = r0 / slab_rows;
      float* const slab_out = out + slab * slab_pitch - slab * slab_rows;
      for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
        const int64_t c1 = std::min(cols, c0 + kTile);
        kernels.transpose_rect(in + r0 * cols + c0, cols, r1 - r0, c1 - c0,
                               slab_out + c0 * out_rs + r0, out_rs);
      }
    }
  });
}

// The feature_axis=0 product (y (K, N) = W^T x, x (C, N)) reads x in slabs of kSlabColumns
// columns: slab s holds columns [s kSlabColumns, (s + 1) kSlabColumns) of all C rows, row c at
// c kSlabRowStride, and its tasks (every block column of y over those columns) follow each
// other, so that the slab (C x 112 floats, 1.75 MiB at C = 4096) stays in L2 while they pass.
// Read in place, x's rows are N floats apart: a block's bs rows are a page or more apart (each
// taking a TLB entry), and at N a multiple of 256 they fall into the same L1 cache sets.
// Measured on the Intel Xeon (2 MiB of L2 per core; one core, the kernel alone, bs 8, C = K =
// 4096, N = 1024, GFLOP/s): rows of 1040 floats read in place 33-36 at 10% density, 30 at 5%
// and 25%, 21 at 50%; slabs of 96 columns 59-62, 67, 74, 71 (48 columns 55-63, 71, 59, 59;
// 256 columns 47-48 at 10%); bs 16 and 32 at 10% 43-46 -> 69-71.
constexpr int64_t kSlabColumns = 96;
constexpr int64_t kSlabRowStride = kSlabColumns + 16;  // rows 448 bytes apart: unaliased

// Whether one-vector-wide blocks run as the transposed product (see
// kOneVectorBlocksTransposedDensity).
bool OneVectorBlocksTransposed(const BlockLayout& layout, int64_t N, int vector_width) {
  if (layout.block_size != vector_width || (vector_width == 16 && Avx512RunsAsHalves()) ||
      layout.blocks == layout.CB * layout.KB) {
    return false;
  }
  return Density(layout) >= (N <= kSlabColumns ? kOneVectorBlocksTransposedDensityOneSlab
                                               : kOneVectorBlocksTransposedDensity);
}

// Where x (C, N) lies for the feature_axis=0 product: slab s at data + s * C * row_stride.
struct Slabs {
  const float* data;
  int64_t row_stride;
  int64_t columns;  // per slab
};

int64_t SlabCount(int64_t N) { return (N + kSlabColumns - 1) / kSlabColumns; }

// x (C, N) copied into slabs at out (SlabCount(N) * C * kSlabRowStride floats).
Slabs CopyToSlabs(const float* x, int64_t C, int64_t N, float* out,
                  const ParallelFor& parallel_for) {
  const int64_t slabs = SlabCount(N);
  parallel_for(slabs * C, 2 * kSlabColumns, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / C, c = task % C, n0 = s * kSlabColumns;
      std::memcpy(out + (s * C + c) * kSlabRowStride, x + c * N + n0,
                  std::min(kSlabColumns, N - n0) * sizeof(float));
    }
  });
  return {out, kSlabRowStride, kSlabColumns};
}

// Floats of scratch TransposeToSlabs needs for an x of N rows and C features.
int64_t TransposedSlabsFloats(int64_t N, int64_t C) {
  return N <= kSlabColumns ? N * C : SlabCount(N) * C * kSlabRowStride;
}

// x (N, C) transposed into slabs at out, as CopyToSlabs would lay x^T.  Up to one slab's
// columns x^T is the slab, its rows N floats apart, as Forward reads a feature_axis=0 x in
// place: padded slab rows would hold one float per cache line at N = 1.
Slabs TransposeToSlabs(const float* x, int64_t N, int64_t C, float* out,
                       const ParallelFor& parallel_for) {
  if (N <= kSlabColumns) {
    Transpose(x, N, C, out, N, parallel_for);
    return {out, N, N};
  }
  Transpose(x, N, C, out, kSlabRowStride, parallel_for, kSlabColumns, C * kSlabRowStride);
  return {out, kSlabRowStride, kSlabColumns};
}

void ForwardFeatureAxis0(const Slabs& x, const float* w, float* y, int64_t N,
                         const BlockLayout& layout, const ParallelFor& parallel_for,
                         bool w_transposed, bool y_rows = false) {
  const CpuKernels& kernels = Kernels();
  const LayoutView view = ViewOf(layout);
  const int64_t bs = layout.block_size, KB = layout.KB, C = layout.CB * bs;
  const int64_t slabs = (N + x.columns - 1) / x.columns;
  const int64_t cost = 2 * x.columns * bs * bs * std::max<int64_t>(1, layout.blocks / KB);
  parallel_for(slabs * KB, cost, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / KB, k = task % KB, n0 = s * x.columns;
      // The kernel adds n0 to x for the slab's first column.
      const float* slab = x.data + s * C * x.row_stride - n0;
      kernels.forward_axis0(slab, x.row_stride, w, y, N, &view, k, n0,
                            std::min(N, n0 + x.columns), w_transposed, y_rows);
    }
  });
}

// The weights of the feature_axis=1 product's tasks where w holds the transposes of the
// product's blocks (w_transposed), transposed by the tasks themselves so that w is read once,
// and the transposed blocks from L2, where a copy made beforehand would be written out to
// memory and read back.  With one row group (N <= 96 at C = 4096) each task transposes its
// range's blocks into a buffer of its thread, one after another in column order, the view's
// col_block then counting a range's blocks from its first (local_block); with several groups
// the first task over a range transposes its blocks into a copy of w that the others share.
class TransposedWeights {
 public:
  // Column-ordered ranges fill L2 no more than this (and each thread keeps a buffer of it).
  static constexpr int64_t kThreadBufferBytes = int64_t{2} << 20;

  TransposedWeights(const BlockLayout& layout, bool w_transposed, int64_t groups,
                    int64_t per_range, const ScratchAllocator& scratch)
      : layout_(layout), area_(layout.block_size * layout.block_size) {
    if (!w_transposed) return;
    const int64_t ranges = (layout.KB + per_range - 1) / per_range;
    std::vector<int32_t> local_block(layout.blocks);  // each block's place in its range
    int64_t most = 0;                                  // blocks in a range
    for (int64_t k0 = 0; k0 < layout.KB; k0 += per_range) {
      const int64_t q0 = layout.col_ptr[k0];
      const int64_t q1 = layout.col_ptr[std::min(layout.KB, k0 + per_range)];
      most = std::max(most, q1 - q0);
      for (int64_t q = q0; q < q1; ++q) local_block[q] = static_cast<int32_t>(q - q0);
    }
    if (groups == 1 && most * area_ * sizeof(float) <= kThreadBufferBytes) {
      local_block_ = std::move(local_block);
      return;
    }
    shared_ = scratch(layout.blocks * area_);
    once_.reset(new std::once_flag[ranges]);
    ok_ = shared_ != nullptr;
  }

  bool ok() const { return ok_; }

  // The weights for range r (block columns [k0, k1)), to be read through *view (whose
  // col_block this points at local_block_ where they lie in column order).
  const float* Of(const float* w, int64_t r, int64_t k0, int64_t k1, LayoutView* view) const {
    const int64_t q0 = layout_.col_ptr[k0], q1 = layout_.col_ptr[k1];
    if (!local_block_.empty()) {
      float* const buffer = ThreadBuffer((q1 - q0) * area_);
      TransposeBlocksOf(layout_, q0, q1, w, buffer, true);
      view->col_block = local_block_.data();
      return buffer;
    }
    if (shared_ == nullptr) return w;
    std::call_once(once_[r], [&] { TransposeBlocksOf(layout_, q0, q1, w, shared_); });
    return shared_;
  }

 private:
  const BlockLayout& layout_;
  const int64_t area_;
  bool ok_ = true;
  std::vector<int32_t> local_block_;
  float* shared_ = nullptr;
  std::unique_ptr<std::once_flag[]> once_;
};

bool ForwardFeatureAxis1(const float* x, const float* w, float* y, int64_t N,
                         const BlockLayout& layout, const ParallelFor& parallel_for,
                         const ScratchAllocator& scratch, bool w_transposed) {
  const CpuKernels& kernels = Kernels();
  const int64_t bs = layout.block_size, C = layout.CB * bs, K = layout.KB * bs;
  // Blocks narrower than a vector (bs 1, and bs 8 under AVX-512) fill only part of each
  // vector: compute y^T = W^T x^T instead, with vectors along N, at the price of transposing
  // x (and for bs 1, y^T back); unless NarrowBlocksInPlace: the transposes would cost more than
  // the product itself, and bs 8 runs on half-width vectors in place.  Blocks one vector wide
  // take the same path from moderate densities (OneVectorBlocksTransposed).
  if ((bs < kernels.vector_width && !NarrowBlocksInPlace(layout, N)) ||
      OneVectorBlocksTransposed(layout, N, kernels.vector_width)) {
    float* const x_t = scratch(TransposedSlabsFloats(N, C));
    // bs 8's register tiles store y turned around, eight outputs of a row at a time, where
    // y^T was written whole and transposed after (2-core Intel Xeon, C = K = 4096, fastest ms,
    // three alternating rounds: N = 1024 forward at 5% 11.3-11.9 -> 10.5-11.2, 10% 20.5-21.2
    // -> 17.2-19.9, 50% 90-108 -> 85-97, input gradient at 10% 17.6-19.5 -> 16.1-17.1).  bs 1's
    // tiles are one output wide: turned around one float at a time, they measured 1.2-1.9x
    // slower, so its y^T is still transposed after.
    const bool y_rows = bs > 1;
    float* const y_t = y_rows ? y : scratch(N * K);
    if (x_t == nullptr || y_t == nullptr) return false;
    ForwardFeatureAxis0(TransposeToSlabs(x, N, C, x_t, parallel_for), w, y_t, N, layout,
                        parallel_for, w_transposed, y_rows);
    if (!y_rows) Transpose(y_t, K, N, y, K, parallel_for);
    return true;
  }
  // x re-laid as row-tile panels (see CpuKernels::forward_axis1): a tile's rows sit next to
  // each other, one block wide, where in x rows of a power-of-two width would all fall into
  // the same L1 cache sets.
  if (N == 0) return true;
  const int64_t tile = kernels.row_tile;
  const int64_t tiles = (N + tile - 1) / tile;
  float* const panels = scratch(tiles * tile * C);
  if (panels == nullptr) return false;
  // Row groups of tiles that stay in L2 while the weight columns of a range stream past.
  const int64_t max_tiles_per_group =
      std::clamp<int64_t>(kGroupBytes / (C * 4 * tile), 1, kRowsPerGroup / tile);
  // Equal groups: each one streams all of w, so a nearly empty last group would cost as
  // much weight traffic as a full one.
  const int64_t groups = (tiles + max_tiles_per_group - 1) / max_tiles_per_group;
  const int64_t rows_per_group = (tiles + groups - 1) / groups * tile;
  // A task: one row group times a range of output block columns whose weights stay in L2
  // while the group's tiles pass over them.  Wide ranges also write y in long runs; at least
  // 8 tasks keep both cores busy.
  const int64_t KB = layout.KB;
  const int64_t column_bytes = std::max<int64_t>(1, layout.blocks * bs * bs * 4 / KB);
  int64_t per_range = std::clamp<int64_t>(kWeightBytesPerRange / column_bytes, 1, KB);
  per_range = std::min(per_range, std::max<int64_t>(1, KB * groups / 8));
  const int64_t ranges = (KB + per_range - 1) / per_range;
  const int64_t cost = 2 * rows_per_group * bs * bs * layout.blocks / ranges;
  const LayoutView view = ViewOf(layout);
  // A tile's panel is packed by the first task that needs it, just before use, so it is read
  // back from cache rather than from memory.  The tasks of one group start at different tiles,
  // so that threads sharing a group pack different tiles at once rather than one packing while
  // the others wait (with one group, N <= 96 at C = 4096, the whole packing was one thread's).
  // Measured on the 2-core Intel Xeon (C = K = 4096, N = 64, the two libraries in alternating
  // processes, fastest ms, one packing thread -> tiles): bs 32 at 2% 0.47-0.54 -> 0.37-0.39,
  // 5% 0.69-0.75 -> 0.60-0.66, 10% 1.11-1.21 -> 1.03-1.11; bs 64 at 5% 0.68-0.75 -> 0.62-0.63.
  std::unique_ptr<std::once_flag[]> packed(new std::once_flag[tiles]);
  const TransposedWeights transposed(layout, w_transposed, groups, per_range, scratch);
  if (!transposed.ok()) return false;
  parallel_for(groups * ranges, cost, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / ranges, r = task % ranges;
      const int64_t m0 = g * rows_per_group, m1 = std::min(N, m0 + rows_per_group);
      const int64_t k0 = r * per_range, k1 = std::min(KB, k0 + per_range);
      LayoutView task_view = view;
      const float* const task_w = transposed.Of(w, r, k0, k1, &task_view);
      const int64_t group_tiles = (m1 - m0 + tile - 1) / tile;
      const int64_t first = r * group_tiles / ranges;
      for (int64_t i = 0; i < group_tiles; ++i) {
        const int64_t t0 = m0 + (first + i) % group_tiles * tile, t1 = std::min(m1, t0 + tile);
        std::call_once(packed[t0 / tile],
                       [&] { PackRowTilePanels(x, t0, t1, C, bs, tile, panels + t0 * C); });
        kernels.forward_axis1(panels + t0 * C, task_w, y + t0 * K, t1 - t0, &task_view, k0, k1);
      }
    }
  });
  return true;
}

// Full layouts (every block present) of 8-wide blocks run as the same product on 32-wide blocks
// where 32 divides C and K, else 16-wide: the 8-wide kernels fill only half an AVX-512 vector or
// need transposed copies of x and y.  Repacking w into the wider blocks costs one pass over it
// (C K floats of scratch; the weight gradient is computed there and copied back), which pays
// off from about CoarsenMinRows rows.  Measured on a 2-core Zen 4, C = K = 4096, the two
// libraries alternated twice (ms, forward / weight gradient): N = 1024 335-348 / 269-281 with
// bs 8 against 200-205 / 220-245 repacked; N = 512 102-118 / 110-121 against 112-114 /
// 107-112 (no gain: there bs 8 runs on transposed copies); N = 64 22.6-22.9 / 28.5-30.5
// against 25.9-26.0 / 31.8-37.8 (a loss); N = 256 within the noise.  On a 2-core Zen 5 (two
// 512-bit FMA units), the two libraries in three alternating processes each (median ms,
// forward / input gradient / weight gradient, bs 8 against repacked): N = 512 86.7 / 73.8 /
// 130.2 against 61.5 / 74.4 / 56.3; N = 256 54.9 / 60.3 / 63.8 against 36.7 / 49.3 / 35.2;
// N = 128 29.6 / 35.7 / 36.4 against 26.3 / 40.0 / 25.6 (the input gradient slower); N = 64
// 24.3 / 31.4 / 30.4 against 21.5 / 37.3 / 22.2.  So bs 8 repacks from 256 rows.
// Full layouts of 16-wide blocks likewise run on 32-wide ones where AVX-512 runs at full
// width: a 16-wide block is one vector, so its register tiles (12 rows x 1 vector) issue a
// broadcast per multiply-add, and a processor with two 512-bit FMA units runs out of issue
// slots before arithmetic; the 32-wide tiles (12 x 2) issue one per two.  Measured on a 2-core
// Zen 5, C = K = 4096, N = 1024, the two libraries in six alternating processes each (fastest
// of five calls per process, ms): forward 122.0-134.9 with the 16-wide blocks against
// 93.0-112.8 repacked (one outlier each left out, 212.3 and 166.7), forward and both
// gradients 336-450 against 304-400.  On Zen 4, whose 512-bit FMAs are two 256-bit halves,
// the 16-wide tiles keep up (full layouts at N = 1024 in one table: bs 16 183.7 ms, bs 64
// 198.3), so there bs 16 keeps its blocks.  Over fewer rows it did not pay overall on Zen 5
// (medians as above, bs 16 against repacked: N = 64 11.3 / 19.9 / 10.1 against 15.0 / 25.3 /
// 15.7; N = 512 68.5 / 71.1 / 55.7 against 61.2 / 77.3 / 50.8).
// 32-wide blocks rather than 64-wide ones (both divide C and K in the benchmarks): on the 2-core
// Intel Xeon, C = K = 4096, N = 1024, full layouts, the two libraries in six alternating
// processes (fastest ms, forward / input gradient / weight gradient, as bs 64 -> as bs 32): bs 8
// 298-348 / 319-407 / 235-263 -> 228-289 / 244-302 / 242-274, bs 16 263-367 / 262-413 /
// 210-299 -> 246-290 / 244-294 / 214-283; the 64-wide forward of a full layout is the slower
// of the two there (in the benchmark's table of the same day, bs 32 213 ms, bs 64 258).
int64_t CoarsenMinRows(int64_t bs) { return bs == 8 ? 256 : 1024; }

// Whether full layouts of bs-wide blocks are worth repacking into wider blocks here.
bool CoarsenFullLayouts(int64_t bs) {
  if (bs == 8) return true;
  return bs == 16 && Kernels().vector_width == 16 && !Avx512RunsAsHalves();
}

// The block size a full layout of 8-wide (or, see CoarsenFullLayouts, 16-wide) blocks runs
// with over N rows, or 0 to keep its own.
int64_t CoarseBlockSize(int64_t CB, int64_t KB, int64_t block_size, int64_t blocks, int64_t N) {
  if (!CoarsenFullLayouts(block_size) || blocks != CB * KB || N < CoarsenMinRows(block_size)) {
    return 0;
  }
  for (int64_t bs : {32, 16})
    if (bs > block_size && CB * block_size % bs == 0 && KB * block_size % bs == 0) return bs;
  return 0;
}
int64_t CoarseBlockSize(const BlockLayout& layout, int64_t N) {
  return CoarseBlockSize(layout.CB, layout.KB, layout.block_size, layout.blocks, N);
}

// The full layout of bs-wide blocks over C x K, blocks in row-major order.
BlockLayout FullLayout(int64_t C, int64_t K, int64_t bs) {
  const int64_t CB = C / bs, KB = K / bs;
  std::vector<int32_t> coords(2 * CB * KB);
  for (int64_t b = 0; b < CB * KB; ++b) {
    coords[2 * b] = static_cast<int32_t>(b / KB);
    coords[2 * b + 1] = static_cast<int32_t>(b % KB);
  }
  BlockLayout layout;
  BuildBlockLayout(coords.data(), CB * KB, CB, KB, bs, &layout);  // in range and distinct
  return layout;
}

// Calls copy(fine_offset, coarse_offset) for every bs-float row piece of the blocks of the
// full layout `fine` (bs = fine.block_size), with the offsets (in floats) of that piece in
// fine's blocks and in the row-major blocks of the full layout of coarse_bs-wide blocks over
// the same matrix.
template <typename Copy>
void ForEachFullLayoutPiece(const BlockLayout& fine, int64_t coarse_bs,
                            const ParallelFor& parallel_for, Copy&& copy) {
  const int64_t bs = fine.block_size, r = coarse_bs / bs, KBc = fine.KB / r;
  const int64_t coarse_blocks = fine.CB / r * KBc;
  parallel_for(coarse_blocks, 2 * coarse_bs * coarse_bs, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b / KBc * r, k0 = b % KBc * r;
      for (int64_t kk = 0; kk < r; ++kk) {
        // Column k0 + kk lists every block row, in increasing order.
        const int32_t* column = fine.col_block.data() + fine.col_ptr[k0 + kk] + c0;
        for (int64_t i = 0; i < coarse_bs; ++i)
          copy((column[i / bs] * bs + i % bs) * bs, (b * coarse_bs + i) * coarse_bs + kk * bs);
      }
    }
  });
}

// Whether a neuron-level product (bs 1) over N rows reads x and y where they lie, one output's
// sum at a time (CpuKernels::neuron_columns, neuron_grad_w), rather than running on transposed
// copies with vectors along the rows: below one vector of rows those vectors would be single
// floats anyway, and the transposes, a task per output column and the weight gradient's panels
// would cost more than the sums.  Measured on the 2-core Intel Xeon (100,000 units with 4 inputs
// each, fastest ms, transposed copies -> in place): N = 1 forward 1.62 -> 0.89, input gradient
// 1.76 -> 0.97, weight gradient 5.50 -> 0.64; N = 4 5.45 -> 2.01, 5.12 -> 1.81, 6.95 -> 1.02;
// N = 8 8.27 -> 4.23, 7.82 -> 3.95, 8.81 -> 2.46; N = 12 10.9 -> 8.5, 10.9 -> 6.2, 9.1 -> 4.0;
// N = 16 (one AVX-512 vector) 3.29 -> 9.55, 3.40 -> 8.90, 10.1 -> 10.7.  With 32 inputs each,
// N = 1: 14.0 -> 10.2, 6.4 -> 6.2, 49.4 -> 5.9.  The same sums in the same order either way.
bool NeuronRowsInPlace(const BlockLayout& layout, int64_t N) {
  return layout.block_size == 1 && N < Kernels().vector_width;
}

// Where x(n, c) and y(n, k) of a product over N rows lie, as strides: (row, feature).
struct Strides {
  int64_t row, feature;
};
Strides StridesOf(int feature_axis, int64_t features, int64_t N) {
  return feature_axis == 1 ? Strides{features, 1} : Strides{1, N};
}

// Whether a one-row neuron-level product runs as one flat loop over the entries
// (CpuKernels::neuron_columns_one_row) rather than column by column: where its columns are
// short, their loops' exits mispredict, and where w is read in order (the input gradient of a
// layout stored row after row, as BlocksparseMatMul's are) nothing else costs more.  Measured on
// the 2-core Intel Xeon (100,000 units, N = 1, fastest ms, column by column -> flat; the two
// libraries in alternating processes): input gradient with 4 inputs per unit 0.74-0.76 -> 0.42-
// 0.53 (2 to 6 inputs: 0.75-0.85 -> 0.45-0.56), 8 inputs 0.81-0.89 -> 0.67-0.72, 16 inputs
// 1.06-1.14 -> 1.12-1.21, 32 inputs 1.72-1.87 -> 2.26-2.40; the forward (w read at random) with
// 4 inputs 0.63-0.70 -> 0.76-0.81 (2 to 6 inputs 0.76-0.77 -> 0.76-0.81).
// The layout keeps each entry's column only where both hold (kFlatColumnEntries, block_layout.h).
bool NeuronColumnsFlat(const BlockLayout& layout) { return !layout.col_of_entry.empty(); }

void NeuronLevelForward(const float* x, const float* w, float* y, int64_t N, int feature_axis,
                        const BlockLayout& layout, const ParallelFor& parallel_for) {
  const Strides xs = StridesOf(feature_axis, layout.CB, N);
  const Strides ys = StridesOf(feature_axis, layout.KB, N);
  const LayoutView view = ViewOf(layout);
  // One row of a layout stored row after row: one pass over the blocks in order, on one
  // thread (the sums of an output come from every row), reading w and x in order where the
  // columns would gather w at random.  Measured on the 2-core Intel Xeon (100,000 units, N = 1,
  // fastest ms, column by column on two threads -> one pass; the two in alternating processes):
  // 4 inputs per unit 0.66-0.70 -> 0.51, 2 to 6 inputs 0.75-0.76 -> 0.51, 32 inputs 6.2-7.5 ->
  // 3.6-3.9.
  if (N == 1 && layout.rows_in_block_order) {
    parallel_for(1, 2 * layout.blocks, [&](int64_t, int64_t) {
      Kernels().neuron_rows_one_row(x, xs.feature, w, y, ys.feature, &view);
    });
    return;
  }
  const int64_t cost = 2 * N * std::max<int64_t>(1, layout.blocks / layout.KB);
  const bool flat = N == 1 && NeuronColumnsFlat(layout);
  parallel_for(layout.KB, cost, [&](int64_t begin, int64_t end) {
    if (flat) {
      Kernels().neuron_columns_one_row(x, xs.feature, w, y, ys.feature, &view, begin, end);
    } else {
      Kernels().neuron_columns(x, xs.row, xs.feature, w, y, ys.row, ys.feature, N, &view,
                               begin, end);
    }
  });
}

void NeuronLevelGradW(const float* x, const float* dy, float* dw, int64_t N, int feature_axis,
                      const BlockLayout& layout, const ParallelFor& parallel_for) {
  const Strides xs = StridesOf(feature_axis, layout.CB, N);
  const Strides dys = StridesOf(feature_axis, layout.KB, N);
  const LayoutView view = ViewOf(layout);
  parallel_for(layout.blocks, 2 * N + 4, [&](int64_t begin, int64_t end) {
    Kernels().neuron_grad_w(x, xs.row, xs.feature, dy, dys.row, dys.feature, N, &view, begin,
                            end, dw);
  });
}

bool Forward(const float* x, const float* w, float* y, int64_t N, int feature_axis,
             const BlockLayout& layout, const ParallelFor& parallel_for,
             const ScratchAllocator& scratch, bool w_transposed) {
  if (NeuronRowsInPlace(layout, N)) {  // 1 x 1 blocks: w_transposed changes nothing
    NeuronLevelForward(x, w, y, N, feature_axis, layout, parallel_for);
    return true;
  }
  if (feature_axis == 1) {
    return ForwardFeatureAxis1(x, w, y, N, layout, parallel_for, scratch, w_transposed);
  }
  // Up to one slab's columns x is a slab where it lies (rows at most 384 bytes apart).
  if (N <= kSlabColumns) {
    ForwardFeatureAxis0({x, N, N}, w, y, N, layout, parallel_for, w_transposed);
    return true;
  }
  const int64_t C = layout.CB * layout.block_size;
  float* const x_slabs = scratch(SlabCount(N) * C * kSlabRowStride);
  if (x_slabs == nullptr) return false;
  ForwardFeatureAxis0(CopyToSlabs(x, C, N, x_slabs, parallel_for), w, y, N, layout,
                      parallel_for, w_transposed);
  return true;
}

// The order the weight gradient computes its blocks in: groups of consecutive output block
// columns whose dy panels (panel_bytes each) fill about 2 MiB, most of them in L2 while the
// group runs, and each group's blocks by block row (then column), so blocks sharing an x panel
// follow each other: the x panels, which fill L3 at large N and C, are then read once per
// group and block row instead of once per block.
// Measured on the 2-core Intel Xeon (C = K = 4096, N = 1024, bs 1, the two orders in
// alternating processes, fastest ms): 1% 225-271 -> 190-201, 5% 880-1045 -> 763-816.  Groups
// of 0.5 / 1 / 2 / 4 MiB (bs 8 with its shared-row tiles, and bs 1; the settings alternated,
// 1 and 2 MiB in six rounds, the others in three; fastest ms): bs 8 at 2% 15.7-18.4 /
// 15.4-20.6 / 13.6-20.7 / 14.6-16.0, 5% 24.8-28.6 / 22.7-28.3 / 21.1-25.6 / 21.7-22.9, 10%
// 37.4-41.3 / 31.2-40.4 / 28.8-35.8 / 31.5-39.0, 25% 70.9-74.2 / 54.1-69.5 / 52.4-65.2 /
// 62.9-66.3; bs 1 at 1% (1 / 2 / 4 MiB) 61-70 / 54-60 / 60-62.
std::vector<int32_t> GradWOrder(const BlockLayout& layout, int64_t panel_bytes) {
  constexpr int64_t kGroupBytes = int64_t{2} << 20;
  const int64_t group = std::max<int64_t>(1, kGroupBytes / std::max<int64_t>(1, panel_bytes));
  if (group >= layout.KB) return layout.row_block;
  // The layout's row-major order, kept with its tables, stably sorted by group: a counting
  // sort over few groups, linear in blocks.  (Sorting every block by row on each call, a
  // scatter over all block rows, cost 100,000 neurons with 4 inputs each at N = 64 15.4-16.7
  // ms against 13.2-14.2 with the kept order; with 32 inputs 128.9 against 77.5.)
  std::vector<int32_t> next(layout.KB / group + 1);
  // Group g's blocks start where its first block column's do.
  for (int64_t g = 0; g * group < layout.KB; ++g) next[g] = layout.col_ptr[g * group];
  std::vector<int32_t> order(layout.blocks);
  for (int32_t b : layout.row_block) order[next[layout.block_col[b] / group]++] = b;
  return order;
}

bool GradW(const float* x, const float* dy, float* dw, int64_t N, int feature_axis,
           const BlockLayout& layout, const ParallelFor& parallel_for,
           const ScratchAllocator& scratch) {
  const int64_t bs = layout.block_size, C = layout.CB * bs, K = layout.KB * bs;
  const CpuKernels& kernels = Kernels();
  if (NeuronRowsInPlace(layout, N)) {
    NeuronLevelGradW(x, dy, dw, N, feature_axis, layout, parallel_for);
    return true;
  }
  const bool row_pairs = bs == kernels.row_pairs_block_size;
  const int64_t rows = row_pairs ? N + (N & 1) : N;  // of each panel
  float* const x_panels = scratch(rows * C);
  float* const dy_panels = scratch(rows * K);
  if (x_panels == nullptr || dy_panels == nullptr) return false;
  const LayoutView view = ViewOf(layout);
  // Blocks of 16 and more: column by column, each block fetching the next one's panels while it
  // runs (GradWOrder's groups measured slower there: bs 32 at 5% 16-21 -> 23-25 ms, bs 64 at
  // 25% 64-72 -> 78-93, N = 1024, C = K = 4096, the two versions in alternating processes).
  const bool grouped = bs <= 8;
  const std::vector<int32_t> order =
      grouped ? GradWOrder(layout, rows * bs * sizeof(float)) : layout.col_block;
  // Panels are packed per_pack at a time (the pieces of 256 consecutive bytes of each
  // row of x or dy, where one panel's piece of a row may be a fraction of a cache line and each
  // row another page), by the first task that needs one of them, just before use (so they are
  // read back from cache, and panels no block needs are mostly never packed).
  const int64_t per_pack = grouped ? 64 / bs : 1;
  const int64_t x_packs = (layout.CB + per_pack - 1) / per_pack;
  const int64_t dy_packs = (layout.KB + per_pack - 1) / per_pack;
  std::unique_ptr<std::once_flag[]> x_packed(new std::once_flag[x_packs]);
  std::unique_ptr<std::once_flag[]> dy_packed(new std::once_flag[dy_packs]);
  auto pack = [&](const float* src, int64_t F, int64_t blocks, int64_t p, float* panels) {
    PackBlockColumns(src, N, F, bs, feature_axis, row_pairs, p * per_pack,
                     std::min(blocks, (p + 1) * per_pack), rows, panels);
  };
  // Rows of x and dy (feature_axis 1) are packed into every needed panel first, row by row,
  // where each panel's pieces lie a row apart (see PackNeededBlockColumns), if the panels stay
  // in the cache until their products.  Otherwise (and for feature_axis 0, whose panels' rows
  // are contiguous in x) each pack is made just before its first use.  bs 1 (the panels are
  // x's and dy's transposes; C = K = 16384 with 4 inputs per output, N = 256, alternating
  // processes, fastest ms): 30.4-31.3 -> 12.5-12.9; 100,000 neurons, N = 64: 77 -> 55-59.
  // bs 8 (2-core Intel Xeon, the two libraries in three alternating processes, N = 1024, C = K
  // = 4096, fastest ms, packs of eight panels as they go -> first): 2% 8.4-9.0 -> 6.8-7.0, 10%
  // 19.3-21.3 -> 16.6-17.8, 50% 64.5-68.2 -> 59.1-62.8; N = 64 within the noise.
  std::vector<char> x_needed, dy_needed;
  int64_t needed_bytes = 0;
  if (feature_axis == 1) {
    x_needed.resize(layout.CB);
    dy_needed.resize(layout.KB);
    for (int64_t c = 0; c < layout.CB; ++c)
      x_needed[c] = layout.row_ptr[c + 1] > layout.row_ptr[c];
    for (int64_t k = 0; k < layout.KB; ++k)
      dy_needed[k] = layout.col_ptr[k + 1] > layout.col_ptr[k];
    // bs 1 packs every column (PackNeededBlockColumns transposes x and dy whole).
    const int64_t panels = bs == 1 ? layout.CB + layout.KB
                                   : std::count(x_needed.begin(), x_needed.end(), 1) +
                                         std::count(dy_needed.begin(), dy_needed.end(), 1);
    needed_bytes = panels * rows * bs * static_cast<int64_t>(sizeof(float));
  }
  const bool packed_first = !x_needed.empty() && FitsInLastLevelCache(needed_bytes);
  if (packed_first) {
    PackNeededBlockColumns(x, dy, N, C, K, bs, row_pairs, rows, x_needed, dy_needed, x_panels,
                           dy_panels, parallel_for);
  }
  // Tiles: runs of up to max_shared_row_tile consecutive blocks of one block row in that
  // order, computed together (they share x's panel).  Chosen here, by the layout alone, since
  // a block's sums depend on its tile (see CpuKernels::grad_w).
  const int64_t most = row_pairs ? kernels.max_shared_row_tile : 1;
  std::vector<int32_t> tile_start;
  tile_start.reserve(layout.blocks + 1);
  for (int64_t q = 0; q < layout.blocks;) {
    tile_start.push_back(static_cast<int32_t>(q));
    const int32_t row = layout.block_row[order[q]];
    const int64_t last = std::min(layout.blocks, q + most);
    for (++q; q < last && layout.block_row[order[q]] == row;) ++q;
  }
  const int64_t tiles = static_cast<int64_t>(tile_start.size());
  tile_start.push_back(static_cast<int32_t>(layout.blocks));
  const int64_t cost = 2 * N * bs * bs * layout.blocks / std::max<int64_t>(1, tiles);
  parallel_for(tiles, cost, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t q = tile_start[t], count = tile_start[t + 1] - q, b = order[q];
      if (!packed_first) {
        const int64_t xp = layout.block_row[b] / per_pack;
        std::call_once(x_packed[xp], [&] { pack(x, C, layout.CB, xp, x_panels); });
        for (int64_t i = q; i < q + count; ++i) {
          const int64_t dyp = layout.block_col[order[i]] / per_pack;
          std::call_once(dy_packed[dyp], [&] { pack(dy, K, layout.KB, dyp, dy_panels); });
        }
      }
      const int64_t next = t + 1 < end ? order[tile_start[t + 1]] : -1;
      kernels.grad_w(x_panels, dy_panels, dw, rows, &view, order.data() + q, count, next);
    }
  });
  return true;
}

}  // namespace

const std::string& RequestedCpuIsa() {
  static const std::string name = [] {
    const char* requested = std::getenv("BLOCKSPARSE_TF_CPU_ISA");
    return std::string(requested == nullptr ? "" : requested);
  }();
  return name;
}

const CpuKernels& BestCpuKernels() {
  static const CpuKernels* kernels = [] {
    __builtin_cpu_init();
    const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
    const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const CpuKernels* best =
        has_avx512 ? &avx512::kKernels : has_avx2 ? &avx2::kKernels : &generic::kKernels;
    // BLOCKSPARSE_TF_CPU_ISA names a narrower instruction set, to test or compare the kernels
    // of older processors on a newer one (the Python package checks the name, and makes this
    // choice, as it loads the library).
    const std::string& name = RequestedCpuIsa();
    if (name.empty()) return best;
    if (name == "generic") return &generic::kKernels;
    if (name == "avx2" && has_avx2) return &avx2::kKernels;
    if (name == "avx512" && has_avx512) return &avx512::kKernels;
    // AMX serves bfloat16 products only (blocksparse_matmul_amx.cc); the rest run AVX-512's.
    if (name == "amx" && AmxBf16Enabled()) return &avx512::kKernels;
    std::fprintf(stderr,
                 "blocksparse_tf: BLOCKSPARSE_TF_CPU_ISA=%s is not available on this processor; "
                 "using %s\n", name.c_str(), best->isa);
    return best;
  }();
  return *kernels;
}

bool BlocksparseMatmulCpu(const float* x, const float* w, float* y, int64_t N, int feature_axis,
                          const BlockLayout& layout, const ParallelFor& parallel_for,
                          const ScratchAllocator& scratch, bool w_transposed) {
  if (const int64_t coarse_bs = CoarseBlockSize(layout, N)) {
    const int64_t bs = layout.block_size;
    const BlockLayout coarse = FullLayout(layout.CB * bs, layout.KB * bs, coarse_bs);
    if (w_transposed && (w = TransposedBlocks(w, layout, parallel_for, scratch)) == nullptr) {
      return false;
    }
    float* const wc = scratch(layout.blocks * bs * bs);
    if (wc == nullptr) return false;
    ForEachFullLayoutPiece(layout, coarse_bs, parallel_for, [&](int64_t fine, int64_t coarse) {
      std::memcpy(wc + coarse, w + fine, bs * sizeof(float));
    });
    return Forward(x, wc, y, N, feature_axis, coarse, parallel_for, scratch, false);
  }
  return Forward(x, w, y, N, feature_axis, layout, parallel_for, scratch, w_transposed);
}

bool BlocksparseMatmulGradWCpu(const float* x, const float* dy, float* dw, int64_t N,
                               int feature_axis, const BlockLayout& layout,
                               const ParallelFor& parallel_for, const ScratchAllocator& scratch) {
  if (const int64_t coarse_bs = CoarseBlockSize(layout, N)) {
    const int64_t bs = layout.block_size;
    const BlockLayout coarse = FullLayout(layout.CB * bs, layout.KB * bs, coarse_bs);
    float* const dwc = scratch(layout.blocks * bs * bs);
    if (dwc == nullptr) return false;
    if (!GradW(x, dy, dwc, N, feature_axis, coarse, parallel_for, scratch)) return false;
    ForEachFullLayoutPiece(layout, coarse_bs, parallel_for, [&](int64_t fine, int64_t coarse) {
      std::memcpy(dw + fine, dwc + coarse, bs * sizeof(float));
    });
    return true;
  }
  return GradW(x, dy, dw, N, feature_axis, layout, parallel_for, scratch);
}

// out[i] = in[i] for i < n by the kernels' conversion `convert`, in tasks of 16384 elements.
template <typename In, typename Out>
void ConvertInChunks(void (*CpuKernels::*convert)(const In*, Out*, int64_t), const In* in,
                     Out* out, int64_t n, const ParallelFor& parallel_for) {
  constexpr int64_t kChunk = 16384;
  parallel_for((n + kChunk - 1) / kChunk, kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * kChunk; i < n && i < end * kChunk; i += kChunk) {
      (Kernels().*convert)(in + i, out + i, std::min(kChunk, n - i));
    }
  });
}

void BFloat16ToFloat(const uint16_t* in, float* out, int64_t n, const ParallelFor& parallel_for) {
  ConvertInChunks(&CpuKernels::bfloat16_to_float, in, out, n, parallel_for);
}

void FloatToBFloat16(const float* in, uint16_t* out, int64_t n, const ParallelFor& parallel_for) {
  ConvertInChunks(&CpuKernels::float_to_bfloat16, in, out, n, parallel_for);
}

void HalfToFloat(const uint16_t* in, float* out, int64_t n, const ParallelFor& parallel_for) {
  ConvertInChunks(&CpuKernels::half_to_float, in, out, n, parallel_for);
}

void FloatToHalf(const float* in, uint16_t* out, int64_t n, const ParallelFor& parallel_for) {
  ConvertInChunks(&CpuKernels::float_to_half, in, out, n, parallel_for);
}

const char* BlocksparseCpuIsa() { return AmxBf16Enabled() ? "amx" : Kernels().isa; }

}  // namespace blocksparse

// For Python (ctypes): the instruction set of the CPU kernels in use.
extern "C" const char* blocksparse_tf_cpu_isa() { return blocksparse::BlocksparseCpuIsa(); }
// For tests (ctypes): the block size the CPU products of a layout with these sizes run with
// over N rows (its own, or a wider one for full layouts of 8- or 16-wide blocks), and whether
// full layouts of 16-wide blocks are repacked on this processor.
extern "C" int64_t blocksparse_tf_cpu_product_block_size(int64_t CB, int64_t KB, int64_t bs,
                                                          int64_t blocks, int64_t N) {
  const int64_t coarse = blocksparse::CoarseBlockSize(CB, KB, bs, blocks, N);
  return coarse != 0 ? coarse : bs;
}
extern "C" int blocksparse_tf_cpu_coarsens_bs16() { return blocksparse::CoarsenFullLayouts(16); }
