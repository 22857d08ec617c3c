// Lookup tables describing which (bs x bs) blocks of a C x K weight matrix are present.
// Plain C++ (no TensorFlow, no CUDA) so CPU kernels, GPU kernels and tests share it.
#ifndef BLOCKSPARSE_OPS_BLOCK_LAYOUT_H_
#define BLOCKSPARSE_OPS_BLOCK_LAYOUT_H_

#include <cstdint>
#include <string>
#include <vector>

namespace blocksparse {

// Block sizes every product is built for (the CPU micro-kernels' vector widths and the GPU
// kernels' tiles assume them); CPU and GPU checks share this one list.
constexpr bool IsSupportedBlockSize(int64_t bs) {
  return bs == 1 || bs == 8 || bs == 16 || bs == 32 || bs == 64;
}

// Block sizes whose layouts the GPU kernels may run on their cover of kCoverBlockSize-wide
// blocks (CoarseLayoutOf below); the TensorFlow op builds the cover for these.
constexpr int64_t kCoverBlockSize = 64;
constexpr bool HasCover(int64_t bs) { return bs == 8 || bs == 16 || bs == 32; }

// Block b of the compressed weight tensor w (shape (blocks, bs, bs)) sits at block row
// block_row[b] (input features c*bs .. c*bs+bs-1) and block column block_col[b] (output
// features k*bs .. k*bs+bs-1).  The column-major index lists, for every output block
// column k, its blocks in increasing block row: entries col_ptr[k] .. col_ptr[k+1]-1 of
// col_row / col_block.  Every product kernel walks one of these two views.  The row-major
// index lists, for every input block row c, its blocks in increasing block column: entries
// row_ptr[c] .. row_ptr[c+1]-1 of row_block (the weight gradient's block order starts there).
struct BlockLayout {
  int64_t CB = 0;          // input block rows    (C / bs)
  int64_t KB = 0;          // output block columns (K / bs)
  int64_t block_size = 0;  // bs
  int64_t blocks = 0;      // number of stored blocks
  std::vector<int32_t> block_row, block_col;     // per block: (c, k)
  std::vector<int32_t> col_ptr;                  // KB + 1 offsets
  std::vector<int32_t> col_row, col_block;       // blocks entries, grouped by column
  std::vector<int32_t> row_ptr;                  // CB + 1 offsets
  std::vector<int32_t> row_block;                // blocks entries, grouped by row
  // The column of each column-major entry, then -1 (blocks + 1 entries), so that a loop over
  // the entries knows where each column ends without a branch.  Kept only where the one-row
  // product runs that loop (see NeuronColumnsFlat in blocksparse_matmul_cpu.cc): bs 1, columns
  // of at most kFlatColumnEntries entries on average, and the blocks stored column after column
  // (col_block[q] == q: W^T's layout when W's blocks are stored row after row); else empty.
  std::vector<int32_t> col_of_entry;
  // Whether row_block[q] == q for every entry: the blocks stored row after row (as
  // BlocksparseMatMul stores them), so that block order is row-major order.
  bool rows_in_block_order = false;
};

constexpr int64_t kFlatColumnEntries = 8;

// The bytes the tables of `layout` take.
inline int64_t TableBytes(const BlockLayout& layout) {
  const size_t entries = layout.block_row.size() + layout.block_col.size() +
                         layout.col_ptr.size() + layout.col_row.size() +
                         layout.col_block.size() + layout.row_ptr.size() +
                         layout.row_block.size() + layout.col_of_entry.size();
  return static_cast<int64_t>(entries * sizeof(int32_t));
}

// Builds the tables from `blocks` (c, k) pairs stored row after row in `coords`.
// Returns "" on success, otherwise a message naming the offending entry (coordinate out
// of range, duplicate block, bad sizes).  Linear in blocks + KB.
std::string BuildBlockLayout(const int32_t* coords, int64_t blocks, int64_t CB, int64_t KB,
                             int64_t block_size, BlockLayout* layout);

// The tables of the transpose's layout (W^T, K x C: every (c, k) read as (k, c)) from W's
// `blocks` (c, k) pairs, W having CB x KB blocks; block b keeps its index.  Errors name the
// entries as given, in W's coordinates.
std::string BuildTransposedBlockLayout(const int32_t* coords, int64_t blocks, int64_t CB,
                                       int64_t KB, int64_t block_size, BlockLayout* layout);

// The layout of coarse_bs-wide blocks (a multiple of fine's block size that divides C and K)
// that covers fine's blocks: a block wherever any of the (coarse_bs / bs)^2 narrow blocks it
// spans is stored, stored in row-major order of its grid.  False where coarse_bs does not fit
// (or the tables do not fit in memory).
bool CoarseLayoutOf(const BlockLayout& fine, int64_t coarse_bs, BlockLayout* coarse);

// For groups of `cols` neighbouring block columns (columns cols g .. cols g + cols - 1), the
// block rows that hold a block in any column of a group, counted over all groups, from the
// column view (col_ptr: KB + 1 entries, col_row: `blocks`).  A product that reads each such
// block row's inputs once per group reads this many input tiles where one per block reads
// `blocks`.  -1 where the tables are not a column view of CB block rows (bounds out of order
// or past `blocks`, a row out of range) or cols < 1.  Linear in blocks + CB.
int64_t ColumnGroupRows(const int32_t* col_ptr, const int32_t* col_row, int64_t CB, int64_t KB,
                        int64_t blocks, int64_t cols);

}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_BLOCK_LAYOUT_H_
