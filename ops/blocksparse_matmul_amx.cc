#include "ops/blocksparse_matmul_amx.h"

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

namespace blocksparse {
namespace {

// Linux hands out the tile registers' state to a process only when asked (arch_prctl).
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

bool ProcessorHasAmxBf16() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = edx & (1u << 22), amx_tile = edx & (1u << 24);
  const bool avx512f = ebx & (1u << 16), avx512bw = ebx & (1u << 30);
  if (!(amx_bf16 && amx_tile && avx512f && avx512bw)) return false;
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) || !(eax & (1u << 5))) return false;
  // The operating system saves the tile state (XCR0 bits 17 and 18) ...
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return false;  // OSXSAVE
  unsigned xcr0_low, xcr0_high;
  __asm__("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
  if ((xcr0_low & (3u << 17)) != (3u << 17)) return false;
  // ... and lets this process use it.
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// The tile registers' shapes (the 64-byte operand of LDTILECFG).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

// The functions that run tile instructions are compiled for them alone (the rest of this file
// runs on any x86-64), and call no library templates, which the linker could share with code
// compiled without them.
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

// Tiles 0-3 hold 16 x 16 float32 sums; tiles 4-5 16 rows of `depth` bfloat16 (the left
// operand); tiles 6-7 depth / 2 rows of 16 bfloat16 pairs (the right operand, each pair two
// consecutive terms of a sum: "VNNI" order).  depth is 32, or 16 for bs 16's forward.
AMX_TARGET void ConfigureTiles(int depth) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = t < 6 ? 16 : depth / 2;
    config.bytes_per_row[t] = t == 4 || t == 5 ? depth * 2 : 64;
  }
  _tile_loadconfig(&config);
}

// Configures the tiles for the calling thread, and gives their state back on leaving, so a
// thread of the pool holds no tile state between tasks.
class TileScope {
 public:
  AMX_TARGET explicit TileScope(int depth) { ConfigureTiles(depth); }
  AMX_TARGET ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

constexpr int64_t kPanelRows = 32;  // rows of x (and y) one forward task's tiles cover

uint16_t* Bf16Scratch(const ScratchAllocator& scratch, int64_t count) {
  return reinterpret_cast<uint16_t*>(scratch((count + 1) / 2));
}

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw")))

// GCC 12 warns of the undefined pass-through operand inside its own AVX-512 intrinsics (the
// masked loads, the casts between vector types) when they are inlined into functions compiled
// for AVX-512 by attribute (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// 16 bfloat16 zeros: the rows past N.
constexpr uint16_t kZeroRow[16] = {};

// (a[0], b[0], a[1], b[1], ... a[15], b[15]): two rows of 16 bfloat16 interleaved, the VNNI
// pairs of rows a and b; only the elements in `loaded` read (the others zero).
AVX512_TARGET __m512i InterleaveRows(const uint16_t* a, const uint16_t* b,
                                     __mmask32 loaded = 0xFFFF) {
  // Element 2 j from a[j], 2 j + 1 from b[j] (index 32 + j: the second operand's).
  alignas(64) static constexpr uint16_t kOrder[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                      37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                      11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  return _mm512_permutex2var_epi16(_mm512_maskz_loadu_epi16(loaded, a),
                                   _mm512_load_si512(kOrder),
                                   _mm512_maskz_loadu_epi16(loaded, b));
}

// v[r][p] (32-bit elements) = v[p][r] before, for p, r < 16.  Inlined, so v can stay in
// registers (called, it went through memory and took 7% of feature axis 0's forward samples;
// inlined, that forward's time did not change measurably).
AVX512_TARGET inline __attribute__((always_inline)) void Transpose16x16(__m512i v[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  // Each 128-bit lane L of v[4 i + m] now holds column 4 L + m of rows 4 i .. 4 i + 3.
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    v[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    v[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    v[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Row 4 L + m: lane L of v[m], v[4 + m], v[8 + m], v[12 + m].
  for (int m = 0; m < 4; ++m) {
    const __m512i low01 = _mm512_shuffle_i32x4(v[m], v[4 + m], 0x44);
    const __m512i low23 = _mm512_shuffle_i32x4(v[8 + m], v[12 + m], 0x44);
    const __m512i high01 = _mm512_shuffle_i32x4(v[m], v[4 + m], 0xEE);
    const __m512i high23 = _mm512_shuffle_i32x4(v[8 + m], v[12 + m], 0xEE);
    t[m] = _mm512_shuffle_i32x4(low01, low23, 0x88);
    t[4 + m] = _mm512_shuffle_i32x4(low01, low23, 0xDD);
    t[8 + m] = _mm512_shuffle_i32x4(high01, high23, 0x88);
    t[12 + m] = _mm512_shuffle_i32x4(high01, high23, 0xDD);
  }
  for (int r = 0; r < 16; ++r) v[r] = t[r];
}

// The product's block b (W's rows i, columns j) in VNNI order: out[(p bs + j) 2 + e] =
// W_b[2p + e][j].  With transposed, w's block holds W_b^T, whose rows hold the pairs already.
void PackBlockVnni(const uint16_t* w, int64_t bs, bool transposed, uint16_t* out) {
  const int64_t pairs = bs / 2;
  if (transposed) {
    const uint32_t* const w32 = reinterpret_cast<const uint32_t*>(w);
    uint32_t* const out32 = reinterpret_cast<uint32_t*>(out);
    for (int64_t p = 0; p < pairs; ++p) {
      for (int64_t j = 0; j < bs; ++j) out32[p * bs + j] = w32[j * pairs + p];
    }
    return;
  }
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* const even = w + 2 * p * bs;
    const uint16_t* const odd = even + bs;
    for (int64_t j = 0; j < bs; ++j) {
      out[(p * bs + j) * 2] = even[j];
      out[(p * bs + j) * 2 + 1] = odd[j];
    }
  }
}

// y[r, 0:width) (row stride y_rs) = buf[r, 0:width) (row stride buf_rs) rounded to bfloat16
// (to nearest even; the tiles' float32 sums are never subnormal), for r < rows; width 16 or 32.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void StoreRowsAsBFloat16(const float* buf, int64_t buf_rs, int64_t rows, int64_t width,
                         uint16_t* y, int64_t y_rs) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < width; j += 16) {
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(buf + r * buf_rs + j));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * y_rs + j), (__m256i)h);
    }
  }
}

// y[j, 0:rows) (row stride y_rs) = buf[0:rows, j) (row stride buf_rs) rounded to bfloat16,
// for j < width: the rows of buf (<= 32) are columns of y, feature axis 0's y^T.  width 16 or
// 32; buf holds 32 rows (those past `rows` are not stored).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void StoreColumnsAsBFloat16(const float* buf, int64_t buf_rs, int64_t rows, int64_t width,
                            uint16_t* y, int64_t y_rs) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t count = std::min<int64_t>(16, rows - r0);
    const __mmask16 stored = static_cast<__mmask16>((1u << count) - 1);
    for (int64_t j0 = 0; j0 < width; j0 += 16) {
      __m512i v[16];
      for (int64_t r = 0; r < 16; ++r) {
        v[r] = _mm512_castps_si512(_mm512_loadu_ps(buf + (r0 + r) * buf_rs + j0));
      }
      Transpose16x16(v);  // v[j]: column j0 + j of rows r0 .. r0 + 15
      for (int64_t j = 0; j < 16; ++j) {
        const __m256bh h = _mm512_cvtneps_pbh(_mm512_castsi512_ps(v[j]));
        _mm256_mask_storeu_epi16(y + (j0 + j) * y_rs + r0, stored, (__m256i)h);
      }
    }
  }
}

#pragma GCC diagnostic pop

// Fetches `count` bfloat16 from p into L1: the next block's rows of the x panel lie anywhere in
// it, where no hardware prefetcher would guess them.
inline void PrefetchLines(const uint16_t* p, int64_t count) {
  const char* const bytes = reinterpret_cast<const char*>(p);
  for (int64_t l = 0; l < count * 2; l += 64) _mm_prefetch(bytes + l, _MM_HINT_T0);
}

// y's `rows` (<= 32) rows of output blocks [k_begin, k_end) from one panel of x's rows (see
// PackRowPanels) times the product's blocks in those columns, from wv (every block in VNNI
// order, in column order: entry q's at wv + q bs bs).  y holds the panel's rows of y (row
// stride y_rs), or with `columns` its columns of y^T (feature axis 0: the panel's first
// example's column, row stride y_rs).  Each output's terms: block after block down the
// column, each block's in the hardware's order.
AMX_TARGET void ForwardPanel(const uint16_t* panel, const uint16_t* wv, const BlockLayout& layout,
                             int64_t k_begin, int64_t k_end, uint16_t* y, int64_t y_rs,
                             int64_t rows, bool columns) {
  const int64_t bs = layout.block_size, depth = bs < 32 ? bs : 32;
  const int64_t x_stride = bs * 2, w_stride = bs * 4;
  const bool two_columns = bs >= 32;  // tiles of 32 outputs across (else 16)
  const int64_t pass_width = two_columns ? 32 : 16;
  alignas(64) float buf[kPanelRows * 32];
  for (int64_t k = k_begin; k < k_end; ++k) {
    for (int64_t j0 = 0; j0 < bs; j0 += pass_width) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t q = layout.col_ptr[k]; q < layout.col_ptr[k + 1]; ++q) {
        const uint16_t* const xa = panel + layout.col_row[q] * kPanelRows * bs;
        const uint16_t* const wb = wv + q * bs * bs;
        if (q + 1 < layout.col_ptr[k + 1]) {  // the next block's operands, from L2 to L1
          PrefetchLines(panel + layout.col_row[q + 1] * kPanelRows * bs, kPanelRows * bs);
          PrefetchLines(wb + bs * bs, bs * bs);
        }
        for (int64_t s = 0; s < bs; s += depth) {
          _tile_loadd(4, xa + s, x_stride);
          _tile_loadd(5, xa + s + 16 * bs, x_stride);
          const uint16_t* const b = wb + (s / 2 * bs + j0) * 2;  // pair row s / 2
          _tile_loadd(6, b, w_stride);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(2, 5, 6);
          if (two_columns) {
            _tile_loadd(7, b + 32, w_stride);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
      }
      _tile_stored(0, buf, pass_width * 4);
      _tile_stored(2, buf + 16 * pass_width, pass_width * 4);
      if (two_columns) {
        _tile_stored(1, buf + 16, pass_width * 4);
        _tile_stored(3, buf + 16 * pass_width + 16, pass_width * 4);
      }
      if (columns) {
        StoreColumnsAsBFloat16(buf, pass_width, rows, pass_width, y + (k * bs + j0) * y_rs,
                               y_rs);
      } else {
        StoreRowsAsBFloat16(buf, pass_width, rows, pass_width, y + k * bs + j0, y_rs);
      }
    }
  }
}

// A tile's 16 rows of 64 bytes, in bfloat16 elements: the weight gradient's operands are
// packed tile after tile, so each tile load reads 1 KiB in a row.
constexpr int64_t kTileElements = 512;

// dw's block b (bs x bs, row stride bs, rounded to bfloat16) = the sum over the H chunks of 32
// rows of x's and dy's packed tiles (PackTransposedTiles, PackPairTiles) of the block's
// columns.  Each output's terms: chunk after chunk, each chunk's in the hardware's order.
AMX_TARGET void GradWBlock(const uint16_t* xt, const uint16_t* dyt, int64_t H,
                           const BlockLayout& layout, int64_t b, uint16_t* dw) {
  const int64_t bs = layout.block_size;
  const int64_t c = layout.block_row[b], k = layout.block_col[b];
  const int64_t side = bs < 32 ? bs : 32;  // a pass covers side x side outputs
  const bool wide = bs >= 32;
  const int64_t group_stride = H * kTileElements;  // from one 16-column group to the next
  alignas(64) float buf[32 * 32];
  for (int64_t i0 = 0; i0 < bs; i0 += side) {
    for (int64_t j0 = 0; j0 < bs; j0 += side) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint16_t* a = xt + (c * bs + i0) / 16 * group_stride;
      const uint16_t* d = dyt + (k * bs + j0) / 16 * group_stride;
      for (int64_t h = 0; h < H; ++h, a += kTileElements, d += kTileElements) {
        _tile_loadd(4, a, 64);
        _tile_loadd(6, d, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (wide) {
          _tile_loadd(5, a + group_stride, 64);
          _tile_loadd(7, d + group_stride, 64);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, buf, side * 4);
      if (wide) {
        _tile_stored(1, buf + 16, side * 4);
        _tile_stored(2, buf + 16 * side, side * 4);
        _tile_stored(3, buf + 16 * side + 16, side * 4);
      }
      StoreRowsAsBFloat16(buf, side, side, side, dw + b * bs * bs + i0 * bs + j0, bs);
    }
  }
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// Row n's 16 elements from column 16 g of a matrix with `cols` columns, or zeros past N.
inline const uint16_t* RowPiece(const uint16_t* m, int64_t n, int64_t N, int64_t cols,
                                int64_t g) {
  return n < N ? m + n * cols + 16 * g : kZeroRow;
}

// x^T in tiles, for groups [g_begin, g_end) of 16 of x's columns: the tile of group g and rows
// 32 h .. 32 h + 31 at out + (g H + h) 512, holding x[32 h + e][16 g + r] at r 32 + e (zero
// past N).  Rows in VNNI pairs are the transpose's rows in 32-bit elements: one 16 x 16
// transpose of those makes a tile.
AVX512_TARGET void PackTransposedTiles(const uint16_t* x, int64_t N, int64_t C, int64_t H,
                                       int64_t g_begin, int64_t g_end, uint16_t* out) {
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t g = g_begin; g < g_end; ++g) {
      __m512i v[16];
      for (int64_t p = 0; p < 16; ++p) {
        const int64_t n = 32 * h + 2 * p;
        v[p] = InterleaveRows(RowPiece(x, n, N, C, g), RowPiece(x, n + 1, N, C, g));
      }
      Transpose16x16(v);
      uint16_t* const tile = out + (g * H + h) * kTileElements;
      for (int64_t r = 0; r < 16; ++r) _mm512_storeu_si512(tile + r * 32, v[r]);
    }
  }
}

// dy's rows in VNNI pairs, in tiles, for groups [g_begin, g_end) of 16 of dy's columns: the
// tile of group g and rows 32 h .. 32 h + 31 at out + (g H + h) 512, holding
// dy[32 h + 2 p + e][16 g + j] at p 32 + 2 j + e (zero past N).
AVX512_TARGET void PackPairTiles(const uint16_t* dy, int64_t N, int64_t K, int64_t H,
                                 int64_t g_begin, int64_t g_end, uint16_t* out) {
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t g = g_begin; g < g_end; ++g) {
      uint16_t* const tile = out + (g * H + h) * kTileElements;
      for (int64_t p = 0; p < 16; ++p) {
        const int64_t n = 32 * h + 2 * p;
        _mm512_storeu_si512(tile + p * 32, InterleaveRows(RowPiece(dy, n, N, K, g),
                                                          RowPiece(dy, n + 1, N, K, g)));
      }
    }
  }
}

// The elements [n0, n0 + width) of a row of N (width <= 32), as a mask of 16-bit lanes: those
// below N.
inline __mmask32 LanesBelow(int64_t N, int64_t n0, int64_t width) {
  const int64_t count = std::clamp<int64_t>(N - n0, 0, width);
  return count >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint32_t{1} << count) - 1);
}

// Feature axis 0's x (C, N) in the panels of PackRowPanels: out[((p CB + c) 32 + r) bs + i] =
// x[c bs + i][32 p + r], zero past N; panels [begin, end).  Pairs of x's rows interleaved
// make 16 x 16 matrices of 32-bit elements whose transposes are 16 of the panel's rows.
AVX512_TARGET void PackColumnPanels(const uint16_t* x, int64_t N, int64_t CB, int64_t bs,
                                    int64_t begin, int64_t end, uint16_t* out) {
  const int64_t pairs = std::min<int64_t>(16, bs / 2);  // per pass of 32 (bs 16: 16) features
  for (int64_t p = begin; p < end; ++p) {
    for (int64_t c = 0; c < CB; ++c) {
      uint16_t* const to = out + (p * CB + c) * kPanelRows * bs;
      for (int64_t i0 = 0; i0 < bs; i0 += 2 * pairs) {
        for (int64_t h = 0; h < kPanelRows; h += 16) {
          const int64_t n0 = p * kPanelRows + h;
          const __mmask32 loaded = LanesBelow(N, n0, 16);
          const uint16_t* const rows = loaded ? x + (c * bs + i0) * N + n0 : x;
          __m512i v[16];
          for (int64_t q = 0; q < 16; ++q) {
            v[q] = q < pairs && loaded ? InterleaveRows(rows + 2 * q * N, rows + (2 * q + 1) * N,
                                                        loaded)
                                       : _mm512_setzero_si512();
          }
          Transpose16x16(v);  // v[r]: example n0 + r's features i0 .. i0 + 2 pairs - 1
          for (int64_t r = 0; r < 16; ++r) {
            uint16_t* const row = to + (h + r) * bs + i0;
            if (pairs == 16) {
              _mm512_storeu_si512(row, v[r]);
            } else {
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(row), _mm512_castsi512_si256(v[r]));
            }
          }
        }
      }
    }
  }
}

// Feature axis 0's x (C, N) in PackTransposedTiles' tiles (x^T's rows are x's): the tile of
// group g and rows 32 h .. 32 h + 31 holds x[16 g + r][32 h + e] at r 32 + e (zero past N).
AVX512_TARGET void PackRowTiles(const uint16_t* x, int64_t N, int64_t H, int64_t g_begin,
                                int64_t g_end, uint16_t* out) {
  for (int64_t h = 0; h < H; ++h) {
    const __mmask32 loaded = LanesBelow(N, 32 * h, 32);
    for (int64_t g = g_begin; g < g_end; ++g) {
      uint16_t* const tile = out + (g * H + h) * kTileElements;
      for (int64_t r = 0; r < 16; ++r) {
        _mm512_storeu_si512(tile + r * 32,
                            _mm512_maskz_loadu_epi16(loaded, x + (16 * g + r) * N + 32 * h));
      }
    }
  }
}

// Feature axis 0's dy (K, N) in PackPairTiles' tiles: the tile of group g and rows
// 32 h .. 32 h + 31 holds dy[16 g + j][32 h + 2 p + e] at p 32 + 2 j + e (zero past N).  A
// row's consecutive pairs are 32-bit elements: one 16 x 16 transpose makes a tile.
AVX512_TARGET void PackTransposedPairTiles(const uint16_t* dy, int64_t N, int64_t H,
                                           int64_t g_begin, int64_t g_end, uint16_t* out) {
  for (int64_t h = 0; h < H; ++h) {
    const __mmask32 loaded = LanesBelow(N, 32 * h, 32);
    for (int64_t g = g_begin; g < g_end; ++g) {
      __m512i v[16];
      for (int64_t j = 0; j < 16; ++j) {
        v[j] = _mm512_maskz_loadu_epi16(loaded, dy + (16 * g + j) * N + 32 * h);
      }
      Transpose16x16(v);
      uint16_t* const tile = out + (g * H + h) * kTileElements;
      for (int64_t p = 0; p < 16; ++p) _mm512_storeu_si512(tile + p * 32, v[p]);
    }
  }
}

#pragma GCC diagnostic pop

// Bytes of packed blocks a forward task reads from its core's L2 cache for every panel of rows.
constexpr int64_t kChunkBytes = 1 << 20;

// Boundaries of ranges of output block columns holding at most `blocks` blocks each (a column
// with more alone), from 0 to KB: at least one range.
std::vector<int64_t> ColumnChunks(const BlockLayout& layout, int64_t blocks) {
  std::vector<int64_t> bounds = {0};
  for (int64_t k = 1; k <= layout.KB; ++k) {
    if (k == layout.KB || layout.col_ptr[k + 1] - layout.col_ptr[bounds.back()] > blocks) {
      bounds.push_back(k);
    }
  }
  if (bounds.size() == 1) bounds.push_back(layout.KB);
  return bounds;
}

// x's rows in panels of 32, each block column's 32 x bs piece contiguous (tile rows 2 bs bytes
// apart, so a tile's 16 rows lie in a few cache lines, not one line each of the same L1 set):
// out[((p CB + c) 32 + r) bs + i] = x[32 p + r][c bs + i], zero past N; panels [begin, end).
void PackRowPanels(const uint16_t* x, int64_t N, int64_t CB, int64_t bs, int64_t begin,
                   int64_t end, uint16_t* out) {
  const int64_t C = CB * bs;
  for (int64_t p = begin; p < end; ++p) {
    for (int64_t c = 0; c < CB; ++c) {
      uint16_t* const to = out + (p * CB + c) * kPanelRows * bs;
      for (int64_t r = 0; r < kPanelRows; ++r) {
        const int64_t n = p * kPanelRows + r;
        if (n < N) {
          std::memcpy(to + r * bs, x + n * C + c * bs, bs * sizeof(uint16_t));
        } else {
          std::memset(to + r * bs, 0, bs * sizeof(uint16_t));
        }
      }
    }
  }
}

}  // namespace

bool AmxBf16Enabled() {
  static const bool enabled = [] {
    const std::string& requested = RequestedCpuIsa();
    return (requested.empty() || requested == "amx") && ProcessorHasAmxBf16();
  }();
  return enabled;
}

bool AmxBf16Serves(int64_t bs) {
  return (bs == 16 || bs == 32 || bs == 64) && AmxBf16Enabled();
}

bool BlocksparseMatmulAmxBf16(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t N,
                              int feature_axis, const BlockLayout& layout,
                              const ParallelFor& parallel_for, const ScratchAllocator& scratch,
                              bool w_transposed) {
  const int64_t bs = layout.block_size, C = layout.CB * bs, K = layout.KB * bs;
  const int64_t area = bs * bs;
  const int64_t panels = (N + kPanelRows - 1) / kPanelRows;
  uint16_t* const wv = Bf16Scratch(scratch, layout.blocks * area);
  uint16_t* const xp = Bf16Scratch(scratch, panels * kPanelRows * C);
  if (wv == nullptr || xp == nullptr) return false;
  // In column order, the order the tasks read them: a column's blocks one after another.
  parallel_for(layout.blocks, 4 * area, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      PackBlockVnni(w + layout.col_block[q] * area, bs, w_transposed, wv + q * area);
    }
  });
  // Feature axis 0 packs x's columns into the same panels, and its tiles' rows are stored
  // as y's columns: the products in between are the same.
  const bool columns = feature_axis == 0;
  parallel_for(panels, 4 * kPanelRows * C, [&](int64_t begin, int64_t end) {
    if (columns) {
      PackColumnPanels(x, N, layout.CB, bs, begin, end, xp);
    } else {
      PackRowPanels(x, N, layout.CB, bs, begin, end, xp);
    }
  });
  // Tasks: ranges of output block columns whose blocks fit in a core's L2 cache together
  // (read there by every panel of rows), times groups of panels, enough to share out.
  const std::vector<int64_t> column_chunks = ColumnChunks(layout, kChunkBytes / (2 * area));
  const int64_t chunks = static_cast<int64_t>(column_chunks.size()) - 1;
  const int64_t groups = std::min(panels, std::max<int64_t>(1, (8 + chunks - 1) / chunks));
  parallel_for(chunks * groups, 2 * kPanelRows * area * layout.blocks / chunks * panels / groups,
               [&](int64_t begin, int64_t end) {
    TileScope tiles(std::min<int64_t>(bs, 32));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t chunk = t / groups, group = t % groups;
      for (int64_t p = group * panels / groups; p < (group + 1) * panels / groups; ++p) {
        const int64_t rows = std::min(kPanelRows, N - p * kPanelRows);
        uint16_t* const y_panel = columns ? y + p * kPanelRows : y + p * kPanelRows * K;
        ForwardPanel(xp + p * layout.CB * kPanelRows * bs, wv, layout, column_chunks[chunk],
                     column_chunks[chunk + 1], y_panel, columns ? N : K, rows, columns);
      }
    }
  });
  return true;
}

bool BlocksparseMatmulGradWAmxBf16(const uint16_t* x, const uint16_t* dy, uint16_t* dw,
                                   int64_t N, int feature_axis, const BlockLayout& layout,
                                   const ParallelFor& parallel_for,
                                   const ScratchAllocator& scratch) {
  const int64_t bs = layout.block_size, C = layout.CB * bs, K = layout.KB * bs;
  const int64_t H = (N + 31) / 32;  // chunks of 32 rows
  uint16_t* const xt = Bf16Scratch(scratch, C * H * 32);
  uint16_t* const dyt = Bf16Scratch(scratch, K * H * 32);
  if (xt == nullptr || dyt == nullptr) return false;
  // The same tiles from either feature axis: x^T's rows and dy's pairs of rows, 16 features
  // by 32 examples each.
  parallel_for(C / 16, 32 * 16 * H, [&](int64_t begin, int64_t end) {
    if (feature_axis == 0) {
      PackRowTiles(x, N, H, begin, end, xt);
    } else {
      PackTransposedTiles(x, N, C, H, begin, end, xt);
    }
  });
  parallel_for(K / 16, 32 * 16 * H, [&](int64_t begin, int64_t end) {
    if (feature_axis == 0) {
      PackTransposedPairTiles(dy, N, H, begin, end, dyt);
    } else {
      PackPairTiles(dy, N, K, H, begin, end, dyt);
    }
  });
  // Blocks in row order, so that neighbouring tasks read the same tiles of x^T.
  parallel_for(layout.blocks, 2 * 32 * H * bs * bs, [&](int64_t begin, int64_t end) {
    TileScope tiles(32);
    for (int64_t q = begin; q < end; ++q) GradWBlock(xt, dyt, H, layout, layout.row_block[q], dw);
  });
  return true;
}

}  // namespace blocksparse
