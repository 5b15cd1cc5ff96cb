// Shared helpers for fastlm's CPU kernels: input checks, the compute type of each storage
// type, and the SIMD level this file was compiled for.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

namespace fastlm {

inline const char* simd_level() {
#if defined(__AVX512F__)
  return "AVX512";
#elif defined(__AVX2__)
  return "AVX2";
#elif defined(__ARM_NEON)
  return "NEON";
#else
  return "scalar";
#endif
}

// bf16/fp16 are stored and float32 computed; float and double compute as themselves.
template <typename T> struct Acc { using type = T; };
template <> struct Acc<c10::BFloat16> { using type = float; };
template <> struct Acc<c10::Half> { using type = float; };
template <typename T> using acc_t = typename Acc<T>::type;

// The dtype of saved statistics (mean, rstd, logsumexp): float64 for float64 inputs, else float32.
inline at::ScalarType stat_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Outputs of at least this many bytes come from fastlm's output pool (csrc/cpu/memory.cpp):
// reuse of freed blocks, so they do not page-fault on every call (glibc maps a fresh block
// for anything from 128 KiB up, depending on its history: the attention backward of nanoGPT's
// CPU recipe, (12, 4, 64, 32), took 688 faults and 1.5 ms a call that way, against 0.7 ms).
constexpr size_t kLargeOutputBytes = size_t(128) << 10;
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype);

#define FASTLM_CHECK_CPU(t) TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor")

}  // namespace fastlm
