// Attribute and input checks shared by the CPU and GPU kernels of the block-sparse ops.
#ifndef BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_OP_BASE_H_
#define BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_OP_BASE_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "ops/block_layout.h"
#include "ops/blocksparse_matmul_cpu.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace blocksparse {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

// The block sizes every op family takes (their kernels' and the layout tables').
inline absl::Status CheckBlockSize(int64_t block_size) {
  if (IsSupportedBlockSize(block_size)) return absl::OkStatus();
  return absl::InvalidArgumentError("block_size must be one of 1, 8, 16, 32, 64; got " +
                                    std::to_string(block_size));
}

inline absl::Status CheckAttrs(int64_t block_size, int64_t C, int64_t K, int64_t feature_axis) {
  TF_RETURN_IF_ERROR(CheckBlockSize(block_size));
  if (C < 1 || K < 1 || C % block_size != 0 || K % block_size != 0) {
    return absl::InvalidArgumentError(
        "C and K must be positive multiples of block_size " + std::to_string(block_size) +
        "; got C=" + std::to_string(C) + ", K=" + std::to_string(K));
  }
  if (feature_axis != 0 && feature_axis != 1) {
    return absl::InvalidArgumentError("feature_axis must be 0 or 1; got " +
                                      std::to_string(feature_axis));
  }
  return absl::OkStatus();
}

// Validates a layout input (blocks, 2) of block coordinates and builds its lookup tables:
// those of the transpose's layout (K x C) with `transposed`.
inline absl::Status LayoutFromTensor(const Tensor& t, int64_t CB, int64_t KB, int64_t block_size,
                                     BlockLayout* layout, bool transposed = false) {
  if (t.dims() != 2 || t.dim_size(1) != 2) {
    return absl::InvalidArgumentError("layout must have shape (blocks, 2); got " +
                                      t.shape().DebugString());
  }
  const int32_t* coords = t.flat<int32_t>().data();
  const std::string error =
      transposed ? BuildTransposedBlockLayout(coords, t.dim_size(0), CB, KB, block_size, layout)
                 : BuildBlockLayout(coords, t.dim_size(0), CB, KB, block_size, layout);
  if (!error.empty()) return absl::InvalidArgumentError(error);
  return absl::OkStatus();
}

// Counters of LayoutCache's tables, read by the tests (blocksparse_tf_layout_tables_* in
// blocksparse_matmul_ops.cc): how many were built, and how many are alive now.
inline std::atomic<int64_t> g_layout_tables_built{0};
inline std::atomic<int64_t> g_layout_tables_alive{0};
// The bytes of the tables alive, with their layouts' coordinates.
inline std::atomic<int64_t> g_layout_table_bytes_alive{0};

// Every LayoutCache of the library, so that a kernel building tables can drop those that other
// kernels keep for layouts no longer alive, and the least recently used of those whose layouts
// no constant holds past kMaxFreeBytesEverywhere (see LayoutCache).  Lock order: the registry,
// then one cache at a time.
class LayoutCacheBase {
 public:
  virtual ~LayoutCacheBase() = default;

 protected:
  // Called by the derived class once it is whole, and before it comes apart: a sweep may run
  // on another thread at any time.
  void Register() {
    std::lock_guard<std::mutex> lock(RegistryMutex());
    Registry().push_back(this);
  }
  void Unregister() {
    std::lock_guard<std::mutex> lock(RegistryMutex());
    auto& all = Registry();
    all.erase(std::find(all.begin(), all.end(), this));
  }

  // Tables (with their coordinates) of layouts that no constant holds, in all the caches
  // together: in eager mode every attribute set has a kernel of its own, kept for the life of
  // the process, and each kernel keeps its newest layout's tables whatever their size (tables
  // grow with C / bs + K / bs, not only with the blocks: a one-block layout of 2^26 columns
  // takes 256 MiB).
  static constexpr size_t kMaxFreeBytesEverywhere = size_t{256} << 20;

  // Stamps of use: a larger stamp, a more recent use.
  static uint64_t NextUse() {
    static std::atomic<uint64_t> clock{0};
    return ++clock;
  }

  virtual void DropDeadLayouts() = 0;
  // (last use, bytes) of each entry whose layout no constant holds.
  virtual void ListFree(std::vector<std::pair<uint64_t, size_t>>* free) = 0;
  // Drops the entries whose layout no constant holds and that were last used at `stamp` or
  // before.
  virtual void DropFreeUsedBy(uint64_t stamp) = 0;

  // Drops dead layouts everywhere, and the least recently used free ones past
  // kMaxFreeBytesEverywhere.
  static void SweepEverywhere() {
    std::lock_guard<std::mutex> lock(RegistryMutex());
    std::vector<std::pair<uint64_t, size_t>> free;
    for (LayoutCacheBase* cache : Registry()) {
      cache->DropDeadLayouts();
      cache->ListFree(&free);
    }
    std::sort(free.begin(), free.end(), std::greater<>());  // most recently used first
    size_t total = 0;
    for (const auto& [stamp, bytes] : free) {
      total += bytes;
      if (total > kMaxFreeBytesEverywhere) {  // this one and every older one go
        for (LayoutCacheBase* cache : Registry()) cache->DropFreeUsedBy(stamp);
        break;
      }
    }
  }

 private:
  // Never destroyed: kernels may outlive static destruction at exit.
  static std::mutex& RegistryMutex() {
    static auto* mu = new std::mutex;
    return *mu;
  }
  static std::vector<LayoutCacheBase*>& Registry() {
    static auto* caches = new std::vector<LayoutCacheBase*>;
    return *caches;
  }
};

// One reference to a constant layout tensor's memory for the whole library, shared by the cache
// entries every kernel makes for that memory (a training step's forward, input-gradient and
// weight-gradient kernels all see the layer's layout constant).  Only this reference left means
// the layout's owner is gone.  (With a reference per entry, the kernels of a training step kept
// each other's counts above one, and no layout used in training was ever dropped: on the GPU,
// its device tables stayed until the caches' bounds pushed them out.)
class HeldLayout {
 public:
  explicit HeldLayout(const Tensor& t) : tensor_(t) {}
  HeldLayout(const HeldLayout&) = delete;
  HeldLayout& operator=(const HeldLayout&) = delete;

  bool OwnerGone() const { return tensor_.RefCountIsOne(); }
  // Whether `coords` is this memory (the same address and shape): while held, the memory cannot
  // have been freed and given to another tensor.
  bool Is(const Tensor& coords) const {
    return tensor_.tensor_data().data() == coords.tensor_data().data() &&
           tensor_.shape() == coords.shape();
  }

  // The HeldLayout of coords' memory: the one alive, else a new one.
  static std::shared_ptr<HeldLayout> Of(const Tensor& coords) {
    static auto* mu = new std::mutex;  // never destroyed: kernels may outlive static destruction
    static auto* all = new std::vector<std::weak_ptr<HeldLayout>>;
    std::lock_guard<std::mutex> lock(*mu);
    all->erase(std::remove_if(all->begin(), all->end(),
                              [](const std::weak_ptr<HeldLayout>& h) { return h.expired(); }),
               all->end());
    for (const auto& weak : *all) {
      std::shared_ptr<HeldLayout> h = weak.lock();
      if (h != nullptr && h->Is(coords)) return h;
    }
    auto fresh = std::make_shared<HeldLayout>(coords);
    all->push_back(fresh);
    return fresh;
  }

 private:
  Tensor tensor_;
};

// What a kernel derives from a layout input (its lookup tables; on the GPU their copy in device
// memory), kept for the layouts it has seen.  A layer passes the same layout on every call, and
// building the tables (two counting sorts over the blocks, with their checks) can cost more
// than the product: a forward of 64 rows through a 100,000-neuron bs-1 layer with 4 inputs per
// neuron spent about a quarter of its time there, one row more than half.  Several layouts: in
// eager mode TensorFlow gives every call with the same attributes the same kernel, so the layers
// of a model whose shapes agree share one, and with the last layout alone each call rebuilt the
// tables of the layer before (two such 100,000-neuron layers took 8.4 ms a call instead of 0.7).
//
// A layout is found by its coordinates, compared in full (one pass over them; another layout's
// comparison ends at its first difference), unless the op was told its layout input is never
// written in place (the constant_layout attribute, which the package's own classes set for the
// constants they make): then the same memory seen again is the same layout.  The entry holds a
// reference to that tensor (HeldLayout), so its memory cannot be freed and given to another
// layout meanwhile
// (the full comparison of a 100,000-neuron layer with 32 inputs per neuron, 25 MiB of
// coordinates, took 2-3 ms, longer than its one-row product).  That reference also tells when
// the layout's owner (a layer's constant) is gone: only the cache holds the tensor then, and the
// tables are dropped, here or by the next kernel of the library that builds tables (a deleted
// layer's tables would otherwise stay as long as its kernel, which in eager mode is the process).
// Layouts whose owner lives are kept up to kMaxHeldEntries and kMaxHeldBytes (they are the model's
// own, a few int32 per block); others, the last kMaxEntries and kMaxBytes of them, and across all
// the caches of the library the last kMaxFreeBytesEverywhere (bytes of tables and coordinates).
//
// Get() hands out shared ownership: a call that drops a layout meanwhile leaves the value in use
// alive until its users let go (on the GPU, until their kernels are enqueued: TensorFlow's GPU
// allocator orders the reuse of freed memory on the stream).
template <typename Value>
class LayoutCache : public LayoutCacheBase {
 public:
  // Layouts not held alive by a constant: at most this many besides the newest one, and at
  // most kMaxBytes of their tables and coordinates.
  static constexpr size_t kMaxEntries = 16;
  static constexpr size_t kMaxBytes = size_t{64} << 20;
  // Layouts held alive by a constant: a bound all the same, since TensorFlow itself keeps a
  // reference to some tensors for a while (in eager mode, a few of twenty layers' freed layout
  // constants still looked shared, at random).
  static constexpr size_t kMaxHeldEntries = 64;
  static constexpr size_t kMaxHeldBytes = size_t{1} << 30;

  LayoutCache() { Register(); }
  ~LayoutCache() override { Unregister(); }
  LayoutCache(const LayoutCache&) = delete;
  LayoutCache& operator=(const LayoutCache&) = delete;

  // *out = the value for the layout `coords` (an int32 tensor), made by make(Value*) where
  // none is kept for it; make's errors are returned and nothing is kept.  With `constant`, the
  // caller vouches that coords' memory is never written while the tensor lives.
  template <typename Make>
  absl::Status Get(const Tensor& coords, bool constant, const Make& make,
                   std::shared_ptr<const Value>* out) {
    std::shared_ptr<const Entry> entry;
    std::vector<std::shared_ptr<const Entry>> entries;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (constant) entry = SameMemory(coords);
      if (entry == nullptr) entries = entries_;
    }
    const bool same_memory = entry != nullptr;
    for (const auto& e : entries) {  // most recently used first
      if (e->Matches(coords)) {
        entry = e;
        break;
      }
    }
    entries.clear();
    const bool built = entry == nullptr;
    if (built) {
      auto fresh = std::make_shared<Entry>();
      TF_RETURN_IF_ERROR(make(&fresh->value));
      fresh->shape = coords.shape();
      const int32_t* begin = coords.flat<int32_t>().data();
      fresh->key.assign(begin, begin + coords.NumElements());
      fresh->bytes = static_cast<size_t>(TableBytes(fresh->value)) +
                     fresh->key.size() * sizeof(int32_t);
      g_layout_table_bytes_alive += static_cast<int64_t>(fresh->bytes);
      entry = std::move(fresh);
      ++g_layout_tables_built;
    }
    std::shared_ptr<HeldLayout> held;  // taken outside mu_ (HeldLayout::Of has its own lock)
    if (constant && !same_memory) held = HeldLayout::Of(coords);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (held != nullptr) entry->held = std::move(held);
      MoveToFront(entry);
    }
    if (built) SweepEverywhere();
    const Value* value = &entry->value;
    *out = std::shared_ptr<const Value>(std::move(entry), value);
    return absl::OkStatus();
  }

 private:
  struct Entry {
    Entry() { ++g_layout_tables_alive; }
    ~Entry() {
      --g_layout_tables_alive;
      g_layout_table_bytes_alive -= static_cast<int64_t>(bytes);
    }
    TensorShape shape;
    std::vector<int32_t> key;
    Value value;
    size_t bytes = 0;                // of the value's tables and of key
    mutable uint64_t last_use = 0;   // NextUse() of the last Get (guarded by mu_)
    // The last constant tensor seen with this layout (guarded by mu_): it keeps its memory
    // from being reused, and tells when the layout's owner is gone.
    mutable std::shared_ptr<HeldLayout> held;

    bool Matches(const Tensor& coords) const {
      const int32_t* begin = coords.flat<int32_t>().data();
      return coords.shape() == shape && std::equal(key.begin(), key.end(), begin);
    }
    bool Held() const { return held != nullptr && !held->OwnerGone(); }
    bool Dead() const { return held != nullptr && held->OwnerGone(); }
  };

  // The entry whose constant tensor is `coords`' memory (same address and shape), if any.
  std::shared_ptr<const Entry> SameMemory(const Tensor& coords) const {
    for (const auto& e : entries_) {
      if (e->held != nullptr && e->held->Is(coords)) return e;
    }
    return nullptr;
  }

  // Puts `entry` first (adding it if absent) and drops dead layouts and, past the bounds, the
  // least recently used of the others.
  void MoveToFront(const std::shared_ptr<const Entry>& entry) {
    auto it = std::find(entries_.begin(), entries_.end(), entry);
    if (it != entries_.end()) entries_.erase(it);
    entry->last_use = NextUse();
    std::vector<std::shared_ptr<const Entry>> kept{entry};
    size_t free_count = 0, free_bytes = 0, held_count = 0, held_bytes = 0;
    for (auto& e : entries_) {
      if (e->Dead()) continue;
      size_t& count = e->Held() ? held_count : free_count;
      size_t& total = e->Held() ? held_bytes : free_bytes;
      const size_t max_count = e->Held() ? kMaxHeldEntries : kMaxEntries;
      const size_t max_bytes = e->Held() ? kMaxHeldBytes : kMaxBytes;
      if (count + 1 > max_count || total + e->bytes > max_bytes) continue;
      ++count;
      total += e->bytes;
      kept.push_back(std::move(e));
    }
    entries_ = std::move(kept);
  }

  void DropDeadLayouts() override {
    DropIf([](const Entry& e) { return e.Dead(); });
  }

  void ListFree(std::vector<std::pair<uint64_t, size_t>>* free) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& e : entries_)
      if (!e->Held()) free->emplace_back(e->last_use, e->bytes);
  }

  void DropFreeUsedBy(uint64_t stamp) override {
    DropIf([stamp](const Entry& e) { return !e.Held() && e.last_use <= stamp; });
  }

  // Drops the entries for which drop(entry) holds.
  template <typename Drop>
  void DropIf(const Drop& drop) {
    std::vector<std::shared_ptr<const Entry>> dropped;  // freed after the lock is let go
    std::lock_guard<std::mutex> lock(mu_);
    auto dropping = [&](const std::shared_ptr<const Entry>& e) { return drop(*e); };
    for (auto& e : entries_)
      if (dropping(e)) dropped.push_back(e);
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(), dropping), entries_.end());
  }

  std::mutex mu_;
  std::vector<std::shared_ptr<const Entry>> entries_;  // most recently used first
};

// Base of every block-sparse kernel: reads and checks the attributes, checks the layout
// input and builds its tables, and checks the activations' shapes.
class BlocksparseOpBase : public OpKernel {
 public:
  explicit BlocksparseOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("block_size", &block_size_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("C", &C_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("K", &K_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("feature_axis", &feature_axis_));
    OP_REQUIRES_OK(ctx, CheckAttrs(block_size_, C_, K_, feature_axis_));
    if (ctx->HasAttr("transpose_w")) {
      OP_REQUIRES_OK(ctx, ctx->GetAttr("transpose_w", &transpose_w_));
    }
    if (ctx->HasAttr("constant_layout")) {
      OP_REQUIRES_OK(ctx, ctx->GetAttr("constant_layout", &constant_layout_));
    }
  }

 protected:
  // Validates the layout input and builds the lookup tables of the product's weights: W's,
  // or with transpose_w those of W^T (block b then holds the transpose of W^T's block b).
  absl::Status BuildLayout(const Tensor& t, BlockLayout* layout) const {
    return LayoutFromTensor(t, C_ / block_size_, K_ / block_size_, block_size_, layout,
                            transpose_w_);
  }

  // BuildLayout's tables, built only for a layout none of the recent calls had.
  absl::Status CachedLayout(const Tensor& t, std::shared_ptr<const BlockLayout>* layout) {
    return layouts_.Get(t, constant_layout_, [&](BlockLayout* l) { return BuildLayout(t, l); },
                        layout);
  }

  // Number of feature vectors N in x, after checking its feature dimension equals `features`.
  absl::Status RowsOf(const char* name, const Tensor& x, int64_t features, int64_t* N) const {
    if (feature_axis_ == 1) {
      if (x.dims() < 2 || x.dim_size(x.dims() - 1) != features) {
        return absl::InvalidArgumentError(std::string(name) + " must have shape (..., " +
                                          std::to_string(features) +
                                          ") for feature_axis=1; got " + x.shape().DebugString());
      }
      *N = x.NumElements() / features;
    } else {
      if (x.dims() != 2 || x.dim_size(0) != features) {
        return absl::InvalidArgumentError(std::string(name) + " must have shape (" +
                                          std::to_string(features) +
                                          ", N) for feature_axis=0; got " + x.shape().DebugString());
      }
      *N = x.dim_size(1);
    }
    return absl::OkStatus();
  }

  // Checks BlocksparseMatmul's inputs (x, w, layout); gives the layout and N, and allocates y.
  // x first (ForwardRows): a layout's tables take memory in proportion to C and K, which a
  // wrong x should not get to allocate.
  absl::Status PrepareForward(OpKernelContext* ctx, std::shared_ptr<const BlockLayout>* layout,
                              int64_t* N, Tensor** y) {
    TF_RETURN_IF_ERROR(ForwardRows(ctx, N));
    TF_RETURN_IF_ERROR(CachedLayout(ctx->input(2), layout));
    return CheckWAndAllocateY(ctx, (*layout)->blocks, y);
  }

  // BlocksparseMatmul's N, after checking x's feature dimension (K with transpose_w, else C).
  absl::Status ForwardRows(OpKernelContext* ctx, int64_t* N) const {
    return RowsOf("x", ctx->input(0), transpose_w_ ? K_ : C_, N);
  }

  // After ForwardRows, given the number of blocks of an already validated layout: w's shape,
  // and y allocated.
  absl::Status CheckWAndAllocateY(OpKernelContext* ctx, int64_t blocks, Tensor** y) const {
    const Tensor& x = ctx->input(0);
    const Tensor& w = ctx->input(1);
    if (w.shape() != TensorShape({blocks, block_size_, block_size_})) {
      return absl::InvalidArgumentError(
          "w must have shape (blocks, block_size, block_size) = (" + std::to_string(blocks) +
          ", " + std::to_string(block_size_) + ", " + std::to_string(block_size_) + "); got " +
          w.shape().DebugString());
    }
    // y = x . W^T with transpose_w: x has K features and y C.
    TensorShape y_shape = x.shape();
    y_shape.set_dim(feature_axis_ == 1 ? x.dims() - 1 : 0, transpose_w_ ? C_ : K_);
    return ctx->allocate_output(0, y_shape, y);
  }

  // Checks BlocksparseMatmulGradW's inputs (x, dy, layout); gives the layout and N, and
  // allocates dw.
  absl::Status PrepareGradW(OpKernelContext* ctx, std::shared_ptr<const BlockLayout>* layout,
                            int64_t* N, Tensor** dw) {
    TF_RETURN_IF_ERROR(GradWRows(ctx, N));  // as in the forward
    TF_RETURN_IF_ERROR(CachedLayout(ctx->input(2), layout));
    return AllocateDw(ctx, (*layout)->blocks, dw);
  }

  // dw (blocks, bs, bs), for an already validated layout of `blocks` blocks.
  absl::Status AllocateDw(OpKernelContext* ctx, int64_t blocks, Tensor** dw) const {
    return ctx->allocate_output(0, TensorShape({blocks, block_size_, block_size_}), dw);
  }

  // BlocksparseMatmulGradW's N, after checking x's and dy's feature dimensions and that their
  // rows pair up: the same leading dimensions (feature_axis 1) or the same N (feature_axis 0).
  absl::Status GradWRows(OpKernelContext* ctx, int64_t* N) const {
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    int64_t N_dy;
    TF_RETURN_IF_ERROR(RowsOf("x", x, C_, N));
    TF_RETURN_IF_ERROR(RowsOf("dy", dy, K_, &N_dy));
    bool same_rows = *N == N_dy;
    if (feature_axis_ == 1) {  // not only as many rows: the same leading dimensions
      same_rows = same_rows && x.dims() == dy.dims();
      for (int d = 0; same_rows && d + 1 < x.dims(); ++d) {
        same_rows = x.dim_size(d) == dy.dim_size(d);
      }
    }
    if (same_rows) return absl::OkStatus();
    return absl::InvalidArgumentError(
        "x " + x.shape().DebugString() + " and dy " + dy.shape().DebugString() +
        (feature_axis_ == 1 ? " must have the same leading dimensions (one row of dy per row of x)"
                            : " must hold the same number of rows N"));
  }

  int64_t block_size_, C_, K_, feature_axis_;
  bool transpose_w_ = false;  // BlocksparseMatmul's attribute (the other ops have none)
  bool constant_layout_ = false;  // the matmul ops' attribute: see LayoutCache

 private:
  LayoutCache<BlockLayout> layouts_;
};

}  // namespace blocksparse

#endif  // BLOCKSPARSE_OPS_BLOCKSPARSE_MATMUL_OP_BASE_H_
