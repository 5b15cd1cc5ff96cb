// GELU, tanh approximation (GPT-2's "gelu_new"), elementwise:
//   y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
//   dy/dx = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
// With s = sigmoid(2u) = 0.5 (1 + tanh(u)) these are y = x s and
//   dy/dx = s + 2 x s (1 - s) du/dx,  1 - s = s exp(-2u),
// which the vector path evaluates with one vector exp per element. Parallel over contiguous
// blocks; float32 arithmetic for float32/bf16/fp16 storage, float64 scalar for float64.
#pragma once

namespace gelu {

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kCoeff = 0.044715;
constexpr int64_t kGrain = 16384;

// Applies f to [b, e): a head of ordinary stores up to the vector-aligned point of `out`
// when streaming (nt), then whole vectors, then the tail.
template <typename T, typename Body, typename Tail>
inline void blocks(T* out, int64_t b, int64_t e, bool nt, const Body& body, const Tail& tail) {
  using simd::W;
  int64_t i = b;
  if (nt) {
    const int64_t mis = (reinterpret_cast<uintptr_t>(out + i) / sizeof(T)) % W;
    const int64_t head = std::min<int64_t>(e - i, mis ? W - mis : 0);
    if (head) tail(i, head);
    i += head;
  }
  for (; i + W <= e; i += W) body(i);
  if (i < e) tail(i, e - i);
  if (nt) simd::stream_fence();
}

template <typename T>
void fwd_vec(const T* x, T* y, int64_t n) {
  using namespace simd;
  const vf k0 = set1(float(-2 * kSqrt2OverPi)), k1 = set1(float(kCoeff)), one = set1(1.0f);
  auto f = [&](vf v) {
    const vf u2 = mul(mul(k0, v), fma(mul(k1, v), v, one));  // -2u
    return div(v, add(one, exp(u2)));
  };
  const bool nt = n * int64_t(sizeof(T)) > stream_threshold_bytes();
  parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    blocks(y, b, e, nt, [&](int64_t i) { put(y + i, f(load(x + i)), nt); },
           [&](int64_t i, int64_t m) { store(y + i, f(load(x + i, m)), m); });
  });
}

template <typename T>
void bwd_vec(const T* dy, const T* x, T* dx, int64_t n) {
  using namespace simd;
  const vf k0 = set1(float(-2 * kSqrt2OverPi)), k1 = set1(float(kCoeff));
  const vf k3 = set1(float(3 * kCoeff)), kd = set1(float(2 * kSqrt2OverPi)), one = set1(1.0f);
  auto f = [&](vf g, vf v) {
    const vf v2 = mul(v, v);
    const vf e = exp(mul(mul(k0, v), fma(k1, v2, one)));  // exp(-2u)
    const vf s = div(one, add(one, e));
    const vf du2 = mul(kd, fma(k3, v2, one));  // 2 du/dx
    return mul(g, fma(mul(mul(v, s), mul(s, e)), du2, s));
  };
  const bool nt = n * int64_t(sizeof(T)) > stream_threshold_bytes();
  parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    blocks(dx, b, e, nt, [&](int64_t i) { put(dx + i, f(load(dy + i), load(x + i)), nt); },
           [&](int64_t i, int64_t m) { store(dx + i, f(load(dy + i, m), load(x + i, m)), m); });
  });
}

inline void fwd_f64(const double* x, double* y, int64_t n) {
  parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const double v = x[i];
      y[i] = 0.5 * v * (1.0 + std::tanh(kSqrt2OverPi * (v + kCoeff * v * v * v)));
    }
  });
}

inline void bwd_f64(const double* dy, const double* x, double* dx, int64_t n) {
  parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const double v = x[i];
      const double t = std::tanh(kSqrt2OverPi * (v + kCoeff * v * v * v));
      const double du = kSqrt2OverPi * (1.0 + 3 * kCoeff * v * v);
      dx[i] = dy[i] * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * du);
    }
  });
}

template <typename T>
void run_vec(const GeluArgs& a) {
  if (a.dy) bwd_vec(static_cast<const T*>(a.dy), static_cast<const T*>(a.x), static_cast<T*>(a.out), a.n);
  else fwd_vec(static_cast<const T*>(a.x), static_cast<T*>(a.out), a.n);
}

void run(const GeluArgs& a) {
  switch (a.dtype) {
    case Dtype::f32: return run_vec<float>(a);
    case Dtype::bf16: return run_vec<bf16>(a);
    case Dtype::f16: return run_vec<f16>(a);
    case Dtype::f64:
      if (a.dy) bwd_f64(static_cast<const double*>(a.dy), static_cast<const double*>(a.x), static_cast<double*>(a.out), a.n);
      else fwd_f64(static_cast<const double*>(a.x), static_cast<double*>(a.out), a.n);
      return;
  }
}

}  // namespace gelu
