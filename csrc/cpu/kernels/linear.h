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

// Rows from which a panel goes through the GEMM register blocks below rather than passes.
constexpr int64_t kBlockedRows = 4 * kRows > 16 ? 4 * kRows : 16;
// Rows of K per block of the panel in the blocked product (see below).
constexpr int64_t kKc = 512;

// Many rows (a prefill): the panel in blocks of kKc rows of K; within a block, one
// kGemmCols-wide strip at a time (512 x 16 floats on AVX2, 32 KB) goes under every row in
// the level's GEMM register blocks (gemm.h: kGemmMR x kGemmCols, 6 x 16 on AVX2), so each
// load of the weight feeds kGemmMR rows and the strip is re-read from the nearest caches,
// where passes of kRows rows re-read the whole panel from L2 for every pair of rows.
inline void panel_product_blocked(int64_t M, int64_t nc, int64_t K, const float* A, const float* Bp, float* C,
                                  int64_t ldc) {
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t kc = std::min(kKc, K - k0);
    for (int64_t n0 = 0; n0 < nc; n0 += kGemmCols) {
      const int64_t nn = std::min<int64_t>(kGemmCols, nc - n0);
      const float* B = Bp + k0 * kPanel + n0;
      int64_t m = 0;
      for (; m + kGemmMR <= M; m += kGemmMR)
        micro_cols<kGemmMR>(nn, A + m * K + k0, K, B, kPanel, C + m * ldc + n0, ldc, kc, true);
      if (m < M) micro_rows(M - m, nn, A + m * K + k0, K, B, kPanel, C + m * ldc + n0, ldc, kc, true);
    }
  }
}

inline void panel_product(int64_t M, int64_t nc, int64_t K, const float* A, const float* Bp, float* C, int64_t ldc) {
  if (M >= kBlockedRows) return panel_product_blocked(M, nc, K, A, Bp, C, ldc);
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

// ------------------------------------------------------------------ reduced-precision weights
// The same panels and passes with the weight stored in bf16, f16, q8_0 or q4_0 (LinearQArgs):
//   * a decode step (M <= kRows) makes one pass per panel that converts each weight as it
//     reads it (int8 or 4-bit -> float, its block's scale applied, or 16 -> 32 bits) and feeds
//     the FMAs directly, so the bytes read per weight, what bounds the step, are 2, 1 1/16 or
//     9/16 instead of 4;
//   * more rows (a prefill) convert each panel once into a float32 panel in the thread's
//     buffer and run the float32 passes over it, so the conversion is paid once, not per pass.
namespace linear {

template <typename T>
struct Panel16 {  // bf16 / f16 panel: K x 48 values
  const T* p;
  inline simd::vf at(int64_t k, int v) const { return simd::load(p + k * kPanel + simd::W * v); }
};

// C[R x 48] += A[R x K] Wp for one panel of 16-bit weights.
template <int R, typename T>
inline void pass16(const float* A, int64_t K, const T* Bp, float* C) {
  using namespace simd;
  constexpr int NV = kPanelVectors;
  vf c[R][NV];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) c[r][v] = load(C + r * kPanel + W * v);
  for (int64_t k = 0; k < K; ++k) {
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) {
      const vf b = load(Bp + k * kPanel + W * v);
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) c[r][v] = fma(set1(A[r * K + k]), b, c[r][v]);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) store(C + r * kPanel + W * v, c[r][v]);
}

// The 48 float16 scales of a block (at sc, after its values) as floats.
inline void block_scales(const uint8_t* scales, float* s) {
  const f16* sc = reinterpret_cast<const f16*>(scales);
  for (int v = 0; v < kPanelVectors; ++v) simd::store(s + simd::W * v, simd::load(sc + simd::W * v));
}

// Vector registers of the level (the q8_0 pass keeps a second set of accumulators where they fit).
#if defined(FASTLM_SIMD_AVX512) || defined(FASTLM_SIMD_NEON)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

// C[R x 48] += A[R x K] Wp for one q8_0 panel. Where the registers hold two sets of R x 48
// accumulators, a block's 32 products are summed from the int8 values as read (converted to
// float) and multiplied by the block's scales once at its end; otherwise each weight is
// scaled as it is read.
template <int R>
inline void pass_q8(const float* A, int64_t K, const uint8_t* Bp, float* C) {
  using namespace simd;
  constexpr int NV = kPanelVectors;
  constexpr bool kBlockSums = 2 * R * NV + 2 <= kVectorRegisters;
  alignas(64) float s[kPanel];
  vf c[R][NV];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) c[r][v] = load(C + r * kPanel + W * v);
  for (int64_t k0 = 0; k0 < K; k0 += kQuantBlock) {
    const uint8_t* blk = Bp + (k0 / kQuantBlock) * kQ8BlockBytes;
    block_scales(blk + kQuantBlock * kPanel, s);
    const int8_t* q = reinterpret_cast<const int8_t*>(blk);
    const int64_t kn = std::min<int64_t>(kQuantBlock, K - k0);
    if constexpr (kBlockSums) {
      vf t[R][NV];
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
        for (int v = 0; v < NV; ++v) t[r][v] = zero();
      for (int64_t k = 0; k < kn; ++k) {
#pragma GCC unroll 32
        for (int v = 0; v < NV; ++v) {
          const vf b = load(q + k * kPanel + W * v);
#pragma GCC unroll 32
          for (int r = 0; r < R; ++r) t[r][v] = fma(set1(A[r * K + k0 + k]), b, t[r][v]);
        }
      }
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) {
        const vf sv = load(s + W * v);
#pragma GCC unroll 32
        for (int r = 0; r < R; ++r) c[r][v] = fma(t[r][v], sv, c[r][v]);
      }
    } else {
      for (int64_t k = 0; k < kn; ++k) {
#pragma GCC unroll 32
        for (int v = 0; v < NV; ++v) {
          const vf b = mul(load(q + k * kPanel + W * v), load(s + W * v));
#pragma GCC unroll 32
          for (int r = 0; r < R; ++r) c[r][v] = fma(set1(A[r * K + k0 + k]), b, c[r][v]);
        }
      }
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) store(C + r * kPanel + W * v, c[r][v]);
}

// C[R x 48] += A[R x K] Wp for one q4_0 panel. Byte b of row kk of a block holds the
// offset values u of rows kk (low 4 bits) and kk + 16 (high 4 bits); as floats, hi =
// round(b / 16 - 15 / 32) and lo = b - 16 hi, exactly. The products are summed from u as read
// and the block's term is scale (sum_k a_k u_k - 8 sum_k a_k): the offset costs one sum of the
// row's activations per block, not one subtraction per weight.
template <int R>
inline void pass_q4(const float* A, int64_t K, const uint8_t* Bp, float* C) {
  using namespace simd;
  constexpr int NV = kPanelVectors;
  constexpr int64_t H = kQuantBlock / 2;
  alignas(64) float s[kPanel];
  const vf inv16 = set1(1.0f / 16), off = set1(-15.0f / 32), sixteen = set1(16.0f);
  vf c[R][NV];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) c[r][v] = load(C + r * kPanel + W * v);
  for (int64_t k0 = 0; k0 < K; k0 += kQuantBlock) {
    const uint8_t* blk = Bp + (k0 / kQuantBlock) * kQ4BlockBytes;
    block_scales(blk + H * kPanel, s);
    const int64_t kn = std::min<int64_t>(kQuantBlock, K - k0);
    float asum[R];
    for (int r = 0; r < R; ++r) {
      float t = 0.f;
      for (int64_t k = 0; k < kn; ++k) t += A[r * K + k0 + k];
      asum[r] = t;
    }
    // Rows kk and kk + 16 of the block for every column vector: a row of A's two values are
    // broadcast once for the panel's width. A short last block (kn < 32) reads its missing
    // rows as zero activations.
    float a2[R][kQuantBlock];
    for (int r = 0; r < R; ++r)
      for (int64_t k = 0; k < kQuantBlock; ++k) a2[r][k] = k < kn ? A[r * K + k0 + k] : 0.f;
    vf t[R][NV];
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) t[r][v] = zero();
    const int64_t rows = std::min<int64_t>(H, kn);
    for (int64_t kk = 0; kk < rows; ++kk) {
      vf alo[R], ahi[R];
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) {
        alo[r] = set1(a2[r][kk]);
        ahi[r] = set1(a2[r][kk + H]);
      }
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) {
        const vf b = load(blk + kk * kPanel + W * v);
        const vf hi = round_nearest(fma(b, inv16, off));
        const vf lo = fnma(hi, sixteen, b);
#pragma GCC unroll 32
        for (int r = 0; r < R; ++r) t[r][v] = fma(ahi[r], hi, fma(alo[r], lo, t[r][v]));
      }
    }
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) {
      const vf sv = load(s + W * v);
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) c[r][v] = fma(fnma(set1(asum[r]), set1(8.0f), t[r][v]), sv, c[r][v]);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) store(C + r * kPanel + W * v, c[r][v]);
}

// One pass over the panel for R rows (R in [1, kRows], chosen at run time).
template <int R = 1>
inline void pass_q(int64_t rows, WeightFormat f, const float* A, int64_t K, const void* Bp, float* C) {
  if constexpr (R < kRows) {
    if (rows != R) return pass_q<R + 1>(rows, f, A, K, Bp, C);
  }
  if (f == WeightFormat::q8_0) pass_q8<R>(A, K, static_cast<const uint8_t*>(Bp), C);
  else if (f == WeightFormat::q4_0) pass_q4<R>(A, K, static_cast<const uint8_t*>(Bp), C);
  else if (f == WeightFormat::bf16) pass16<R>(A, K, static_cast<const bf16*>(Bp), C);
  else pass16<R>(A, K, static_cast<const f16*>(Bp), C);
}

// The panel as float32, K x 48 (the layout of the float32 panels).
inline void dequantize_panel(WeightFormat f, const void* Bp, int64_t K, float* out) {
  using namespace simd;
  if (f == WeightFormat::q8_0) {
    alignas(64) float s[kPanel];
    const uint8_t* b8 = static_cast<const uint8_t*>(Bp);
    for (int64_t k0 = 0; k0 < K; k0 += kQuantBlock) {
      const uint8_t* blk = b8 + (k0 / kQuantBlock) * kQ8BlockBytes;
      block_scales(blk + kQuantBlock * kPanel, s);
      const int8_t* q = reinterpret_cast<const int8_t*>(blk);
      const int64_t kn = std::min<int64_t>(kQuantBlock, K - k0);
      for (int64_t k = 0; k < kn; ++k)
        for (int v = 0; v < kPanelVectors; ++v)
          store(out + (k0 + k) * kPanel + W * v, mul(load(q + k * kPanel + W * v), load(s + W * v)));
    }
    return;
  }
  if (f == WeightFormat::q4_0) {
    alignas(64) float s[kPanel];
    constexpr int64_t H = kQuantBlock / 2;
    const uint8_t* b8 = static_cast<const uint8_t*>(Bp);
    const vf inv16 = set1(1.0f / 16), off = set1(-15.0f / 32), sixteen = set1(16.0f), eight = set1(8.0f);
    for (int64_t k0 = 0; k0 < K; k0 += kQuantBlock) {
      const uint8_t* blk = b8 + (k0 / kQuantBlock) * kQ4BlockBytes;
      block_scales(blk + H * kPanel, s);
      const int64_t kn = std::min<int64_t>(kQuantBlock, K - k0);
      for (int64_t kk = 0; kk < H && kk < kn; ++kk)
        for (int v = 0; v < kPanelVectors; ++v) {
          const vf b = load(blk + kk * kPanel + W * v);
          const vf hi = round_nearest(fma(b, inv16, off));
          const vf sv = load(s + W * v);
          store(out + (k0 + kk) * kPanel + W * v, mul(sub(fnma(hi, sixteen, b), eight), sv));
          if (kk + H < kn) store(out + (k0 + kk + H) * kPanel + W * v, mul(sub(hi, eight), sv));
        }
    }
    return;
  }
  for (int64_t k = 0; k < K; ++k)
    for (int v = 0; v < kPanelVectors; ++v) {
      const int64_t i = k * kPanel + W * v;
      store(out + i, f == WeightFormat::bf16 ? load(static_cast<const bf16*>(Bp) + i)
                                             : load(static_cast<const f16*>(Bp) + i));
    }
}

inline int64_t panel_bytes(WeightFormat f, int64_t K) {
  if (f == WeightFormat::q8_0) return cdiv(K, kQuantBlock) * kQ8BlockBytes;
  if (f == WeightFormat::q4_0) return cdiv(K, kQuantBlock) * kQ4BlockBytes;
  return K * kPanel * 2;
}

void run_q(const LinearQArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N, P = cdiv(N, kPanel);
  if (M == 0 || N == 0) return;
  const int64_t pb = panel_bytes(a.format, K);
  const bool one = P * pb < kParallelBytes && 2.0 * M * K * N < kParallelFlops;
  parallel_for(0, P, one ? P : 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> wf(M > kRows ? K * kPanel : 0);  // the float32 panel of a prefill
    alignas(64) float cb[kRows * kPanel];               // a decode step's rows of one panel
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c0 = p * kPanel, nc = std::min(kPanel, N - c0);
      const void* Bp = static_cast<const uint8_t*>(a.wq) + p * pb;
      if (M > kRows) {
        dequantize_panel(a.format, Bp, K, wf.data());
        init_rows(M, nc, a.bias ? a.bias + c0 : nullptr, a.out + c0, N);
        panel_product(M, nc, K, a.x, wf.data(), a.out + c0, N);
        continue;
      }
      init_rows(M, kPanel, nullptr, cb, kPanel);
      if (a.bias)
        for (int64_t r = 0; r < M; ++r) std::copy(a.bias + c0, a.bias + c0 + nc, cb + r * kPanel);
      pass_q(M, a.format, a.x, K, Bp, cb);
      for (int64_t r = 0; r < M; ++r) std::copy(cb + r * kPanel, cb + r * kPanel + nc, a.out + r * N + c0);
    }
  });
}

}  // namespace linear
