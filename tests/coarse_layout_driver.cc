// Reads cases from stdin and prints CoarseLayoutOf's tables, for tests/test_block_layout.py.
// Each case: coarse_bs CB KB bs blocks, then `blocks` (c, k) pairs.  Prints, per case, either
// "refused" or the cover's CB KB block_size blocks and then its tables, one per line:
// block_row, block_col, col_ptr, col_row, col_block, row_ptr, row_block.
#include <cstdint>
#include <iostream>
#include <vector>

#include "ops/block_layout.h"

namespace {

void PrintLine(const std::vector<int32_t>& values) {
  for (size_t i = 0; i < values.size(); ++i) std::cout << (i ? " " : "") << values[i];
  std::cout << "\n";
}

}  // namespace

int main() {
  int64_t coarse_bs, CB, KB, bs, blocks;
  while (std::cin >> coarse_bs >> CB >> KB >> bs >> blocks) {
    std::vector<int32_t> coords(2 * blocks);
    for (auto& v : coords) std::cin >> v;
    blocksparse::BlockLayout fine, cover;
    const std::string error =
        blocksparse::BuildBlockLayout(coords.data(), blocks, CB, KB, bs, &fine);
    if (!error.empty()) {
      std::cout << "bad layout: " << error << "\n";
      continue;
    }
    if (!blocksparse::CoarseLayoutOf(fine, coarse_bs, &cover)) {
      std::cout << "refused\n";
      continue;
    }
    std::cout << cover.CB << " " << cover.KB << " " << cover.block_size << " " << cover.blocks
              << "\n";
    for (const auto* table : {&cover.block_row, &cover.block_col, &cover.col_ptr,
                              &cover.col_row, &cover.col_block, &cover.row_ptr,
                              &cover.row_block})
      PrintLine(*table);
  }
  return 0;
}
