// Shared helpers for the torch side of fastlm's CPU kernels: input checks, the kernel
// cores' dtype of a tensor, and the output pool.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

namespace fastlm {

// The dtype of saved statistics (mean, rstd, logsumexp): float64 for float64 inputs, else float32.
inline at::ScalarType stat_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The kernel cores' name of a floating-point dtype (they take float32, float64, bf16, fp16).
inline Dtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Dtype::f32;
    case at::kDouble: return Dtype::f64;
    case at::kBFloat16: return Dtype::bf16;
    case at::kHalf: return Dtype::f16;
    default: TORCH_CHECK_TYPE(false, "fastlm: the CPU kernels take float32, float64, bfloat16 or float16, got ", t);
  }
}

// Outputs of at least this many bytes come from fastlm's output pool (csrc/cpu/memory.cpp):
// reuse of freed blocks, so they do not page-fault on every call (glibc maps a fresh block
// for anything from 128 KiB up, depending on its history).
constexpr size_t kLargeOutputBytes = size_t(128) << 10;
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype);

// Decode attention on raw pointers: q (B, H, Tq, D) and out contiguous float32, the caches
// (B, Hkv, L, D) contiguous of kv_dtype (f32, bf16 or f16, read as stored), lens (B,)
// checked by the caller; plans the slices of the cache and takes the scratch from the
// output pool (csrc/cpu/attention.cpp).
void run_decode_attention(const float* q, const void* kc, const void* vc, Dtype kv_dtype, const int64_t* lens,
                          float* out, int64_t B, int64_t H, int64_t Hkv, int64_t Tq, int64_t L, int64_t D,
                          double scale);

#define FASTLM_CHECK_CPU(t) TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor")

}  // namespace fastlm
