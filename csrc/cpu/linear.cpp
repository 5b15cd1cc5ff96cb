// The linear layers of generation on the CPU, the torch side: checks and the output, then
// the kernel core of the SIMD level in use (csrc/cpu/kernels/linear.h: the packed-panel
// layout and its passes).
#include "common.h"

namespace fastlm {
namespace {

constexpr int64_t kPanel = kDecodePanel;

at::Tensor decode_linear(const at::Tensor& x_, const at::Tensor& wp, const c10::optional<at::Tensor>& bias_,
                         int64_t n) {
  FASTLM_CHECK_CPU(x_);
  FASTLM_CHECK_CPU(wp);
  TORCH_CHECK(x_.dim() == 2 && wp.dim() == 3 && wp.size(2) == kPanel && x_.size(1) == wp.size(1),
              "decode_linear: x must be (M, K) and weight_p (ceil(N / 48), K, 48), got ", x_.sizes(), " and ",
              wp.sizes());
  TORCH_CHECK(n >= 0 && cdiv(n, kPanel) == wp.size(0), "decode_linear: n = ", n, " does not match the ",
              wp.size(0), " panels of weight_p");
  TORCH_CHECK(x_.scalar_type() == at::kFloat && wp.scalar_type() == at::kFloat,
              "decode_linear: the CPU kernel takes float32");
  if (bias_) {
    FASTLM_CHECK_CPU((*bias_));
    TORCH_CHECK(bias_->dim() == 1 && bias_->size(0) == n && bias_->scalar_type() == at::kFloat,
                "decode_linear: bias must be float32 of shape (", n, ",)");
  }
  const int64_t M = x_.size(0), K = x_.size(1), N = n;
  const at::Tensor x = x_.contiguous(), w = wp.contiguous();
  const at::Tensor bias = bias_ ? bias_->contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  cpu_kernels().decode_linear(LinearArgs{x.data_ptr<float>(), w.data_ptr<float>(),
                                         bias.defined() ? bias.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                                         M, K, N});
  return out;
}

at::Tensor decode_linear_q(const at::Tensor& x_, const at::Tensor& wq, const c10::optional<at::Tensor>& bias_,
                           int64_t n, c10::string_view format) {
  FASTLM_CHECK_CPU(x_);
  FASTLM_CHECK_CPU(wq);
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat, "decode_linear_q: x must be float32 (M, K), got ",
              x_.scalar_type(), " ", x_.sizes());
  const int64_t M = x_.size(0), K = x_.size(1), P = cdiv(n, kPanel);
  TORCH_CHECK(n >= 0, "decode_linear_q: n must be >= 0, got ", n);
  WeightFormat f;
  if (format == "q8_0" || format == "q4_0") {
    f = format == "q8_0" ? WeightFormat::q8_0 : WeightFormat::q4_0;
    const int64_t bb = f == WeightFormat::q8_0 ? kQ8BlockBytes : kQ4BlockBytes;
    TORCH_CHECK(wq.scalar_type() == at::kByte && wq.dim() == 3 && wq.size(0) == P &&
                    wq.size(1) == cdiv(K, kQuantBlock) && wq.size(2) == bb,
                "decode_linear_q: a ", format, " weight for n = ", n, ", K = ", K, " must be uint8 of shape (", P,
                ", ", cdiv(K, kQuantBlock), ", ", bb, "), got ", wq.scalar_type(), " ", wq.sizes());
  } else if (format == "bf16" || format == "f16") {
    f = format == "bf16" ? WeightFormat::bf16 : WeightFormat::f16;
    const auto want = f == WeightFormat::bf16 ? at::kBFloat16 : at::kHalf;
    TORCH_CHECK(wq.scalar_type() == want && wq.dim() == 3 && wq.size(0) == P && wq.size(1) == K &&
                    wq.size(2) == kPanel,
                "decode_linear_q: a ", format, " weight for n = ", n, ", K = ", K, " must be ", want, " of shape (",
                P, ", ", K, ", ", kPanel, "), got ", wq.scalar_type(), " ", wq.sizes());
  } else {
    TORCH_CHECK(false, "decode_linear_q: format must be 'bf16', 'f16', 'q8_0' or 'q4_0', got '", format, "'");
  }
  if (bias_) {
    FASTLM_CHECK_CPU((*bias_));
    TORCH_CHECK(bias_->dim() == 1 && bias_->size(0) == n && bias_->scalar_type() == at::kFloat,
                "decode_linear_q: bias must be float32 of shape (", n, ",)");
  }
  const at::Tensor x = x_.contiguous(), w = wq.contiguous();
  const at::Tensor bias = bias_ ? bias_->contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, n}, x.options());
  if (M == 0 || n == 0) return out;
  cpu_kernels().decode_linear_q(LinearQArgs{f, x.data_ptr<float>(), w.data_ptr(),
                                            bias.defined() ? bias.data_ptr<float>() : nullptr, out.data_ptr<float>(),
                                            M, K, n});
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("decode_linear", &decode_linear);
  m.impl("decode_linear_q", &decode_linear_q);
}

}  // namespace fastlm
