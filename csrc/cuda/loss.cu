// The row step of fused linear + cross-entropy (CUDA). The glue (csrc/cuda/loss_glue.cpp)
// computes each chunk's logits with cuBLAS; here one block per row, in place:
//   pass 1: running max and sum of exp over the row (each thread online over its
//           elements, then a block reduction that rescales the partial sums),
//   pass 2: z_j <- scale * exp(z_j - lse), minus scale at the target column.
// Vocabulary rows are read with 16-byte float4 loads when V is a multiple of 4.
#include "cuda/common.cuh"
#include "cuda/loss.cuh"

namespace fastlm {
namespace cuda {
namespace {

template <int VEC>
__global__ void ce_rows_kernel(float* __restrict__ z, const int64_t* __restrict__ targets, float* __restrict__ loss,
                               const float* __restrict__ row_scale, int64_t V, int64_t stride, int64_t ignore_index,
                               float scale, bool grad) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  float* zr = z + row * stride;
  const int64_t t = targets[row];
  const bool keep = t != ignore_index;
  const int64_t nvec = V / VEC;
  float m = -INFINITY, s = 0.0f;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Pack<float, VEC> p = load_pack<float, VEC>(zr + i * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float v = p.v[k];
      if (v > m) {
        s = s * __expf(m - v) + 1.0f;
        m = v;
      } else {
        s += __expf(v - m);
      }
    }
  }
  const float gm = block_max(m, scratch);
  const float total = block_sum(m == -INFINITY ? 0.0f : s * __expf(m - gm), scratch);
  const float lse = gm + logf(total);
  if (threadIdx.x == 0) loss[row] = keep ? lse - zr[t] : 0.0f;
  if (!grad) return;
  __syncthreads();  // zr[t] is read above before any thread overwrites it
  const float sc = keep ? (row_scale ? row_scale[row] : scale) : 0.0f;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    Pack<float, VEC> p = load_pack<float, VEC>(zr + i * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float g = __expf(p.v[k] - lse) * sc;
      if (i * VEC + k == t) g -= sc;
      p.v[k] = g;
    }
    store_pack<float, VEC>(zr + i * VEC, p);
  }
}

}  // namespace

cudaError_t cross_entropy_rows(float* z, const int64_t* targets, float* loss, const float* row_scale, int64_t rows,
                               int64_t V, int64_t stride, int64_t ignore_index, float scale, bool grad,
                               cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(rows));
  const int threads = 1024;
  if (V % 4 == 0 && stride % 4 == 0 && aligned16(z))
    ce_rows_kernel<4><<<grid, threads, 0, stream>>>(z, targets, loss, row_scale, V, stride, ignore_index, scale, grad);
  else
    ce_rows_kernel<1><<<grid, threads, 0, stream>>>(z, targets, loss, row_scale, V, stride, ignore_index, scale, grad);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastlm
