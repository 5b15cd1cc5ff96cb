// Flash attention on CUDA: forward (also split-cache decode) and backward. Torch-free.
//
// Forward, one block of 4 warps per (16 query rows, batch x head[, cache slice]); each warp
// owns 4 query rows, each lane D/32 of their output columns. Key/value tiles of 32 keys are
// staged in shared memory; lane j scores key j against the warp's rows, the warp keeps a
// running max and sum per row (online softmax in base 2), rescales its accumulators and adds
// P V with the probabilities broadcast by warp shuffles. Tiles past the causal limit are
// never loaded. Saved: lse = (m + log2 l) ln 2 per row (+inf for a row that sees no key).
// Decode is the same kernel with per-sequence key counts and the keys cut into slices
// (gridDim.z), whose partial outputs the glue combines by their logsumexps.
// Backward (FlashAttention 2): P = 2^(S - lse log2 e), dS = P (dP - delta), dP = dO V^T,
// delta = rowsum(dO o O). One kernel per 16-key block accumulates dK = scale dS^T Q and
// dV = P^T dO over the query tiles that see it (lane = query row); one per 16-query block
// accumulates dQ = scale dS K (lane = key). No atomics.
// Storage float32 / float16 / bfloat16, arithmetic float32.
#include "cuda/attention.cuh"
#include "cuda/common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace fastlm {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRB = kWarps * kRowsPerWarp;  // query rows (or keys) per block
constexpr int kBN = 32;                      // keys (or query rows) per shared-memory tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
__device__ __forceinline__ float ld(const T* p, Strides4 s, int b, int h, int t, int d) {
  return to_float(p[b * s.b + h * s.h + (int64_t)t * s.t + d * s.d]);
}

// ------------------------------------------------------------------ forward / decode
template <typename T, int NE>
__global__ void __launch_bounds__(kWarps * 32)
fwd_kernel(const T* __restrict__ q, Strides4 sq, const T* __restrict__ k, Strides4 sk, const T* __restrict__ v,
           Strides4 sv, void* __restrict__ out, float* __restrict__ lse, const int32_t* __restrict__ lens, int H,
           int G, int Tq, int Tk_all, int D, bool causal, float sl2, int chunk, bool out_f32) {
  extern __shared__ float smem[];
  float* q_s = smem;                    // [kRB][D], pre-scaled by scale log2 e
  float* k_s = q_s + kRB * D;           // [kBN][D + 1]
  float* v_s = k_s + kBN * (D + 1);     // [kBN][D]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.y, b = bh / H, h = bh % H, hk = h / G;
  const int split = blockIdx.z, q0 = blockIdx.x * kRB;
  const int BH = gridDim.y;
  const int Tk = lens ? lens[b] : Tk_all;
  const int off = Tk - Tq;
  for (int idx = threadIdx.x; idx < kRB * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D, i = q0 + r;
    q_s[idx] = i < Tq ? ld(q, sq, b, h, i, d) * sl2 : 0.f;
  }
  int hi = causal ? min(Tk, q0 + kRB + off) : Tk;
  const int lo = split * chunk;
  hi = min(hi, lo + chunk);
  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][NE];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < NE; ++e) acc[r][e] = 0.f;
  }
  for (int n0 = lo; n0 < hi; n0 += kBN) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kBN * D; idx += blockDim.x) {
      const int c = idx / D, d = idx % D, j = n0 + c;
      k_s[c * (D + 1) + d] = j < hi ? ld(k, sk, b, hk, j, d) : 0.f;
      v_s[c * D + d] = j < hi ? ld(v, sv, b, hk, j, d) : 0.f;
    }
    __syncthreads();
    const int j = n0 + lane;
    float s[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) s[r] = 0.f;
    for (int d = 0; d < D; ++d) {
      const float kd = k_s[lane * (D + 1) + d];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) s[r] += q_s[(warp * kRowsPerWarp + r) * D + d] * kd;
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int i = q0 + warp * kRowsPerWarp + r;
      const bool ok = j < hi && i < Tq && (!causal || j <= i + off);
      const float x = ok ? s[r] : -INFINITY;
      const float mn = fmaxf(m[r], warp_max(x));
      const float ms = mn == -INFINITY ? 0.f : mn;
      const float p = ok ? exp2f(x - ms) : 0.f;
      const float alpha = exp2f(m[r] - ms);
      l[r] = l[r] * alpha + warp_sum(p);
      m[r] = mn;
#pragma unroll
      for (int e = 0; e < NE; ++e) acc[r][e] *= alpha;
      s[r] = p;
    }
    for (int jj = 0; jj < kBN; ++jj) {
      float vv[NE];
#pragma unroll
      for (int e = 0; e < NE; ++e) {
        const int d = lane + 32 * e;
        vv[e] = d < D ? v_s[jj * D + d] : 0.f;
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const float pj = __shfl_sync(kFull, s[r], jj);
#pragma unroll
        for (int e = 0; e < NE; ++e) acc[r][e] += pj * vv[e];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = q0 + warp * kRowsPerWarp + r;
    if (i >= Tq) continue;
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    const int64_t row = ((int64_t)split * BH + bh) * Tq + i;
#pragma unroll
    for (int e = 0; e < NE; ++e) {
      const int d = lane + 32 * e;
      if (d >= D) continue;
      if (out_f32) static_cast<float*>(out)[row * D + d] = acc[r][e] * inv;
      else static_cast<T*>(out)[row * D + d] = from_float<T>(acc[r][e] * inv);
    }
    if (lane == 0) lse[row] = l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : INFINITY;
  }
}

// ------------------------------------------------------------------ backward: dK, dV
template <typename T, int NE>
__global__ void __launch_bounds__(kWarps * 32)
bwd_dkdv_kernel(const T* __restrict__ q, Strides4 sq, const T* __restrict__ k, Strides4 sk, const T* __restrict__ v,
                Strides4 sv, const T* __restrict__ dout, Strides4 sdo, const float* __restrict__ lse,
                const float* __restrict__ delta, float* __restrict__ dk, float* __restrict__ dv, int H, int G, int Tq,
                int Tk, int D, bool causal, float sl2, float scale) {
  extern __shared__ float smem[];
  float* k_s = smem;                    // [kRB][D]
  float* v_s = k_s + kRB * D;           // [kRB][D]
  float* q_s = v_s + kRB * D;           // [kBN][D + 1]
  float* do_s = q_s + kBN * (D + 1);    // [kBN][D + 1]
  float* l_s = do_s + kBN * (D + 1);    // [kBN]
  float* dl_s = l_s + kBN;              // [kBN]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.y, b = bh / H, h = bh % H, hk = h / G;
  const int k0 = blockIdx.x * kRB, off = Tk - Tq;
  for (int idx = threadIdx.x; idx < kRB * D; idx += blockDim.x) {
    const int c = idx / D, d = idx % D, j = k0 + c;
    k_s[idx] = j < Tk ? ld(k, sk, b, hk, j, d) : 0.f;
    v_s[idx] = j < Tk ? ld(v, sv, b, hk, j, d) : 0.f;
  }
  float dka[kRowsPerWarp][NE], dva[kRowsPerWarp][NE];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int e = 0; e < NE; ++e) dka[r][e] = dva[r][e] = 0.f;
  int lo = causal ? max(0, k0 - off) : 0;
  lo = lo / kBN * kBN;
  for (int m0 = lo; m0 < Tq; m0 += kBN) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kBN * D; idx += blockDim.x) {
      const int c = idx / D, d = idx % D, i = m0 + c;
      q_s[c * (D + 1) + d] = i < Tq ? ld(q, sq, b, h, i, d) : 0.f;
      do_s[c * (D + 1) + d] = i < Tq ? ld(dout, sdo, b, h, i, d) : 0.f;
    }
    for (int c = threadIdx.x; c < kBN; c += blockDim.x) {
      const int i = m0 + c;
      l_s[c] = i < Tq ? lse[(int64_t)bh * Tq + i] * kLog2e : INFINITY;
      dl_s[c] = i < Tq ? delta[(int64_t)bh * Tq + i] : 0.f;
    }
    __syncthreads();
    const int i = m0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int kr = warp * kRowsPerWarp + r, j = k0 + kr;
      float s = 0.f, dp = 0.f;
      for (int d = 0; d < D; ++d) {
        s += q_s[lane * (D + 1) + d] * k_s[kr * D + d];
        dp += do_s[lane * (D + 1) + d] * v_s[kr * D + d];
      }
      const bool ok = i < Tq && j < Tk && (!causal || j <= i + off);
      const float p = ok ? exp2f(s * sl2 - l_s[lane]) : 0.f;
      const float ds = p * (dp - dl_s[lane]);
      for (int jj = 0; jj < kBN; ++jj) {
        const float pj = __shfl_sync(kFull, p, jj), dsj = __shfl_sync(kFull, ds, jj);
#pragma unroll
        for (int e = 0; e < NE; ++e) {
          const int d = lane + 32 * e;
          if (d < D) {
            dva[r][e] += pj * do_s[jj * (D + 1) + d];
            dka[r][e] += dsj * q_s[jj * (D + 1) + d];
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int j = k0 + warp * kRowsPerWarp + r;
    if (j >= Tk) continue;
#pragma unroll
    for (int e = 0; e < NE; ++e) {
      const int d = lane + 32 * e;
      if (d >= D) continue;
      const int64_t o = ((int64_t)bh * Tk + j) * D + d;
      dk[o] = dka[r][e] * scale;
      dv[o] = dva[r][e];
    }
  }
}

// ------------------------------------------------------------------ backward: dQ
template <typename T, int NE>
__global__ void __launch_bounds__(kWarps * 32)
bwd_dq_kernel(const T* __restrict__ q, Strides4 sq, const T* __restrict__ k, Strides4 sk, const T* __restrict__ v,
              Strides4 sv, const T* __restrict__ dout, Strides4 sdo, const float* __restrict__ lse,
              const float* __restrict__ delta, float* __restrict__ dq, int H, int G, int Tq, int Tk, int D,
              bool causal, float sl2, float scale) {
  extern __shared__ float smem[];
  float* q_s = smem;                    // [kRB][D]
  float* do_s = q_s + kRB * D;          // [kRB][D]
  float* k_s = do_s + kRB * D;          // [kBN][D + 1]
  float* v_s = k_s + kBN * (D + 1);     // [kBN][D + 1]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.y, b = bh / H, h = bh % H, hk = h / G;
  const int q0 = blockIdx.x * kRB, off = Tk - Tq;
  for (int idx = threadIdx.x; idx < kRB * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D, i = q0 + r;
    q_s[idx] = i < Tq ? ld(q, sq, b, h, i, d) : 0.f;
    do_s[idx] = i < Tq ? ld(dout, sdo, b, h, i, d) : 0.f;
  }
  float l2[kRowsPerWarp], dl[kRowsPerWarp], dqa[kRowsPerWarp][NE];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = q0 + warp * kRowsPerWarp + r;
    l2[r] = i < Tq ? lse[(int64_t)bh * Tq + i] * kLog2e : INFINITY;
    dl[r] = i < Tq ? delta[(int64_t)bh * Tq + i] : 0.f;
#pragma unroll
    for (int e = 0; e < NE; ++e) dqa[r][e] = 0.f;
  }
  const int hi = causal ? min(Tk, q0 + kRB + off) : Tk;
  for (int n0 = 0; n0 < hi; n0 += kBN) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kBN * D; idx += blockDim.x) {
      const int c = idx / D, d = idx % D, j = n0 + c;
      k_s[c * (D + 1) + d] = j < Tk ? ld(k, sk, b, hk, j, d) : 0.f;
      v_s[c * (D + 1) + d] = j < Tk ? ld(v, sv, b, hk, j, d) : 0.f;
    }
    __syncthreads();
    const int j = n0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp * kRowsPerWarp + r, i = q0 + row;
      float s = 0.f, dp = 0.f;
      for (int d = 0; d < D; ++d) {
        s += q_s[row * D + d] * k_s[lane * (D + 1) + d];
        dp += do_s[row * D + d] * v_s[lane * (D + 1) + d];
      }
      const bool ok = i < Tq && j < Tk && (!causal || j <= i + off);
      const float p = ok ? exp2f(s * sl2 - l2[r]) : 0.f;
      const float ds = p * (dp - dl[r]);
      for (int jj = 0; jj < kBN; ++jj) {
        const float dsj = __shfl_sync(kFull, ds, jj);
#pragma unroll
        for (int e = 0; e < NE; ++e) {
          const int d = lane + 32 * e;
          if (d < D) dqa[r][e] += dsj * k_s[jj * (D + 1) + d];
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = q0 + warp * kRowsPerWarp + r;
    if (i >= Tq) continue;
#pragma unroll
    for (int e = 0; e < NE; ++e) {
      const int d = lane + 32 * e;
      if (d < D) dq[((int64_t)bh * Tq + i) * D + d] = dqa[r][e] * scale;
    }
  }
}

int lanes_per_row(int D) {  // NE: columns per lane, rounded up to 1, 2, 4 or 8
  const int ne = (D + 31) / 32;
  return ne <= 1 ? 1 : ne <= 2 ? 2 : ne <= 4 ? 4 : 8;
}

template <typename Kernel>
cudaError_t prepare(Kernel kernel, size_t smem) {
  if (smem > 48 * 1024) return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  return cudaSuccess;
}

template <typename T, int NE>
cudaError_t fwd_launch(const void* q, Strides4 sq, const void* k, Strides4 sk, const void* v, Strides4 sv, void* out,
                       float* lse, const int32_t* lens, int B, int H, int Hkv, int Tq, int Tk, int D, bool causal,
                       float scale, int nsplit, cudaStream_t stream) {
  const size_t smem = sizeof(float) * (kRB * D + kBN * (D + 1) + kBN * D);
  auto kernel = fwd_kernel<T, NE>;
  cudaError_t err = prepare(kernel, smem);
  if (err != cudaSuccess) return err;
  const int chunk = ((Tk + nsplit - 1) / nsplit + kBN - 1) / kBN * kBN;
  dim3 grid((Tq + kRB - 1) / kRB, B * H, nsplit);
  kernel<<<grid, kWarps * 32, smem, stream>>>(static_cast<const T*>(q), sq, static_cast<const T*>(k), sk,
                                              static_cast<const T*>(v), sv, out, lse, lens, H, H / Hkv, Tq, Tk, D,
                                              causal, scale * kLog2e, chunk, nsplit > 1);
  return cudaGetLastError();
}

template <typename T, int NE>
cudaError_t bwd_launch(const void* q, Strides4 sq, const void* k, Strides4 sk, const void* v, Strides4 sv,
                       const void* dout, Strides4 sdo, const float* lse, const float* delta, float* dq, float* dk,
                       float* dv, int B, int H, int Hkv, int Tq, int Tk, int D, bool causal, float scale,
                       cudaStream_t stream) {
  const T *qp = static_cast<const T*>(q), *kp = static_cast<const T*>(k), *vp = static_cast<const T*>(v),
          *dop = static_cast<const T*>(dout);
  const size_t smem_kv = sizeof(float) * (2 * kRB * D + 2 * kBN * (D + 1) + 2 * kBN);
  auto kkv = bwd_dkdv_kernel<T, NE>;
  cudaError_t err = prepare(kkv, smem_kv);
  if (err != cudaSuccess) return err;
  kkv<<<dim3((Tk + kRB - 1) / kRB, B * H), kWarps * 32, smem_kv, stream>>>(
      qp, sq, kp, sk, vp, sv, dop, sdo, lse, delta, dk, dv, H, H / Hkv, Tq, Tk, D, causal, scale * kLog2e, scale);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t smem_q = sizeof(float) * (2 * kRB * D + 2 * kBN * (D + 1));
  auto kq = bwd_dq_kernel<T, NE>;
  err = prepare(kq, smem_q);
  if (err != cudaSuccess) return err;
  kq<<<dim3((Tq + kRB - 1) / kRB, B * H), kWarps * 32, smem_q, stream>>>(
      qp, sq, kp, sk, vp, sv, dop, sdo, lse, delta, dq, H, H / Hkv, Tq, Tk, D, causal, scale * kLog2e, scale);
  return cudaGetLastError();
}

#define FASTLM_ATTN_DISPATCH(DTYPE, D, LAUNCH, ...)                                          \
  do {                                                                                       \
    const int ne_ = lanes_per_row(D);                                                        \
    switch (DTYPE) {                                                                         \
      case AttnDtype::kFloat32:                                                              \
        return ne_ == 1 ? LAUNCH<float, 1>(__VA_ARGS__) : ne_ == 2 ? LAUNCH<float, 2>(__VA_ARGS__) \
             : ne_ == 4 ? LAUNCH<float, 4>(__VA_ARGS__) : LAUNCH<float, 8>(__VA_ARGS__);     \
      case AttnDtype::kFloat16:                                                              \
        return ne_ == 1 ? LAUNCH<__half, 1>(__VA_ARGS__) : ne_ == 2 ? LAUNCH<__half, 2>(__VA_ARGS__) \
             : ne_ == 4 ? LAUNCH<__half, 4>(__VA_ARGS__) : LAUNCH<__half, 8>(__VA_ARGS__);   \
      default:                                                                               \
        return ne_ == 1 ? LAUNCH<__nv_bfloat16, 1>(__VA_ARGS__)                              \
             : ne_ == 2 ? LAUNCH<__nv_bfloat16, 2>(__VA_ARGS__)                              \
             : ne_ == 4 ? LAUNCH<__nv_bfloat16, 4>(__VA_ARGS__) : LAUNCH<__nv_bfloat16, 8>(__VA_ARGS__); \
    }                                                                                        \
  } while (0)

}  // namespace

cudaError_t attention_fwd(AttnDtype dtype, const void* q, Strides4 sq, const void* k, Strides4 sk, const void* v,
                          Strides4 sv, void* out, float* lse, const int32_t* lens, int B, int H, int Hkv, int Tq,
                          int Tk, int D, bool causal, float scale, int nsplit, cudaStream_t stream) {
  if (B * H * Tq == 0) return cudaSuccess;
  FASTLM_ATTN_DISPATCH(dtype, D, fwd_launch, q, sq, k, sk, v, sv, out, lse, lens, B, H, Hkv, Tq, Tk, D, causal, scale,
                       nsplit, stream);
}

cudaError_t attention_bwd(AttnDtype dtype, const void* q, Strides4 sq, const void* k, Strides4 sk, const void* v,
                          Strides4 sv, const void* dout, Strides4 sdo, const float* lse, const float* delta, float* dq,
                          float* dk, float* dv, int B, int H, int Hkv, int Tq, int Tk, int D, bool causal, float scale,
                          cudaStream_t stream) {
  if (B * H * Tq == 0) return cudaSuccess;
  FASTLM_ATTN_DISPATCH(dtype, D, bwd_launch, q, sq, k, sk, v, sv, dout, sdo, lse, delta, dq, dk, dv, B, H, Hkv, Tq, Tk,
                       D, causal, scale, stream);
}

}  // namespace cuda
}  // namespace fastlm
