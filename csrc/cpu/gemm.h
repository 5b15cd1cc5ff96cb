// C (+)= A B for float32 row-major matrices on the CPU: the register-blocked AVX-512
// micro-kernel C[R x 16 NV] (+)= A[R x K] B[K x 16 NV] (masked column tails) that the attention
// kernels and the small-batch linear layer share, and gemm() over it; a portable scalar
// gemm() when AVX-512 is absent.
#pragma once

#include <algorithm>
#include <cstdint>

#include "simd.h"

namespace fastlm {

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

#ifdef FASTLM_AVX512
using simd::tail_mask;

// C[R x 16 NV] (+)= A[R x K] B[K x 16 NV]; the last vector of each row is masked by `last`.
// With `pf`, step k also prefetches the 16 NV floats at pf + k ldb (for a caller that knows
// which bytes it reads next), into the cache level that Hint names.
template <int R, int NV, _mm_hint Hint = _MM_HINT_T0>
inline void micro(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K,
                  __mmask16 last, bool accumulate, const float* pf = nullptr) {
  __m512 c[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (!accumulate) c[r][v] = _mm512_setzero_ps();
      else if (v == NV - 1) c[r][v] = _mm512_maskz_loadu_ps(last, C + r * ldc + 16 * v);
      else c[r][v] = _mm512_loadu_ps(C + r * ldc + 16 * v);
    }
  for (int64_t k = 0; k < K; ++k) {
    if (pf) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) _mm_prefetch(reinterpret_cast<const char*>(pf + k * ldb + 16 * v), Hint);
    }
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      b[v] = (v == NV - 1) ? _mm512_maskz_loadu_ps(last, B + k * ldb + 16 * v) : _mm512_loadu_ps(B + k * ldb + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (v == NV - 1) _mm512_mask_storeu_ps(C + r * ldc + 16 * v, last, c[r][v]);
      else _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
    }
}

// micro<R, nv> for a run-time nv in [1, MaxNV]. A caller whose panels are narrower than 64
// columns passes its MaxNV, so no wider (register-spilling) variant is compiled for it.
template <int R, int MaxNV = 4, _mm_hint Hint = _MM_HINT_T0>
inline void micro_nv(int nv, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                     int64_t K, __mmask16 last, bool acc, const float* pf = nullptr) {
  static_assert(MaxNV >= 1 && MaxNV <= 4, "micro_nv: 1 to 4 vectors of 16 columns");
  switch (nv) {
    case 1: micro<R, 1, Hint>(A, lda, B, ldb, C, ldc, K, last, acc, pf); break;
    case 2: micro<R, std::min(2, MaxNV), Hint>(A, lda, B, ldb, C, ldc, K, last, acc, pf); break;
    case 3: micro<R, std::min(3, MaxNV), Hint>(A, lda, B, ldb, C, ldc, K, last, acc, pf); break;
    default: micro<R, MaxNV, Hint>(A, lda, B, ldb, C, ldc, K, last, acc, pf); break;
  }
}

constexpr int MR = 6;

template <int R>
inline void micro_cols(int64_t ncols, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                       int64_t K, bool acc) {
  const int nv = (int)cdiv(ncols, 16);
  micro_nv<R>(nv, A, lda, B, ldb, C, ldc, K, tail_mask(ncols - 16 * (nv - 1)), acc);
}

// C[M x N] (+)= A[M x K] B[K x N], all row-major with leading dimensions lda, ldb, ldc.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t nn = std::min<int64_t>(64, N - n0);
    const int nv = (int)cdiv(nn, 16);
    const __mmask16 last = tail_mask(nn - 16 * (nv - 1));
    const float* Bn = B + n0;
    float* Cn = C + n0;
    int64_t m = 0;
    for (; m + MR <= M; m += MR) micro_nv<MR>(nv, A + m * lda, lda, Bn, ldb, Cn + m * ldc, ldc, K, last, accumulate);
    switch (M - m) {
      case 1: micro_nv<1>(nv, A + m * lda, lda, Bn, ldb, Cn + m * ldc, ldc, K, last, accumulate); break;
      case 2: micro_nv<2>(nv, A + m * lda, lda, Bn, ldb, Cn + m * ldc, ldc, K, last, accumulate); break;
      case 3: micro_nv<3>(nv, A + m * lda, lda, Bn, ldb, Cn + m * ldc, ldc, K, last, accumulate); break;
      case 4: micro_nv<4>(nv, A + m * lda, lda, Bn, ldb, Cn + m * ldc, ldc, K, last, accumulate); break;
      case 5: micro_nv<5>(nv, A + m * lda, lda, Bn, ldb, Cn + m * ldc, ldc, K, last, accumulate); break;
      default: break;
    }
  }
}

#else  // portable path
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate) {
  for (int64_t m = 0; m < M; ++m) {
    float* c = C + m * ldc;
    if (!accumulate)
      for (int64_t n = 0; n < N; ++n) c[n] = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[m * lda + k];
      const float* b = B + k * ldb;
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}
#endif

}  // namespace fastlm
