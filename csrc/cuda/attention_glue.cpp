// Torch glue of the CUDA attention kernels (csrc/cuda/attention.cu): checks, allocation,
// the current stream, the combination of decode's cache slices, and the registration of
// fastlm::attention_fwd / attention_bwd / decode_attention for CUDA tensors.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cuda/attention.cuh"

namespace fastlm {
namespace {

using cuda::AttnDtype;
using cuda::Strides4;

#define FASTLM_CUDA_OK(expr)                                                                  \
  do {                                                                                        \
    const cudaError_t err_ = (expr);                                                          \
    TORCH_CHECK(err_ == cudaSuccess, "fastlm CUDA attention: ", cudaGetErrorString(err_));    \
  } while (0)

AttnDtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return AttnDtype::kFloat32;
    case at::kHalf: return AttnDtype::kFloat16;
    case at::kBFloat16: return AttnDtype::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "attention: the CUDA kernel takes float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return AttnDtype::kFloat32;
}

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK_VALUE(q.is_cuda() && k.is_cuda() && v.is_cuda(), op, ": q, k, v must be CUDA tensors");
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), op, ": q, k, v must be on one device");
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-d (B, H, T, D)");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have one shape");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, ": q and k must agree on B and D");
  TORCH_CHECK_VALUE(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op, ": H must be a multiple of Hkv");
  TORCH_CHECK_VALUE(q.size(3) >= 1 && q.size(3) <= 256, op, ": head size must be in [1, 256]");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": q, k, v must have one dtype");
  dtype_of(q);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 bool causal, double scale) {
  check_inputs(q, k, v, "attention_fwd");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1), Tk = k.size(2);
  at::Tensor out = at::empty({B, H, Tq, D}, q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  FASTLM_CUDA_OK(cuda::attention_fwd(dtype_of(q), q.data_ptr(), strides_of(q), k.data_ptr(), strides_of(k),
                                     v.data_ptr(), strides_of(v), out.data_ptr(), lse.data_ptr<float>(), nullptr,
                                     (int)B, (int)H, (int)Hkv, (int)Tq, (int)Tk, (int)D, causal, (float)scale, 1,
                                     c10::cuda::getCurrentCUDAStream().stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse_,
                                                             bool causal, double scale) {
  check_inputs(q, k, v, "attention_bwd");
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "attention_bwd: grad_out and out must have the shape of q");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1), Tk = k.size(2);
  const at::Tensor g = dout.to(q.scalar_type());
  const at::Tensor lse = lse_.to(at::kFloat).contiguous();
  const at::Tensor delta = (g.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty({B, H, Tq, D}, f32);
  at::Tensor dk = at::empty({B, H, Tk, D}, f32);
  at::Tensor dv = at::empty({B, H, Tk, D}, f32);
  FASTLM_CUDA_OK(cuda::attention_bwd(dtype_of(q), q.data_ptr(), strides_of(q), k.data_ptr(), strides_of(k),
                                     v.data_ptr(), strides_of(v), g.data_ptr(), strides_of(g), lse.data_ptr<float>(),
                                     delta.data_ptr<float>(), dq.data_ptr<float>(), dk.data_ptr<float>(),
                                     dv.data_ptr<float>(), (int)B, (int)H, (int)Hkv, (int)Tq, (int)Tk, (int)D,
                                     causal, (float)scale, c10::cuda::getCurrentCUDAStream().stream()));
  if (H != Hkv) {
    dk = dk.view({B, Hkv, H / Hkv, Tk, D}).sum(2);
    dv = dv.view({B, Hkv, H / Hkv, Tk, D}).sum(2);
  }
  const auto st = q.scalar_type();
  return {dq.to(st), dk.to(st), dv.to(st)};
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& lens_,
                            double scale) {
  check_inputs(q, kc, vc, "decode_attention");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = kc.size(1), L = kc.size(2);
  TORCH_CHECK_VALUE(lens_.dim() == 1 && lens_.size(0) == B && lens_.device() == q.device(),
                    "decode_attention: cache_lens must have shape (B,) on the device of q");
  TORCH_CHECK_VALUE(lens_.scalar_type() == at::kInt || lens_.scalar_type() == at::kLong,
                    "decode_attention: cache_lens must be int32 or int64");
  const c10::cuda::CUDAGuard guard(q.device());
  if (B > 0) {
    const int64_t lo = lens_.min().item<int64_t>(), hi = lens_.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi <= L, "decode_attention: cache_lens must lie in [0, L_max = ", L, "], got [", lo,
                      ", ", hi, "]");
  }
  const at::Tensor lens = lens_.to(at::kInt).contiguous();
  const int64_t nsplit = std::max<int64_t>(1, std::min<int64_t>(16, L / 256));
  auto part_dtype = nsplit == 1 ? q.scalar_type() : at::kFloat;
  at::Tensor part = at::empty({nsplit, B, H, Tq, D}, q.options().dtype(part_dtype));
  at::Tensor lse = at::empty({nsplit, B, H, Tq}, q.options().dtype(at::kFloat));
  FASTLM_CUDA_OK(cuda::attention_fwd(dtype_of(q), q.data_ptr(), strides_of(q), kc.data_ptr(), strides_of(kc),
                                     vc.data_ptr(), strides_of(vc), part.data_ptr(), lse.data_ptr<float>(),
                                     lens.data_ptr<int32_t>(), (int)B, (int)H, (int)Hkv, (int)Tq, (int)L, (int)D,
                                     true, (float)scale, (int)nsplit, c10::cuda::getCurrentCUDAStream().stream()));
  if (nsplit == 1) return part[0];
  // Combine the slices by their logsumexps; an empty slice (lse = +inf) weighs 0.
  const at::Tensor l = at::where(at::isinf(lse) & (lse > 0), at::full_like(lse, -std::numeric_limits<float>::infinity()), lse);
  const at::Tensor m = std::get<0>(l.max(0, /*keepdim=*/true));
  const at::Tensor w = at::exp(l - at::where(at::isinf(m), at::zeros_like(m), m));
  const at::Tensor total = w.sum(0);
  const at::Tensor o = (w.unsqueeze(-1) * part).sum(0) / at::where(total > 0, total, at::ones_like(total)).unsqueeze(-1);
  return o.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("decode_attention", &decode_attention);
}

}  // namespace fastlm
