// What the native ops share (one .cpp per op includes this): memory for large outputs that training
// loops allocate every step, and autograd nodes written the way ATen writes its own.
#pragma once

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <torch/csrc/autograd/function.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fused_ops {

// Memory for an op's large outputs (a gradient, an activation). A fresh (4096, 32000) float32 buffer
// costs more in page faults (the OS maps and zeroes 128k pages on first touch: ~0.2 s on the 2-core
// development machine) than a whole cross-entropy pass over it, and a training loop allocates one
// every step; glibc returns large freed blocks to the OS, so torch's CPU allocator faults them in again
// on every step too. An op keeps one of these allocators: it holds the op's most recently freed buffers
// (at most `max_buffers`, and at most kMaxHeldBytes in all; the oldest goes first) and hands one to the
// next request of the same size, its pages already mapped. Cross-entropy keeps one (its gradient);
// BatchNorm a few (y, dx and dresidual of a layer or two). New buffers are 2 MiB aligned and advised as
// transparent huge pages (Linux): 512 times fewer faults on first touch. Allocations and frees are
// reported to torch.profiler (profile_memory=True), as c10's CPU allocator reports its own, a reused
// buffer included.
class ReusingAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(1) << 20;  // smaller requests: at::empty's allocator
  static constexpr size_t kAlign = size_t(2) << 20;
  static constexpr size_t kMaxHeldBytes = size_t(1) << 30;  // freed buffers held, in all

  explicit ReusingAllocator(size_t max_buffers = 1) : max_buffers_(max_buffers) {}

  c10::DataPtr allocate(size_t bytes) override {
    Block* block = nullptr;
    size_t allocated = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = cached_.size(); i-- > 0;) {  // the most recently freed first
        if (cached_[i]->bytes == bytes) {
          block = cached_[i];
          cached_.erase(cached_.begin() + static_cast<std::ptrdiff_t>(i));
          held_ -= bytes;
          break;
        }
      }
      if (block == nullptr) reserved_ += bytes;
      allocated = allocated_ += bytes;
      reserved = reserved_;
    }
    if (block == nullptr) block = new Block{fresh(bytes), bytes, this};
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(block->data, static_cast<int64_t>(bytes), allocated, reserved,
                                       c10::Device(c10::kCPU));
    }
    return {block->data, block, &release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
    ReusingAllocator* owner;
  };

  static void* fresh(size_t bytes) {
    void* data = nullptr;
    TORCH_CHECK(posix_memalign(&data, kAlign, bytes) == 0, "fused_ops: out of memory allocating ", bytes,
                " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(data, bytes, MADV_HUGEPAGE);  // a hint; ignored where transparent huge pages are off
#endif
    return data;
  }

  static void release(void* context) {  // the DataPtr's deleter: when the last tensor lets go
    Block* block = static_cast<Block*>(context);
    ReusingAllocator* owner = block->owner;
    const int64_t bytes = static_cast<int64_t>(block->bytes);
    void* data = block->data;
    std::vector<Block*> evicted;
    size_t allocated = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(owner->mutex_);
      owner->cached_.push_back(block);  // keep this one, and let the oldest go past the limits
      owner->held_ += block->bytes;
      while (owner->cached_.size() > owner->max_buffers_ || owner->held_ > kMaxHeldBytes) {
        Block* oldest = owner->cached_.front();
        owner->cached_.erase(owner->cached_.begin());
        owner->held_ -= oldest->bytes;
        owner->reserved_ -= oldest->bytes;
        evicted.push_back(oldest);
      }
      allocated = owner->allocated_ -= bytes;
      reserved = owner->reserved_;
    }
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(data, -bytes, allocated, reserved, c10::Device(c10::kCPU));
    }
    for (Block* old : evicted) {
      std::free(old->data);
      delete old;
    }
  }

  std::mutex mutex_;
  const size_t max_buffers_;
  std::vector<Block*> cached_;  // freed buffers, oldest first
  size_t held_ = 0;             // bytes in cached_
  size_t allocated_ = 0;        // bytes in buffers that tensors hold
  size_t reserved_ = 0;         // ... and in the ones kept for reuse
};

// An uninitialised contiguous CPU tensor from `allocator` (which must outlive it: ops keep theirs in a
// function-local static that is never destroyed).
inline at::Tensor empty_reusing(ReusingAllocator& allocator, c10::IntArrayRef shape, c10::ScalarType dtype) {
  return at::detail::empty_generic(shape, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

// Autograd nodes. torch 2.13 holds them in c10::intrusive_ptr, torch 2.11 in std::shared_ptr: an op's
// Node subclass is made with make_node<T>(constructor arguments) and handed to set_next_edges / set_history as a NodePtr.
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename T, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::shared_ptr<T>(new T(std::forward<Args>(args)...));
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

}  // namespace fused_ops
