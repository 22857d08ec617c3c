// Internal: the per-instruction-set halves of the CPU kernels.
//
// ops/blocksparse_matmul_cpu_isa.cc is compiled once per instruction set (AVX-512, AVX2,
// baseline x86-64) into its own namespace; blocksparse_matmul_cpu.cc picks one at run time.
// Only plain C types cross this boundary, so no inline library template compiled with
// AVX-512 can be merged by the linker into code that runs on an older processor.
#ifndef BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_CPU_ISA_H_
#define BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_CPU_ISA_H_

#include <cstdint>

namespace blocksparse {

// Raw view of a BlockLayout's tables (see block_layout.h).
struct LayoutView {
  int64_t CB, KB, block_size, blocks;
  const int32_t* block_row;
  const int32_t* block_col;
  const int32_t* col_ptr;
  const int32_t* col_row;
  const int32_t* col_block;
  const int32_t* col_of_entry;  // bs 1 only (BlockLayout's)
};

// Entries list_in_both may write past the examples it lists.
constexpr int64_t kRowListSlack = 16;
// Floats per 64-byte cache line: the step of the kernels' prefetches.
constexpr int64_t kLineFloats = 64 / sizeof(float);

// Where x[n][i] (i < 8) of a bs-8 block column sits in a row-pairs panel: rows n and n + 1 (n
// even) interleaved, so that one 16-float vector holds x[n][i] and x[n + 1][i] side by side for
// every i.
inline int64_t RowPairsPanelOffset(int64_t n, int64_t i) {
  return (n & ~int64_t{1}) * 8 + 2 * i + (n & 1);
}

struct CpuKernels {
  const char* isa;
  // Floats per vector register.  Blocks narrower than this (bs 1; bs 8 under AVX-512 unless
  // the layout is very sparse), and blocks this wide from moderate densities, run the
  // feature_axis=0 kernel on transposed operands, whose vectors run along N instead.
  int vector_width;
  // Rows of x (and y) one register tile of the feature_axis=1 forward product covers.
  int row_tile;
  // y[0:rows, k-blocks [k_begin, k_end)) (feature_axis 1; y's row stride is K) from x's rows
  // as row-tile panels: for tile t (rows [t * row_tile, (t + 1) * row_tile)) and input block
  // row c, panels[((t * CB + c) * row_tile + m) * bs + i] = x[t * row_tile + m][c * bs + i],
  // whole tiles (rows past `rows` are computed, never stored).  bs is 8, 16, 32 or 64.
  void (*forward_axis1)(const float* panels, const float* w, float* y, int64_t rows,
                        const LayoutView* layout, int64_t k_begin, int64_t k_end);
  // y[k-block, n_begin:n_end] (feature_axis 0; y (K, N)) from x (C, N) with row stride
  // x_rs >= N.  With w_transposed w holds the transposes of the product's blocks (as the
  // input gradient reads w), read where they lie.  With y_rows y is (N, K) instead, written
  // turned around (feature_axis 1's products on transposed operands: no transpose of y after).
  void (*forward_axis0)(const float* x, int64_t x_rs, const float* w, float* y, int64_t N,
                        const LayoutView* layout, int64_t k, int64_t n_begin, int64_t n_end,
                        bool w_transposed, bool y_rows);
  // y[r, 0:bs) += x[r, 0:bs) . b for the `count` rows r listed in `rows`; x and y have row
  // strides x_rs and y_rs, b is bs x bs with row stride b_rs (sparse_dot's masked product).
  void (*gathered_rows_accumulate)(const float* x, int64_t x_rs, const int32_t* rows,
                                   int64_t count, const float* b, int64_t b_rs, int64_t bs,
                                   float* y, int64_t y_rs);
  // dw of the `count` blocks tile[0 .. count) (count <= max_shared_row_tile; more than one
  // only with bs == row_pairs_block_size, all of one block row) from block-column panels of
  // `rows` rows each: x_panels[(c * rows + n) * bs + i] = x[n, c*bs + i], and likewise
  // dy_panels for dy; the panels of block `next` (none if negative), computed next, are
  // fetched into L2 meanwhile.  With bs == row_pairs_block_size the panels hold rows in
  // interleaved pairs instead (see RowPairsPanelOffset; rows even, an odd N's last pair
  // completed by a zero row), and a block's sums are added in an order that depends on count
  // (so the caller must choose the tiles by the layout alone, for results independent of the
  // threads).
  void (*grad_w)(const float* x_panels, const float* dy_panels, float* dw, int64_t rows,
                 const LayoutView* layout, const int32_t* tile, int64_t count, int64_t next);
  // The block size whose weight-gradient panels grad_w reads as row pairs (0: none).
  int64_t row_pairs_block_size;
  // The most blocks of one block row a grad_w call takes at once (1 or 3).
  int64_t max_shared_row_tile;
  // dw[0:bs, 0:bs) = sum over the `count` rows r listed in `rows`, in that order, of
  // x[r, 0:bs)^T dy[r, 0:bs); x, dy and dw have row strides x_rs, dy_rs and dw_rs
  // (sparse_dot's weight gradient, over the examples active in both masks only).
  void (*gathered_rows_grad_w)(const float* x, int64_t x_rs, const float* dy, int64_t dy_rs,
                               const int32_t* rows, int64_t count, int64_t bs, float* dw,
                               int64_t dw_rs);
  // As gathered_rows_accumulate (each element summed over p in the same order), in wider
  // register tiles and with no padded rows computed: the faster choice when b is packed
  // (b_rs == bs, see pack_block).  Over `blocks` input blocks at once: y[r, 0:width) += sum
  // over q < blocks, in increasing q, of x[q x_pitch + r x_rs ..][0:bs) . b's rows q bs ..
  // (q + 1) bs, the sums kept in registers between blocks (the same sums as one call per
  // block); width (b's and y's columns, a multiple of bs) may span several output blocks.
  void (*exact_rows_accumulate)(const float* x, int64_t x_rs, const int32_t* rows,
                                int64_t count, const float* b, int64_t b_rs, int64_t bs,
                                float* y, int64_t y_rs, int64_t blocks, int64_t x_pitch,
                                int64_t width);
  // packed (bs x bs, row stride packed_rs) = the bs x bs block at src (row stride src_rs), or
  // its transpose; prefetches the block of the same stride at `next` meanwhile.
  void (*pack_block)(const float* src, int64_t src_rs, int64_t bs, bool transpose,
                     const float* next, float* packed, int64_t packed_rs);
  // panel[q * bs + c] = src[rows[q] * src_rs + c] for q < count, c < bs.
  void (*gather_rows)(const float* src, int64_t src_rs, const int32_t* rows, int64_t count,
                      int64_t bs, float* panel);
  // dw[0:bs, 0:width) (row stride dw_rs) = sum over q < count, in that order, of
  // x_panel[q]^T dy_row(q) (gathered_rows_grad_w's sums, read from panels): x_panel's rows bs
  // floats apart (as gather_rows makes them); dy_row(q) is dy_panel + q dy_rs, or with dy_rows
  // dy_panel + dy_rows[q] dy_rs; width of its floats are read (bs, or a multiple of both bs
  // and 8: output blocks side by side).  With stream, dw is stored past the caches where its
  // rows are aligned for it, fenced before returning (for results not read again soon).
  void (*panel_grad_w)(const float* x_panel, const float* dy_panel, int64_t dy_rs,
                       const int32_t* dy_rows, int64_t width, int64_t count, int64_t bs,
                       float* dw, int64_t dw_rs, bool stream);
  // y[r, 0:width) (row stride y_rs) = sum over q < in_blocks, in increasing q, of
  // x_panels[(q * pitch + r) * bs ..][0:bs) . packed[q * bs * width ..] (bs x width, row stride
  // width), for r < rows: sparse_dot's forward where every example is active in every block,
  // the sums of exact_rows_accumulate from zero kept in registers across input blocks (with
  // accumulate, from y's values: a call continuing an earlier call's sums, the same sums as
  // one call over both calls' blocks).  Tiles of row_tile rows read whole: the last block's
  // panel must be readable row_tile - 1 rows past `rows`.  bs is 8, 16, 32 or 64; width a
  // multiple of 8.
  void (*full_rows_forward)(const float* x_panels, int64_t pitch, int64_t in_blocks, int64_t bs,
                            const float* packed, int64_t width, float* y, int64_t y_rs,
                            int64_t rows, bool accumulate);
  // rows[0:count) = 64 q + t for each bit t set in both a[q] and b[q], q < words, in
  // increasing order; returns count.  May write kRowListSlack entries past the count (rows
  // needs room for 64 words + kRowListSlack).  For sparse_dot's block pairs that share many
  // examples: AVX-512 compresses 16 bits at once (vpcompressd), AVX2 looks up 8 at once; null
  // for the generic kernels, and sparse_dot then lists them with scalar code.
  int64_t (*list_in_both)(const uint64_t* a, const uint64_t* b, int64_t words, int32_t* rows);
  // out[c * out_rs + r] = in[r * in_rs + c] for r < rows, c < cols.
  void (*transpose_rect)(const float* in, int64_t in_rs, int64_t rows, int64_t cols, float* out,
                         int64_t out_rs);
  // Neuron level (bs 1), a few rows, operands where they lie: x(n, c) is x[n x_ns + c x_cs],
  // y(n, k) is y[n y_ns + k y_ks] (either feature axis).  For k in [k_begin, k_end), n < N:
  // y(n, k) = the sum over column k's entries q, in their order, of w[col_block[q]] x(n,
  // col_row[q]) (forward_axis0's sums for bs 1).
  void (*neuron_columns)(const float* x, int64_t x_ns, int64_t x_cs, const float* w, float* y,
                         int64_t y_ns, int64_t y_ks, int64_t N, const LayoutView* layout,
                         int64_t k_begin, int64_t k_end);
  // The same sums for one row (N = 1), in one flat loop over the entries with no branch at
  // the columns' ends (layout->col_of_entry needed): a column of a few entries made the
  // per-column loops mispredict their exits.
  void (*neuron_columns_one_row)(const float* x, int64_t x_cs, const float* w, float* y,
                                 int64_t y_ks, const LayoutView* layout, int64_t k_begin,
                                 int64_t k_end);
  // The same sums for one row by a single pass over the blocks in their order, each adding
  // w[b] x(0, block_row[b]) into y(0, block_col[b]); for layouts stored row after row, whose
  // block order then adds every output's terms in increasing c, as neuron_columns does (w and
  // x read in order, y at random, where neuron_columns reads w at random).
  void (*neuron_rows_one_row)(const float* x, int64_t x_cs, const float* w, float* y,
                              int64_t y_ks, const LayoutView* layout);
  // Likewise for the weight gradient: dw[b] = the sum over n < N, in increasing n, of
  // x(n, block_row[b]) dy(n, block_col[b]), for b in [b_begin, b_end) (grad_w's sums for
  // bs 1 when N < vector_width).
  void (*neuron_grad_w)(const float* x, int64_t x_ns, int64_t x_cs, const float* dy,
                        int64_t dy_ns, int64_t dy_ks, int64_t N, const LayoutView* layout,
                        int64_t b_begin, int64_t b_end, float* dw);
  // out[i] = in[i] for i < n, bfloat16 (as its bits) to float32 and back (see
  // BFloat16ToFloat in blocksparse_matmul_cpu.h).
  void (*bfloat16_to_float)(const uint16_t* in, float* out, int64_t n);
  void (*float_to_bfloat16)(const float* in, uint16_t* out, int64_t n);
  // The same for float16 (see HalfToFloat in blocksparse_matmul_cpu.h).
  void (*half_to_float)(const uint16_t* in, float* out, int64_t n);
  void (*float_to_half)(const float* in, uint16_t* out, int64_t n);
};

// The micro-kernels of the block-sparse convolution (ops/blocksparse_conv_cpu.cc).
struct ConvKernels {
  // Pixels (rows of the output) one gathered_taps call computes.
  int pixel_tile;
  // For m < valid, out_rows[m][0:bs) = sum over taps t < tap_count, blocks q < count, p < bs of
  //   in_rows[t * pixel_tile + m][rows[q] * bs + p] * w[blocks[q] * w_block_stride + taps[t] * bs * bs + p * bs + :],
  // summed in that order (t, then q, then p) and stored, not accumulated.  in_rows holds
  // pixel_tile pointers per tap: the input pixel feeding row m through that tap, or a zero
  // row as long as the input's features where none does.  Accumulates in registers.
  void (*gathered_taps)(const float* const* in_rows, const int32_t* taps, int64_t tap_count,
                        const int32_t* rows, const int32_t* blocks, int64_t count,
                        const float* w, int64_t w_block_stride, int64_t bs,
                        float* const* out_rows, int64_t valid);
  // out (bs x bs, row stride bs) = sum over segments q < segments, p < P of
  //   a[a_offsets[q] + p * a_stride + i] * b[b_offsets[q] + p * b_stride + j],
  // in that order, stored.  A segment is a run of pixels of one image row, so a and b are
  // read with fixed strides inside it.
  void (*segment_outer_sum)(const float* a, const int64_t* a_offsets, const float* b,
                            const int64_t* b_offsets, int64_t segments, int64_t P,
                            int64_t a_stride, int64_t b_stride, int64_t bs, float* out);
};

// The best kernels this processor runs (chosen once, in blocksparse_matmul_cpu.cc).
const CpuKernels& BestCpuKernels();
// The convolution kernels of the same instruction set as BestCpuKernels() (blocksparse_conv_cpu.cc).
const ConvKernels& BestConvKernels();

namespace avx512 { extern const CpuKernels kKernels; extern const ConvKernels kConvKernels; }
namespace avx2 { extern const CpuKernels kKernels; extern const ConvKernels kConvKernels; }
namespace generic { extern const CpuKernels kKernels; extern const ConvKernels kConvKernels; }

}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_CPU_ISA_H_
