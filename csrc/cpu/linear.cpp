// The linear layer of a decode step: out[M x N] = x[M x K] W_t[K x N] (+ bias) for a few rows
// (one per sequence being decoded), the weight stored transposed, (in, out), as the decoder
// keeps it. BLAS treats M = 1 as a matrix-vector product but pays for every further row
// (M = 8 costs 3-4x M = 1 here), although reading the weight, the same for any M, is what
// bounds the step. This kernel reads the weight once for all rows: threads take contiguous
// 64-column panels and run gemm.h's micro-kernel down the whole K, so a batch of M <= 16 rows
// costs about what one row does. float32; other dtypes and larger M go to at::addmm.
#include "common.h"
#include "gemm.h"

namespace fastlm {
namespace {

constexpr int64_t kMaxRows = 16;
constexpr int64_t kParallelBytes = int64_t(512) << 10;  // smaller weights: one thread

at::Tensor decode_linear(const at::Tensor& x_, const at::Tensor& w_t, const c10::optional<at::Tensor>& bias_) {
  FASTLM_CHECK_CPU(x_);
  FASTLM_CHECK_CPU(w_t);
  TORCH_CHECK(x_.dim() == 2 && w_t.dim() == 2 && x_.size(1) == w_t.size(0),
              "decode_linear: x (M, K) and weight_t (K, N) must agree on K, got ", x_.sizes(), " and ", w_t.sizes());
  TORCH_CHECK(x_.scalar_type() == w_t.scalar_type(), "decode_linear: x and weight_t must have one dtype");
  const int64_t M = x_.size(0), K = x_.size(1), N = w_t.size(1);
  if (bias_) {
    FASTLM_CHECK_CPU((*bias_));
    TORCH_CHECK(bias_->dim() == 1 && bias_->size(0) == N && bias_->scalar_type() == x_.scalar_type(),
                "decode_linear: bias must have shape (", N, ",) and the dtype of x");
  }
  if (x_.scalar_type() != at::kFloat || M > kMaxRows || w_t.stride(1) != 1 || K == 0)
    return bias_ ? at::addmm(*bias_, x_, w_t) : at::mm(x_, w_t);
  const at::Tensor x = x_.contiguous();
  const at::Tensor bias = bias_ ? bias_->contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const float* A = x.data_ptr<float>();
  const float* B = w_t.data_ptr<float>();
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* C = out.data_ptr<float>();
  const int64_t ldb = w_t.stride(0), panels = cdiv(N, 64);
  const int64_t grain = K * N * 4 < kParallelBytes ? panels : 1;
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    const int64_t n0 = p0 * 64, n1 = std::min(N, p1 * 64);
    for (int64_t r = 0; r < M; ++r)
      for (int64_t n = n0; n < n1; ++n) C[r * N + n] = b ? b[n] : 0.f;
    gemm(M, n1 - n0, K, A, K, B + n0, ldb, C + n0, N, true);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("decode_linear", &decode_linear); }

}  // namespace fastlm
