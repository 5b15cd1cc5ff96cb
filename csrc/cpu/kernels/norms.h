// LayerNorm and RMSNorm over the last dimension, optionally fused with a residual add.
//
// Forward, per row of C elements (rows run in parallel):
//   h = x + residual (stored, rounded to the storage type, when a residual is given)
//   LayerNorm: mean = sum(h)/C, rstd = 1/sqrt(sum((h-mean)^2)/C + eps), out = (h-mean)*rstd*w + b
//   RMSNorm:   rstd = 1/sqrt(sum(h^2)/C + eps),                          out = h*rstd*w
// Saved for backward: h (the input itself when there is no residual), mean and rstd per row.
// Backward, per row, with xhat = (h-mean)*rstd (mean = 0 for RMSNorm) and g = dy*w:
//   dx = rstd * (g - mean(g) - xhat*mean(g*xhat)) + dh      (RMSNorm: no mean(g) term)
//   dw = sum over rows of dy*xhat, db = sum over rows of dy: each of nchunks blocks of rows
//   sums into its own row of dw_part/db_part, added by the caller (no atomics, no races).
// float32, bf16 and fp16 storage take the vector path (float32 arithmetic); float64 a
// scalar path in float64.
#pragma once

namespace norms {

// ---- float64: scalar ----
template <bool kRms>
void fwd_scalar(const NormFwdArgs& a) {
  const double *x = static_cast<const double*>(a.x), *res = static_cast<const double*>(a.res);
  const double *w = static_cast<const double*>(a.w), *b = static_cast<const double*>(a.b);
  double *out = static_cast<double*>(a.out), *h = static_cast<double*>(a.h);
  double *mean_out = static_cast<double*>(a.mean), *rstd_out = static_cast<double*>(a.rstd);
  const int64_t C = a.C;
  parallel_for(0, a.rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> buf(C);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = 0; j < C; ++j) buf[j] = x[r * C + j] + (res ? res[r * C + j] : 0.0);
      if (res) std::copy(buf.begin(), buf.end(), h + r * C);
      double mean = 0;
      if (!kRms) {
        for (int64_t j = 0; j < C; ++j) mean += buf[j];
        mean /= static_cast<double>(C);
      }
      double sq = 0;
      for (int64_t j = 0; j < C; ++j) sq += (buf[j] - mean) * (buf[j] - mean);
      const double rstd = 1.0 / std::sqrt(sq / static_cast<double>(C) + a.eps);
      for (int64_t j = 0; j < C; ++j) out[r * C + j] = (buf[j] - mean) * rstd * w[j] + (b ? b[j] : 0.0);
      if (!kRms) mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
  });
}

template <bool kRms>
void bwd_scalar(const NormBwdArgs& a) {
  const double *dy = static_cast<const double*>(a.dy), *dh = static_cast<const double*>(a.dh);
  const double *h = static_cast<const double*>(a.h), *w = static_cast<const double*>(a.w);
  const double *mean = static_cast<const double*>(a.mean), *rstd = static_cast<const double*>(a.rstd);
  double* dx = static_cast<double*>(a.dx);
  double *dw_part = static_cast<double*>(a.dw_part), *db_part = static_cast<double*>(a.db_part);
  const int64_t C = a.C, rows = a.rows, nchunks = a.nchunks;
  parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<double> xhat(C), g(C);
    for (int64_t c = cb; c < ce; ++c) {
      double* dwp = dw_part + c * C;
      double* dbp = db_part ? db_part + c * C : nullptr;
      for (int64_t r = rows * c / nchunks; r < rows * (c + 1) / nchunks; ++r) {
        const double m = kRms ? 0.0 : mean[r], rs = rstd[r];
        double sum_g = 0, sum_gx = 0;
        for (int64_t j = 0; j < C; ++j) {
          const double d = dy[r * C + j];
          xhat[j] = (h[r * C + j] - m) * rs;
          g[j] = d * w[j];
          sum_g += g[j];
          sum_gx += g[j] * xhat[j];
          dwp[j] += d * xhat[j];
          if (dbp) dbp[j] += d;
        }
        const double mg = kRms ? 0.0 : sum_g / static_cast<double>(C), mgx = sum_gx / static_cast<double>(C);
        for (int64_t j = 0; j < C; ++j) {
          // g - mg first, so that LayerNorm of one element (the constant bias) has dx = 0 exactly
          double v = (!kRms && C == 1) ? 0.0 : rs * ((g[j] - mg) - xhat[j] * mgx);
          dx[r * C + j] = v + (dh ? dh[r * C + j] : 0.0);
        }
      }
    }
  });
}

// ---- float32 / bf16 / fp16: vector ----
// Forward, per row: pass 1 reads x (+ residual), writes h and a float copy of h into a
// per-thread row buffer (L1/L2-resident) and sums it; pass 2 forms the variance from the
// buffer; pass 3 normalizes from the buffer and writes out. Each input is read from memory
// once and each output written once. The rows are pipelined: row r + 1's pass 1 runs inside
// row r's pass 3, into a second buffer, so the memory reads of one row overlap the writes of
// the other instead of memory idling while each row's statistics are computed.
template <typename T, bool kRms, bool kRes>
struct NormFwd {
  const T *x, *res, *w, *b;
  T *out, *h;
  int64_t C, Cv, nt;
  bool nts;

  // Pass 1 for one vector of row r at column j (n lanes, the rest 0; Full: n = W).
  template <bool Full>
  inline void pass1(int64_t r, int64_t j, int64_t n, bool nth, float* buf, simd::vf& s) const {
    using namespace simd;
    const T* xr = x + r * C + j;
    vf v;
    if constexpr (!kRes) {
      v = Full ? load(xr) : load(xr, n);
    } else {
      const T* rr = res + r * C + j;
      v = round_trip(Full ? add(load(xr), load(rr)) : add(load(xr, n), load(rr, n)), xr);
      if (Full) put(h + r * C + j, v, nth);
      else store(h + r * C + j, v, n);
    }
    store(buf + j, v);
    s = add(s, v);
  }
  // sum over the row's C values p[j] of (p[j] - mean)^2 (vm: the mean in every lane); p is
  // the row in the input (plain forward) or in the float row buffer (residual forward)
  template <typename P>
  inline float sum_sq_dev(const P* p, simd::vf vm) const {
    using namespace simd;
    vf q0 = zero(), q1 = zero();
    int64_t j = 0;
    for (; j + 2 * W <= Cv; j += 2 * W) {
      const vf d0 = sub(load(p + j), vm), d1 = sub(load(p + j + W), vm);
      q0 = fma(d0, d0, q0);
      q1 = fma(d1, d1, q1);
    }
    for (; j < Cv; j += W) {
      const vf d = sub(load(p + j), vm);
      q0 = fma(d, d, q0);
    }
    if (nt) {
      const vf d = first_n(nt, sub(load(p + j, nt), vm), zero());
      q1 = fma(d, d, q1);
    }
    return reduce_add(add(q0, q1));
  }
  inline void pass1_row(int64_t r, float* buf, simd::vf& s) const {
    const bool nth = kRes && nts && simd::vector_aligned(h + r * C);
    for (int64_t j = 0; j < Cv; j += simd::W) pass1<true>(r, j, simd::W, nth, buf, s);
    if (nt) pass1<false>(r, Cv, nt, false, buf, s);
  }
  // Pass 3 for one vector of row r (its statistics vm, vr) at column j.
  template <bool Full>
  inline void pass3(T* orow, int64_t j, int64_t n, bool nto, const float* buf, simd::vf vm, simd::vf vr) const {
    using namespace simd;
    const vf xh = mul(sub(load(buf + j), vm), vr);
    const vf wv = Full ? load(w + j) : load(w + j, n);
    const vf y = b ? fma(xh, wv, Full ? load(b + j) : load(b + j, n)) : mul(xh, wv);
    if (Full) put(orow + j, y, nto);
    else store(orow + j, y, n);
  }

  // Without a residual: each row read from memory once (its first pass) and twice more from
  // L1. (Software prefetches of the rows ahead were slower than the hardware prefetchers
  // alone once the large outputs bypass the caches.)
  void rows_plain(int64_t begin, int64_t end, float inv_c, float eps, float* mean_out, float* rstd_out) const {
    using namespace simd;
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * C;
      float mean = 0.0f;
      vf vm = zero();
      if (!kRms) {
        vf s0 = zero(), s1 = zero();
        int64_t j = 0;
        for (; j + 2 * W <= Cv; j += 2 * W) {
          s0 = add(s0, load(xr + j));
          s1 = add(s1, load(xr + j + W));
        }
        for (; j < Cv; j += W) s0 = add(s0, load(xr + j));
        if (nt) s1 = add(s1, load(xr + j, nt));
        mean = reduce_add(add(s0, s1)) * inv_c;
        vm = set1(mean);
      }
      const float rstd = 1.0f / std::sqrt(sum_sq_dev(xr, vm) * inv_c + eps);
      const vf vr = set1(rstd);
      T* orow = out + r * C;
      const bool nto = nts && vector_aligned(orow);
      for (int64_t j = 0; j < Cv; j += W) {
        const vf xh = mul(sub(load(xr + j), vm), vr);
        const vf y = b ? fma(xh, load(w + j), load(b + j)) : mul(xh, load(w + j));
        put(orow + j, y, nto);
      }
      if (nt) {
        const vf xh = mul(sub(load(xr + Cv, nt), vm), vr);
        const vf y = b ? fma(xh, load(w + Cv, nt), load(b + Cv, nt)) : mul(xh, load(w + Cv, nt));
        store(orow + Cv, y, nt);
      }
      if (!kRms) mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
    if (nts) stream_fence();
  }

  void rows(int64_t begin, int64_t end, float inv_c, float eps, float* mean_out, float* rstd_out) const {
    using namespace simd;
    if constexpr (!kRes) return rows_plain(begin, end, inv_c, eps, mean_out, rstd_out);
    std::vector<float> bufv(2 * (C + W));
    float* cur = bufv.data();
    float* nxt = cur + C + W;
    vf s = zero();
    pass1_row(begin, cur, s);
    for (int64_t r = begin; r < end; ++r) {
      const float mean = kRms ? 0.0f : reduce_add(s) * inv_c;
      const vf vm = set1(mean);
      const float rstd = 1.0f / std::sqrt(sum_sq_dev(cur, vm) * inv_c + eps);
      int64_t j;
      const vf vr = set1(rstd);
      T* orow = out + r * C;
      const bool nto = nts && vector_aligned(orow);
      vf sn = zero();
      if (r + 1 < end) {  // pass 3 of this row with pass 1 of the next
        const bool nth = kRes && nts && vector_aligned(h + (r + 1) * C);
        for (j = 0; j < Cv; j += W) {
          pass1<true>(r + 1, j, W, nth, nxt, sn);
          pass3<true>(orow, j, W, nto, cur, vm, vr);
        }
        if (nt) pass1<false>(r + 1, Cv, nt, false, nxt, sn);
      } else {
        for (j = 0; j < Cv; j += W) pass3<true>(orow, j, W, nto, cur, vm, vr);
      }
      if (nt) pass3<false>(orow, Cv, nt, false, cur, vm, vr);
      if (!kRms) mean_out[r] = mean;
      rstd_out[r] = rstd;
      std::swap(cur, nxt);
      s = sn;
    }
    if (nts) stream_fence();
  }
};

template <typename T, bool kRms, bool kRes>
void fwd_vec_res(const NormFwdArgs& a) {
  using simd::W;
  const int64_t C = a.C;
  const NormFwd<T, kRms, kRes> k{static_cast<const T*>(a.x), static_cast<const T*>(a.res), static_cast<const T*>(a.w),
                                 static_cast<const T*>(a.b), static_cast<T*>(a.out), static_cast<T*>(a.h), C,
                                 C / W * W, C - C / W * W,
                                 a.rows * C * int64_t(sizeof(T)) * (kRes ? 2 : 1) > stream_threshold_bytes()};
  const float inv_c = 1.0f / static_cast<float>(C), eps = static_cast<float>(a.eps);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    k.rows(begin, end, inv_c, eps, static_cast<float*>(a.mean), static_cast<float*>(a.rstd));
  });
}

template <typename T, bool kRms>
void fwd_vec(const NormFwdArgs& a) {
  if (a.res) fwd_vec_res<T, kRms, true>(a);
  else fwd_vec_res<T, kRms, false>(a);
}

// Backward, per row: pass 1 reads dy and h and forms the row's two sums; pass 2 re-reads
// them from L1, writes dx (+ dh) and adds the row's dw, db terms into its block's dw_part,
// db_part. (Running row r + 1's pass 1 inside row r's pass 2, as the residual forward does,
// or two rows a pass with one dw, db update per pair, measured slower: bench/RESULTS.md.)
template <typename T, bool kRms, bool kDb, bool kDh>
struct NormBwd {
  const T *dy, *dh, *h, *w;
  const float *mean, *rstd;
  T* dx;
  int64_t C, Cv, nt;
  float inv_c;
  bool nts;

  template <bool Full>
  static inline simd::vf ld(const T* p, int64_t n) {
    return Full ? simd::load(p) : simd::load(p, n);
  }
  // Pass 1 for one vector at element offset o (the row's offset + column j; n lanes, the rest
  // 0; Full: n = W): sg += g, sgx += g*xhat with g = dy*w.
  template <bool Full>
  inline void sums(int64_t o, int64_t j, int64_t n, simd::vf vm, simd::vf vr, simd::vf& sg, simd::vf& sgx) const {
    using namespace simd;
    vf xh = mul(sub(ld<Full>(h + o, n), vm), vr);
    if (!Full) xh = first_n(n, xh, zero());
    const vf g = mul(ld<Full>(dy + o, n), Full ? load(w + j) : load(w + j, n));
    if (!kRms) sg = add(sg, g);
    sgx = fma(g, xh, sgx);
  }
  // Pass 2 for one vector: dx, and the dw, db terms.
  template <bool Full>
  inline void out(int64_t o, int64_t j, int64_t n, simd::vf vm, simd::vf vr, simd::vf vmg, simd::vf vmgx, bool ntx,
                  float* dwp, float* dbp) const {
    using namespace simd;
    const vf d = ld<Full>(dy + o, n);
    const vf xh = mul(sub(ld<Full>(h + o, n), vm), vr);
    const vf g = mul(d, Full ? load(w + j) : load(w + j, n));
    // dx = rs * ((g - mg) - xh*mgx): g - mg first, so that it is exactly 0 when C = 1
    vf v = mul(vr, fnma(xh, vmgx, sub(g, vmg)));
    // LayerNorm of one element is the constant bias: its dx is exactly 0 (contraction of the
    // row sums into FMAs would otherwise leave 1 ulp).
    if (!kRms && C == 1) v = zero();
    if (kDh) v = add(v, ld<Full>(dh + o, n));
    if (Full) {
      put(dx + o, v, ntx);
      store(dwp + j, fma(d, xh, load(dwp + j)));
      if (kDb) store(dbp + j, add(d, load(dbp + j)));
    } else {  // d is 0 past lane n, so are its dw, db terms
      store(dx + o, v, n);
      store(dwp + j, fma(d, xh, load(dwp + j, n)), n);
      if (kDb) store(dbp + j, add(d, load(dbp + j, n)), n);
    }
  }

  void rows(int64_t r0, int64_t r1, float* dwp, float* dbp) const {
    using namespace simd;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * C;
      const vf vm = set1(kRms ? 0.0f : mean[r]), vr = set1(rstd[r]);
      vf sg0 = zero(), sg1 = zero(), sgx0 = zero(), sgx1 = zero();
      int64_t j = 0;
      for (; j + 2 * W <= Cv; j += 2 * W) {
        sums<true>(o + j, j, W, vm, vr, sg0, sgx0);
        sums<true>(o + j + W, j + W, W, vm, vr, sg1, sgx1);
      }
      for (; j < Cv; j += W) sums<true>(o + j, j, W, vm, vr, sg0, sgx0);
      if (nt) sums<false>(o + Cv, Cv, nt, vm, vr, sg1, sgx1);
      const vf vmg = set1(kRms ? 0.0f : reduce_add(add(sg0, sg1)) * inv_c);
      const vf vmgx = set1(reduce_add(add(sgx0, sgx1)) * inv_c);
      const bool ntx = nts && vector_aligned(dx + o);
      for (j = 0; j < Cv; j += W) out<true>(o + j, j, W, vm, vr, vmg, vmgx, ntx, dwp, dbp);
      if (nt) out<false>(o + Cv, Cv, nt, vm, vr, vmg, vmgx, false, dwp, dbp);
    }
  }
};

template <typename T, bool kRms, bool kDb, bool kDh>
void bwd_vec_with(const NormBwdArgs& a) {
  using simd::W;
  const int64_t C = a.C, rows = a.rows, nchunks = a.nchunks;
  const NormBwd<T, kRms, kDb, kDh> k{static_cast<const T*>(a.dy), static_cast<const T*>(a.dh),
                                     static_cast<const T*>(a.h), static_cast<const T*>(a.w),
                                     static_cast<const float*>(a.mean), static_cast<const float*>(a.rstd),
                                     static_cast<T*>(a.dx), C, C / W * W, C - C / W * W,
                                     1.0f / static_cast<float>(C),
                                     rows * C * int64_t(sizeof(T)) > stream_threshold_bytes()};
  float *dw_part = static_cast<float*>(a.dw_part), *db_part = static_cast<float*>(a.db_part);
  parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c)
      k.rows(rows * c / nchunks, rows * (c + 1) / nchunks, dw_part + c * C, kDb ? db_part + c * C : nullptr);
    if (k.nts) simd::stream_fence();
  });
}

template <typename T, bool kRms>
void bwd_vec(const NormBwdArgs& a) {
  const bool db = a.db_part != nullptr, dh = a.dh != nullptr;
  if (db && dh) bwd_vec_with<T, kRms, true, true>(a);
  else if (db) bwd_vec_with<T, kRms, true, false>(a);
  else if (dh) bwd_vec_with<T, kRms, false, true>(a);
  else bwd_vec_with<T, kRms, false, false>(a);
}

template <bool kRms>
void fwd_rms(const NormFwdArgs& a) {
  switch (a.dtype) {
    case Dtype::f32: return fwd_vec<float, kRms>(a);
    case Dtype::bf16: return fwd_vec<bf16, kRms>(a);
    case Dtype::f16: return fwd_vec<f16, kRms>(a);
    case Dtype::f64: return fwd_scalar<kRms>(a);
  }
}

template <bool kRms>
void bwd_rms(const NormBwdArgs& a) {
  switch (a.dtype) {
    case Dtype::f32: return bwd_vec<float, kRms>(a);
    case Dtype::bf16: return bwd_vec<bf16, kRms>(a);
    case Dtype::f16: return bwd_vec<f16, kRms>(a);
    case Dtype::f64: return bwd_scalar<kRms>(a);
  }
}

void forward(const NormFwdArgs& a) { a.rms ? fwd_rms<true>(a) : fwd_rms<false>(a); }
void backward(const NormBwdArgs& a) { a.rms ? bwd_rms<true>(a) : bwd_rms<false>(a); }

}  // namespace norms
