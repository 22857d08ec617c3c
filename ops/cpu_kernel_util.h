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
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "ops/blocksparse_matmul_cpu.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace blocksparse {

using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

// Why a product stopped early, if it did: set by whichever thread saw it first.
enum class ProductFailure { kNone, kOutOfMemory, kInternal };

// Runs f(), turning an exception into *failure instead of letting it end the process (an
// exception must not leave a thread-pool task).  Allocation failures, including sizes too
// large to allocate, are kOutOfMemory; anything else is kInternal.
template <typename F>
inline void CatchProductFailure(std::atomic<ProductFailure>* failure, F&& f) {
  try {
    f();
  } catch (const std::bad_alloc&) {
    failure->store(ProductFailure::kOutOfMemory);
  } catch (const std::length_error&) {
    failure->store(ProductFailure::kOutOfMemory);
  } catch (...) {
    failure->store(ProductFailure::kInternal);
  }
}

// TensorFlow's thread pool as a ParallelFor, for work that cannot fail (the conversions of
// half-precision staging below).
inline ParallelFor PoolParallelFor(OpKernelContext* ctx) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  return [workers](int64_t tasks, int64_t cost,
                   const std::function<void(int64_t, int64_t)>& work) {
    workers->ParallelFor(tasks, cost, work);
  };
}

// The same for the products: a task that fails (say, a kernel's per-thread buffer cannot be
// allocated) records it in *failure; the remaining tasks are skipped.
inline ParallelFor CpuParallelFor(OpKernelContext* ctx, std::atomic<ProductFailure>* failure) {
  return [pool = PoolParallelFor(ctx), failure](
             int64_t tasks, int64_t cost, const std::function<void(int64_t, int64_t)>& work) {
    pool(tasks, cost, [&](int64_t begin, int64_t end) {
      if (failure->load() != ProductFailure::kNone) return;
      CatchProductFailure(failure, [&] { work(begin, end); });
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
  std::atomic<ProductFailure> failure{ProductFailure::kNone};
  CatchProductFailure(&failure, [&] {
    if (!product(CpuParallelFor(ctx, &failure), ScratchAllocator(std::ref(scratch)))) {
      failure.store(ProductFailure::kOutOfMemory);
    }
  });
  switch (failure.load()) {
    case ProductFailure::kNone:
      break;
    case ProductFailure::kOutOfMemory:
      ctx->SetStatus(absl::ResourceExhaustedError(
          "not enough memory for the working buffers of the block-sparse product"));
      break;
    case ProductFailure::kInternal:
      ctx->SetStatus(absl::InternalError("the block-sparse product's CPU kernel failed"));
      break;
  }
}

// The bits of a float16 or bfloat16 tensor's elements (T: Eigen::half or Eigen::bfloat16).
template <typename T>
inline const uint16_t* HalfBits(const Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.flat<T>().data());
}
template <typename T>
inline uint16_t* HalfBits(Tensor* t) {
  return reinterpret_cast<uint16_t*>(t->flat<T>().data());
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
    float* const out = scratch->flat<float>().data();
    if constexpr (std::is_same_v<T, Eigen::bfloat16>) {
      BFloat16ToFloat(HalfBits<T>(t), out, t.NumElements(), PoolParallelFor(ctx));
    } else {
      HalfToFloat(HalfBits<T>(t), out, t.NumElements(), PoolParallelFor(ctx));
    }
    return out;
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
    if (!ctx->status().ok()) return;
    uint16_t* const bits = HalfBits<T>(out);
    if constexpr (std::is_same_v<T, Eigen::bfloat16>) {
      FloatToBFloat16(scratch.flat<float>().data(), bits, out->NumElements(),
                      PoolParallelFor(ctx));
    } else {
      FloatToHalf(scratch.flat<float>().data(), bits, out->NumElements(), PoolParallelFor(ctx));
    }
  }
}

}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_CPU_KERNEL_UTIL_H_
