// CUDA kernels for block-sparse matrix products, behind a plain C++ interface.
//
// This header includes neither TensorFlow nor CUDA headers, so any translation unit (the TF
// op wrapper, a ctypes shim, a test binary) can include it.  The stream is passed as the
// opaque driver handle `CUstream_st*` (what cudaStream_t / CUstream point to; nullptr is the
// legacy default stream).  All pointers are device pointers.
//
// Semantics (shared with the CPU op, see ops/block_layout.h):
//   A weight matrix W of shape (C, K) = (CB*bs, KB*bs) is stored as its nonzero blocks only:
//   w has shape (blocks, bs, bs), row-major; block b is W[c*bs:(c+1)*bs, k*bs:(k+1)*bs] with
//   (c, k) = (block_row[b], block_col[b]).  col_ptr / col_row / col_block list, for every output
//   block column k, its blocks in increasing block row (BlockLayout's column view).
//
//   LaunchForward:
//     feature_axis == 1: x (N, C), y (N, K), y = x @ W
//     feature_axis == 0: x (C, N), y (K, N), y = W^T @ x
//     Output columns (rows for feature_axis 0) with no blocks are written as zeros; every
//     element of y is written.  dx is this same product on the transposed problem: the swapped
//     layout and W's blocks transposed (LaunchForwardTransposedW reads them as stored).
//   LaunchGradW (only the stored blocks, never C x K):
//     feature_axis == 1: x (N, C), dy (N, K): dw[b] = x[:, c-block]^T @ dy[:, k-block]
//     feature_axis == 0: x (C, N), dy (K, N): dw[b] = x[c-block, :] @ dy[k-block, :]^T
//     dw has shape (blocks, bs, bs); with N == 0 it is written as zeros.
//
//   All tensors are row-major and contiguous, of one dtype (float32, float16 or bfloat16);
//   products accumulate in float32, and float32 inputs keep float32 accuracy (no plain TF32).
//   Results are deterministic: bitwise identical from run to run (no floating-point atomics;
//   every reduction has a fixed order).
//   Supported block sizes: 1, 8, 16, 32, 64.  Any N >= 0; block rows, block columns and blocks
//   each below 2^31 (blocks below 2^31 - 64), C and K at most 2^40.
//   Kernels: with bs >= 16 on sm_80+ (and 16-byte aligned pointers, and for feature_axis 0 a
//   batch N that keeps rows 16-byte aligned: N % 8 == 0 for 16-bit types, N % 4 == 0 for
//   float32) the products run on tensor cores (mma.sync): 16-bit inputs directly, float32 as
//   "3xTF32" (operands split into TF32 high and residual parts, three MMAs, float32
//   accumulation: float32-level accuracy, not TF32's).  On sm_90 a tile may be split over a
//   thread-block cluster and reduced through distributed shared memory in a fixed order, and
//   the 16-bit forward and dW with N > 64 (bs 16, 32, 64; either feature axis; so also dx;
//   the forward at bs 16 only where columns are at most 75% full, dW at bs 32 only with at
//   least 6 blocks per column on average), and the 16-bit forward with N <= 64 (bs 32, 64;
//   bs 16 but with feature_axis 1 for columns over 75% full where N > 16 and columns under 32
//   blocks where N <= 16), run on Hopper's warpgroup MMA (wgmma, sm_90a), with
//   their own (fixed) order of sums; on sm_90 the dW with N <= 64 and at least 6 blocks per
//   column (16-bit; float32 with bs 16 / 32) streams each column's blocks through one CTA
//   (mma.sync, dy kept in registers).
//   Everything else runs on CUDA cores: bs 8 with 16-byte aligned pointers on kernels of its
//   own (forward: a thread per example and block column, blocks loaded in 16-byte rows; dW: a
//   thread per block row, with feature_axis 0 for N % 8 == 0); bs 1, unaligned pointers and
//   ragged feature_axis-0 batches on simpler ones.  Results are bitwise reproducible from run
//   to run on the same device; different GPUs may choose different splits and differ in the
//   last bits.
//   Inputs and outputs must not overlap.  Launches are asynchronous on `stream`; the layout
//   arrays must stay valid until the work completes.
//
// Return value: 0 on success, otherwise a cudaError_t value (e.g. 1 = cudaErrorInvalidValue
// for bad arguments, which are checked before anything is launched).  ErrorString(code)
// names it.  The kernels use the current CUDA device; device attributes (SM count, compute
// capability, shared-memory limit) are queried with cudaDeviceGetAttribute and cached per
// device (at most 64 devices).  GPUs below compute capability 8.0 get
// cudaErrorNoKernelImageForDevice (no kernel image is built for them), which ErrorString
// explains.  The calls are thread-safe.  The paced 16-bit bs-16 weight gradient of long
// batches takes a few bytes per pacing epoch with cudaMallocAsync on `stream` (freed there),
// and where that fails runs unpaced (the same results).
//
// Workspace: a layout of 8-, 16- or 32-wide blocks that comes with its 64-wide cover
// (DeviceLayout::coarse) runs as that cover's 64-wide blocks where the narrow blocks fill enough of
// its area (16-bit / float32: bs 8 3% / 10%, feature_axis 0 5% / 20%; bs 16 20% / 60%, feature_axis
// 0 33% / 60%; bs 32 75% / 95%; a full layout fills all of it) and the batch is long enough for
// that fill (N x fill^2 >= 64 rows for 16-bit bs 16, 192 with feature_axis 0, 128 for float32; >=
// 512 for 16-bit bs 32, 1024 with feature_axis 0, float32 2048 for the products and 1024 for dW; bs
// 8: N x fill >= 1, 32 for dW; CoarseMinRows and CoarseMinFill in blocksparse_matmul_gpu.cu give
// the measurements behind these), the inputs suit the bs-64 tensor-core kernels (feature_axis 0: N
// a multiple of 8 for 16-bit types, of 4 for float32; 16-byte aligned pointers), and the caller
// passes a workspace of WorkspaceBytes(...) bytes or more (the cover's blocks: device memory,
// 16-byte aligned, any content, in use until the launch's work completes; at most twice the bytes
// of w or 128 MiB, else the blocks run as they are): the narrow blocks are copied into it (zeros
// elsewhere), the product runs on the bs-64 kernels (full layouts on an H100 with N = 4096, 16-bit:
// bs 16 5.8x and bs 32 1.8x faster, bs 8 29x; bs 16 at 25% random density 1.7x, on a small-world
// layout of 10% density 2.0x; see docs/benchmarks_gpu.md), and dW's 64-wide blocks are copied back
// out.  Its sums come in another order than the narrow blocks' (as accurate; zero terms added where
// the cover has no narrow block, so that an infinity or NaN in x reaches every output of the
// 64-wide blocks that read it, as in a dense product), so whether a caller passes the workspace
// decides the last bits: pass it always or never for results that are bitwise the same from call to
// call.  Where no cover is taken, a 16-bit bs-16 product with feature_axis 1 on Hopper (x, w and y
// 16-byte aligned, N a multiple of 8 and above 64, where (density - d0) x N >= 40 with d0 = 4%, or
// 1.5% where x is at least the L2's size: from 5% density at 4096 rows, 8% at 1024, 12% at 512)
// asks for a workspace of (C + K) x rows elements instead: x (and dy) are transposed into it and
// the product runs on feature_axis 0's kernels, whose copies read whole rows of x^T rather than 32
// bytes of every row of x (y transposed back; the forward in passes of `rows` batch rows within 256
// MiB of workspace; dW transposes the whole batch, where that takes at most 1 GiB).  Its sums are
// those of feature_axis 0 on the transposed inputs, pass by pass, bit for bit.  WorkspaceBytes is 0
// where a call takes none.
//
// Grouped block columns: where no cover is taken, a 16-bit bs-32 forward with feature_axis 1
// (so also dx) on Hopper with N >= 1000 computes groups of four neighbouring block columns per
// CTA where they share enough block rows, as small-world layouts do: at most 0.42 x tiles read
// per stored block, counted by ColumnGroupRows (ops/block_layout.h) from DeviceLayout's
// column_group_rows or its host copies (without either, never).  Per block row present in any
// of a group's columns it reads the x tile once and multiplies it by the four columns' blocks
// side by side, zero blocks where a column has none.  The zero blocks' products add exact
// zeros, so its results are the narrow kernel's bit for bit, except that an infinity or NaN in
// x reaches, as NaN, every column of the groups that read its block row (as in a dense product
// and on the cover).  On an H100 it took 0.77-0.97x the narrow kernel's time on small-world
// layouts of 8.6-50% density (docs/benchmark_history_gpu.md).
// Measured performance (H100, H200): docs/benchmarks_gpu.md; tests: tools/gpu_check.sh.
#ifndef BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_H_
#define BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_H_

#include <cstdint>

struct CUstream_st;

namespace blocksparse {
namespace gpu {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Device pointers to the BlockLayout arrays (int32), plus its sizes.
//   col_ptr: KB + 1 entries; col_row, col_block, block_row, block_col: `blocks` entries.
struct DeviceLayout {
  const int32_t* col_ptr = nullptr;
  const int32_t* col_row = nullptr;
  const int32_t* col_block = nullptr;
  const int32_t* block_row = nullptr;
  const int32_t* block_col = nullptr;
  int64_t CB = 0, KB = 0, block_size = 0, blocks = 0;
  // Optional, for 8-, 16- and 32-wide blocks: the layout of 64-wide blocks that covers this
  // one (a 64-wide block wherever any narrow block it spans is stored; CoarseLayoutOf in
  // ops/block_layout.h builds its tables), its tables in device memory too.  Calls given a
  // workspace may run the product on it (see "Workspace" above).
  const DeviceLayout* coarse = nullptr;
  // Optional: a host copy of col_ptr (KB + 1 entries, the same as the device's; read during the
  // call only).  The 16-bit small-batch forward on Hopper then passes each CTA's share of its
  // column's block list in the launch's parameters instead of reading col_ptr first (one
  // dependent memory load less before its first copies; the same results bit for bit).
  const int32_t* host_col_ptr = nullptr;
  // Optional, with host_col_ptr: a host copy of col_row (`blocks` entries; read during the
  // call only), from which the 16-bit bs-32 forward with feature_axis 1 counts the block rows
  // that groups of neighbouring block columns share (ColumnGroupRows in ops/block_layout.h) to
  // choose between its kernels (see "Grouped block columns" above).
  const int32_t* host_col_row = nullptr;
  // Optional, for 32-wide blocks: that count for groups of four columns, ColumnGroupRows(
  // col_ptr, col_row, CB, KB, blocks, 4), counted once by whoever keeps the layout (the
  // TensorFlow op does when it uploads the tables); -1: counted from the host copies by each
  // call that needs it.
  int64_t column_group_rows = -1;
};

// Bytes of workspace LaunchForward, LaunchForwardTransposedW (grad_w false) or LaunchGradW
// (true) can use with these arguments (see "Workspace" above); 0 where they take none (also
// for arguments the launches refuse, or when no CUDA device can be queried).
int64_t WorkspaceBytes(DType dtype, int64_t N, int feature_axis, const DeviceLayout& layout,
                       bool grad_w);

// y = x @ W (feature_axis 1) or W^T @ x (feature_axis 0).  x, w, y as described above.
// Needs col_ptr, col_row, col_block (and block_row, block_col to use a workspace).
int LaunchForward(DType dtype, const void* x, const void* w, void* y, int64_t N,
                  int feature_axis, const DeviceLayout& layout, CUstream_st* stream,
                  void* workspace = nullptr, int64_t workspace_bytes = 0);

// dw[b] for every stored block b.  Needs every layout array (the tensor-core kernels group the
// blocks of a column through the column view).
int LaunchGradW(DType dtype, const void* x, const void* dy, void* dw, int64_t N,
                int feature_axis, const DeviceLayout& layout, CUstream_st* stream,
                void* workspace = nullptr, int64_t workspace_bytes = 0);

// LaunchForward where block b of w holds the transpose of the product's block b (`layout` is
// the product's: the input gradient dx = dy . W^T passes W's blocks as stored and W^T's
// layout).  Every kernel reads the blocks transposed as it multiplies them (no copy); the
// results are those of LaunchForward on transposed copies, bit for bit (with a workspace, the
// blocks are copied into it transposed as stored, and read so).
int LaunchForwardTransposedW(DType dtype, const void* x, const void* w, void* y, int64_t N,
                             int feature_axis, const DeviceLayout& layout, CUstream_st* stream,
                             void* workspace = nullptr, int64_t workspace_bytes = 0);

// Human-readable name of a code returned above ("no error" for 0).
const char* ErrorString(int code);

// Which kernel a call with these arguments would use (for tests and benchmarks):
// 0 = CUDA-core kernel, 1 = tensor-core kernel.
int SelectedPath(DType dtype, int64_t N, int feature_axis, int64_t block_size, bool grad_w);

// For benchmarks and tests only: selects alternative tile configurations process-wide.
//   0: the defaults.
//   3: the defaults of GPUs without wgmma (the mma.sync kernels on Hopper too).
//   5: the bs-64 wgmma forward with one CTA per tile everywhere (the default makes CTAs
//      persistent for problems of up to 16 waves of tiles).
//   1: swap 128- and 256-row mma.sync forward tiles for 16-bit inputs, bs 32 / 64, N > 64.
//   2: 32 x 32 instead of 64 x 32 mma.sync warp tiles for the 16-bit bs-64 forward, N > 64.
//   6: the narrow wgmma forwards (16-bit bs 16 / 32 with N > 64, bs 16-64 with N <= 64, bs 64
//      from 512 rows) copy with cp.async, not the copy engine (the same results bit for bit).
//   7: the wgmma dW with one column group per CTA everywhere (the default paces persistent
//      CTAs over the groups with feature axis 1 where x is several times the L2: bs 16 with
//      N >= 8192 and density <= 50%, bs 32 (8-block groups) up to 75% where the groups are
//      six times the CTAs that fit or more; the same results bit for bit).
//   8: that pacing (bs 16, and bs 32's 8-block groups) wherever the groups outnumber the
//      CTAs that fit (for tests).
//   9: as 8 over a grid of at most 3 CTAs, so that a small problem takes the paced kernel with
//      several groups per CTA (what racecheck can afford to run).
//  11: 16-bit bs 32 dW (N > 64) in groups of 4 blocks wherever columns average 4 or more.
//  12: 16-bit bs 32 dW (N > 64) in groups of 2 blocks everywhere.
//  13: the wgmma dW (16-bit, N > 64, where not paced) copies x and dy on the copy engine
//      wherever it can (the default does so with feature axis 1 for bs 64, and for bs 32 where
//      x fits in the L2); the same results bit for bit.
//  14: that dW copies with cp.async everywhere.
//  19: run as a GPU of compute capability 8.6 (RTX 30 / A10 / A40): 99 KiB of shared memory
//      per CTA, no wgmma, no clusters; the bs-64 mma.sync tiles that need more take fewer
//      pipeline stages (the same results bit for bit as variant 3 where it splits no tile).
//  20: the 16-bit bs-64 forward with N > 64 on the transposed wgmma kernel everywhere (the
//      default runs the narrow kernel from 512 rows; other sums, as accurate).
//  21, 22: that forward on the narrow kernel wherever N > 64, with 128-row tiles of 4 stages /
//      192-row tiles of 3 (the default picks among these and 128 x 3; the same results bit for
//      bit as the default's narrow kernel).
//  23: the 16-bit bs-64 dW (N > 64) in groups of 2 blocks everywhere (the default, with
//      feature axis 1, takes groups of 8 on two warpgroups where x is four times the L2 or more
//      and the columns average 12 blocks, and of 4 on columns of 40 blocks or more on average).
//  24, 25: that dW in groups of 8 (on two warpgroups) / 4 blocks everywhere; 26, 27: the same
//      with cp.async copies (the same sums in the same order as 23's, bit for bit where no
//      group is split over a cluster).
//  15, 16, 17: the float32 mma.sync forward (feature axis 1, N > 64) computes runs of 2, 4, 8
//      consecutive block columns per CTA wherever its tiles allow (the default: 2 for bs 32 /
//      64 from 2048 rows with at most 4 blocks per column); 18: one column per CTA everywhere.
//  28: layouts run as their blocks even with a workspace and a cover; 29: layouts with a
//      cover run on it with a workspace whatever the batch and the fill (the default: from the
//      rows and fills named under "Workspace"; the same cap on the workspace).
//  30: no transposed batches (16-bit bs 16, feature_axis 1) even with a workspace; 31: take
//      them wherever they are possible, whatever the density and the rows; 32: as 31, the
//      forward in passes of 256 rows (for tests).
//  33 to 40 (sparse_dot, ops/sparse_dot_gpu.cu): 33 runs the 16-bit forward and dW on
//      mma.sync where Hopper would take wgmma; 34 keeps wgmma with the forward's CTAs looping
//      over row tiles (tests); 35 is the default (it switched the dW to wgmma before that was
//      the default); 36 loops the wgmma dW's CTAs over input tiles and columns (tests); 37
//      runs the wgmma forward with one wgmma group in flight while the next step's copies are
//      issued, as the wgmma dW does by default; 38 runs the wgmma dW without (each step's group
//      waited for before the next copies); 39 runs the dW issuing the next copies while the
//      step's group runs, as the forward does by default; 40 runs the forward waiting for each
//      step's group before the next copies.  All give the defaults' sums bit for bit.
//      Variants 1-4 and 19 keep sparse_dot off wgmma too.
//  41, 42: the 16-bit bs-64 forward with N <= 64 on the copy engine takes 1 block per pipeline
//      step and 12 stages / 4 blocks and 3 (the default: 2 blocks and 6); the same results bit
//      for bit.
//  43: the 16-bit small-batch forward on Hopper reads its CTAs' shares of the column lists from
//      col_ptr in device memory even where DeviceLayout::host_col_ptr is given (the default then
//      takes them from the launch's parameters; the same results bit for bit).
//  44, 45: the 16-bit bs-32 forward with N > 64 and feature_axis 1 (so also dx) on Hopper
//      computes groups of 4 / 2 neighbouring block columns per CTA wherever the copy engine can
//      serve (WgmmaForwardGroupedKernel in blocksparse_matmul_gpu_wgmma.cuh; the default takes
//      groups of 4 where they share enough block rows, see "Grouped block columns" above).
//  46: never that grouped forward: the narrow kernels the default ran before it.
//  47: that grouped forward before the 64-wide cover: where the default's rule takes groups
//      of four, the call skips the cover (a measurement variant; see kTuningGroupedBeforeCover
//      in blocksparse_matmul_gpu.cu).
// Variants 1 and 2 turn off wgmma and the two-stage forward used for very sparse columns; they
// give variant 3's results bit for bit where neither splits a tile over a cluster (a split
// changes the order of the sums; splits depend on the tile count).  All are deterministic.
void SetTuning(int variant);

}  // namespace gpu
}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_GPU_H_
