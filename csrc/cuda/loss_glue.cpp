// Torch glue for the CUDA fused linear + cross-entropy: the same chunked algorithm as
// csrc/cpu/loss.cpp (logits per chunk with cuBLAS into one reused buffer, the fused row
// step of csrc/cuda/loss.cu in place, then dh = Z W and dW += Z^T h), computed in float32.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "cuda/loss.cuh"

namespace fastlm {
namespace {

constexpr int64_t kChunkBytes = int64_t(256) << 20;

void check_cuda(cudaError_t e) { TORCH_CHECK(e == cudaSuccess, "fastlm CUDA linear_cross_entropy: ", cudaGetErrorString(e)); }

struct Prepared {
  at::Tensor h, w, t;
  int64_t N, C, V, chunk;
};

Prepared prepare(const at::Tensor& h, const at::Tensor& w, const at::Tensor& t, int64_t ignore_index,
                 int64_t chunk_size) {
  TORCH_CHECK(h.is_cuda() && w.is_cuda() && t.is_cuda(), "linear_cross_entropy: h, weight, targets must be CUDA tensors");
  TORCH_CHECK(h.dim() == 2 && w.dim() == 2 && w.size(1) == h.size(1), "linear_cross_entropy: h (N, C), weight (V, C)");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == h.size(0), "linear_cross_entropy: targets must have shape (N,)");
  TORCH_CHECK(w.scalar_type() == h.scalar_type(), "linear_cross_entropy: weight dtype must match h");
  TORCH_CHECK(w.size(0) >= 1, "linear_cross_entropy: the vocabulary must not be empty");
  Prepared p;
  p.h = h.to(at::kFloat).contiguous();
  p.w = w.to(at::kFloat).contiguous();
  p.t = t.to(at::kLong).contiguous();
  p.N = p.h.size(0);
  p.C = p.h.size(1);
  p.V = p.w.size(0);
  const auto bad = ((p.t != ignore_index) & ((p.t < 0) | (p.t >= p.V))).any().item<bool>();
  TORCH_CHECK(!bad, "linear_cross_entropy: a target is out of range [0, ", p.V, ") and is not ignore_index");
  int64_t r = chunk_size > 0 ? chunk_size : kChunkBytes / (p.V * 4);
  p.chunk = std::max<int64_t>(1, std::min<int64_t>(r, std::max<int64_t>(p.N, 1)));
  return p;
}

void run_chunks(const Prepared& p, int64_t ignore_index, bool grad, double scale, const at::Tensor& row_scale,
                at::Tensor& loss_rows, at::Tensor& dh, at::Tensor& dw) {
  at::Tensor buf = at::empty({p.chunk, p.V}, p.h.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  bool first = true;
  for (int64_t r0 = 0; r0 < p.N; r0 += p.chunk) {
    const int64_t R = std::min(p.chunk, p.N - r0);
    at::Tensor z = buf.narrow(0, 0, R);
    at::Tensor hc = p.h.narrow(0, r0, R);
    at::mm_out(z, hc, p.w.t());
    check_cuda(cuda::cross_entropy_rows(z.data_ptr<float>(), p.t.data_ptr<int64_t>() + r0,
                                        loss_rows.data_ptr<float>() + r0,
                                        row_scale.defined() ? row_scale.data_ptr<float>() + r0 : nullptr, R, p.V,
                                        z.stride(0), ignore_index, static_cast<float>(scale), grad, stream));
    if (!grad) continue;
    at::Tensor dhc = dh.narrow(0, r0, R);
    at::mm_out(dhc, z, p.w);
    if (first) {
      at::mm_out(dw, z.t(), hc);
      first = false;
    } else {
      dw.addmm_(z.t(), hc);
    }
  }
  if (grad && first) dw.zero_();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd(const at::Tensor& h, const at::Tensor& w,
                                                                        const at::Tensor& t, int64_t ignore_index,
                                                                        c10::string_view reduction, int64_t chunk_size,
                                                                        bool compute_grad) {
  const std::string red(reduction);
  TORCH_CHECK(red == "mean" || red == "sum" || red == "none", "linear_cross_entropy: bad reduction '", red, "'");
  const c10::cuda::CUDAGuard guard(h.device());
  Prepared p = prepare(h, w, t, ignore_index, chunk_size);
  const bool grad = compute_grad && red != "none";
  const at::Tensor n_valid = (p.t != ignore_index).sum();
  const double scale = red == "mean" ? 1.0 / static_cast<double>(std::max<int64_t>(1, n_valid.item<int64_t>())) : 1.0;
  at::Tensor loss_rows = at::empty({p.N}, p.h.options());
  at::Tensor dh = grad ? at::empty({p.N, p.C}, p.h.options()) : at::empty({0}, h.options());
  at::Tensor dw = grad ? at::empty({p.V, p.C}, p.h.options()) : at::empty({0}, w.options());
  run_chunks(p, ignore_index, grad, scale, at::Tensor(), loss_rows, dh, dw);
  at::Tensor loss = red == "none" ? loss_rows : loss_rows.sum();
  if (red == "mean") loss = loss / n_valid;
  if (grad) {
    dh = dh.to(h.scalar_type());
    dw = dw.to(w.scalar_type());
  }
  return {loss, dh, dw};
}

std::tuple<at::Tensor, at::Tensor> linear_cross_entropy_bwd(const at::Tensor& grad_loss, const at::Tensor& h,
                                                            const at::Tensor& w, const at::Tensor& t,
                                                            int64_t ignore_index, int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(h.device());
  Prepared p = prepare(h, w, t, ignore_index, chunk_size);
  TORCH_CHECK(grad_loss.numel() == p.N, "linear_cross_entropy backward: grad_output must have N elements");
  const at::Tensor rs = grad_loss.reshape({p.N}).to(at::kFloat).contiguous();
  at::Tensor loss_rows = at::empty({p.N}, p.h.options());
  at::Tensor dh = at::empty({p.N, p.C}, p.h.options());
  at::Tensor dw = at::empty({p.V, p.C}, p.h.options());
  run_chunks(p, ignore_index, true, 1.0, rs, loss_rows, dh, dw);
  return {dh.to(h.scalar_type()), dw.to(w.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd);
  m.impl("linear_cross_entropy_bwd", &linear_cross_entropy_bwd);
}

}  // namespace fastlm
