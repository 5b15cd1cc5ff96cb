// LayerNorm and RMSNorm (optionally fused with a residual add) on the CPU, the torch side:
// input checks and outputs, then the kernel core of the SIMD level in use
// (csrc/cpu/kernels/norms.h: the algorithm).
#include "common.h"
#include "kernels.h"

namespace fastlm {
namespace {

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
  const NormFwdArgs a{kernel_dtype(x.scalar_type()), kRms, x.data_ptr(), res.defined() ? res.data_ptr() : nullptr,
                      w.data_ptr(), b.defined() ? b.data_ptr() : nullptr, out.data_ptr(),
                      res.defined() ? h.data_ptr() : nullptr, kRms ? nullptr : mean.data_ptr(), rstd.data_ptr(),
                      rows, C, eps};
  cpu_kernels().norm_fwd(a);
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
  const NormBwdArgs a{kernel_dtype(h.scalar_type()), kRms, dy.data_ptr(), dh.defined() ? dh.data_ptr() : nullptr,
                      h.data_ptr(), w.data_ptr(), kRms ? nullptr : mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
                      dw_part.data_ptr(), has_bias ? db_part.data_ptr() : nullptr, rows, C, nchunks};
  cpu_kernels().norm_bwd(a);
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
