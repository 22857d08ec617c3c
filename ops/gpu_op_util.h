// Small helpers shared by the TensorFlow GPU kernels (*_gpu_op.cc; built with --config=cuda).
// They take only the stream from TensorFlow, never device properties: TensorFlow's CUDA 12
// cudaDeviceProp differs in layout from the CUDA 13 headers the kernels are compiled with.
#ifndef BLOCKSPARSE_OPS_GPU_OP_UTIL_H_
#define BLOCKSPARSE_OPS_GPU_OP_UTIL_H_

#if GOOGLE_CUDA

#ifndef EIGEN_USE_GPU
#error "define EIGEN_USE_GPU before including TensorFlow or Eigen headers"
#endif

#include <string>

#include "ops/blocksparse_matmul_gpu.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace blocksparse {

// The stream TensorFlow runs this op's GPU work on.
inline CUstream_st* TfCudaStream(tensorflow::OpKernelContext* ctx) {
  return ctx->eigen_device<Eigen::GpuDevice>().stream();
}

// The kernels' dtype code for a TensorFlow element type.
template <typename T> constexpr gpu::DType kDType = gpu::DType::kFloat32;
template <> constexpr gpu::DType kDType<Eigen::half> = gpu::DType::kFloat16;
template <> constexpr gpu::DType kDType<Eigen::bfloat16> = gpu::DType::kBFloat16;

// OK for code 0, else an internal error naming `what` and the CUDA error.
inline absl::Status CudaStatus(int code, const char* what) {
  if (code == 0) return absl::OkStatus();
  return absl::InternalError(std::string(what) + " failed: " + gpu::ErrorString(code));
}

}  // namespace blocksparse

#endif  // GOOGLE_CUDA
#endif  // BLOCKSPARSE_OPS_GPU_OP_UTIL_H_
