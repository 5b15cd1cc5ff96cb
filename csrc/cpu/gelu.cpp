// GELU, tanh approximation (GPT-2's "gelu_new"), elementwise:
//   y = 0.5 x (1 + tanh(u)) = x * sigmoid(2u),  u = sqrt(2/pi) (x + 0.044715 x^3)
//   dy/dx = s + 2 x s (1 - s) du/dx,  s = sigmoid(2u),  du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// The sigmoid form avoids the cancellation of 1 + tanh(u) for large negative x.
// Parallel over contiguous blocks; arithmetic in float32 for bf16/fp16 storage.
#include "common.h"

#include <cmath>

namespace fastlm {
namespace {

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kCoeff = 0.044715;

at::Tensor gelu_fwd(const at::Tensor& x_) {
  FASTLM_CHECK_CPU(x_);
  const at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastlm_gelu_fwd", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), 16384, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc v = static_cast<acc>(xp[i]);
        const acc u = acc(kSqrt2OverPi) * (v + acc(kCoeff) * v * v * v);
        yp[i] = static_cast<scalar_t>(v / (acc(1) + std::exp(acc(-2) * u)));
      }
    });
  });
  return y;
}

at::Tensor gelu_bwd(const at::Tensor& dy_, const at::Tensor& x_) {
  FASTLM_CHECK_CPU(x_);
  FASTLM_CHECK_CPU(dy_);
  TORCH_CHECK(dy_.sizes() == x_.sizes(), "gelu backward: grad_out must have the shape of x");
  const at::Tensor x = x_.contiguous(), dy = dy_.contiguous().to(x_.scalar_type());
  at::Tensor dx = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastlm_gelu_bwd", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), 16384, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc v = static_cast<acc>(xp[i]);
        const acc u = acc(kSqrt2OverPi) * (v + acc(kCoeff) * v * v * v);
        const acc s = acc(1) / (acc(1) + std::exp(acc(-2) * u));
        const acc du = acc(kSqrt2OverPi) * (acc(1) + acc(3 * kCoeff) * v * v);
        const acc d = s + acc(2) * v * s * (acc(1) - s) * du;
        dxp[i] = static_cast<scalar_t>(static_cast<acc>(dyp[i]) * d);
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("gelu_fwd", &gelu_fwd);
  m.impl("gelu_bwd", &gelu_bwd);
}

}  // namespace fastlm
