// Attention on the CPU, the torch side: input checks, float32 conversion, outputs and
// scratch from the output pool (a buffer of a few MB fresh from glibc can be a new mapping,
// and faulting its pages in costs a visible part of a forward; bench/RESULTS.md, section
// "Attention", runs 7 and 8), then the kernel core of the SIMD level in use
// (csrc/cpu/kernels/attention.h: the algorithm).
#include "common.h"
#include "kernels.h"

#include <limits>

namespace fastlm {
namespace {

constexpr int64_t BQ = kAttnBQ;
constexpr int64_t BK = kAttnBK;

void check_attn_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  FASTLM_CHECK_CPU(q);
  FASTLM_CHECK_CPU(k);
  FASTLM_CHECK_CPU(v);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-d (B, H, T, D)");
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have one shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, ": q and k must agree on B and D");
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op, ": H must be a multiple of Hkv");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 256, op, ": head size must be in [1, 256]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must have one dtype");
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
              ": the CPU kernel takes float32, bfloat16 or float16, got ", t);
}

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// A (B, H, T, D) input as the kernel reads it: float32 with contiguous rows of D, in whatever
// order its rows lie (heads split from one projection come in (B, T, H, D) order): no copy
// for those, a converted contiguous copy otherwise.
at::Tensor f32_rows(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat && (t.size(3) <= 1 || t.stride(3) == 1)) return t;
  return f32(t);
}

Rows4 rows_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Whether the rows of one (batch, head) lie apart (the kernel then gathers them side by side).
bool apart(const at::Tensor& t) { return t.size(2) > 1 && t.stride(2) != t.size(3); }

// Heads that lie in (B, T, H, D) order: their time stride exceeds their head stride.
bool tokens_major(const at::Tensor& t) { return t.size(1) > 1 && t.size(2) > 1 && t.stride(2) > t.stride(1); }

// A float32 (B, H, T, D) output in the row order of `like`: (B, T, H, D) memory seen as
// (B, H, T, D) when `like` is tokens-major (so that merging the heads back is a free view and
// the gradient reaching a split projection needs no reordering), contiguous otherwise.
at::Tensor empty_rows_like(const at::Tensor& like, at::IntArrayRef shape) {
  if (!tokens_major(like)) return empty_output(shape, at::kFloat);
  return empty_output({shape[0], shape[2], shape[1], shape[3]}, at::kFloat).permute({0, 2, 1, 3});
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                 bool causal, double scale) {
  check_attn_inputs(q_, k_, v_, "attention_fwd");
  const at::Tensor q = f32_rows(q_), k = f32_rows(k_), v = f32_rows(v_);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1), Tk = k.size(2);
  at::Tensor out = empty_rows_like(q, {B, H, Tq, D});
  at::Tensor lse = empty_output({B, H, Tq}, at::kFloat);
  if (B * H * Tq == 0) return {out.to(q_.scalar_type()), lse};
  TORCH_CHECK(Tk >= 1, "attention_fwd: k must have at least one key");
  at::Tensor kt = empty_output({B * Hkv * cdiv(Tk, BK) * D * BK}, at::kFloat);
  at::Tensor vc = apart(v) ? empty_output({B * Hkv * Tk * D}, at::kFloat) : at::Tensor();
  const AttnFwdArgs a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), kt.data_ptr<float>(),
                      out.data_ptr<float>(), lse.data_ptr<float>(), vc.defined() ? vc.data_ptr<float>() : nullptr,
                      B, H, Hkv, Tq, Tk, D, causal, (float)scale,
                      rows_of(q), rows_of(k), rows_of(v), rows_of(out)};
  cpu_kernels().attention_fwd(a);
  return {q_.scalar_type() == at::kFloat ? out : out.to(q_.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout_, const at::Tensor& q_,
                                                             const at::Tensor& k_, const at::Tensor& v_,
                                                             const at::Tensor& out_, const at::Tensor& lse_,
                                                             bool causal, double scale) {
  check_attn_inputs(q_, k_, v_, "attention_bwd");
  TORCH_CHECK(dout_.sizes() == q_.sizes() && out_.sizes() == q_.sizes(),
              "attention_bwd: grad_out and out must have the shape of q");
  const at::Tensor q = f32_rows(q_), k = f32_rows(k_), v = f32_rows(v_), dout = f32_rows(dout_),
                   out = f32_rows(out_), lse = f32(lse_);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Hkv = k.size(1), Tk = k.size(2);
  TORCH_CHECK(lse.numel() == B * H * Tq, "attention_bwd: lse must have shape (B, H, Tq)");
  const int64_t Tqp = cdiv(Tq, BQ) * BQ;
  at::Tensor qt = empty_output({B * H, D, Tqp}, at::kFloat);
  at::Tensor dot_t = empty_output({B * H, D, Tqp}, at::kFloat);
  at::Tensor lse2 = empty_output({B * H, Tqp}, at::kFloat);
  at::Tensor delta = empty_output({B * H, Tqp}, at::kFloat);
  const int64_t nkt = cdiv(Tk, BK), nitems = B * Hkv * nkt;
  const int64_t nthr = std::max<int64_t>(1, std::min<int64_t>(threads_for(5.0 * B * H * Tq * Tk * D), nitems));
  const bool one_tile = nkt == 1 && Tqp == BQ;  // each head's dQ from one item: no per-thread sums
  at::Tensor dqt = one_tile ? at::Tensor() : empty_output({nthr, B * H, D, Tqp}, at::kFloat);
  at::Tensor dk = empty_rows_like(k, k.sizes()), dv = empty_rows_like(v, v.sizes());
  at::Tensor dq = empty_rows_like(q, q.sizes());
  at::Tensor qc = apart(q) ? empty_output({B * H * Tq * D}, at::kFloat) : at::Tensor();
  at::Tensor doc = apart(dout) ? empty_output({B * H * Tq * D}, at::kFloat) : at::Tensor();
  const AttnBwdArgs a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), dout.data_ptr<float>(),
                      out.data_ptr<float>(), lse.data_ptr<float>(),
                      qt.data_ptr<float>(), dot_t.data_ptr<float>(), lse2.data_ptr<float>(), delta.data_ptr<float>(),
                      one_tile ? nullptr : dqt.data_ptr<float>(), dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
                      qc.defined() ? qc.data_ptr<float>() : nullptr, doc.defined() ? doc.data_ptr<float>() : nullptr,
                      nthr,
                      B, H, Hkv, Tq, Tqp, Tk, D, causal, (float)scale,
                      rows_of(q), rows_of(k), rows_of(v), rows_of(dout), rows_of(out), rows_of(dq), rows_of(dk),
                      rows_of(dv)};
  cpu_kernels().attention_bwd(a);
  const auto st = q_.scalar_type();
  if (st == at::kFloat) return {dq, dk, dv};
  return {dq.to(st), dk.to(st), dv.to(st)};
}

// decode_attention's caches may be stored in a narrower dtype than q (a float32 model with a
// bf16 / fp16 KV cache): the kernel reads them as stored, so they are never converted here.
at::Tensor decode_attention(const at::Tensor& q_, const at::Tensor& kc_, const at::Tensor& vc_,
                            const at::Tensor& lens_, double scale) {
  FASTLM_CHECK_CPU(q_);
  FASTLM_CHECK_CPU(kc_);
  FASTLM_CHECK_CPU(vc_);
  FASTLM_CHECK_CPU(lens_);
  TORCH_CHECK_VALUE(q_.dim() == 4 && kc_.dim() == 4 && vc_.dim() == 4, "decode_attention: q, k_cache, v_cache must be 4-d (B, H, T, D)");
  TORCH_CHECK_VALUE(kc_.sizes() == vc_.sizes(), "decode_attention: k_cache and v_cache must have one shape");
  TORCH_CHECK_VALUE(kc_.size(0) == q_.size(0) && kc_.size(3) == q_.size(3),
                    "decode_attention: q and the caches must agree on B and D");
  TORCH_CHECK_VALUE(kc_.size(1) >= 1 && q_.size(1) % kc_.size(1) == 0, "decode_attention: H must be a multiple of Hkv");
  TORCH_CHECK_VALUE(q_.size(3) >= 1 && q_.size(3) <= 256, "decode_attention: head size must be in [1, 256]");
  const auto qt = q_.scalar_type(), ct = kc_.scalar_type();
  TORCH_CHECK_TYPE(qt == at::kFloat || qt == at::kBFloat16 || qt == at::kHalf,
                   "decode_attention: q must be float32, bfloat16 or float16, got ", qt);
  TORCH_CHECK_TYPE(vc_.scalar_type() == ct, "decode_attention: k_cache is ", ct, " but v_cache is ", vc_.scalar_type());
  TORCH_CHECK_TYPE(ct == at::kFloat || ct == at::kBFloat16 || ct == at::kHalf,
                   "decode_attention: the KV cache must be float32, bfloat16 or float16, got ", ct);
  const int64_t B = q_.size(0), H = q_.size(1), Tq = q_.size(2), D = q_.size(3), Hkv = kc_.size(1), L = kc_.size(2);
  TORCH_CHECK(lens_.dim() == 1 && lens_.size(0) == B, "decode_attention: cache_lens must have shape (B,)");
  TORCH_CHECK(lens_.scalar_type() == at::kInt || lens_.scalar_type() == at::kLong,
              "decode_attention: cache_lens must be int32 or int64");
  const at::Tensor lens = lens_.to(at::kLong).contiguous();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(lp[b] >= 0 && lp[b] <= L, "decode_attention: cache_lens[", b, "] = ", lp[b],
                " is outside [0, L_max = ", L, "]");
  const at::Tensor q = f32(q_), kc = kc_.contiguous(), vc = vc_.contiguous();
  at::Tensor out = empty_output({B, H, Tq, D}, at::kFloat);
  run_decode_attention(q.data_ptr<float>(), kc.data_ptr(), vc.data_ptr(), kernel_dtype(ct), lp,
                       out.data_ptr<float>(), B, H, Hkv, Tq, L, D, scale);
  return q_.scalar_type() == at::kFloat ? out : out.to(q_.scalar_type());
}

}  // namespace

void run_decode_attention(const float* q, const void* kc, const void* vc, Dtype kv_dtype, const int64_t* lp,
                          float* out, int64_t B, int64_t H, int64_t Hkv, int64_t Tq, int64_t L, int64_t D,
                          double scale) {
  if (B * H * Tq == 0) return;
  const int64_t G = H / Hkv, rows = G * Tq, W = D + 2;
  // Enough slices to keep every thread busy, each at least 256 positions.
  int64_t visible = 0;
  for (int64_t b = 0; b < B; ++b) visible += lp[b];
  // work = 4 x the bytes of K and V read, so threads_for (one thread below 4e6) splits a
  // call from 1 MB read on: a smaller read ends before a second thread would pay for itself
  const int64_t esize = kv_dtype == Dtype::f32 ? 4 : 2;
  const int64_t nthr = threads_for(double(visible) * Hkv * D * 2 * esize * 4);
  int64_t nsplit = std::max<int64_t>(1, std::min<int64_t>(cdiv(L, 256), cdiv(4 * nthr, B * Hkv)));
  const int64_t chunk = cdiv(cdiv(L, nsplit), BK) * BK;
  nsplit = std::max<int64_t>(1, cdiv(L, chunk));
  at::Tensor part = empty_output({B * Hkv * nsplit * rows * W}, at::kFloat);
  const AttnDecodeArgs a{q, kc, vc, kv_dtype, lp, part.data_ptr<float>(), out, B, H, Hkv, Tq, L, D, nsplit, chunk, nthr,
                         (float)scale};
  cpu_kernels().decode_attention(a);
}

TORCH_LIBRARY_IMPL(fastlm, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("decode_attention", &decode_attention);
}

}  // namespace fastlm
