// The linear layers of generation, out[M x N] = x[M x K] W^T + bias, for the few rows of a
// decode step (one per sequence) and the many of a prefill (every prompt token), with the
// weight packed once into 48-column panels:
// weight_p[p, k, c] = W[48 p + c, k] (zero past N), each panel K x 48 contiguous. Reading
// the weight is what bounds a decode step, and this layout lets it be read once for all M
// rows, in address order: a thread takes whole panels and runs gemm.h's register-blocked
// micro-kernel down each one, so the hardware prefetchers see long sequential streams (a
// plain (K, N) layout read panel by panel jumps 4 N bytes per row, which for GPT-2's
// 50257-column output layer falls to a third of the read bandwidth). 48 columns are three
// AVX-512 vectors, so up to 8 rows take one pass (8 x 3 accumulators): a batch of 8 decode
// steps reads each weight byte once, from memory, while it computes. BLAS treats M = 1 as a
// matrix-vector product but pays for every further row (M = 8 costs 3-4x M = 1 here); here
// M rows cost about what one does while the weight's bytes dominate. Many rows (a prefill's
// prompt tokens) take one pass of 8 per panel, the 48 x K panel (48-144 KB for K = 256-768)
// staying in L2 between passes: 201-211 GFLOP/s on two cores for the small config's fc layer
// at M = 269 and the 124M config's at M = 512, against 186-188 and 160-169 for F.linear (MKL)
// on the plain weight (bench/test_generate.py "prefill product"). float32.
#include "common.h"
#include "gemm.h"

namespace fastlm {
namespace {

constexpr int64_t kPanel = 48;  // fastlm.reference.DECODE_PANEL
// Below both limits one thread finishes sooner than waking a second one pays back: weights
// under 512 KB, and products under 0.5 MFLOP (M = 8 rows of a 256 x 256 weight take ~16 us
// on one core, ~10 on two).
constexpr int64_t kParallelBytes = int64_t(512) << 10;
constexpr double kParallelFlops = 0.5e6;

#ifdef FASTLM_AVX512
constexpr int64_t kRows = 8;  // rows per pass: 8 x 3 accumulators of the 32 registers
constexpr int kPanelVectors = kPanel / 16;
// Rows of the panel the first pass prefetches ahead of itself, and into which cache. A
// one-row pass is bound by reading the weight: it wants each row in L1 just before it (32
// rows, 6 KB ahead). A pass of 8 rows spends 8x the arithmetic on each weight byte, and
// prefetching the same 6 KB into L1 leaves its loads waiting on memory between bursts of
// FMAs; 128 rows (24 KB) ahead into L2 keeps the stream going under the arithmetic: the
// small config's 8.4 MB output layer at M = 8 with its weight cold, 265 -> 230 us (-13%),
// and M = 16 453 -> 387 us; M = 2 and 4 gained nothing.
constexpr int64_t kAheadOne = 32, kAheadMany = 128;

template <int R, _mm_hint Hint>
void pass(int nv, const float* A, int64_t K, const float* Bp, float* C, int64_t ldc, __mmask16 last,
          const float* pf) {
  micro_nv<R, kPanelVectors, Hint>(nv, A, K, Bp, kPanel, C, ldc, K, last, true, pf);
}

// C[M x nc] += A[M x K] Bp over one K x 48 panel, in passes of up to 8 rows. The first pass
// streams the panel from memory and prefetches ahead of itself (the packed weight is one
// array, panels back to back, so near a panel's end this reaches into the next one); later
// passes (M > 8) re-read the panel from L2. For M = 1 the prefetch takes the small config's
// 8.4 MB output layer from ~156 to ~101 us a token (54 -> 83 GB/s).
void panel_product(int64_t M, int64_t nc, int64_t K, const float* A, const float* Bp, float* C, int64_t ldc) {
  const int nv = (int)cdiv(nc, 16);
  const __mmask16 last = tail_mask(nc - 16 * (nv - 1));
  for (int64_t m = 0; m < M;) {
    const int64_t r = std::min<int64_t>(kRows, M - m);
    const float* Am = A + m * K;
    float* Cm = C + m * ldc;
    if (m == 0 && r == kRows) {
      pass<8, _MM_HINT_T1>(nv, Am, K, Bp, Cm, ldc, last, Bp + kAheadMany * kPanel);
    } else {
      const float* pf = m == 0 ? Bp + kAheadOne * kPanel : nullptr;
      switch (r) {
        case 8: pass<8, _MM_HINT_T0>(nv, Am, K, Bp, Cm, ldc, last, pf); break;
        case 7: pass<7, _MM_HINT_T0>(nv, Am, K, Bp, Cm, ldc, last, pf); break;
        case 6: pass<6, _MM_HINT_T0>(nv, Am, K, Bp, Cm, ldc, last, pf); break;
        case 5: pass<5, _MM_HINT_T0>(nv, Am, K, Bp, Cm, ldc, last, pf); break;
        case 4: pass<4, _MM_HINT_T0>(nv, Am, K, Bp, Cm, ldc, last, pf); break;
        case 3: pass<3, _MM_HINT_T0>(nv, Am, K, Bp, Cm, ldc, last, pf); break;
        case 2: pass<2, _MM_HINT_T0>(nv, Am, K, Bp, Cm, ldc, last, pf); break;
        default: pass<1, _MM_HINT_T0>(nv, Am, K, Bp, Cm, ldc, last, pf); break;
      }
    }
    m += r;
  }
}
// C[r, 0..nc) = bias[0..nc) (or 0) for the M rows: the passes accumulate onto it.
void init_rows(int64_t M, int64_t nc, const float* bias, float* C, int64_t ldc) {
  for (int64_t c = 0; c < nc; c += 16) {
    const __mmask16 k = tail_mask(nc - c);
    const __m512 v = bias ? _mm512_maskz_loadu_ps(k, bias + c) : _mm512_setzero_ps();
    for (int64_t r = 0; r < M; ++r) _mm512_mask_storeu_ps(C + r * ldc + c, k, v);
  }
}
#else
void init_rows(int64_t M, int64_t nc, const float* bias, float* C, int64_t ldc) {
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = 0; c < nc; ++c) C[r * ldc + c] = bias ? bias[c] : 0.f;
}
void panel_product(int64_t M, int64_t nc, int64_t K, const float* A, const float* Bp, float* C, int64_t ldc) {
  gemm(M, nc, K, A, K, Bp, kPanel, C, ldc, true);
}
#endif

at::Tensor decode_linear(const at::Tensor& x_, const at::Tensor& wp, const c10::optional<at::Tensor>& bias_,
                         int64_t n) {
  FASTLM_CHECK_CPU(x_);
  FASTLM_CHECK_CPU(wp);
  TORCH_CHECK(x_.dim() == 2 && wp.dim() == 3 && wp.size(2) == kPanel && x_.size(1) == wp.size(1),
              "decode_linear: x must be (M, K) and weight_p (ceil(N / 48), K, 48), got ", x_.sizes(), " and ",
              wp.sizes());
  TORCH_CHECK(n >= 0 && cdiv(n, kPanel) == wp.size(0), "decode_linear: n = ", n, " does not match the ",
              wp.size(0), " panels of weight_p");
  TORCH_CHECK(x_.scalar_type() == at::kFloat && wp.scalar_type() == at::kFloat,
              "decode_linear: the CPU kernel takes float32");
  if (bias_) {
    FASTLM_CHECK_CPU((*bias_));
    TORCH_CHECK(bias_->dim() == 1 && bias_->size(0) == n && bias_->scalar_type() == at::kFloat,
                "decode_linear: bias must be float32 of shape (", n, ",)");
  }
  const int64_t M = x_.size(0), K = x_.size(1), N = n, P = wp.size(0);
  const at::Tensor x = x_.contiguous(), w = wp.contiguous();
  const at::Tensor bias = bias_ ? bias_->contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const float* A = x.data_ptr<float>();
  const float* B = w.data_ptr<float>();
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* C = out.data_ptr<float>();
  const bool one = K * N * 4 < kParallelBytes && 2.0 * M * K * N < kParallelFlops;
  const int64_t grain = one ? P : 1;
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c0 = p * kPanel, nc = std::min(kPanel, N - c0);
      init_rows(M, nc, b ? b + c0 : nullptr, C + c0, N);
      panel_product(M, nc, K, A, B + p * K * kPanel, C + c0, N);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm, CPU, m) { m.impl("decode_linear", &decode_linear); }

}  // namespace fastlm
