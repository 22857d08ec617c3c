// Small helpers shared by the TensorFlow GPU kernels (*_gpu_op.cc; built with --config=cuda).
// They take only the stream from TensorFlow, never device properties: TensorFlow's CUDA 12
// cudaDeviceProp differs in layout from the CUDA 13 headers the kernels are compiled with.
#ifndef BLOCKSPARSE_OPS_GPU_OP_UTIL_H_
#define BLOCKSPARSE_OPS_GPU_OP_UTIL_H_

#if GOOGLE_CUDA

#ifndef EIGEN_USE_GPU
#error "define EIGEN_USE_GPU before including TensorFlow or Eigen headers"
#endif

#include <cuda_runtime.h>

#include <string>

#include "ops/blocksparse_matmul_gpu.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace blocksparse {

// The stream TensorFlow runs this op's GPU work on.
inline CUstream_st* TfCudaStream(tensorflow::OpKernelContext* ctx) {
  return ctx->eigen_device<Eigen::GpuDevice>().stream();
}

// The kernels' dtype code for a TensorFlow element type; a registration for any other type
// fails to compile rather than have its data read as float32.
template <typename T> struct DTypeOf {
  static_assert(sizeof(T) == 0, "the GPU kernels take float, Eigen::half and Eigen::bfloat16");
};
template <> struct DTypeOf<float> { static constexpr gpu::DType value = gpu::DType::kFloat32; };
template <> struct DTypeOf<Eigen::half> {
  static constexpr gpu::DType value = gpu::DType::kFloat16;
};
template <> struct DTypeOf<Eigen::bfloat16> {
  static constexpr gpu::DType value = gpu::DType::kBFloat16;
};
template <typename T> inline constexpr gpu::DType kDType = DTypeOf<T>::value;

// OK for code 0, else an error naming `what` and the CUDA error: InvalidArgument for the launch
// interfaces' refusals of their arguments (sizes past their limits), FailedPrecondition where
// this GPU or driver cannot run the kernels, else Internal.  The thread's last CUDA error is
// cleared, so that it does not surface again in the next call's launch check.
inline absl::Status CudaStatus(int code, const char* what) {
  if (code == 0) return absl::OkStatus();
  cudaGetLastError();
  const std::string message = std::string(what) + " failed: " + gpu::ErrorString(code);
  switch (code) {
    case cudaErrorInvalidValue:
      return absl::InvalidArgumentError(message);
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorInsufficientDriver:
      return absl::FailedPreconditionError(message);
    default:
      return absl::InternalError(message);
  }
}

}  // namespace blocksparse

#endif  // GOOGLE_CUDA
#endif  // BLOCKSPARSE_OPS_GPU_OP_UTIL_H_
