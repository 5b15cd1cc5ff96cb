// parallel.h over ATen's thread pool: the kernel cores run on torch's threads and follow
// torch.set_num_threads.
#include <ATen/Parallel.h>

#include "cpu/parallel.h"

namespace fastlm {

void parallel_range(int64_t begin, int64_t end, int64_t grain, RangeFn fn, const void* ctx) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { fn(ctx, b, e); });
}

int num_threads() { return at::get_num_threads(); }

}  // namespace fastlm
