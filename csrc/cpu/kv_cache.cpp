// kv_cache_write on the CPU: a decode step's new keys and values written into a preallocated
// KV cache, for each sequence b k_cache[b, :, positions[b], :] = k[b] and the same for v.
// One call that copies B x Hkv rows of D elements, where two index_put_ calls a layer would
// each set up a TensorIterator for advanced indexing (bench/RESULTS.md, section "Generation",
// "The KV-cache write"). Any dtype, any strides with a unit stride along D. New entries of
// another floating dtype than the cache's (float32 into a bf16 / fp16 cache) are converted
// first with torch's own rounding (round to nearest even), as x.to(cache.dtype) would.
#include <cstring>

#include "common.h"

namespace fastlm {
namespace {

void check_pair(const at::Tensor& cache, const at::Tensor& x, const char* cname, const char* xname) {
  TORCH_CHECK_VALUE(cache.dim() == 4, "kv_cache_write: ", cname, " must be (B, Hkv, L, D), got ", cache.sizes());
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) == cache.size(0) && x.size(1) == cache.size(1) &&
                        x.size(2) == cache.size(3),
                    "kv_cache_write: ", xname, " must be (B, Hkv, D) = (", cache.size(0), ", ", cache.size(1), ", ",
                    cache.size(3), "), got ", x.sizes());
  const auto ct = cache.scalar_type(), xt = x.scalar_type();
  const bool narrowing = xt == at::kFloat && (ct == at::kBFloat16 || ct == at::kHalf);
  TORCH_CHECK_TYPE(xt == ct || narrowing, "kv_cache_write: ", xname, " is ", xt, " but ", cname, " is ", ct,
                   " (new entries must have the cache's dtype, or be float32 for a bfloat16 / float16 cache)");
}

// Where row (b, h) of the new entries goes.
inline char* dest_row(at::Tensor& cache, const int64_t* pos, int64_t b, int64_t h) {
  return static_cast<char*>(cache.data_ptr()) +
         (b * cache.stride(0) + h * cache.stride(1) + pos[b] * cache.stride(2)) * cache.element_size();
}

// Copies rows x[b, h, :] to cache[b, h, positions[b], :].
void write_rows(at::Tensor& cache, const at::Tensor& x_, const int64_t* pos) {
  const at::Tensor x = x_.scalar_type() != cache.scalar_type() ? x_.to(cache.scalar_type()).contiguous()
                       : x_.stride(2) == 1                     ? x_
                                                               : x_.contiguous();
  const int64_t B = cache.size(0), H = cache.size(1);
  const size_t es = cache.element_size(), row = cache.size(3) * es;
  const char* src = static_cast<const char*>(x.data_ptr());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      std::memcpy(dest_row(cache, pos, b, h), src + (b * x.stride(0) + h * x.stride(1)) * es, row);
}

void kv_cache_write(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& positions) {
  FASTLM_CHECK_CPU(k_cache);
  FASTLM_CHECK_CPU(v_cache);
  FASTLM_CHECK_CPU(k);
  FASTLM_CHECK_CPU(v);
  FASTLM_CHECK_CPU(positions);
  check_pair(k_cache, k, "k_cache", "k");
  check_pair(v_cache, v, "v_cache", "v");
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "kv_cache_write: k_cache and v_cache must have one shape");
  const int64_t B = k_cache.size(0), L = k_cache.size(2);
  TORCH_CHECK_VALUE(positions.dim() == 1 && positions.size(0) == B &&
                        (positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong),
                    "kv_cache_write: positions must be an int32/int64 tensor of shape (", B, ",)");
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(p[b] >= 0 && p[b] < L, "kv_cache_write: positions[", b, "] = ", p[b],
                      " is outside the cache's [0, L = ", L, ")");
  for (const at::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->size(3) <= 1 || c->stride(3) == 1, "kv_cache_write: the cache's last dimension must be contiguous");
  write_rows(k_cache, k, p);
  write_rows(v_cache, v, p);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("kv_cache_write", &kv_cache_write); }

}  // namespace fastlm
