// C (+)= A B for float32 row-major matrices: the register-blocked micro-kernel
// C[R x W NV] (+)= A[R x K] B[K x W NV] that the attention kernels and generation's linear
// layer share, and gemm() over it. Written over simd.h; each level keeps R x NV accumulators
// plus NV vectors of B and a broadcast of A in its registers:
//   avx512 (32 registers of 16): up to 6 x 4 (a 6 x 64 block)
//   avx2   (16 registers of 8):  up to 6 x 2 (6 x 16, the classic Haswell block)
//   neon   (32 registers of 4):  up to 6 x 4 (6 x 16)
//   generic (SSE2: 16 of 4):     up to 4 x 2 (4 x 8)
// Included by csrc/cpu/isa/kernels.inc inside the level's namespace, after simd.h.
#pragma once

#if defined(FASTLM_SIMD_AVX512)
constexpr int kGemmMR = 6, kGemmNV = 4;
#elif defined(FASTLM_SIMD_AVX2)
constexpr int kGemmMR = 6, kGemmNV = 2;
#elif defined(FASTLM_SIMD_NEON)
constexpr int kGemmMR = 6, kGemmNV = 4;
#else
constexpr int kGemmMR = 4, kGemmNV = 2;
#endif
constexpr int64_t kGemmCols = int64_t(kGemmNV) * simd::W;  // columns of one micro-kernel call
constexpr int kLineVectors = 64 / (4 * simd::W) > 0 ? 64 / (4 * simd::W) : 1;  // vectors per 64-byte line

// C[R x W NV] (+)= A[R x K] B[K x W NV]; the last vector of each row holds `last` columns
// (Tail: last < W, so it is loaded and stored masked). With `pf`, step k also prefetches the
// W NV floats at pf + k ldb (for a caller that knows which bytes it reads next), into the
// cache level `Locality` names (3: L1, 2: L2).
template <int R, int NV, bool Tail, int Locality = 3>
inline void micro(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t K,
                  int64_t last, bool accumulate, const float* pf = nullptr) {
  using namespace simd;
  vf c[R][NV];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) {
      if (!accumulate) c[r][v] = zero();
      else if (Tail && v == NV - 1) c[r][v] = load(C + r * ldc + W * v, last);
      else c[r][v] = load(C + r * ldc + W * v);
    }
  for (int64_t k = 0; k < K; ++k) {
    if (pf) {
#pragma GCC unroll 32
      for (int v = 0; v < NV; v += kLineVectors)  // a cache line at a time
        __builtin_prefetch(pf + k * ldb + W * v, 0, Locality);
    }
    vf b[NV];
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) b[v] = (Tail && v == NV - 1) ? load(B + k * ldb + W * v, last) : load(B + k * ldb + W * v);
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const vf a = set1(A[r * lda + k]);
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) c[r][v] = fma(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) {
      if (Tail && v == NV - 1) store(C + r * ldc + W * v, c[r][v], last);
      else store(C + r * ldc + W * v, c[r][v]);
    }
}

// micro<R, nv> for ncols in [1, W MaxNV] columns (nv = ceil(ncols / W) chosen at run time).
// A caller whose blocks are narrower than the level's widest passes its MaxNV, so no wider
// (register-spilling) variant is compiled for it.
template <int R, int MaxNV = kGemmNV, int Locality = 3, int NV = 1>
inline void micro_cols(int64_t ncols, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                       int64_t K, bool acc, const float* pf = nullptr) {
  static_assert(MaxNV >= 1 && MaxNV <= 16, "micro_cols: 1 to 16 vectors");
  if constexpr (NV < MaxNV) {
    if (ncols > int64_t(simd::W) * NV)
      return micro_cols<R, MaxNV, Locality, NV + 1>(ncols, A, lda, B, ldb, C, ldc, K, acc, pf);
  }
  const int64_t last = ncols - int64_t(simd::W) * (NV - 1);
  if (last < simd::W) micro<R, NV, true, Locality>(A, lda, B, ldb, C, ldc, K, last, acc, pf);
  else micro<R, NV, false, Locality>(A, lda, B, ldb, C, ldc, K, last, acc, pf);
}

// micro_cols for R in [First, kGemmMR] rows chosen at run time.
template <int First = 1>
inline void micro_rows(int64_t R, int64_t ncols, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                       int64_t ldc, int64_t K, bool acc) {
  if constexpr (First < kGemmMR) {
    if (R != First) return micro_rows<First + 1>(R, ncols, A, lda, B, ldb, C, ldc, K, acc);
  }
  micro_cols<First>(ncols, A, lda, B, ldb, C, ldc, K, acc);
}

// C[M x N] (+)= A[M x K] B[K x N], all row-major with leading dimensions lda, ldb, ldc.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += kGemmCols) {
    const int64_t nn = std::min<int64_t>(kGemmCols, N - n0);
    int64_t m = 0;
    for (; m + kGemmMR <= M; m += kGemmMR)
      micro_cols<kGemmMR>(nn, A + m * lda, lda, B + n0, ldb, C + m * ldc + n0, ldc, K, accumulate);
    if (m < M) micro_rows(M - m, nn, A + m * lda, lda, B + n0, ldb, C + m * ldc + n0, ldc, K, accumulate);
  }
}
