// Memory for large CPU kernel outputs.
//
// glibc's malloc serves every block of 32 MiB or more with a fresh mmap and returns it to
// the kernel on free, so an op that allocates a 64 MiB output on each call pays 16,385 page
// faults (one per 4 KiB page, each zeroing its page) on every call: at (16384, 1024) fp32
// that costs several times the kernel itself (and below 32 MiB glibc's choice between its
// heap and a fresh mapping depends on the process's history). fastlm's kernels allocate
// outputs of 128 KiB or more here instead:
//   * a freed block is kept (keyed by its size, rounded up to 2 MiB, or to 64 KiB below
//     2 MiB) and handed to the next request of that size, so steady-state calls fault
//     nothing at all, as with the CUDA caching allocator. At most FASTLM_CPU_CACHE_MB MiB
//     (default 1024; 0 disables the cache) of free blocks are kept; beyond that a freed
//     block is unmapped.
//   * a new block is pre-faulted with one madvise(MADV_POPULATE_WRITE) call (Linux 5.14+;
//     ignored elsewhere): one system call maps every page, cheaper than taking each 4 KiB
//     fault on first touch. Transparent huge pages (MADV_HUGEPAGE) are not used: they fault
//     fast on a fresh machine but far slower than 4 KiB pages once memory is fragmented
//     (direct compaction). The figures: bench/RESULTS.md, section "Normalization and loss",
//     "Page faults".
// The tensors are ordinary resizable CPU tensors; only their allocator differs.
#include "common.h"

#include <ATen/EmptyTensor.h>
#include <sys/mman.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

namespace fastlm {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kSmallStep = size_t(64) << 10;

size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

void* map_block(size_t bytes) {
  // Over-map by 2 MiB and trim, so the block starts on a 2 MiB boundary.
  const size_t len = bytes + kHugePage;
  void* raw = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t start = round_up(base, kHugePage);
  if (start > base) munmap(raw, start - base);
  const size_t tail = (base + len) - (start + bytes);
  if (tail) munmap(reinterpret_cast<void*>(start + bytes), tail);
  void* p = reinterpret_cast<void*>(start);
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
  madvise(p, bytes, MADV_POPULATE_WRITE);  // best effort: older kernels return EINVAL
  return p;
}

struct Block {
  void* ptr;
  size_t bytes;
};

class OutputPool final : public c10::Allocator {
 public:
  OutputPool() {
    const char* e = std::getenv("FASTLM_CPU_CACHE_MB");
    cap_ = static_cast<size_t>(e ? std::max(0LL, std::atoll(e)) : 1024LL) << 20;
  }

  // The data starts at a rotating offset into its block (0 to 15 steps of 4 KiB + 64 B):
  // blocks all start on 2 MiB boundaries, and buffers that a kernel walks in step (K^T and
  // V, dK and dV, ...) would otherwise map to the same cache sets and 4 KiB-aliasing slots.
  c10::DataPtr allocate(size_t n) override {
    const size_t need = std::max<size_t>(n, 1) + kColors * kColorStep;
    const size_t bytes = round_up(need, need < kHugePage ? kSmallStep : kHugePage);
    void* p = take(bytes);
    if (!p) p = map_block(bytes);
    TORCH_CHECK(p != nullptr, "fastlm: out of memory allocating ", n, " bytes");
    const size_t offset = (color_.fetch_add(1, std::memory_order_relaxed) % kColors) * kColorStep;
    return {static_cast<char*>(p) + offset, new Block{p, bytes}, &OutputPool::release,
            c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  static OutputPool& get() {
    static OutputPool* pool = new OutputPool();  // never destroyed: tensors may outlive statics
    return *pool;
  }

 private:
  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    get().give(b->ptr, b->bytes);
    delete b;
  }

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(bytes);
    if (it == free_.end()) return nullptr;
    void* p = it->second;
    free_.erase(it);
    cached_ -= bytes;
    return p;
  }

  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + bytes <= cap_) {
        free_.emplace(bytes, p);
        cached_ += bytes;
        return;
      }
    }
    munmap(p, bytes);
  }

  static constexpr size_t kColors = 16, kColorStep = 4096 + 64;
  std::atomic<size_t> color_{0};
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
  size_t cap_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  if (nbytes < kLargeOutputBytes) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  return at::detail::empty_generic(sizes, &OutputPool::get(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   c10::nullopt);
}

}  // namespace fastlm
