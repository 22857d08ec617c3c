// Reads cases from stdin and prints ColumnGroupRows for each, for tests/test_block_layout.py.
// Each case: CB KB blocks cols, then KB + 1 col_ptr entries and `blocks` col_row entries (a
// column view as given, valid or not).  Prints one number per case.
#include <cstdint>
#include <iostream>
#include <vector>

#include "ops/block_layout.h"

int main() {
  int64_t CB, KB, blocks, cols;
  while (std::cin >> CB >> KB >> blocks >> cols) {
    std::vector<int32_t> col_ptr(KB + 1), col_row(blocks);
    for (auto& v : col_ptr) std::cin >> v;
    for (auto& v : col_row) std::cin >> v;
    std::cout << blocksparse::ColumnGroupRows(col_ptr.data(), col_row.data(), CB, KB, blocks,
                                              cols)
              << "\n";
  }
  return 0;
}
