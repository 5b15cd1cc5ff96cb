// The CPU kernels' torch-free interface: the arguments of each kernel core, the table of
// entry points that every SIMD level fills in, and the choice of level at run time.
//
// Each kernel core (csrc/cpu/kernels/*.h) is written once over the vector layer (simd.h) and
// compiled once per SIMD level (csrc/cpu/isa/*.cpp), each level in its own namespace
// (fastlm::baseline, fastlm::avx2, fastlm::avx512, fastlm::avx512_vnni, fastlm::neon), as
// PyTorch compiles its CPU_CAPABILITY kernels. The torch glue (csrc/cpu/<op>.cpp) checks and
// allocates, then calls cpu_kernels().<entry>: the table of the level chosen at load time (the best one the
// CPU runs, or FASTLM_CPU_ISA), switchable for tests and benchmarks. Nothing here includes
// torch, so the same cores build into a plain C++ test driver (tests/cpu_kernels/) that
// checks every level, NEON included under qemu.
#pragma once

#include <atomic>
#include <cstdint>

namespace fastlm {

// Storage types of bf16 / fp16 tensors: the bits only (layout-compatible with c10's).
struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};

enum class Dtype : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

// ---- attention (kernels/attention.h); every pointer float32, contiguous (B, H, T, D) ----
constexpr int64_t kAttnBQ = 64;  // query rows per tile
constexpr int64_t kAttnBK = 64;  // keys per tile

// Where row (b, h, t) of a (B, H, T, D) tensor starts: b sb + h sh + t st floats from its
// base; the D elements of a row are contiguous. dense() is the contiguous (B, H, T, D) layout;
// a (B, T, H, D) tensor seen as (B, H, T, D) (heads split from one projection, or an output
// that merges its heads back for free) has sb = T H D, sh = D, st = H D.
struct Rows4 {
  int64_t sb, sh, st;
  static Rows4 dense(int64_t H, int64_t T, int64_t D) { return {H * T * D, T * D, D}; }
  static Rows4 tokens_major(int64_t H, int64_t T, int64_t D) { return {T * H * D, D, H * D}; }
  int64_t at(int64_t b, int64_t h, int64_t t) const { return b * sb + h * sh + t * st; }
};

struct AttnFwdArgs {
  const float *q, *k, *v;
  float* kt;         // scratch: K^T panels, B * Hkv * ceil(Tk / BK) * D * BK floats
  float *out, *lse;  // (B, H, Tq, D) in layout lo, (B, H, Tq) dense
  float* vc;         // scratch when V's rows are not adjacent (lv.st > D): B * Hkv * Tk * D floats; else null
  int64_t B, H, Hkv, Tq, Tk, D;
  bool causal;
  float scale;
  Rows4 lq, lk, lv, lo;
};

struct AttnBwdArgs {
  const float *q, *k, *v, *dout, *out, *lse;
  float *qt, *dot, *lse2, *delta;  // scratch: (B H, D, Tqp) twice, (B H, Tqp) twice
  float* dqt;                      // scratch: (nthr, B H, D, Tqp), one dQ^T per thread; null when Tq <= BQ
                                   // and Tk <= BK: each head's dQ then comes from one tile, written to dq
  float *dq, *dk, *dv;             // outputs
  float *qc, *doc;                 // scratch when q's / dout's rows are not adjacent: B * H * Tq * D floats; else null
  int64_t nthr;
  int64_t B, H, Hkv, Tq, Tqp, Tk, D;
  bool causal;
  float scale;
  Rows4 lq, lk, lv, ldo, lo, ldq, ldk, ldv;  // layouts of q, k, v, dout, out, dq, dk, dv
};

// Decode over a KV cache stored as float32, bf16 or fp16 (kv_dtype): the core converts the
// cache's rows to float32 as it loads them; q, out and the arithmetic are float32.
struct AttnDecodeArgs {
  const float* q;          // (B, H, Tq, D)
  const void *k, *v;       // (B, Hkv, L, D) of kv_dtype
  Dtype kv_dtype;          // f32, bf16 or f16
  const int64_t* lens;     // (B,)
  float* part;             // scratch: (B, Hkv, nsplit, G Tq, D + 2)
  float* out;              // (B, H, Tq, D)
  int64_t B, H, Hkv, Tq, L, D, nsplit, chunk, nthr;
  float scale;
};

// ---- normalization (kernels/norms.h); pointers of the storage dtype, statistics in float32
// (float64 for float64 inputs) ----
struct NormFwdArgs {
  Dtype dtype;
  bool rms;
  const void *x, *res, *w, *b;  // res, b may be null
  void *out, *h;                // h: x + res (only with res)
  void *mean, *rstd;            // mean: null for RMSNorm
  int64_t rows, C;
  double eps;
};

struct NormBwdArgs {
  Dtype dtype;
  bool rms;
  const void *dy, *dh, *h, *w, *mean, *rstd;  // dh, mean may be null
  void* dx;
  void *dw_part, *db_part;  // (nchunks, C) statistics dtype, zeroed; db_part may be null
  int64_t rows, C, nchunks;
};

// ---- GELU (kernels/gelu.h): y = gelu(x), or dx = dy gelu'(x) when dy is given ----
struct GeluArgs {
  Dtype dtype;
  const void *x, *dy;
  void* out;
  int64_t n;
};

// ---- generation's linear layer (kernels/linear.h): out[M, N] = x[M, K] W^T + bias with W
// packed as (ceil(N / 48), K, 48) panels; float32 ----
constexpr int64_t kDecodePanel = 48;  // fastlm.reference.DECODE_PANEL

struct LinearArgs {
  const float *x, *wp, *bias;  // bias may be null
  float* out;
  int64_t M, K, N;
};

// The same product with the weight stored in reduced precision (fastlm.reference.
// pack_decode_weight_q): bf16 / f16 panels (ceil(N / 48), K, 48) of 16-bit values, or panels
// of ceil(K / 32) blocks, 32 weights of one column along K sharing a float16 scale (as in
// llama.cpp's q8_0 and q4_0), the values in groups of 4 consecutive k per column, so that one
// 4-byte lane of an integer dot product is one column: q8_0, 8 x 48 x 4 int8 values
// q[g][c][t] of k = 4 g + t (the weight q * scale); q4_0, 4 x 48 x 4 bytes whose low 4 bits
// hold u of k = 4 g + t and high 4 bits u of k = 16 + 4 g + t (the weight (u - 8) * scale);
// each block's values followed by its 48 float16 scales. x, bias and out stay float32. For
// q8_0 and q4_0 the activations are rounded to q8_0 first (per row, blocks of 32 along K:
// d = max|x| / 127, q = round(x / d) as x (127 / max|x|) in float32, the value q d), as
// llama.cpp does, so that the products run on 8-bit integers.
enum class WeightFormat : int { bf16 = 0, f16 = 1, q8_0 = 2, q4_0 = 3 };
constexpr int64_t kQuantBlock = 32;                                            // fastlm.reference.QUANT_BLOCK
constexpr int64_t kQ8BlockBytes = kQuantBlock * kDecodePanel + 2 * kDecodePanel;  // int8 values, then f16 scales
constexpr int64_t kQ4BlockBytes = kQuantBlock / 2 * kDecodePanel + 2 * kDecodePanel;  // nibble pairs, then scales

struct LinearQArgs {
  WeightFormat format;
  const float* x;
  const void* wq;
  const float* bias;  // may be null
  float* out;
  int64_t M, K, N;
};

// ---- the rows of the fused linear + cross-entropy (kernels/loss.h): for each row i of z
// (R, V), loss[i] = logsumexp(z_i) - z_i[t_i]; with grad, z_i becomes
// s_i (softmax(z_i) - onehot(t_i)), s_i = row_scale[i] or scale; an ignored row: loss 0, zero
// gradient. float32 or float64 (dtype) ----
struct LossRowsArgs {
  Dtype dtype;
  void* z;
  void* loss;  // (R,)
  const int64_t* targets;
  const void* row_scale;  // may be null
  int64_t R, V, ignore_index;
  bool grad;
  double scale;
};

// ---- the optimizer step (kernels/optim.h) over n float32 tensors of sizes[i] elements ----
// sum_squares: the sum of x_i[j]^2 over every tensor (the squared global gradient norm).
struct SumSquaresArgs {
  const float* const* x;
  const int64_t* sizes;
  int64_t n;
};

// AdamW (decoupled weight decay, bias-corrected moments), in place, tensor i at step
// steps[i] (counted from 1, this step included), its gradient multiplied by grad_scale first
// (the clipping coefficient; 1 for none):
//   g = grad_scale grad; p = p (1 - lr wd); m = m + (1 - beta1) (g - m);
//   v = beta2 v + (1 - beta2) g^2; p = p - lr / (1 - beta1^t) m / (sqrt(v / (1 - beta2^t)) + eps)
struct AdamWArgs {
  float* const* params;
  const float* const* grads;
  float* const* exp_avg;
  float* const* exp_avg_sq;
  const int64_t* sizes;
  const double* steps;
  int64_t n;
  double lr, beta1, beta2, eps, weight_decay, grad_scale;
};

struct KernelTable {
  const char* name;
  void (*attention_fwd)(const AttnFwdArgs&);
  void (*attention_bwd)(const AttnBwdArgs&);
  void (*decode_attention)(const AttnDecodeArgs&);
  void (*norm_fwd)(const NormFwdArgs&);
  void (*norm_bwd)(const NormBwdArgs&);
  void (*gelu)(const GeluArgs&);
  void (*decode_linear)(const LinearArgs&);
  void (*loss_rows)(const LossRowsArgs&);
  void (*decode_linear_q)(const LinearQArgs&);
  double (*sum_squares)(const SumSquaresArgs&);
  void (*adamw)(const AdamWArgs&);
};

// One table per level compiled into this build (csrc/cpu/isa/*.cpp).
namespace baseline { const KernelTable* kernel_table(); }
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 { const KernelTable* kernel_table(); }
namespace avx512 { const KernelTable* kernel_table(); }
namespace avx512_vnni { const KernelTable* kernel_table(); }
#endif
#if defined(__aarch64__)
namespace neon { const KernelTable* kernel_table(); }
#endif

// The levels in ascending order, as (name, table, whether this CPU runs it) (dispatch.cpp).
struct IsaLevel {
  const char* name;
  const KernelTable* table;
  bool supported;
};
int isa_levels(const IsaLevel** levels);

// The table in use, and switching it (by name; false when the level is unknown, not built,
// or not supported by this CPU).
const KernelTable& cpu_kernels();
bool set_cpu_isa(const char* name);

// ---- planning helpers shared by the glue and the cores ----
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads worth waking for a call of this much work (floating-point operations or bytes
// moved): below about 4 million a single core finishes in tens of microseconds, less than
// waking and joining the others costs.
int64_t threads_for(double work);

// Outputs larger than this many bytes are written past the caches (non-temporal stores):
// half the last-level cache, as glibc's memcpy does for copies that would only evict it.
int64_t stream_threshold_bytes();

}  // namespace fastlm
