#include "ops/block_layout.h"

#include <unistd.h>

#include <algorithm>
#include <limits>
#include <new>
#include <string>
#include <vector>

namespace blocksparse {

namespace {

// Bytes of lookup tables a layout may take: half of this machine's memory.  Larger ones are
// refused with an error naming the shape: with the usual overcommit of memory, allocating them
// would succeed and filling them would get the process killed, with no error at all.
double MaxTableBytes() {
  static const double bytes = [] {
    const long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGE_SIZE);
    if (pages <= 0 || page_size <= 0) return std::numeric_limits<double>::infinity();
    return 0.5 * static_cast<double>(pages) * static_cast<double>(page_size);
  }();
  return bytes;
}

std::string BuildTables(const int32_t* coords, int64_t blocks, int64_t CB, int64_t KB,
                        int64_t block_size, BlockLayout* layout) {
  if (block_size < 1) return "block_size must be >= 1, got " + std::to_string(block_size);
  if (CB < 1 || KB < 1) {
    return "layout shape must be at least (1, 1) blocks, got (" + std::to_string(CB) + ", " +
           std::to_string(KB) + ")";
  }
  if (CB > INT32_MAX || KB > INT32_MAX) {  // block coordinates are int32
    return "layout shape (" + std::to_string(CB) + ", " + std::to_string(KB) +
           ") blocks is larger than int32 block coordinates can address";
  }
  if (blocks < 1) return "layout has no blocks: at least one nonzero block is required";
  if (blocks > CB * KB || blocks > INT32_MAX) {
    return "layout has " + std::to_string(blocks) + " blocks, more than its " +
           std::to_string(CB) + " x " + std::to_string(KB) + " shape holds";
  }
  // The tables below and their temporaries: two int32 per block row, two per block column
  // and at most seven per block.
  const double table_bytes = 4.0 * (2.0 * (CB + 1) + 2.0 * (KB + 1) + 7.0 * (blocks + 1));
  if (table_bytes > MaxTableBytes()) {
    return "the lookup tables of a layout of shape (" + std::to_string(CB) + ", " +
           std::to_string(KB) + ") blocks with " + std::to_string(blocks) + " blocks would take " +
           std::to_string(static_cast<int64_t>(table_bytes / (1 << 20))) +
           " MiB, more than half of this machine's memory";
  }
  layout->CB = CB;
  layout->KB = KB;
  layout->block_size = block_size;
  layout->blocks = blocks;
  layout->block_row.resize(blocks);
  layout->block_col.resize(blocks);
  layout->col_ptr.assign(KB + 1, 0);
  for (int64_t b = 0; b < blocks; ++b) {
    const int32_t c = coords[2 * b], k = coords[2 * b + 1];
    if (c < 0 || c >= CB || k < 0 || k >= KB) {
      return "block " + std::to_string(b) + " has coordinates (" + std::to_string(c) + ", " +
             std::to_string(k) + ") outside the layout shape (" + std::to_string(CB) + ", " +
             std::to_string(KB) + ")";
    }
    layout->block_row[b] = c;
    layout->block_col[b] = k;
    ++layout->col_ptr[k + 1];
  }
  for (int64_t k = 0; k < KB; ++k) layout->col_ptr[k + 1] += layout->col_ptr[k];

  // Counting sort by column, then by row inside each column: a stable pass over the blocks
  // sorted by row.  Sorting rows with a second counting sort keeps this linear.
  std::vector<int32_t> row_ptr(CB + 1, 0), by_row(blocks);
  for (int64_t b = 0; b < blocks; ++b) ++row_ptr[layout->block_row[b] + 1];
  for (int64_t c = 0; c < CB; ++c) row_ptr[c + 1] += row_ptr[c];
  for (int64_t b = 0; b < blocks; ++b) by_row[row_ptr[layout->block_row[b]]++] = (int32_t)b;

  std::vector<int32_t> fill(layout->col_ptr.begin(), layout->col_ptr.end() - 1);
  layout->col_row.resize(blocks);
  layout->col_block.resize(blocks);
  for (int32_t b : by_row) {
    const int32_t k = layout->block_col[b];
    const int32_t pos = fill[k]++;
    const int32_t start = layout->col_ptr[k];
    if (pos > start && layout->col_row[pos - 1] == layout->block_row[b]) {
      return "block " + std::to_string(b) + " at (" + std::to_string(layout->block_row[b]) +
             ", " + std::to_string(k) + ") appears twice in the layout";
    }
    layout->col_row[pos] = layout->block_row[b];
    layout->col_block[pos] = b;
  }
  // The row-major view: the blocks in column order, stably sorted by row (row_ptr now holds
  // each row's end, from the pass above).
  layout->row_ptr.assign(CB + 1, 0);
  for (int64_t c = 0; c < CB; ++c) layout->row_ptr[c + 1] = row_ptr[c];
  std::vector<int32_t>& row_fill = row_ptr;
  std::copy(layout->row_ptr.begin(), layout->row_ptr.end() - 1, row_fill.begin());
  layout->row_block.resize(blocks);
  for (int64_t q = 0; q < blocks; ++q) {
    layout->row_block[row_fill[layout->col_row[q]]++] = layout->col_block[q];
  }
  layout->rows_in_block_order = true;
  for (int64_t q = 0; q < blocks && layout->rows_in_block_order; ++q)
    layout->rows_in_block_order = layout->row_block[q] == q;
  bool flat_columns = block_size == 1 && blocks <= kFlatColumnEntries * KB;
  for (int64_t q = 0; q < blocks && flat_columns; ++q) flat_columns = layout->col_block[q] == q;
  if (flat_columns) {
    layout->col_of_entry.resize(blocks + 1);
    for (int64_t k = 0; k < KB; ++k) {
      std::fill(layout->col_of_entry.begin() + layout->col_ptr[k],
                layout->col_of_entry.begin() + layout->col_ptr[k + 1], static_cast<int32_t>(k));
    }
    layout->col_of_entry[blocks] = -1;
  }
  return "";
}

}  // namespace

std::string BuildBlockLayout(const int32_t* coords, int64_t blocks, int64_t CB, int64_t KB,
                             int64_t block_size, BlockLayout* layout) {
  // An absurd shape (a raw op called with a huge K) must give an error, not end the process.
  try {
    return BuildTables(coords, blocks, CB, KB, block_size, layout);
  } catch (const std::bad_alloc&) {
    return "the lookup tables of a layout of shape (" + std::to_string(CB) + ", " +
           std::to_string(KB) + ") blocks do not fit in memory";
  }
}

std::string BuildTransposedBlockLayout(const int32_t* coords, int64_t blocks, int64_t CB,
                                       int64_t KB, int64_t block_size, BlockLayout* layout) {
  std::vector<int32_t> swapped;
  try {
    swapped.resize(2 * std::max<int64_t>(blocks, 0));
  } catch (const std::bad_alloc&) {
    return "a transposed copy of a layout of " + std::to_string(blocks) +
           " blocks does not fit in memory";
  }
  for (int64_t b = 0; b < blocks; ++b) {
    swapped[2 * b] = coords[2 * b + 1];
    swapped[2 * b + 1] = coords[2 * b];
  }
  const std::string error = BuildBlockLayout(swapped.data(), blocks, KB, CB, block_size, layout);
  if (error.empty()) return error;
  // Checked again as given, so that the message names W's coordinates and shape.
  BlockLayout as_given;
  const std::string named = BuildBlockLayout(coords, blocks, CB, KB, block_size, &as_given);
  return named.empty() ? error : named;
}

bool CoarseLayoutOf(const BlockLayout& fine, int64_t coarse_bs, BlockLayout* coarse) {
  const int64_t bs = fine.block_size;
  if (bs < 1 || coarse_bs <= bs || coarse_bs % bs != 0) return false;
  const int64_t f = coarse_bs / bs;
  if (fine.CB % f != 0 || fine.KB % f != 0) return false;
  const int64_t KBc = fine.KB / f;
  try {
    std::vector<int64_t> keys(fine.blocks);  // row-major position on the coarse grid
    for (int64_t b = 0; b < fine.blocks; ++b)
      keys[b] = fine.block_row[b] / f * KBc + fine.block_col[b] / f;
    std::sort(keys.begin(), keys.end());
    keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
    std::vector<int32_t> coords(2 * keys.size());
    for (size_t q = 0; q < keys.size(); ++q) {
      coords[2 * q] = static_cast<int32_t>(keys[q] / KBc);
      coords[2 * q + 1] = static_cast<int32_t>(keys[q] % KBc);
    }
    return BuildBlockLayout(coords.data(), static_cast<int64_t>(keys.size()), fine.CB / f, KBc,
                            coarse_bs, coarse)
        .empty();
  } catch (const std::bad_alloc&) {
    return false;
  }
}

int64_t ColumnGroupRows(const int32_t* col_ptr, const int32_t* col_row, int64_t CB, int64_t KB,
                        int64_t blocks, int64_t cols) {
  if (cols < 1 || CB < 0 || KB < 0 || col_ptr[0] != 0 || col_ptr[KB] != blocks) return -1;
  std::vector<int64_t> last_group(CB, -1);  // the last group seen holding each block row
  int64_t rows = 0;
  for (int64_t k = 0; k < KB; ++k) {
    if (col_ptr[k] > col_ptr[k + 1] || col_ptr[k + 1] > blocks) return -1;
    for (int64_t e = col_ptr[k]; e < col_ptr[k + 1]; ++e) {
      const int32_t r = col_row[e];
      if (r < 0 || r >= CB) return -1;
      if (last_group[r] != k / cols) {  // groups are visited in order
        last_group[r] = k / cols;
        ++rows;
      }
    }
  }
  return rows;
}

}  // namespace blocksparse
