// Fused causal / full attention on the CPU: flash-style forward and backward, and decode
// over a ragged KV cache.
//
// Forward (FlashAttention 2), per (batch, head, query tile of BQ rows), tiles run in
// parallel, the costliest (latest, under causal masking) first, on a shared work counter:
//   Qs = Q_tile * scale * log2(e); O = 0; m = -inf; l = 0
//   for each key tile of BK keys that some row of the tile can see (causal tiles skipped):
//     S = Qs K^T            (micro-kernel over K^T packed once per head in D x BK panels)
//     m' = max(m, rowmax S); P = 2^(S - m'); l = l 2^(m - m') + rowsum P; O = O 2^(m - m') + P V
//   out = O / l, lse = (m + log2 l) ln 2 (the natural-log logsumexp, saved for backward).
//   The T x T score matrix is never formed: S and P are one BQ x BK tile per thread.
// Backward, per (batch, key/value head, key tile), in parallel, every query head of the
// group and every query tile that sees the tile, all in transposed form so that each
// product is a row-major C += A B:
//   S^T = K Q^T, P^T = 2^(S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T - rowsum(dO o O)),
//   dV += P^T dO, dK += dS^T Q scale, dQ^T += K^T dS^T (into a per-thread buffer, summed at
//   the end: no races, no atomics).
// Decode, per (batch, key/value head, slice of the cache), in parallel: the queries of the
// group share every K/V row read; each slice keeps a partial (max, sum, acc) per query and
// the slices are combined by their logsumexps.
// Arithmetic in float32; bf16/fp16 inputs are converted on entry and outputs on exit.
// Outputs and scratch come from the output pool (common.h): a fresh 3 MB buffer from glibc
// can be a new mapping whose page faults cost about 15% of a (1, 12, 1024, 64) forward.
// One register-blocked C[MR x 64] += A B micro-kernel (AVX-512, masked tails) serves every
// product; a portable scalar path is compiled when AVX-512 is absent.
#include "common.h"
#include "gemm.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

namespace fastlm {
namespace {

constexpr int64_t BQ = 64;  // query rows per tile
constexpr int64_t BK = 64;  // keys per tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------ tiles and rows (gemm.h: C (+)= A B)
#ifdef FASTLM_AVX512
// Diagonal tiles of causal attention, where row i sees only columns c < i + 1 + delta:
// S[M x 64] = A B over the columns some row of each row block sees (the rest is left unwritten),
// and C[M x N] += P V over the keys some row of each row block sees (P is 0 past them).
void gemm_diag_scores(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, float* C, int64_t delta) {
  int64_t m = 0;
  for (; m < M; m += MR) {
    const int64_t R = std::min<int64_t>(MR, M - m);
    const int64_t ncols = std::min<int64_t>(BK, m + R + delta);
    if (ncols <= 0) continue;
    const float* Am = A + m * lda;
    float* Cm = C + m * BK;
    switch (R) {
      case 6: micro_cols<6>(ncols, Am, lda, B, BK, Cm, BK, K, false); break;
      case 5: micro_cols<5>(ncols, Am, lda, B, BK, Cm, BK, K, false); break;
      case 4: micro_cols<4>(ncols, Am, lda, B, BK, Cm, BK, K, false); break;
      case 3: micro_cols<3>(ncols, Am, lda, B, BK, Cm, BK, K, false); break;
      case 2: micro_cols<2>(ncols, Am, lda, B, BK, Cm, BK, K, false); break;
      default: micro_cols<1>(ncols, Am, lda, B, BK, Cm, BK, K, false); break;
    }
  }
}

void gemm_diag_pv(int64_t M, int64_t N, int64_t nk, const float* P, const float* V, int64_t ldv, float* C,
                  int64_t ldc, int64_t delta) {
  for (int64_t m = 0; m < M; m += MR) {
    const int64_t R = std::min<int64_t>(MR, M - m);
    const int64_t K = std::min<int64_t>(nk, m + R + delta);
    if (K <= 0) continue;
    gemm(R, N, K, P + m * BK, BK, V, ldv, C + m * ldc, ldc, true);
  }
}

// max of x[0:n]
inline float row_max(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-kInf);
  for (int64_t j = 0; j < n; j += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(_mm512_set1_ps(-kInf), tail_mask(n - j), x + j));
  return _mm512_reduce_max_ps(m);
}

// x[0:n] = 2^(x - m), x[n:ntot] = 0; returns the sum.
inline float exp2_rows(float* x, int64_t n, int64_t ntot, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 s = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 p = _mm512_maskz_mov_ps(k, simd::exp2(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), mv)));
    s = _mm512_add_ps(s, p);
    _mm512_storeu_ps(x + j, p);  // lanes past n become 0 (x has room up to a multiple of 16)
  }
  for (; j < ntot; j += 16) _mm512_storeu_ps(x + j, _mm512_setzero_ps());
  return _mm512_reduce_add_ps(s);
}

inline void scale_row(float* x, int64_t n, float a) {
  const __m512 av = _mm512_set1_ps(a);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    _mm512_mask_storeu_ps(x + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + j), av));
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m512 s = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + j), _mm512_maskz_loadu_ps(k, b + j), s);
  }
  return _mm512_reduce_add_ps(s);
}

// Index vectors of the 16-to-1 transposing reduction below: level l combines pairs (x, y) of
// vectors holding n = 2^l keys with p = 16 / n partial sums each (p consecutive lanes per key)
// into one vector holding 2n keys with p / 2 partials each: out = A + B, where A takes the
// first half of every key's lanes (x's keys, then y's) and B the second half.
struct ReduceIndex {
  alignas(64) int32_t a[4][16]{}, b[4][16]{};
  constexpr ReduceIndex() {
    for (int l = 0; l < 4; ++l) {
      const int n = 1 << l, p = 16 / n, h = p / 2;
      for (int k = 0; k < 2 * n; ++k)
        for (int i = 0; i < h; ++i) {
          const int src = (k < n ? 0 : 16) + (k % n) * p + i;
          a[l][k * h + i] = src;
          b[l][k * h + i] = src + h;
        }
    }
  }
};

constexpr ReduceIndex kReduceIndex{};

// Lane c of the result is the sum of acc[c]'s lanes, for the 16 vectors acc[0..16): a
// transposing reduction (15 two-source permutes and adds) instead of 16 horizontal sums.
// Overwrites acc. Always inlined: as a call per 16 keys it took 4.6% of a batch-8 decode
// call's samples, beside the decode loop's 38%.
__attribute__((always_inline)) inline __m512 transpose_sum(__m512* acc) {
  const ReduceIndex& ix = kReduceIndex;
#pragma GCC unroll 4
  for (int l = 0; l < 4; ++l) {
    const __m512i ia = _mm512_load_si512(ix.a[l]), ib = _mm512_load_si512(ix.b[l]);
    const int pairs = 8 >> l;
#pragma GCC unroll 8
    for (int t = 0; t < pairs; ++t)
      acc[t] = _mm512_add_ps(_mm512_permutex2var_ps(acc[2 * t], ia, acc[2 * t + 1]),
                             _mm512_permutex2var_ps(acc[2 * t], ib, acc[2 * t + 1]));
  }
  return acc[0];
}

// s[c] = q . K[c] for the m <= 16 keys K[0..m) (rows of D floats): one FMA accumulator per
// key, then transpose_sum.
inline void dots(const float* q, const float* K, int64_t D, int64_t m, float* s) {
  const float* rows[16];
  for (int c = 0; c < 16; ++c) rows[c] = K + std::min<int64_t>(c, m - 1) * D;  // past m: repeat a valid row
  __m512 acc[16];
#pragma GCC unroll 16
  for (int c = 0; c < 16; ++c) {  // key by key: K is read in address order
    acc[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < D; j += 16) {
      const __mmask16 k = tail_mask(D - j);
      acc[c] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, q + j), _mm512_maskz_loadu_ps(k, rows[c] + j), acc[c]);
    }
  }
  _mm512_mask_storeu_ps(s, tail_mask(m), transpose_sum(acc));
}

// One query row against n >= 1 keys, all visible, for D = 16 NV: the decode step of plain
// multi-head attention. q is pre-scaled (scale * log2 e). Sixteen keys at a time, their
// scores stay in one register through the online softmax and into P V; out gets the
// unnormalised sum (D floats), then the running max (log2 units) and the sum of weights,
// the layout of a decode slice's partial result.
template <int NV>
void decode_row(const float* q, const float* K, const float* V, int64_t n, float* out) {
  constexpr int64_t D = 16 * NV;
  __m512 qv[NV], o[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    qv[v] = _mm512_loadu_ps(q + 16 * v);
    o[v] = _mm512_setzero_ps();
  }
  float m = -kInf, l = 0.f;
  alignas(64) float p[16];
  for (int64_t c0 = 0; c0 < n; c0 += 16) {
    const int64_t nc = std::min<int64_t>(16, n - c0);
    const float* Kc = K + c0 * D;
    __m512 acc[16];
#pragma GCC unroll 16
    for (int c = 0; c < 16; ++c) {
      const float* row = Kc + std::min<int64_t>(c, nc - 1) * D;  // past nc: repeat a valid row
      acc[c] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(row));
#pragma GCC unroll 8
      for (int v = 1; v < NV; ++v) acc[c] = _mm512_fmadd_ps(qv[v], _mm512_loadu_ps(row + 16 * v), acc[c]);
    }
    const __mmask16 valid = tail_mask(nc);
    const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-kInf), valid, transpose_sum(acc));
    const float mnew = std::max(m, _mm512_reduce_max_ps(s));
    if (mnew > m) {
      const float alpha = std::exp2(m - mnew);  // 0 on the first block
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) o[v] = _mm512_mul_ps(o[v], _mm512_set1_ps(alpha));
      l *= alpha;
      m = mnew;
    }
    const __m512 pv = _mm512_maskz_mov_ps(valid, simd::exp2(_mm512_sub_ps(s, _mm512_set1_ps(m))));
    l += _mm512_reduce_add_ps(pv);
    _mm512_store_ps(p, pv);
    const float* Vc = V + c0 * D;
    for (int64_t c = 0; c < nc; ++c) {
      const __m512 pc = _mm512_set1_ps(p[c]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) o[v] = _mm512_fmadd_ps(pc, _mm512_loadu_ps(Vc + c * D + 16 * v), o[v]);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + 16 * v, o[v]);
  out[D] = m;
  out[D + 1] = l;
}

// decode_row for the D it was compiled for; false when D is not 16, 32, ..., 128.
inline bool decode_row_fixed(const float* q, const float* K, const float* V, int64_t n, int64_t D, float* out) {
  switch (D) {
    case 16: decode_row<1>(q, K, V, n, out); return true;
    case 32: decode_row<2>(q, K, V, n, out); return true;
    case 48: decode_row<3>(q, K, V, n, out); return true;
    case 64: decode_row<4>(q, K, V, n, out); return true;
    case 80: decode_row<5>(q, K, V, n, out); return true;
    case 96: decode_row<6>(q, K, V, n, out); return true;
    case 112: decode_row<7>(q, K, V, n, out); return true;
    case 128: decode_row<8>(q, K, V, n, out); return true;
    default: return false;
  }
}

// backward: P^T row r: p[c] = 2^(s[c] - lse2[c]); ds[c] = p[c] (dp[c] - delta[c]), c < 64
inline void bwd_row(float* s, float* dp, const float* lse2, const float* delta, int64_t ncols) {
  for (int64_t c = 0; c < ncols; c += 16) {
    const __m512 p = simd::exp2(_mm512_sub_ps(_mm512_loadu_ps(s + c), _mm512_loadu_ps(lse2 + c)));
    _mm512_storeu_ps(s + c, p);
    _mm512_storeu_ps(dp + c, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp + c), _mm512_loadu_ps(delta + c))));
  }
}
#else  // portable path
void gemm_diag_scores(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, float* C, int64_t) {
  gemm(M, BK, K, A, lda, B, BK, C, BK, false);
}
void gemm_diag_pv(int64_t M, int64_t N, int64_t nk, const float* P, const float* V, int64_t ldv, float* C,
                  int64_t ldc, int64_t) {
  gemm(M, N, nk, P, BK, V, ldv, C, ldc, true);
}
inline float row_max(const float* x, int64_t n) {
  float m = -kInf;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}
inline float exp2_rows(float* x, int64_t n, int64_t ntot, float m) {
  float s = 0.f;
  for (int64_t j = 0; j < n; ++j) s += (x[j] = std::exp2(x[j] - m));
  for (int64_t j = n; j < ntot; ++j) x[j] = 0.f;
  return s;
}
inline void scale_row(float* x, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}
inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}
inline void dots(const float* q, const float* K, int64_t D, int64_t m, float* s) {
  for (int64_t c = 0; c < m; ++c) s[c] = dot(q, K + c * D, D);
}
inline bool decode_row_fixed(const float*, const float*, const float*, int64_t, int64_t, float*) { return false; }
inline void bwd_row(float* s, float* dp, const float* lse2, const float* delta, int64_t ncols) {
  for (int64_t c = 0; c < ncols; ++c) {
    const float p = std::exp2(s[c] - lse2[c]);
    s[c] = p;
    dp[c] = p * (dp[c] - delta[c]);
  }
}
#endif

// Threads worth waking for a call of this many floating-point operations (or bytes moved):
// below about 4 million a single core finishes in tens of microseconds, less than waking and
// joining the others costs (far less than waiting for one that is descheduled on a busy
// machine, which can take milliseconds).
inline int64_t threads_for(double work) {
  return work < 4e6 ? 1 : std::max<int64_t>(1, at::get_num_threads());
}

// Runs work(item, thread) for item in [0, n) on at::get_num_threads() threads, handing the
// items out one at a time in order (so list the costliest first).
template <typename F>
void run_dynamic(int64_t n, F&& work, int64_t max_threads = 0) {
  int64_t nthr = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  if (max_threads > 0) nthr = std::min(nthr, max_threads);
  if (nthr == 1) {  // at::parallel_for would still wake every thread of the pool
    auto state = work.make_state();
    for (int64_t i = 0; i < n; ++i) work(i, 0, state);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthr, 1, [&](int64_t tb, int64_t te) {
    for (int64_t tid = tb; tid < te; ++tid) {
      auto state = work.make_state();
      for (int64_t i; (i = next.fetch_add(1)) < n;) work(i, tid, state);
    }
  });
}

// ------------------------------------------------------------------ packing
// K^T panels of one (batch, kv head): kt[t * D * BK + d * BK + c] = K[t * BK + c, d] (zero past Tk).
void pack_kt_head(const float* k, float* kt, int64_t Tk, int64_t D) {
  const int64_t nkt = cdiv(Tk, BK);
  for (int64_t t = 0; t < nkt; ++t) {
    float* dst = kt + t * D * BK;
    const int64_t n = std::min(BK, Tk - t * BK);
    const float* src = k + t * BK * D;
    if (n < BK)
      for (int64_t d = 0; d < D; ++d) std::fill(dst + d * BK + n, dst + (d + 1) * BK, 0.f);
    for (int64_t c = 0; c < n; ++c)
      for (int64_t d = 0; d < D; ++d) dst[d * BK + c] = src[c * D + d];
  }
}

// Spin until a flag set by another worker of the same parallel region is raised.
inline void wait_flag(const std::atomic<int>& f) {
  while (f.load(std::memory_order_acquire) == 0) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
}

// ------------------------------------------------------------------ forward
struct FwdArgs {
  const float *q, *k, *v;
  float *kt;
  std::atomic<int>* packed;  // per (batch, kv head): its K^T panels are ready
  float *out, *lse;
  int64_t B, H, Hkv, Tq, Tk, D;
  bool causal;
  float scale;
};

struct FwdWork {
  const FwdArgs& a;
  struct State {
    std::vector<float> qs, s;
    std::vector<float> m, l;
  };
  State make_state() const {
    State st;
    st.qs.resize(BQ * a.D);
    st.s.resize(BQ * BK);
    st.m.resize(BQ);
    st.l.resize(BQ);
    return st;
  }
  // Items: first one K^T packing job per (batch, kv head), then the query tiles, the latest
  // (dearest under causal masking) first. Handed out in order, so a tile waits at most for a
  // packing job already running on another thread.
  void operator()(int64_t item, int64_t, State& st) const {
    const int64_t BHkv = a.B * a.Hkv;
    if (item < BHkv) {
      pack_kt_head(a.k + item * a.Tk * a.D, a.kt + item * cdiv(a.Tk, BK) * a.D * BK, a.Tk, a.D);
      a.packed[item].store(1, std::memory_order_release);
      return;
    }
    item -= BHkv;
    const int64_t BH = a.B * a.H, nqt = cdiv(a.Tq, BQ), D = a.D;
    const int64_t qt = nqt - 1 - item / BH, bh = item % BH;
    const int64_t b = bh / a.H, h = bh % a.H, hk = h / (a.H / a.Hkv);
    const int64_t q0 = qt * BQ, nq = std::min(BQ, a.Tq - q0);
    const int64_t off = a.Tk - a.Tq;  // query i sees keys j <= i + off under causal masking
    const int64_t kend = a.causal ? std::min(a.Tk, q0 + nq + off) : a.Tk;  // keys any row sees
    float* O = a.out + (bh * a.Tq + q0) * D;
    float* lse = a.lse + bh * a.Tq + q0;
    if (kend <= 0) {
      std::fill(O, O + nq * D, 0.f);
      std::fill(lse, lse + nq, kInf);
      return;
    }
    wait_flag(a.packed[b * a.Hkv + hk]);
    const float* Q = a.q + (bh * a.Tq + q0) * D;
    const float qscale = a.scale * kLog2e;
    float* qs = st.qs.data();
    for (int64_t i = 0; i < nq * D; ++i) qs[i] = Q[i] * qscale;
    float* S = st.s.data();
    float* m = st.m.data();
    float* l = st.l.data();
    std::fill(m, m + nq, -kInf);
    std::fill(l, l + nq, 0.f);
    std::fill(O, O + nq * D, 0.f);
    const int64_t nkt_all = cdiv(a.Tk, BK);
    const float* KT = a.kt + (b * a.Hkv + hk) * nkt_all * D * BK;
    const float* V = a.v + (b * a.Hkv + hk) * a.Tk * D;
    const int64_t nkt = cdiv(kend, BK);
    for (int64_t t = 0; t < nkt; ++t) {
      const int64_t k0 = t * BK, nk = std::min(BK, kend - k0);
      const bool diag = a.causal && (k0 + nk - 1 > q0 + off);
      const int64_t delta = q0 + off - k0;  // row i of the tile sees tile keys c <= i + delta
      if (diag) gemm_diag_scores(nq, D, qs, D, KT + t * D * BK, S, delta);
      else gemm(nq, BK, D, qs, D, KT + t * D * BK, BK, S, BK, false);
      for (int64_t i = 0; i < nq; ++i) {
        float* srow = S + i * BK;
        int64_t vis = nk;
        if (diag) vis = std::min(nk, q0 + i + off - k0 + 1);
        if (vis <= 0) {
          std::fill(srow, srow + BK, 0.f);
          continue;
        }
        const float mx = row_max(srow, vis);
        const float mnew = std::max(m[i], mx);
        const float alpha = std::exp2(m[i] - mnew);  // 0 when m[i] = -inf
        const float sum = exp2_rows(srow, vis, nk, mnew);
        if (alpha != 1.f) scale_row(O + i * D, D, alpha);
        l[i] = l[i] * alpha + sum;
        m[i] = mnew;
      }
      if (diag) gemm_diag_pv(nq, D, nk, S, V + k0 * D, D, O, D, delta);
      else gemm(nq, D, nk, S, BK, V + k0 * D, D, O, D, true);
    }
    for (int64_t i = 0; i < nq; ++i) {
      if (l[i] > 0.f) {
        scale_row(O + i * D, D, 1.f / l[i]);
        lse[i] = (m[i] + std::log2(l[i])) * kLn2;
      } else {
        std::fill(O + i * D, O + (i + 1) * D, 0.f);
        lse[i] = kInf;  // no visible key: P = exp(s - inf) = 0 in the backward pass
      }
    }
  }
};

// ------------------------------------------------------------------ backward
struct BwdArgs {
  const float *q, *k, *v, *dout, *out, *lse;
  float *qt, *dot_, *lse2, *delta;  // qt, dot_: (B, H, D, Tqp) transposed; lse2, delta: (B, H, Tqp)
  float *dqt, *dk, *dv;  // dqt: per-thread (nthr, B, H, D, Tqp)
  std::atomic<int>* prepared;  // per (batch, head): qt, dot_, lse2, delta ready, its dqt zeroed
  int64_t nthr;
  int64_t B, H, Hkv, Tq, Tqp, Tk, D;
  bool causal;
  float scale;
};

struct BwdWork {
  const BwdArgs& a;
  struct State {
    std::vector<float> kt, s, dp, dk, dv;
  };
  State make_state() const {
    State st;
    st.kt.resize(a.D * BK);
    st.s.resize(BK * BQ);
    st.dp.resize(BK * BQ);
    st.dk.resize(BK * a.D);
    st.dv.resize(BK * a.D);
    return st;
  }
  // Transposed, zero-padded Q (pre-scaled by scale log2 e) and dO; lse in log2 units (+inf
  // pads), delta = rowsum(dO o O); this head's part of every thread's dQ^T buffer zeroed.
  void prepare(int64_t bh) const {
    const int64_t D = a.D, Tq = a.Tq, Tqp = a.Tqp;
    const float qscale = a.scale * kLog2e;
    float *qt = a.qt + bh * D * Tqp, *dt = a.dot_ + bh * D * Tqp;
    for (int64_t t = 0; t < Tq; ++t) {
      const float* qr = a.q + (bh * Tq + t) * D;
      const float* dr = a.dout + (bh * Tq + t) * D;
      for (int64_t d = 0; d < D; ++d) {
        qt[d * Tqp + t] = qr[d] * qscale;
        dt[d * Tqp + t] = dr[d];
      }
      a.lse2[bh * Tqp + t] = a.lse[bh * Tq + t] * kLog2e;
      a.delta[bh * Tqp + t] = dot(dr, a.out + (bh * Tq + t) * D, D);
    }
    for (int64_t d = 0; d < D; ++d) {
      std::fill(qt + d * Tqp + Tq, qt + (d + 1) * Tqp, 0.f);
      std::fill(dt + d * Tqp + Tq, dt + (d + 1) * Tqp, 0.f);
    }
    std::fill(a.lse2 + bh * Tqp + Tq, a.lse2 + (bh + 1) * Tqp, kInf);
    std::fill(a.delta + bh * Tqp + Tq, a.delta + (bh + 1) * Tqp, 0.f);
    const int64_t per = a.B * a.H * D * Tqp;
    for (int64_t th = 0; th < a.nthr; ++th) std::fill(a.dqt + th * per + bh * D * Tqp, a.dqt + th * per + (bh + 1) * D * Tqp, 0.f);
  }
  // Items: first one preparation job per (batch, head), then the key tiles.
  void operator()(int64_t item, int64_t tid, State& st) const {
    if (item < a.B * a.H) {
      prepare(item);
      a.prepared[item].store(1, std::memory_order_release);
      return;
    }
    item -= a.B * a.H;
    const int64_t nkt = cdiv(a.Tk, BK), D = a.D, G = a.H / a.Hkv;
    const int64_t kt_i = item % nkt, bhk = item / nkt;  // earliest key tiles (dearest) first
    const int64_t b = bhk / a.Hkv, hk = bhk % a.Hkv;
    const int64_t k0 = kt_i * BK, nk = std::min(BK, a.Tk - k0);
    const int64_t off = a.Tk - a.Tq;
    const float* K = a.k + (bhk * a.Tk + k0) * D;
    const float* V = a.v + (bhk * a.Tk + k0) * D;
    float* dK = a.dk + (bhk * a.Tk + k0) * D;
    float* dV = a.dv + (bhk * a.Tk + k0) * D;
    const int64_t qstart = a.causal ? std::max<int64_t>(0, k0 - off) : 0;
    if (qstart >= a.Tq) {
      std::fill(dK, dK + nk * D, 0.f);
      std::fill(dV, dV + nk * D, 0.f);
      return;
    }
    for (int64_t g = 0; g < G; ++g) wait_flag(a.prepared[b * a.H + hk * G + g]);
    float* KT = st.kt.data();
    for (int64_t d = 0; d < D; ++d)
      for (int64_t c = 0; c < nk; ++c) KT[d * BK + c] = K[c * D + d];
    float *S = st.s.data(), *dP = st.dp.data(), *dKa = st.dk.data(), *dVa = st.dv.data();
    std::fill(dKa, dKa + nk * D, 0.f);
    std::fill(dVa, dVa + nk * D, 0.f);
    const int64_t BHTD = a.B * a.H * D * a.Tqp;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t bh = b * a.H + hk * G + g;
      const float* QT = a.qt + bh * D * a.Tqp;
      const float* dOT = a.dot_ + bh * D * a.Tqp;
      const float* Qr = a.q + bh * a.Tq * D;
      const float* dOr = a.dout + bh * a.Tq * D;
      const float* lse2 = a.lse2 + bh * a.Tqp;
      const float* delta = a.delta + bh * a.Tqp;
      float* dQT = a.dqt + tid * BHTD + bh * D * a.Tqp;
      for (int64_t q0 = (qstart / BQ) * BQ; q0 < a.Tq; q0 += BQ) {
        const int64_t nq = std::min(BQ, a.Tq - q0);
        gemm(nk, BQ, D, K, D, QT + q0, a.Tqp, S, BQ, false);     // S^T (scaled by scale*log2e)
        gemm(nk, BQ, D, V, D, dOT + q0, a.Tqp, dP, BQ, false);   // dP^T
        const bool diag = a.causal && (k0 + nk - 1 > q0 + off);
        for (int64_t r = 0; r < nk; ++r) {
          bwd_row(S + r * BQ, dP + r * BQ, lse2 + q0, delta + q0, BQ);
          if (diag) {
            // key k0 + r is visible to query c iff k0 + r <= q0 + c + off
            const int64_t cfirst = std::min<int64_t>(BQ, std::max<int64_t>(0, k0 + r - off - q0));
            std::fill(S + r * BQ, S + r * BQ + cfirst, 0.f);
            std::fill(dP + r * BQ, dP + r * BQ + cfirst, 0.f);
          }
        }
        gemm(nk, D, nq, S, BQ, dOr + q0 * D, D, dVa, D, true);    // dV += P^T dO
        gemm(nk, D, nq, dP, BQ, Qr + q0 * D, D, dKa, D, true);    // dK += dS^T Q
        gemm(D, BQ, nk, KT, BK, dP, BQ, dQT + q0, a.Tqp, true);   // dQ^T += K^T dS^T
      }
    }
    for (int64_t i = 0; i < nk * D; ++i) {
      dK[i] = dKa[i] * a.scale;
      dV[i] = dVa[i];
    }
  }
};

// ------------------------------------------------------------------ decode
// Prefetch n floats from p into the caches, a cache line at a time.
inline void prefetch_rows(const float* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * 4; off += 64) __builtin_prefetch(c + off, 0, 3);
}

struct DecArgs {
  const float *q, *k, *v;
  const int64_t* lens;
  float* part;  // (B, Hkv, nsplit, G*Tq, D + 2): acc, max (log2 units), sum
  float* out;
  std::atomic<int>* done;  // per (batch, kv head): slices finished; the last one combines
  int64_t B, H, Hkv, Tq, L, D, nsplit, chunk;
  float scale;
};

struct DecWork {
  const DecArgs& a;
  struct State {
    std::vector<float> qs, s;
  };
  State make_state() const {
    State st;
    const int64_t rows = (a.H / a.Hkv) * a.Tq;
    st.qs.resize(rows * a.D);
    st.s.resize(rows * BK);
    return st;
  }
  void slice(int64_t item, State& st) const {
    const int64_t G = a.H / a.Hkv, rows = G * a.Tq, D = a.D, W = D + 2;
    const int64_t split = item % a.nsplit, bhk = item / a.nsplit;
    const int64_t b = bhk / a.Hkv, hk = bhk % a.Hkv;
    const int64_t len = a.lens[b];
    float* part = a.part + (bhk * a.nsplit + split) * rows * W;
    for (int64_t r = 0; r < rows; ++r) {
      std::fill(part + r * W, part + r * W + D, 0.f);
      part[r * W + D] = -kInf;
      part[r * W + D + 1] = 0.f;
    }
    const int64_t s0 = split * a.chunk, s1 = std::min(len, s0 + a.chunk);
    if (s0 >= s1) return;
    const float qscale = a.scale * kLog2e;
    float* qs = st.qs.data();
    for (int64_t g = 0; g < G; ++g) {
      const float* Q = a.q + ((b * a.H + hk * G + g) * a.Tq) * D;
      for (int64_t i = 0; i < a.Tq * D; ++i) qs[g * a.Tq * D + i] = Q[i] * qscale;
    }
    const float* K = a.k + bhk * a.L * D;
    const float* V = a.v + bhk * a.L * D;
    // One query row (Tq = 1, no GQA group): every position of the slice is visible.
    if (rows == 1 && decode_row_fixed(qs, K + s0 * D, V + s0 * D, s1 - s0, D, part)) return;
    float* S = st.s.data();
    prefetch_rows(K + s0 * D, std::min(BK, s1 - s0) * D);
    for (int64_t k0 = s0; k0 < s1; k0 += BK) {
      const int64_t nk = std::min(BK, s1 - k0);
      // The slice is a short stream (a few tens of kilobytes) that the hardware prefetchers
      // would barely ramp up on: ask for this tile's V rows and the next tile's K rows now,
      // to arrive while the scores are computed.
      prefetch_rows(V + k0 * D, nk * D);
      if (k0 + BK < s1) prefetch_rows(K + (k0 + BK) * D, std::min(BK, s1 - k0 - BK) * D);
      for (int64_t c = 0; c < nk; c += 16)
        for (int64_t r = 0; r < rows; ++r) dots(qs + r * D, K + (k0 + c) * D, D, std::min<int64_t>(16, nk - c), S + r * BK + c);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = r % a.Tq;
        const int64_t lim = len - a.Tq + 1 + t;  // query t sees positions j < lim
        const int64_t vis = std::min(nk, lim - k0);
        float* srow = S + r * BK;
        float* pr = part + r * W;
        if (vis <= 0) {
          std::fill(srow, srow + nk, 0.f);
          continue;
        }
        const float mnew = std::max(pr[D], row_max(srow, vis));
        const float alpha = std::exp2(pr[D] - mnew);
        const float sum = exp2_rows(srow, vis, nk, mnew);
        if (alpha != 1.f) scale_row(pr, D, alpha);
        pr[D + 1] = pr[D + 1] * alpha + sum;
        pr[D] = mnew;
      }
      gemm(rows, D, nk, S, BK, V + k0 * D, D, part, W, true);
    }
  }
  void operator()(int64_t item, int64_t tid, State& st) const {
    slice(item, st);
    const int64_t bhk = item / a.nsplit;
    // One slice per (batch, kv head), as in a decode step whose cache fits one slice: no count.
    if (a.nsplit == 1 || a.done[bhk].fetch_add(1, std::memory_order_acq_rel) == a.nsplit - 1) combine(bhk);
  }
  // out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the slices of one (batch, kv head).
  void combine(int64_t bhk) const {
    const int64_t G = a.H / a.Hkv, rows = G * a.Tq, D = a.D, W = D + 2;
    const int64_t b = bhk / a.Hkv, hk = bhk % a.Hkv;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t g = r / a.Tq, t = r % a.Tq;
      float* o = a.out + ((b * a.H + hk * G + g) * a.Tq + t) * D;
      float M = -kInf;
      for (int64_t s = 0; s < a.nsplit; ++s) M = std::max(M, a.part[((bhk * a.nsplit + s) * rows + r) * W + D]);
      std::fill(o, o + D, 0.f);
      if (M == -kInf) continue;  // no visible position: zeros, as the reference
      float lsum = 0.f;
      for (int64_t s = 0; s < a.nsplit; ++s) {
        const float* pr = a.part + ((bhk * a.nsplit + s) * rows + r) * W;
        if (pr[D] == -kInf) continue;
        const float w = std::exp2(pr[D] - M);
        lsum += w * pr[D + 1];
        for (int64_t d = 0; d < D; ++d) o[d] += w * pr[d];
      }
      scale_row(o, D, 1.f / lsum);
    }
  }
};

// ------------------------------------------------------------------ torch glue
void check_attn_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  FASTLM_CHECK_CPU(q);
  FASTLM_CHECK_CPU(k);
  FASTLM_CHECK_CPU(v);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-d (B, H, T, D)");
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have one shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, ": q and k must agree on B and D");
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op, ": H must be a multiple of Hkv");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 256, op, ": head size must be in [1, 256]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must have one dtype");
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
              ": the CPU kernel takes float32, bfloat16 or float16, got ", t);
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                 bool causal, double scale) {
  check_attn_inputs(q_, k_, v_, "attention_fwd");
  const at::Tensor q = f32(q_), k = f32(k_), v = f32(v_);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1), Tk = k.size(2);
  at::Tensor out = empty_output({B, H, Tq, D}, at::kFloat);
  at::Tensor lse = empty_output({B, H, Tq}, at::kFloat);
  if (B * H * Tq == 0) return {out.to(q_.scalar_type()), lse};
  TORCH_CHECK(Tk >= 1, "attention_fwd: k must have at least one key");
  at::Tensor kt = empty_output({B * Hkv * cdiv(Tk, BK) * D * BK}, at::kFloat);
  std::vector<std::atomic<int>> packed(B * Hkv);
  for (auto& f : packed) f.store(0);
  FwdArgs a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), kt.data_ptr<float>(), packed.data(),
            out.data_ptr<float>(), lse.data_ptr<float>(), B, H, Hkv, Tq, Tk, D, causal, (float)scale};
  FwdWork w{a};
  run_dynamic(B * Hkv + B * H * cdiv(Tq, BQ), w, threads_for(2.0 * B * H * Tq * Tk * D));
  return {q_.scalar_type() == at::kFloat ? out : out.to(q_.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout_, const at::Tensor& q_,
                                                             const at::Tensor& k_, const at::Tensor& v_,
                                                             const at::Tensor& out_, const at::Tensor& lse_,
                                                             bool causal, double scale) {
  check_attn_inputs(q_, k_, v_, "attention_bwd");
  TORCH_CHECK(dout_.sizes() == q_.sizes() && out_.sizes() == q_.sizes(),
              "attention_bwd: grad_out and out must have the shape of q");
  const at::Tensor q = f32(q_), k = f32(k_), v = f32(v_), dout = f32(dout_), out = f32(out_), lse = f32(lse_);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1), Tk = k.size(2);
  TORCH_CHECK(lse.numel() == B * H * Tq, "attention_bwd: lse must have shape (B, H, Tq)");
  const int64_t Tqp = cdiv(Tq, BQ) * BQ;
  at::Tensor qt = empty_output({B * H, D, Tqp}, at::kFloat);
  at::Tensor dot_t = empty_output({B * H, D, Tqp}, at::kFloat);
  at::Tensor lse2 = empty_output({B * H, Tqp}, at::kFloat);
  at::Tensor delta = empty_output({B * H, Tqp}, at::kFloat);
  const int64_t nkt = cdiv(Tk, BK), nitems = B * Hkv * nkt;
  const int64_t nthr = std::max<int64_t>(1, std::min<int64_t>(threads_for(5.0 * B * H * Tq * Tk * D), nitems));
  at::Tensor dqt = empty_output({nthr, B * H, D, Tqp}, at::kFloat);
  at::Tensor dk = empty_output(k.sizes(), at::kFloat), dv = empty_output(v.sizes(), at::kFloat);
  std::vector<std::atomic<int>> prepared(B * H);
  for (auto& f : prepared) f.store(0);
  BwdArgs a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), dout.data_ptr<float>(),
            out.data_ptr<float>(), lse.data_ptr<float>(),
            qt.data_ptr<float>(), dot_t.data_ptr<float>(), lse2.data_ptr<float>(), delta.data_ptr<float>(),
            dqt.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(), prepared.data(), nthr,
            B, H, Hkv, Tq, Tqp, Tk, D, causal, (float)scale};
  BwdWork w{a};
  run_dynamic(B * H + nitems, w, nthr);
  at::Tensor dq = empty_output(q.sizes(), at::kFloat);
  {
    const float* src = dqt.data_ptr<float>();
    float* dst = dq.data_ptr<float>();
    const int64_t per = B * H * D * Tqp;
    const float sc = (float)scale;
    at::parallel_for(0, B * H, nthr > 1 ? 1 : B * H, [&](int64_t b0, int64_t b1) {
      for (int64_t bh = b0; bh < b1; ++bh)
        for (int64_t d = 0; d < D; ++d)
          for (int64_t t = 0; t < Tq; ++t) {
            float s = 0.f;
            for (int64_t th = 0; th < nthr; ++th) s += src[th * per + (bh * D + d) * Tqp + t];
            dst[(bh * Tq + t) * D + d] = s * sc;
          }
    });
  }
  const auto st = q_.scalar_type();
  if (st == at::kFloat) return {dq, dk, dv};
  return {dq.to(st), dk.to(st), dv.to(st)};
}

at::Tensor decode_attention(const at::Tensor& q_, const at::Tensor& kc_, const at::Tensor& vc_,
                            const at::Tensor& lens_, double scale) {
  check_attn_inputs(q_, kc_, vc_, "decode_attention");
  FASTLM_CHECK_CPU(lens_);
  const int64_t B = q_.size(0), H = q_.size(1), Tq = q_.size(2), D = q_.size(3), Hkv = kc_.size(1), L = kc_.size(2);
  TORCH_CHECK(lens_.dim() == 1 && lens_.size(0) == B, "decode_attention: cache_lens must have shape (B,)");
  TORCH_CHECK(lens_.scalar_type() == at::kInt || lens_.scalar_type() == at::kLong,
              "decode_attention: cache_lens must be int32 or int64");
  const at::Tensor lens = lens_.to(at::kLong).contiguous();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(lp[b] >= 0 && lp[b] <= L, "decode_attention: cache_lens[", b, "] = ", lp[b],
                " is outside [0, L_max = ", L, "]");
  const at::Tensor q = f32(q_), kc = f32(kc_), vc = f32(vc_);
  at::Tensor out = empty_output({B, H, Tq, D}, at::kFloat);
  if (B * H * Tq == 0) return out.to(q_.scalar_type());
  const int64_t G = H / Hkv, rows = G * Tq, W = D + 2;
  // Enough slices to keep every thread busy, each at least 256 positions.
  int64_t visible = 0;
  for (int64_t b = 0; b < B; ++b) visible += lp[b];
  // bytes of K and V read: from 1 MB (tens of microseconds for one core) on, two threads pay
  const int64_t nthr = threads_for(double(visible) * Hkv * D * 8 * 4);
  int64_t nsplit = std::max<int64_t>(1, std::min<int64_t>(cdiv(L, 256), cdiv(4 * nthr, B * Hkv)));
  const int64_t chunk = cdiv(cdiv(L, nsplit), BK) * BK;
  nsplit = std::max<int64_t>(1, cdiv(L, chunk));
  at::Tensor part = empty_output({B * Hkv * nsplit * rows * W}, at::kFloat);
  std::vector<std::atomic<int>> done(B * Hkv);
  for (auto& f : done) f.store(0);
  DecArgs a{q.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(), lp, part.data_ptr<float>(),
            out.data_ptr<float>(), done.data(), B, H, Hkv, Tq, L, D, nsplit, chunk, (float)scale};
  DecWork w{a};
  run_dynamic(B * Hkv * nsplit, w, nthr);
  return q_.scalar_type() == at::kFloat ? out : out.to(q_.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("decode_attention", &decode_attention);
}

}  // namespace fastlm
