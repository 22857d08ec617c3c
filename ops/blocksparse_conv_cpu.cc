#include "ops/blocksparse_conv_cpu.h"

#include <algorithm>
#include <vector>

#include "ops/blocksparse_matmul_cpu_isa.h"

namespace blocksparse {

const ConvKernels& BestConvKernels() {
  // The same instruction set as the matrix-product kernels, so both follow one decision.
  static const ConvKernels* kernels = [] {
    const CpuKernels* best = &BestCpuKernels();
    if (best == &avx512::kKernels) return &avx512::kConvKernels;
    if (best == &avx2::kKernels) return &avx2::kConvKernels;
    return &generic::kConvKernels;
  }();
  return *kernels;
}

namespace {

// Floor of a / b for b > 0 and any sign of a.
int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Output pixels one task of the gathered product covers (before splitting the block columns).
constexpr int64_t kPixelsPerTask = 96;
// Weight bytes of the output block columns one gathered task covers: they stay in L2 while
// the task's pixel tiles pass over them.
constexpr int64_t kWeightBytesPerRange = 1024 * 1024;
// Output pixels whose input and output-gradient slices the kernel gradient keeps in cache
// while it runs over every tap.
constexpr int64_t kPixelsPerChunk = 1024;
// Below this many stored blocks the kernel gradient also splits its work by tap.
constexpr int64_t kBlocksForWholeTaps = 16;

// The gathered product shared by the forward pass and the input gradient: for every output
// pixel o (in the order pixel_at gives) and output block column k,
//   out[o, k-block] = sum over taps t, blocks (c, k) of in[s_t, c-block] . w[block, t]
// where sources(o, s) writes s_t for every tap, < 0 for zeros.  `layout` is indexed by output
// block columns.
template <typename PixelAt, typename Sources>
bool GatheredConv(const float* in, int64_t in_features, const float* w, float* out,
                  int64_t out_pixels, int64_t taps, const BlockLayout& layout,
                  const PixelAt& pixel_at, const Sources& sources, const ParallelFor& parallel_for,
                  const ScratchAllocator& scratch) {
  if (out_pixels == 0) return true;
  const ConvKernels& kernels = BestConvKernels();
  const int64_t bs = layout.block_size, KB = layout.KB, out_features = KB * bs;
  float* const zeros = scratch(in_features);
  if (zeros == nullptr) return false;
  std::fill_n(zeros, in_features, 0.f);

  const int64_t tile = kernels.pixel_tile;
  const int64_t tiles = (out_pixels + tile - 1) / tile;
  const int64_t tiles_per_group = std::max<int64_t>(1, kPixelsPerTask / tile);
  const int64_t groups = (tiles + tiles_per_group - 1) / tiles_per_group;
  const int64_t column_bytes = std::max<int64_t>(1, layout.blocks * taps * bs * bs * 4 / KB);
  int64_t per_range = std::clamp<int64_t>(kWeightBytesPerRange / column_bytes, 1, KB);
  per_range = std::min(per_range, std::max<int64_t>(1, KB * groups / 8));  // >= 8 tasks
  const int64_t ranges = (KB + per_range - 1) / per_range;
  const int64_t cost = 2 * kPixelsPerTask * taps * layout.blocks * bs * bs / ranges;

  parallel_for(groups * ranges, cost, [&](int64_t begin, int64_t end) {
    std::vector<const float*> in_rows(taps * tile);
    std::vector<int64_t> source(tile * taps);
    std::vector<int32_t> tap_ids(taps);
    std::vector<float*> out_base(tile), out_rows(tile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / ranges, r = task % ranges;
      const int64_t k0 = r * per_range, k1 = std::min(KB, k0 + per_range);
      const int64_t t_end = std::min(tiles, (g + 1) * tiles_per_group);
      for (int64_t t = g * tiles_per_group; t < t_end; ++t) {
        const int64_t valid = std::min(tile, out_pixels - t * tile);
        for (int64_t m = 0; m < tile; ++m) {
          // Rows past the end repeat a real pixel's output row but read only zeros; the
          // kernel never stores them.
          const int64_t o = pixel_at(t * tile + std::min(m, valid - 1));
          out_base[m] = out + o * out_features;
          if (m < valid) {
            sources(o, source.data() + m * taps);
          } else {
            std::fill_n(source.data() + m * taps, taps, -1);
          }
        }
        // The taps that reach the input for at least one pixel of the tile; the others would
        // only add zeros.
        int64_t tap_count = 0;
        for (int64_t tap = 0; tap < taps; ++tap) {
          const float** rows = in_rows.data() + tap_count * tile;
          bool any = false;
          for (int64_t m = 0; m < tile; ++m) {
            const int64_t s = source[m * taps + tap];
            rows[m] = s < 0 ? zeros : in + s * in_features;
            any |= s >= 0;
          }
          if (any) tap_ids[tap_count++] = static_cast<int32_t>(tap);
        }
        for (int64_t k = k0; k < k1; ++k) {
          for (int64_t m = 0; m < tile; ++m) out_rows[m] = out_base[m] + k * bs;
          const int64_t first = layout.col_ptr[k];
          kernels.gathered_taps(in_rows.data(), tap_ids.data(), tap_count,
                                layout.col_row.data() + first, layout.col_block.data() + first,
                                layout.col_ptr[k + 1] - first, w, taps * bs * bs, bs,
                                out_rows.data(), valid);
        }
      }
    }
  });
  return true;
}

// The layout with input and output block roles swapped (blocks keep their numbers).
BlockLayout TransposedLayout(const BlockLayout& layout) {
  std::vector<int32_t> coords(2 * layout.blocks);
  for (int64_t b = 0; b < layout.blocks; ++b) {
    coords[2 * b] = layout.block_col[b];
    coords[2 * b + 1] = layout.block_row[b];
  }
  BlockLayout transposed;
  // Cannot fail: the coordinates come from a valid layout.
  BuildBlockLayout(coords.data(), layout.blocks, layout.KB, layout.CB, layout.block_size,
                   &transposed);
  return transposed;
}

// w_t[b, t] = w[b, t]^T for every block and tap.
void TransposeBlocks(const float* w, int64_t count, int64_t bs, float* w_t,
                     const ParallelFor& parallel_for) {
  parallel_for(count, 2 * bs * bs, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* src = w + n * bs * bs;
      float* dst = w_t + n * bs * bs;
      for (int64_t i = 0; i < bs; ++i)
        for (int64_t j = 0; j < bs; ++j) dst[j * bs + i] = src[i * bs + j];
    }
  });
}

// Input pixel of (n, row, col) in the flat pixel index of a (batch, height, width) image set.
int64_t PixelIndex(int64_t n, int64_t row, int64_t col, int64_t height, int64_t width) {
  return (n * height + row) * width + col;
}

}  // namespace

bool ConvOutputSize(int64_t in, int64_t kernel, int64_t stride, int64_t dilation,
                    int64_t before, int64_t after, int64_t* size) {
  int64_t padded, reach;
  if (__builtin_add_overflow(in, before, &padded) ||
      __builtin_add_overflow(padded, after, &padded) ||
      __builtin_mul_overflow(kernel - 1, dilation, &reach)) {
    return false;
  }
  const int64_t span = padded - reach;  // both >= 0, so no overflow
  *size = span < 1 ? 0 : (span - 1) / stride + 1;
  return true;
}

bool BlocksparseConv2DCpu(const float* x, const float* w, float* y, const ConvGeometry& g,
                          const BlockLayout& layout, const ParallelFor& parallel_for,
                          const ScratchAllocator& scratch) {
  const auto identity = [](int64_t o) { return o; };
  // Output pixel o through tap (i, j) reads the input pixel at its stride position plus the
  // tap's dilated offset, less the padding.
  const auto sources = [&g](int64_t o, int64_t* source) {
    const int64_t q = o % g.out_width, rest = o / g.out_width;
    const int64_t p = rest % g.out_height, n = rest / g.out_height;
    for (int64_t i = 0; i < g.kernel_height; ++i) {
      const int64_t h = p * g.stride_h + i * g.dilation_h - g.pad_top;
      const bool row_inside = h >= 0 && h < g.in_height;
      for (int64_t j = 0; j < g.kernel_width; ++j) {
        const int64_t v = q * g.stride_w + j * g.dilation_w - g.pad_left;
        const bool inside = row_inside && v >= 0 && v < g.in_width;
        *source++ = inside ? PixelIndex(n, h, v, g.in_height, g.in_width) : -1;
      }
    }
  };
  return GatheredConv(x, layout.CB * layout.block_size, w, y, g.out_pixels(), g.taps(), layout,
                      identity, sources, parallel_for, scratch);
}

bool BlocksparseConv2DGradInputCpu(const float* dy, const float* w, float* dx,
                                   const ConvGeometry& g, const BlockLayout& layout,
                                   const ParallelFor& parallel_for,
                                   const ScratchAllocator& scratch) {
  const int64_t bs = layout.block_size, taps = g.taps();
  float* const w_t = scratch(layout.blocks * taps * bs * bs);
  if (w_t == nullptr) return false;
  TransposeBlocks(w, layout.blocks * taps, bs, w_t, parallel_for);
  // With a column stride s, the input columns of one residue mod s are reached by the same
  // taps: ordering each image row by residue gives tiles whose pixels share their taps, so
  // gathered_taps skips the taps that reach none of them.
  // The first width % sw residues have width / sw + 1 columns, the others width / sw: found
  // by division (a walk over the residues cost width x min(width, sw) per image row).
  const int64_t width = g.in_width, sw = g.stride_w;
  const int64_t per_residue = width / sw, longer = width % sw;
  const int64_t in_longer = (per_residue + 1) * longer;  // the columns of the longer residues
  const auto by_residue = [width, sw, per_residue, longer, in_longer](int64_t index) {
    const int64_t row = index / width, r = index % width;
    const int64_t residue =
        r < in_longer ? r / (per_residue + 1) : longer + (r - in_longer) / per_residue;
    const int64_t column =
        r < in_longer ? r % (per_residue + 1) : (r - in_longer) % per_residue;
    return row * width + residue + column * sw;
  };
  // Input pixel (n, h, v) received tap (i, j) from output pixel (p, q) where
  // p * stride_h + i * dilation_h - pad_top = h, and likewise for q, if that pixel exists.
  const auto position = [](int64_t shifted, int64_t stride, int64_t size) -> int64_t {
    if (shifted < 0 || shifted % stride) return -1;
    return shifted / stride < size ? shifted / stride : -1;
  };
  const auto sources = [&g, &position](int64_t pixel, int64_t* source) {
    const int64_t v = pixel % g.in_width, rest = pixel / g.in_width;
    const int64_t h = rest % g.in_height, n = rest / g.in_height;
    for (int64_t i = 0; i < g.kernel_height; ++i) {
      const int64_t p = position(h + g.pad_top - i * g.dilation_h, g.stride_h, g.out_height);
      for (int64_t j = 0; j < g.kernel_width; ++j) {
        const int64_t q = position(v + g.pad_left - j * g.dilation_w, g.stride_w, g.out_width);
        *source++ = p >= 0 && q >= 0 ? PixelIndex(n, p, q, g.out_height, g.out_width) : -1;
      }
    }
  };
  return GatheredConv(dy, layout.KB * bs, w_t, dx, g.in_pixels(), taps, TransposedLayout(layout),
                      by_residue, sources, parallel_for, scratch);
}

bool BlocksparseConv2DGradKernelCpu(const float* x, const float* dy, float* dw,
                                    const ConvGeometry& g, const BlockLayout& layout,
                                    const ParallelFor& parallel_for,
                                    const ScratchAllocator& scratch) {
  const ConvKernels& kernels = BestConvKernels();
  const int64_t bs = layout.block_size, C = layout.CB * bs, K = layout.KB * bs;
  const int64_t taps = g.taps(), tap_size = bs * bs;
  const int64_t out_rows = g.batch * g.out_height;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kPixelsPerChunk / std::max<int64_t>(1, g.out_width));
  const int64_t chunks = (out_rows + rows_per_chunk - 1) / rows_per_chunk;
  // Output columns [first, last) whose tap-column j reads inside the input.
  std::vector<int64_t> first_column(g.kernel_width), last_column(g.kernel_width);
  for (int64_t j = 0; j < g.kernel_width; ++j) {
    const int64_t shift = j * g.dilation_w - g.pad_left;
    first_column[j] = std::clamp<int64_t>(FloorDiv(-shift + g.stride_w - 1, g.stride_w), 0,
                                          g.out_width);
    last_column[j] = std::clamp<int64_t>(FloorDiv(g.in_width - 1 - shift, g.stride_w) + 1,
                                         first_column[j], g.out_width);
  }
  // Few blocks: one task per (block, tap) so that every thread has work.
  const int64_t tap_groups = layout.blocks < kBlocksForWholeTaps ? taps : 1;
  const int64_t taps_per_task = taps / tap_groups;
  float* const tiles = scratch(layout.blocks * tap_groups * tap_size);
  if (tiles == nullptr) return false;
  const int64_t cost = 2 * g.out_pixels() * tap_size * taps_per_task;
  parallel_for(layout.blocks * tap_groups, cost, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> a_offsets(rows_per_chunk), b_offsets(rows_per_chunk);
    for (int64_t task = begin; task < end; ++task) {
      // Blocks in column order, so neighbouring tasks share an output-gradient slice.
      const int64_t b = layout.col_block[task / tap_groups];
      const int64_t tap0 = (task % tap_groups) * taps_per_task;
      const int64_t c = layout.block_row[b], k = layout.block_col[b];
      float* const dw_b = dw + (b * taps + tap0) * tap_size;
      float* const tile = tiles + task * tap_size;
      std::fill_n(dw_b, taps_per_task * tap_size, 0.f);
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t row0 = chunk * rows_per_chunk;
        const int64_t row1 = std::min(out_rows, row0 + rows_per_chunk);
        for (int64_t tap = tap0; tap < tap0 + taps_per_task; ++tap) {
          const int64_t i = tap / g.kernel_width, j = tap % g.kernel_width;
          const int64_t q0 = first_column[j], width = last_column[j] - q0;
          if (width <= 0) continue;
          // One segment per output row whose tap row lies inside the input.
          int64_t segments = 0;
          for (int64_t row = row0; row < row1; ++row) {
            const int64_t n = row / g.out_height, p = row % g.out_height;
            const int64_t h = p * g.stride_h + i * g.dilation_h - g.pad_top;
            if (h < 0 || h >= g.in_height) continue;
            const int64_t v = q0 * g.stride_w + j * g.dilation_w - g.pad_left;
            a_offsets[segments] = PixelIndex(n, h, v, g.in_height, g.in_width) * C + c * bs;
            b_offsets[segments] = (row * g.out_width + q0) * K + k * bs;
            ++segments;
          }
          if (segments == 0) continue;
          kernels.segment_outer_sum(x, a_offsets.data(), dy, b_offsets.data(), segments, width,
                                    g.stride_w * C, K, bs, tile);
          float* const out = dw_b + (tap - tap0) * tap_size;
          for (int64_t e = 0; e < tap_size; ++e) out[e] += tile[e];
        }
      }
    }
  });
  return true;
}

}  // namespace blocksparse
