// CPU block-sparse 2-D convolution (NHWC, implicit GEMM) behind a plain C++ interface (no
// TensorFlow headers).  The kernel W (kh, kw, C, K) has the same block-sparse channel layout at
// every tap and is stored as w (blocks, kh, kw, bs, bs): w[b, i, j] is block b of tap (i, j).
// No patch tensor is ever built: every product reads the input pixels in place, with a zero row
// standing in for the padding.  Sums run in an order fixed by the geometry and the layout, so
// results are bitwise the same whatever the number of threads.
#ifndef BLOCKSPARSE_OPS_BLOCKSPARSE_CONV_CPU_H_
#define BLOCKSPARSE_OPS_BLOCKSPARSE_CONV_CPU_H_

#include <cstdint>
#include <string>

#include "ops/block_layout.h"
#include "ops/blocksparse_matmul_cpu.h"

namespace blocksparse {

// Spatial shape of one convolution.  Input (batch, in_height, in_width, C), output
// (batch, out_height, out_width, K); output pixel (p, q) through tap (i, j) reads input pixel
// (p * stride_h + i * dilation_h - pad_top, q * stride_w + j * dilation_w - pad_left), or zero
// where that lies outside the input.
struct ConvGeometry {
  int64_t batch = 0, in_height = 0, in_width = 0, out_height = 0, out_width = 0;
  int64_t kernel_height = 1, kernel_width = 1;
  int64_t stride_h = 1, stride_w = 1, dilation_h = 1, dilation_w = 1;
  int64_t pad_top = 0, pad_left = 0;

  int64_t taps() const { return kernel_height * kernel_width; }
  int64_t in_pixels() const { return batch * in_height * in_width; }
  int64_t out_pixels() const { return batch * out_height * out_width; }
};

// Output length of one spatial dimension padded by `before` and `after` into *size, 0 when the
// dilated kernel does not fit.  Takes in, before, after >= 0 and kernel, stride, dilation >= 1;
// false when the padded length or the dilated kernel's reach overflows int64.  Once this
// succeeds, every pixel position the kernels compute lies within those two, so none overflows.
bool ConvOutputSize(int64_t in, int64_t kernel, int64_t stride, int64_t dilation,
                    int64_t before, int64_t after, int64_t* size);

// y (out pixels, K) = the convolution of x (in pixels, C) with w.
bool BlocksparseConv2DCpu(const float* x, const float* w, float* y, const ConvGeometry& geometry,
                          const BlockLayout& layout, const ParallelFor& parallel_for,
                          const ScratchAllocator& scratch);

// dx (in pixels, C) = the input gradient for dy (out pixels, K).  Each input pixel gathers the
// output pixels it fed (so strides > 1 leave the pixels no tap reaches at zero).
bool BlocksparseConv2DGradInputCpu(const float* dy, const float* w, float* dx,
                                   const ConvGeometry& geometry, const BlockLayout& layout,
                                   const ParallelFor& parallel_for,
                                   const ScratchAllocator& scratch);

// dw (blocks, kh, kw, bs, bs) = the kernel gradient at the stored blocks only.
bool BlocksparseConv2DGradKernelCpu(const float* x, const float* dy, float* dw,
                                    const ConvGeometry& geometry, const BlockLayout& layout,
                                    const ParallelFor& parallel_for,
                                    const ScratchAllocator& scratch);

}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_BLOCKSPARSE_CONV_CPU_H_
