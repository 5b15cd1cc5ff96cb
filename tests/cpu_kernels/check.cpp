// A torch-free check of fastlm's CPU kernel cores at every SIMD level this machine runs:
// each core (csrc/cpu/kernels/*.h, through its level's KernelTable) against a float64 loop
// written here, on random inputs of many shapes (odd sizes, size 1, tails of every length),
// forward and backward. It builds with a plain C++17 compiler, so the NEON forms are checked
// on x86-64 under qemu (tests/test_cpu_levels.py builds and runs it):
//   g++ -O2 -std=c++17 -fopenmp -Icsrc csrc/cpu/isa/*.cpp csrc/cpu/dispatch.cpp \
//       tests/cpu_kernels/check.cpp -o check && ./check [level ...] [--emulated]
// Prints one line per failed check and ends with "N passed, N failed"; exit status 1 on any
// failure.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/parallel.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastlm {
// parallel.h with OpenMP (the extension uses ATen's pool instead)
void parallel_range(int64_t begin, int64_t end, int64_t grain, RangeFn fn, const void* ctx) {
  const int64_t n = end - begin, chunks = std::max<int64_t>(1, std::min<int64_t>(num_threads(), (n + grain - 1) / grain));
#pragma omp parallel for num_threads(chunks) schedule(static, 1)
  for (int64_t c = 0; c < chunks; ++c) fn(ctx, begin + n * c / chunks, begin + n * (c + 1) / chunks);
}
int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
}  // namespace fastlm

using namespace fastlm;
using Vec = std::vector<double>;

static int g_passed = 0, g_failed = 0;
static std::mt19937_64 g_rng(1234);

static Vec randn(size_t n, double scale = 1.0, double shift = 0.0) {
  std::normal_distribution<double> d(0.0, 1.0);
  Vec v(n);
  for (auto& x : v) x = d(g_rng) * scale + shift;
  return v;
}

// ---- storage conversions (float32, bf16, fp16) ----
static uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (f != f) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
static float from_bf16(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static float from_f16(uint16_t h) {
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  const double s = (h & 0x8000) ? -1.0 : 1.0;
  if (e == 0) return static_cast<float>(s * m * std::ldexp(1.0, -24));
  if (e == 31) return m ? NAN : static_cast<float>(s * INFINITY);
  return static_cast<float>(s * (1024 + m) * std::ldexp(1.0, e - 25));
}
static uint16_t to_f16(float f) {  // by search over the nearest representable halves
  if (f != f) return 0x7e00;
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const double a = std::fabs(static_cast<double>(f));
  if (a >= 65520.0) return sign | 0x7c00;
  uint16_t best = 0;
  double bd = 1e300;
  // halves are monotonic in their bits: binary search the bracket, then pick nearest-even
  uint16_t lo = 0, hi = 0x7bff;
  while (lo < hi) {
    const uint16_t mid = static_cast<uint16_t>((lo + hi + 1) / 2);
    if (from_f16(mid) <= a) lo = mid;
    else hi = static_cast<uint16_t>(mid - 1);
  }
  for (uint16_t c : {lo, static_cast<uint16_t>(lo + 1)}) {
    if (c > 0x7c00) continue;
    const double d = std::fabs(from_f16(c) - a);
    if (d < bd || (d == bd && (c & 1) == 0)) bd = d, best = c;
  }
  return sign | best;
}

// A tensor held in one storage dtype, with its values as doubles (after rounding).
struct Buf {
  Dtype dt;
  std::vector<float> f;
  std::vector<double> d;
  std::vector<uint16_t> h;
  Buf(Dtype t, const Vec& v) : dt(t) {
    if (t == Dtype::f32) f.assign(v.begin(), v.end());
    else if (t == Dtype::f64) d = v;
    else {
      h.resize(v.size());
      for (size_t i = 0; i < v.size(); ++i) h[i] = t == Dtype::bf16 ? to_bf16(float(v[i])) : to_f16(float(v[i]));
    }
  }
  Buf(Dtype t, size_t n) : Buf(t, Vec(n, NAN)) {}  // NaN-filled: an unwritten element fails
  void* ptr() { return dt == Dtype::f32 ? (void*)f.data() : dt == Dtype::f64 ? (void*)d.data() : (void*)h.data(); }
  size_t size() const { return dt == Dtype::f32 ? f.size() : dt == Dtype::f64 ? d.size() : h.size(); }
  Vec values() const {
    Vec v(size());
    for (size_t i = 0; i < v.size(); ++i)
      v[i] = dt == Dtype::f32 ? f[i] : dt == Dtype::f64 ? d[i] : dt == Dtype::bf16 ? from_bf16(h[i]) : from_f16(h[i]);
    return v;
  }
};

static const char* dname(Dtype t) {
  return t == Dtype::f32 ? "f32" : t == Dtype::f64 ? "f64" : t == Dtype::bf16 ? "bf16" : "f16";
}
static double tol(Dtype t, double f32) {
  return t == Dtype::f32 ? f32 : t == Dtype::f64 ? 1e-10 : t == Dtype::bf16 ? 1.5e-2 : 3e-3;
}

// ||got - want|| / max(||want||, floor); NaN anywhere fails
static void check(const std::string& what, const Vec& got, const Vec& want, double tolerance, double floor = 1e-30) {
  double num = 0, den = 0;
  bool nan = got.size() != want.size();
  for (size_t i = 0; i < got.size() && !nan; ++i) {
    if (std::isnan(got[i]) || std::isnan(want[i])) nan = true;
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  const double err = nan ? INFINITY : std::sqrt(num) / std::max(std::sqrt(den), floor);
  if (err <= tolerance) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL %s: relative error %.3g > %.3g\n", what.c_str(), err, tolerance);
  }
}

static Vec f32v(const std::vector<float>& v) { return Vec(v.begin(), v.end()); }
static std::vector<float> tof(const Vec& v) { return std::vector<float>(v.begin(), v.end()); }

// ------------------------------------------------------------------ attention
// Reference attention of one (batch, head) in float64: P = softmax(scale q k^T, causal
// bottom-right), out = P v, and the gradients for dout.
struct AttnRef {
  Vec out, lse, dq, dk, dv;
};

static void attn_ref(const Vec& q, const Vec& k, const Vec& v, const Vec& dout, int64_t B, int64_t H, int64_t Hkv,
                     int64_t Tq, int64_t Tk, int64_t D, bool causal, double scale, AttnRef& r) {
  r.out.assign(B * H * Tq * D, 0);
  r.lse.assign(B * H * Tq, INFINITY);
  r.dq.assign(B * H * Tq * D, 0);
  r.dk.assign(B * Hkv * Tk * D, 0);
  r.dv.assign(B * Hkv * Tk * D, 0);
  const int64_t G = H / Hkv, off = Tk - Tq;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / G;
      const double* Q = q.data() + (b * H + h) * Tq * D;
      const double* K = k.data() + (b * Hkv + hk) * Tk * D;
      const double* V = v.data() + (b * Hkv + hk) * Tk * D;
      const double* dO = dout.data() + (b * H + h) * Tq * D;
      for (int64_t i = 0; i < Tq; ++i) {
        Vec s(Tk, -INFINITY), p(Tk, 0.0);
        double m = -INFINITY;
        for (int64_t j = 0; j < Tk; ++j) {
          if (causal && j > i + off) continue;
          double acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += Q[i * D + d] * K[j * D + d];
          s[j] = acc * scale;
          m = std::max(m, s[j]);
        }
        if (m == -INFINITY) continue;
        double l = 0;
        for (int64_t j = 0; j < Tk; ++j) l += (p[j] = s[j] == -INFINITY ? 0.0 : std::exp(s[j] - m));
        for (int64_t j = 0; j < Tk; ++j) p[j] /= l;
        r.lse[(b * H + h) * Tq + i] = m + std::log(l);
        double* O = r.out.data() + ((b * H + h) * Tq + i) * D;
        for (int64_t j = 0; j < Tk; ++j)
          for (int64_t d = 0; d < D; ++d) O[d] += p[j] * V[j * D + d];
        // backward of this row
        Vec dp(Tk, 0.0);
        double delta = 0;
        for (int64_t d = 0; d < D; ++d) delta += dO[i * D + d] * O[d];
        for (int64_t j = 0; j < Tk; ++j) {
          if (p[j] == 0) continue;
          double acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += dO[i * D + d] * V[j * D + d];
          const double ds = p[j] * (acc - delta) * scale;
          for (int64_t d = 0; d < D; ++d) {
            r.dv[((b * Hkv + hk) * Tk + j) * D + d] += p[j] * dO[i * D + d];
            r.dq[((b * H + h) * Tq + i) * D + d] += ds * K[j * D + d];
            r.dk[((b * Hkv + hk) * Tk + j) * D + d] += ds * Q[i * D + d];
          }
        }
      }
    }
}

// (B, H, T, D) dense <-> the kernel's row layout: tokens-major stores (B, T, H, D).
static std::vector<float> to_rows(const Vec& v, int64_t B, int64_t H, int64_t T, int64_t D, bool tm) {
  std::vector<float> out(v.size());
  const Rows4 l = tm ? Rows4::tokens_major(H, T, D) : Rows4::dense(H, T, D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t d = 0; d < D; ++d) out[l.at(b, h, t) + d] = float(v[((b * H + h) * T + t) * D + d]);
  return out;
}

static Vec from_rows(const std::vector<float>& v, int64_t B, int64_t H, int64_t T, int64_t D, bool tm) {
  Vec out(v.size());
  const Rows4 l = tm ? Rows4::tokens_major(H, T, D) : Rows4::dense(H, T, D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t d = 0; d < D; ++d) out[((b * H + h) * T + t) * D + d] = v[l.at(b, h, t) + d];
  return out;
}

// tm: every (B, H, T, D) operand and result in tokens-major order, as heads split from one
// projection arrive and as the CPU glue lays out outputs for them.
static void check_attention(const KernelTable& kt, int64_t B, int64_t H, int64_t Hkv, int64_t Tq, int64_t Tk,
                            int64_t D, bool causal, bool tm) {
  const double scale = 1.0 / std::sqrt(double(D));
  const Vec q = randn(B * H * Tq * D), k = randn(B * Hkv * Tk * D), v = randn(B * Hkv * Tk * D);
  const Vec dout = randn(B * H * Tq * D);
  AttnRef ref;
  attn_ref(q, k, v, dout, B, H, Hkv, Tq, Tk, D, causal, scale, ref);
  const auto lay = [tm](int64_t h, int64_t t, int64_t d) {
    return tm ? Rows4::tokens_major(h, t, d) : Rows4::dense(h, t, d);
  };
  const Rows4 lq = lay(H, Tq, D), lkv = lay(Hkv, Tk, D);
  const std::vector<float> qf = to_rows(q, B, H, Tq, D, tm), kf = to_rows(k, B, Hkv, Tk, D, tm),
                           vf = to_rows(v, B, Hkv, Tk, D, tm), df = to_rows(dout, B, H, Tq, D, tm);
  std::vector<float> out(B * H * Tq * D, NAN), lse(B * H * Tq, NAN);
  std::vector<float> ktp(B * Hkv * cdiv(Tk, kAttnBK) * D * kAttnBK), vc(tm ? B * Hkv * Tk * D : 0);
  kt.attention_fwd(AttnFwdArgs{qf.data(), kf.data(), vf.data(), ktp.data(), out.data(), lse.data(),
                               tm ? vc.data() : nullptr, B, H, Hkv, Tq, Tk, D, causal, float(scale), lq, lkv, lkv,
                               lq});
  char name[180];
  std::snprintf(name, sizeof name, "%s attention B=%ld H=%ld Hkv=%ld Tq=%ld Tk=%ld D=%ld causal=%d%s", kt.name,
                (long)B, (long)H, (long)Hkv, (long)Tq, (long)Tk, (long)D, (int)causal, tm ? " tokens-major" : "");
  check(std::string(name) + " out", from_rows(out, B, H, Tq, D, tm), ref.out, 1e-4);
  Vec lse_got = f32v(lse), lse_want = ref.lse;
  for (size_t i = 0; i < lse_want.size(); ++i)  // rows that see no key: both +inf
    if (std::isinf(lse_want[i]) && std::isinf(lse_got[i])) lse_got[i] = lse_want[i] = 0;
  check(std::string(name) + " lse", lse_got, lse_want, 1e-5, 1.0);
  const int64_t Tqp = cdiv(Tq, kAttnBQ) * kAttnBQ;
  const int64_t nthr = std::max<int64_t>(1, std::min<int64_t>(num_threads(), B * Hkv * cdiv(Tk, kAttnBK)));
  std::vector<float> qt(B * H * D * Tqp), dt(B * H * D * Tqp), lse2(B * H * Tqp), delta(B * H * Tqp);
  std::vector<float> dqt(nthr * B * H * D * Tqp), dq(q.size(), NAN), dk(k.size(), NAN), dv(v.size(), NAN);
  std::vector<float> qc(tm ? q.size() : 0), doc(tm ? q.size() : 0);
  kt.attention_bwd(AttnBwdArgs{qf.data(), kf.data(), vf.data(), df.data(), out.data(), lse.data(), qt.data(),
                               dt.data(), lse2.data(), delta.data(), dqt.data(), dq.data(), dk.data(), dv.data(),
                               tm ? qc.data() : nullptr, tm ? doc.data() : nullptr, nthr,
                               B, H, Hkv, Tq, Tqp, Tk, D, causal, float(scale), lq, lkv, lkv, lq, lq, lq, lkv, lkv});
  check(std::string(name) + " dq", from_rows(dq, B, H, Tq, D, tm), ref.dq, 1e-4);
  check(std::string(name) + " dk", from_rows(dk, B, Hkv, Tk, D, tm), ref.dk, 1e-4);
  check(std::string(name) + " dv", from_rows(dv, B, Hkv, Tk, D, tm), ref.dv, 1e-4);
}

// Decode: Tq new queries per sequence over a cache of L_max positions, lens[b] valid; query
// t of sequence b sees positions j < lens[b] - Tq + 1 + t. The cache is stored as kv (f32,
// bf16 or f16); the reference reads the values as stored (rounded), in float64.
static void check_decode(const KernelTable& kt, int64_t B, int64_t H, int64_t Hkv, int64_t Tq, int64_t L, int64_t D,
                         const std::vector<int64_t>& lens, Dtype kv = Dtype::f32) {
  const double scale = 1.0 / std::sqrt(double(D));
  Buf kb(kv, randn(B * Hkv * L * D)), vb(kv, randn(B * Hkv * L * D));
  const Vec q = randn(B * H * Tq * D), k = kb.values(), v = vb.values();
  Vec want(B * H * Tq * D, 0.0);
  const int64_t G = H / Hkv;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < Tq; ++t) {
        const int64_t lim = lens[b] - Tq + 1 + t;
        const double* Q = q.data() + ((b * H + h) * Tq + t) * D;
        const double* K = k.data() + (b * Hkv + h / G) * L * D;
        const double* V = v.data() + (b * Hkv + h / G) * L * D;
        if (lim <= 0) continue;
        Vec s(lim);
        double m = -INFINITY, l = 0;
        for (int64_t j = 0; j < lim; ++j) {
          double acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += Q[d] * K[j * D + d];
          m = std::max(m, s[j] = acc * scale);
        }
        for (int64_t j = 0; j < lim; ++j) l += (s[j] = std::exp(s[j] - m));
        double* O = want.data() + ((b * H + h) * Tq + t) * D;
        for (int64_t j = 0; j < lim; ++j)
          for (int64_t d = 0; d < D; ++d) O[d] += s[j] / l * V[j * D + d];
      }
  const std::vector<float> qf = tof(q);
  std::vector<float> out(want.size(), NAN);
  const int64_t nthr = num_threads(), rows = G * Tq;
  int64_t nsplit = std::max<int64_t>(1, std::min<int64_t>(cdiv(L, 256), cdiv(4 * nthr, B * Hkv)));
  const int64_t chunk = cdiv(cdiv(L, nsplit), kAttnBK) * kAttnBK;
  nsplit = std::max<int64_t>(1, cdiv(L, chunk));
  std::vector<float> part(B * Hkv * nsplit * rows * (D + 2));
  kt.decode_attention(AttnDecodeArgs{qf.data(), kb.ptr(), vb.ptr(), kv, lens.data(), part.data(), out.data(), B, H,
                                     Hkv, Tq, L, D, nsplit, chunk, nthr, float(scale)});
  char name[160];
  std::snprintf(name, sizeof name, "%s decode kv=%s B=%ld H=%ld Hkv=%ld Tq=%ld L=%ld D=%ld", kt.name, dname(kv), (long)B,
                (long)H, (long)Hkv, (long)Tq, (long)L, (long)D);
  check(name, f32v(out), want, 1e-4);
}

// ------------------------------------------------------------------ norms
static void check_norm(const KernelTable& kt, Dtype dt, bool rms, bool residual, bool bias, int64_t rows, int64_t C) {
  const double eps = rms ? 1e-6 : 1e-5;
  Buf x(dt, randn(rows * C, 2.0, 0.5)), r(dt, randn(rows * C)), w(dt, randn(C, 0.5, 1.0)), b(dt, randn(C, 0.1));
  Buf dy(dt, randn(rows * C)), dh(dt, randn(rows * C));
  const Dtype st = dt == Dtype::f64 ? Dtype::f64 : Dtype::f32;
  Buf out(dt, rows * C), h(dt, rows * C), mean(st, rows), rstd(st, rows);
  kt.norm_fwd(NormFwdArgs{dt, rms, x.ptr(), residual ? r.ptr() : nullptr, w.ptr(), bias ? b.ptr() : nullptr, out.ptr(),
                          residual ? h.ptr() : nullptr, rms ? nullptr : mean.ptr(), rstd.ptr(), rows, C, eps});
  // The reference normalizes h as stored (x + residual rounded to the storage type, which
  // the kernel must get right to that type's precision: checked separately).
  const Vec xv = x.values(), rv = r.values(), wv = w.values(), bv = b.values();
  Vec hsum(rows * C), want(rows * C), dxw(rows * C), dww(C, 0.0), dbw(C, 0.0);
  for (int64_t i = 0; i < rows * C; ++i) hsum[i] = xv[i] + (residual ? rv[i] : 0.0);
  const Vec hv = residual ? h.values() : xv;
  const Vec dyv = dy.values(), dhv = dh.values();
  double scale = 0;  // ||rstd dy w||: dx is judged against the size of its terms (it cancels
                     // almost entirely for tiny C)
  for (int64_t i = 0; i < rows; ++i) {
    double mu = 0, var = 0;
    if (!rms) {
      for (int64_t j = 0; j < C; ++j) mu += hv[i * C + j];
      mu /= C;
    }
    for (int64_t j = 0; j < C; ++j) var += (hv[i * C + j] - mu) * (hv[i * C + j] - mu);
    const double rs = 1.0 / std::sqrt(var / C + eps);
    double sg = 0, sgx = 0;
    for (int64_t j = 0; j < C; ++j) {
      const double xh = (hv[i * C + j] - mu) * rs;
      want[i * C + j] = xh * wv[j] + (bias ? bv[j] : 0.0);
      const double g = dyv[i * C + j] * wv[j];
      sg += g;
      sgx += g * xh;
      dww[j] += dyv[i * C + j] * xh;
      dbw[j] += dyv[i * C + j];
      scale += (rs * g) * (rs * g);
    }
    for (int64_t j = 0; j < C; ++j) {
      const double xh = (hv[i * C + j] - mu) * rs, g = dyv[i * C + j] * wv[j];
      const double v = (!rms && C == 1) ? 0.0 : rs * (g - (rms ? 0.0 : sg / C) - xh * sgx / C);
      dxw[i * C + j] = v + (residual ? dhv[i * C + j] : 0.0);
    }
  }
  char name[160];
  std::snprintf(name, sizeof name, "%s %s %s rows=%ld C=%ld res=%d bias=%d", kt.name, rms ? "rms_norm" : "layer_norm",
                dname(dt), (long)rows, (long)C, (int)residual, (int)bias);
  const double t = tol(dt, 1e-5);
  check(std::string(name) + " out", out.values(), want, t);
  if (residual) check(std::string(name) + " h", hv, hsum, tol(dt, 1e-6));
  // backward, from the h the kernel saved and its statistics
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(num_threads(), rows));
  Buf dx(dt, rows * C), dwp(st, Vec(nchunks * C, 0.0)), dbp(st, Vec(nchunks * C, 0.0));
  kt.norm_bwd(NormBwdArgs{dt, rms, dy.ptr(), residual ? dh.ptr() : nullptr, residual ? h.ptr() : x.ptr(), w.ptr(),
                          rms ? nullptr : mean.ptr(), rstd.ptr(), dx.ptr(), dwp.ptr(), bias ? dbp.ptr() : nullptr, rows,
                          C, nchunks});
  Vec dwg(C, 0.0), dbg(C, 0.0);
  const Vec dwv = dwp.values(), dbv = dbp.values();
  for (int64_t c = 0; c < nchunks; ++c)
    for (int64_t j = 0; j < C; ++j) dwg[j] += dwv[c * C + j], dbg[j] += dbv[c * C + j];
  check(std::string(name) + " dx", dx.values(), dxw, t, std::sqrt(scale));
  check(std::string(name) + " dw", dwg, dww, t);
  if (bias) check(std::string(name) + " db", dbg, dbw, t);
}

// ------------------------------------------------------------------ gelu
static void check_gelu(const KernelTable& kt, Dtype dt, int64_t n) {
  Buf x(dt, randn(n, 3.0)), dy(dt, randn(n)), y(dt, n), dx(dt, n);
  kt.gelu(GeluArgs{dt, x.ptr(), nullptr, y.ptr(), n});
  kt.gelu(GeluArgs{dt, x.ptr(), dy.ptr(), dx.ptr(), n});
  const Vec xv = x.values(), dyv = dy.values();
  Vec yw(n), dxw(n);
  const double c = std::sqrt(2.0 / M_PI);
  for (int64_t i = 0; i < n; ++i) {
    const double v = xv[i], t = std::tanh(c * (v + 0.044715 * v * v * v));
    yw[i] = 0.5 * v * (1 + t);
    dxw[i] = dyv[i] * (0.5 * (1 + t) + 0.5 * v * (1 - t * t) * c * (1 + 3 * 0.044715 * v * v));
  }
  char name[96];
  std::snprintf(name, sizeof name, "%s gelu %s n=%ld", kt.name, dname(dt), (long)n);
  // Relative to the scale of the inputs where the result is far smaller (deep in the negative
  // tail y and dx are differences of nearly equal terms, and one formula's rounding differs
  // from another's by ~1e-16 of x or dy, not of the tiny result).
  double xs = 0, dys = 0;
  for (int64_t i = 0; i < n; ++i) {
    xs += xv[i] * xv[i];
    dys += dyv[i] * dyv[i];
  }
  check(std::string(name) + " fwd", y.values(), yw, tol(dt, 1e-6), 1e-3 * std::sqrt(xs));
  check(std::string(name) + " bwd", dx.values(), dxw, tol(dt, 1e-6), 1e-3 * std::sqrt(dys));
}

// ------------------------------------------------------------------ decode_linear
static void check_linear(const KernelTable& kt, int64_t M, int64_t K, int64_t N, bool bias) {
  const Vec x = randn(M * K), w = randn(N * K), b = randn(N);
  const int64_t P = cdiv(N, kDecodePanel);
  std::vector<float> wp(P * K * kDecodePanel, 0.f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) wp[((n / kDecodePanel) * K + k) * kDecodePanel + n % kDecodePanel] = float(w[n * K + k]);
  const std::vector<float> xf = tof(x), bf = tof(b);
  std::vector<float> out(M * N, NAN);
  kt.decode_linear(LinearArgs{xf.data(), wp.data(), bias ? bf.data() : nullptr, out.data(), M, K, N});
  Vec want(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = bias ? b[n] : 0.0;
      for (int64_t k = 0; k < K; ++k) acc += x[m * K + k] * w[n * K + k];
      want[m * N + n] = acc;
    }
  char name[96];
  std::snprintf(name, sizeof name, "%s decode_linear M=%ld K=%ld N=%ld bias=%d", kt.name, (long)M, (long)K, (long)N,
                (int)bias);
  check(name, f32v(out), want, 1e-5);
}

// The same product with a reduced-precision weight: bf16 / f16 panels of the rounded weight,
// or q8_0 blocks of random int8 values and random float16 scales; the reference multiplies by
// the weight those bytes stand for.
static void check_linear_q(const KernelTable& kt, WeightFormat f, int64_t M, int64_t K, int64_t N, bool bias) {
  const int64_t W = kDecodePanel, B = kQuantBlock, P = cdiv(N, W), nb = cdiv(K, B);
  const Vec x = randn(M * K), b = randn(N);
  Vec w(N * K);  // the weight as the kernel must see it
  std::vector<uint8_t> bytes;
  std::vector<uint16_t> h16;
  const void* wq;
  if (f == WeightFormat::q8_0) {
    bytes.assign(P * nb * kQ8BlockBytes, 0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < nb; ++j) {
        uint8_t* blk = bytes.data() + ((n / W) * nb + j) * kQ8BlockBytes;
        const uint16_t sbits = to_f16(float(0.01 + 0.05 * std::abs(randn(1)[0])));
        std::memcpy(blk + B * W + 2 * (n % W), &sbits, 2);
        for (int64_t k = j * B; k < std::min(K, (j + 1) * B); ++k) {
          const int8_t q = int8_t(int(g_rng() % 255) - 127);
          const int64_t kk = k - j * B;  // byte [g][c][t] of k = 4 g + t
          blk[((kk / 4) * W + n % W) * 4 + kk % 4] = uint8_t(q);
          w[n * K + k] = double(q) * from_f16(sbits);
        }
      }
    wq = bytes.data();
  } else if (f == WeightFormat::q4_0) {
    bytes.assign(P * nb * kQ4BlockBytes, 0x88);  // 8 | 8 << 4: zero weights past N and K
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < nb; ++j) {
        uint8_t* blk = bytes.data() + ((n / W) * nb + j) * kQ4BlockBytes;
        const uint16_t sbits = to_f16(float(0.01 + 0.05 * std::abs(randn(1)[0])));
        std::memcpy(blk + B / 2 * W + 2 * (n % W), &sbits, 2);
        for (int64_t k = j * B; k < std::min(K, (j + 1) * B); ++k) {
          const int u = int(g_rng() % 16), kk = int((k - j * B) % (B / 2));
          uint8_t& byte = blk[((kk / 4) * W + n % W) * 4 + kk % 4];
          byte = (k - j * B) < B / 2 ? uint8_t((byte & 0xF0) | u) : uint8_t((byte & 0x0F) | (u << 4));
          w[n * K + k] = double(u - 8) * from_f16(sbits);
        }
      }
    wq = bytes.data();
  } else {
    h16.assign(P * K * W, 0);
    const Vec r = randn(N * K);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const uint16_t v = f == WeightFormat::bf16 ? to_bf16(float(r[n * K + k])) : to_f16(float(r[n * K + k]));
        h16[((n / W) * K + k) * W + n % W] = v;
        w[n * K + k] = f == WeightFormat::bf16 ? from_bf16(v) : from_f16(v);
      }
    wq = h16.data();
  }
  const std::vector<float> xf = tof(x), bf = tof(b);
  // q8_0 / q4_0 multiply the activations rounded to q8_0: per row, blocks of 32 along K,
  // q = round(x (127 / amax)) in float32, the value q amax / 127
  Vec xv = x;
  if (f == WeightFormat::q8_0 || f == WeightFormat::q4_0)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k0 = 0; k0 < K; k0 += B) {
        const int64_t kn = std::min(B, K - k0);
        float amax = 0.f;
        for (int64_t k = k0; k < k0 + kn; ++k) amax = std::max(amax, std::abs(xf[m * K + k]));
        const float inv = amax > 0 ? 127.0f / amax : 0.f, d = amax / 127.0f;
        for (int64_t k = k0; k < k0 + kn; ++k) xv[m * K + k] = double(std::nearbyint(xf[m * K + k] * inv)) * d;
      }
  std::vector<float> out(M * N, NAN);
  kt.decode_linear_q(LinearQArgs{f, xf.data(), wq, bias ? bf.data() : nullptr, out.data(), M, K, N});
  Vec want(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = bias ? b[n] : 0.0;
      for (int64_t k = 0; k < K; ++k) acc += xv[m * K + k] * w[n * K + k];
      want[m * N + n] = acc;
    }
  char name[112];
  std::snprintf(name, sizeof name, "%s decode_linear_q %s M=%ld K=%ld N=%ld bias=%d", kt.name,
                f == WeightFormat::q8_0   ? "q8_0"
                : f == WeightFormat::q4_0 ? "q4_0"
                : f == WeightFormat::bf16 ? "bf16"
                                          : "f16",
                (long)M, (long)K,
                (long)N, (int)bias);
  check(name, f32v(out), want, 1e-5);
}

// ------------------------------------------------------------------ loss rows
static void check_loss(const KernelTable& kt, Dtype dt, int64_t R, int64_t V, bool grad, bool row_scale) {
  const Vec z = randn(R * V, 3.0);
  std::vector<int64_t> tg(R);
  for (int64_t i = 0; i < R; ++i) tg[i] = (i % 5 == 3) ? -100 : int64_t(g_rng() % V);
  const Vec rs = randn(R);
  Buf zb(dt, z), loss(dt, R), rsb(dt, rs);
  const double scale = 0.37;
  kt.loss_rows(LossRowsArgs{dt, zb.ptr(), loss.ptr(), tg.data(), row_scale ? rsb.ptr() : nullptr, R, V, -100, grad,
                            scale});
  Vec lw(R, 0.0), gw(R * V, 0.0);
  for (int64_t i = 0; i < R; ++i) {
    if (tg[i] == -100) continue;
    double m = -INFINITY, s = 0;
    for (int64_t j = 0; j < V; ++j) m = std::max(m, z[i * V + j]);
    for (int64_t j = 0; j < V; ++j) s += std::exp(z[i * V + j] - m);
    lw[i] = m + std::log(s) - z[i * V + tg[i]];
    const double sc = row_scale ? rs[i] : scale;
    for (int64_t j = 0; j < V; ++j) gw[i * V + j] = sc * (std::exp(z[i * V + j] - m) / s - (j == tg[i] ? 1.0 : 0.0));
  }
  char name[96];
  std::snprintf(name, sizeof name, "%s loss_rows %s R=%ld V=%ld grad=%d", kt.name, dname(dt), (long)R, (long)V, (int)grad);
  check(std::string(name) + " loss", loss.values(), lw, tol(dt, 1e-5));
  if (grad) check(std::string(name) + " grad", zb.values(), gw, tol(dt, 1e-5));
}

// ------------------------------------------------------------------ optimizer step
static void check_optim(const KernelTable& kt, std::vector<int64_t> sizes, double gscale) {
  const int64_t n = int64_t(sizes.size());
  std::vector<std::vector<float>> p(n), g(n), m(n), v(n);
  std::vector<Vec> pw(n), mw(n), vw(n);
  std::vector<float *> pp(n), mp(n), vp(n);
  std::vector<const float*> gp(n);
  std::vector<double> steps(n);
  double ss = 0;
  const double lr = 3e-3, b1 = 0.85, b2 = 0.97, eps = 1e-6, wd = 0.1;
  for (int64_t t = 0; t < n; ++t) {
    p[t] = tof(randn(sizes[t]));
    g[t] = tof(randn(sizes[t], 2.0));
    m[t] = tof(randn(sizes[t], 0.1));
    v[t] = tof(randn(sizes[t], 0.1, 0.5));
    for (auto& x : v[t]) x = x * x;
    pw[t] = f32v(p[t]), mw[t] = f32v(m[t]), vw[t] = f32v(v[t]);
    pp[t] = p[t].data(), gp[t] = g[t].data(), mp[t] = m[t].data(), vp[t] = v[t].data();
    steps[t] = double(t % 5 + 1);
    for (float x : g[t]) ss += double(x) * x;
    const double bc1 = 1 - std::pow(b1, steps[t]), bc2 = 1 - std::pow(b2, steps[t]);
    for (int64_t j = 0; j < sizes[t]; ++j) {
      const double gj = gscale * double(g[t][j]);
      mw[t][j] = b1 * mw[t][j] + (1 - b1) * gj;
      vw[t][j] = b2 * vw[t][j] + (1 - b2) * gj * gj;
      pw[t][j] = pw[t][j] * (1 - lr * wd) - lr / bc1 * mw[t][j] / (std::sqrt(vw[t][j] / bc2) + eps);
    }
  }
  const double got_ss = kt.sum_squares(SumSquaresArgs{gp.data(), sizes.data(), n});
  char name[96];
  std::snprintf(name, sizeof name, "%s optim n=%ld scale=%g", kt.name, (long)n, gscale);
  check(std::string(name) + " sum_squares", Vec{got_ss}, Vec{ss}, 1e-6);
  kt.adamw(AdamWArgs{pp.data(), gp.data(), mp.data(), vp.data(), sizes.data(), steps.data(), n, lr, b1, b2, eps, wd,
                     gscale});
  for (int64_t t = 0; t < n; ++t) {
    check(std::string(name) + " param", f32v(p[t]), pw[t], 1e-5);
    check(std::string(name) + " exp_avg", f32v(m[t]), mw[t], 1e-5);
    check(std::string(name) + " exp_avg_sq", f32v(v[t]), vw[t], 1e-5);
  }
}

static void run_level(const KernelTable& kt) {
  const int before = g_failed;
  // attention: tails of every kind, GQA, D not a multiple of any vector width, Tq < Tk
  const int64_t shapes[][6] = {{1, 1, 1, 1, 1, 1},    {1, 2, 1, 7, 7, 5},     {2, 3, 3, 65, 65, 16},
                               {1, 4, 2, 33, 97, 33}, {1, 2, 2, 130, 130, 64}, {2, 2, 1, 5, 70, 80},
                               {1, 1, 1, 64, 64, 128}, {1, 2, 2, 71, 71, 24}};
  for (auto& s : shapes)
    for (bool causal : {true, false})
      for (bool tm : {false, true}) check_attention(kt, s[0], s[1], s[2], s[3], s[4], s[5], causal, tm);
  // decode: the one-row fast path (D multiple of 16), the tile path, GQA, several new queries
  for (Dtype kv : {Dtype::f32, Dtype::bf16, Dtype::f16}) {
    check_decode(kt, 1, 4, 4, 1, 300, 64, {300}, kv);        // one row per head: decode_row
    check_decode(kt, 3, 2, 2, 1, 100, 32, {1, 57, 100}, kv);
    check_decode(kt, 2, 4, 2, 1, 600, 48, {600, 333}, kv);   // GQA: the tile path, several slices
    check_decode(kt, 2, 3, 3, 1, 90, 20, {90, 17}, kv);      // D not a multiple of 8: tails
    check_decode(kt, 2, 4, 1, 3, 129, 128, {129, 5}, kv);    // Tq > 1
    check_decode(kt, 1, 2, 2, 1, 2, 128, {0}, kv);
    check_decode(kt, 2, 6, 2, 2, 70, 13, {70, 3}, kv);       // odd D, GQA and Tq > 1 together
  }
  for (Dtype dt : {Dtype::f32, Dtype::bf16, Dtype::f16, Dtype::f64})
    for (bool rms : {false, true})
      for (auto rc : {std::pair<int64_t, int64_t>{1, 1}, {3, 2}, {38, 2}, {5, 17}, {4, 64}, {7, 100}, {2, 768}, {3, 1031}})
        for (bool res : {false, true}) check_norm(kt, dt, rms, res, !rms && rc.second % 2 == 1, rc.first, rc.second);
  for (Dtype dt : {Dtype::f32, Dtype::bf16, Dtype::f16, Dtype::f64})
    for (int64_t n : {1, 3, 8, 15, 16, 17, 100, 16384 + 7, 50000}) check_gelu(kt, dt, n);
  for (int64_t M : {1, 2, 3, 7, 8, 9, 17, 33})
    for (auto kn : {std::pair<int64_t, int64_t>{1, 1}, {5, 47}, {64, 48}, {33, 100}, {256, 769}, {768, 2311}})
      check_linear(kt, M, kn.first, kn.second, M % 2 == 1);
  // the blocked product of many rows, K over several of its blocks
  for (int64_t M : {16, 40}) check_linear(kt, M, 1100, 70, true);
  for (WeightFormat f : {WeightFormat::q8_0, WeightFormat::q4_0, WeightFormat::bf16, WeightFormat::f16})
    for (int64_t M : {1, 2, 3, 8, 9, 33})
      for (auto kn : {std::pair<int64_t, int64_t>{1, 1}, {5, 47}, {32, 48}, {33, 100}, {256, 769}, {100, 2311}})
        check_linear_q(kt, f, M, kn.first, kn.second, M % 2 == 0);
  for (WeightFormat f : {WeightFormat::q8_0, WeightFormat::bf16}) check_linear_q(kt, f, 40, 1100, 70, true);
  for (Dtype dt : {Dtype::f32, Dtype::f64})
    for (auto rv : {std::pair<int64_t, int64_t>{1, 1}, {3, 7}, {9, 100}, {5, 5003}})
      for (bool grad : {false, true}) check_loss(kt, dt, rv.first, rv.second, grad, grad && rv.second == 100);
  check_optim(kt, {1}, 1.0);
  check_optim(kt, {7, 3, 16, 17, 1}, 0.25);
  check_optim(kt, {16384 + 9, 40000, 130, 5}, 1.0);
  std::printf("level %s: %d checks failed\n", kt.name, g_failed - before);
}

// Arguments: the levels to run (default: all this CPU supports); --emulated runs the named
// levels even where the CPU lacks them (a build whose AVX-512 level was compiled through an
// emulation of its intrinsics, tests/cpu_kernels/avx512_emulated.cpp).
int main(int argc, char** argv) {
  const IsaLevel* levels = nullptr;
  const int n = isa_levels(&levels);
  bool emulated = false, named = false;
  for (int a = 1; a < argc; ++a) {
    if (std::strcmp(argv[a], "--emulated") == 0) emulated = true;
    else named = true;
  }
  for (int i = 0; i < n; ++i) {
    bool wanted = !named;
    for (int a = 1; a < argc; ++a) wanted |= std::strcmp(argv[a], levels[i].name) == 0;
    if (!wanted) continue;
    if (!levels[i].supported && !emulated) {
      std::printf("level %s: not supported by this CPU, not run\n", levels[i].name);
      continue;
    }
    run_level(*levels[i].table);
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed ? 1 : 0;
}
