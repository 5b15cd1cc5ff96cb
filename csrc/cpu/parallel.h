// Threads for the CPU kernel cores without torch: parallel_for over a range and the thread
// count. The extension implements parallel_range with ATen's pool (parallel.cpp), so the
// kernels share torch's threads and honour torch.set_num_threads; the plain C++ test driver
// implements it with OpenMP.
#pragma once

#include <cstdint>

namespace fastlm {

using RangeFn = void (*)(const void* ctx, int64_t begin, int64_t end);

// Calls fn(ctx, b, e) on disjoint [b, e) covering [begin, end), in parallel, chunks of at
// least `grain` items.
void parallel_range(int64_t begin, int64_t end, int64_t grain, RangeFn fn, const void* ctx);
int num_threads();

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  parallel_range(
      begin, end, grain, [](const void* c, int64_t b, int64_t e) { (*static_cast<const F*>(c))(b, e); }, &f);
}

}  // namespace fastlm
