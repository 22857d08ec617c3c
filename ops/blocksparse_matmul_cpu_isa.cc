// Register-tiled block-sparse micro-kernels, compiled once per instruction set.
// Build with -DBSMM_ISA=<namespace> plus that set's -m flags (see ops/BUILD).
//
// Every product here is C[m, :] = sum over (A, B) pairs, sum over p, A[p][m] * B[p][:], with
// a tile of MR rows x NV vectors of C kept in registers for the whole sum.  The three
// products differ only in where A, B and C live (see the comments on each driver).
// Summation order is fixed by the layout, never by threads: results are deterministic.

#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ops/blocksparse_matmul_cpu_isa.h"

#ifndef BSMM_ISA
#error "define BSMM_ISA to the kernel namespace (avx512, avx2 or generic)"
#endif

namespace blocksparse {
namespace BSMM_ISA {
namespace {

// kRowTile x kMaxNV accumulators, plus kMaxNV B vectors and one broadcast, fill the vector
// registers.  The weight gradient tiles rows of a block, so its row count must divide 8.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
constexpr int kRowTile = 12;  // 12 x 2 of the 32 zmm registers
constexpr int kGradRows = 8;
#elif defined(__AVX2__)
constexpr int kVectorBytes = 32;
constexpr int kRowTile = 6;   // 6 x 2 of the 16 ymm registers
constexpr int kGradRows = 4;
#else
constexpr int kVectorBytes = 16;
constexpr int kRowTile = 6;
constexpr int kGradRows = 4;
#endif
constexpr int kMaxNV = 2;
static_assert(kRowTile % 3 == 0, "the forward's last tile may take a third of the rows");

typedef float VecWide __attribute__((vector_size(kVectorBytes)));
typedef float Vec8 __attribute__((vector_size(32)));

template <typename V>
constexpr int Width() { return sizeof(V) / sizeof(float); }
template <typename V>
inline V Load(const float* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V>
inline void Store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
template <typename V>
inline V Splat(float a) { return a - V{}; }  // x - 0 == x exactly, so this folds to a broadcast
inline int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }

// a * b + c as the register tiles compute it: one fused multiply-add where the instruction set
// has one (spelt out: the compiler may otherwise vectorize the products of a loop apart from
// its sums, rounding each product, and the sums would differ from the tiles' in the last bit).
inline float MulAdd(float a, float b, float c) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}
// The same for a tile's vectors (GCC fuses a vector multiply and add), and for its one-float
// columns spelt out: an unrolled tile of one-float accumulators may otherwise be vectorized
// with its products apart from its sums.
template <typename V>
inline V MulAdd(V a, V b, V c) {
  return a * b + c;
}

// A store that bypasses the caches (no read of the line first): for results written once and
// not read again soon.  p must be aligned to sizeof(V); the caller fences before anyone reads.
template <typename V>
inline void StreamStore(float* p, V v) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) {
    _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
    return;
  }
#endif
#if defined(__AVX__)
  if constexpr (sizeof(V) == 32) {
    _mm256_stream_ps(p, reinterpret_cast<__m256>(v));
    return;
  }
#endif
  if constexpr (sizeof(V) == 16) {
    _mm_stream_ps(p, reinterpret_cast<__m128>(v));
  } else {
    Store<V>(p, v);  // a single float: an ordinary store
  }
}

// One pair (A, B): the weight gradients' products, each a sum over many rows.
struct SinglePair {
  const float* a_ptr;
  const float* b_ptr;
  int64_t size() const { return 1; }
  const float* a(int64_t) const { return a_ptr; }
  const float* b(int64_t) const { return b_ptr; }
};

// One pair, and while it computes, step p < lines fetches line p of two other ranges into L2
// (the next product's operands).
struct SinglePairFetchingAhead {
  const float* a_ptr;
  const float* b_ptr;
  const float* ahead_a;
  const float* ahead_b;
  int64_t lines;
  int64_t size() const { return 1; }
  const float* a(int64_t) const { return a_ptr; }
  const float* b(int64_t) const { return b_ptr; }
};

// One pair whose B rows are not b_rs apart in order but listed: B's row p is
// b_ptr + b_rows[p] * b_rs.  Rows kListedRowsAhead steps ahead are fetched meanwhile: listed
// rows skip some, and the hardware prefetchers lose them.  Measured on a 2-core Intel Xeon
// (sparse_dot's weight gradient, 1024 x 4096 x 4096, bs 16, ms, none / 4 / 12 ahead): 25% in
// and 100% out 133-150 / 107-113 / 132-155, 100% in and 25% out 163-192 / 126-128 / 132-164.
constexpr int64_t kListedRowsAhead = 4;
struct SinglePairListedB {
  const float* a_ptr;
  const float* b_ptr;
  const int32_t* b_rows;
  int64_t size() const { return 1; }
  const float* a(int64_t) const { return a_ptr; }
  const float* b(int64_t) const { return b_ptr; }
};

// The heart of everything: C[m][0 : NV*W) (m < rows) = sum_q sum_{p<P} a_q[p*a_cs + m*kARs] * b_q[p*b_rs + :].
// `Pairs` yields the q-th A and B pointers.  A's MR values for one p are contiguous (kARs 1),
// or A is an MR x P row-major block of row stride kARs (a_cs 1, every one of its MR rows
// readable): a compile-time stride, so the MR row offsets need no registers.
// With kStream, C is written by StreamStore (so each of its rows must be aligned to V).
// With kAccumulate the sums start from C's values (its `rows` rows) instead of zero.
template <int MR, int NV, typename V, typename Pairs, bool kStream = false, int kARs = 1,
          bool kAccumulate = false>
inline void Tile(const Pairs& pairs, int64_t P, int64_t a_cs, int64_t b_rs, float* c,
                 int64_t c_rs, int64_t rows) {
  constexpr int W = Width<V>();
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[m][v] = kAccumulate && m < rows ? Load<V>(c + m * c_rs + v * W) : V{};
  const int64_t count = pairs.size();
  for (int64_t q = 0; q < count; ++q) {
    const float* a = pairs.a(q);
    const float* b = pairs.b(q);
    // The next pair's operands sit at unrelated addresses, out of the hardware prefetchers'
    // sight: fetch them row by row while this pair computes.
    const bool prefetch = q + 1 < count;
    const float* a_next = prefetch ? pairs.a(q + 1) : a;
    const float* b_next = prefetch ? pairs.b(q + 1) : b;
    // Step p of the sum; then a, b, a_next and b_next move on to step p + 1.
    auto step = [&](int64_t p) __attribute__((always_inline)) {
      if (prefetch) {
        if constexpr (kARs != 1) {
          // The next A block is MR * kARs contiguous floats: one of its cache lines per p.
          if (p * kLineFloats < MR * kARs) __builtin_prefetch(a_next - p + p * kLineFloats);
        } else {
          __builtin_prefetch(a_next);
        }
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) __builtin_prefetch(b_next + v * W);
      }
      // Written out here: GCC finds a function that only prefetches free of effects and drops
      // its calls.
      if constexpr (std::is_same_v<Pairs, SinglePairFetchingAhead>) {
        if (p < pairs.lines) {
          __builtin_prefetch(pairs.ahead_a + p * kLineFloats, 0, 2);
          __builtin_prefetch(pairs.ahead_b + p * kLineFloats, 0, 2);
        }
      }
      const float* b_row = b;
      if constexpr (std::is_same_v<Pairs, SinglePairListedB>) {
        b_row = pairs.b_ptr + pairs.b_rows[p] * b_rs;
        const int64_t ahead = pairs.b_rows[Min(p + kListedRowsAhead, P - 1)];
        const float* b_ahead = pairs.b_ptr + ahead * b_rs;
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) __builtin_prefetch(b_ahead + v * W);
      }
      V bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = Load<V>(b_row + v * W);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const V av = Splat<V>(a[m * kARs]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[m][v] = MulAdd(av, bv[v], acc[m][v]);
      }
      a += a_cs;
      b += b_rs;
      a_next += a_cs;
      b_next += b_rs;
    };
    int64_t p = 0;
    // The weight gradients' long sums (one pair, P = its rows) take four steps per loop
    // iteration: the loop's own counting, compares and branches otherwise take issue slots
    // from the multiply-adds (LIBXSMM's generated GEMM kernels step four at a time too;
    // benchmarks/bench_libxsmm.py).  The same sums in the same order.  Products over blocks
    // (P = bs) loop as before.
    if constexpr (std::is_same_v<Pairs, SinglePair> ||
                  std::is_same_v<Pairs, SinglePairFetchingAhead> ||
                  std::is_same_v<Pairs, SinglePairListedB>) {
      for (; p + 4 <= P; p += 4) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) step(p + u);
      }
    }
    for (; p < P; ++p) step(p);
  }
  // Constant trip counts everywhere, so acc lives in registers (a runtime bound on m would
  // force it onto the stack).
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    if (m < rows) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        if constexpr (kStream) {
          StreamStore<V>(c + m * c_rs + v * W, acc[m][v]);
        } else {
          Store<V>(c + m * c_rs + v * W, acc[m][v]);
        }
      }
    }
  }
}

// The blocks of one output block column k as (A, B) pairs.  Each operand is either indexed by
// the block's input block row c (x, which is split by rows) or by the block itself (w).
template <bool kAIsWeight>
struct ColumnPairs {
  const int32_t* rows;
  const int32_t* blocks;
  int64_t count;
  const float* x_base;
  int64_t x_stride;  // offset between the x slices of consecutive block rows
  const float* w_base;
  int64_t w_stride;  // offset between consecutive blocks of w
  int64_t size() const { return count; }
  const float* x(int64_t q) const { return x_base + rows[q] * x_stride; }
  const float* w(int64_t q) const { return w_base + blocks[q] * w_stride; }
  const float* a(int64_t q) const { return kAIsWeight ? w(q) : x(q); }
  const float* b(int64_t q) const { return kAIsWeight ? x(q) : w(q); }
};

template <bool kAIsWeight>
ColumnPairs<kAIsWeight> PairsOfColumn(const LayoutView& l, int64_t k, const float* x_base,
                                      int64_t x_stride, const float* w_base, int64_t w_stride) {
  const int64_t begin = l.col_ptr[k];
  return {l.col_row + begin, l.col_block + begin, l.col_ptr[k + 1] - begin,
          x_base,            x_stride,            w_base,
          w_stride};
}

// Runs Op::Run<V, NV>(args...) with the vector type and count covering one chunk of a
// block's bs columns (bs is always a multiple of the chunk width).  A width that no vector
// divides (possible only where an op's width is not a block's) runs one column at a time.
template <typename Op, typename... Args>
inline void DispatchBlockColumns(int64_t bs, Args... args) {
  if (bs % (Width<VecWide>() * kMaxNV) == 0) {
    Op::template Run<VecWide, kMaxNV>(args...);
  } else if (bs % Width<VecWide>() == 0) {
    Op::template Run<VecWide, 1>(args...);
  } else if (kVectorBytes > 32 && bs % 8 == 0) {  // bs 8 is half an AVX-512 register
    if constexpr (kVectorBytes > 32) Op::template Run<Vec8, 1>(args...);
  } else {
    Op::template Run<float, 1>(args...);
  }
}

// Calls f(std::integral_constant<int, bs>{}) for the block sizes of the row-tile panels (8,
// 16, 32, 64): a panel's row stride is then a template argument of the tile.
template <typename F>
inline void WithPanelBlockSize(int64_t bs, F&& f) {
  switch (bs) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
  }
}

// Calls f(std::integral_constant<int, MR>{}, m0, count) for the row tiles of `rows` rows of
// row-tile panels: tiles of kRowTile rows, count = the rows of the tile that exist.  A last,
// partial tile runs on a third or two thirds of the registers' rows where that covers it, so
// its padding rows are not multiplied (at N = 64: 64 rows computed instead of 72).
template <typename F>
inline void ForRowTiles(int64_t rows, F&& f) {
  constexpr int kThird = kRowTile / 3;
  for (int64_t m0 = 0; m0 < rows; m0 += kRowTile) {
    const int64_t count = Min(kRowTile, rows - m0);
    if (count <= kThird) {
      f(std::integral_constant<int, kThird>{}, m0, count);
    } else if (count <= 2 * kThird) {
      f(std::integral_constant<int, 2 * kThird>{}, m0, count);
    } else {
      f(std::integral_constant<int, kRowTile>{}, m0, count);
    }
  }
}

// feature_axis 1, y (rows, K):  A = x's rows as row-tile panels (see
// CpuKernels::forward_axis1), B = w block rows, C = y rows.  P = bs, pairs = the blocks of
// column k.
struct ForwardAxis1Op {
  template <typename V, int NV>
  static void Run(const float* panels, const float* w, float* y, int64_t rows,
                  const LayoutView* l, int64_t k_begin, int64_t k_end) {
    WithPanelBlockSize(l->block_size, [&](auto kBs) {
      RunBlockSize<V, NV, decltype(kBs)::value>(panels, w, y, rows, l, k_begin, k_end);
    });
  }

  template <typename V, int NV, int kBs>
  static void RunBlockSize(const float* panels, const float* w, float* y, int64_t rows,
                           const LayoutView* l, int64_t k_begin, int64_t k_end) {
    constexpr int64_t chunk = Width<V>() * NV;
    if constexpr (kBs % chunk == 0) {
      const int64_t C = l->CB * kBs, K = l->KB * kBs;
      // Rows [m0, m0 + count) of y over the output block columns [k_begin, k_end), as tiles
      // of MR rows (count <= MR <= kRowTile) read from the tile's panel.
      auto tile_rows = [&](auto kMR, int64_t m0, int64_t count) {
        const float* panel = panels + m0 * C;
        for (int64_t k = k_begin; k < k_end; ++k) {
          for (int64_t j0 = 0; j0 < kBs; j0 += chunk) {
            const auto pairs =
                PairsOfColumn<false>(*l, k, panel, kRowTile * kBs, w + j0, kBs * kBs);
            Tile<decltype(kMR)::value, NV, V, decltype(pairs), false, kBs>(
                pairs, kBs, 1, kBs, y + m0 * K + k * kBs + j0, K, count);
          }
        }
      };
      // Tile rows outermost: each row of y is then written left to right in long runs, and
      // the weight columns of [k_begin, k_end) stay in L2 for the next tile.
      ForRowTiles(rows, tile_rows);
    }
  }
};

void ForwardAxis1(const float* panels, const float* w, float* y, int64_t rows,
                  const LayoutView* layout, int64_t k_begin, int64_t k_end) {
  DispatchBlockColumns<ForwardAxis1Op>(layout->block_size, panels, w, y, rows, layout, k_begin,
                                       k_end);
}

// Rows [j0, j0 + MR) of y's block row k, columns [n0, n1), stepping `chunk` columns at a time.
// kWRs 1: w holds the product's blocks, A[p][m] = w[p bs + j0 + m]; kWRs = bs: w holds their
// transposes (the input gradient's w read as stored), A[p][m] = w[(j0 + m) bs + p], MR rows of
// a compile-time stride.
// With kYRows y is (N, K) instead: each tile's MR x chunk sums are turned around on the way out.
template <int MR, int kCols>
inline void StoreTransposed(const float* tile, float* out, int64_t out_rs);

template <int MR, typename V, int NV, int kWRs, bool kYRows>
inline int64_t ForwardAxis0Columns(const float* x, int64_t x_rs, const float* w, float* y,
                                   int64_t N, const LayoutView& l, int64_t k, int64_t j0,
                                   int64_t n0, int64_t n1) {
  constexpr int64_t chunk = Width<V>() * NV;
  const int64_t bs = l.block_size;
  const float* const a = kWRs == 1 ? w + j0 : w + j0 * bs;
  for (; n0 + chunk <= n1; n0 += chunk) {
    const auto pairs = PairsOfColumn<true>(l, k, x + n0, bs * x_rs, a, bs * bs);
    alignas(64) float tile[kYRows ? MR * chunk : 1];
    float* const c = kYRows ? tile : y + (k * bs + j0) * N + n0;
    Tile<MR, NV, V, decltype(pairs), false, kWRs>(pairs, bs, kWRs == 1 ? bs : 1, x_rs, c,
                                                  kYRows ? chunk : N, MR);
    if constexpr (kYRows) {
      const int64_t K = l.KB * bs;
      StoreTransposed<MR, chunk>(tile, y + n0 * K + k * bs + j0, K);
    }
  }
  return n0;
}

// Vectors along N in the feature_axis=0 forward's register tiles of kGradRows rows, so that
// their accumulators fill the registers the row-major tiles use (kRowTile x kMaxNV).
// Measured on a 2-core Zen 5 (N = 1024, C = K = 4096, the two libraries in six alternating
// processes, median ms, 2 vectors -> 3): bs 8 (feature_axis 1, through the transposed copies)
// at 10% 29.3 -> 25.6, 25% 56.5 -> 47.3, 50% 119.7 -> 92.6; feature_axis 0 at 10% bs 8 25.2 ->
// 15.4, bs 16 15.9 -> 13.3, bs 32 13.5 -> 11.9, and bs 32 at 50% 64.2 -> 55.1.
constexpr int kAxis0NV = kRowTile * kMaxNV / kGradRows;
static_assert(kAxis0NV * kGradRows == kRowTile * kMaxNV, "as many accumulators as kRowTile's");

// feature_axis 0, y (K, N):  A = w block read transposed (A[i][j] = w[i*bs + j]; with kWRs =
// bs, w holding the transposes, read as stored), B = x rows of block row c, C = y rows of
// block row k.  Vectors run along N.
template <int MR, int kWRs = 1, bool kYRows = false>
void ForwardAxis0Rows(const float* x, int64_t x_rs, const float* w, float* y, int64_t N,
                      const LayoutView& l, int64_t k, int64_t n_begin, int64_t n_end) {
  for (int64_t j0 = 0; j0 < l.block_size; j0 += MR) {
    int64_t n = n_begin;
    if constexpr (MR == kGradRows) {
      n = ForwardAxis0Columns<MR, VecWide, kAxis0NV, kWRs, kYRows>(x, x_rs, w, y, N, l, k, j0, n,
                                                                    n_end);
    }
    n = ForwardAxis0Columns<MR, VecWide, kMaxNV, kWRs, kYRows>(x, x_rs, w, y, N, l, k, j0, n,
                                                                n_end);
    n = ForwardAxis0Columns<MR, VecWide, 1, kWRs, kYRows>(x, x_rs, w, y, N, l, k, j0, n, n_end);
    ForwardAxis0Columns<MR, float, 1, kWRs, kYRows>(x, x_rs, w, y, N, l, k, j0, n, n_end);
  }
}

template <bool kYRows>
void ForwardAxis0Of(const float* x, int64_t x_rs, const float* w, float* y, int64_t N,
                    const LayoutView* layout, int64_t k, int64_t n_begin, int64_t n_end,
                    bool w_transposed) {
  const int64_t bs = layout->block_size;
  if (bs == 1) {  // a 1 x 1 block is its own transpose
    ForwardAxis0Rows<1, 1, kYRows>(x, x_rs, w, y, N, *layout, k, n_begin, n_end);
  } else if (!w_transposed) {  // block sizes 8..64 are multiples of kGradRows
    ForwardAxis0Rows<kGradRows, 1, kYRows>(x, x_rs, w, y, N, *layout, k, n_begin, n_end);
  } else {
    WithPanelBlockSize(bs, [&](auto kBs) {
      ForwardAxis0Rows<kGradRows, decltype(kBs)::value, kYRows>(x, x_rs, w, y, N, *layout, k,
                                                                 n_begin, n_end);
    });
  }
}

void ForwardAxis0(const float* x, int64_t x_rs, const float* w, float* y, int64_t N,
                  const LayoutView* layout, int64_t k, int64_t n_begin, int64_t n_end,
                  bool w_transposed, bool y_rows) {
  auto run = y_rows ? ForwardAxis0Of<true> : ForwardAxis0Of<false>;
  run(x, x_rs, w, y, N, layout, k, n_begin, n_end, w_transposed);
}

// dw of one block (c, k) from block-column panels (panel[n][i] = x[n, c*bs + i], likewise dy):
// A = the x panel, B = the dy panel rows, C = dw rows.  P = N, one pair, both read sequentially.
// The panels of the block computed next (next_x, next_dy) are fetched into L2 meanwhile, spread
// over this block's tiles.  Without that, each block's first tile waited on L3 for its x panel:
// its lines follow each other, but the hardware prefetchers stop at every 4 KiB page, and at
// C = K = 4096, N = 1024 the x panels (16 MiB) are read again for every block column.
// Measured on the 2-core Xeon (C = K = 4096, N = 1024; the two libraries in alternating
// processes, fastest ms, before -> after): bs 32 at 100% 366-465 -> 193-263, 50% 184-218 ->
// 141-145, 5% 27-29 -> 20-23; bs 64 at 10% 39-42 -> 31-32; a full bs-16 layout 309-363 -> 258.
template <int MR>
struct GradWOp {
  template <typename V, int NV>
  static void Run(const float* x_panels, const float* dy_panels, float* dw, int64_t N,
                  const LayoutView* l, int64_t b, const float* next_x, const float* next_dy,
                  bool fetch_next) {
    constexpr int64_t chunk = Width<V>() * NV;
    const int64_t bs = l->block_size;
    const float* xb = x_panels + l->block_row[b] * N * bs;
    const float* dyb = dy_panels + l->block_col[b] * N * bs;
    float* out = dw + b * bs * bs;
    // The lines of a panel to fetch.
    const int64_t lines = fetch_next ? (N * bs + kLineFloats - 1) / kLineFloats : 0;
    // A block one vector wide and 2 MR rows tall (bs 16 under AVX-512, bs 8 under AVX2) is one
    // tile of all its rows: twice the accumulators, each dy vector loaded once per step instead
    // of twice (the same sums).  Measured on a 2-core Zen 5 (N = 1024, C = K = 4096, bs 16,
    // the two versions in alternating processes, eight rounds, median ms): 5% 11.5 -> 10.4,
    // 10% 20.0 -> 17.6, 25% 39.6 -> 33.3, 50% 72.1 -> 61.7.
    if constexpr (NV == 1) {
      if (bs == 2 * MR && chunk == bs) {
        Tile<2 * MR, 1, V>(SinglePairFetchingAhead{xb, dyb, next_x, next_dy, lines}, N, bs, bs,
                           out, bs, 2 * MR);
        return;
      }
    }
    const int64_t tiles = bs / MR * (bs / chunk);
    const int64_t lines_per_tile = (lines + tiles - 1) / tiles;
    int64_t first = 0;  // the first line the tile fetches (the last tiles may fetch none)
    for (int64_t i0 = 0; i0 < bs; i0 += MR)
      for (int64_t j0 = 0; j0 < bs; j0 += chunk, first = Min(lines, first + lines_per_tile)) {
        const SinglePairFetchingAhead pair{xb + i0, dyb + j0, next_x + first * kLineFloats,
                                           next_dy + first * kLineFloats,
                                           Min(lines_per_tile, lines - first)};
        Tile<MR, NV, V>(pair, N, bs, bs, out + i0 * bs + j0, bs, MR);
      }
  }
};

#if defined(__AVX512F__)
// bs 8 is half a 512-bit register, so GradWOp's tiles run on 256-bit vectors.  Panels of row
// pairs (RowPairsPanelOffset) put dy's rows n and n + 1 in one 16-float vector (dy[n][j] in
// lane 2j, dy[n + 1][j] in lane 2j + 1), against one 64-bit broadcast of x[n][i], x[n + 1][i]:
// every product runs at full width.  Lanes 2j and 2j + 1 of row i's sums then hold dw[i][j]
// over the even and the odd rows, added at the end; pair steps alternate between two sets of
// sums, so 16 independent chains hide the FMA latency.  One core, the kernel alone (bs 8,
// N = 1024, panels in L1 and L2): 47-65 GFLOP/s -> 89-114.  In the op, with the grouped order
// of blocks and panels (blocksparse_matmul_cpu.cc's GradWOrder), on the 2-core Intel Xeon
// (C = K = 4096, the two versions in alternating processes, fastest ms): N = 1024 at 5%
// 43-56 -> 31-42, 10% 71-82 -> 42-58, 25% 150-170 -> 91-109, 50% 335-360 -> 172-207; N = 64
// at 10% 6.5-6.8 -> 3.8-4.0.
constexpr int64_t kRowPairsBlockSize = 8;
constexpr int64_t kMaxSharedRowTile = 3;
typedef double VecWideD __attribute__((vector_size(kVectorBytes)));

inline VecWide PairSplat(const float* pair) {
  double both;
  std::memcpy(&both, pair, sizeof(both));
  return reinterpret_cast<VecWide>(both - VecWideD{});  // folds to vbroadcastsd
}

// dw rows 2r and 2r + 1 are 16 contiguous floats: the sums of lanes 2j and 2j + 1 of row
// sums[2r], then of sums[2r + 1].
inline void StoreRowPairSums(const VecWide* sums, float* out) {
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r) {
    const VecWide a = sums[2 * r], b = sums[2 * r + 1];
    const VecWide lo = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22,
                                               24, 26, 28, 30);
    const VecWide hi = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23,
                                               25, 27, 29, 31);
    Store<VecWide>(out + 16 * r, lo + hi);
  }
}

constexpr int64_t kPairFloats = 16;  // one pair step of a panel: one vector, one line

// One block alone: pair steps alternate between two sets of sums.
void GradWRowPairs(const float* xb, const float* dyb, int64_t pairs, float* out,
                   const float* next_x, const float* next_dy, bool fetch_next) {
  VecWide even[8] = {}, odd[8] = {};
  int64_t t = 0;
  for (; t + 1 < pairs; t += 2, xb += 2 * kPairFloats, dyb += 2 * kPairFloats) {
    if (fetch_next) {  // the next tile's panels, a line of each per step
      const int64_t ahead = t * kPairFloats;
      __builtin_prefetch(next_x + ahead, 0, 2);
      __builtin_prefetch(next_dy + ahead, 0, 2);
      __builtin_prefetch(next_x + ahead + kPairFloats, 0, 2);
      __builtin_prefetch(next_dy + ahead + kPairFloats, 0, 2);
    }
    const VecWide d0 = Load<VecWide>(dyb), d1 = Load<VecWide>(dyb + kPairFloats);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      even[i] += PairSplat(xb + 2 * i) * d0;
      odd[i] += PairSplat(xb + kPairFloats + 2 * i) * d1;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    if (t < pairs) even[i] += PairSplat(xb + 2 * i) * Load<VecWide>(dyb);
    even[i] += odd[i];
  }
  StoreRowPairSums(even, out);
}

// KC blocks of one block row (2 or 3), sharing each broadcast of x: one set of sums per block,
// 8 KC independent chains.  One core, the kernels alone (bs 8, N = 1024, C = K = 4096, the
// blocks in GradWOrder's groups, GFLOP/s, blocks one by one -> up to three of a row together):
// 5% 51-54 -> 61-63, 10% 57-59 -> 71-75, 25% 65-75 -> 85-92.  In the op (the two libraries in
// alternating processes, weight gradient, fastest ms): 2% 18-25 -> 15-19, 5% 28-42 -> 21-28,
// 10% 43-64 -> 29-36, 25% 68-123 -> 52-67, 50% 143-162 -> 88-111.
template <int KC>
void GradWRowPairsShared(const float* xb, const float* const* dyb, int64_t pairs,
                         float* const* out, const float* next_x, const float* next_dy,
                         bool fetch_next) {
  VecWide sums[KC][8] = {};
  for (int64_t t = 0; t < pairs; ++t, xb += kPairFloats) {
    if (fetch_next) {
      __builtin_prefetch(next_x + t * kPairFloats, 0, 2);
      __builtin_prefetch(next_dy + t * kPairFloats, 0, 2);
    }
    VecWide d[KC];
#pragma GCC unroll 4
    for (int k = 0; k < KC; ++k) d[k] = Load<VecWide>(dyb[k] + t * kPairFloats);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const VecWide x = PairSplat(xb + 2 * i);
#pragma GCC unroll 4
      for (int k = 0; k < KC; ++k) sums[k][i] += x * d[k];
    }
  }
#pragma GCC unroll 4
  for (int k = 0; k < KC; ++k) StoreRowPairSums(sums[k], out[k]);
}
#else
constexpr int64_t kRowPairsBlockSize = 0;
constexpr int64_t kMaxSharedRowTile = 1;
#endif

// bs 1: a block's dw is the dot product of two panels of N floats (a column of x, one of dy).
// GradWOp's one-float tiles ran it as one chain of scalar FMAs, each waiting for the last;
// here vectors run along N, in four independent sums, added in a fixed order at the end.
// Measured on the 2-core Intel Xeon (C = K = 4096, N = 1024, weight gradient, fastest ms of
// the two versions in alternating processes, both with the grouped order): 1% density 190-201
// -> 61-67, 5% 763-816 -> 141-164.
float GradWDot(const float* x, const float* dy, int64_t N, const float* next_x,
               const float* next_dy, bool fetch_next) {
  constexpr int64_t W = Width<VecWide>();
  VecWide acc[4] = {};
  int64_t n = 0;
  for (; n + 4 * W <= N; n += 4 * W) {
    if (fetch_next) {
#pragma GCC unroll 4
      for (int64_t line = 0; line < 4 * W; line += kLineFloats) {
        __builtin_prefetch(next_x + n + line, 0, 2);
        __builtin_prefetch(next_dy + n + line, 0, 2);
      }
    }
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v)
      acc[v] += Load<VecWide>(x + n + v * W) * Load<VecWide>(dy + n + v * W);
  }
  for (; n + W <= N; n += W) acc[0] += Load<VecWide>(x + n) * Load<VecWide>(dy + n);
  float total = 0.0f;
  if (n > 0) {  // below one vector the lanes hold zeros: their sum (a chain of W adds) is 0
    const VecWide sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (int lane = 0; lane < W; ++lane) total += sum[lane];
  }
  for (; n < N; ++n) total = MulAdd(x[n], dy[n], total);
  return total;
}

void GradW(const float* x_panels, const float* dy_panels, float* dw, int64_t rows,
           const LayoutView* layout, const int32_t* tile, int64_t count, int64_t next) {
  const int64_t bs = layout->block_size, b = tile[0];
  const bool fetch_next = next >= 0;
  if (!fetch_next) next = b;
  const int64_t panel = rows * bs;
  const float* next_x = x_panels + layout->block_row[next] * panel;
  const float* next_dy = dy_panels + layout->block_col[next] * panel;
  const float* xb = x_panels + layout->block_row[b] * panel;
#if defined(__AVX512F__)
  if (bs == kRowPairsBlockSize) {
    if (count == 1) {
      GradWRowPairs(xb, dy_panels + layout->block_col[b] * panel, rows / 2, dw + b * bs * bs,
                    next_x, next_dy, fetch_next);
      return;
    }
    const float* dyb[kMaxSharedRowTile];
    float* out[kMaxSharedRowTile];
    for (int64_t k = 0; k < count; ++k) {
      dyb[k] = dy_panels + layout->block_col[tile[k]] * panel;
      out[k] = dw + tile[k] * bs * bs;
    }
    auto shared = count == 2 ? GradWRowPairsShared<2> : GradWRowPairsShared<3>;
    shared(xb, dyb, rows / 2, out, next_x, next_dy, fetch_next);
    return;
  }
#endif
  if (bs == 1) {
    dw[b] = GradWDot(xb, dy_panels + layout->block_col[b] * rows, rows, next_x, next_dy,
                     fetch_next);
    return;
  }
  // block sizes 8..64 are multiples of kGradRows
  DispatchBlockColumns<GradWOp<kGradRows>>(bs, x_panels, dy_panels, dw, rows, layout, b, next_x,
                                           next_dy, fetch_next);
}

// Conditional computation (sparse_dot): y[r, :] += x[r, :] . B for the listed rows r only, where
// x and y point at one block column of row-major matrices and B is one bs x bs block of a
// dense weight matrix (row stride b_rs).  Rows are gathered kGradRows at a time; y is read,
// accumulated and written back, so a row's blocks are summed in the caller's order.
template <int MR>
struct GatheredRowsOp {
  template <typename V, int NV>
  static void Run(const float* x, int64_t x_rs, const int32_t* rows, int64_t count,
                  const float* b, int64_t b_rs, int64_t bs, float* y, int64_t y_rs) {
    constexpr int W = Width<V>();
    constexpr int64_t chunk = W * NV;
    for (int64_t r0 = 0; r0 < count; r0 += MR) {
      const int64_t valid = Min(MR, count - r0);
      const float* x_row[MR];
      float* y_row[MR];
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const int32_t r = rows[r0 + (m < valid ? m : 0)];  // pad with a real row, never stored
        x_row[m] = x + r * x_rs;
        y_row[m] = y + r * y_rs;
      }
      for (int64_t j0 = 0; j0 < bs; j0 += chunk) {
        V acc[MR][NV];
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) acc[m][v] = Load<V>(y_row[m] + j0 + v * W);
        const float* bp = b + j0;
        for (int64_t p = 0; p < bs; ++p, bp += b_rs) {
          V bv[NV];
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) bv[v] = Load<V>(bp + v * W);
#pragma GCC unroll 16
          for (int m = 0; m < MR; ++m) {
            const V av = Splat<V>(x_row[m][p]);
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) acc[m][v] = MulAdd(av, bv[v], acc[m][v]);
          }
        }
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) {
          if (m < valid) {
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) Store<V>(y_row[m] + j0 + v * W, acc[m][v]);
          }
        }
      }
    }
  }
};

void GatheredRowsAccumulate(const float* x, int64_t x_rs, const int32_t* rows, int64_t count,
                            const float* b, int64_t b_rs, int64_t bs, float* y, int64_t y_rs) {
  if (bs == 1) {
    DispatchBlockColumns<GatheredRowsOp<1>>(1, x, x_rs, rows, count, b, b_rs, bs, y, y_rs);
  } else {
    DispatchBlockColumns<GatheredRowsOp<kGradRows>>(bs, x, x_rs, rows, count, b, b_rs, bs, y,
                                                    y_rs);
  }
}

// sparse_dot's forward: gathered rows of x times one weight block (usually packed by
// PackBlock, so that it stays in L1 with no cache-set aliasing).  A tile is MR gathered rows x
// NV vectors; NV covers the whole block width where the registers allow (bs 64 on AVX-512), so
// each x element broadcast feeds NV products, and the last rows get a tile of exactly their
// height.  kPackedAccumulators of the vector registers hold the tile; the rest hold the
// NV weight vectors and the broadcast.
#if defined(__AVX512F__)
constexpr int kPackedMaxNV = 4;
constexpr int kPackedAccumulators = 24;
#else
constexpr int kPackedMaxNV = kMaxNV;
constexpr int kPackedAccumulators = 12;
#endif
// Rows of a tile NV vectors wide: as many as the accumulators allow, at most 12.
constexpr int PackedRows(int nv) {
  return kPackedAccumulators / nv < 12 ? kPackedAccumulators / nv : 12;
}

// As DispatchBlockColumns, with up to kPackedMaxNV vectors per chunk.
template <typename Op, typename... Args>
inline void DispatchPanelColumns(int64_t bs, Args... args) {
  if (bs % (Width<VecWide>() * kPackedMaxNV) == 0) {
    Op::template Run<VecWide, kPackedMaxNV>(args...);
  } else {
    DispatchBlockColumns<Op>(bs, args...);
  }
}

// y_row[m][j0 : j0 + NV*W) += sum over q < blocks of
//   x_row[m][q x_pitch : q x_pitch + bs) . b[q bs : (q + 1) bs, j0 : j0 + NV*W)
// for m < MR, in increasing q, then p.  kOneBlock: blocks == 1, the loop of one block alone.
template <int MR, int NV, typename V, bool kOneBlock>
inline void PackedRowsTile(const float* const* x_row, float* const* y_row, const float* b,
                           int64_t b_rs, int64_t bs, int64_t j0, int64_t blocks,
                           int64_t x_pitch) {
  constexpr int W = Width<V>();
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[m][v] = Load<V>(y_row[m] + j0 + v * W);
  // A call has a block and a block a row: without this GCC keeps a copy of every accumulator
  // on the stack for loops that run no step (48 stack loads and stores a tile of 6 x 4
  // vectors).  sparse_dot's forward, 1024 x 4096 x 4096 on the 2-core Intel Xeon (the two
  // libraries in alternating processes, three rounds, fastest ms): bs 32 at 50%/50% 43.0-45.0
  // -> 40.9-41.7; bs 16 and 64, and one side full, within the noise.
  if (bs < 1 || blocks < 1) __builtin_unreachable();
  const float* bp = b + j0;
  auto step = [&](int64_t p) {  // x's column p times b's row at bp
    V bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = Load<V>(bp + v * W);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const V av = Splat<V>(x_row[m][p]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[m][v] = MulAdd(av, bv[v], acc[m][v]);
    }
  };
  if constexpr (kOneBlock) {
    // A packed block of 8 or 16 (b_rs == bs) in straight-line code, its rows at fixed
    // offsets: sparse_dot's forward, 1024 x 4096 x 4096 on a 2-core AMD EPYC (AVX2; with and
    // without, alternated in one process, 6 rounds, median ms): bs 16 at 25%/25% 75.8 -> 67.2,
    // 50%/50% 189.6 -> 167.9, 10%/10% 29.1 -> 26.6; bs 32 the same either way.
    if (bs == 16 && b_rs == 16) {
#pragma GCC unroll 16
      for (int p = 0; p < 16; ++p, bp += 16) step(p);
    } else if (bs == 8 && b_rs == 8) {
#pragma GCC unroll 8
      for (int p = 0; p < 8; ++p, bp += 8) step(p);
    } else {
      for (int64_t p = 0; p < bs; ++p, bp += b_rs) step(p);
    }
  } else {
    for (int64_t q = 0, x0 = 0; q < blocks; ++q, x0 += x_pitch) {
      // The next block's x rows lie in another panel (x_pitch on), beyond the hardware
      // prefetchers' streams: asked for ahead, sparse_dot's forward with every input active
      // and 25% of the outputs ran 1.05-1.10x faster (bs 16 / 32 / 64, 2-core Intel Xeon).
      if (q + 1 < blocks) {
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) __builtin_prefetch(x_row[m] + x0 + x_pitch, 0, 3);
      }
      for (int64_t p = x0; p < x0 + bs; ++p, bp += b_rs) step(p);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) Store<V>(y_row[m] + j0 + v * W, acc[m][v]);
}

// Asks for the `count` rows listed at `rows` (none if count <= 0) of x and y, bs floats of
// each, to be brought into the cache, y's for writing.
inline void PrefetchRows(const float* x, int64_t x_rs, int64_t bs, float* y, int64_t y_rs,
                         const int32_t* rows, int64_t count) {
  for (int64_t k = 0; k < count; ++k) {
    const float* x_row = x + rows[k] * x_rs;
    float* y_row = y + rows[k] * y_rs;
    for (int64_t c = 0; c < bs; c += kLineFloats) {
      __builtin_prefetch(x_row + c, 0, 3);
      __builtin_prefetch(y_row + c, 1, 3);
    }
  }
}

// The MR rows listed at `rows`, across the output's width (columns of b and y).
template <int MR, int NV, typename V, bool kOneBlock>
inline void PackedRowsGroup(const float* x, int64_t x_rs, const int32_t* rows, const float* b,
                            int64_t b_rs, int64_t bs, float* y, int64_t y_rs, int64_t blocks,
                            int64_t x_pitch, int64_t width) {
  const float* x_row[MR];
  float* y_row[MR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    x_row[m] = x + rows[m] * x_rs;
    y_row[m] = y + rows[m] * y_rs;
  }
  for (int64_t j0 = 0; j0 < width; j0 += Width<V>() * NV) {
    PackedRowsTile<MR, NV, V, kOneBlock>(x_row, y_row, b, b_rs, bs, j0, blocks, x_pitch);
  }
}

// The last `rest` < MR rows, in a tile of exactly that height (no padded rows computed).
template <int MR, int NV, typename V, bool kOneBlock>
inline void PackedRowsRest(int64_t rest, const float* x, int64_t x_rs, const int32_t* rows,
                           const float* b, int64_t b_rs, int64_t bs, float* y, int64_t y_rs,
                           int64_t blocks, int64_t x_pitch, int64_t width) {
  if constexpr (MR > 1) {
    if (rest == MR - 1) {
      PackedRowsGroup<MR - 1, NV, V, kOneBlock>(x, x_rs, rows, b, b_rs, bs, y, y_rs, blocks,
                                                x_pitch, width);
    } else {
      PackedRowsRest<MR - 1, NV, V, kOneBlock>(rest, x, x_rs, rows, b, b_rs, bs, y, y_rs,
                                               blocks, x_pitch, width);
    }
  }
}

struct PackedRowsOp {
  template <typename V, int NV>
  static void Run(const float* x, int64_t x_rs, const int32_t* rows, int64_t count,
                  const float* b, int64_t b_rs, int64_t bs, float* y, int64_t y_rs,
                  int64_t blocks, int64_t x_pitch, int64_t width) {
    if (blocks == 1) {
      RunRows<V, NV, true>(x, x_rs, rows, count, b, b_rs, bs, y, y_rs, blocks, x_pitch, width);
    } else {
      RunRows<V, NV, false>(x, x_rs, rows, count, b, b_rs, bs, y, y_rs, blocks, x_pitch, width);
    }
  }

  template <typename V, int NV, bool kOneBlock>
  static void RunRows(const float* x, int64_t x_rs, const int32_t* rows, int64_t count,
                      const float* b, int64_t b_rs, int64_t bs, float* y, int64_t y_rs,
                      int64_t blocks, int64_t x_pitch, int64_t width) {
    constexpr int MR = PackedRows(NV);
    // Listed rows lie anywhere in x's and y's panels, beyond the hardware prefetchers' reach:
    // where the product is one block wide, the next group's rows are asked for while this
    // group's are multiplied.  sparse_dot's forward, 1024 x 4096 x 4096 on a 2-core AMD EPYC
    // (AVX2, 512 KiB of L2 per core; with and without, alternated in one process, 5-8 rounds,
    // median ms): bs 16 at 25%/25% 77.1 -> 69.0, at 50%/50% 219.0 -> 193.7, bs 32 at 25%/25%
    // 54.8 -> 48.3, bs 16 at 10%/10% 32.5 -> 30.8; wider products (y's rows a task wide, read in
    // order) measured no faster.
    const bool prefetch = width == bs;
    int64_t q = 0;
    for (; q + MR <= count; q += MR) {
      if (prefetch) {
        PrefetchRows(x, x_rs, bs, y, y_rs, rows + q + MR, std::min<int64_t>(MR, count - q - MR));
      }
      PackedRowsGroup<MR, NV, V, kOneBlock>(x, x_rs, rows + q, b, b_rs, bs, y, y_rs, blocks,
                                            x_pitch, width);
    }
    if (q < count) {
      PackedRowsRest<MR, NV, V, kOneBlock>(count - q, x, x_rs, rows + q, b, b_rs, bs, y, y_rs,
                                           blocks, x_pitch, width);
    }
  }
};

// sparse_dot's forward where every example is active in every block: (x panel of input block
// q, its rows of the packed weight columns) for q < count; a panel's consecutive rows are bs
// floats apart.
struct PanelPairs {
  const float* x;
  int64_t x_stride;  // between the panels of consecutive input blocks
  const float* w;
  int64_t w_stride;  // between the weight rows of consecutive input blocks
  int64_t count;
  int64_t size() const { return count; }
  const float* a(int64_t q) const { return x + q * x_stride; }
  const float* b(int64_t q) const { return w + q * w_stride; }
};

struct FullRowsOp {
  template <typename V, int NV>
  static void Run(const float* x_panels, int64_t pitch, int64_t in_blocks, int64_t bs,
                  const float* packed, int64_t width, float* y, int64_t y_rs, int64_t rows,
                  bool accumulate) {
    WithPanelBlockSize(bs, [&](auto kBs) {
      if (accumulate) {
        RunBlockSize<V, NV, decltype(kBs)::value, true>(x_panels, pitch, in_blocks, packed,
                                                        width, y, y_rs, rows);
      } else {
        RunBlockSize<V, NV, decltype(kBs)::value, false>(x_panels, pitch, in_blocks, packed,
                                                         width, y, y_rs, rows);
      }
    });
  }

  template <typename V, int NV, int kBs, bool kAccumulate>
  static void RunBlockSize(const float* x_panels, int64_t pitch, int64_t in_blocks,
                           const float* packed, int64_t width, float* y, int64_t y_rs,
                           int64_t rows) {
    constexpr int64_t chunk = Width<V>() * NV;
    ForRowTiles(rows, [&](auto kMR, int64_t m0, int64_t count) {
      for (int64_t j0 = 0; j0 < width; j0 += chunk) {
        const PanelPairs pairs{x_panels + m0 * kBs, pitch * kBs, packed + j0, kBs * width,
                               in_blocks};
        Tile<decltype(kMR)::value, NV, V, PanelPairs, false, kBs, kAccumulate>(
            pairs, kBs, 1, width, y + m0 * y_rs + j0, y_rs, count);
      }
    });
  }
};

void FullRowsForward(const float* x_panels, int64_t pitch, int64_t in_blocks, int64_t bs,
                     const float* packed, int64_t width, float* y, int64_t y_rs, int64_t rows,
                     bool accumulate) {
  DispatchBlockColumns<FullRowsOp>(width, x_panels, pitch, in_blocks, bs, packed, width, y, y_rs,
                                   rows, accumulate);
}

void ExactRowsAccumulate(const float* x, int64_t x_rs, const int32_t* rows, int64_t count,
                         const float* b, int64_t b_rs, int64_t bs, float* y, int64_t y_rs,
                         int64_t blocks, int64_t x_pitch, int64_t width) {
  // The width is any number of columns where sparse_dot's forward runs a task's bs-1 output
  // blocks side by side: whole vectors first, then the columns past them one at a time (each
  // column's sums are the same either way).
  const int64_t vectors = width / Width<VecWide>() * Width<VecWide>();
  const int64_t rest = width % 8 == 0 ? 0 : width - vectors;
  if (width > rest) {
    DispatchPanelColumns<PackedRowsOp>(width - rest, x, x_rs, rows, count, b, b_rs, bs, y, y_rs,
                                       blocks, x_pitch, width - rest);
  }
  if (rest > 0) {
    PackedRowsOp::Run<float, 1>(x, x_rs, rows, count, b + width - rest, b_rs, bs,
                                y + width - rest, y_rs, blocks, x_pitch, rest);
  }
}

// The transpose of a W x W tile (W = the vector width) in registers: log2(W) rounds, round d
// swapping the off-diagonal d x d sub-blocks of every 2d x 2d block (bit d of the row index
// trades places with bit d of the column index).
inline void TransposeTile(VecWide (&t)[Width<VecWide>()]) {
  constexpr int W = Width<VecWide>();
  typedef int32_t VecIndex __attribute__((vector_size(kVectorBytes)));
#pragma GCC unroll 8
  for (int d = W / 2; d >= 1; d /= 2) {
    VecIndex low, high;  // lanes of the row with bit d clear / set, from (that row, its partner)
#pragma GCC unroll 16
    for (int l = 0; l < W; ++l) {
      low[l] = (l & d) ? W + l - d : l;
      high[l] = (l & d) ? W + l : l + d;
    }
#pragma GCC unroll 16
    for (int r = 0; r < W; ++r) {
      if (r & d) continue;
      const VecWide a = t[r], b = t[r + d];
      t[r] = __builtin_shuffle(a, b, low);
      t[r + d] = __builtin_shuffle(a, b, high);
    }
  }
}

// packed (bs x bs, row stride bs) = the block at src (row stride src_rs), or its transpose.
// The source rows are short runs far apart, out of the hardware prefetchers' sight, so the
// rows of the block at `next` (same stride; the caller packs it next) are fetched meanwhile,
// into L2 (kNextBlockLocality: prefetcht1): its up to 256 lines requested at once into L1 held
// up the copy behind them.  Measured on a 2-core Zen 5 (sparse_dot, 1024 x 4096 x 4096, the
// two versions in alternating processes, five rounds, median ms, into L1 -> into L2): 10%/10%
// bs 32 8.2 -> 7.1, its transposed product 10.5 -> 7.1, bs 64 6.1 -> 5.8, 25%/25% bs 64
// 14.1 -> 12.6, bs 32 17.8 -> 17.3; bs 16 within 3%.
constexpr int kNextBlockLocality = 2;

// out[c * out_rs + r] = in[r * in_rs + c] for r, c < a vector's width, in registers.
inline void TransposeSquare(const float* in, int64_t in_rs, float* out, int64_t out_rs) {
  constexpr int W = Width<VecWide>();
  VecWide t[W];
#pragma GCC unroll 16
  for (int r = 0; r < W; ++r) t[r] = Load<VecWide>(in + r * in_rs);
  TransposeTile(t);
#pragma GCC unroll 16
  for (int c = 0; c < W; ++c) Store<VecWide>(out + c * out_rs, t[c]);
}

// out[j * out_rs + m] = tile[m * cols + j] for m < MR, j < cols: squares of a vector's width
// (MR of their rows in use) turned around in registers, MR floats stored per row of out.
template <int MR, int kCols>
inline void StoreTransposed(const float* tile, float* out, int64_t out_rs) {
  constexpr int W = Width<VecWide>();
  constexpr int kSquares = MR > 1 && MR <= W ? kCols / W : 0;
  for (int s = 0; s < kSquares; ++s) {
    VecWide t[W];
#pragma GCC unroll 16
    for (int r = 0; r < W; ++r) t[r] = r < MR ? Load<VecWide>(tile + r * kCols + s * W) : VecWide{};
    TransposeTile(t);
#pragma GCC unroll 16
    for (int c = 0; c < W; ++c) std::memcpy(out + (s * W + c) * out_rs, &t[c], MR * sizeof(float));
  }
  for (int j = kSquares * W; j < kCols; ++j) {
    for (int m = 0; m < MR; ++m) out[j * out_rs + m] = tile[m * kCols + j];
  }
}

// out[c * out_rs + r] = in[r * in_rs + c] for r < rows, c < cols: squares of a vector's width
// turned around in registers, the rest one float at a time.
void TransposeRect(const float* in, int64_t in_rs, int64_t rows, int64_t cols, float* out,
                   int64_t out_rs) {
  constexpr int W = Width<VecWide>();
  const int64_t full_rows = rows / W * W, full_cols = cols / W * W;
  // Squares down a column of them first: out's lines are then completed one after another.
  for (int64_t c0 = 0; c0 < full_cols; c0 += W) {
    for (int64_t r0 = 0; r0 < full_rows; r0 += W)
      TransposeSquare(in + r0 * in_rs + c0, in_rs, out + c0 * out_rs + r0, out_rs);
  }
  for (int64_t c = 0; c < cols; ++c) {
    // The rows past the full squares in their columns; every row in the columns past them.
    for (int64_t r = c < full_cols ? full_rows : 0; r < rows; ++r)
      out[c * out_rs + r] = in[r * in_rs + c];
  }
}

void PackBlock(const float* src, int64_t src_rs, int64_t bs, bool transpose, const float* next,
               float* packed, int64_t packed_rs) {
  constexpr int W = Width<VecWide>();
  if (transpose && bs % W == 0) {
    for (int64_t r0 = 0; r0 < bs; r0 += W) {
      for (int64_t r = r0; r < r0 + W; ++r) {
        for (int64_t c = 0; c < bs; c += kLineFloats) {
          __builtin_prefetch(next + r * src_rs + c, 0, kNextBlockLocality);
        }
      }
      for (int64_t c0 = 0; c0 < bs; c0 += W)
        TransposeSquare(src + r0 * src_rs + c0, src_rs, packed + c0 * packed_rs + r0, packed_rs);
    }
    return;
  }
  for (int64_t r = 0; r < bs; ++r, src += src_rs, next += src_rs) {
    for (int64_t c = 0; c < bs; c += kLineFloats) {
      __builtin_prefetch(next + c, 0, kNextBlockLocality);
    }
    if (transpose) {
      for (int64_t c = 0; c < bs; ++c) packed[c * packed_rs + r] = src[c];
    } else {
      for (int64_t c = 0; c < bs; ++c) packed[r * packed_rs + c] = src[c];
    }
  }
}

// Block-sparse convolution, implicit GEMM: out = sum over taps and the blocks of one output
// block column of (input pixel rows gathered for that tap) . (the block's weights at that tap).
// A tile of MR output pixels x one chunk of the block's columns stays in registers across all
// taps and blocks; the inputs are read in place (NHWC rows), never copied into patches.
template <int MR>
struct GatheredTapsOp {
  template <typename V, int NV>
  static void Run(const float* const* in_rows, const int32_t* taps, int64_t tap_count,
                  const int32_t* rows, const int32_t* blocks, int64_t count, const float* w,
                  int64_t w_block_stride, int64_t bs, float* const* out_rows, int64_t valid) {
    constexpr int W = Width<V>();
    constexpr int64_t chunk = W * NV;
    for (int64_t j0 = 0; j0 < bs; j0 += chunk) {
      V acc[MR][NV];
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[m][v] = V{};
      for (int64_t t = 0; t < tap_count; ++t) {
        const float* const* tap_rows = in_rows + t * MR;
        const float* w_tap = w + taps[t] * bs * bs + j0;
        for (int64_t q = 0; q < count; ++q) {
          const int64_t offset = rows[q] * bs;
          const float* x_row[MR];
#pragma GCC unroll 16
          for (int m = 0; m < MR; ++m) x_row[m] = tap_rows[m] + offset;
          const float* bp = w_tap + blocks[q] * w_block_stride;
          for (int64_t p = 0; p < bs; ++p, bp += bs) {
            V bv[NV];
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) bv[v] = Load<V>(bp + v * W);
#pragma GCC unroll 16
            for (int m = 0; m < MR; ++m) {
              const V av = Splat<V>(x_row[m][p]);
#pragma GCC unroll 8
              for (int v = 0; v < NV; ++v) acc[m][v] = MulAdd(av, bv[v], acc[m][v]);
            }
          }
        }
      }
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        if (m < valid) {
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) Store<V>(out_rows[m] + j0 + v * W, acc[m][v]);
        }
      }
    }
  }
};

void GatheredTaps(const float* const* in_rows, const int32_t* taps, int64_t tap_count,
                  const int32_t* rows, const int32_t* blocks, int64_t count, const float* w,
                  int64_t w_block_stride, int64_t bs, float* const* out_rows, int64_t valid) {
  DispatchBlockColumns<GatheredTapsOp<kRowTile>>(bs, in_rows, taps, tap_count, rows, blocks,
                                                 count, w, w_block_stride, bs, out_rows, valid);
}

// Segments of image rows as (A, B) pairs of the weight-gradient tile.
struct SegmentPairs {
  const float* a_base;
  const int64_t* a_offsets;
  const float* b_base;
  const int64_t* b_offsets;
  int64_t count;
  int64_t size() const { return count; }
  const float* a(int64_t q) const { return a_base + a_offsets[q]; }
  const float* b(int64_t q) const { return b_base + b_offsets[q]; }
};

// A = input features of the block row read in place (MR of them per pixel, contiguous in
// NHWC), B = output-gradient features of the block column, C = MR rows of the block.
template <int MR>
struct SegmentOuterSumOp {
  template <typename V, int NV>
  static void Run(const float* a, const int64_t* a_offsets, const float* b,
                  const int64_t* b_offsets, int64_t segments, int64_t P, int64_t a_stride,
                  int64_t b_stride, int64_t bs, float* out) {
    constexpr int64_t chunk = Width<V>() * NV;
    for (int64_t i0 = 0; i0 < bs; i0 += MR)
      for (int64_t j0 = 0; j0 < bs; j0 += chunk)
        Tile<MR, NV, V>(SegmentPairs{a + i0, a_offsets, b + j0, b_offsets, segments}, P,
                        a_stride, b_stride, out + i0 * bs + j0, bs, MR);
  }
};

void SegmentOuterSum(const float* a, const int64_t* a_offsets, const float* b,
                     const int64_t* b_offsets, int64_t segments, int64_t P, int64_t a_stride,
                     int64_t b_stride, int64_t bs, float* out) {
  if (bs == 1) {
    DispatchBlockColumns<SegmentOuterSumOp<1>>(1, a, a_offsets, b, b_offsets, segments, P,
                                               a_stride, b_stride, bs, out);
  } else {  // block sizes 8..64 are multiples of kGradRows
    DispatchBlockColumns<SegmentOuterSumOp<kGradRows>>(bs, a, a_offsets, b, b_offsets, segments,
                                                       P, a_stride, b_stride, bs, out);
  }
}

// The rows listed in `rows` of two row-major matrices as (A, B) pairs of single rows.
struct GatheredRowPairs {
  const int32_t* rows;
  int64_t count;
  const float* a_base;
  int64_t a_rs;
  const float* b_base;
  int64_t b_rs;
  int64_t size() const { return count; }
  const float* a(int64_t q) const { return a_base + rows[q] * a_rs; }
  const float* b(int64_t q) const { return b_base + rows[q] * b_rs; }
};

// dw of one block from gathered rows: A = x rows (dw's rows i0.. along the row), B = dy rows,
// C = dw rows.  P = 1 per pair: the pairs are the listed examples, summed in list order.
template <int MR>
struct GatheredRowsGradWOp {
  template <typename V, int NV>
  static void Run(const float* x, int64_t x_rs, const float* dy, int64_t dy_rs,
                  const int32_t* rows, int64_t count, int64_t bs, float* dw, int64_t dw_rs) {
    constexpr int64_t chunk = Width<V>() * NV;
    for (int64_t i0 = 0; i0 < bs; i0 += MR)
      for (int64_t j0 = 0; j0 < bs; j0 += chunk)
        Tile<MR, NV, V>(GatheredRowPairs{rows, count, x + i0, x_rs, dy + j0, dy_rs}, 1, 0, 0,
                        dw + i0 * dw_rs + j0, dw_rs, MR);
  }
};

void GatheredRowsGradW(const float* x, int64_t x_rs, const float* dy, int64_t dy_rs,
                       const int32_t* rows, int64_t count, int64_t bs, float* dw, int64_t dw_rs) {
  if (bs == 1) {
    DispatchBlockColumns<GatheredRowsGradWOp<1>>(1, x, x_rs, dy, dy_rs, rows, count, bs, dw,
                                                 dw_rs);
  } else {  // block sizes 8..64 are multiples of kGradRows
    DispatchBlockColumns<GatheredRowsGradWOp<kGradRows>>(bs, x, x_rs, dy, dy_rs, rows, count, bs,
                                                         dw, dw_rs);
  }
}

// sparse_dot's weight gradient from panels of gathered rows (x_panel[q * bs + i] =
// x[rows[q], i], likewise dy_panel): dw = sum over q of x_panel[q]^T dy_panel[q].  A = the x
// panel, B = the dy panel, P = the row count; both are read sequentially from L1/L2, and a
// tile of dw stays in registers over all the rows.
template <int64_t kBs>
void GatherRowsOf(const float* src, int64_t src_rs, const int32_t* rows, int64_t count,
                  float* panel) {
  for (int64_t q = 0; q < count; ++q, panel += kBs) {
    std::memcpy(panel, src + rows[q] * src_rs, kBs * sizeof(float));
  }
}

void GatherRows(const float* src, int64_t src_rs, const int32_t* rows, int64_t count,
                int64_t bs, float* panel) {
  // The common block sizes as constants: a row is then a few vector moves, with no run-time
  // length or overlap checks.
  switch (bs) {
    case 16: return GatherRowsOf<16>(src, src_rs, rows, count, panel);
    case 32: return GatherRowsOf<32>(src, src_rs, rows, count, panel);
    case 64: return GatherRowsOf<64>(src, src_rs, rows, count, panel);
  }
  for (int64_t q = 0; q < count; ++q, panel += bs) {
    const float* row = src + rows[q] * src_rs;
    for (int64_t c = 0; c < bs; ++c) panel[c] = row[c];
  }
}

// The pair of a panel product: dy's rows dy_rs apart, or listed (see SinglePairListedB).
inline SinglePair PanelPair(const float* a, const float* b, std::nullptr_t) { return {a, b}; }
inline SinglePairListedB PanelPair(const float* a, const float* b, const int32_t* b_rows) {
  return {a, b, b_rows};
}

// Rows [i0, i0 + rows) of dw, rows < MR, in a tile of exactly that height (so no panel
// element past the block is read).
template <int MR, int NV, typename V, bool kStream, typename BRows>
inline void PanelGradWRest(int64_t rows, const float* a, const float* b, BRows b_rows,
                           int64_t count, int64_t a_cs, int64_t b_rs, float* c, int64_t c_rs) {
  if constexpr (MR > 1) {
    if (rows == MR - 1) {
      Tile<MR - 1, NV, V, decltype(PanelPair(a, b, b_rows)), kStream>(
          PanelPair(a, b, b_rows), count, a_cs, b_rs, c, c_rs, MR - 1);
    } else {
      PanelGradWRest<MR - 1, NV, V, kStream>(rows, a, b, b_rows, count, a_cs, b_rs, c, c_rs);
    }
  }
}

// dw is written once and read only after the whole gradient is done, usually far larger than
// the caches (at 10% active blocks, writing it costs more than computing it): where its rows
// are aligned for it, it is stored past the caches, which also saves reading each line first.
template <bool kStream>
struct PanelGradWOp {
  template <typename V, int NV, typename BRows>
  static void Run(const float* x_panel, const float* dy_panel, int64_t dy_rs, BRows dy_rows,
                  int64_t width, int64_t count, int64_t bs, float* dw, int64_t dw_rs) {
    constexpr int MR = PackedRows(NV);
    constexpr int64_t chunk = Width<V>() * NV;
    using Pair = decltype(PanelPair(x_panel, dy_panel, dy_rows));
    for (int64_t j0 = 0; j0 < width; j0 += chunk) {
      int64_t i0 = 0;
      for (; i0 + MR <= bs; i0 += MR) {
        Tile<MR, NV, V, Pair, kStream>(PanelPair(x_panel + i0, dy_panel + j0, dy_rows), count, bs,
                                       dy_rs, dw + i0 * dw_rs + j0, dw_rs, MR);
      }
      if (i0 < bs) {
        PanelGradWRest<MR, NV, V, kStream>(bs - i0, x_panel + i0, dy_panel + j0, dy_rows, count,
                                           bs, dy_rs, dw + i0 * dw_rs + j0, dw_rs);
      }
    }
  }
};

// Whether rows of stride `rs` from p, at offsets that are multiples of the block width chosen
// by DispatchPanelColumns, can take StreamStore's aligned vector stores.
bool RowsAlignedForStreaming(const float* p, int64_t rs, int64_t bs) {
  const int64_t vector_bytes = bs % Width<VecWide>() == 0 ? kVectorBytes : bs == 8 ? 32 : 4;
  return reinterpret_cast<uintptr_t>(p) % vector_bytes == 0 && rs * 4 % vector_bytes == 0;
}

template <bool kStream>
void PanelGradWStored(const float* x_panel, const float* dy_panel, int64_t dy_rs,
                      const int32_t* dy_rows, int64_t width, int64_t count, int64_t bs,
                      float* dw, int64_t dw_rs) {
  using Op = PanelGradWOp<kStream>;
  if (dy_rows != nullptr) {
    DispatchPanelColumns<Op>(width, x_panel, dy_panel, dy_rs, dy_rows, width, count, bs, dw,
                             dw_rs);
  } else {
    DispatchPanelColumns<Op>(width, x_panel, dy_panel, dy_rs, nullptr, width, count, bs, dw,
                             dw_rs);
  }
}

void PanelGradW(const float* x_panel, const float* dy_panel, int64_t dy_rs,
                const int32_t* dy_rows, int64_t width, int64_t count, int64_t bs, float* dw,
                int64_t dw_rs, bool stream) {
  if (stream && RowsAlignedForStreaming(dw, dw_rs, width)) {
    PanelGradWStored<true>(x_panel, dy_panel, dy_rs, dy_rows, width, count, bs, dw, dw_rs);
    _mm_sfence();  // the streamed stores reach memory before anything after this call
  } else {
    PanelGradWStored<false>(x_panel, dy_panel, dy_rs, dy_rows, width, count, bs, dw, dw_rs);
  }
}

#if defined(__AVX512F__)
// list_in_both: each 16 bits of a word listed at once, their example numbers compressed to the
// front of a vector (vpcompressd) and the whole vector stored, the count advanced by their
// number; no branch on the bits (where pairs share a few examples per word, a loop over the
// bits mispredicts once per word, at its end).
int64_t ListInBoth(const uint64_t* a, const uint64_t* b, int64_t words, int32_t* rows) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t count = 0;
  for (int64_t q = 0; q < words; ++q) {
    const uint64_t both = a[q] & b[q];
    for (int piece = 0; piece < 4; ++piece) {
      const __mmask16 bits = static_cast<__mmask16>(both >> (16 * piece));
      const __m512i first = _mm512_set1_epi32(static_cast<int32_t>(q * 64 + 16 * piece));
      _mm512_storeu_si512(rows + count,
                          _mm512_maskz_compress_epi32(bits, _mm512_add_epi32(lanes, first)));
      count += __builtin_popcount(bits);
    }
  }
  return count;
}
constexpr auto kListInBoth = ListInBoth;
#elif defined(__AVX2__)
// For each byte value, the positions of its set bits, ascending, one per byte from the low one
// (the rest zero).
struct BytePositions {
  uint64_t of[256];
  constexpr BytePositions() : of() {
    for (int v = 0; v < 256; ++v) {
      int k = 0;
      for (int t = 0; t < 8; ++t) {
        if (v >> t & 1) of[v] |= static_cast<uint64_t>(t) << (8 * k++);
      }
    }
  }
};
constexpr BytePositions kBytePositions;

// list_in_both without a vector compress: each 8 bits of a word listed at once, their
// positions looked up (kBytePositions), widened to 8 example numbers and the whole vector
// stored, the count advanced by their number; no branch on the bits.
int64_t ListInBoth(const uint64_t* a, const uint64_t* b, int64_t words, int32_t* rows) {
  int64_t count = 0;
  for (int64_t q = 0; q < words; ++q) {
    const uint64_t both = a[q] & b[q];
    for (int piece = 0; piece < 8; ++piece) {
      const unsigned bits = static_cast<unsigned>(both >> (8 * piece)) & 0xffu;
      const __m256i first = _mm256_set1_epi32(static_cast<int32_t>(q * 64 + 8 * piece));
      const __m256i at = _mm256_cvtepu8_epi32(
          _mm_cvtsi64_si128(static_cast<long long>(kBytePositions.of[bits])));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(rows + count), _mm256_add_epi32(at, first));
      count += __builtin_popcount(bits);
    }
  }
  return count;
}
constexpr auto kListInBoth = ListInBoth;
#else
constexpr int64_t (*kListInBoth)(const uint64_t*, const uint64_t*, int64_t, int32_t*) = nullptr;
#endif

}  // namespace

extern const ConvKernels kConvKernels = {kRowTile, GatheredTaps, SegmentOuterSum};

void NeuronColumns(const float* x, int64_t x_ns, int64_t x_cs, const float* w, float* y,
                   int64_t y_ns, int64_t y_ks, int64_t N, const LayoutView* layout,
                   int64_t k_begin, int64_t k_end) {
  const LayoutView& l = *layout;
  for (int64_t k = k_begin; k < k_end; ++k) {
    const int64_t q0 = l.col_ptr[k], q1 = l.col_ptr[k + 1];
    for (int64_t n = 0; n < N; ++n) {
      const float* const xn = x + n * x_ns;
      float sum = 0.0f;  // as Tile's one-float accumulator: from zero, a multiply-add per entry
      for (int64_t q = q0; q < q1; ++q) {
        sum = MulAdd(w[l.col_block[q]], xn[l.col_row[q] * x_cs], sum);
      }
      y[n * y_ns + k * y_ks] = sum;
    }
  }
}

// acc with its bits and-ed with mask (all ones: acc; zero: +0.0f), without a branch.
inline float KeepIf(float acc, uint32_t mask) {
  return _mm_cvtss_f32(_mm_and_ps(_mm_set_ss(acc), _mm_castsi128_ps(_mm_cvtsi32_si128(mask))));
}

void NeuronColumnsOneRow(const float* x, int64_t x_cs, const float* w, float* y, int64_t y_ks,
                         const LayoutView* layout, int64_t k_begin, int64_t k_end) {
  const LayoutView& l = *layout;
  for (int64_t k = k_begin; k < k_end; ++k) y[k * y_ks] = 0.0f;  // the empty columns' sums
  // Four streams of whole columns, interleaved, so that four chains of multiply-adds overlap.
  constexpr int kStreams = 4;
  int64_t q[kStreams], end[kStreams];
  float acc[kStreams];
  for (int s = 0; s < kStreams; ++s) {
    q[s] = l.col_ptr[k_begin + (k_end - k_begin) * s / kStreams];
    end[s] = l.col_ptr[k_begin + (k_end - k_begin) * (s + 1) / kStreams];
    acc[s] = 0.0f;
  }
  // An entry's sum so far is stored into its column's output each time (the last store is the
  // column's sum), and after a column's last entry the next sum starts from +0.0f, as
  // NeuronColumns' do: the same sums in the same order.
  auto step = [&](int s) {
    const int64_t e = q[s]++;
    const int32_t k = l.col_of_entry[e];
    acc[s] = MulAdd(w[l.col_block[e]], x[l.col_row[e] * x_cs], acc[s]);
    y[k * y_ks] = acc[s];
    acc[s] = KeepIf(acc[s], l.col_of_entry[e + 1] == k ? ~0u : 0u);
  };
  int64_t together = end[0] - q[0];
  for (int s = 1; s < kStreams; ++s) together = Min(together, end[s] - q[s]);
  for (int64_t i = 0; i < together; ++i) {
    for (int s = 0; s < kStreams; ++s) step(s);
  }
  for (int s = 0; s < kStreams; ++s) {
    while (q[s] < end[s]) step(s);
  }
}

void NeuronRowsOneRow(const float* x, int64_t x_cs, const float* w, float* y, int64_t y_ks,
                      const LayoutView* layout) {
  const LayoutView& l = *layout;
  for (int64_t k = 0; k < l.KB; ++k) y[k * y_ks] = 0.0f;
  for (int64_t b = 0; b < l.blocks; ++b) {
    float* const out = y + l.block_col[b] * y_ks;
    *out = MulAdd(w[b], x[l.block_row[b] * x_cs], *out);
  }
}

void NeuronGradW(const float* x, int64_t x_ns, int64_t x_cs, const float* dy, int64_t dy_ns,
                 int64_t dy_ks, int64_t N, const LayoutView* layout, int64_t b_begin,
                 int64_t b_end, float* dw) {
  const LayoutView& l = *layout;
  for (int64_t b = b_begin; b < b_end; ++b) {
    const float* const xc = x + l.block_row[b] * x_cs;
    const float* const dyk = dy + l.block_col[b] * dy_ks;
    float sum = 0.0f;  // as GradWDot below one vector: from zero, in increasing n
    for (int64_t n = 0; n < N; ++n) sum = MulAdd(xc[n * x_ns], dyk[n * dy_ns], sum);
    dw[b] = sum;
  }
}

// The conversions of half-precision staging, written as plain loops that the compiler
// vectorizes for this file's instruction set (TensorFlow's Eigen casts, compiled for baseline
// x86-64 in the op files, ran one element at a time: a third of a bfloat16 product's time at
// N = 1024).  bfloat16 is a float32's upper half: widening is exact, and narrowing rounds to
// nearest even, a NaN becoming the quiet NaN of its sign (Eigen's rules, bit for bit).
void BFloat16ToFloat(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __builtin_bit_cast(float, uint32_t{in[i]} << 16);
}

void FloatToBFloat16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = __builtin_bit_cast(uint32_t, in[i]);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = ((bits >> 16) & 0x8000u) | 0x7fc0u;
    out[i] = static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
  }
}

// float16 likewise.  Widening is exact; narrowing rounds to nearest even (subnormal results
// kept, whatever the flush-to-zero flags), infinity past the largest finite value, and a NaN
// stays a NaN of its sign (its payload may differ from Eigen's).  Under AVX-512 by the
// processor's conversions (VCVTPH2PS / VCVTPS2PH), elsewhere by the same rules in integers.
float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16, exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa x 2^-24, exact in float32
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, magnitude) | sign);
  }
  const uint32_t wide_exponent = exponent == 0x1f ? 0xffu : exponent + 112;
  return __builtin_bit_cast(float, sign | wide_exponent << 23 | mantissa << 13);
}

uint16_t FloatToHalfBits(float f) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, f);
  const uint32_t sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520
  if (magnitude < 0x38800000u) {  // below 2^-14: a multiple of 2^-24, rounded to even
    const float scaled = __builtin_bit_cast(float, magnitude) * 0x1p24f;
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(__builtin_rintf(scaled)));
  }
  const uint32_t odd = (magnitude >> 13) & 1u;
  return static_cast<uint16_t>(sign | (magnitude - (112u << 23) + 0xfffu + odd) >> 13);
}

void HalfToFloat(const uint16_t* in, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    // The masked forms (every lane kept): the plain ones leave their pass-through operand
    // undefined, which GCC 12 warns of.
    _mm512_storeu_ps(out + i, _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(in + i))));
  }
#endif
  for (; i < n; ++i) out[i] = HalfBitsToFloat(in[i]);
}

void FloatToHalf(const float* in, uint16_t* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm512_maskz_cvtps_ph(0xffff, _mm512_loadu_ps(in + i),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; i < n; ++i) out[i] = FloatToHalfBits(in[i]);
}

#define BSMM_STRINGIFY2(s) #s
#define BSMM_STRINGIFY(s) BSMM_STRINGIFY2(s)
extern const CpuKernels kKernels = {BSMM_STRINGIFY(BSMM_ISA), Width<VecWide>(), kRowTile, ForwardAxis1, ForwardAxis0,
                                    GatheredRowsAccumulate,
                                    GradW, kRowPairsBlockSize, kMaxSharedRowTile,
                                    GatheredRowsGradW,
                                    ExactRowsAccumulate, PackBlock,
                                    GatherRows, PanelGradW, FullRowsForward, kListInBoth,
                                    TransposeRect, NeuronColumns, NeuronColumnsOneRow,
                                    NeuronRowsOneRow, NeuronGradW,
                                    BFloat16ToFloat, FloatToBFloat16, HalfToFloat, FloatToHalf};

}  // namespace BSMM_ISA
}  // namespace blocksparse
