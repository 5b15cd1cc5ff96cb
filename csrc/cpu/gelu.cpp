// GELU (tanh approximation) on the CPU, the torch side: checks and outputs, then the kernel
// core of the SIMD level in use (csrc/cpu/kernels/gelu.h: the formulas).
#include "common.h"

namespace fastlm {
namespace {

at::Tensor gelu_fwd(const at::Tensor& x_) {
  FASTLM_CHECK_CPU(x_);
  const at::Tensor x = x_.contiguous();
  at::Tensor y = empty_output(x.sizes(), x.scalar_type());
  cpu_kernels().gelu(GeluArgs{kernel_dtype(x.scalar_type()), x.data_ptr(), nullptr, y.data_ptr(), x.numel()});
  return y;
}

at::Tensor gelu_bwd(const at::Tensor& dy_, const at::Tensor& x_) {
  FASTLM_CHECK_CPU(x_);
  FASTLM_CHECK_CPU(dy_);
  TORCH_CHECK(dy_.sizes() == x_.sizes(), "gelu backward: grad_out must have the shape of x");
  const at::Tensor x = x_.contiguous(), dy = dy_.contiguous().to(x_.scalar_type());
  at::Tensor dx = empty_output(x.sizes(), x.scalar_type());
  cpu_kernels().gelu(GeluArgs{kernel_dtype(x.scalar_type()), x.data_ptr(), dy.data_ptr(), dx.data_ptr(), x.numel()});
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("gelu_fwd", &gelu_fwd);
  m.impl("gelu_bwd", &gelu_bwd);
}

}  // namespace fastlm
