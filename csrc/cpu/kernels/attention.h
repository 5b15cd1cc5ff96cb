// Fused causal / full attention: flash-style forward and backward, and decode over a ragged
// KV cache. float32 throughout (the glue converts bf16/fp16 on entry and exit), except that
// decode reads a KV cache stored as bf16 / fp16 directly, converting rows as it loads them.
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
// the slices are combined by their logsumexps. One query row per (batch, head) with D a
// multiple of W up to 128 keeps W keys' scores in a register through the online softmax
// and into P V (decode_row).
// Every product goes through gemm.h's register-blocked micro-kernel.
// Layouts: forward and backward read and write their (B, H, T, D) operands wherever their rows
// lie (Rows4: heads split from one fused projection arrive in (B, T, H, D) order, and the glue
// returns outputs in that order so that merging heads is a view); rows that lie apart are
// gathered side by side once per head or tile before a product walks them.
#pragma once

namespace attention {

constexpr int64_t BQ = kAttnBQ;
constexpr int64_t BK = kAttnBK;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------ rows and tiles
// max of x[0:n]
inline float row_max(const float* x, int64_t n) {
  using namespace simd;
  vf m = set1(-kInf);
  int64_t j = 0;
  for (; j + W <= n; j += W) m = max(m, load(x + j));
  if (j < n) m = max(m, first_n(n - j, load(x + j, n - j), set1(-kInf)));
  return reduce_max(m);
}

// x[0:n] = 2^(x - m), x[n:ntot] = 0; returns the sum. ntot is a multiple of W.
inline float exp2_rows(float* x, int64_t n, int64_t ntot, float m) {
  using namespace simd;
  const vf mv = set1(m);
  vf s = zero();
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const vf p = exp2(sub(load(x + j), mv));
    s = add(s, p);
    store(x + j, p);
  }
  if (j < n) {  // lanes past n become 0 (x has room up to ntot)
    const vf p = first_n(n - j, exp2(sub(load(x + j, n - j), mv)), zero());
    s = add(s, p);
    store(x + j, p);
    j += W;
  }
  for (; j < ntot; j += W) store(x + j, zero());
  return reduce_add(s);
}

// dst = a src over n floats, a vector at a time (stored at the width the kernels load them:
// a vector load of values stored by narrower stores waits for the stores to retire).
inline void scale_into(float* dst, const float* src, int64_t n, float a) {
  using namespace simd;
  const vf av = set1(a);
  int64_t j = 0;
  for (; j + W <= n; j += W) store(dst + j, mul(load(src + j), av));
  if (j < n) store(dst + j, mul(load(src + j, n - j), av), n - j);
}

inline void scale_row(float* x, int64_t n, float a) { scale_into(x, x, n, a); }

inline float dot(const float* a, const float* b, int64_t n) {
  using namespace simd;
  vf s = zero();
  int64_t j = 0;
  for (; j + W <= n; j += W) s = fma(load(a + j), load(b + j), s);
  if (j < n) s = fma(load(a + j, n - j), load(b + j, n - j), s);
  return reduce_add(s);
}

// s[c] = q . K[c] for the m <= W keys K[0..m) (rows of D values of T: float, bf16 or f16,
// converted to float32 as they load): one accumulator per key, then transpose_sum.
template <typename T>
inline void dots(const float* q, const T* K, int64_t D, int64_t m, float* s) {
  using namespace simd;
  vf acc[W];
  const int64_t Dv = D / W * W;
#pragma GCC unroll 32
  for (int c = 0; c < W; ++c) {  // key by key: K is read in address order
    const T* row = K + std::min<int64_t>(c, m - 1) * D;  // past m: repeat a valid row
    acc[c] = zero();
    for (int64_t j = 0; j < Dv; j += W) acc[c] = fma(load(q + j), load(row + j), acc[c]);
    if (Dv < D) acc[c] = fma(load(q + Dv, D - Dv), load(row + Dv, D - Dv), acc[c]);
  }
  store(s, transpose_sum(acc), m);
}

// Diagonal tiles of causal attention, where row i sees only columns c < i + 1 + delta:
// S[M x BK] = A B over the columns some row of each row block sees (the rest is left
// unwritten), and C[M x N] += P V over the keys some row of each row block sees (P is 0 past
// them).
inline void gemm_diag_scores(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, float* C,
                             int64_t delta) {
  for (int64_t m = 0; m < M; m += kGemmMR) {
    const int64_t R = std::min<int64_t>(kGemmMR, M - m);
    const int64_t ncols = std::min<int64_t>(BK, m + R + delta);
    if (ncols > 0) gemm(R, ncols, K, A + m * lda, lda, B, BK, C + m * BK, BK, false);
  }
}

inline void gemm_diag_pv(int64_t M, int64_t N, int64_t nk, const float* P, const float* V, int64_t ldv, float* C,
                         int64_t ldc, int64_t delta) {
  for (int64_t m = 0; m < M; m += kGemmMR) {
    const int64_t R = std::min<int64_t>(kGemmMR, M - m);
    const int64_t K = std::min<int64_t>(nk, m + R + delta);
    if (K > 0) gemm(R, N, K, P + m * BK, BK, V, ldv, C + m * ldc, ldc, true);
  }
}

// One query row against n >= 1 keys, all visible, for D = W NV: the decode step of plain
// multi-head attention. q is pre-scaled (scale * log2 e). W keys at a time, their scores
// stay in one register through the online softmax and into P V; out gets the unnormalised
// sum (D floats), then the running max (log2 units) and the sum of weights, the layout of a
// decode slice's partial result. K and V are rows of T (float, bf16 or f16), each vector
// converted to float32 in a register as it loads.
template <int NV, typename T>
void decode_row(const float* q, const T* K, const T* V, int64_t n, float* out) {
  using namespace simd;
  constexpr int64_t D = int64_t(W) * NV;
  vf qv[NV], o[NV];
#pragma GCC unroll 32
  for (int v = 0; v < NV; ++v) {
    qv[v] = load(q + W * v);
    o[v] = zero();
  }
  float m = -kInf, l = 0.f;
  alignas(64) float p[W];
  for (int64_t c0 = 0; c0 < n; c0 += W) {
    const int64_t nc = std::min<int64_t>(W, n - c0);
    const T* Kc = K + c0 * D;
    vf acc[W];
#pragma GCC unroll 32
    for (int c = 0; c < W; ++c) {
      const T* row = Kc + std::min<int64_t>(c, nc - 1) * D;  // past nc: repeat a valid row
      acc[c] = mul(qv[0], load(row));
#pragma GCC unroll 32
      for (int v = 1; v < NV; ++v) acc[c] = fma(qv[v], load(row + W * v), acc[c]);
    }
    const vf s = first_n(nc, transpose_sum(acc), set1(-kInf));
    const float mnew = std::max(m, reduce_max(s));
    if (mnew > m) {
      const float alpha = std::exp2(m - mnew);  // 0 on the first block
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) o[v] = mul(o[v], set1(alpha));
      l *= alpha;
      m = mnew;
    }
    const vf pv = first_n(nc, exp2(sub(s, set1(m))), zero());
    l += reduce_add(pv);
    store(p, pv);
    const T* Vc = V + c0 * D;
    for (int64_t c = 0; c < nc; ++c) {
      const vf pc = set1(p[c]);
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) o[v] = fma(pc, load(Vc + c * D + W * v), o[v]);
    }
  }
#pragma GCC unroll 32
  for (int v = 0; v < NV; ++v) store(out + W * v, o[v]);
  out[D] = m;
  out[D + 1] = l;
}

// decode_row for the D it was compiled for; false when D is not a multiple of W in
// [16, 128] (those take the tile path).
template <typename T>
inline bool decode_row_fixed(const float* q, const T* K, const T* V, int64_t n, int64_t D, float* out) {
  using simd::W;
  if (D < 16 || D > 128 || D % W != 0 || D % 16 != 0) return false;
  switch (D / 16) {
    case 1: decode_row<16 / W, T>(q, K, V, n, out); return true;
    case 2: decode_row<32 / W, T>(q, K, V, n, out); return true;
    case 3: decode_row<48 / W, T>(q, K, V, n, out); return true;
    case 4: decode_row<64 / W, T>(q, K, V, n, out); return true;
    case 5: decode_row<80 / W, T>(q, K, V, n, out); return true;
    case 6: decode_row<96 / W, T>(q, K, V, n, out); return true;
    case 7: decode_row<112 / W, T>(q, K, V, n, out); return true;
    case 8: decode_row<128 / W, T>(q, K, V, n, out); return true;
    default: return false;
  }
}

// backward: P^T row r: p[c] = 2^(s[c] - lse2[c]); ds[c] = p[c] (dp[c] - delta[c]), c < ncols
// (a multiple of W)
inline void bwd_row(float* s, float* dp, const float* lse2, const float* delta, int64_t ncols) {
  using namespace simd;
  for (int64_t c = 0; c < ncols; c += W) {
    const vf p = exp2(sub(load(s + c), load(lse2 + c)));
    store(s + c, p);
    store(dp + c, mul(p, sub(load(dp + c), load(delta + c))));
  }
}

// ------------------------------------------------------------------ scheduling
// Runs work(item, thread, state) for item in [0, n) on up to max_threads threads, handing the
// items out one at a time in order (so list the costliest first).
template <typename F>
void run_dynamic(int64_t n, const F& work, int64_t max_threads) {
  int64_t nthr = std::max<int64_t>(1, std::min<int64_t>(num_threads(), n));
  if (max_threads > 0) nthr = std::min(nthr, max_threads);
  if (nthr == 1) {  // a parallel region would still wake every thread of the pool
    auto state = work.make_state();
    for (int64_t i = 0; i < n; ++i) work(i, 0, state);
    return;
  }
  std::atomic<int64_t> next{0};
  parallel_for(0, nthr, 1, [&](int64_t tb, int64_t te) {
    for (int64_t tid = tb; tid < te; ++tid) {
      auto state = work.make_state();
      for (int64_t i; (i = next.fetch_add(1)) < n;) work(i, tid, state);
    }
  });
}

// Spin until a flag set by another worker of the same parallel region is raised.
inline void wait_flag(const std::atomic<int>& f) {
  while (f.load(std::memory_order_acquire) == 0) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }
}

// K^T panels of one (batch, kv head) whose rows are ks floats apart:
// kt[t * D * BK + d * BK + c] = K[t * BK + c, d] (zero past Tk).
inline void pack_kt_head(const float* k, int64_t ks, float* kt, int64_t Tk, int64_t D) {
  const int64_t nkt = cdiv(Tk, BK);
  for (int64_t t = 0; t < nkt; ++t) {
    float* dst = kt + t * D * BK;
    const int64_t n = std::min(BK, Tk - t * BK);
    const float* src = k + t * BK * ks;
    if (n < BK)
      for (int64_t d = 0; d < D; ++d) std::fill(dst + d * BK + n, dst + (d + 1) * BK, 0.f);
    simd::transpose(src, ks, n, D, dst, BK);
  }
}

// ------------------------------------------------------------------ forward
// Rows of n x D floats, src rows ss floats apart, to adjacent rows.
inline void gather_rows(const float* src, int64_t ss, int64_t n, int64_t D, float* dst) {
  for (int64_t r = 0; r < n; ++r) simd::to_f32(src + r * ss, D, dst + r * D);
}

struct FwdWork {
  const AttnFwdArgs& a;
  std::atomic<int>* packed;  // per (batch, kv head): its K^T panels (and V rows) are ready
  // One query tile per head and no head sharing its keys (G = 1): each item packs its own
  // head's keys and runs its one tile at once, on the same thread, with the panels still in
  // its L1 / L2 (no item waits on another thread's packing).
  bool own_pack;
  struct State {
    std::vector<float> qs, s, m, l, o;
  };
  State make_state() const {
    State st;
    st.qs.resize(BQ * a.D);
    st.o.resize(BQ * a.D);
    st.s.resize(BQ * BK);
    st.m.resize(BQ);
    st.l.resize(BQ);
    return st;
  }
  void pack(int64_t bhk) const {
    const int64_t b = bhk / a.Hkv, hk = bhk % a.Hkv;
    pack_kt_head(a.k + a.lk.at(b, hk, 0), a.lk.st, a.kt + bhk * cdiv(a.Tk, BK) * a.D * BK, a.Tk, a.D);
    if (a.vc) gather_rows(a.v + a.lv.at(b, hk, 0), a.lv.st, a.Tk, a.D, a.vc + bhk * a.Tk * a.D);
    packed[bhk].store(1, std::memory_order_release);
  }
  // Items: first one packing job per (batch, kv head) (K^T panels; V's rows side by side when
  // they lie apart, as in a fused projection: a product walking rows 1.5 KB apart keeps
  // missing the L1), then the query tiles, the latest (dearest under causal masking) first.
  // Handed out in order, so a tile waits at most for a packing job already running. With
  // own_pack, one item a head: its packing, then its tile.
  void operator()(int64_t item, int64_t, State& st) const {
    const int64_t BHkv = a.B * a.Hkv;
    if (own_pack) {
      pack(item);  // (batch, head) = (batch, kv head) here
    } else {
      if (item < BHkv) {
        pack(item);
        return;
      }
      item -= BHkv;
    }
    const int64_t BH = a.B * a.H, nqt = cdiv(a.Tq, BQ), D = a.D;
    const int64_t qt = nqt - 1 - item / BH, bh = item % BH;
    const int64_t b = bh / a.H, h = bh % a.H, hk = h / (a.H / a.Hkv);
    const int64_t q0 = qt * BQ, nq = std::min(BQ, a.Tq - q0);
    const int64_t off = a.Tk - a.Tq;  // query i sees keys j <= i + off under causal masking
    const int64_t kend = a.causal ? std::min(a.Tk, q0 + nq + off) : a.Tk;  // keys any row sees
    float* Oout = a.out + a.lo.at(b, h, q0);  // rows a.lo.st apart
    float* lse = a.lse + bh * a.Tq + q0;
    if (kend <= 0) {
      for (int64_t i = 0; i < nq; ++i) std::fill(Oout + i * a.lo.st, Oout + i * a.lo.st + D, 0.f);
      std::fill(lse, lse + nq, kInf);
      return;
    }
    float* O = st.o.data();  // the tile's output rows, side by side until the end
    const int64_t os = D;
    std::fill(O, O + nq * D, 0.f);
    wait_flag(packed[b * a.Hkv + hk]);
    const float* Q = a.q + a.lq.at(b, h, q0);
    const float qscale = a.scale * kLog2e;
    float* qs = st.qs.data();
    for (int64_t i = 0; i < nq; ++i) scale_into(qs + i * D, Q + i * a.lq.st, D, qscale);
    float* S = st.s.data();
    float* m = st.m.data();
    float* l = st.l.data();
    std::fill(m, m + nq, -kInf);
    std::fill(l, l + nq, 0.f);
    const int64_t nkt_all = cdiv(a.Tk, BK);
    const float* KT = a.kt + (b * a.Hkv + hk) * nkt_all * D * BK;
    const float* V = a.vc ? a.vc + (b * a.Hkv + hk) * a.Tk * D : a.v + a.lv.at(b, hk, 0);
    const int64_t vs = a.vc ? D : a.lv.st;
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
        const float mnew = std::max(m[i], row_max(srow, vis));
        const float alpha = std::exp2(m[i] - mnew);  // 0 when m[i] = -inf
        const float sum = exp2_rows(srow, vis, BK, mnew);
        if (alpha != 1.f) scale_row(O + i * os, D, alpha);
        l[i] = l[i] * alpha + sum;
        m[i] = mnew;
      }
      if (diag) gemm_diag_pv(nq, D, nk, S, V + k0 * vs, vs, O, os, delta);
      else gemm(nq, D, nk, S, BK, V + k0 * vs, vs, O, os, true);
    }
    for (int64_t i = 0; i < nq; ++i) {
      if (l[i] > 0.f) {
        scale_row(O + i * os, D, 1.f / l[i]);
        lse[i] = (m[i] + std::log2(l[i])) * kLn2;
      } else {
        std::fill(O + i * os, O + i * os + D, 0.f);
        lse[i] = kInf;  // no visible key: P = exp(s - inf) = 0 in the backward pass
      }
    }
    for (int64_t i = 0; i < nq; ++i) simd::to_f32(O + i * D, D, Oout + i * a.lo.st);
  }
};

void forward(const AttnFwdArgs& a) {
  std::vector<std::atomic<int>> packed(a.B * a.Hkv);
  for (auto& f : packed) f.store(0);
  const bool own_pack = a.Tq <= BQ && a.H == a.Hkv;
  FwdWork w{a, packed.data(), own_pack};
  run_dynamic(own_pack ? a.B * a.H : a.B * a.Hkv + a.B * a.H * cdiv(a.Tq, BQ), w,
              threads_for(2.0 * a.B * a.H * a.Tq * a.Tk * a.D));
}

// ------------------------------------------------------------------ backward
// The column granularity of the backward's diagonal (causal) tiles: products start at a visible
// column rounded down to it, and dQ^T goes by blocks of it. At most 32 columns, so that a level
// whose widest micro-kernel block is wider (avx512: 64) does not compute the masked half of the
// triangle.
constexpr int64_t kDiagCols = kGemmCols < 32 ? kGemmCols : 32;

struct BwdWork {
  const AttnBwdArgs& a;
  std::atomic<int>* prepared;  // per (batch, head): qt, dot, lse2, delta ready, its dqt zeroed
  struct State {
    std::vector<float> kt, s, dp, dk, dv, kc, vc, dq;
  };
  State make_state() const {
    State st;
    if (!a.dqt) st.dq.resize(a.D * BQ);
    st.kt.resize(a.D * BK);
    st.kc.resize(BK * a.D);
    st.vc.resize(BK * a.D);
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
    const int64_t b = bh / a.H, h = bh % a.H;
    float *qt = a.qt + bh * D * Tqp, *dt = a.dot + bh * D * Tqp;
    simd::transpose(a.q + a.lq.at(b, h, 0), a.lq.st, Tq, D, qt, Tqp, qscale);
    simd::transpose(a.dout + a.ldo.at(b, h, 0), a.ldo.st, Tq, D, dt, Tqp);
    for (int64_t t = 0; t < Tq; ++t) {
      a.lse2[bh * Tqp + t] = a.lse[bh * Tq + t] * kLog2e;
      a.delta[bh * Tqp + t] = dot(a.dout + a.ldo.at(b, h, t), a.out + a.lo.at(b, h, t), D);
    }
    // rows that lie apart, side by side for the products that walk them (see FwdWork)
    if (a.qc) gather_rows(a.q + a.lq.at(b, h, 0), a.lq.st, Tq, D, a.qc + bh * Tq * D);
    if (a.doc) gather_rows(a.dout + a.ldo.at(b, h, 0), a.ldo.st, Tq, D, a.doc + bh * Tq * D);
    for (int64_t d = 0; d < D; ++d) {
      std::fill(qt + d * Tqp + Tq, qt + (d + 1) * Tqp, 0.f);
      std::fill(dt + d * Tqp + Tq, dt + (d + 1) * Tqp, 0.f);
    }
    std::fill(a.lse2 + bh * Tqp + Tq, a.lse2 + (bh + 1) * Tqp, kInf);
    std::fill(a.delta + bh * Tqp + Tq, a.delta + (bh + 1) * Tqp, 0.f);
    if (!a.dqt) return;  // dQ goes straight to dq (see AttnBwdArgs)
    const int64_t per = a.B * a.H * D * Tqp;
    for (int64_t th = 0; th < a.nthr; ++th)
      std::fill(a.dqt + th * per + bh * D * Tqp, a.dqt + th * per + (bh + 1) * D * Tqp, 0.f);
  }
  // Items: first one preparation job per (batch, head), then the key tiles.
  void operator()(int64_t item, int64_t tid, State& st) const {
    if (item < a.B * a.H) {
      prepare(item);
      prepared[item].store(1, std::memory_order_release);
      return;
    }
    item -= a.B * a.H;
    const int64_t nkt = cdiv(a.Tk, BK), D = a.D, G = a.H / a.Hkv;
    const int64_t kt_i = item % nkt, bhk = item / nkt;  // earliest key tiles (dearest) first
    const int64_t b = bhk / a.Hkv, hk = bhk % a.Hkv;
    const int64_t k0 = kt_i * BK, nk = std::min(BK, a.Tk - k0);
    const int64_t off = a.Tk - a.Tq;
    int64_t ks = a.lk.st, vs = a.lv.st;  // row strides
    const int64_t dks = a.ldk.st, dvs = a.ldv.st;
    const float* K = a.k + a.lk.at(b, hk, k0);
    const float* V = a.v + a.lv.at(b, hk, k0);
    float* dK = a.dk + a.ldk.at(b, hk, k0);
    float* dV = a.dv + a.ldv.at(b, hk, k0);
    const int64_t qstart = a.causal ? std::max<int64_t>(0, k0 - off) : 0;
    if (qstart >= a.Tq) {
      for (int64_t c = 0; c < nk; ++c) {
        std::fill(dK + c * dks, dK + c * dks + D, 0.f);
        std::fill(dV + c * dvs, dV + c * dvs + D, 0.f);
      }
      for (int64_t g = 0; !a.dqt && g < G; ++g)  // no query sees the only key tile
        for (int64_t t = 0; t < a.Tq; ++t) std::fill_n(a.dq + a.ldq.at(b, hk * G + g, t), D, 0.f);
      return;
    }
    for (int64_t g = 0; g < G; ++g) wait_flag(prepared[b * a.H + hk * G + g]);
    if (ks != D) {
      gather_rows(K, ks, nk, D, st.kc.data());
      K = st.kc.data();
      ks = D;
    }
    if (vs != D) {
      gather_rows(V, vs, nk, D, st.vc.data());
      V = st.vc.data();
      vs = D;
    }
    float* KT = st.kt.data();
    simd::transpose(K, ks, nk, D, KT, BK);
    float *S = st.s.data(), *dP = st.dp.data(), *dKa = st.dk.data(), *dVa = st.dv.data();
    std::fill(dKa, dKa + nk * D, 0.f);
    std::fill(dVa, dVa + nk * D, 0.f);
    const int64_t BHTD = a.B * a.H * D * a.Tqp;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t bh = b * a.H + hk * G + g;
      const float* QT = a.qt + bh * D * a.Tqp;
      const float* dOT = a.dot + bh * D * a.Tqp;
      const float* Qr = a.qc ? a.qc + bh * a.Tq * D : a.q + a.lq.at(b, hk * G + g, 0);
      const float* dOr = a.doc ? a.doc + bh * a.Tq * D : a.dout + a.ldo.at(b, hk * G + g, 0);
      const int64_t qs = a.qc ? D : a.lq.st, dos = a.doc ? D : a.ldo.st;
      const float* lse2 = a.lse2 + bh * a.Tqp;
      const float* delta = a.delta + bh * a.Tqp;
      // dQ^T: this thread's buffer, or (one query tile, one key tile) the tile's own, written to dq below
      float* dQT = a.dqt ? a.dqt + tid * BHTD + bh * D * a.Tqp : st.dq.data();
      const int64_t ldq = a.dqt ? a.Tqp : BQ;
      if (!a.dqt) std::fill(dQT, dQT + D * BQ, 0.f);
      for (int64_t q0 = (qstart / BQ) * BQ; q0 < a.Tq; q0 += BQ) {
        const int64_t nq = std::min(BQ, a.Tq - q0);
        float* dQTq = a.dqt ? dQT + q0 : dQT;
        const bool diag = a.causal && (k0 + nk - 1 > q0 + off);
        if (!diag) {
          gemm(nk, BQ, D, K, ks, QT + q0, a.Tqp, S, BQ, false);    // S^T (scaled by scale*log2e)
          gemm(nk, BQ, D, V, vs, dOT + q0, a.Tqp, dP, BQ, false);  // dP^T
          for (int64_t r = 0; r < nk; ++r) bwd_row(S + r * BQ, dP + r * BQ, lse2 + q0, delta + q0, BQ);
          gemm(nk, D, nq, S, BQ, dOr + q0 * dos, dos, dVa, D, true);  // dV += P^T dO
          gemm(nk, D, nq, dP, BQ, Qr + q0 * qs, qs, dKa, D, true);     // dK += dS^T Q
          gemm(D, BQ, nk, KT, BK, dP, BQ, dQTq, ldq, true);           // dQ^T += K^T dS^T
          continue;
        }
        // The diagonal tile: key k0 + r is visible to query q0 + c iff c >= r + shift. Each
        // product covers only what some row (or column) block sees, from the block's first
        // visible column rounded down to kDiagCols; the rest is zero.
        const int64_t shift = k0 - off - q0;
        auto first = [&](int64_t r) { return std::min<int64_t>(BQ, std::max<int64_t>(0, r + shift)); };
        auto aligned = [](int64_t c) { return c / kDiagCols * kDiagCols; };
        for (int64_t m = 0; m < nk; m += kGemmMR) {
          const int64_t R = std::min<int64_t>(kGemmMR, nk - m), ca = aligned(first(m));
          if (ca >= BQ) continue;
          gemm(R, BQ - ca, D, K + m * ks, ks, QT + q0 + ca, a.Tqp, S + m * BQ + ca, BQ, false);
          gemm(R, BQ - ca, D, V + m * vs, vs, dOT + q0 + ca, a.Tqp, dP + m * BQ + ca, BQ, false);
        }
        for (int64_t r = 0; r < nk; ++r) {
          const int64_t cf = first(r), ca = aligned(cf);
          if (ca < BQ) bwd_row(S + r * BQ + ca, dP + r * BQ + ca, lse2 + q0 + ca, delta + q0 + ca, BQ - ca);
          std::fill(S + r * BQ, S + r * BQ + cf, 0.f);
          std::fill(dP + r * BQ, dP + r * BQ + cf, 0.f);
        }
        for (int64_t m = 0; m < nk; m += kGemmMR) {
          const int64_t R = std::min<int64_t>(kGemmMR, nk - m), ca = aligned(first(m));
          if (ca >= nq) continue;
          gemm(R, D, nq - ca, S + m * BQ + ca, BQ, dOr + (q0 + ca) * dos, dos, dVa + m * D, D, true);
          gemm(R, D, nq - ca, dP + m * BQ + ca, BQ, Qr + (q0 + ca) * qs, qs, dKa + m * D, D, true);
        }
        for (int64_t c0 = 0; c0 < BQ; c0 += kDiagCols) {  // keys r <= c0 + kDiagCols - 1 - shift
          const int64_t kc = std::min<int64_t>(nk, std::max<int64_t>(0, c0 + kDiagCols - shift));
          if (kc > 0) gemm(D, std::min<int64_t>(kDiagCols, BQ - c0), kc, KT, BK, dP + c0, BQ, dQTq + c0, ldq, true);
        }
      }
      if (!a.dqt)  // dq = scale dQ^T, transposed
        simd::transpose(dQT, BQ, D, a.Tq, a.dq + a.ldq.at(b, hk * G + g, 0), a.ldq.st, a.scale);
    }
    for (int64_t c = 0; c < nk; ++c)
      for (int64_t d = 0; d < D; ++d) {
        dK[c * dks + d] = dKa[c * D + d] * a.scale;
        dV[c * dvs + d] = dVa[c * D + d];
      }
  }
};

void backward(const AttnBwdArgs& a) {
  std::vector<std::atomic<int>> prepared(a.B * a.H);
  for (auto& f : prepared) f.store(0);
  BwdWork w{a, prepared.data()};
  run_dynamic(a.B * a.H + a.B * a.Hkv * cdiv(a.Tk, BK), w, a.nthr);
  if (!a.dqt) return;  // written by the tiles
  // dq = scale * (sum over threads of dQ^T), transposed back: the threads' buffers summed into
  // the first (rows of Tqp contiguous), then that transposed
  float* sum = a.dqt;
  const int64_t per = a.B * a.H * a.D * a.Tqp, D = a.D, Tq = a.Tq, Tqp = a.Tqp, nthr = a.nthr;
  parallel_for(0, a.B * a.H, nthr > 1 ? 1 : a.B * a.H, [&](int64_t b0, int64_t b1) {
    using namespace simd;
    for (int64_t bh = b0; bh < b1; ++bh) {
      float* acc = sum + bh * D * Tqp;
      for (int64_t th = 1; th < nthr; ++th) {
        const float* part = a.dqt + th * per + bh * D * Tqp;
        int64_t j = 0;
        for (; j + W <= D * Tqp; j += W) store(acc + j, add(load(acc + j), load(part + j)));
        for (; j < D * Tqp; ++j) acc[j] += part[j];
      }
      transpose(acc, Tqp, D, Tq, a.dq + a.ldq.at(bh / a.H, bh % a.H, 0), a.ldq.st, a.scale);
    }
  });
}

// ------------------------------------------------------------------ decode
// Prefetch n values of T from p into the caches, a cache line at a time.
template <typename T>
inline void prefetch_rows(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * int64_t(sizeof(T)); off += 64) __builtin_prefetch(c + off, 0, 3);
}

// The cache is read as T: float, bf16 or f16 (AttnDecodeArgs::kv_dtype). Scores load K's rows
// straight from T into registers (dots, decode_row); the P V product goes through gemm,
// whose B operand is float32: a bf16 / fp16 tile's V rows (at most BK x D values) are first
// converted into a small float32 scratch, once per tile (16 KB at D = 64), still in the
// nearest caches for the product. Simpler than a typed micro-kernel, and the conversion is a
// small part of the tile's work next to the G Tq rows it serves.
template <typename T>
struct DecWork {
  const AttnDecodeArgs& a;
  std::atomic<int>* done;  // per (batch, kv head): slices finished; the last one combines
  struct State {
    std::vector<float> qs, s, v;
  };
  State make_state() const {
    State st;
    const int64_t rows = (a.H / a.Hkv) * a.Tq;
    st.qs.resize(rows * a.D);
    st.s.resize(rows * BK);
    if (!std::is_same<T, float>::value) st.v.resize(BK * a.D);
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
      scale_into(qs + g * a.Tq * D, Q, a.Tq * D, qscale);
    }
    const T* K = static_cast<const T*>(a.k) + bhk * a.L * D;
    const T* V = static_cast<const T*>(a.v) + bhk * a.L * D;
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
      for (int64_t c = 0; c < nk; c += simd::W)
        for (int64_t r = 0; r < rows; ++r)
          dots(qs + r * D, K + (k0 + c) * D, D, std::min<int64_t>(simd::W, nk - c), S + r * BK + c);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = r % a.Tq;
        const int64_t lim = len - a.Tq + 1 + t;  // query t sees positions j < lim
        const int64_t vis = std::min(nk, lim - k0);
        float* srow = S + r * BK;
        float* pr = part + r * W;
        if (vis <= 0) {
          std::fill(srow, srow + BK, 0.f);
          continue;
        }
        const float mnew = std::max(pr[D], row_max(srow, vis));
        const float alpha = std::exp2(pr[D] - mnew);
        const float sum = exp2_rows(srow, vis, BK, mnew);
        if (alpha != 1.f) scale_row(pr, D, alpha);
        pr[D + 1] = pr[D + 1] * alpha + sum;
        pr[D] = mnew;
      }
      const float* Vt;
      if constexpr (std::is_same<T, float>::value) {
        Vt = V + k0 * D;
      } else {
        simd::to_f32(V + k0 * D, nk * D, st.v.data());
        Vt = st.v.data();
      }
      gemm(rows, D, nk, S, BK, Vt, D, part, W, true);
    }
  }
  void operator()(int64_t item, int64_t, State& st) const {
    slice(item, st);
    const int64_t bhk = item / a.nsplit;
    // One slice per (batch, kv head), as in a decode step whose cache fits one slice: no count.
    if (a.nsplit == 1 || done[bhk].fetch_add(1, std::memory_order_acq_rel) == a.nsplit - 1) combine(bhk);
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

template <typename T>
void decode_as(const AttnDecodeArgs& a) {
  std::vector<std::atomic<int>> done(a.B * a.Hkv);
  for (auto& f : done) f.store(0);
  DecWork<T> w{a, done.data()};
  run_dynamic(a.B * a.Hkv * a.nsplit, w, a.nthr);
}

// The glue passes only float32, bf16 or f16 caches.
void decode(const AttnDecodeArgs& a) {
  switch (a.kv_dtype) {
    case Dtype::bf16: decode_as<bf16>(a); return;
    case Dtype::f16: decode_as<f16>(a); return;
    default: decode_as<float>(a); return;
  }
}

}  // namespace attention
