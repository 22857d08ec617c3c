#include "ops/sparse_dot_cpu.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "ops/blocksparse_matmul_cpu_isa.h"

namespace blocksparse {
namespace {

// Output features per forward task, at most.  A task reads x's active rows once for all of
// its output blocks, so wider tasks read x fewer times (its y panels, 1024 rows by the task's
// width, take more room); each weight row is read in runs of 4 KiB, long enough for the
// hardware prefetchers.  Narrower layers get at least kForwardTasksPerThread tasks per thread,
// so every thread gets work.  Measured on a 2-core Zen 5 (1024 x 4096 x 4096, the two versions
// in alternating processes, four rounds, median forward ms): 512 features and at least 8 tasks
// against 1024 features (4 tasks): 25%/25% bs 16 35.0 -> 31.0, bs 32 22.5 -> 19.2, bs 64
// 15.1 -> 14.6; 25% in / 100% out bs 64 33.5 -> 31.0; 100% in / 25% out bs 64 32.8 -> 30.6;
// 10%/10% within 3%.  2048 features (2 tasks) measured slower at 50%/50% (bs 32 42.7 -> 60.1).
constexpr int64_t kOutputFeaturesPerTask = 1024;
constexpr int64_t kForwardTasksPerThread = 2;
// Input features the forward visits together for each output block when w is read transposed.
constexpr int64_t kTransposedInputFeaturesPerGroup = 512;
// Examples the forward works on at a time (a multiple of 64): its row panels hold this many
// rows, at most 4 MiB per thread.
constexpr int64_t kPanelRows = 1024;
// Examples per block pair, on average, from which the forward copies rows into panels rather
// than reading x and y where they lie.  Measured on a 2-core Zen 4 (1024 x 4096 x 4096, ms in
// place / with panels): about 10 per pair (10% active both sides) bs 32 10.9 / 13.4, bs 64
// 8.6 / 9.1; about 64 (25%) bs 32 29.5 / 24.7, bs 64 19.8 / 19.3; about 256 (50%) bs 16
// 149.5 / 93.5, bs 32 81.9 / 64.1.
constexpr int64_t kMinExamplesPerPairForPanels = 24;
// Up to this size of x, the forward gathers x's active rows once into panels shared by all its
// tasks, rather than each task gathering the rows it needs (x once per task where the input
// mask is full).  Measured on a 2-core Zen 4 (1024 x 4096 x 4096, the two versions in
// alternating processes, fastest of 20 calls each): 1.00-1.14x in the 13 cells of
// benchmarks/bench_sparse_dot.py that use panels, e.g. bs 16 at 25%/25% 39.6 -> 35.0 ms, bs 32
// at 25%/25% 26.3 -> 24.7, bs 64 at 100% in / 25% out 57.3 -> 54.4.
constexpr int64_t kSharedPanelsMaxBytes = int64_t{64} << 20;
// Output features the forward computes together where every example of a row chunk is active
// in every block (their weight columns packed).  A row tile's x rows
// then go through all of them from L2 before the next tile's are fetched: x streams from L3 or
// memory once per this many features.  Measured on a 2-core Zen 5 (1024 x 4096 x 4096, every
// block active; the settings in alternating processes, three rounds; median ms for bs 16, 32
// and 64): 32 features (one block for bs 64) 160, 116, 101; 128 110, 105, 96; 256 99, 98, 92;
// 512 113, 110, 100.
constexpr int64_t kFullRowsFeatures = 256;
// Input features each such pass covers per call of the product: the packed columns of a call
// (256 x 512 floats, 512 KiB) then stay in L2 while every row tile of the chunk goes through
// them, where all input features (4 MiB at 4096) streamed from L3 for each row tile; the sums
// go on from y's values in the next call, the same sums in the same order.  Measured on a
// 2-core Intel Xeon (AVX-512, 2 MiB of L2 per core; 1024 x 4096 x 4096, every block active,
// forward, the settings in alternating processes, three rounds, fastest ms): bs 32 316 / 347 /
// 324 -> 175 / 236 / 249, bs 16 345 / 350 / 330 -> 255 / 237 / 235; 1024 features per call
// 283 / 233 / 239 and 233 / 248 / 236; 64 output features over all inputs 257 / 240 / 181 and
// 249 / 254 / 205.  Not measured on the Zen 5 that chose kFullRowsFeatures.
constexpr int64_t kFullRowsInputFeatures = 512;
// Input features a call of the forward covers at once where every example of a row chunk is
// active in every input block (x's panel rows of those blocks, and their weight blocks packed
// one under another): y's rows go through registers once per kFusedInputFeatures instead of
// once per block, and each output block's examples are listed once per call instead of once
// per block pair.  Measured on a 2-core Zen 4 (1024 x 4096 x 4096, every input active, 25% of
// the outputs; each setting in its own process, alternated, three rounds; ms): bs 16 with 1,
// 4, 8 or 16 blocks per call 76-114, 64-74, 73-80, 70-80, against 91-102 for the block pairs;
// bs 32 with 16 blocks 63-72 against 74-78; bs 64 with 4 blocks 54-59 against 59-65.  Input
// blocks stay the outer loop (x's panels of a call are read for all the task's output blocks);
// with output blocks outside, every input block inside, each output block re-read all of x
// (bs 16: 143-194 ms).
constexpr int64_t kFusedInputFeatures = 256;

// Examples per mask word that the forward lists without branching (see
// ActiveExamples::ActiveInBoth).  Measured on a 2-core Zen 5 (1024 x 4096 x 4096, the two
// versions in alternating processes, four rounds, median ms): forward at 10%/10% bs 16 10.8 ->
// 9.8, its transposed product 11.7 -> 10.9, bs 32 7.5 -> 7.2, other activities within 2%; 8
// per word was slower.  The weight gradient, whose calls are otherwise cheaper, lists them in a
// plain loop: there the same listing made bs 16 at 10%/10% slower (7.3 -> 9.2 ms).
constexpr int kForwardBranchlessBits = 4;

// Examples per 64-row word of a block pair, on average, from which pairs' examples are listed
// by the kernels' list_in_both (vector code, no branch on the bits) rather than
// ActiveExamples::ActiveInBoth's loops.  Measured on a 2-core Zen 5 (1024 x 4096 x 4096, the
// two listings in alternating processes, four rounds, median ms): 16 per word (50%/50%)
// forward bs 16 59.5 -> 51.7, bs 32 38.0 -> 35.1, weight gradient bs 16 86.0 -> 81.9; 4 per
// word (25%/25%) forward bs 16 24.2 -> 21.7, bs 32 14.5 -> 13.7, weight gradient bs 16 25.7 ->
// 24.4; 0.64 per word (10%/10%) slower: forward bs 16 10.0 -> 10.8, weight gradient 8.1 -> 10.7.
// AVX2's list_in_both (a table lookup per 8 bits), on a 2-core AMD EPYC (the two listings
// alternated in one process, 6 rounds, median forward ms): 50%/50% bs 16 154.1 -> 145.8,
// 25%/25% bs 16 69.8 -> 66.0, bs 32 47.4 -> 46.1; from 0.5 per word, 10%/10% bs 16 23.5 ->
// 25.2; its weight gradient within the noise.
constexpr double kCompressedListMinPerWord = 2.0;

// Whether block pairs that share per_pair examples on average over `words` mask words are
// listed by kernels.list_in_both (see kCompressedListMinPerWord).
bool ListsCompressed(const CpuKernels& kernels, double per_pair, int64_t words) {
  return kernels.list_in_both != nullptr &&
         per_pair >= kCompressedListMinPerWord * static_cast<double>(words);
}

// For every block column of a mask, the examples where it is active, as 64-bit words of bits.
class ActiveExamples {
 public:
  ActiveExamples(const float* mask, int64_t n, int64_t blocks)
      : words_((n + 63) / 64), bits_(blocks * words_, 0) {
    for (int64_t r = 0; r < n; ++r) {
      const float* row = mask + r * blocks;
      for (int64_t b = 0; b < blocks; ++b) {
        if (row[b] != 0.f) bits_[b * words_ + r / 64] |= uint64_t{1} << (r % 64);
      }
    }
  }

  int64_t words() const { return words_; }
  // Block b's words.
  const uint64_t* Words(int64_t b) const { return bits_.data() + b * words_; }
  // Examples [64 word, 64 word + 64) of block b.
  uint64_t Word(int64_t b, int64_t word) const { return bits_[b * words_ + word]; }
  // The examples of words [w0, w1) active in block b.
  int64_t Count(int64_t b, int64_t w0, int64_t w1) const {
    int64_t count = 0;
    for (int64_t word = w0; word < w1; ++word) count += __builtin_popcountll(Word(b, word));
    return count;
  }

  // Whether some example of words [w0, w1) is active in both this mask's block b and other's
  // block other_b.
  bool AnyInBoth(int64_t b, const ActiveExamples& other, int64_t other_b, int64_t w0,
                 int64_t w1) const {
    for (int64_t word = w0; word < w1; ++word) {
      if (Word(b, word) & other.Word(other_b, word)) return true;
    }
    return false;
  }

  // Whether every example of [r0, r1) is active in every block of [b0, b1).
  bool AllActive(int64_t b0, int64_t b1, int64_t r0, int64_t r1) const {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t word = r0 / 64; word * 64 < r1; ++word) {
        const int64_t lo = std::max(r0 - word * 64, int64_t{0});
        const int64_t hi = std::min(r1 - word * 64, int64_t{64});
        const uint64_t width = hi - lo == 64 ? ~uint64_t{0} : (uint64_t{1} << (hi - lo)) - 1;
        const uint64_t want = width << lo;
        if ((Word(b, word) & want) != want) return false;
      }
    }
    return true;
  }

  // Writes the examples of words [w0, w1) active in both this mask's block b and other's
  // block other_b, ascending, counted from example 64 w0, to rows (room for 64 (w1 - w0));
  // returns how many.  A plain array, not push_back, so the loop stays in registers.  Each
  // word's first kBranchlessBits entries are written whether or not the word has that many
  // examples (an entry is kept by advancing the count only where the word had one; the others
  // stay within the word's own 64 places, overwritten or past the count): at low activity most
  // words hold none or one example, at random, and a loop over their bits mispredicts.
  template <int kBranchlessBits = 0>
  int64_t ActiveInBoth(int64_t b, const ActiveExamples& other, int64_t other_b, int64_t w0,
                       int64_t w1, int32_t* rows) const {
    int64_t count = 0;
    for (int64_t word = w0; word < w1; ++word) {
      const int32_t first = static_cast<int32_t>((word - w0) * 64);
      uint64_t both = Word(b, word) & other.Word(other_b, word);
      for (int t = 0; t < kBranchlessBits; ++t) {
        // Bit 63 set so that an exhausted word gives a harmless entry at the count.
        rows[count] = first + __builtin_ctzll(both | uint64_t{1} << 63);
        count += both != 0;
        both &= both - 1;
      }
      for (; both; both &= both - 1) rows[count++] = first + __builtin_ctzll(both);
    }
    return count;
  }

 private:
  int64_t words_;
  std::vector<uint64_t> bits_;
};

// Bytes of y's panel rows that the forward's block pairs go on adding into while every input
// block passes (with input blocks outside, output blocks inside): a task's output blocks run
// in passes whose active panel rows fit in this much, so that they stay in L2 between input
// blocks rather than stream from L3 once per input block; x's shared panels are then read
// once per pass.  Blocks up to kPairPassMaxBlockSize wide.  Measured on a 2-core Intel Xeon
// (AVX-512, 2 MiB of L2 per core; sparse_dot forward, 1024 x 4096 x 4096, one task's whole
// range against passes of 512 KiB in alternating processes, fastest ms): bs 16 at 50%/50%
// 104-115 -> 81-88, 35%/35% 58-59 -> 49-52, 25%/25% 37-39 -> 31-36; bs 8 at 50%/50% 196-205 ->
// 148-159, 25%/25% 70-71 -> 63-65; bs 32 at 50%/50% 59-63 -> 53-59.  bs 64 measured 0.91-1.00x
// (its pairs' products are longer per row of y), and passes of 256 KiB or 1 MiB no better.
// With w read transposed the input blocks already go in groups
// (kTransposedInputFeaturesPerGroup), and passes measured no faster there.  Since rows are
// prefetched (PackedRowsOp::RunRows), passes of 1 MiB measured faster than 512 KiB on a
// 2-core AMD EPYC (AVX2, 512 KiB of L2 per core, 32 MiB of L3; the two alternated in one
// process, 6 rounds, median ms): bs 16 at 25%/25% 67.5 -> 63.9, 50%/50% 180.1 -> 172.9, bs 32
// at 50%/50% 117.1 -> 108.8, 25%/25% 46.9 -> 43.5 (2 MiB and a task's whole range about as
// fast as 1 MiB there, 256 and 128 KiB slower); on the Xeon above 1 MiB measured as 512 KiB.
constexpr int64_t kPairPassBytes = int64_t{1} << 20;
constexpr int64_t kPairPassMaxBlockSize = 32;

// The end of a pass of the forward's block pairs starting at output block ja (< j1): the
// blocks from ja whose active examples in words [w0, w1), bs floats each, fit in `bytes`; at
// least one.
int64_t PairPassEnd(const ActiveExamples& out, int64_t ja, int64_t j1, int64_t w0, int64_t w1,
                    int64_t bs, int64_t bytes) {
  int64_t used = 0, jb = ja;
  for (; jb < j1; ++jb) {
    used += out.Count(jb, w0, w1) * bs * static_cast<int64_t>(sizeof(float));
    if (used > bytes && jb > ja) break;
  }
  return jb;
}

// Calls f(r) for every set bit r of the `count` words word(0), word(1), ... (bit r % 64 of
// word r / 64), in increasing r.
template <typename Word, typename F>
void ForEachSetBit(int64_t count, const Word& word, const F& f) {
  for (int64_t k = 0; k < count; ++k) {
    for (uint64_t bits = word(k); bits; bits &= bits - 1) f(k * 64 + __builtin_ctzll(bits));
  }
}

// panels[(i n + r) bs ..] = x's row r, input block i (x is (n, m)), for the rows r active in
// block i (other rows are left unwritten: the products read active rows only).  One task per
// input block.
void GatherActiveBlocks(const float* x, int64_t n, int64_t m, int64_t bs,
                        const ActiveExamples& active, float* panels,
                        const ParallelFor& parallel_for) {
  parallel_for(m / bs, n * bs, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* const panel = panels + i * n * bs;
      ForEachSetBit(
          active.words(), [&](int64_t word) { return active.Word(i, word); },
          [&](int64_t r) { std::copy_n(x + r * m + i * bs, bs, panel + r * bs); });
    }
  });
}

// A float buffer whose start is aligned to a cache line, so rows of 16 floats are whole lines.
// Its contents start undefined: the forward writes every element it reads, and zero-filling
// megabytes of panels on every call would cost more than a sparse product.
class AlignedFloats {
 public:
  float* Get(int64_t count) {
    if (capacity_ < count + kLineFloats) {
      storage_.reset(new float[count + kLineFloats]);
      capacity_ = count + kLineFloats;
    }
    const uintptr_t address = reinterpret_cast<uintptr_t>(storage_.get());
    return storage_.get() + (-(address / sizeof(float)) & (kLineFloats - 1));
  }

 private:
  std::unique_ptr<float[]> storage_;
  int64_t capacity_ = 0;
};

// Features of x and of dy one weight-gradient task covers: the task's slices of both (n x 256
// each, where active) are read from memory once and reused from cache by all its blocks.
constexpr int64_t kGradFeaturesPerTask = 256;
// At most this much of a task's rows of x and dy is gathered at once where every example is
// active (1024 examples of 256 features each way take 2 MiB).
constexpr int64_t kFullGradPanelsMaxBytes = int64_t{16} << 20;

// Runs work(&scratch, i0, i1, j0, j1) over the thread pool for tiles of row_tile block rows by
// col_tile block columns covering row_blocks x col_blocks; `cost` is the flop estimate of one
// tile.  Each run of consecutive tiles shares one Scratch, so its buffers are allocated (and
// their pages touched) once per run rather than once per tile.  Consecutive tiles share their
// block rows, or with columns_outer their block columns.
template <typename Scratch, typename Work>
void ForTiles(int64_t row_blocks, int64_t row_tile, int64_t col_blocks, int64_t col_tile,
              int64_t cost, const ParallelFor& parallel_for, const Work& work,
              bool columns_outer = false) {
  const int64_t row_tiles = (row_blocks + row_tile - 1) / row_tile;
  const int64_t col_tiles = (col_blocks + col_tile - 1) / col_tile;
  parallel_for(row_tiles * col_tiles, cost, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row_tile_index = columns_outer ? task % row_tiles : task / col_tiles;
      const int64_t col_tile_index = columns_outer ? task / row_tiles : task % col_tiles;
      const int64_t i0 = row_tile_index * row_tile, j0 = col_tile_index * col_tile;
      work(&scratch, i0, std::min(row_blocks, i0 + row_tile), j0,
           std::min(col_blocks, j0 + col_tile));
    }
  });
}

// Per-thread buffers of the forward: the examples of one block pair, one packed weight block,
// and the row panels of the examples being worked on (see SparseDotCpu).
struct ForwardScratch {
  std::vector<int32_t> rows;
  std::vector<uint64_t> task_rows;
  AlignedFloats packed, x_panels, y_panels;
  AlignedFloats columns;  // weight columns of fully active chunks, packed
};

// Per-thread buffers of the weight gradient: the examples of one block pair, and their rows of
// x and dy gathered into contiguous panels, which the product reads sequentially.
struct GradWScratch {
  std::vector<int32_t> rows;
  std::vector<float> x_panel, dy_panel;
  // MaskedWideGradW's wide side with inactive blocks zeroed, kept for the next tile of the
  // same blocks (masked_key: x's side or dy's, and the first block; -1 when none).
  std::vector<float> masked, result;
  int64_t masked_key[2] = {-1, -1};
};

// Where the forward's weight blocks live: W's block (i, j) is w's block (i, j), or with
// transpose_w the transpose of w's block (j, i).
struct WeightBlocks {
  const float* w;
  int64_t m, p, bs;
  bool transpose_w;

  const float* Source(int64_t i, int64_t j) const {
    return transpose_w ? w + j * bs * m + i * bs : w + i * bs * p + j * bs;
  }
  int64_t SourceRowStride() const { return transpose_w ? m : p; }

  // W's blocks (i, j) for i in [i0, i1), j in [j0, j1), packed into dst as one matrix of
  // (i1 - i0) bs rows and (j1 - j0) bs columns (row stride (j1 - j0) bs), block by block in
  // row-major order, each packing prefetching the next block.
  void PackRange(const CpuKernels& kernels, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                 float* dst) const {
    const int64_t width = (j1 - j0) * bs, rs = SourceRowStride();
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = j0; j < j1; ++j) {
        const bool last = i + 1 == i1 && j + 1 == j1;
        const float* next = last ? Source(i, j) : j + 1 < j1 ? Source(i, j + 1) : Source(i + 1, j0);
        kernels.pack_block(Source(i, j), rs, bs, transpose_w, next,
                           dst + (i - i0) * bs * width + (j - j0) * bs, width);
      }
    }
  }
};

// Rows up to which a weight block is read where it lies instead of packed: each of its rows is
// then read from memory once either way, and a copy would only add work.
constexpr int64_t kRowsReadInPlace = 4;

// Asks for the bs rows (stride rs) of the block at src to be brought into the cache.
void PrefetchBlock(const float* src, int64_t rs, int64_t bs) {
  for (int64_t r = 0; r < bs; ++r, src += rs) {
    for (int64_t c = 0; c < bs; c += kLineFloats) __builtin_prefetch(src + c);
  }
}

// The examples of words [w0, w1) (`rows` of them) active in both an input block of
// [i0, i1) and an output block of [j0, j1), per block pair, on average, as if the masks were
// independent: (active input entries) x (active output entries) / (pairs x rows).
double ExamplesPerPair(const ActiveExamples& in, int64_t i0, int64_t i1,
                       const ActiveExamples& out, int64_t j0, int64_t j1, int64_t w0, int64_t w1,
                       int64_t rows) {
  auto active_entries = [&](const ActiveExamples& mask, int64_t b0, int64_t b1) {
    int64_t count = 0;
    for (int64_t b = b0; b < b1; ++b) count += mask.Count(b, w0, w1);
    return static_cast<double>(count);
  };
  const double pairs_rows = static_cast<double>((i1 - i0) * (j1 - j0)) * static_cast<double>(rows);
  return pairs_rows > 0 ? active_entries(in, i0, i1) * active_entries(out, j0, j1) / pairs_rows
                        : 0.0;
}

// The active examples of each of a mask's blocks.
std::vector<int64_t> ActiveCounts(const ActiveExamples& mask, int64_t blocks) {
  std::vector<int64_t> counts(blocks, 0);
  for (int64_t b = 0; b < blocks; ++b) counts[b] = mask.Count(b, 0, mask.words());
  return counts;
}

// The share of the entries (block b in [b0, b1), example r < n) that are active.
double ActiveShare(const std::vector<int64_t>& counts, int64_t b0, int64_t b1, int64_t n) {
  int64_t active = 0;
  for (int64_t b = b0; b < b1; ++b) active += counts[b];
  return b1 > b0 && n > 0 ? static_cast<double>(active) / static_cast<double>((b1 - b0) * n)
                          : 0.0;
}

// Whether none of the `count` floats at p is an infinity or a NaN (exponent bits all set).
bool AllFinite(const float* p, int64_t count) {
  uint32_t non_finite = 0;
  for (int64_t q = 0; q < count; ++q) {
    uint32_t bits;
    std::memcpy(&bits, p + q, sizeof(bits));
    non_finite |= (bits & 0x7f800000u) == 0x7f800000u;
  }
  return non_finite == 0;
}

// The most memory the weight gradient takes for a copy of x's or dy's active entries.
constexpr int64_t kCompactBlocksMaxBytes = int64_t{256} << 20;

// The active rows of each block of x or dy (n x features), gathered once for every tile of
// the weight gradient that runs MaskedWideGradW: block b's rows follow each other from
// rows[offsets[b]], bs floats each.
struct CompactBlocks {
  std::vector<int64_t> offsets;
  std::unique_ptr<float[]> rows;
  std::vector<uint8_t> finite;  // whether block b's active entries hold no infinity or NaN

  // False where the memory (the active entries: at most x's or dy's size) would pass
  // kCompactBlocksMaxBytes or cannot be had.
  bool Gather(const float* data, int64_t n, int64_t features, int64_t bs,
              const ActiveExamples& active, const std::vector<int64_t>& counts,
              const ParallelFor& parallel_for) {
    const int64_t blocks = features / bs;
    offsets.assign(blocks + 1, 0);
    for (int64_t b = 0; b < blocks; ++b) offsets[b + 1] = offsets[b] + counts[b] * bs;
    if (offsets[blocks] * static_cast<int64_t>(sizeof(float)) > kCompactBlocksMaxBytes) {
      return false;
    }
    rows.reset(new (std::nothrow) float[offsets[blocks]]);
    if (rows == nullptr) return false;
    finite.assign(blocks, 0);
    parallel_for(blocks, n * bs, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        float* dst = rows.get() + offsets[b];
        ForEachSetBit(
            active.words(), [&](int64_t word) { return active.Word(b, word); },
            [&](int64_t r) {
              std::copy_n(data + r * features + b * bs, bs, dst);
              dst += bs;
            });
        finite[b] = AllFinite(rows.get() + offsets[b], offsets[b + 1] - offsets[b]);
      }
    });
    return true;
  }

  bool AllFiniteIn(int64_t b0, int64_t b1) const {
    return std::all_of(finite.begin() + b0, finite.begin() + b1, [](uint8_t f) { return f != 0; });
  }
};

// One side of a tile of the weight gradient: x's input blocks or dy's output blocks [b0, b1)
// (data is n x features) and the mask saying which examples are active in each.
struct GradSide {
  const float* data;
  int64_t features;
  const ActiveExamples* active;
  int64_t b0, b1;
};

// Columns of dw each panel_grad_w call of a weight-gradient tile covers, where its output
// blocks' dy rows lie side by side (width floats): 8- and 16-wide blocks as one product over
// the whole width, since a bs-16 block alone is one AVX-512 vector wide and takes a broadcast
// per multiply-add; wider blocks block by block.  Measured on a 2-core Intel Xeon (every
// example active, 1024 x 4096 x 4096, the weight gradient alone, fastest ms of alternating
// processes, block by block -> wide): bs 8 552-612 -> 445-474, bs 16 377-393 -> 285-331; bs 32
// 252-285 -> 301-309, bs 64 260-268 -> 281-301 (their register tiles are already two vectors
// wide, and the wide ones read twice the bytes per multiply-add).  The kernel's widths are
// multiples of 8 or one block.
int64_t GradWColumnsPerCall(int64_t bs, int64_t width) {
  return bs < 32 && width % 8 == 0 ? width : bs;
}

// The share of active entries on one side of a weight-gradient tile from which the tile runs
// as MaskedWideGradW's products rather than block pairs (above 1: never).  Measured on a
// 2-core Intel Xeon (1024 x 4096 x 4096, the weight gradient alone, both masks at the given
// activity, fastest ms of two processes each, pairs / masked wide): bs 8 at 10% 93-95 / 84-89,
// 25% 282-295 / 143-146, 35% 418-545 / 160-176; bs 16 at 25% 46-62 / 76-96, 30% 86-89 /
// 94-111, 35% 97-124 / 97-122.  Blocks of 32 or more are already two or more vectors wide
// and their block pairs measured faster, the masked products doing the zero terms too
// (50%/50% bs 32 108-120 against 164-169 ms, bs 64 82-83 against 168-179; with one side
// fully active within the noise).  bs 1 (n = 1024, m = p = 512): 50%/50% 376 / 27, 25%/25%
// 118 / 19, 10%/10% 61-70 / 13-15, 3%/3% 18-20 / 11-16.
double MaskedWideMinShare(int64_t bs) {
  return bs == 1 ? 0.0 : bs <= 8 ? 0.2 : bs < 32 ? 0.4 : 2.0;
}

// dw's blocks (i, j) of a tile (i over x's side, j over dy's), each block b of the `narrow`
// side as one product over the examples active in it: its rows of the narrow side times the
// same rows of the `wide` side's blocks side by side, where blocks inactive for an example
// are zero.  That multiplies the zero terms the block pairs skip (the wide side's inactive
// share more multiply-adds), but in register tiles several vectors wide and with each block's
// rows gathered once rather than once per pair.  The zero terms leave every sum bitwise as
// the pairs make it (the examples in the same order; s + 0 is s, and no pair sum is -0) as
// long as the narrow side's active entries are finite (infinity times zero is NaN), which the
// caller checks (narrow_rows.finite).  With the narrow side dy, each product is the transpose
// of dw's blocks and is written turned around.
void MaskedWideGradW(const CpuKernels& kernels, const GradSide& narrow,
                     const CompactBlocks& narrow_rows, const GradSide& wide, bool narrow_is_x,
                     int64_t n, int64_t bs, float* dw, int64_t p, GradWScratch* scratch) {
  const int64_t width = (wide.b1 - wide.b0) * bs;
  std::vector<float>& masked = scratch->masked;
  const int64_t key[2] = {narrow_is_x ? 0 : 1, wide.b0};
  if (key[0] != scratch->masked_key[0] || key[1] != scratch->masked_key[1]) {
    masked.resize(n * width);
    for (int64_t r = 0; r < n; ++r) {  // a row at once, then its inactive blocks zeroed
      float* dst = masked.data() + r * width;
      std::copy_n(wide.data + r * wide.features + wide.b0 * bs, width, dst);
      for (int64_t b = wide.b0; b < wide.b1; ++b, dst += bs) {
        if ((wide.active->Word(b, r / 64) >> (r % 64) & 1) == 0) std::fill_n(dst, bs, 0.f);
      }
    }
    scratch->masked_key[0] = key[0];
    scratch->masked_key[1] = key[1];
  }
  std::vector<int32_t>& rows = scratch->rows;
  const int64_t step = GradWColumnsPerCall(bs, width);
  for (int64_t b = narrow.b0; b < narrow.b1; ++b) {
    int64_t count = 0;
    ForEachSetBit(
        narrow.active->words(), [&](int64_t word) { return narrow.active->Word(b, word); },
        [&](int64_t r) { rows[count++] = static_cast<int32_t>(r); });
    float* out = dw + b * bs * p + wide.b0 * bs;
    int64_t out_rs = p;
    if (!narrow_is_x) {
      scratch->result.resize(bs * width);
      out = scratch->result.data();
      out_rs = width;
    }
    if (count == 0) {
      for (int64_t s = 0; s < bs; ++s) std::fill_n(out + s * out_rs, width, 0.f);
    } else {
      const float* panel = narrow_rows.rows.get() + narrow_rows.offsets[b];
      for (int64_t c = 0; c < width; c += step) {
        kernels.panel_grad_w(panel, masked.data() + c, width, rows.data(), step, count, bs,
                             out + c, out_rs, /*stream=*/narrow_is_x);
      }
    }
    if (!narrow_is_x) {  // out[s][t] is dw[wide.b0 bs + t][b bs + s]
      for (int64_t t = 0; t < width; ++t) {
        float* dst = dw + (wide.b0 * bs + t) * p + b * bs;
        for (int64_t s = 0; s < bs; ++s) dst[s] = out[s * width + t];
      }
    }
  }
}

}  // namespace

void SparseDotCpu(const float* x, const float* w, const float* in_mask, const float* out_mask,
                  float* y, int64_t n, int64_t m, int64_t p, int64_t bs, bool transpose_w,
                  int64_t threads, const ParallelFor& parallel_for) {
  const CpuKernels& kernels = BestCpuKernels();
  const int64_t in_blocks = m / bs, out_blocks = p / bs;
  const ActiveExamples active_in(in_mask, n, in_blocks);
  const ActiveExamples active_out(out_mask, n, out_blocks);
  const WeightBlocks weights{w, m, p, bs, transpose_w};
  // A task owns a range of output block columns, so each element of y has one writer.  The
  // split follows the thread count (see kOutputFeaturesPerTask), but not the results: every
  // path below makes each element's sums in the same order whatever the task's range.
  const int64_t min_tasks = kForwardTasksPerThread * std::max<int64_t>(1, threads);
  const int64_t blocks_per_task = std::max<int64_t>(
      1, std::min(kOutputFeaturesPerTask / bs, out_blocks / min_tasks));
  // Input blocks visited together for each output block: with w read transposed, w's block
  // (j, i) is followed by (j, i + 1), the next run of the same rows, so each row of w is read
  // in 2 KiB runs rather than one block width at a time.
  const int64_t group =
      transpose_w ? std::max<int64_t>(1, kTransposedInputFeaturesPerGroup / bs) : 1;
  const int64_t chunk_rows = std::min<int64_t>(kPanelRows, (n + 63) / 64 * 64);
  // Where block pairs share enough examples overall, x's active rows are gathered once into
  // panels that every task reads (null otherwise: each task gathers its own, see gather_x).
  // Their last block's panel is followed by a zeroed row tile, which full_rows_forward's last
  // tile may read.
  std::unique_ptr<float[]> shared_storage;
  if (n * m * static_cast<int64_t>(sizeof(float)) <= kSharedPanelsMaxBytes &&
      ExamplesPerPair(active_in, 0, in_blocks, active_out, 0, out_blocks, 0, active_in.words(),
                      n) >= kMinExamplesPerPairForPanels) {
    const int64_t pad = kernels.row_tile * bs;
    shared_storage.reset(new (std::nothrow) float[n * m + pad]);
    if (shared_storage) {
      std::fill_n(shared_storage.get() + n * m, pad, 0.f);
      GatherActiveBlocks(x, n, m, bs, active_in, shared_storage.get(), parallel_for);
    }
  }
  const float* const shared = shared_storage.get();
  // The block sizes full_rows_forward takes (fully active chunks, below).
  const bool dense_tiles = bs == 8 || bs == 16 || bs == 32 || bs == 64;
  ForTiles<ForwardScratch>(
      1, 1, out_blocks, blocks_per_task, 2 * n * m * bs * blocks_per_task / 4, parallel_for,
      [&](ForwardScratch* scratch, int64_t, int64_t, int64_t j0, int64_t j1) {
    std::vector<int32_t>& rows = scratch->rows;
    // Room for any chunk's examples (a multiple of 64) and what list_in_both writes past them.
    rows.resize(chunk_rows + kRowListSlack);
    std::vector<uint64_t>& task_rows = scratch->task_rows;
    // Row r of a chunk sits at r * bs in its panels: x's input block i at x_panel(i), y's
    // output block j at y_panel(j).  Contiguous rows, unlike x's and y's own rows of m or p
    // floats apart (a page or more at common widths), whose blocks would each take a TLB entry
    // and collide in the same cache sets; worth their copies where block pairs share enough
    // examples.
    float* const x_panels = shared ? nullptr : scratch->x_panels.Get(group * chunk_rows * bs);
    float* const y_panels = scratch->y_panels.Get((j1 - j0) * chunk_rows * bs);
    float* const packed = scratch->packed.Get(bs * bs);
    auto x_panel = [&](int64_t i) { return x_panels + i % group * chunk_rows * bs; };
    auto y_panel = [&](int64_t j) { return y_panels + (j - j0) * chunk_rows * bs; };
    for (int64_t r0 = 0; r0 < n; r0 += chunk_rows) {
      const int64_t r1 = std::min(n, r0 + chunk_rows);
      const int64_t w0 = r0 / 64, w1 = (r1 + 63) / 64;
      // Every example of the chunk active in every block of both masks: a dense product of the
      // chunk's rows, from the shared panels, whose sums stay in registers across input blocks
      // (the same sums, in the same order, as the block pairs below would make).
      if (dense_tiles && shared && active_in.AllActive(0, in_blocks, r0, r1) &&
          active_out.AllActive(j0, j1, r0, r1)) {
        // Output blocks side by side, kFullRowsFeatures at a time (see there).
        const int64_t per_pass = std::max<int64_t>(1, kFullRowsFeatures / bs);
        // Input blocks per call (see kFullRowsInputFeatures).
        const int64_t depth =
            std::min(in_blocks, std::max<int64_t>(1, kFullRowsInputFeatures / bs));
        float* const columns = scratch->columns.Get(depth * bs * per_pass * bs);
        for (int64_t ja = j0; ja < j1; ja += per_pass) {
          const int64_t jb = std::min(j1, ja + per_pass), width = (jb - ja) * bs;
          for (int64_t g0 = 0; g0 < in_blocks; g0 += depth) {
            const int64_t g1 = std::min(in_blocks, g0 + depth);
            weights.PackRange(kernels, g0, g1, ja, jb, columns);
            kernels.full_rows_forward(shared + (g0 * n + r0) * bs, n, g1 - g0, bs, columns, width,
                                      y + r0 * p + ja * bs, p, r1 - r0, g0 > 0);
          }
        }
        continue;
      }
      const double per_pair =
          ExamplesPerPair(active_in, 0, in_blocks, active_out, j0, j1, w0, w1, r1 - r0);
      const bool panels = per_pair >= kMinExamplesPerPairForPanels;
      const bool compressed_lists = ListsCompressed(kernels, per_pair, w1 - w0);
      // Every example of the chunk active in every input block, or else in every output block
      // of the task (x in the shared panels either way): see the products below.
      const bool in_full = panels && shared && active_in.AllActive(0, in_blocks, r0, r1);
      const bool wide = panels && shared && !in_full && active_out.AllActive(j0, j1, r0, r1);
      // Where the products read x's block i and add into y's block j, with their row strides.
      auto x_rows = [&](int64_t i) -> const float* {
        if (!panels) return x + r0 * m + i * bs;
        return shared ? shared + (i * n + r0) * bs : x_panel(i);
      };
      auto y_rows = [&](int64_t j) { return panels ? y_panel(j) : y + r0 * p + j * bs; };
      const int64_t x_rs = panels ? bs : m, y_rs = panels ? bs : p;
      // The chunk's examples active in some output block of the task: only their x rows are
      // gathered.
      task_rows.assign(w1 - w0, 0);
      for (int64_t j = j0; j < j1; ++j) {
        auto active = [&](int64_t k) { return active_out.Word(j, w0 + k); };
        for (int64_t k = 0; k < w1 - w0; ++k) task_rows[k] |= active(k);
        // The panel rows the products add to start from zero (the task-wide rows below).
        if (panels && !wide) {
          ForEachSetBit(w1 - w0, active,
                        [&](int64_t row) { std::fill_n(y_panel(j) + row * bs, bs, 0.f); });
        }
      }
      if (!panels) {
        for (int64_t r = r0; r < r1; ++r) std::fill(y + r * p + j0 * bs, y + r * p + j1 * bs, 0.f);
      }
      auto gather_x = [&](int64_t i) {
        auto gathered = [&](int64_t k) { return active_in.Word(i, w0 + k) & task_rows[k]; };
        const float* source = x + r0 * m + i * bs;
        ForEachSetBit(w1 - w0, gathered, [&](int64_t row) {
          std::copy_n(source + row * m, bs, x_panel(i) + row * bs);
        });
      };
      // The examples active in both x's block i and y's block j, into rows; their count.
      auto list_both = [&](int64_t i, int64_t j) -> int64_t {
        if (compressed_lists) {
          return kernels.list_in_both(active_in.Words(i) + w0, active_out.Words(j) + w0, w1 - w0,
                                      rows.data());
        }
        return active_in.ActiveInBoth<kForwardBranchlessBits>(i, active_out, j, w0, w1,
                                                              rows.data());
      };
      auto any_in_both = [&](int64_t i, int64_t j) {
        return active_in.AnyInBoth(i, active_out, j, w0, w1);
      };
      // W's block (i, j) times the chunk's examples active in both x's block i and y's block
      // j, from x's panel i into y's panel j.  W's block is w's block (i, j), or with
      // transpose_w the transpose of w's block (j, i); it is packed (so that it stays in L1)
      // while the block of the pair (next_i, next_j) is fetched, if that one is used.
      auto multiply_pair = [&](int64_t i, int64_t j, int64_t next_i, int64_t next_j) {
        const int64_t count = list_both(i, j);
        if (count == 0) return;
        const bool next_used = next_i < in_blocks && any_in_both(next_i, next_j);
        const float* block = weights.Source(i, j);
        const float* next = next_used ? weights.Source(next_i, next_j) : block;
        const int64_t rs = weights.SourceRowStride();
        int64_t block_rs = rs;
        if (transpose_w || count > kRowsReadInPlace) {
          kernels.pack_block(block, rs, bs, transpose_w, next, packed, bs);
          block = packed;
          block_rs = bs;
        } else if (next_used) {
          PrefetchBlock(next, rs, bs);
        }
        kernels.exact_rows_accumulate(x_rows(i), x_rs, rows.data(), count, block, block_rs, bs,
                                      y_rows(j), y_rs, 1, 0, bs);
      };
      // Every example of the chunk active in every input block (x in the shared panels): a
      // pair's examples are those of its output block, whatever the input block, so each output
      // block's examples pass through kFusedInputFeatures of input at once, on those blocks
      // packed one under another, the sums kept in registers between the blocks (the same
      // sums, in the same order, as the block pairs below).
      if (in_full) {
        const int64_t fused = std::max<int64_t>(1, kFusedInputFeatures / bs);
        float* const column = scratch->columns.Get(fused * bs * bs);
        for (int64_t g0 = 0; g0 < in_blocks; g0 += fused) {
          const int64_t g1 = std::min(in_blocks, g0 + fused);
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t count = list_both(0, j);
            if (count == 0) continue;
            weights.PackRange(kernels, g0, g1, j, j + 1, column);
            kernels.exact_rows_accumulate(shared + (g0 * n + r0) * bs, bs, rows.data(), count,
                                          column, bs, bs, y_panel(j), bs, g1 - g0, n * bs, bs);
          }
        }
      } else if (wide) {
        // Every example of the chunk active in every output block of the task: a pair's
        // examples are those of its input block, whatever the output block, so each input
        // block's examples go through all the task's output blocks at once, on their weight
        // blocks packed side by side, into y's rows laid out task-wide (the same sums, in the
        // same order, as the block pairs below).
        const int64_t width = (j1 - j0) * bs;
        float* const row_blocks = scratch->columns.Get(bs * width);
        std::fill_n(y_panels, (r1 - r0) * width, 0.f);
        for (int64_t i = 0; i < in_blocks; ++i) {
          const int64_t count = list_both(i, j0);
          if (count == 0) continue;
          weights.PackRange(kernels, i, i + 1, j0, j1, row_blocks);
          kernels.exact_rows_accumulate(shared + (i * n + r0) * bs, bs, rows.data(), count,
                                        row_blocks, width, bs, y_panels, width, 1, 0, width);
        }
      } else {
        // Every y block sums its input blocks in increasing order, whatever the grouping, and
        // whatever the passes (see kPairPassBytes).
        const bool passes = panels && shared && group == 1 && bs <= kPairPassMaxBlockSize;
        for (int64_t ja = j0; ja < j1;) {
          const int64_t jb =
              passes ? PairPassEnd(active_out, ja, j1, w0, w1, bs, kPairPassBytes) : j1;
          for (int64_t i0 = 0; i0 < in_blocks; i0 += group) {
            const int64_t i1 = std::min(in_blocks, i0 + group);
            if (panels && !shared) {
              for (int64_t i = i0; i < i1; ++i) gather_x(i);
            }
            for (int64_t j = ja; j < jb; ++j) {
              for (int64_t i = i0; i < i1; ++i) {
                // The next pair of these loops, or the next group's first.
                int64_t next_i = i + 1, next_j = j;
                if (next_i == i1) {
                  next_i = j + 1 < jb ? i0 : i1;
                  next_j = j + 1 < jb ? j + 1 : ja;
                }
                multiply_pair(i, j, next_i, next_j);
              }
            }
          }
          ja = jb;
        }
      }
      if (!panels) continue;  // the products added into y itself
      // y's rows of the task: the panels where the output block is active, zeros elsewhere.
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t row = r - r0;
        const uint64_t bit = uint64_t{1} << (r % 64);
        for (int64_t j = j0; j < j1; ++j) {
          float* dst = y + r * p + j * bs;
          if (active_out.Word(j, r / 64) & bit) {
            std::copy_n(wide ? y_panels + row * (j1 - j0) * bs + (j - j0) * bs
                             : y_panel(j) + row * bs,
                        bs, dst);
          } else {
            std::fill_n(dst, bs, 0.f);
          }
        }
      }
    }
  });
}

void SparseDotGradWCpu(const float* x, const float* dy, const float* in_mask,
                       const float* out_mask, float* dw, int64_t n, int64_t m, int64_t p,
                       int64_t bs, const ParallelFor& parallel_for) {
  const CpuKernels& kernels = BestCpuKernels();
  const int64_t in_blocks = m / bs, out_blocks = p / bs;
  const ActiveExamples active_in(in_mask, n, in_blocks);
  const ActiveExamples active_out(out_mask, n, out_blocks);
  // A task owns a tile of dw's blocks, square in features, so that each x and dy element it
  // reads serves a whole row or column of the tile (traffic ~ n (m + p) x m p / tile area,
  // where tiles one block wide would re-read all of dy for every block row).
  const int64_t tile = std::max<int64_t>(1, kGradFeaturesPerTask / bs);
  // Tiles active enough on one side run MaskedWideGradW, over the examples of each block of
  // the less active side (fewer multiply-adds), chosen once for all tiles so that the tiles of
  // one block column follow each other when the products run over x's blocks, sharing dy's
  // masked blocks (and the other way round).
  const std::vector<int64_t> in_counts = ActiveCounts(active_in, in_blocks);
  const std::vector<int64_t> out_counts = ActiveCounts(active_out, out_blocks);
  const double min_share = MaskedWideMinShare(bs);
  auto wide_enough = [&](int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    return std::max(ActiveShare(in_counts, i0, i1, n), ActiveShare(out_counts, j0, j1, n)) >=
           min_share;
  };
  bool any_wide = false;
  for (int64_t i0 = 0; i0 < in_blocks; i0 += tile) {
    for (int64_t j0 = 0; j0 < out_blocks; j0 += tile) {
      any_wide = any_wide || wide_enough(i0, std::min(in_blocks, i0 + tile), j0,
                                         std::min(out_blocks, j0 + tile));
    }
  }
  const bool over_x = ActiveShare(out_counts, 0, out_blocks, n) >=
                      ActiveShare(in_counts, 0, in_blocks, n);
  CompactBlocks narrow_rows;
  const bool masked_wide =
      any_wide && (over_x ? narrow_rows.Gather(x, n, m, bs, active_in, in_counts, parallel_for)
                          : narrow_rows.Gather(dy, n, p, bs, active_out, out_counts,
                                               parallel_for));
  ForTiles<GradWScratch>(
      in_blocks, tile, out_blocks, tile, n * bs * bs * tile * tile / 2, parallel_for,
      [&](GradWScratch* scratch, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    const int64_t words = active_in.words();
    std::vector<int32_t>& rows = scratch->rows;
    rows.resize(words * 64 + kRowListSlack);
    const bool compressed_lists = ListsCompressed(
        kernels, ExamplesPerPair(active_in, i0, i1, active_out, j0, j1, 0, words, n), words);
    std::vector<float>& x_panel = scratch->x_panel;
    std::vector<float>& dy_panel = scratch->dy_panel;
    // Every example active in every block of the tile: each input block's rows are gathered
    // once (all of them, in order) and so are dy's rows of all the output blocks, side by side
    // (width floats a row), where the pairs below would gather the same rows for each pair.
    // Each input block's dw row of blocks is then one product over all the outputs: register
    // tiles several vectors wide, where a bs-16 block alone is one vector wide and takes a
    // broadcast per multiply-add (the same sums, each over the examples in order).
    const int64_t full_panels_bytes = (i1 - i0 + j1 - j0) * n * bs * 4;
    if (full_panels_bytes <= kFullGradPanelsMaxBytes && active_in.AllActive(i0, i1, 0, n) &&
        active_out.AllActive(j0, j1, 0, n)) {
      for (int64_t r = 0; r < n; ++r) rows[r] = static_cast<int32_t>(r);
      const int64_t width = (j1 - j0) * bs;
      x_panel.resize((i1 - i0) * n * bs);
      dy_panel.resize(n * width);
      for (int64_t i = i0; i < i1; ++i) {
        kernels.gather_rows(x + i * bs, m, rows.data(), n, bs,
                            x_panel.data() + (i - i0) * n * bs);
      }
      for (int64_t r = 0; r < n; ++r) {
        std::copy_n(dy + r * p + j0 * bs, width, dy_panel.data() + r * width);
      }
      const int64_t step = GradWColumnsPerCall(bs, width);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t c = 0; c < width; c += step) {
          kernels.panel_grad_w(x_panel.data() + (i - i0) * n * bs, dy_panel.data() + c, width,
                               nullptr, step, n, bs, dw + i * bs * p + j0 * bs + c, p,
                               /*stream=*/true);
        }
      }
      return;
    }
    if (masked_wide && wide_enough(i0, i1, j0, j1) &&
        (over_x ? narrow_rows.AllFiniteIn(i0, i1) : narrow_rows.AllFiniteIn(j0, j1))) {
      const GradSide x_side{x, m, &active_in, i0, i1}, dy_side{dy, p, &active_out, j0, j1};
      if (over_x) {
        MaskedWideGradW(kernels, x_side, narrow_rows, dy_side, true, n, bs, dw, p, scratch);
      } else {
        MaskedWideGradW(kernels, dy_side, narrow_rows, x_side, false, n, bs, dw, p, scratch);
      }
      return;
    }
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = j0; j < j1; ++j) {
        float* block = dw + i * bs * p + j * bs;
        const int64_t count =
            compressed_lists
                ? kernels.list_in_both(active_in.Words(i), active_out.Words(j), words, rows.data())
                : active_in.ActiveInBoth(i, active_out, j, 0, words, rows.data());
        if (count == 0) {
          for (int64_t r = 0; r < bs; ++r) std::fill_n(block + r * p, bs, 0.f);
          continue;
        }
        // Panels grow to the most active rows seen, not to n: cost follows the active rows.
        if (static_cast<int64_t>(x_panel.size()) < count * bs) {
          x_panel.resize(count * bs);
          dy_panel.resize(count * bs);
        }
        kernels.gather_rows(x + i * bs, m, rows.data(), count, bs, x_panel.data());
        kernels.gather_rows(dy + j * bs, p, rows.data(), count, bs, dy_panel.data());
        kernels.panel_grad_w(x_panel.data(), dy_panel.data(), bs, nullptr, bs, count, bs, block, p,
                             /*stream=*/true);
      }
    }
  }, /*columns_outer=*/masked_wide && over_x);
}

}  // namespace blocksparse
