// Torch glue for the CUDA LayerNorm / RMSNorm kernels (csrc/cuda/norms.cu): checks,
// allocation, the current stream, and TORCH_LIBRARY_IMPL(fastlm, CUDA). Mirrors
// csrc/cpu/norms.cpp; float64 inputs are computed by casting to float32 and back.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/norms.cuh"

namespace fastlm {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, "fastlm CUDA norms: unsupported dtype ", t);
  }
  return -1;
}

void check_cuda(cudaError_t e) { TORCH_CHECK(e == cudaSuccess, "fastlm CUDA norms: ", cudaGetErrorString(e)); }

void check_inputs(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.is_cuda() && w.is_cuda(), "norm: x and weight must be CUDA tensors");
  TORCH_CHECK(x.dim() >= 1, "norm: x must have at least one dimension");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), "norm: weight must have shape (C,) with C = x.size(-1)");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "norm: weight dtype must match x");
  TORCH_CHECK(w.device() == x.device(), "norm: weight must be on the device of x");
}

at::Tensor opt(const c10::optional<at::Tensor>& t, const at::Tensor& like, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->numel() == like.numel() || t->sizes() == like.sizes(), name, " must have the shape of x");
  TORCH_CHECK(t->scalar_type() == like.scalar_type(), name, " dtype must match x");
  TORCH_CHECK(t->device() == like.device(), name, " must be on the device of x");
  return t->contiguous();
}

template <bool kRms>
std::vector<at::Tensor> fwd(const at::Tensor& x_, const at::Tensor& w_, const c10::optional<at::Tensor>& b_,
                            const c10::optional<at::Tensor>& r_, double eps) {
  check_inputs(x_, w_);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::ScalarType st = x_.scalar_type();
  const at::ScalarType ct = st == at::kDouble ? at::kFloat : st;  // compute type of the kernel
  const at::Tensor x = x_.contiguous().to(ct), w = w_.contiguous().to(ct);
  at::Tensor b = opt(b_, w_, "bias");
  at::Tensor r = opt(r_, x_, "residual");
  if (b.defined()) b = b.to(ct);
  if (r.defined()) r = r.to(ct);
  const int64_t C = x.size(-1), rows = C ? x.numel() / C : 0;
  at::Tensor out = at::empty_like(x);
  at::Tensor h = r.defined() ? at::empty_like(x) : at::empty({0}, x_.options());
  auto stats = x.sizes().slice(0, x.dim() - 1).vec();
  auto sopt = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty(kRms ? std::vector<int64_t>{0} : stats, sopt);
  at::Tensor rstd = at::empty(stats, sopt);
  check_cuda(cuda::norm_fwd(dtype_code(ct), x.data_ptr(), r.defined() ? r.data_ptr() : nullptr, w.data_ptr(),
                            b.defined() ? b.data_ptr() : nullptr, out.data_ptr(),
                            r.defined() ? h.data_ptr() : nullptr, kRms ? nullptr : mean.data_ptr<float>(),
                            rstd.data_ptr<float>(), rows, C, static_cast<float>(eps), kRms,
                            at::cuda::getCurrentCUDAStream()));
  out = out.to(st);
  if (r.defined()) h = h.to(st);
  if (st == at::kDouble) {
    mean = mean.to(at::kDouble);
    rstd = rstd.to(at::kDouble);
  }
  if (kRms) return {out, h, rstd};
  return {out, h, mean, rstd};
}

template <bool kRms>
std::vector<at::Tensor> bwd(const at::Tensor& dy_, const c10::optional<at::Tensor>& dh_, const at::Tensor& h_,
                            const at::Tensor& w_, bool has_bias, const at::Tensor& mean_, const at::Tensor& rstd_) {
  check_inputs(h_, w_);
  TORCH_CHECK(dy_.sizes() == h_.sizes(), "norm backward: grad_out must have the shape of h");
  const c10::cuda::CUDAGuard guard(h_.device());
  const at::ScalarType st = h_.scalar_type();
  const at::ScalarType ct = st == at::kDouble ? at::kFloat : st;
  const at::Tensor h = h_.contiguous().to(ct), w = w_.contiguous().to(ct), dy = dy_.contiguous().to(ct);
  at::Tensor dh = opt(dh_, h_, "grad_h");
  if (dh.defined()) dh = dh.to(ct);
  const at::Tensor rstd = rstd_.contiguous().to(at::kFloat);
  const at::Tensor mean = kRms ? rstd : mean_.contiguous().to(at::kFloat);
  const int64_t C = h.size(-1), rows = C ? h.numel() / C : 0;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int nparts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, 4 * sms)));
  at::Tensor dx = at::empty_like(h);
  auto fopt = h.options().dtype(at::kFloat);
  at::Tensor dw_part = at::zeros({nparts, C}, fopt);
  at::Tensor db_part = has_bias ? at::zeros({nparts, C}, fopt) : at::Tensor();
  check_cuda(cuda::norm_bwd(dtype_code(ct), dy.data_ptr(), dh.defined() ? dh.data_ptr() : nullptr, h.data_ptr(),
                            w.data_ptr(), kRms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(),
                            dx.data_ptr(), dw_part.data_ptr<float>(),
                            has_bias ? db_part.data_ptr<float>() : nullptr, rows, C, nparts, kRms,
                            at::cuda::getCurrentCUDAStream()));
  at::Tensor dw = dw_part.sum(0).to(w_.scalar_type());
  at::Tensor db = has_bias ? db_part.sum(0).to(w_.scalar_type()) : at::empty({0}, w_.options());
  dx = dx.to(st);
  if (kRms) return {dx, dw};
  return {dx, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& w,
                                                                          const c10::optional<at::Tensor>& b,
                                                                          const c10::optional<at::Tensor>& r,
                                                                          double eps) {
  auto o = fwd<false>(x, w, b, r, eps);
  return {o[0], o[1], o[2], o[3]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy, const c10::optional<at::Tensor>& dh,
                                                              const at::Tensor& h, const at::Tensor& w,
                                                              const c10::optional<at::Tensor>& b,
                                                              const at::Tensor& mean, const at::Tensor& rstd) {
  auto o = bwd<false>(dy, dh, h, w, b.has_value() && b->defined(), mean, rstd);
  return {o[0], o[1], o[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& w,
                                                            const c10::optional<at::Tensor>& r, double eps) {
  auto o = fwd<true>(x, w, c10::nullopt, r, eps);
  return {o[0], o[1], o[2]};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& dy, const c10::optional<at::Tensor>& dh,
                                                const at::Tensor& h, const at::Tensor& w, const at::Tensor& rstd) {
  auto o = bwd<true>(dy, dh, h, w, false, at::Tensor(), rstd);
  return {o[0], o[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
}

}  // namespace fastlm
