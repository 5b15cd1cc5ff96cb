// GELU, tanh approximation (GPT-2's "gelu_new"), elementwise:
//   y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
//   dy/dx = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// With s = sigmoid(2u) = 0.5 (1 + tanh(u)) these are y = x s and
//   dy/dx = s + 2 x s (1 - s) du/dx,  1 - s = s exp(-2u),
// which the AVX-512 path evaluates with one vector exp per element (16 lanes at a time).
// Parallel over contiguous blocks; arithmetic in float32 for bf16/fp16 storage.
#include "common.h"
#include "simd.h"

#include <cmath>
#include <type_traits>

namespace fastlm {
namespace {

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kCoeff = 0.044715;

#ifdef FASTLM_AVX512
template <typename T>
void gelu_fwd_avx512(const T* x, T* y, int64_t n) {
  using namespace simd;
  const __m512 k0 = _mm512_set1_ps(float(-2 * kSqrt2OverPi)), k1 = _mm512_set1_ps(float(kCoeff));
  const __m512 one = _mm512_set1_ps(1.0f);
  auto f = [&](__m512 v) {
    __m512 u2 = _mm512_mul_ps(_mm512_mul_ps(k0, v), _mm512_fmadd_ps(_mm512_mul_ps(k1, v), v, one));  // -2u
    return _mm512_div_ps(v, _mm512_add_ps(one, simd::exp(u2)));
  };
  at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) {
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) store(y + i, f(load(x + i)));
    if (i < e) {
      const __mmask16 m = tail_mask(e - i);
      store(y + i, f(load(x + i, m)), m);
    }
  });
}

template <typename T>
void gelu_bwd_avx512(const T* dy, const T* x, T* dx, int64_t n) {
  using namespace simd;
  const __m512 k0 = _mm512_set1_ps(float(-2 * kSqrt2OverPi)), k1 = _mm512_set1_ps(float(kCoeff));
  const __m512 k3 = _mm512_set1_ps(float(3 * kCoeff)), kd = _mm512_set1_ps(float(2 * kSqrt2OverPi));
  const __m512 one = _mm512_set1_ps(1.0f);
  auto f = [&](__m512 g, __m512 v) {
    const __m512 v2 = _mm512_mul_ps(v, v);
    const __m512 e = simd::exp(_mm512_mul_ps(_mm512_mul_ps(k0, v), _mm512_fmadd_ps(k1, v2, one)));  // exp(-2u)
    const __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, e));
    const __m512 du2 = _mm512_mul_ps(kd, _mm512_fmadd_ps(k3, v2, one));  // 2 du/dx
    const __m512 d = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(v, s), _mm512_mul_ps(s, e)), du2, s);
    return _mm512_mul_ps(g, d);
  };
  at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) {
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) store(dx + i, f(load(dy + i), load(x + i)));
    if (i < e) {
      const __mmask16 m = tail_mask(e - i);
      store(dx + i, f(load(dy + i, m), load(x + i, m)), m);
    }
  });
}
#endif

at::Tensor gelu_fwd(const at::Tensor& x_) {
  FASTLM_CHECK_CPU(x_);
  const at::Tensor x = x_.contiguous();
  at::Tensor y = empty_output(x.sizes(), x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastlm_gelu_fwd", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
#ifdef FASTLM_AVX512
    if constexpr (!std::is_same_v<scalar_t, double>) {
      gelu_fwd_avx512(xp, yp, x.numel());
      return;
    }
#endif
    at::parallel_for(0, x.numel(), 16384, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc v = static_cast<acc>(xp[i]);
        const acc u = acc(kSqrt2OverPi) * (v + acc(kCoeff) * v * v * v);
        yp[i] = static_cast<scalar_t>(acc(0.5) * v * (acc(1) + std::tanh(u)));
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
  at::Tensor dx = empty_output(x.sizes(), x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastlm_gelu_bwd", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
#ifdef FASTLM_AVX512
    if constexpr (!std::is_same_v<scalar_t, double>) {
      gelu_bwd_avx512(dyp, xp, dxp, x.numel());
      return;
    }
#endif
    at::parallel_for(0, x.numel(), 16384, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc v = static_cast<acc>(xp[i]);
        const acc t = std::tanh(acc(kSqrt2OverPi) * (v + acc(kCoeff) * v * v * v));
        const acc du = acc(kSqrt2OverPi) * (acc(1) + acc(3 * kCoeff) * v * v);
        const acc d = acc(0.5) * (acc(1) + t) + acc(0.5) * v * (acc(1) - t * t) * du;
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
