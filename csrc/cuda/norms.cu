// LayerNorm and RMSNorm over the last dimension, optionally fused with a residual add (CUDA).
//
// Forward: one block per row. Pass 1 reads x (+ residual) with 16-byte vector loads, stores
// h = x + residual and sums it; pass 2 re-reads the row (L1/L2-resident) for the centred
// sum of squares; pass 3 writes out = (h - mean) * rstd * w + b. Saved: mean, rstd per row.
// Backward: a grid of `nparts` blocks, each walking rows p, p + nparts, ...; per row, pass 1
// forms sum(g) and sum(g * xhat) (g = dy * w, xhat = (h - mean) * rstd) and adds dy * xhat
// and dy into the block's own row of dw_part / db_part (each element owned by one thread:
// no atomics); pass 2 writes dx = rstd * (g - mean(g) - xhat * mean(g xhat)) (+ dh).
// float32 math for every storage type; the vector width falls back to 1 when C or a pointer
// is not 16-byte aligned.
#include "cuda/common.cuh"
#include "cuda/norms.cuh"

namespace fastlm {
namespace cuda {
namespace {

template <typename T, int VEC, bool RMS, bool RES, bool BIAS>
__global__ void norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
                                const T* __restrict__ b, T* __restrict__ out, T* __restrict__ h,
                                float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t C, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * C;
  const T* src = RES ? h + row * C : xr;
  const int64_t nvec = C / VEC;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    Pack<T, VEC> px = load_pack<T, VEC>(xr + i * VEC);
    if (RES) {
      const Pack<T, VEC> pr = load_pack<T, VEC>(res + row * C + i * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) px.v[k] = from_float<T>(to_float(px.v[k]) + to_float(pr.v[k]));
      store_pack<T, VEC>(h + row * C + i * VEC, px);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum += to_float(px.v[k]);
  }
  const float inv_c = 1.0f / static_cast<float>(C);
  const float mean = RMS ? 0.0f : block_sum(sum, scratch) * inv_c;
  float sq = 0.0f;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Pack<T, VEC> p = load_pack<T, VEC>(src + i * VEC);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = to_float(p.v[k]) - mean;
      sq += d * d;
    }
  }
  const float rstd = rsqrtf(block_sum(sq, scratch) * inv_c + eps);
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Pack<T, VEC> p = load_pack<T, VEC>(src + i * VEC);
    const Pack<T, VEC> pw = load_pack<T, VEC>(w + i * VEC);
    Pack<T, VEC> po;
    if (BIAS) {
      const Pack<T, VEC> pb = load_pack<T, VEC>(b + i * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        po.v[k] = from_float<T>((to_float(p.v[k]) - mean) * rstd * to_float(pw.v[k]) + to_float(pb.v[k]));
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) po.v[k] = from_float<T>((to_float(p.v[k]) - mean) * rstd * to_float(pw.v[k]));
    }
    store_pack<T, VEC>(out + row * C + i * VEC, po);
  }
  if (threadIdx.x == 0) {
    if (!RMS) mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

template <typename T, int VEC, bool RMS, bool DH, bool BIAS>
__global__ void norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ dh, const T* __restrict__ h,
                                const T* __restrict__ w, const float* __restrict__ mean,
                                const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ dw_part,
                                float* __restrict__ db_part, int64_t rows, int64_t C) {
  __shared__ float scratch[32];
  const int64_t nvec = C / VEC;
  const float inv_c = 1.0f / static_cast<float>(C);
  float* dwp = dw_part + blockIdx.x * C;
  float* dbp = BIAS ? db_part + blockIdx.x * C : nullptr;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* dyr = dy + row * C;
    const T* hr = h + row * C;
    const float m = RMS ? 0.0f : mean[row];
    const float rs = rstd[row];
    float sg = 0.0f, sgx = 0.0f;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Pack<T, VEC> pd = load_pack<T, VEC>(dyr + i * VEC);
      const Pack<T, VEC> ph = load_pack<T, VEC>(hr + i * VEC);
      const Pack<T, VEC> pw = load_pack<T, VEC>(w + i * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = to_float(pd.v[k]);
        const float xh = (to_float(ph.v[k]) - m) * rs;
        const float g = d * to_float(pw.v[k]);
        sg += g;
        sgx += g * xh;
        dwp[i * VEC + k] += d * xh;
        if (BIAS) dbp[i * VEC + k] += d;
      }
    }
    const float mg = RMS ? 0.0f : block_sum(sg, scratch) * inv_c;
    const float mgx = block_sum(sgx, scratch) * inv_c;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Pack<T, VEC> pd = load_pack<T, VEC>(dyr + i * VEC);
      const Pack<T, VEC> ph = load_pack<T, VEC>(hr + i * VEC);
      const Pack<T, VEC> pw = load_pack<T, VEC>(w + i * VEC);
      Pack<T, VEC> pdh;
      if (DH) pdh = load_pack<T, VEC>(dh + row * C + i * VEC);
      Pack<T, VEC> po;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float xh = (to_float(ph.v[k]) - m) * rs;
        const float g = to_float(pd.v[k]) * to_float(pw.v[k]);
        float v = (C == 1 && !RMS) ? 0.0f : rs * ((g - mg) - xh * mgx);
        if (DH) v += to_float(pdh.v[k]);
        po.v[k] = from_float<T>(v);
      }
      store_pack<T, VEC>(dx + row * C + i * VEC, po);
    }
  }
}

int threads_for(int64_t work) {
  int t = 32;
  while (t < 1024 && t < work) t *= 2;
  return t;
}

template <typename T, int VEC>
cudaError_t fwd_vec(const T* x, const T* res, const T* w, const T* b, T* out, T* h, float* mean, float* rstd,
                    int64_t rows, int64_t C, float eps, bool rms, cudaStream_t s) {
  const int threads = threads_for(C / VEC);
  const dim3 grid(static_cast<unsigned>(rows));
#define FASTLM_FWD(R, RES, B) \
  norm_fwd_kernel<T, VEC, R, RES, B><<<grid, threads, 0, s>>>(x, res, w, b, out, h, mean, rstd, C, eps)
  const bool has_res = res != nullptr, has_b = b != nullptr;
  if (rms) {
    if (has_res) FASTLM_FWD(true, true, false); else FASTLM_FWD(true, false, false);
  } else if (has_res) {
    if (has_b) FASTLM_FWD(false, true, true); else FASTLM_FWD(false, true, false);
  } else {
    if (has_b) FASTLM_FWD(false, false, true); else FASTLM_FWD(false, false, false);
  }
#undef FASTLM_FWD
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t bwd_vec(const T* dy, const T* dh, const T* h, const T* w, const float* mean, const float* rstd, T* dx,
                    float* dw_part, float* db_part, int64_t rows, int64_t C, int nparts, bool rms, cudaStream_t s) {
  const int threads = threads_for(C / VEC);
  const dim3 grid(static_cast<unsigned>(nparts));
#define FASTLM_BWD(R, DH, B) \
  norm_bwd_kernel<T, VEC, R, DH, B><<<grid, threads, 0, s>>>(dy, dh, h, w, mean, rstd, dx, dw_part, db_part, rows, C)
  const bool has_dh = dh != nullptr, has_b = db_part != nullptr;
  if (rms) {
    if (has_dh) FASTLM_BWD(true, true, false); else FASTLM_BWD(true, false, false);
  } else if (has_dh) {
    if (has_b) FASTLM_BWD(false, true, true); else FASTLM_BWD(false, true, false);
  } else {
    if (has_b) FASTLM_BWD(false, false, true); else FASTLM_BWD(false, false, false);
  }
#undef FASTLM_BWD
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_typed(const void* x, const void* res, const void* w, const void* b, void* out, void* h, float* mean,
                      float* rstd, int64_t rows, int64_t C, float eps, bool rms, cudaStream_t s) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = C % kVec == 0 && aligned16(x) && aligned16(res) && aligned16(w) && aligned16(b) &&
                   aligned16(out) && aligned16(h);
  auto X = static_cast<const T*>(x), R = static_cast<const T*>(res), W = static_cast<const T*>(w),
       B = static_cast<const T*>(b);
  auto O = static_cast<T*>(out), H = static_cast<T*>(h);
  if (vec) return fwd_vec<T, kVec>(X, R, W, B, O, H, mean, rstd, rows, C, eps, rms, s);
  return fwd_vec<T, 1>(X, R, W, B, O, H, mean, rstd, rows, C, eps, rms, s);
}

template <typename T>
cudaError_t bwd_typed(const void* dy, const void* dh, const void* h, const void* w, const float* mean,
                      const float* rstd, void* dx, float* dw_part, float* db_part, int64_t rows, int64_t C, int nparts,
                      bool rms, cudaStream_t s) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = C % kVec == 0 && aligned16(dy) && aligned16(dh) && aligned16(h) && aligned16(w) && aligned16(dx);
  auto DY = static_cast<const T*>(dy), DH = static_cast<const T*>(dh), H = static_cast<const T*>(h),
       W = static_cast<const T*>(w);
  auto DX = static_cast<T*>(dx);
  if (vec) return bwd_vec<T, kVec>(DY, DH, H, W, mean, rstd, DX, dw_part, db_part, rows, C, nparts, rms, s);
  return bwd_vec<T, 1>(DY, DH, H, W, mean, rstd, DX, dw_part, db_part, rows, C, nparts, rms, s);
}

}  // namespace

cudaError_t norm_fwd(int dtype, const void* x, const void* res, const void* w, const void* b, void* out, void* h,
                     float* mean, float* rstd, int64_t rows, int64_t C, float eps, bool rms, cudaStream_t stream) {
  if (rows == 0 || C == 0) return cudaSuccess;
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat: return fwd_typed<float>(x, res, w, b, out, h, mean, rstd, rows, C, eps, rms, stream);
    case DType::kBFloat16:
      return fwd_typed<__nv_bfloat16>(x, res, w, b, out, h, mean, rstd, rows, C, eps, rms, stream);
    case DType::kHalf: return fwd_typed<__half>(x, res, w, b, out, h, mean, rstd, rows, C, eps, rms, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t norm_bwd(int dtype, const void* dy, const void* dh, const void* h, const void* w, const float* mean,
                     const float* rstd, void* dx, float* dw_part, float* db_part, int64_t rows, int64_t C,
                     int nparts, bool rms, cudaStream_t stream) {
  if (rows == 0 || C == 0) return cudaSuccess;
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat:
      return bwd_typed<float>(dy, dh, h, w, mean, rstd, dx, dw_part, db_part, rows, C, nparts, rms, stream);
    case DType::kBFloat16:
      return bwd_typed<__nv_bfloat16>(dy, dh, h, w, mean, rstd, dx, dw_part, db_part, rows, C, nparts, rms, stream);
    case DType::kHalf:
      return bwd_typed<__half>(dy, dh, h, w, mean, rstd, dx, dw_part, db_part, rows, C, nparts, rms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastlm
