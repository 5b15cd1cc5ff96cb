// LayerNorm and RMSNorm over the last dimension, optionally fused with a residual add.
//
// Forward, per row of C elements (rows run in parallel):
//   h = x + residual (stored, rounded to the storage type, when a residual is given)
//   LayerNorm: mean = sum(h)/C, rstd = 1/sqrt(sum((h-mean)^2)/C + eps), out = (h-mean)*rstd*w + b
//   RMSNorm:   rstd = 1/sqrt(sum(h^2)/C + eps),                          out = h*rstd*w
// Saved for backward: h (the input itself when there is no residual), mean and rstd per row.
// Backward, per row, with xhat = (h-mean)*rstd (mean = 0 for RMSNorm) and g = dy*w:
//   dx = rstd * (g - mean(g) - xhat*mean(g*xhat)) + dh      (RMSNorm: no mean(g) term)
//   dw = sum over rows of dy*xhat, db = sum over rows of dy: each thread sums its own block
//   of rows into a private buffer, then the buffers are added (no atomics, no races).
// Arithmetic in float32 for bf16/fp16 storage, in the storage type for float32/float64.
#include "common.h"
#include "simd.h"

#include <cmath>
#include <type_traits>
#include <vector>

namespace fastlm {
namespace {

template <typename scalar_t, bool kRms>
void norm_fwd_generic(const scalar_t* x, const scalar_t* res, const scalar_t* w, const scalar_t* b,
                     scalar_t* out, scalar_t* h, acc_t<scalar_t>* mean_out, acc_t<scalar_t>* rstd_out,
                     int64_t rows, int64_t C, double eps) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> buf(C);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * C;
      acc sum = 0;
      if (res) {
        const scalar_t* rr = res + r * C;
        scalar_t* hr = h + r * C;
        for (int64_t j = 0; j < C; ++j) {
          scalar_t hv = static_cast<scalar_t>(static_cast<acc>(xr[j]) + static_cast<acc>(rr[j]));
          hr[j] = hv;
          buf[j] = static_cast<acc>(hv);
        }
      } else {
        for (int64_t j = 0; j < C; ++j) buf[j] = static_cast<acc>(xr[j]);
      }
      acc mean = 0;
      if (!kRms) {
        for (int64_t j = 0; j < C; ++j) sum += buf[j];
        mean = sum / static_cast<acc>(C);
      }
      acc sq = 0;
      for (int64_t j = 0; j < C; ++j) {
        acc d = buf[j] - mean;
        sq += d * d;
      }
      acc rstd = static_cast<acc>(1) / std::sqrt(sq / static_cast<acc>(C) + static_cast<acc>(eps));
      scalar_t* orow = out + r * C;
      if (b) {
        for (int64_t j = 0; j < C; ++j)
          orow[j] = static_cast<scalar_t>((buf[j] - mean) * rstd * static_cast<acc>(w[j]) + static_cast<acc>(b[j]));
      } else {
        for (int64_t j = 0; j < C; ++j)
          orow[j] = static_cast<scalar_t>((buf[j] - mean) * rstd * static_cast<acc>(w[j]));
      }
      if (mean_out) mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
  });
}

template <typename scalar_t, bool kRms>
void norm_bwd_generic(const scalar_t* dy, const scalar_t* dh, const scalar_t* h, const scalar_t* w,
                     const acc_t<scalar_t>* mean, const acc_t<scalar_t>* rstd, scalar_t* dx,
                     acc_t<scalar_t>* dw_part, acc_t<scalar_t>* db_part, int64_t rows, int64_t C,
                     int64_t nchunks) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<acc> xhat(C), g(C);
    for (int64_t c = cb; c < ce; ++c) {
      acc* dwp = dw_part + c * C;
      acc* dbp = db_part ? db_part + c * C : nullptr;
      const int64_t r0 = rows * c / nchunks, r1 = rows * (c + 1) / nchunks;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* dyr = dy + r * C;
        const scalar_t* hr = h + r * C;
        const acc m = kRms ? acc(0) : mean[r];
        const acc rs = rstd[r];
        acc sum_g = 0, sum_gx = 0;
        for (int64_t j = 0; j < C; ++j) {
          const acc dyv = static_cast<acc>(dyr[j]);
          const acc xh = (static_cast<acc>(hr[j]) - m) * rs;
          const acc gv = dyv * static_cast<acc>(w[j]);
          xhat[j] = xh;
          g[j] = gv;
          sum_g += gv;
          sum_gx += gv * xh;
          dwp[j] += dyv * xh;
          if (dbp) dbp[j] += dyv;
        }
        acc mg = kRms ? acc(0) : sum_g / static_cast<acc>(C);
        const acc mgx = sum_gx / static_cast<acc>(C);
        if (!kRms && C == 1) g[0] = mg = xhat[0] = 0;  // LayerNorm of one element: dx = 0 exactly
        scalar_t* dxr = dx + r * C;
        if (dh) {
          const scalar_t* dhr = dh + r * C;
          for (int64_t j = 0; j < C; ++j)
            dxr[j] = static_cast<scalar_t>(rs * (g[j] - mg - xhat[j] * mgx) + static_cast<acc>(dhr[j]));
        } else {
          for (int64_t j = 0; j < C; ++j) dxr[j] = static_cast<scalar_t>(rs * (g[j] - mg - xhat[j] * mgx));
        }
      }
    }
  });
}

#ifdef FASTLM_AVX512
// ---- AVX-512 forms (float, bfloat16, float16 storage; float32 math) ----
// Forward, one row: pass 1 reads x (+ residual), writes h and a float copy of h into a
// per-thread row buffer (L1/L2-resident) and sums it; passes 2 and 3 read only the buffer,
// so each input is read from memory once and each output written once.
template <typename T, bool kRms>
void norm_fwd_avx512(const T* x, const T* res, const T* w, const T* b, T* out, T* h, float* mean_out,
                     float* rstd_out, int64_t rows, int64_t C, double eps) {
  using namespace simd;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  const int64_t Cv = C / kLanes * kLanes;
  const __mmask16 mt = tail_mask(C - Cv);
  const float inv_c = 1.0f / static_cast<float>(C);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> bufv(C + kLanes);
    float* buf = bufv.data();
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * C;
      __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
      int64_t j = 0;
      if (res) {
        const T* rr = res + r * C;
        T* hr = h + r * C;
        for (; j < Cv; j += kLanes) {
          __m512 v = round_trip(_mm512_add_ps(load(xr + j), load(rr + j)), xr);
          store(hr + j, v);
          _mm512_storeu_ps(buf + j, v);
          if ((j / kLanes) & 1) s1 = _mm512_add_ps(s1, v); else s0 = _mm512_add_ps(s0, v);
        }
        if (j < C) {
          __m512 v = round_trip(_mm512_add_ps(load(xr + j, mt), load(rr + j, mt)), xr);
          store(hr + j, v, mt);
          _mm512_storeu_ps(buf + j, v);
          s0 = _mm512_add_ps(s0, v);
        }
      } else {
        for (; j < Cv; j += kLanes) {
          __m512 v = load(xr + j);
          _mm512_storeu_ps(buf + j, v);
          if ((j / kLanes) & 1) s1 = _mm512_add_ps(s1, v); else s0 = _mm512_add_ps(s0, v);
        }
        if (j < C) {
          __m512 v = load(xr + j, mt);
          _mm512_storeu_ps(buf + j, v);
          s0 = _mm512_add_ps(s0, v);
        }
      }
      const float mean = kRms ? 0.0f : _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) * inv_c;
      const __m512 vm = _mm512_set1_ps(mean);
      __m512 q0 = _mm512_setzero_ps(), q1 = _mm512_setzero_ps();
      for (j = 0; j < Cv; j += kLanes) {
        __m512 d = _mm512_sub_ps(_mm512_loadu_ps(buf + j), vm);
        if ((j / kLanes) & 1) q1 = _mm512_fmadd_ps(d, d, q1); else q0 = _mm512_fmadd_ps(d, d, q0);
      }
      if (j < C) {
        __m512 d = _mm512_maskz_sub_ps(mt, _mm512_loadu_ps(buf + j), vm);
        q0 = _mm512_fmadd_ps(d, d, q0);
      }
      const float var = _mm512_reduce_add_ps(_mm512_add_ps(q0, q1)) * inv_c;
      const float rstd = 1.0f / std::sqrt(var + static_cast<float>(eps));
      const __m512 vr = _mm512_set1_ps(rstd);
      T* orow = out + r * C;
      for (j = 0; j < Cv; j += kLanes) {
        __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(buf + j), vm), vr);
        __m512 y = b ? _mm512_fmadd_ps(xh, load(w + j), load(b + j)) : _mm512_mul_ps(xh, load(w + j));
        store(orow + j, y);
      }
      if (j < C) {
        __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(buf + j), vm), vr);
        __m512 y = b ? _mm512_fmadd_ps(xh, load(w + j, mt), load(b + j, mt)) : _mm512_mul_ps(xh, load(w + j, mt));
        store(orow + j, y, mt);
      }
      if (!kRms) mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
  });
}

// Backward: each of nchunks blocks of rows accumulates dweight/dbias into its own row of
// dw_part/db_part. Per row, pass 1 reads dy and h and forms the two row sums; pass 2
// re-reads them from cache and writes dx (+ dh).
template <typename T, bool kRms>
void norm_bwd_avx512(const T* dy, const T* dh, const T* h, const T* w, const float* mean, const float* rstd, T* dx,
                     float* dw_part, float* db_part, int64_t rows, int64_t C, int64_t nchunks) {
  using namespace simd;
  const int64_t Cv = C / kLanes * kLanes;
  const __mmask16 mt = tail_mask(C - Cv);
  const float inv_c = 1.0f / static_cast<float>(C);
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      float* dwp = dw_part + c * C;
      float* dbp = db_part ? db_part + c * C : nullptr;
      const int64_t r0 = rows * c / nchunks, r1 = rows * (c + 1) / nchunks;
      for (int64_t r = r0; r < r1; ++r) {
        const T* dyr = dy + r * C;
        const T* hr = h + r * C;
        const __m512 vm = _mm512_set1_ps(kRms ? 0.0f : mean[r]);
        const float rs = rstd[r];
        const __m512 vr = _mm512_set1_ps(rs);
        __m512 sg = _mm512_setzero_ps(), sgx = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j < Cv; j += kLanes) {
          __m512 d = load(dyr + j);
          __m512 xh = _mm512_mul_ps(_mm512_sub_ps(load(hr + j), vm), vr);
          __m512 g = _mm512_mul_ps(d, load(w + j));
          if (!kRms) sg = _mm512_add_ps(sg, g);
          sgx = _mm512_fmadd_ps(g, xh, sgx);
          _mm512_storeu_ps(dwp + j, _mm512_fmadd_ps(d, xh, _mm512_loadu_ps(dwp + j)));
          if (dbp) _mm512_storeu_ps(dbp + j, _mm512_add_ps(d, _mm512_loadu_ps(dbp + j)));
        }
        if (j < C) {
          __m512 d = load(dyr + j, mt);
          __m512 xh = _mm512_maskz_mul_ps(mt, _mm512_sub_ps(load(hr + j, mt), vm), vr);
          __m512 g = _mm512_mul_ps(d, load(w + j, mt));
          if (!kRms) sg = _mm512_add_ps(sg, g);
          sgx = _mm512_fmadd_ps(g, xh, sgx);
          _mm512_mask_storeu_ps(dwp + j, mt, _mm512_fmadd_ps(d, xh, _mm512_maskz_loadu_ps(mt, dwp + j)));
          if (dbp) _mm512_mask_storeu_ps(dbp + j, mt, _mm512_add_ps(d, _mm512_maskz_loadu_ps(mt, dbp + j)));
        }
        const float mg = kRms ? 0.0f : _mm512_reduce_add_ps(sg) * inv_c;
        const float mgx = _mm512_reduce_add_ps(sgx) * inv_c;
        // dx = rs * ((g - mg) - xh*mgx): g - mg first, so that it is exactly 0 when C = 1
        const __m512 vmg = _mm512_set1_ps(mg), vmgx = _mm512_set1_ps(mgx);
        T* dxr = dx + r * C;
        const T* dhr = dh ? dh + r * C : nullptr;
        for (j = 0; j < Cv; j += kLanes) {
          __m512 xh = _mm512_mul_ps(_mm512_sub_ps(load(hr + j), vm), vr);
          __m512 g = _mm512_mul_ps(load(dyr + j), load(w + j));
          __m512 v = _mm512_mul_ps(vr, _mm512_fnmadd_ps(xh, vmgx, _mm512_sub_ps(g, vmg)));
          if (dhr) v = _mm512_add_ps(v, load(dhr + j));
          store(dxr + j, v);
        }
        if (j < C) {
          __m512 xh = _mm512_mul_ps(_mm512_sub_ps(load(hr + j, mt), vm), vr);
          __m512 g = _mm512_mul_ps(load(dyr + j, mt), load(w + j, mt));
          __m512 v = _mm512_mul_ps(vr, _mm512_fnmadd_ps(xh, vmgx, _mm512_sub_ps(g, vmg)));
          // LayerNorm of one element is the constant bias: its dx is exactly 0 (the
          // compiler's FMA contraction of the row sums would otherwise leave 1 ulp).
          if (!kRms && C == 1) v = _mm512_setzero_ps();
          if (dhr) v = _mm512_add_ps(v, load(dhr + j, mt));
          store(dxr + j, v, mt);
        }
      }
    }
  });
}
#endif  // FASTLM_AVX512

template <typename scalar_t, bool kRms>
void norm_fwd_kernel(const scalar_t* x, const scalar_t* res, const scalar_t* w, const scalar_t* b, scalar_t* out,
                     scalar_t* h, acc_t<scalar_t>* mean_out, acc_t<scalar_t>* rstd_out, int64_t rows, int64_t C,
                     double eps) {
#ifdef FASTLM_AVX512
  if constexpr (!std::is_same_v<scalar_t, double>) {
    norm_fwd_avx512<scalar_t, kRms>(x, res, w, b, out, h, mean_out, rstd_out, rows, C, eps);
    return;
  }
#endif
  norm_fwd_generic<scalar_t, kRms>(x, res, w, b, out, h, mean_out, rstd_out, rows, C, eps);
}

template <typename scalar_t, bool kRms>
void norm_bwd_kernel(const scalar_t* dy, const scalar_t* dh, const scalar_t* h, const scalar_t* w,
                     const acc_t<scalar_t>* mean, const acc_t<scalar_t>* rstd, scalar_t* dx,
                     acc_t<scalar_t>* dw_part, acc_t<scalar_t>* db_part, int64_t rows, int64_t C, int64_t nchunks) {
#ifdef FASTLM_AVX512
  if constexpr (!std::is_same_v<scalar_t, double>) {
    norm_bwd_avx512<scalar_t, kRms>(dy, dh, h, w, mean, rstd, dx, dw_part, db_part, rows, C, nchunks);
    return;
  }
#endif
  norm_bwd_generic<scalar_t, kRms>(dy, dh, h, w, mean, rstd, dx, dw_part, db_part, rows, C, nchunks);
}

void check_norm_inputs(const at::Tensor& x, const at::Tensor& weight) {
  FASTLM_CHECK_CPU(x);
  FASTLM_CHECK_CPU(weight);
  TORCH_CHECK(x.dim() >= 1, "norm: x must have at least one dimension");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "norm: weight must have shape (C,) with C = x.size(-1)");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "norm: weight dtype must match x");
}

at::Tensor opt_contig(const c10::optional<at::Tensor>& t, const at::Tensor& like, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->sizes() == like.sizes() || t->numel() == like.numel(), name, " must have the shape of x");
  TORCH_CHECK(t->scalar_type() == like.scalar_type(), name, " dtype must match x");
  FASTLM_CHECK_CPU(*t);
  return t->contiguous();
}

template <bool kRms>
std::vector<at::Tensor> norm_fwd(const at::Tensor& x_, const at::Tensor& weight_, const c10::optional<at::Tensor>& bias_,
                                 const c10::optional<at::Tensor>& residual_, double eps) {
  check_norm_inputs(x_, weight_);
  const at::Tensor x = x_.contiguous(), w = weight_.contiguous();
  const at::Tensor b = opt_contig(bias_, weight_, "bias");
  const at::Tensor res = opt_contig(residual_, x_, "residual");
  const int64_t C = x.size(-1), rows = C ? x.numel() / C : 0;
  at::Tensor out = empty_output(x.sizes(), x.scalar_type());
  at::Tensor h = res.defined() ? empty_output(x.sizes(), x.scalar_type()) : at::empty({0}, x.options());
  auto sopt = x.options().dtype(stat_dtype(x.scalar_type()));
  auto stat_shape = x.sizes().slice(0, x.dim() - 1);
  at::Tensor mean = at::empty(kRms ? std::vector<int64_t>{0} : stat_shape.vec(), sopt);
  at::Tensor rstd = at::empty(stat_shape, sopt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastlm_norm_fwd", [&] {
    using acc = acc_t<scalar_t>;
    norm_fwd_kernel<scalar_t, kRms>(x.data_ptr<scalar_t>(), res.defined() ? res.data_ptr<scalar_t>() : nullptr,
                                    w.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                                    out.data_ptr<scalar_t>(), res.defined() ? h.data_ptr<scalar_t>() : nullptr,
                                    kRms ? nullptr : mean.data_ptr<acc>(), rstd.data_ptr<acc>(), rows, C, eps);
  });
  if (kRms) return {out, h, rstd};
  return {out, h, mean, rstd};
}

template <bool kRms>
std::vector<at::Tensor> norm_bwd(const at::Tensor& dy_, const c10::optional<at::Tensor>& dh_, const at::Tensor& h_,
                                 const at::Tensor& weight_, bool has_bias, const at::Tensor& mean_,
                                 const at::Tensor& rstd_) {
  check_norm_inputs(h_, weight_);
  TORCH_CHECK(dy_.sizes() == h_.sizes(), "norm backward: grad_out must have the shape of h");
  const at::Tensor dy = dy_.contiguous().to(h_.scalar_type()), h = h_.contiguous(), w = weight_.contiguous();
  const at::Tensor dh = opt_contig(dh_, h_, "grad_h");
  const at::Tensor rstd = rstd_.contiguous(), mean = kRms ? mean_ : mean_.contiguous();
  const int64_t C = h.size(-1), rows = C ? h.numel() / C : 0;
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  at::Tensor dx = empty_output(h.sizes(), h.scalar_type());
  auto aopt = h.options().dtype(stat_dtype(h.scalar_type()));
  at::Tensor dw_part = at::zeros({nchunks, C}, aopt);
  at::Tensor db_part = has_bias ? at::zeros({nchunks, C}, aopt) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "fastlm_norm_bwd", [&] {
    using acc = acc_t<scalar_t>;
    norm_bwd_kernel<scalar_t, kRms>(dy.data_ptr<scalar_t>(), dh.defined() ? dh.data_ptr<scalar_t>() : nullptr,
                                    h.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                    kRms ? nullptr : mean.data_ptr<acc>(), rstd.data_ptr<acc>(),
                                    dx.data_ptr<scalar_t>(), dw_part.data_ptr<acc>(),
                                    has_bias ? db_part.data_ptr<acc>() : nullptr, rows, C, nchunks);
  });
  at::Tensor dw = dw_part.sum(0).to(w.scalar_type());
  at::Tensor db = has_bias ? db_part.sum(0).to(w.scalar_type()) : at::empty({0}, w.options());
  if (kRms) return {dx, dw};
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                                          const c10::optional<at::Tensor>& bias,
                                                                          const c10::optional<at::Tensor>& residual,
                                                                          double eps) {
  auto r = norm_fwd<false>(x, weight, bias, residual, eps);
  return {r[0], r[1], r[2], r[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy, const c10::optional<at::Tensor>& dh,
                                                              const at::Tensor& h, const at::Tensor& weight,
                                                              const c10::optional<at::Tensor>& bias,
                                                              const at::Tensor& mean, const at::Tensor& rstd) {
  const bool has_bias = bias.has_value() && bias->defined();
  auto r = norm_bwd<false>(dy, dh, h, weight, has_bias, mean, rstd);
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                            const c10::optional<at::Tensor>& residual, double eps) {
  auto r = norm_fwd<true>(x, weight, c10::nullopt, residual, eps);
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const c10::optional<at::Tensor>& dh,
                                                const at::Tensor& h, const at::Tensor& weight, const at::Tensor& rstd) {
  auto r = norm_bwd<true>(dy, dh, h, weight, false, at::Tensor(), rstd);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}

}  // namespace fastlm
