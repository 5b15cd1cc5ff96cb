// Launchers of the CUDA LayerNorm / RMSNorm kernels (csrc/cuda/norms.cu), torch-free.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastlm {
namespace cuda {

// Forward over `rows` rows of C elements (contiguous). res/b/h may be null; mean is
// unused (may be null) when rms. dtype: 0 float, 1 bfloat16, 2 half.
cudaError_t norm_fwd(int dtype, const void* x, const void* res, const void* w, const void* b, void* out, void* h,
                     float* mean, float* rstd, int64_t rows, int64_t C, float eps, bool rms, cudaStream_t stream);

// Backward. dw_part/db_part: (nparts, C) float32, zero-filled; row block p writes only row p.
// dh/db_part may be null.
cudaError_t norm_bwd(int dtype, const void* dy, const void* dh, const void* h, const void* w, const float* mean,
                     const float* rstd, void* dx, float* dw_part, float* db_part, int64_t rows, int64_t C,
                     int nparts, bool rms, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastlm
