// The optimizer step over a list of float32 tensors, as one parallel pass each: the sum of
// squares of the gradients (for clipping by the global norm) and AdamW. Both split the
// tensors into chunks of kChunk elements and hand the chunks to the threads, so many small
// tensors (biases, gains) cost one parallel region, not one each.
#pragma once

namespace optim {

constexpr int64_t kChunk = 16384;  // elements per work item: 64 KiB of each stream

struct Chunk {
  int64_t t, begin, end;  // tensor t, elements [begin, end)
};

inline std::vector<Chunk> chunks(const int64_t* sizes, int64_t n) {
  std::vector<Chunk> out;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t b = 0; b < sizes[t]; b += kChunk) out.push_back({t, b, std::min(sizes[t], b + kChunk)});
  return out;
}

// Threads for a pass over `elements` elements of a few streams: one below ~64K elements,
// where a parallel region costs more than it saves.
inline int64_t grain_for(int64_t elements, int64_t nchunks) {
  return elements < 4 * kChunk ? std::max<int64_t>(nchunks, 1) : 1;
}

// sum of x[0:n]^2: float lanes within a chunk (four accumulators), double across chunks.
inline double sum_sq(const float* x, int64_t n) {
  using namespace simd;
  vf a0 = zero(), a1 = zero(), a2 = zero(), a3 = zero();
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    const vf x0 = load(x + j), x1 = load(x + j + W), x2 = load(x + j + 2 * W), x3 = load(x + j + 3 * W);
    a0 = fma(x0, x0, a0);
    a1 = fma(x1, x1, a1);
    a2 = fma(x2, x2, a2);
    a3 = fma(x3, x3, a3);
  }
  for (; j + W <= n; j += W) {
    const vf x0 = load(x + j);
    a0 = fma(x0, x0, a0);
  }
  if (j < n) {
    const vf x0 = load(x + j, n - j);
    a1 = fma(x0, x0, a1);
  }
  return double(reduce_add(add(add(a0, a1), add(a2, a3))));
}

inline double sum_squares(const SumSquaresArgs& a) {
  const std::vector<Chunk> cs = chunks(a.sizes, a.n);
  const int64_t nc = int64_t(cs.size());
  std::vector<double> part(nc, 0.0);
  int64_t total = 0;
  for (int64_t t = 0; t < a.n; ++t) total += a.sizes[t];
  parallel_for(0, nc, grain_for(total, nc), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) part[i] = sum_sq(a.x[cs[i].t] + cs[i].begin, cs[i].end - cs[i].begin);
  });
  double s = 0.0;
  for (double v : part) s += v;  // in chunk order: the same sum whatever the thread count
  return s;
}

// One AdamW step over elements [0, n) of one tensor (see AdamWArgs).
inline void adamw_range(float* p, const float* g, float* m, float* v, int64_t n, float gs, float decay, float b1c,
                        float b2, float b2c, float step_size, float inv_bc2_sqrt, float eps) {
  using namespace simd;
  const vf gsv = set1(gs), decayv = set1(decay), b1cv = set1(b1c), b2v = set1(b2), b2cv = set1(b2c);
  const vf stepv = set1(step_size), ibc2 = set1(inv_bc2_sqrt), epsv = set1(eps);
  auto one = [&](vf pv, vf gv, vf mv, vf vv, vf& po, vf& mo, vf& vo) {
    gv = mul(gv, gsv);
    pv = mul(pv, decayv);
    mo = fma(b1cv, sub(gv, mv), mv);
    vo = fma(b2v, vv, mul(b2cv, mul(gv, gv)));
    const vf denom = add(mul(sqrt(vo), ibc2), epsv);
    po = fnma(stepv, div(mo, denom), pv);
  };
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    vf po, mo, vo;
    one(load(p + j), load(g + j), load(m + j), load(v + j), po, mo, vo);
    store(p + j, po);
    store(m + j, mo);
    store(v + j, vo);
  }
  if (j < n) {
    const int64_t r = n - j;
    vf po, mo, vo;
    one(load(p + j, r), load(g + j, r), load(m + j, r), load(v + j, r), po, mo, vo);
    store(p + j, po, r);
    store(m + j, mo, r);
    store(v + j, vo, r);
  }
}

inline void adamw(const AdamWArgs& a) {
  const std::vector<Chunk> cs = chunks(a.sizes, a.n);
  const int64_t nc = int64_t(cs.size());
  int64_t total = 0;
  for (int64_t t = 0; t < a.n; ++t) total += a.sizes[t];
  // per-tensor constants, in double as torch computes them, then rounded once to float
  std::vector<float> step_size(a.n), inv_bc2_sqrt(a.n);
  for (int64_t t = 0; t < a.n; ++t) {
    step_size[t] = float(a.lr / (1.0 - std::pow(a.beta1, a.steps[t])));
    inv_bc2_sqrt[t] = float(1.0 / std::sqrt(1.0 - std::pow(a.beta2, a.steps[t])));
  }
  const float gs = float(a.grad_scale), decay = float(1.0 - a.lr * a.weight_decay);
  const float b1c = float(1.0 - a.beta1), b2 = float(a.beta2), b2c = float(1.0 - a.beta2), eps = float(a.eps);
  parallel_for(0, nc, grain_for(total, nc), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const Chunk& c = cs[i];
      const int64_t t = c.t, o = c.begin;
      adamw_range(a.params[t] + o, a.grads[t] + o, a.exp_avg[t] + o, a.exp_avg_sq[t] + o, c.end - o, gs, decay, b1c,
                  b2, b2c, step_size[t], inv_bc2_sqrt[t], eps);
    }
  });
}

}  // namespace optim
