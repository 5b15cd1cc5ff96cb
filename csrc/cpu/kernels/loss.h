// The per-row part of the fused linear + cross-entropy (csrc/cpu/loss.cpp computes the
// chunk's logits and gradient products with the BLAS): for each row z of a chunk of logits,
// in place, in parallel over rows (the row sits in L2):
//   m = max z, e_j = exp(z_j - m) (stored back), s = sum e_j, loss = m + log s - z_t, and,
//   when gradients are wanted, z_j <- scale * e_j / s, minus scale at j = t
//   (= scale * (softmax - onehot)); a row whose target is ignore_index gets loss 0 and a
//   zero gradient row. float32 rows take the vector path, float64 rows a scalar one.
#pragma once

namespace loss {

inline float row_f32(float* z, int64_t V, int64_t t, bool grad, float scale) {
  using namespace simd;
  const int64_t Vv = V / W * W, nt = V - Vv;
  vf vmax = set1(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j < Vv; j += W) vmax = max(vmax, load(z + j));
  if (nt) vmax = max(vmax, first_n(nt, load(z + j, nt), set1(-std::numeric_limits<float>::infinity())));
  const float m = reduce_max(vmax);
  const float zt = z[t];
  const vf vm = set1(m);
  vf s0 = zero(), s1 = zero();
  for (j = 0; j + 2 * W <= Vv; j += 2 * W) {
    const vf e0 = exp(sub(load(z + j), vm)), e1 = exp(sub(load(z + j + W), vm));
    s0 = add(s0, e0);
    s1 = add(s1, e1);
    if (grad) {
      store(z + j, e0);
      store(z + j + W, e1);
    }
  }
  for (; j < Vv; j += W) {
    const vf e0 = exp(sub(load(z + j), vm));
    s0 = add(s0, e0);
    if (grad) store(z + j, e0);
  }
  if (nt) {
    const vf e0 = first_n(nt, exp(sub(load(z + j, nt), vm)), zero());
    s0 = add(s0, e0);
    if (grad) store(z + j, e0, nt);
  }
  const float s = reduce_add(add(s0, s1));
  if (grad) {
    const vf k = set1(scale / s);
    for (j = 0; j < Vv; j += W) store(z + j, mul(load(z + j), k));
    if (nt) store(z + j, mul(load(z + j, nt), k), nt);
    z[t] -= scale;
  }
  return m + std::log(s) - zt;
}

inline double row_f64(double* z, int64_t V, int64_t t, bool grad, double scale) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < V; ++j) m = std::max(m, z[j]);
  const double zt = z[t];
  double s = 0;
  for (int64_t j = 0; j < V; ++j) {
    const double e = std::exp(z[j] - m);
    s += e;
    if (grad) z[j] = e;
  }
  if (grad) {
    const double k = scale / s;
    for (int64_t j = 0; j < V; ++j) z[j] *= k;
    z[t] -= scale;
  }
  return m + std::log(s) - zt;
}

template <typename T>
void rows(const LossRowsArgs& a) {
  T* z = static_cast<T*>(a.z);
  T* lp = static_cast<T*>(a.loss);
  const T* rs = static_cast<const T*>(a.row_scale);
  parallel_for(0, a.R, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t t = a.targets[i];
      T* zr = z + i * a.V;
      if (t == a.ignore_index) {
        lp[i] = 0;
        if (a.grad) std::fill(zr, zr + a.V, T(0));
        continue;
      }
      const T sc = rs ? rs[i] : static_cast<T>(a.scale);
      if constexpr (std::is_same_v<T, float>) lp[i] = row_f32(zr, a.V, t, a.grad, sc);
      else lp[i] = row_f64(zr, a.V, t, a.grad, sc);
    }
  });
}

void run(const LossRowsArgs& a) {
  if (a.dtype == Dtype::f64) rows<double>(a);
  else rows<float>(a);
}

}  // namespace loss
