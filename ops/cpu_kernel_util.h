// Helpers shared by the CPU kernels of every op family: TensorFlow's thread pool and allocator
// behind the plain C++ kernels' ParallelFor and ScratchAllocator, and float32 staging of
// half / bfloat16 tensors (the kernels compute in float32).
#ifndef BLOCKSPARSE_OPS_CPU_KERNEL_UTIL_H_
#define BLOCKSPARSE_OPS_CPU_KERNEL_UTIL_H_

// Eigen's thread-pool device is enabled for the whole library by -DEIGEN_USE_THREADS (ops/BUILD).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <new>
#include <type_traits>
#include <vector>

#include "ops/blocksparse_matmul_cpu.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace blocksparse {

using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

// TensorFlow's thread pool as a ParallelFor.  A task that runs out of memory (a kernel's
// per-thread buffer) sets *out_of_memory instead of ending the process; the remaining tasks
// of that call are skipped.
inline ParallelFor CpuParallelFor(OpKernelContext* ctx, std::atomic<bool>* out_of_memory) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [workers, out_of_memory](int64_t tasks, int64_t cost,
                                  const std::function<void(int64_t, int64_t)>& work) {
    workers->ParallelFor(tasks, cost, [&](int64_t begin, int64_t end) {
      if (out_of_memory->load()) return;
      try {
        work(begin, end);
      } catch (const std::bad_alloc&) {
        out_of_memory->store(true);
      }
    });
  };
}

// Scratch memory for the kernels from TensorFlow's allocator, alive as long as this object.
class TfScratch {
 public:
  explicit TfScratch(OpKernelContext* ctx) : ctx_(ctx) {}
  float* operator()(int64_t count) {
    tensors_.emplace_back();
    // At least one element: an empty tensor has no buffer, and nullptr means failure.
    const int64_t size = std::max<int64_t>(count, 1);
    if (!ctx_->allocate_temp(tensorflow::DT_FLOAT, TensorShape({size}), &tensors_.back()).ok()) {
      return nullptr;
    }
    return tensors_.back().flat<float>().data();
  }

 private:
  OpKernelContext* ctx_;
  std::vector<Tensor> tensors_;
};

// Runs product(parallel_for, scratch), which returns false when it could not get scratch
// memory; that, or running out of memory anywhere in it, fails the op with ResourceExhausted.
template <typename Product>
inline void RunProduct(OpKernelContext* ctx, Product&& product) {
  TfScratch scratch(ctx);
  std::atomic<bool> out_of_memory{false};
  bool ok = false;
  try {
    ok = product(CpuParallelFor(ctx, &out_of_memory), ScratchAllocator(std::ref(scratch)));
  } catch (const std::bad_alloc&) {
    ok = false;
  }
  if (!ok || out_of_memory.load()) {
    ctx->SetStatus(absl::ResourceExhaustedError("no memory for the block-sparse product's scratch"));
  }
}

// Float32 views of an input: the tensor itself, or a float copy of a half/bfloat16 one.
template <typename T>
inline const float* AsFloat(OpKernelContext* ctx, const Tensor& t, Tensor* scratch) {
  if constexpr (std::is_same_v<T, float>) {
    return t.flat<float>().data();
  } else {
    const absl::Status status = ctx->allocate_temp(tensorflow::DT_FLOAT, t.shape(), scratch);
    if (!status.ok()) {
      ctx->CtxFailure(__FILE__, __LINE__, status);
      return nullptr;
    }
    scratch->flat<float>().device(ctx->eigen_device<Eigen::ThreadPoolDevice>()) =
        t.flat<T>().template cast<float>();
    return scratch->flat<float>().data();
  }
}

// Runs fn(float* out) writing a float32 result into `out` (of T), through a scratch if needed.
template <typename T, typename Fn>
inline void WriteAsT(OpKernelContext* ctx, Tensor* out, Fn&& fn) {
  if constexpr (std::is_same_v<T, float>) {
    fn(out->flat<float>().data());
  } else {
    Tensor scratch;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, out->shape(), &scratch));
    fn(scratch.flat<float>().data());
    out->flat<T>().device(ctx->eigen_device<Eigen::ThreadPoolDevice>()) =
        scratch.flat<float>().template cast<T>();
  }
}

}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_CPU_KERNEL_UTIL_H_
