// Launcher of the CUDA fused softmax / cross-entropy-gradient row step (csrc/cuda/loss.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastlm {
namespace cuda {

// z: (rows, V) float32 logits, row stride `stride`, rewritten in place to
// scale_row * (softmax(z) - onehot(t)) when grad (scale_row = row_scale[i] if given, else
// `scale`; 0 for rows whose target is ignore_index); loss[i] = logsumexp(z_i) - z_i[t_i]
// (0 for ignored rows).
cudaError_t cross_entropy_rows(float* z, const int64_t* targets, float* loss, const float* row_scale, int64_t rows,
                               int64_t V, int64_t stride, int64_t ignore_index, float scale, bool grad,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace fastlm
