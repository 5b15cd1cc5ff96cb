// The linear layers of generation, out[M x N] = x[M x K] W^T + bias, for the few rows of a
// decode step (one per sequence) and the many of a prefill (every prompt token), with the
// weight packed once into 48-column panels:
// weight_p[p, k, c] = W[48 p + c, k] (zero past N), each panel K x 48 contiguous. Reading
// the weight is what bounds a decode step, and this layout lets it be read once for all M
// rows, in address order: a thread takes whole panels and runs gemm.h's register-blocked
// micro-kernel down each one, so the hardware prefetchers see long sequential streams (a
// plain (K, N) layout read panel by panel jumps 4 N bytes per row, which for GPT-2's
// 50257-column output layer falls to a third of the read bandwidth). A pass covers the
// panel's full width for kRows rows (the accumulators the level's registers hold: 8 x 3
// vectors on AVX-512, 2 x 6 on AVX2, 2 x 12 on NEON, 1 x 12 generic); more rows take more
// passes, the K x 48 panel (48-144 KB for K = 256-768) staying in L2 between them. float32.
#pragma once

namespace linear {

constexpr int64_t kPanel = kDecodePanel;
constexpr int kPanelVectors = static_cast<int>(kPanel / simd::W);
#if defined(FASTLM_SIMD_AVX512)
constexpr int64_t kRows = 8;
#elif defined(FASTLM_SIMD_AVX2) || defined(FASTLM_SIMD_NEON)
constexpr int64_t kRows = 2;
#else
constexpr int64_t kRows = 1;
#endif
// Rows of the panel the first pass prefetches ahead of itself, and into which cache. A pass
// of few rows is bound by reading the weight: it wants each row in L1 just before it (32
// rows, 6 KB ahead). A pass of 8 rows spends 8x the arithmetic on each weight byte, and
// prefetching into L1 leaves its loads waiting on memory between bursts of FMAs; 128 rows
// (24 KB) ahead into L2 keeps the stream going under the arithmetic.
constexpr int64_t kAheadOne = 32, kAheadMany = 128;
// Below both limits one thread finishes sooner than waking a second one pays back.
constexpr int64_t kParallelBytes = int64_t(512) << 10;
constexpr double kParallelFlops = 0.5e6;

template <int R, int Locality>
inline void pass(int64_t nc, const float* A, int64_t K, const float* Bp, float* C, int64_t ldc, const float* pf) {
  micro_cols<R, kPanelVectors, Locality>(nc, A, K, Bp, kPanel, C, ldc, K, true, pf);
}

// C[r, 0..nc) += A[r] Bp over one K x 48 panel for the M rows, in passes of up to kRows
// rows. The first pass streams the panel from memory and prefetches ahead of itself (the
// packed weight is one array, panels back to back, so near a panel's end this reaches into
// the next one); later passes re-read the panel from L2.
template <int First = 1>
inline void pass_rows(int64_t r, int64_t nc, const float* A, int64_t K, const float* Bp, float* C, int64_t ldc,
                      const float* pf) {
  if constexpr (First < kRows) {
    if (r != First) return pass_rows<First + 1>(r, nc, A, K, Bp, C, ldc, pf);
  }
  pass<First, 3>(nc, A, K, Bp, C, ldc, pf);
}

inline void panel_product(int64_t M, int64_t nc, int64_t K, const float* A, const float* Bp, float* C, int64_t ldc) {
  for (int64_t m = 0; m < M;) {
    const int64_t r = std::min<int64_t>(kRows, M - m);
    if constexpr (kRows >= 8) {
      if (m == 0 && r == 8) {
        pass<8, 2>(nc, A, K, Bp, C, ldc, Bp + kAheadMany * kPanel);
        m += r;
        continue;
      }
    }
    pass_rows(r, nc, A + m * K, K, Bp, C + m * ldc, ldc, m == 0 ? Bp + kAheadOne * kPanel : nullptr);
    m += r;
  }
}

// C[r, 0..nc) = bias[0..nc) (or 0) for the M rows: the passes accumulate onto it.
inline void init_rows(int64_t M, int64_t nc, const float* bias, float* C, int64_t ldc) {
  using namespace simd;
  for (int64_t c = 0; c < nc; c += W) {
    const int64_t n = std::min<int64_t>(W, nc - c);
    const vf v = bias ? load(bias + c, n) : zero();
    for (int64_t r = 0; r < M; ++r) store(C + r * ldc + c, v, n);
  }
}

void run(const LinearArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N, P = cdiv(N, kPanel);
  if (M == 0 || N == 0) return;
  const bool one = K * N * 4 < kParallelBytes && 2.0 * M * K * N < kParallelFlops;
  parallel_for(0, P, one ? P : 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c0 = p * kPanel, nc = std::min(kPanel, N - c0);
      init_rows(M, nc, a.bias ? a.bias + c0 : nullptr, a.out + c0, N);
      panel_product(M, nc, K, a.x, a.wp + p * K * kPanel, a.out + c0, N);
    }
  });
}

}  // namespace linear
