// Memory for large CPU kernel outputs.
//
// glibc's malloc serves every block of 32 MiB or more with a fresh mmap and returns it to
// the kernel on free, so an op that allocates a 64 MiB output on each call pays 16,385 page
// faults (one per 4 KiB page, each zeroing its page) on every call: at (16384, 1024) fp32
// that is ~20 ms, ten times the cost of the kernel itself. fastlm's kernels allocate large
// outputs here instead:
//   * blocks are mmap'ed 2 MiB-aligned and advised MADV_HUGEPAGE, so a first touch faults
//     once per 2 MiB (512x fewer faults) where transparent huge pages are enabled;
//   * a freed block is kept (keyed by its size, rounded up to 2 MiB) and handed to the next
//     request of that size, so steady-state calls fault nothing at all, as with the CUDA
//     caching allocator. At most FASTLM_CPU_CACHE_MB MiB (default 1024; 0 disables the
//     cache) of free blocks are kept; beyond that a freed block is unmapped.
// The tensors are ordinary resizable CPU tensors; only their allocator differs.
#include "common.h"

#include <ATen/EmptyTensor.h>
#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

namespace fastlm {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

void* map_block(size_t bytes) {
  // Over-map by one huge page and trim, so the block starts on a 2 MiB boundary.
  const size_t len = bytes + kHugePage;
  void* raw = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t start = round_up(base, kHugePage);
  if (start > base) munmap(raw, start - base);
  const size_t tail = (base + len) - (start + bytes);
  if (tail) munmap(reinterpret_cast<void*>(start + bytes), tail);
  void* p = reinterpret_cast<void*>(start);
#ifdef MADV_HUGEPAGE
  madvise(p, bytes, MADV_HUGEPAGE);
#endif
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

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = round_up(std::max<size_t>(n, 1), kHugePage);
    void* p = take(bytes);
    if (!p) p = map_block(bytes);
    TORCH_CHECK(p != nullptr, "fastlm: out of memory allocating ", n, " bytes");
    return {p, new Block{p, bytes}, &OutputPool::release, c10::Device(c10::DeviceType::CPU)};
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
