// The optimizer step on the CPU, the torch side: checks, then the kernel core of the SIMD
// level in use (csrc/cpu/kernels/optim.h: the formulas).
#include <vector>

#include "common.h"

namespace fastlm {
namespace {

void check_f32(const at::Tensor& t, const char* what, int64_t i) {
  TORCH_CHECK(t.device().is_cpu(), what, "[", i, "] must be a CPU tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, what, "[", i, "] must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), what, "[", i, "] must be contiguous");
}

double sum_squares(at::TensorList xs) {
  std::vector<const float*> ptrs;
  std::vector<int64_t> sizes;
  for (size_t i = 0; i < xs.size(); ++i) {
    check_f32(xs[i], "xs", int64_t(i));
    ptrs.push_back(xs[i].data_ptr<float>());
    sizes.push_back(xs[i].numel());
  }
  return cpu_kernels().sum_squares(SumSquaresArgs{ptrs.data(), sizes.data(), int64_t(ptrs.size())});
}

void adamw_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 at::ArrayRef<double> steps, double lr, double beta1, double beta2, double eps, double weight_decay,
                 double grad_scale) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "adamw_step_: params, grads, exp_avgs, exp_avg_sqs and steps must have one length, got ", n, ", ",
              grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size());
  TORCH_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "adamw_step_: betas must be in [0, 1), got (",
              beta1, ", ", beta2, ")");
  std::vector<float*> p(n), m(n), v(n);
  std::vector<const float*> g(n);
  std::vector<int64_t> sizes(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t ii = int64_t(i);
    check_f32(params[i], "params", ii);
    check_f32(grads[i], "grads", ii);
    check_f32(exp_avgs[i], "exp_avgs", ii);
    check_f32(exp_avg_sqs[i], "exp_avg_sqs", ii);
    const auto sz = params[i].sizes();
    TORCH_CHECK(grads[i].sizes() == sz && exp_avgs[i].sizes() == sz && exp_avg_sqs[i].sizes() == sz,
                "adamw_step_: tensor ", i, ": the gradient and the moments must have the parameter's shape ", sz);
    TORCH_CHECK(steps[i] >= 1, "adamw_step_: steps[", i, "] must be at least 1, got ", steps[i]);
    p[i] = params[i].data_ptr<float>();
    g[i] = grads[i].data_ptr<float>();
    m[i] = exp_avgs[i].data_ptr<float>();
    v[i] = exp_avg_sqs[i].data_ptr<float>();
    sizes[i] = params[i].numel();
  }
  cpu_kernels().adamw(AdamWArgs{p.data(), g.data(), m.data(), v.data(), sizes.data(), steps.data(), int64_t(n), lr,
                                beta1, beta2, eps, weight_decay, grad_scale});
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("sum_squares", &sum_squares);
  m.impl("adamw_step_", &adamw_step_);
}

}  // namespace fastlm
