// One decode step of a GPT on the CPU as a single call: the token and position embeddings,
// every block, the final norm and the output layer, for one new token per sequence.
//
// It computes exactly what fastlm/models/decode.py's step computes when each of its ops is
// served by this extension's kernels (the same kernel cores, called in the same order on the
// same operands), and nothing else: a step of a small model is dozens of kernel calls of a
// few microseconds each, and going through Python and the dispatcher for each one costs
// more than the kernels themselves. The model family it covers: pre-norm blocks with
// LayerNorm or RMSNorm, learned or no positions, multi-head or grouped-query attention, a
// tanh-GELU MLP, biases optional, float32 activations; a KV cache of float32, bf16 or fp16
// (new rows rounded to nearest even as torch's .to() does, read by decode attention as
// stored); every other architecture runs the Python step.
//
// Per block, the stream being h + delta (delta the pending output of the previous block):
//   y, h = norm_1(delta + h)               (the first block: y = norm_1(x), h = x)
//   qkv = y W_qkv^T + b_qkv;  k, v of each row -> cache[b, :, positions[b]]
//   a = decode_attention(q, cache, attend_lens)      (B, H, 1, D) = (B, C)
//   y, h = norm_2(a W_o^T + b_o + h)
//   delta = gelu(y W_fc^T + b_fc) W_proj^T + b_proj
// then logits = norm_f(delta + h) W_head^T + b_head.
#include <cmath>
#include <cstring>

#include "common.h"

namespace fastlm {
namespace {

constexpr int64_t kPerLayer = 12;  // ln_1 w, b; qkv w, b; proj w, b; ln_2 w, b; fc w, b; mlp proj w, b

WeightFormat parse_format(c10::string_view f, bool* plain) {
  *plain = f == "f32";
  if (*plain) return WeightFormat::bf16;  // unused
  if (f == "bf16") return WeightFormat::bf16;
  if (f == "f16") return WeightFormat::f16;
  if (f == "q8_0") return WeightFormat::q8_0;
  if (f == "q4_0") return WeightFormat::q4_0;
  TORCH_CHECK_VALUE(false, "gpt_decode_step: weight format must be 'f32', 'bf16', 'f16', 'q8_0' or 'q4_0', got '", f,
                    "'");
}

// A linear layer's weight in the layout its kernel reads, checked once per call.
struct Linear {
  const void* w = nullptr;
  const float* b = nullptr;
  int64_t K = 0, N = 0;
  bool plain = true;
  WeightFormat format = WeightFormat::bf16;

  void operator()(const float* x, float* out, int64_t M) const {
    if (plain)
      cpu_kernels().decode_linear(LinearArgs{x, static_cast<const float*>(w), b, out, M, K, N});
    else
      cpu_kernels().decode_linear_q(LinearQArgs{format, x, w, b, out, M, K, N});
  }
};

// D float32 values into a cache of dtype t at element offset at: copied, or rounded to
// nearest even by c10's conversions (the ones torch's .to(bfloat16 / float16) uses).
void write_cache_row(void* cache, at::ScalarType t, int64_t at, const float* src, int64_t D) {
  if (t == at::kFloat) {
    std::memcpy(static_cast<float*>(cache) + at, src, D * sizeof(float));
  } else if (t == at::kBFloat16) {
    c10::BFloat16* dst = static_cast<c10::BFloat16*>(cache) + at;
    for (int64_t d = 0; d < D; ++d) dst[d] = c10::BFloat16(src[d]);
  } else {
    c10::Half* dst = static_cast<c10::Half*>(cache) + at;
    for (int64_t d = 0; d < D; ++d) dst[d] = c10::Half(src[d]);
  }
}

const at::Tensor& need(const c10::optional<at::Tensor>& t, const char* what, int64_t layer) {
  TORCH_CHECK_VALUE(t.has_value() && t->defined(), "gpt_decode_step: layer ", layer, "'s ", what, " is missing");
  return *t;
}

const float* f32_vector(const c10::optional<at::Tensor>& t, int64_t n, const char* what, int64_t layer,
                        bool required) {
  if (!t.has_value() || !t->defined()) {
    TORCH_CHECK_VALUE(!required, "gpt_decode_step: layer ", layer, "'s ", what, " is missing");
    return nullptr;
  }
  FASTLM_CHECK_CPU((*t));
  TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == n && t->is_contiguous(),
                    "gpt_decode_step: layer ", layer, "'s ", what, " must be a contiguous float32 (", n,
                    ",) tensor, got ", t->scalar_type(), " ", t->sizes());
  return t->data_ptr<float>();
}

Linear make_linear(const c10::optional<at::Tensor>& w_, const c10::optional<at::Tensor>& b_, int64_t K, int64_t N,
                   bool plain, WeightFormat format, const char* what, int64_t layer) {
  const at::Tensor& w = need(w_, what, layer);
  FASTLM_CHECK_CPU(w);
  const int64_t P = cdiv(N, kDecodePanel);
  if (plain) {
    TORCH_CHECK_VALUE(w.scalar_type() == at::kFloat && w.dim() == 3 && w.size(0) == P && w.size(1) == K &&
                          w.size(2) == kDecodePanel && w.is_contiguous(),
                      "gpt_decode_step: layer ", layer, "'s ", what, " weight must be packed float32 (", P, ", ", K,
                      ", ", kDecodePanel, "), got ", w.scalar_type(), " ", w.sizes());
  } else if (format == WeightFormat::q8_0 || format == WeightFormat::q4_0) {
    const int64_t bb = format == WeightFormat::q8_0 ? kQ8BlockBytes : kQ4BlockBytes;
    TORCH_CHECK_VALUE(w.scalar_type() == at::kByte && w.dim() == 3 && w.size(0) == P &&
                          w.size(1) == cdiv(K, kQuantBlock) && w.size(2) == bb && w.is_contiguous(),
                      "gpt_decode_step: layer ", layer, "'s ", what, " weight must be packed uint8 blocks (", P, ", ",
                      cdiv(K, kQuantBlock), ", ", bb, "), got ", w.scalar_type(), " ", w.sizes());
  } else {
    const auto want = format == WeightFormat::bf16 ? at::kBFloat16 : at::kHalf;
    TORCH_CHECK_VALUE(w.scalar_type() == want && w.dim() == 3 && w.size(0) == P && w.size(1) == K &&
                          w.size(2) == kDecodePanel && w.is_contiguous(),
                      "gpt_decode_step: layer ", layer, "'s ", what, " weight must be packed ", want, " (", P, ", ",
                      K, ", ", kDecodePanel, "), got ", w.scalar_type(), " ", w.sizes());
  }
  Linear l;
  l.w = w.data_ptr();
  l.b = f32_vector(b_, N, what, layer, false);
  l.K = K;
  l.N = N;
  l.plain = plain;
  l.format = format;
  return l;
}

at::Tensor gpt_decode_step(const at::Tensor& tokens_, const at::Tensor& positions_, const at::Tensor& attend_lens_,
                           const at::Tensor& wte, const c10::optional<at::Tensor>& wpe,
                           at::ArrayRef<c10::optional<at::Tensor>> weights, at::TensorList kv, int64_t n_head,
                           int64_t n_kv_head, int64_t hidden, bool rms, double eps, c10::string_view format,
                           const at::Tensor& head_w, const c10::optional<at::Tensor>& head_b,
                           c10::string_view head_format) {
  // ---- checks: every shape, dtype and index before any kernel runs ----
  FASTLM_CHECK_CPU(tokens_);
  FASTLM_CHECK_CPU(positions_);
  FASTLM_CHECK_CPU(attend_lens_);
  FASTLM_CHECK_CPU(wte);
  TORCH_CHECK_VALUE(wte.dim() == 2 && wte.scalar_type() == at::kFloat && wte.is_contiguous(),
                    "gpt_decode_step: wte must be a contiguous float32 (vocab, C) tensor");
  const int64_t V = wte.size(0), C = wte.size(1), B = tokens_.numel();
  TORCH_CHECK_VALUE(n_head >= 1 && n_kv_head >= 1 && n_head % n_kv_head == 0 && C % n_head == 0,
                    "gpt_decode_step: n_head must be a multiple of n_kv_head and divide C");
  const int64_t H = n_head, Hkv = n_kv_head, D = C / H, Nqkv = (H + 2 * Hkv) * D;
  TORCH_CHECK_VALUE(D <= 256, "gpt_decode_step: head size must be at most 256, got ", D);
  TORCH_CHECK_VALUE(kv.size() % 2 == 0 && weights.size() == size_t(kPerLayer) * (kv.size() / 2) + 2,
                    "gpt_decode_step: need ", kPerLayer, " weights per layer plus the final norm's 2, and a key and ",
                    "a value cache per layer; got ", weights.size(), " weights and ", kv.size(), " caches");
  const int64_t n_layer = kv.size() / 2;
  auto longs = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.numel() == B && (t.scalar_type() == at::kLong || t.scalar_type() == at::kInt),
                      "gpt_decode_step: ", name, " must be int32/int64 with one entry per token (", B, ")");
    return t.to(at::kLong).contiguous();
  };
  const at::Tensor tokens = longs(tokens_, "tokens"), positions = longs(positions_, "positions"),
                   lens = longs(attend_lens_, "attend_lens");
  const int64_t *tok = tokens.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>(),
                *lp = lens.data_ptr<int64_t>();
  int64_t L = -1;
  const at::ScalarType cache_t = n_layer ? kv[0].scalar_type() : at::kFloat;
  TORCH_CHECK_TYPE(cache_t == at::kFloat || cache_t == at::kBFloat16 || cache_t == at::kHalf,
                   "gpt_decode_step: the KV cache must be float32, bfloat16 or float16, got ", cache_t);
  for (int64_t i = 0; i < 2 * n_layer; ++i) {
    const at::Tensor& c = kv[i];
    FASTLM_CHECK_CPU(c);
    if (L < 0) L = c.dim() == 4 ? c.size(2) : 0;
    TORCH_CHECK_VALUE(c.scalar_type() == cache_t && c.dim() == 4 && c.size(0) == B && c.size(1) == Hkv &&
                          c.size(2) == L && c.size(3) == D && c.is_contiguous(),
                      "gpt_decode_step: each cache must be a contiguous float32, bfloat16 or float16 (", B, ", ",
                      Hkv, ", L, ", D, ") tensor, all of one dtype (", cache_t, "), got ", c.scalar_type(), " ",
                      c.sizes());
  }
  const float* wpe_p = nullptr;
  if (wpe.has_value() && wpe->defined()) {
    FASTLM_CHECK_CPU((*wpe));
    TORCH_CHECK_VALUE(wpe->dim() == 2 && wpe->size(1) == C && wpe->scalar_type() == at::kFloat && wpe->is_contiguous(),
                      "gpt_decode_step: wpe must be a contiguous float32 (block_size, C) tensor");
    wpe_p = wpe->data_ptr<float>();
  }
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(tok[b] >= 0 && tok[b] < V, "gpt_decode_step: token ", tok[b], " is outside the vocabulary [0, ",
                      V, ")");
    // (no blocks, no caches: only the position table bounds the position)
    TORCH_CHECK_VALUE(pos[b] >= 0 && (n_layer == 0 || pos[b] < L) && (!wpe_p || pos[b] < wpe->size(0)),
                      "gpt_decode_step: position ", pos[b], " is outside the cache or the position table");
    TORCH_CHECK_VALUE(n_layer == 0 || (lp[b] <= L && lp[b] > pos[b]), "gpt_decode_step: attend_lens[", b, "] = ",
                      lp[b], " must cover the new token's position ", pos[b], " and stay within the cache (", L, ")");
  }
  bool plain, head_plain;
  const WeightFormat fmt = parse_format(format, &plain), head_fmt = parse_format(head_format, &head_plain);
  struct Layer {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    Linear qkv, proj, fc, mproj;
  };
  std::vector<Layer> layers(n_layer);
  for (int64_t i = 0; i < n_layer; ++i) {
    const auto* w = weights.data() + i * kPerLayer;
    Layer& l = layers[i];
    l.ln1_w = f32_vector(w[0], C, "ln_1 weight", i, true);
    l.ln1_b = rms ? nullptr : f32_vector(w[1], C, "ln_1 bias", i, false);
    l.qkv = make_linear(w[2], w[3], C, Nqkv, plain, fmt, "attention input projection", i);
    l.proj = make_linear(w[4], w[5], C, C, plain, fmt, "attention output projection", i);
    l.ln2_w = f32_vector(w[6], C, "ln_2 weight", i, true);
    l.ln2_b = rms ? nullptr : f32_vector(w[7], C, "ln_2 bias", i, false);
    l.fc = make_linear(w[8], w[9], C, hidden, plain, fmt, "MLP input projection", i);
    l.mproj = make_linear(w[10], w[11], hidden, C, plain, fmt, "MLP output projection", i);
  }
  const auto* wf = weights.data() + n_layer * kPerLayer;
  const float* lnf_w = f32_vector(wf[0], C, "final norm weight", n_layer, true);
  const float* lnf_b = rms ? nullptr : f32_vector(wf[1], C, "final norm bias", n_layer, false);
  const Linear head = make_linear(head_w, head_b, C, V, head_plain, head_fmt, "output layer", n_layer);

  // ---- the step ----
  at::Tensor logits = at::empty({B, V}, wte.options());
  if (B == 0) return logits;
  // scratch, one block: x/h twice (ping-pong), delta, y, qkv, q, attention out, MLP hidden,
  // norm statistics
  const int64_t nscratch = 4 * B * C + B * Nqkv + B * H * D + B * C + B * hidden + 2 * B;
  at::Tensor scratch = at::empty({nscratch}, wte.options());
  float* p = scratch.data_ptr<float>();
  float* hbuf[2] = {p, p + B * C};
  float* delta = p + 2 * B * C;
  float* y = p + 3 * B * C;
  float* qkv = p + 4 * B * C;
  float* q = qkv + B * Nqkv;
  float* att = q + B * H * D;
  float* mlp = att + B * C;
  float* mean = mlp + B * hidden;
  float* rstd = mean + B;

  const float* we = wte.data_ptr<float>();
  float* h = hbuf[0];
  for (int64_t b = 0; b < B; ++b) {
    const float* e = we + tok[b] * C;
    float* hb = h + b * C;
    if (wpe_p) {
      const float* pe = wpe_p + pos[b] * C;
      for (int64_t c = 0; c < C; ++c) hb[c] = e[c] + pe[c];
    } else {
      std::memcpy(hb, e, C * sizeof(float));
    }
  }
  const Dtype f32 = Dtype::f32;
  // norm of (x + res) into out; the sum into hout (res null: out = norm(x))
  auto norm = [&](const float* x, const float* res, const float* w, const float* bias, float* out, float* hout) {
    cpu_kernels().norm_fwd(NormFwdArgs{f32, rms, x, res, w, bias, out, res ? hout : nullptr, rms ? nullptr : mean,
                                       rstd, B, C, eps});
  };
  const double scale = 1.0 / std::sqrt(double(D));
  const size_t row_bytes = D * sizeof(float);
  int cur = 0;  // hbuf[cur] holds h
  for (int64_t i = 0; i < n_layer; ++i) {
    const Layer& l = layers[i];
    if (i == 0) {
      norm(h, nullptr, l.ln1_w, l.ln1_b, y, nullptr);
    } else {
      norm(delta, hbuf[cur], l.ln1_w, l.ln1_b, y, hbuf[cur ^ 1]);
      cur ^= 1;
    }
    l.qkv(y, qkv, B);
    void *kc = kv[2 * i].data_ptr(), *vc = kv[2 * i + 1].data_ptr();
    for (int64_t b = 0; b < B; ++b) {
      const float* row = qkv + b * Nqkv;
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        const int64_t at_ = ((b * Hkv + hk) * L + pos[b]) * D;
        write_cache_row(kc, cache_t, at_, row + (H + hk) * D, D);
        write_cache_row(vc, cache_t, at_, row + (H + Hkv + hk) * D, D);
      }
      std::memcpy(q + b * H * D, row, H * row_bytes);
    }
    run_decode_attention(q, kc, vc, kernel_dtype(cache_t), lp, att, B, H, Hkv, 1, L, D, scale);
    l.proj(att, delta, B);
    norm(delta, hbuf[cur], l.ln2_w, l.ln2_b, y, hbuf[cur ^ 1]);
    cur ^= 1;
    l.fc(y, mlp, B);
    cpu_kernels().gelu(GeluArgs{f32, mlp, nullptr, mlp, B * hidden});
    l.mproj(mlp, delta, B);
  }
  if (n_layer == 0)
    norm(hbuf[cur], nullptr, lnf_w, lnf_b, y, nullptr);
  else
    norm(delta, hbuf[cur], lnf_w, lnf_b, y, hbuf[cur ^ 1]);
  head(y, logits.data_ptr<float>(), B);
  return logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("gpt_decode_step", &gpt_decode_step); }

}  // namespace fastlm
