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
//
// Tensor-core path (float16 / bfloat16, D a multiple of 16 up to 128, kernels built for sm_80+):
// nvcuda::wmma 16x16x16 fragments, float32 accumulation, the same outputs and lse as above.
// Forward / decode: one block of 4 warps per (64 query rows, batch x head[, cache slice]); warp w
// owns rows 16w..16w+15: their Q as A fragments in registers (staged once through shared memory),
// their output as float32 accumulator fragments, the running max and sum of row r in lane r. The
// block loads K and V tiles of 64 keys into shared memory element-wise through the strides (16-byte
// loads when d is contiguous and aligned; rows past the slice's end are zero). Each warp stores
// S = Q K^T in its own 16 x 64 float32 slice of shared memory, runs the base-2 online softmax a row
// at a time (lane = key; the causal tail and keys past the slice masked), writes P in the storage
// dtype to its own slice, rescales its accumulators through its S slice when a row's max moved, and
// adds P V. Tiles past the block's causal limit are not loaded; a warp skips the tiles and 16-key
// blocks that none of its rows can see.
// Backward, the same two kernels: dK/dV with 64 keys a block (warp = 16 keys, whose dK and dV are
// accumulator fragments) over query tiles of 32 rows of Q and dO in shared memory: per warp
// S^T = K Q^T and dP^T = V dO^T into float32 slices, then (lane = query) P^T and dS^T in the storage
// dtype, dV += P^T dO, dK += dS^T Q. dQ with 64 queries a block (warp = 16 queries) over key tiles of
// 32: S, dP, then (lane = key) dS, dQ += dS K. P and dS are rounded to the storage dtype as MMA
// operands (as FlashAttention does); lse, delta and every sum stay float32. Any other case (float32,
// other D, a device or build below sm_80) takes the SIMT kernels.
#include "cuda/attention.cuh"
#include "cuda/common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <atomic>
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

// ------------------------------------------------------------------ tensor-core path (wmma)
constexpr int kMmaThreads = kWarps * 32;
constexpr int kMM = 16 * kWarps;  // rows a block owns: queries (forward, dQ) or keys (dK/dV), 16 a warp
constexpr int kMN = 64;           // forward: keys per K/V tile
constexpr int kMB = 32;           // backward: streamed rows per tile (queries for dK/dV, keys for dQ), lane = row
constexpr int kPadT = 8;          // padding of a 16-bit shared row, in elements (16 bytes)
constexpr int kPadF = 4;          // padding of a float32 shared row, in elements (16 bytes)
static_assert(kMM <= kMN && kMB == 32 && kMN % 32 == 0, "tile shapes");

template <typename T, int D>
struct FwdMma {  // shared memory of fwd_mma_kernel, in bytes
  static constexpr int LT = D + kPadT, LS = kMN + kPadF, LP = kMN + kPadT;
  static constexpr size_t kKV = sizeof(T) * kMN * LT;     // a K or V tile [kMN][LT] (K's also stages Q)
  static constexpr size_t kS = sizeof(float) * kMM * LS;  // S [kMM][LS], 16 rows a warp
  static constexpr size_t kP = sizeof(T) * kMM * LP;      // P [kMM][LP], 16 rows a warp
  static constexpr size_t kBytes = 2 * kKV + kS + kP;
  static_assert(kKV % 128 == 0 && kS % 128 == 0 && kP % 128 == 0, "32-byte aligned wmma pointers");
};

template <typename T, int D>
struct BwdMma {  // shared memory of bwd_dkdv_mma_kernel and bwd_dq_mma_kernel, in bytes
  static constexpr int LT = D + kPadT, LA = kMB + kPadF, LH = kMB + kPadT;
  static constexpr size_t kOwn = sizeof(T) * kMM * LT;    // the block's rows [kMM][LT]: K, V or Q, dO
  static constexpr size_t kTile = sizeof(T) * kMB * LT;   // streamed rows [kMB][LT]: Q, dO or K, V
  static constexpr size_t kF = sizeof(float) * kMM * LA;  // S and dP (dK/dV: transposed) [kMM][LA]
  static constexpr size_t kH = sizeof(T) * kMM * LH;      // P and dS as MMA operands [kMM][LH]
  static constexpr size_t kBytes = 2 * kOwn + 2 * kTile + 2 * kF + 2 * kH;
  static_assert(kOwn % 128 == 0 && kTile % 128 == 0 && kF % 128 == 0 && kH % 128 == 0, "alignment");
};

// Rows [t0, t0 + R) of one (b, h) slice (x points at its row 0) into shared rows of ld elements;
// rows at or past tmax are zero. 16-byte loads when vec (d contiguous, base and row stride aligned).
template <typename T, int D, int R>
__device__ __forceinline__ void load_rows(T* __restrict__ dst, int ld, const T* __restrict__ x, int64_t st,
                                          int64_t sd, int t0, int tmax, bool vec) {
  if (vec) {
    constexpr int V = 16 / sizeof(T), C = D / V;
    for (int idx = threadIdx.x; idx < R * C; idx += kMmaThreads) {
      const int r = idx / C, c = idx % C * V, t = t0 + r;
      Pack<T, V> p;
      if (t < tmax) {
        p = load_pack<T, V>(x + (int64_t)t * st + c);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) p.v[e] = from_float<T>(0.f);
      }
      store_pack<T, V>(dst + r * ld + c, p);
    }
  } else {
    for (int idx = threadIdx.x; idx < R * D; idx += kMmaThreads) {
      const int r = idx / D, c = idx % D, t = t0 + r;
      dst[r * ld + c] = t < tmax ? x[(int64_t)t * st + c * sd] : from_float<T>(0.f);
    }
  }
}

// The backward's two score-shaped products for one 16 x 16 block, on tensor cores:
// C1 = A1 B1^T and C2 = A2 B2^T over D = 16 ND, where A1, B1, A2, B2 are row-major 16 x D tiles
// in shared memory (leading dimension lt); C1, C2 stored float32, row-major (leading dimension lc).
// Called only from the sm_80+ bodies.
template <typename T, int ND>
__device__ __forceinline__ void two_products_abt(const T* a1, const T* b1, const T* a2, const T* b2, int lt,
                                                 float* c1, float* c2, int lc) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> f1, f2;
  wmma::fill_fragment(f1, 0.f);
  wmma::fill_fragment(f2, 0.f);
#pragma unroll
  for (int kd = 0; kd < ND; ++kd) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> x1, x2;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> y1, y2;  // X^T of a row-major X
    wmma::load_matrix_sync(x1, a1 + kd * 16, lt);
    wmma::load_matrix_sync(x2, a2 + kd * 16, lt);
    wmma::load_matrix_sync(y1, b1 + kd * 16, lt);
    wmma::load_matrix_sync(y2, b2 + kd * 16, lt);
    wmma::mma_sync(f1, x1, y1, f1);
    wmma::mma_sync(f2, x2, y2, f2);
  }
  wmma::store_matrix_sync(c1, f1, lc, wmma::mem_row_major);
  wmma::store_matrix_sync(c2, f2, lc, wmma::mem_row_major);
}

// Forward / decode on tensor cores; arguments as fwd_kernel's, vec: bit 0 Q, 1 K, 2 V take 16-byte loads.
template <typename T, int D>
__global__ void __launch_bounds__(kMmaThreads)
fwd_mma_kernel(const T* __restrict__ q, Strides4 sq, const T* __restrict__ k, Strides4 sk, const T* __restrict__ v,
               Strides4 sv, void* __restrict__ out, float* __restrict__ lse, const int32_t* __restrict__ lens, int H,
               int G, int Tq, int Tk_all, bool causal, float sl2, int chunk, bool out_f32, int vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched: the host takes this path only for kernels built for sm_80+
#else
  namespace wmma = nvcuda::wmma;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragBT = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;  // X^T of a row-major X
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  using L = FwdMma<T, D>;
  constexpr int LT = L::LT, LS = L::LS, LP = L::LP, ND = D / 16, NN = kMN / 16, NE = kMN / 32;
  extern __shared__ __align__(128) unsigned char mma_smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T* k_s = reinterpret_cast<T*>(mma_smem);
  T* v_s = reinterpret_cast<T*>(mma_smem + L::kKV);
  float* s_w = reinterpret_cast<float*>(mma_smem + 2 * L::kKV) + warp * 16 * LS;    // this warp's S [16][LS]
  T* p_w = reinterpret_cast<T*>(mma_smem + 2 * L::kKV + L::kS) + warp * 16 * LP;    // this warp's P [16][LP]
  const int bh = blockIdx.y, b = bh / H, h = bh % H, hk = h / G, BH = gridDim.y;
  const int split = blockIdx.z, q0 = blockIdx.x * kMM, w0 = q0 + warp * 16;
  const int Tk = lens ? lens[b] : Tk_all;
  const int off = Tk - Tq;
  const T* kx = k + b * sk.b + hk * sk.h;
  const T* vx = v + b * sv.b + hk * sv.h;
  // Q [kMM][D] staged in K's tile, then this warp's 16 rows as A fragments for the whole kernel.
  load_rows<T, D, kMM>(k_s, LT, q + b * sq.b + h * sq.h, sq.t, sq.d, q0, Tq, vec & 1);
  __syncthreads();
  FragA qa[ND];
#pragma unroll
  for (int kd = 0; kd < ND; ++kd) wmma::load_matrix_sync(qa[kd], k_s + warp * 16 * LT + kd * 16, LT);
  FragC o[ND];
#pragma unroll
  for (int nd = 0; nd < ND; ++nd) wmma::fill_fragment(o[nd], 0.f);
  int hi = causal ? min(Tk, q0 + kMM + off) : Tk;
  const int lo = split * chunk;
  hi = min(hi, lo + chunk);
  const int whi = causal ? min(hi, w0 + 16 + off) : hi;  // keys this warp's rows may see end here
  float m_r = -INFINITY, l_r = 0.f;                        // lane r < 16: max (base 2) and sum of row w0 + r
  for (int n0 = lo; n0 < hi; n0 += kMN) {
    __syncthreads();  // every warp is done with the previous tile (and with Q's staging)
    load_rows<T, D, kMN>(k_s, LT, kx, sk.t, sk.d, n0, hi, vec & 2);
    load_rows<T, D, kMN>(v_s, LT, vx, sv.t, sv.d, n0, hi, vec & 4);
    __syncthreads();
    if (w0 >= Tq || n0 >= whi) continue;            // warp-uniform: no row of this warp sees this tile
    const int nn = min(NN, (whi - n0 + 15) / 16);  // 16-key blocks holding a key the warp may see
    for (int nb = 0; nb < nn; ++nb) {              // S = Q K^T (unscaled) into s_w[:, 16 nb ...]
      FragC s;
      wmma::fill_fragment(s, 0.f);
#pragma unroll
      for (int kd = 0; kd < ND; ++kd) {
        FragBT kf;
        wmma::load_matrix_sync(kf, k_s + nb * 16 * LT + kd * 16, LT);
        wmma::mma_sync(s, qa[kd], kf, s);
      }
      wmma::store_matrix_sync(s_w + nb * 16, s, LS, wmma::mem_row_major);
    }
    __syncwarp();
    // Online softmax a row at a time; lane holds keys n0 + lane + 32 e. A row that has seen no key yet
    // has O = 0 and l = 0, so its factor is 1 like that of a row whose max did not move.
    float a_r = 1.f;  // lane r < 16: factor of row w0 + r's accumulators for this tile
    for (int r = 0; r < 16; ++r) {
      const int i = w0 + r;
      float x[NE], mx = -INFINITY;
#pragma unroll
      for (int e = 0; e < NE; ++e) {
        const int c = lane + 32 * e, j = n0 + c;
        const bool ok = c < nn * 16 && j < hi && i < Tq && (!causal || j <= i + off);
        x[e] = ok ? s_w[r * LS + c] * sl2 : -INFINITY;
        mx = fmaxf(mx, x[e]);
      }
      const float m_old = __shfl_sync(kFull, m_r, r);
      const float mn = fmaxf(m_old, warp_max(mx));
      const float ms = mn == -INFINITY ? 0.f : mn;
      float ps = 0.f;
#pragma unroll
      for (int e = 0; e < NE; ++e) {
        const float p = exp2f(x[e] - ms);  // 0 where masked
        ps += p;
        p_w[r * LP + lane + 32 * e] = from_float<T>(p);
      }
      const float alpha = m_old == mn || m_old == -INFINITY ? 1.f : exp2f(m_old - mn);
      const float sum = warp_sum(ps);
      if (lane == r) {
        l_r = l_r * alpha + sum;
        m_r = mn;
        a_r = alpha;
      }
    }
    __syncwarp();  // P written, S read: s_w is free
    if (__any_sync(kFull, a_r != 1.f)) {  // O *= alpha row-wise, through s_w (kMN / 16 fragments at a time)
#pragma unroll
      for (int g = 0; g < ND; g += NN) {
#pragma unroll
        for (int u = 0; u < NN && g + u < ND; ++u)
          wmma::store_matrix_sync(s_w + 16 * u, o[g + u], LS, wmma::mem_row_major);
        __syncwarp();
        const int cols = 16 * min(NN, ND - g);
        for (int r = 0; r < 16; ++r) {
          const float a = __shfl_sync(kFull, a_r, r);
          for (int c = lane; c < cols; c += 32) s_w[r * LS + c] *= a;
        }
        __syncwarp();
#pragma unroll
        for (int u = 0; u < NN && g + u < ND; ++u)
          wmma::load_matrix_sync(o[g + u], s_w + 16 * u, LS, wmma::mem_row_major);
        __syncwarp();
      }
    }
    for (int kb = 0; kb < nn; ++kb) {  // O += P V
      FragA pa;
      wmma::load_matrix_sync(pa, p_w + kb * 16, LP);
#pragma unroll
      for (int nd = 0; nd < ND; ++nd) {
        FragB vf;
        wmma::load_matrix_sync(vf, v_s + kb * 16 * LT + nd * 16, LT);
        wmma::mma_sync(o[nd], pa, vf, o[nd]);
      }
    }
  }
  if (w0 >= Tq) return;
  __syncwarp();  // s_w's last reads (a rescale) are done
  const int64_t row0 = ((int64_t)split * BH + bh) * Tq;
  const float inv_r = l_r > 0.f ? 1.f / l_r : 0.f;
  if (lane < 16 && w0 + lane < Tq) lse[row0 + w0 + lane] = l_r > 0.f ? (m_r + log2f(l_r)) * kLn2 : INFINITY;
#pragma unroll
  for (int g = 0; g < ND; g += NN) {  // out = O / l through s_w
#pragma unroll
    for (int u = 0; u < NN && g + u < ND; ++u)
      wmma::store_matrix_sync(s_w + 16 * u, o[g + u], LS, wmma::mem_row_major);
    __syncwarp();
    const int cols = 16 * min(NN, ND - g);
    for (int r = 0; r < 16; ++r) {
      const float inv = __shfl_sync(kFull, inv_r, r);
      const int i = w0 + r;
      if (i >= Tq) continue;
      for (int c = lane; c < cols; c += 32) {
        const int64_t o_idx = (row0 + i) * D + g * 16 + c;
        if (out_f32) static_cast<float*>(out)[o_idx] = s_w[r * LS + c] * inv;
        else static_cast<T*>(out)[o_idx] = from_float<T>(s_w[r * LS + c] * inv);
      }
    }
    __syncwarp();
  }
#endif
}

// Backward dK, dV on tensor cores; arguments as bwd_dkdv_kernel's, vec: bit 0 Q, 1 K, 2 V, 3 dO.
template <typename T, int D>
__global__ void __launch_bounds__(kMmaThreads)
bwd_dkdv_mma_kernel(const T* __restrict__ q, Strides4 sq, const T* __restrict__ k, Strides4 sk,
                    const T* __restrict__ v, Strides4 sv, const T* __restrict__ dout, Strides4 sdo,
                    const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ dk,
                    float* __restrict__ dv, int H, int G, int Tq, int Tk, bool causal, float sl2, float scale,
                    int vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  namespace wmma = nvcuda::wmma;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragBT = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  using L = BwdMma<T, D>;
  constexpr int LT = L::LT, LA = L::LA, LH = L::LH, ND = D / 16, NB = kMB / 16;
  extern __shared__ __align__(128) unsigned char mma_smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned char* sm = mma_smem;
  T* k_s = reinterpret_cast<T*>(sm);                                       // [kMM][LT]
  T* v_s = reinterpret_cast<T*>(sm += L::kOwn);                            // [kMM][LT]
  T* q_s = reinterpret_cast<T*>(sm += L::kOwn);                            // [kMB][LT]
  T* do_s = reinterpret_cast<T*>(sm += L::kTile);                          // [kMB][LT]
  float* st_w = reinterpret_cast<float*>(sm += L::kTile) + warp * 16 * LA;  // S^T of this warp's keys
  float* dpt_w = reinterpret_cast<float*>(sm += L::kF) + warp * 16 * LA;    // dP^T
  T* pt_w = reinterpret_cast<T*>(sm += L::kF) + warp * 16 * LH;             // P^T
  T* dst_w = reinterpret_cast<T*>(sm += L::kH) + warp * 16 * LH;            // dS^T
  const int bh = blockIdx.y, b = bh / H, h = bh % H, hk = h / G;
  const int k0 = blockIdx.x * kMM, j0 = k0 + warp * 16, off = Tk - Tq;
  load_rows<T, D, kMM>(k_s, LT, k + b * sk.b + hk * sk.h, sk.t, sk.d, k0, Tk, vec & 2);
  load_rows<T, D, kMM>(v_s, LT, v + b * sv.b + hk * sv.h, sv.t, sv.d, k0, Tk, vec & 4);
  const T* qx = q + b * sq.b + h * sq.h;
  const T* dox = dout + b * sdo.b + h * sdo.h;
  FragC dka[ND], dva[ND];
#pragma unroll
  for (int nd = 0; nd < ND; ++nd) {
    wmma::fill_fragment(dka[nd], 0.f);
    wmma::fill_fragment(dva[nd], 0.f);
  }
  const int lo = causal ? max(0, k0 - off) : 0;  // earlier queries see none of the block's keys
  for (int m0 = lo; m0 < Tq; m0 += kMB) {
    __syncthreads();  // every warp is done with the previous tile (the first pass: K, V are stored)
    load_rows<T, D, kMB>(q_s, LT, qx, sq.t, sq.d, m0, Tq, vec & 1);
    load_rows<T, D, kMB>(do_s, LT, dox, sdo.t, sdo.d, m0, Tq, vec & 8);
    __syncthreads();
    if (j0 >= Tk) continue;
    // 16-query blocks [cb0, cb1) of the tile: before cb0 no query sees this warp's keys; from cb1, i >= Tq.
    const int cb0 = causal ? max(0, j0 - off - m0) / 16 : 0;
    const int cb1 = min(NB, (Tq - m0 + 15) / 16);
    if (cb0 >= cb1) continue;
    for (int cb = cb0; cb < cb1; ++cb)  // S^T = K_w Q^T, dP^T = V_w dO^T
      two_products_abt<T, ND>(k_s + warp * 16 * LT, q_s + cb * 16 * LT, v_s + warp * 16 * LT, do_s + cb * 16 * LT,
                              LT, st_w + cb * 16, dpt_w + cb * 16, LA);
    __syncwarp();
    const int i = m0 + lane;  // lane = query
    const bool col = lane >= 16 * cb0 && lane < 16 * cb1 && i < Tq;
    const float l2 = col ? lse[(int64_t)bh * Tq + i] * kLog2e : INFINITY;
    const float dl = col ? delta[(int64_t)bh * Tq + i] : 0.f;
    for (int r = 0; r < 16; ++r) {  // key j0 + r
      const int j = j0 + r;
      const bool ok = col && j < Tk && (!causal || j <= i + off);
      const float p = ok ? exp2f(st_w[r * LA + lane] * sl2 - l2) : 0.f;
      const float ds = ok ? p * (dpt_w[r * LA + lane] - dl) : 0.f;
      pt_w[r * LH + lane] = from_float<T>(p);
      dst_w[r * LH + lane] = from_float<T>(ds);
    }
    __syncwarp();
    for (int cb = cb0; cb < cb1; ++cb) {  // dV += P^T dO, dK += dS^T Q
      FragA pa, dsa;
      wmma::load_matrix_sync(pa, pt_w + cb * 16, LH);
      wmma::load_matrix_sync(dsa, dst_w + cb * 16, LH);
#pragma unroll
      for (int nd = 0; nd < ND; ++nd) {
        FragB dof, qf;
        wmma::load_matrix_sync(dof, do_s + cb * 16 * LT + nd * 16, LT);
        wmma::load_matrix_sync(qf, q_s + cb * 16 * LT + nd * 16, LT);
        wmma::mma_sync(dva[nd], pa, dof, dva[nd]);
        wmma::mma_sync(dka[nd], dsa, qf, dka[nd]);
      }
    }
  }
  if (j0 >= Tk) return;
  __syncwarp();
#pragma unroll
  for (int nd = 0; nd < ND; ++nd) {  // through st_w (dV) and dpt_w (dK), 16 columns at a time
    wmma::store_matrix_sync(st_w, dva[nd], LA, wmma::mem_row_major);
    wmma::store_matrix_sync(dpt_w, dka[nd], LA, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 16 * 16; e += 32) {
      const int r = e / 16, c = e % 16, j = j0 + r;
      if (j >= Tk) continue;
      const int64_t o = ((int64_t)bh * Tk + j) * D + nd * 16 + c;
      dv[o] = st_w[r * LA + c];
      dk[o] = dpt_w[r * LA + c] * scale;
    }
    __syncwarp();
  }
#endif
}

// Backward dQ on tensor cores; arguments as bwd_dq_kernel's, vec as bwd_dkdv_mma_kernel's.
template <typename T, int D>
__global__ void __launch_bounds__(kMmaThreads)
bwd_dq_mma_kernel(const T* __restrict__ q, Strides4 sq, const T* __restrict__ k, Strides4 sk,
                  const T* __restrict__ v, Strides4 sv, const T* __restrict__ dout, Strides4 sdo,
                  const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ dq, int H,
                  int G, int Tq, int Tk, bool causal, float sl2, float scale, int vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  namespace wmma = nvcuda::wmma;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragBT = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  using L = BwdMma<T, D>;
  constexpr int LT = L::LT, LA = L::LA, LH = L::LH, ND = D / 16, NB = kMB / 16;
  extern __shared__ __align__(128) unsigned char mma_smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned char* sm = mma_smem;
  T* q_s = reinterpret_cast<T*>(sm);                                       // [kMM][LT]
  T* do_s = reinterpret_cast<T*>(sm += L::kOwn);                           // [kMM][LT]
  T* k_s = reinterpret_cast<T*>(sm += L::kOwn);                            // [kMB][LT]
  T* v_s = reinterpret_cast<T*>(sm += L::kTile);                           // [kMB][LT]
  float* s_w = reinterpret_cast<float*>(sm += L::kTile) + warp * 16 * LA;   // S of this warp's queries
  float* dp_w = reinterpret_cast<float*>(sm += L::kF) + warp * 16 * LA;     // dP
  T* ds_w = reinterpret_cast<T*>(sm += L::kF) + warp * 16 * LH;             // dS
  const int bh = blockIdx.y, b = bh / H, h = bh % H, hk = h / G;
  const int q0 = blockIdx.x * kMM, i0 = q0 + warp * 16, off = Tk - Tq;
  load_rows<T, D, kMM>(q_s, LT, q + b * sq.b + h * sq.h, sq.t, sq.d, q0, Tq, vec & 1);
  load_rows<T, D, kMM>(do_s, LT, dout + b * sdo.b + h * sdo.h, sdo.t, sdo.d, q0, Tq, vec & 8);
  const T* kx = k + b * sk.b + hk * sk.h;
  const T* vx = v + b * sv.b + hk * sv.h;
  const int ir = i0 + lane % 16;  // lane r < 16 (and r + 16) holds row i0 + r's lse (base 2) and delta
  const float l2_r = ir < Tq ? lse[(int64_t)bh * Tq + ir] * kLog2e : INFINITY;
  const float dl_r = ir < Tq ? delta[(int64_t)bh * Tq + ir] : 0.f;
  FragC dqa[ND];
#pragma unroll
  for (int nd = 0; nd < ND; ++nd) wmma::fill_fragment(dqa[nd], 0.f);
  const int hi = causal ? min(Tk, q0 + kMM + off) : Tk;
  const int whi = causal ? min(hi, i0 + 16 + off) : hi;
  for (int n0 = 0; n0 < hi; n0 += kMB) {
    __syncthreads();  // every warp is done with the previous tile (the first pass: Q, dO are stored)
    load_rows<T, D, kMB>(k_s, LT, kx, sk.t, sk.d, n0, hi, vec & 2);
    load_rows<T, D, kMB>(v_s, LT, vx, sv.t, sv.d, n0, hi, vec & 4);
    __syncthreads();
    if (i0 >= Tq || n0 >= whi) continue;
    const int nn = min(NB, (whi - n0 + 15) / 16);
    for (int nb = 0; nb < nn; ++nb)  // S = Q_w K^T, dP = dO_w V^T
      two_products_abt<T, ND>(q_s + warp * 16 * LT, k_s + nb * 16 * LT, do_s + warp * 16 * LT, v_s + nb * 16 * LT,
                              LT, s_w + nb * 16, dp_w + nb * 16, LA);
    __syncwarp();
    const int j = n0 + lane;  // lane = key
    for (int r = 0; r < 16; ++r) {
      const int i = i0 + r;
      const float l2 = __shfl_sync(kFull, l2_r, r), dl = __shfl_sync(kFull, dl_r, r);
      const bool ok = lane < 16 * nn && i < Tq && j < hi && (!causal || j <= i + off);
      const float p = ok ? exp2f(s_w[r * LA + lane] * sl2 - l2) : 0.f;
      const float ds = ok ? p * (dp_w[r * LA + lane] - dl) : 0.f;
      ds_w[r * LH + lane] = from_float<T>(ds);
    }
    __syncwarp();
    for (int kb = 0; kb < nn; ++kb) {  // dQ += dS K
      FragA dsa;
      wmma::load_matrix_sync(dsa, ds_w + kb * 16, LH);
#pragma unroll
      for (int nd = 0; nd < ND; ++nd) {
        FragB kf;
        wmma::load_matrix_sync(kf, k_s + kb * 16 * LT + nd * 16, LT);
        wmma::mma_sync(dqa[nd], dsa, kf, dqa[nd]);
      }
    }
  }
  if (i0 >= Tq) return;
  __syncwarp();
#pragma unroll
  for (int nd = 0; nd < ND; ++nd) {  // through s_w, 16 columns at a time
    wmma::store_matrix_sync(s_w, dqa[nd], LA, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 16 * 16; e += 32) {
      const int r = e / 16, c = e % 16, i = i0 + r;
      if (i < Tq) dq[((int64_t)bh * Tq + i) * D + nd * 16 + c] = s_w[r * LA + c] * scale;
    }
    __syncwarp();
  }
#endif
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

// Whether 16-byte loads of 8 elements along d are aligned for every (b, h, t) of a 16-bit tensor.
bool rows16(const void* p, Strides4 s) {
  return s.d == 1 && s.t % 8 == 0 && s.h % 8 == 0 && s.b % 8 == 0 && aligned16(p);
}

// Whether the attention kernels loaded for the current device were built for sm_80 or newer (the wmma
// kernels have a body only there): the PTX version of one of them, asked once per device.
bool mma_available() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // 0 not asked yet, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const bool cache = dev >= 0 && dev < kMaxDevices;
  int state = cache ? known[dev].load(std::memory_order_relaxed) : 0;
  if (state == 0) {
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, fwd_mma_kernel<__half, 64>) == cudaSuccess) {
      state = attr.ptxVersion >= 80 ? 1 : 2;
    } else {
      cudaGetLastError();  // no image for this device: the SIMT launch reports it
      state = 2;
    }
    if (cache) known[dev].store(state, std::memory_order_relaxed);
  }
  return state == 1;
}

bool use_mma(AttnDtype dtype, int D) {
  return dtype != AttnDtype::kFloat32 && D % 16 == 0 && D <= 128 && mma_available();
}

template <typename T, int D>
cudaError_t fwd_mma_launch(const void* q, Strides4 sq, const void* k, Strides4 sk, const void* v, Strides4 sv,
                           void* out, float* lse, const int32_t* lens, int B, int H, int Hkv, int Tq, int Tk,
                           int /*D*/, bool causal, float scale, int nsplit, cudaStream_t stream) {
  const size_t smem = FwdMma<T, D>::kBytes;
  auto kernel = fwd_mma_kernel<T, D>;
  FASTLM_CUDA_CHECK(prepare(kernel, smem));
  const int chunk = ((Tk + nsplit - 1) / nsplit + kMN - 1) / kMN * kMN;
  const int vec = rows16(q, sq) | rows16(k, sk) << 1 | rows16(v, sv) << 2;
  dim3 grid((Tq + kMM - 1) / kMM, B * H, nsplit);
  kernel<<<grid, kMmaThreads, smem, stream>>>(static_cast<const T*>(q), sq, static_cast<const T*>(k), sk,
                                              static_cast<const T*>(v), sv, out, lse, lens, H, H / Hkv, Tq, Tk,
                                              causal, scale * kLog2e, chunk, nsplit > 1, vec);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t bwd_mma_launch(const void* q, Strides4 sq, const void* k, Strides4 sk, const void* v, Strides4 sv,
                           const void* dout, Strides4 sdo, const float* lse, const float* delta, float* dq, float* dk,
                           float* dv, int B, int H, int Hkv, int Tq, int Tk, int /*D*/, bool causal, float scale,
                           cudaStream_t stream) {
  const T *qp = static_cast<const T*>(q), *kp = static_cast<const T*>(k), *vp = static_cast<const T*>(v),
          *dop = static_cast<const T*>(dout);
  const size_t smem = BwdMma<T, D>::kBytes;
  const int vec = rows16(q, sq) | rows16(k, sk) << 1 | rows16(v, sv) << 2 | rows16(dout, sdo) << 3;
  if (Tk > 0) {
    auto kkv = bwd_dkdv_mma_kernel<T, D>;
    FASTLM_CUDA_CHECK(prepare(kkv, smem));
    kkv<<<dim3((Tk + kMM - 1) / kMM, B * H), kMmaThreads, smem, stream>>>(
        qp, sq, kp, sk, vp, sv, dop, sdo, lse, delta, dk, dv, H, H / Hkv, Tq, Tk, causal, scale * kLog2e, scale, vec);
    FASTLM_CUDA_CHECK(cudaGetLastError());
  }
  auto kq = bwd_dq_mma_kernel<T, D>;
  FASTLM_CUDA_CHECK(prepare(kq, smem));
  kq<<<dim3((Tq + kMM - 1) / kMM, B * H), kMmaThreads, smem, stream>>>(
      qp, sq, kp, sk, vp, sv, dop, sdo, lse, delta, dq, H, H / Hkv, Tq, Tk, causal, scale * kLog2e, scale, vec);
  return cudaGetLastError();
}

// LAUNCH<T, D> for float16 / bfloat16 and D in {16, 32, ..., 128} (use_mma has checked D).
#define FASTLM_MMA_SWITCH_D(T, D, LAUNCH, ...)         \
  switch ((D) / 16) {                                   \
    case 1: return LAUNCH<T, 16>(__VA_ARGS__);          \
    case 2: return LAUNCH<T, 32>(__VA_ARGS__);          \
    case 3: return LAUNCH<T, 48>(__VA_ARGS__);          \
    case 4: return LAUNCH<T, 64>(__VA_ARGS__);          \
    case 5: return LAUNCH<T, 80>(__VA_ARGS__);          \
    case 6: return LAUNCH<T, 96>(__VA_ARGS__);          \
    case 7: return LAUNCH<T, 112>(__VA_ARGS__);         \
    default: return LAUNCH<T, 128>(__VA_ARGS__);        \
  }
#define FASTLM_MMA_DISPATCH(DTYPE, D, LAUNCH, ...)                                  \
  do {                                                                              \
    if ((DTYPE) == AttnDtype::kFloat16) {                                           \
      FASTLM_MMA_SWITCH_D(__half, D, LAUNCH, __VA_ARGS__)                           \
    } else {                                                                        \
      FASTLM_MMA_SWITCH_D(__nv_bfloat16, D, LAUNCH, __VA_ARGS__)                    \
    }                                                                               \
  } while (0)

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
  if (use_mma(dtype, D))
    FASTLM_MMA_DISPATCH(dtype, D, fwd_mma_launch, q, sq, k, sk, v, sv, out, lse, lens, B, H, Hkv, Tq, Tk, D, causal,
                        scale, nsplit, stream);
  FASTLM_ATTN_DISPATCH(dtype, D, fwd_launch, q, sq, k, sk, v, sv, out, lse, lens, B, H, Hkv, Tq, Tk, D, causal, scale,
                       nsplit, stream);
}

cudaError_t attention_bwd(AttnDtype dtype, const void* q, Strides4 sq, const void* k, Strides4 sk, const void* v,
                          Strides4 sv, const void* dout, Strides4 sdo, const float* lse, const float* delta, float* dq,
                          float* dk, float* dv, int B, int H, int Hkv, int Tq, int Tk, int D, bool causal, float scale,
                          cudaStream_t stream) {
  if (B * H * Tq == 0) return cudaSuccess;
  if (use_mma(dtype, D))
    FASTLM_MMA_DISPATCH(dtype, D, bwd_mma_launch, q, sq, k, sk, v, sv, dout, sdo, lse, delta, dq, dk, dv, B, H, Hkv,
                        Tq, Tk, D, causal, scale, stream);
  FASTLM_ATTN_DISPATCH(dtype, D, bwd_launch, q, sq, k, sk, v, sv, dout, sdo, lse, delta, dq, dk, dv, B, H, Hkv, Tq, Tk,
                       D, causal, scale, stream);
}

}  // namespace cuda
}  // namespace fastlm
