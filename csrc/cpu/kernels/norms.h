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
// Forward, one row: pass 1 reads x (+ residual), writes h and a float copy of h into a
// per-thread row buffer (L1/L2-resident) and sums it; passes 2 and 3 read only the buffer,
// so each input is read from memory once and each output written once.
template <typename T, bool kRms>
void fwd_vec(const NormFwdArgs& a) {
  using namespace simd;
  const T *x = static_cast<const T*>(a.x), *res = static_cast<const T*>(a.res);
  const T *w = static_cast<const T*>(a.w), *b = static_cast<const T*>(a.b);
  T *out = static_cast<T*>(a.out), *h = static_cast<T*>(a.h);
  float *mean_out = static_cast<float*>(a.mean), *rstd_out = static_cast<float*>(a.rstd);
  const int64_t C = a.C, Cv = C / W * W, nt = C - Cv;
  const float inv_c = 1.0f / static_cast<float>(C), eps = static_cast<float>(a.eps);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  const bool nts = a.rows * C * int64_t(sizeof(T)) * (res ? 2 : 1) > stream_threshold_bytes();
  parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> bufv(C + W);
    float* buf = bufv.data();
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * C;
      T* orow = out + r * C;
      const bool nto = nts && vector_aligned(orow), nth = nts && res && vector_aligned(h + r * C);
      vf s0 = zero(), s1 = zero();
      int64_t j = 0;
      if (res) {
        const T* rr = res + r * C;
        T* hr = h + r * C;
        for (; j + 2 * W <= Cv; j += 2 * W) {
          const vf v0 = round_trip(add(load(xr + j), load(rr + j)), xr);
          const vf v1 = round_trip(add(load(xr + j + W), load(rr + j + W)), xr);
          put(hr + j, v0, nth);
          put(hr + j + W, v1, nth);
          store(buf + j, v0);
          store(buf + j + W, v1);
          s0 = add(s0, v0);
          s1 = add(s1, v1);
        }
        for (; j < Cv; j += W) {
          const vf v = round_trip(add(load(xr + j), load(rr + j)), xr);
          put(hr + j, v, nth);
          store(buf + j, v);
          s0 = add(s0, v);
        }
        if (nt) {
          const vf v = round_trip(add(load(xr + j, nt), load(rr + j, nt)), xr);
          store(hr + j, v, nt);
          store(buf + j, v);
          s1 = add(s1, v);
        }
      } else {
        for (; j + 2 * W <= Cv; j += 2 * W) {
          const vf v0 = load(xr + j), v1 = load(xr + j + W);
          store(buf + j, v0);
          store(buf + j + W, v1);
          s0 = add(s0, v0);
          s1 = add(s1, v1);
        }
        for (; j < Cv; j += W) {
          const vf v = load(xr + j);
          store(buf + j, v);
          s0 = add(s0, v);
        }
        if (nt) {
          const vf v = load(xr + j, nt);
          store(buf + j, v);
          s1 = add(s1, v);
        }
      }
      const float mean = kRms ? 0.0f : reduce_add(add(s0, s1)) * inv_c;
      const vf vm = set1(mean);
      vf q0 = zero(), q1 = zero();
      for (j = 0; j + 2 * W <= Cv; j += 2 * W) {
        const vf d0 = sub(load(buf + j), vm), d1 = sub(load(buf + j + W), vm);
        q0 = fma(d0, d0, q0);
        q1 = fma(d1, d1, q1);
      }
      for (; j < Cv; j += W) {
        const vf d = sub(load(buf + j), vm);
        q0 = fma(d, d, q0);
      }
      if (nt) {
        const vf d = first_n(nt, sub(load(buf + j), vm), zero());
        q1 = fma(d, d, q1);
      }
      const float rstd = 1.0f / std::sqrt(reduce_add(add(q0, q1)) * inv_c + eps);
      const vf vr = set1(rstd);
      for (j = 0; j < Cv; j += W) {
        const vf xh = mul(sub(load(buf + j), vm), vr);
        put(orow + j, b ? fma(xh, load(w + j), load(b + j)) : mul(xh, load(w + j)), nto);
      }
      if (nt) {
        const vf xh = mul(sub(load(buf + j), vm), vr);
        store(orow + j, b ? fma(xh, load(w + j, nt), load(b + j, nt)) : mul(xh, load(w + j, nt)), nt);
      }
      if (!kRms) mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
    if (nts) stream_fence();
  });
}

// Backward: per row, pass 1 reads dy and h and forms the two row sums (and adds this row's
// dw, db terms); pass 2 re-reads them from cache and writes dx (+ dh).
template <typename T, bool kRms>
void bwd_vec(const NormBwdArgs& a) {
  using namespace simd;
  const T *dy = static_cast<const T*>(a.dy), *dh = static_cast<const T*>(a.dh);
  const T *h = static_cast<const T*>(a.h), *w = static_cast<const T*>(a.w);
  const float *mean = static_cast<const float*>(a.mean), *rstd = static_cast<const float*>(a.rstd);
  T* dx = static_cast<T*>(a.dx);
  float *dw_part = static_cast<float*>(a.dw_part), *db_part = static_cast<float*>(a.db_part);
  const int64_t C = a.C, Cv = C / W * W, nt = C - Cv, rows = a.rows, nchunks = a.nchunks;
  const float inv_c = 1.0f / static_cast<float>(C);
  const bool nts = rows * C * int64_t(sizeof(T)) > stream_threshold_bytes();
  parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      float* dwp = dw_part + c * C;
      float* dbp = db_part ? db_part + c * C : nullptr;
      for (int64_t r = rows * c / nchunks; r < rows * (c + 1) / nchunks; ++r) {
        const bool ntx = nts && vector_aligned(dx + r * C);
        const T* dyr = dy + r * C;
        const T* hr = h + r * C;
        const vf vm = set1(kRms ? 0.0f : mean[r]);
        const vf vr = set1(rstd[r]);
        vf sg = zero(), sgx = zero();
        int64_t j = 0;
        for (; j < Cv; j += W) {
          const vf d = load(dyr + j);
          const vf xh = mul(sub(load(hr + j), vm), vr);
          const vf g = mul(d, load(w + j));
          if (!kRms) sg = add(sg, g);
          sgx = fma(g, xh, sgx);
          store(dwp + j, fma(d, xh, load(dwp + j)));
          if (dbp) store(dbp + j, add(d, load(dbp + j)));
        }
        if (nt) {
          const vf d = load(dyr + j, nt);
          const vf xh = first_n(nt, mul(sub(load(hr + j, nt), vm), vr), zero());
          const vf g = mul(d, load(w + j, nt));
          if (!kRms) sg = add(sg, g);
          sgx = fma(g, xh, sgx);
          store(dwp + j, fma(d, xh, load(dwp + j, nt)), nt);
          if (dbp) store(dbp + j, add(d, load(dbp + j, nt)), nt);
        }
        const float mg = kRms ? 0.0f : reduce_add(sg) * inv_c;
        const float mgx = reduce_add(sgx) * inv_c;
        // dx = rs * ((g - mg) - xh*mgx): g - mg first, so that it is exactly 0 when C = 1
        const vf vmg = set1(mg), vmgx = set1(mgx);
        T* dxr = dx + r * C;
        const T* dhr = dh ? dh + r * C : nullptr;
        for (j = 0; j < Cv; j += W) {
          const vf xh = mul(sub(load(hr + j), vm), vr);
          const vf g = mul(load(dyr + j), load(w + j));
          vf v = mul(vr, fnma(xh, vmgx, sub(g, vmg)));
          if (dhr) v = add(v, load(dhr + j));
          put(dxr + j, v, ntx);
        }
        if (nt) {
          const vf xh = mul(sub(load(hr + j, nt), vm), vr);
          const vf g = mul(load(dyr + j, nt), load(w + j, nt));
          vf v = mul(vr, fnma(xh, vmgx, sub(g, vmg)));
          // LayerNorm of one element is the constant bias: its dx is exactly 0 (contraction
          // of the row sums into FMAs would otherwise leave 1 ulp).
          if (!kRms && C == 1) v = zero();
          if (dhr) v = add(v, load(dhr + j, nt));
          store(dxr + j, v, nt);
        }
      }
    }
    if (nts) stream_fence();
  });
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
