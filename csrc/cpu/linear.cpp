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

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("decode_linear", &decode_linear); }

}  // namespace fastlm
