// Launchers of the CUDA attention kernels (csrc/cuda/attention.cu). Torch-free: raw pointers,
// sizes, element strides and a stream; csrc/cuda/attention_glue.cpp is the torch glue.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace fastlm {
namespace cuda {

enum class AttnDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Strides of a (B, H, T, D) tensor, in elements.
struct Strides4 {
  int64_t b, h, t, d;
};

// out: (nsplit, B, H, Tq, D) contiguous, of the input dtype when nsplit == 1, else float32;
// lse: (nsplit, B, H, Tq) float32 (natural log, +inf for a query that sees no key).
// lens (nullable, int32 (B,)): per-sequence key counts; then Tk is L_max, masking is causal
// bottom-right per sequence, and the keys are cut into nsplit slices (decode).
cudaError_t attention_fwd(AttnDtype dtype, const void* q, Strides4 sq, const void* k, Strides4 sk, const void* v,
                          Strides4 sv, void* out, float* lse, const int32_t* lens, int B, int H, int Hkv, int Tq,
                          int Tk, int D, bool causal, float scale, int nsplit, cudaStream_t stream);

// dq: (B, H, Tq, D) float32; dk, dv: (B, H, Tk, D) float32 (one per query head; the glue sums
// the heads of a group). lse, delta (= rowsum(dO o O)): (B, H, Tq) float32 contiguous.
cudaError_t attention_bwd(AttnDtype dtype, const void* q, Strides4 sq, const void* k, Strides4 sk, const void* v,
                          Strides4 sv, const void* dout, Strides4 sdo, const float* lse, const float* delta, float* dq,
                          float* dk, float* dv, int B, int H, int Hkv, int Tq, int Tk, int D, bool causal, float scale,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace fastlm
