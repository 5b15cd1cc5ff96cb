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
//   * bf16 / f16: a decode step (M <= kRows) makes one pass per panel that converts each weight
//     to float as it reads it and feeds the FMAs directly (2 bytes read per weight, not 4);
//   * q8_0 / q4_0: the activations are rounded to q8_0 once per call (quantize_rows), and a
//     pass of up to kRowsQ rows (the decode steps of a batch of 8) multiplies 8-bit integers
//     (simd.h's dot_s8 / dot_u4x2: four products summed per 32-bit lane, one lane per column),
//     scaling each block's integer sums by the two scales at its end: 1 1/16 or 9/16 bytes read
//     per weight, and four products per instruction where converting each weight to float
//     first would spend a conversion on every one;
//   * more rows (a prefill) convert each panel once into a float32 panel in the thread's buffer
//     and run the float32 passes over it (with the rounded activations for q8_0 / q4_0), so the
//     conversion is paid once, not per pass; except q8_0 / q4_0 with VNNI, where the integer
//     passes take the rows kRowsQ at a time (kIntegerPrefill).
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

// Activations rounded to q8_0, in chunks of kRowsQ rows (the last chunk may have fewer): within
// a chunk of R rows, block j of row r is entry j R + r (its 32 int8 values, zero past K, its
// scale d and the sum of its values; q4_0's offset of 8 costs 8 d sum per block), so a pass
// finds the R rows of each block side by side. A QRows is one chunk.
struct QRows {
  const int8_t* q;  // nb x R x 32
  const float* d;   // nb x R
  const float* sum;
  int64_t nb;
};

constexpr int64_t kRowsQ = 8;

// Where block j of row m lies among M rows' chunks (in blocks; q is 32 times that).
inline int64_t chunk_index(int64_t M, int64_t nb, int64_t m, int64_t j) {
  const int64_t m0 = m - m % kRowsQ, rows = std::min(kRowsQ, M - m0);
  return m0 * nb + j * rows + (m - m0);
}

// Rounds the M rows of x (M x K) to q8_0 blocks: d = amax / 127, q = round(x (127 / amax)), in
// float32, rounding half to even (fastlm.reference.quantize_activations_q8_0 is the same
// arithmetic). A block holding a NaN or an infinity gets d = NaN (its row's outputs are NaN,
// as the float product's would be) and zero values. Fills q, d and sum (when not null) in the
// chunked layout above; xr (when not null) gets the values q d as float32, M x K.
inline void quantize_rows(int64_t M, int64_t K, const float* x, int8_t* q, float* d, float* sum, float* xr) {
  using namespace simd;
  constexpr int64_t V = kQuantBlock / W;  // vectors a block
  const int64_t nb = cdiv(K, kQuantBlock);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < nb; ++j) {
      const float* xb = x + m * K + j * kQuantBlock;
      const int64_t kn = std::min<int64_t>(kQuantBlock, K - j * kQuantBlock);
      vf v[V];
      for (int64_t i = 0; i < V; ++i)  // zero past K
        v[i] = kn == kQuantBlock ? load(xb + i * W) : load(xb + i * W, std::max<int64_t>(0, std::min<int64_t>(W, kn - i * W)));
      // amax, and whether every value is finite: x 0 is 0 for a finite x and NaN for a NaN or
      // an infinity (max() alone may drop a NaN lane, and a NaN must not pass)
      vf mx = zero(), nan = zero();
      for (int64_t i = 0; i < V; ++i) {
        mx = max(mx, max(v[i], sub(zero(), v[i])));
        nan = add(nan, mul(v[i], zero()));
      }
      const bool finite = reduce_add(nan) == 0.0f;
      const float amax = reduce_max(mx);
      const float inv = finite && amax > 0 ? 127.0f / amax : 0.0f;
      const float scale = finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
      // the rounded values (integers in [-127, 127], exact in float32; all zero when not finite)
      alignas(64) float r[kQuantBlock];
      vf total = zero();
      for (int64_t i = 0; i < V; ++i) {
        const vf t = round_nearest(mul(v[i], set1(inv)));
        const vf ti = finite ? t : zero();
        store(r + i * W, ti);
        total = add(total, ti);
      }
      const int64_t at = chunk_index(M, nb, m, j);
      int8_t* qb = q + at * kQuantBlock;
      for (int64_t i = 0; i < kQuantBlock; ++i) qb[i] = static_cast<int8_t>(static_cast<int32_t>(r[i]));
      d[at] = scale;
      if (sum) sum[at] = reduce_add(total);
      if (xr)
        for (int64_t i = 0; i * W < kn; ++i)
          store(xr + m * K + j * kQuantBlock + i * W, mul(load(r + i * W), set1(scale)), std::min<int64_t>(W, kn - i * W));
    }
}

// Rows of a pass over a q8_0 / q4_0 panel. A pass of few rows keeps the integer sums of the
// whole panel width in registers and reads each block in address order (what a decode step,
// bound by reading the weight, wants); a pass of more rows than that fits takes one column
// vector at a time (a block's 8 groups of 4 k for W columns, 192 bytes apart) with R sums,
// prefetching the blocks ahead, so that a batch of up to 8 decode steps still reads each
// weight byte once from memory (with VNNI, in two passes of 4 over each block: kRowsPass).
#if defined(FASTLM_SIMD_AVX512) || defined(FASTLM_SIMD_NEON)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif
template <int R>
constexpr bool kWholeWidth = R * kPanelVectors + 4 <= kVectorRegisters;

// C[r][W v ...] += d_r s t[r] for one block's column vector v: t its integer sums (exact in
// float32: |t| < 2^24).
template <int R>
inline void add_block(const simd::vd* t, const float* s, int v, const float* d, float* C) {
  using namespace simd;
  const vf sv = load(s + W * v);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* c = C + r * kPanel + W * v;
    store(c, fma(mul(to_float(t[r]), set1(d[r])), sv, load(c)));
  }
}

// The block's lines two blocks ahead, into L1.
inline void prefetch_block(const uint8_t* p, int64_t bytes) {
#pragma GCC unroll 32
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
}

// One block of a q8_0 / q4_0 panel for R rows (x, xd, xsum: the rows' values, scales and sums
// in that block): Group(t, v, g) adds group g of column vector v to the R sums t (of that
// vector). off: what each unit of a row's block sum takes off (q4_0's 8, q8_0's
// simd::kWBias); the sums start there, so that nothing is left to subtract after.
template <int R, int G, typename Group>
inline void block_pass(const uint8_t* scales, const int8_t* x, const float* xd, const float* xsum, float* C,
                       const uint8_t* ahead, int64_t bytes, int32_t off, Group group) {
  using namespace simd;
  constexpr int NV = kPanelVectors;
  alignas(64) float s[kPanel];
  float d[R];
  int32_t o[R];
  for (int r = 0; r < R; ++r) {
    d[r] = xd[r];
    o[r] = -off * static_cast<int32_t>(xsum[r]);
  }
  if constexpr (kWholeWidth<R>) {
    vd t[NV][R];
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) t[v][r] = dset1(o[r]);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) {
        // each vector broadcasts the rows' bytes again (a load each, or an operand of the dot
        // instruction itself): kept from one vector to the next, R broadcasts beside the
        // R x NV sums would not fit the registers
        const int8_t* xs = x;
        asm volatile("" : "+r"(xs));
        group(t[v], v, g, xs);
      }
    // the scales after the values: the block is read in address order, which the hardware
    // prefetchers follow (reading the scales first, 1.5 KB in, then going back, stalls each block)
    block_scales(scales, s);
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) add_block<R>(t[v], s, v, d, C);
  } else {
    prefetch_block(ahead, bytes);
    block_scales(scales, s);
#pragma GCC unroll 1
    for (int v = 0; v < NV; ++v) {
      vd t[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) t[r] = dset1(o[r]);
      // The rows' broadcasts are the same for every v: hoisted out of this loop, R x G of them
      // would not fit the registers and go through the stack; loaded again per v they are one
      // broadcast load each.
      const int8_t* xs = x;
      asm volatile("" : "+r"(xs));
#pragma GCC unroll 1
      for (int g = 0; g < G; ++g) group(t, v, g, xs);
      add_block<R>(t, s, v, d, C);
    }
  }
}

// The most rows one integer pass over a block takes. With VNNI the products are cheap enough
// that 8 rows' 24 vectors of sums beside the weights and scales crowd the registers (the pass
// spilled), so a block goes through two passes of 4, the second reading it from L1; without it
// the products dominate and one pass of 8 takes the block.
constexpr int kRowsPass = simd::kWBias != 0 ? 4 : int(kRowsQ);

// One q8_0 block (blk) for R rows (x, xd, xsum as block_pass takes them): group g of a block
// holds k = 4 g + t.
template <int R>
inline void block_q8(const uint8_t* blk, const int8_t* x, const float* xd, const float* xsum, float* C) {
  using namespace simd;
  block_pass<R, kQuantBlock / 4>(blk + kQuantBlock * kPanel, x, xd, xsum, C, blk + 2 * kQ8BlockBytes, kQ8BlockBytes,
                                 kWBias, [&](vd* t, int v, int g, const int8_t* xs) __attribute__((always_inline)) {
                                   const vb w = prep_w(loadb(blk + (g * kPanel + W * v) * 4));
#pragma GCC unroll 8
                                   for (int r = 0; r < R; ++r) t[r] = dot_s8(t[r], w, xs + r * kQuantBlock + 4 * g);
                                 });
}

// One q4_0 block for R rows: group g's bytes hold k = 4 g + t (low 4 bits) and k = 16 + 4 g + t
// (high 4 bits); the block's term is d s (sum_k q_k u_k - 8 sum_k q_k).
template <int R>
inline void block_q4(const uint8_t* blk, const int8_t* x, const float* xd, const float* xsum, float* C) {
  using namespace simd;
  constexpr int H = kQuantBlock / 2;
  block_pass<R, H / 4>(blk + H * kPanel, x, xd, xsum, C, blk + 2 * kQ4BlockBytes, kQ4BlockBytes, 8,
                       [&](vd* t, int v, int g, const int8_t* xs) __attribute__((always_inline)) {
                         const vb b = loadb(blk + (g * kPanel + W * v) * 4);
                         const vb lo = low4(b), hi = high4(b);
#pragma GCC unroll 8
                         for (int r = 0; r < R; ++r) {
                           const int8_t* xr = xs + r * kQuantBlock;
                           t[r] = dot_u4x2(t[r], lo, xr + 4 * g, hi, xr + H + 4 * g);
                         }
                       });
}

// The block for R rows in groups of at most kRowsPass, all of them on this block before the
// next one: the arithmetic of every row then overlaps the panel's stream from memory (passes
// over the whole panel, one group at a time, would stream it under the first group and leave
// the others to run after the stream, from L2).
template <int R, bool Q8>
inline void block_rows(const uint8_t* blk, const int8_t* x, const float* xd, const float* xsum, float* C) {
  constexpr int P = R > kRowsPass ? kRowsPass : R;
  if constexpr (Q8) block_q8<P>(blk, x, xd, xsum, C);
  else block_q4<P>(blk, x, xd, xsum, C);
  if constexpr (R > P) block_rows<R - P, Q8>(blk, x + P * kQuantBlock, xd + P, xsum + P, C + P * kPanel);
}

// C[R x 48] += Aq[R x K] Wp for one q8_0 / q4_0 panel, Aq a chunk of R rows.
template <int R, bool Q8>
inline void pass_blocks(const QRows& a, const uint8_t* Bp, float* C) {
  const int64_t bb = Q8 ? kQ8BlockBytes : kQ4BlockBytes;
  for (int64_t j = 0; j < a.nb; ++j)
    block_rows<R, Q8>(Bp + j * bb, a.q + j * R * kQuantBlock, a.d + j * R, a.sum + j * R, C);
}

// R rows of a q8_0 / q4_0 panel.
template <int R>
inline void pass_int(WeightFormat f, const QRows& a, const uint8_t* Bp, float* C) {
  if (f == WeightFormat::q8_0) pass_blocks<R, true>(a, Bp, C);
  else pass_blocks<R, false>(a, Bp, C);
}

// One pass over the panel for R rows (R in [1, kRows] for bf16 / f16, [1, kRowsQ] for q8_0 /
// q4_0, chosen at run time); A / Aq the rows.
template <int R = 1>
inline void pass_q(int64_t rows, WeightFormat f, const float* A, const QRows& Aq, int64_t K, const void* Bp,
                   float* C) {
  if constexpr (R < kRowsQ) {
    if (rows != R) return pass_q<R + 1>(rows, f, A, Aq, K, Bp, C);
  }
  if (f == WeightFormat::q8_0 || f == WeightFormat::q4_0) pass_int<R>(f, Aq, static_cast<const uint8_t*>(Bp), C);
  else if constexpr (R <= kRows) {
    if (f == WeightFormat::bf16) pass16<R>(A, K, static_cast<const bf16*>(Bp), C);
    else pass16<R>(A, K, static_cast<const f16*>(Bp), C);
  }
}

// Rows k0 + T, k0 + 4 + T, ... of a q8_0 / q4_0 block (byte T of each group) as floats:
// out row k0 + 4 g + T = (value - offset) s for the rows below kn.
template <int T>
inline void dequantize_rows(const simd::vb (&b)[kPanelVectors], const float* s, float offset, int64_t k, int64_t kn,
                            float* out) {
  using namespace simd;
  if (k + T >= kn) return;
  for (int v = 0; v < kPanelVectors; ++v)
    store(out + (k + T) * kPanel + W * v, mul(sub(to_float(sbyte<T>(b[v])), set1(offset)), load(s + W * v)));
}
inline void each_byte(const simd::vb (&b)[kPanelVectors], const float* s, float offset, int64_t k, int64_t kn,
                      float* out) {
  dequantize_rows<0>(b, s, offset, k, kn, out);
  dequantize_rows<1>(b, s, offset, k, kn, out);
  dequantize_rows<2>(b, s, offset, k, kn, out);
  dequantize_rows<3>(b, s, offset, k, kn, out);
}

// The panel as float32, K x 48 (the layout of the float32 panels).
inline void dequantize_panel(WeightFormat f, const void* Bp, int64_t K, float* out) {
  using namespace simd;
  if (f == WeightFormat::q8_0 || f == WeightFormat::q4_0) {
    const bool q8 = f == WeightFormat::q8_0;
    const int64_t bb = q8 ? kQ8BlockBytes : kQ4BlockBytes;
    const int64_t groups = q8 ? kQuantBlock / 4 : kQuantBlock / 8;
    alignas(64) float s[kPanel];
    const uint8_t* b8 = static_cast<const uint8_t*>(Bp);
    for (int64_t k0 = 0; k0 < K; k0 += kQuantBlock) {
      const uint8_t* blk = b8 + (k0 / kQuantBlock) * bb;
      block_scales(blk + groups * kPanel * 4, s);
      const int64_t kn = std::min<int64_t>(kQuantBlock, K - k0);
      for (int64_t g = 0; g < groups; ++g) {
        vb b[kPanelVectors];
        for (int v = 0; v < kPanelVectors; ++v) b[v] = loadb(blk + (g * kPanel + W * v) * 4);
        if (q8) {
          each_byte(b, s, 0.f, 4 * g, kn, out + k0 * kPanel);
          continue;
        }
        vb lo[kPanelVectors], hi[kPanelVectors];
        for (int v = 0; v < kPanelVectors; ++v) {
          lo[v] = low4(b[v]);
          hi[v] = high4(b[v]);
        }
        each_byte(lo, s, 8.f, 4 * g, kn, out + k0 * kPanel);
        each_byte(hi, s, 8.f, kQuantBlock / 2 + 4 * g, kn, out + k0 * kPanel);
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

// Whether a prefill's q8_0 / q4_0 product also runs the integer passes, kRowsQ rows at a time
// over each panel (the panel stays in L2 between them): where vpdpbusd does four products an
// instruction (VNNI), they outpace converting the panel to float32 and running the float32
// GEMM; without it the float32 GEMM is as fast and is kept.
constexpr bool kIntegerPrefill = simd::kWBias != 0;

void run_q(const LinearQArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N, P = cdiv(N, kPanel);
  if (M == 0 || N == 0) return;
  const int64_t pb = panel_bytes(a.format, K);
  const bool one = P * pb < kParallelBytes && 2.0 * M * K * N < kParallelFlops;
  const bool integer = a.format == WeightFormat::q8_0 || a.format == WeightFormat::q4_0;
  const bool passes = M <= (integer ? kRowsQ : kRows) || (integer && kIntegerPrefill);
  // The rounded activations, once for every panel: int8 blocks for the passes, their float
  // values for a prefill's float32 product.
  const int64_t nb = cdiv(K, kQuantBlock);
  // (every entry is written by quantize_rows: no zeroing)
  std::unique_ptr<int8_t[]> xq_buf(integer ? new int8_t[M * nb * kQuantBlock] : nullptr);
  std::unique_ptr<float[]> xd_buf(integer ? new float[2 * M * nb] : nullptr);
  int8_t* xq = xq_buf.get();
  float* xd = xd_buf.get();
  std::vector<float> xr(integer && !passes ? M * K : 0);
  if (integer) quantize_rows(M, K, a.x, xq, xd, xd + M * nb, passes ? nullptr : xr.data());
  const float* x = integer && !passes ? xr.data() : a.x;
  parallel_for(0, P, one ? P : 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> wf(passes ? 0 : K * kPanel);  // the float32 panel of a prefill
    alignas(64) float cb[kRowsQ * kPanel];            // up to kRowsQ rows of one panel
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c0 = p * kPanel, nc = std::min(kPanel, N - c0);
      const void* Bp = static_cast<const uint8_t*>(a.wq) + p * pb;
      if (!passes) {
        dequantize_panel(a.format, Bp, K, wf.data());
        init_rows(M, nc, a.bias ? a.bias + c0 : nullptr, a.out + c0, N);
        panel_product(M, nc, K, x, wf.data(), a.out + c0, N);
        continue;
      }
      for (int64_t m0 = 0; m0 < M; m0 += kRowsQ) {
        const int64_t rows = std::min(kRowsQ, M - m0);
        // the rows start at the bias (zero past nc, where the panel's padding columns add zero)
        init_rows(rows, kPanel, nullptr, cb, kPanel);
        if (a.bias) init_rows(rows, nc, a.bias + c0, cb, kPanel);
        const QRows aq{xq + m0 * nb * kQuantBlock, xd + m0 * nb, xd + M * nb + m0 * nb, nb};
        pass_q(rows, a.format, x + m0 * K, aq, K, Bp, cb);
        for (int64_t r = 0; r < rows; ++r) simd::to_f32(cb + r * kPanel, nc, a.out + (m0 + r) * N + c0);
      }
    }
  });
}

}  // namespace linear
