// The vector layer of fastlm's CPU kernels: W lanes of float32, one section per SIMD level
// with the same functions, so that a kernel is written once and compiled for each level.
//
//   level      W   registers  notes
//   avx512    16   32         masked loads/stores, scalef, two-source permutes
//   avx2       8   16         FMA, F16C; tails through maskload/maskstore or a stack copy
//   neon       4   32         aarch64 Advanced SIMD (FMA, fp16 conversion, pairwise adds)
//   generic    4   -          GCC/Clang vector extensions: SSE2 on x86-64, any other CPU
//
// Functions (vf: a vector of W floats; T: float, bf16 or f16 storage, converted to float32):
//   zero(), set1(x), load(const T* p), load(p, n) (first n lanes, the rest 0), store(T* p, v),
//   store(p, v, n) (first n lanes), add/sub/mul/div/max/min, fma(a, b, c) = a b + c,
//   fnma(a, b, c) = c - a b, first_n(n, yes, no) (lanes < n from yes, others from no),
//   select_ge(a, b, yes, no) (yes where a >= b, else no),
//   reduce_add, reduce_max, round_trip(v, T*) (v as stored in T and read back),
//   transpose_sum(acc[W]) (lane c = the sum of acc[c]'s lanes), transpose_block(r[W]) (a W x W
//   block transposed in registers), exp, exp2, stream(p, v)
//   (a non-temporal store to a vector-aligned p; an ordinary store where the level has none)
//   and stream_fence() after a run of them; load(const int8_t* p) / load(const uint8_t* p): W
//   signed / unsigned bytes as floats (the quantized weights of generation's linear layers).
// A tail count n is in [0, W]. Included by csrc/cpu/isa/kernels.inc inside the level's
// namespace, after every system header, with exactly one FASTLM_SIMD_* defined.
#pragma once

namespace simd {

// ===================================================================== AVX-512
#if defined(FASTLM_SIMD_AVX512)
constexpr int W = 16;
using vf = __m512;

inline __mmask16 mask_n(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }
inline vf zero() { return _mm512_setzero_ps(); }
inline vf set1(float x) { return _mm512_set1_ps(x); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf sqrt(vf a) { return _mm512_sqrt_ps(a); }
inline vf max(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf min(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf fnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
inline vf first_n(int64_t n, vf yes, vf no) { return _mm512_mask_blend_ps(mask_n(n), no, yes); }
inline vf select_ge(vf a, vf b, vf yes, vf no) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GE_OQ), no, yes); }
inline float reduce_add(vf v) { return _mm512_reduce_add_ps(v); }
inline float reduce_max(vf v) { return _mm512_reduce_max_ps(v); }
inline vf round_nearest(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p 2^n for integer-valued n (any range: scalef saturates and flushes as the value requires)
inline vf scale_pow2(vf p, vf n) { return _mm512_scalef_ps(p, n); }

inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline vf load(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(mask_n(n), p); }
inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline void store(float* p, vf v, int64_t n) { _mm512_mask_storeu_ps(p, mask_n(n), v); }

inline vf bf16_bits_to_f32(__m256i u) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(u), 16)); }
inline __m256i f32_to_bf16_bits(vf v) {  // round to nearest even; NaN stays a quiet NaN
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}
inline __m256i f32_to_f16_bits(vf v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf load(const bf16* p) { return bf16_bits_to_f32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline vf load(const bf16* p, int64_t n) { return bf16_bits_to_f32(_mm256_maskz_loadu_epi16(mask_n(n), p)); }
inline vf load(const f16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline vf load(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))); }
inline vf load(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))); }
inline vf load(const f16* p, int64_t n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask_n(n), p)); }
inline void store(bf16* p, vf v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), f32_to_bf16_bits(v)); }
inline void store(bf16* p, vf v, int64_t n) { _mm256_mask_storeu_epi16(p, mask_n(n), f32_to_bf16_bits(v)); }
inline void store(f16* p, vf v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), f32_to_f16_bits(v)); }
inline void store(f16* p, vf v, int64_t n) { _mm256_mask_storeu_epi16(p, mask_n(n), f32_to_f16_bits(v)); }
inline vf round_trip(vf v, const bf16*) { return bf16_bits_to_f32(f32_to_bf16_bits(v)); }
inline vf round_trip(vf v, const f16*) { return _mm512_cvtph_ps(f32_to_f16_bits(v)); }
inline void stream(float* p, vf v) { _mm512_stream_ps(p, v); }
inline void stream(bf16* p, vf v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), f32_to_bf16_bits(v)); }
inline void stream(f16* p, vf v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), f32_to_f16_bits(v)); }
inline void stream_fence() { _mm_sfence(); }

// Index vectors of the 16-to-1 transposing reduction: level l combines pairs (x, y) of
// vectors holding n = 2^l keys with p = 16 / n partial sums each (p consecutive lanes per
// key) into one vector holding 2n keys with p / 2 partials each: out = A + B, where A takes
// the first half of every key's lanes (x's keys, then y's) and B the second half.
struct ReduceIndex {
  alignas(64) int32_t a[4][16]{}, b[4][16]{};
  constexpr ReduceIndex() {
    for (int l = 0; l < 4; ++l) {
      const int n = 1 << l, p = 16 / n, h = p / 2;
      for (int k = 0; k < 2 * n; ++k)
        for (int i = 0; i < h; ++i) {
          const int src = (k < n ? 0 : 16) + (k % n) * p + i;
          a[l][k * h + i] = src;
          b[l][k * h + i] = src + h;
        }
    }
  }
};
constexpr ReduceIndex kReduceIndex{};

// 15 two-source permutes and adds instead of 16 horizontal sums; overwrites acc.
__attribute__((always_inline)) inline vf transpose_sum(vf* acc) {
#pragma GCC unroll 4
  for (int l = 0; l < 4; ++l) {
    const __m512i ia = _mm512_load_si512(kReduceIndex.a[l]), ib = _mm512_load_si512(kReduceIndex.b[l]);
    const int pairs = 8 >> l;
#pragma GCC unroll 8
    for (int t = 0; t < pairs; ++t)
      acc[t] = _mm512_add_ps(_mm512_permutex2var_ps(acc[2 * t], ia, acc[2 * t + 1]),
                             _mm512_permutex2var_ps(acc[2 * t], ib, acc[2 * t + 1]));
  }
  return acc[0];
}

// The 16 x 16 block r[0..16) transposed in place (r[c] becomes column c): unpacks, in-lane
// shuffles, then two rounds of 128-bit lane shuffles.
__attribute__((always_inline)) inline void transpose_block(vf* r) {
  vf t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h)
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
      t[8 * h + 4 + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + 4 + i], 0xDD);
    }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
  }
}

// ===================================================================== AVX2 + FMA + F16C
#elif defined(FASTLM_SIMD_AVX2)
constexpr int W = 8;
using vf = __m256;

alignas(64) constexpr int32_t kMaskTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
inline __m256i mask_n(int64_t n) {
  n = n < 0 ? 0 : (n > 8 ? 8 : n);
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kMaskTable + 8 - n));
}
inline vf zero() { return _mm256_setzero_ps(); }
inline vf set1(float x) { return _mm256_set1_ps(x); }
inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf sqrt(vf a) { return _mm256_sqrt_ps(a); }
inline vf max(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf min(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf fnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
inline vf first_n(int64_t n, vf yes, vf no) { return _mm256_blendv_ps(no, yes, _mm256_castsi256_ps(mask_n(n))); }
inline vf select_ge(vf a, vf b, vf yes, vf no) { return _mm256_blendv_ps(no, yes, _mm256_cmp_ps(a, b, _CMP_GE_OQ)); }
inline float reduce_add(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float reduce_max(vf v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline vf round_nearest(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf pow2i(vf n) {  // 2^n for integer-valued n in [-126, 127]
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}

inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline vf load(const float* p, int64_t n) { return _mm256_maskload_ps(p, mask_n(n)); }
inline void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline void store(float* p, vf v, int64_t n) { _mm256_maskstore_ps(p, mask_n(n), v); }

inline vf bf16_bits_to_f32(__m128i u) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(u), 16)); }
inline __m128i f32_to_bf16_bits(vf v) {  // round to nearest even; NaN stays a quiet NaN
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  // 32 -> 16 bits (values fit, so the unsigned saturation is exact), then the two 64-bit
  // halves that hold lanes 0-3 and 4-7 side by side
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  return _mm256_castsi256_si128(packed);
}
inline __m128i f32_to_f16_bits(vf v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf load(const bf16* p) { return bf16_bits_to_f32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vf load(const f16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vf load(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))); }
inline vf load(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))); }
inline void store(bf16* p, vf v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), f32_to_bf16_bits(v)); }
inline void store(f16* p, vf v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), f32_to_f16_bits(v)); }
inline vf round_trip(vf v, const bf16*) { return bf16_bits_to_f32(f32_to_bf16_bits(v)); }
inline vf round_trip(vf v, const f16*) { return _mm256_cvtph_ps(f32_to_f16_bits(v)); }
inline void stream(float* p, vf v) { _mm256_stream_ps(p, v); }
inline void stream(bf16* p, vf v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), f32_to_bf16_bits(v)); }
inline void stream(f16* p, vf v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), f32_to_f16_bits(v)); }
inline void stream_fence() { _mm_sfence(); }
#define FASTLM_SIMD_COPY_TAILS_16BIT 1

// Lane c of the result is the sum of acc[c]'s lanes, for the 8 vectors acc[0..8).
__attribute__((always_inline)) inline vf transpose_sum(vf* acc) {
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // per 128-bit half: keys 0-3, 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// The 8 x 8 block r[0..8) transposed in place (r[c] becomes column c).
__attribute__((always_inline)) inline void transpose_block(vf* r) {
  vf t[8], u[8];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
  }
}

// ===================================================================== NEON (aarch64)
#elif defined(FASTLM_SIMD_NEON)
constexpr int W = 4;
using vf = float32x4_t;

inline uint32x4_t mask_n(int64_t n) {
  const uint32_t idx[4] = {0, 1, 2, 3};
  return vcltq_u32(vld1q_u32(idx), vdupq_n_u32(static_cast<uint32_t>(n < 0 ? 0 : n)));
}
inline vf zero() { return vdupq_n_f32(0.f); }
inline vf set1(float x) { return vdupq_n_f32(x); }
inline vf add(vf a, vf b) { return vaddq_f32(a, b); }
inline vf sub(vf a, vf b) { return vsubq_f32(a, b); }
inline vf mul(vf a, vf b) { return vmulq_f32(a, b); }
inline vf div(vf a, vf b) { return vdivq_f32(a, b); }
inline vf sqrt(vf a) { return vsqrtq_f32(a); }
inline vf max(vf a, vf b) { return vmaxq_f32(a, b); }
inline vf min(vf a, vf b) { return vminq_f32(a, b); }
inline vf fma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
inline vf fnma(vf a, vf b, vf c) { return vfmsq_f32(c, a, b); }
inline vf first_n(int64_t n, vf yes, vf no) { return vbslq_f32(mask_n(n), yes, no); }
inline vf select_ge(vf a, vf b, vf yes, vf no) { return vbslq_f32(vcgeq_f32(a, b), yes, no); }
inline float reduce_add(vf v) { return vaddvq_f32(v); }
inline float reduce_max(vf v) { return vmaxvq_f32(v); }
inline vf round_nearest(vf x) { return vrndnq_f32(x); }
inline vf pow2i(vf n) {
  return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23));
}

inline vf load(const float* p) { return vld1q_f32(p); }
inline void store(float* p, vf v) { vst1q_f32(p, v); }
inline vf load(const bf16* p) {
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
}
inline uint16x4_t f32_to_bf16_bits(vf v) {
  const uint32x4_t u = vreinterpretq_u32_f32(v);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
  uint32x4_t r = vshrq_n_u32(vaddq_u32(u, vaddq_u32(lsb, vdupq_n_u32(0x7fff))), 16);
  r = vbslq_u32(vceqq_f32(v, v), r, vdupq_n_u32(0x7fc0));  // NaN (v != v): a quiet NaN
  return vmovn_u32(r);
}
inline void store(bf16* p, vf v) { vst1_u16(reinterpret_cast<uint16_t*>(p), f32_to_bf16_bits(v)); }
inline vf load(const f16* p) { return vcvt_f32_f16(vld1_f16(reinterpret_cast<const float16_t*>(p))); }
inline vf load(const int8_t* p) {
  int32_t four;
  __builtin_memcpy(&four, p, 4);
  return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four))))));
}
inline vf load(const uint8_t* p) {
  uint32_t four;
  __builtin_memcpy(&four, p, 4);
  return vcvtq_f32_u32(vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(four))))));
}
inline void store(f16* p, vf v) { vst1_f16(reinterpret_cast<float16_t*>(p), vcvt_f16_f32(v)); }
inline vf round_trip(vf v, const bf16*) { return vreinterpretq_f32_u32(vshll_n_u16(f32_to_bf16_bits(v), 16)); }
inline vf round_trip(vf v, const f16*) { return vcvt_f32_f16(vcvt_f16_f32(v)); }
#define FASTLM_SIMD_COPY_TAILS 1

__attribute__((always_inline)) inline vf transpose_sum(vf* acc) {
  return vpaddq_f32(vpaddq_f32(acc[0], acc[1]), vpaddq_f32(acc[2], acc[3]));
}

// The 4 x 4 block r[0..4) transposed in place (r[c] becomes column c).
__attribute__((always_inline)) inline void transpose_block(vf* r) {
  const float32x4x2_t a = vtrnq_f32(r[0], r[1]), b = vtrnq_f32(r[2], r[3]);
  r[0] = vcombine_f32(vget_low_f32(a.val[0]), vget_low_f32(b.val[0]));
  r[1] = vcombine_f32(vget_low_f32(a.val[1]), vget_low_f32(b.val[1]));
  r[2] = vcombine_f32(vget_high_f32(a.val[0]), vget_high_f32(b.val[0]));
  r[3] = vcombine_f32(vget_high_f32(a.val[1]), vget_high_f32(b.val[1]));
}

// ===================================================================== generic (vector extensions)
#elif defined(FASTLM_SIMD_GENERIC)
constexpr int W = 4;
typedef float vf __attribute__((vector_size(16)));
typedef int32_t vi __attribute__((vector_size(16)));

inline vi lane_index() { return vi{0, 1, 2, 3}; }
inline vf zero() { return vf{0.f, 0.f, 0.f, 0.f}; }
inline vf set1(float x) { return vf{x, x, x, x}; }
inline vf add(vf a, vf b) { return a + b; }
inline vf sub(vf a, vf b) { return a - b; }
inline vf mul(vf a, vf b) { return a * b; }
inline vf div(vf a, vf b) { return a / b; }
inline vf sqrt(vf a) { return vf{std::sqrt(a[0]), std::sqrt(a[1]), std::sqrt(a[2]), std::sqrt(a[3])}; }
inline vf max(vf a, vf b) { return a > b ? a : b; }
inline vf min(vf a, vf b) { return a < b ? a : b; }
inline vf fma(vf a, vf b, vf c) { return a * b + c; }
inline vf fnma(vf a, vf b, vf c) { return c - a * b; }
inline vf first_n(int64_t n, vf yes, vf no) {
  const vi k = lane_index() < static_cast<int32_t>(n < 0 ? 0 : (n > 4 ? 4 : n));
  return k ? yes : no;
}
inline vf select_ge(vf a, vf b, vf yes, vf no) { return a >= b ? yes : no; }
inline float reduce_add(vf v) { return (v[0] + v[1]) + (v[2] + v[3]); }
inline float reduce_max(vf v) {
  const float a = v[0] > v[1] ? v[0] : v[1], b = v[2] > v[3] ? v[2] : v[3];
  return a > b ? a : b;
}
inline vf round_nearest(vf x) {  // for |x| < 2^22: adding 1.5 2^23 leaves no fraction bits
  const vf magic = set1(12582912.f);
  return (x + magic) - magic;
}
inline vf pow2i(vf n) {
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf r;
  __builtin_memcpy(&r, &e, sizeof r);
  return r;
}

inline vf load(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
inline float bf16_to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if (f != f) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
// IEEE half <-> float, round to nearest even (subnormals, infinities and NaN included).
inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half: man 2^-24
    float f = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_f16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  const uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return sign | 0x7c00 | (a > 0x7f800000u ? 0x200 : 0);  // inf, NaN
  if (a >= 0x477ff000u) return sign | 0x7c00;                                    // rounds past 65504
  if (a >= 0x38800000u) {                                                         // normal half
    const uint32_t r = a + 0xfff + ((a >> 13) & 1) - (112u << 23);
    return sign | static_cast<uint16_t>(r >> 13);
  }
  // subnormal half (or zero): round a / 2^-24 to an integer, nearest even
  float v;
  __builtin_memcpy(&v, &a, 4);
  v *= 16777216.f;
  const float fl = static_cast<float>(static_cast<int32_t>(v));
  float diff = v - fl;
  int32_t m = static_cast<int32_t>(fl);
  if (diff > 0.5f || (diff == 0.5f && (m & 1))) ++m;
  return sign | static_cast<uint16_t>(m);
}
inline vf load(const bf16* p) { return vf{bf16_to_float(p[0].bits), bf16_to_float(p[1].bits), bf16_to_float(p[2].bits), bf16_to_float(p[3].bits)}; }
inline vf load(const f16* p) { return vf{f16_to_float(p[0].bits), f16_to_float(p[1].bits), f16_to_float(p[2].bits), f16_to_float(p[3].bits)}; }
inline vf load(const int8_t* p) { return vf{float(p[0]), float(p[1]), float(p[2]), float(p[3])}; }
inline vf load(const uint8_t* p) { return vf{float(p[0]), float(p[1]), float(p[2]), float(p[3])}; }
inline void store(bf16* p, vf v) {
  for (int i = 0; i < 4; ++i) p[i].bits = float_to_bf16(v[i]);
}
inline void store(f16* p, vf v) {
  for (int i = 0; i < 4; ++i) p[i].bits = float_to_f16(v[i]);
}
inline vf round_trip(vf v, const bf16*) {
  for (int i = 0; i < 4; ++i) v[i] = bf16_to_float(float_to_bf16(v[i]));
  return v;
}
inline vf round_trip(vf v, const f16*) {
  for (int i = 0; i < 4; ++i) v[i] = f16_to_float(float_to_f16(v[i]));
  return v;
}
#define FASTLM_SIMD_COPY_TAILS 1

inline vf transpose_sum(vf* acc) {
  return vf{reduce_add(acc[0]), reduce_add(acc[1]), reduce_add(acc[2]), reduce_add(acc[3])};
}

// The 4 x 4 block r[0..4) transposed in place (r[c] becomes column c).
inline void transpose_block(vf* r) {
  const vf a = r[0], b = r[1], c = r[2], d = r[3];
  r[0] = vf{a[0], b[0], c[0], d[0]};
  r[1] = vf{a[1], b[1], c[1], d[1]};
  r[2] = vf{a[2], b[2], c[2], d[2]};
  r[3] = vf{a[3], b[3], c[3], d[3]};
}
#else
#error "simd.h: define one of FASTLM_SIMD_AVX512, FASTLM_SIMD_AVX2, FASTLM_SIMD_NEON, FASTLM_SIMD_GENERIC"
#endif

// ===================================================================== common to every level
inline vf round_trip(vf v, const float*) { return v; }

#if !defined(FASTLM_SIMD_AVX512) && !defined(FASTLM_SIMD_AVX2)
// No non-temporal stores here: plain ones.
template <typename T>
inline void stream(T* p, vf v) { store(p, v); }
inline void stream_fence() {}
#endif

// A full-vector store of an output that is written once and not read back soon: past the
// caches (non-temporal) when `nt` (the caller checked p's alignment to a whole vector), so
// that the store does not first read the line it overwrites; else an ordinary store.
template <typename T>
inline void put(T* p, vf v, bool nt) {
  if (nt) stream(p, v);
  else store(p, v);
}
template <typename T>
inline bool vector_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * W) == 0;
}

#if defined(FASTLM_SIMD_COPY_TAILS) || defined(FASTLM_SIMD_COPY_TAILS_16BIT)
// Tails without masked memory access: through a zeroed stack copy of the n valid elements.
template <typename T>
inline vf load_tail(const T* p, int64_t n) {
  alignas(64) T buf[W] = {};
  __builtin_memcpy(buf, p, sizeof(T) * static_cast<size_t>(n));
  return load(static_cast<const T*>(buf));
}
template <typename T>
inline void store_tail(T* p, vf v, int64_t n) {
  alignas(64) T buf[W];
  store(buf, v);
  __builtin_memcpy(p, buf, sizeof(T) * static_cast<size_t>(n));
}
inline vf load(const bf16* p, int64_t n) { return load_tail(p, n); }
inline vf load(const f16* p, int64_t n) { return load_tail(p, n); }
inline void store(bf16* p, vf v, int64_t n) { store_tail(p, v, n); }
inline void store(f16* p, vf v, int64_t n) { store_tail(p, v, n); }
#endif
#if defined(FASTLM_SIMD_COPY_TAILS)
inline vf load(const float* p, int64_t n) { return load_tail(p, n); }
inline void store(float* p, vf v, int64_t n) { store_tail(p, v, n); }
#endif

// dst[0..n) = src[0..n) as float32 (float copied, bf16 / f16 widened), a vector at a time with a
// masked tail: for short rows (a head's, a panel's), where a library copy costs more in its
// call than in its copying.
template <typename T>
inline void to_f32(const T* src, int64_t n, float* dst) {
  int64_t j = 0;
  for (; j + W <= n; j += W) store(dst + j, load(src + j));
  if (j < n) store(dst + j, load(src + j, n - j), n - j);
}

// dst[c * ds + r] = scale src[r * ss + c] for r < R, c < C: W x W blocks through registers
// (transpose_block), the edges element by element. For the small transposes of a kernel's
// tiles (a head's K^T, Q^T), where one scalar store per element was the cost.
inline void transpose(const float* src, int64_t ss, int64_t R, int64_t C, float* dst, int64_t ds,
                      float scale = 1.0f) {
  const vf sv = set1(scale);
  int64_t r0 = 0;
  for (; r0 + W <= R; r0 += W) {
    int64_t c0 = 0;
    for (; c0 + W <= C; c0 += W) {
      vf v[W];
      for (int i = 0; i < W; ++i) v[i] = load(src + (r0 + i) * ss + c0);
      transpose_block(v);
      for (int i = 0; i < W; ++i) store(dst + (c0 + i) * ds + r0, mul(v[i], sv));
    }
    for (; c0 < C; ++c0)
      for (int i = 0; i < W; ++i) dst[c0 * ds + r0 + i] = src[(r0 + i) * ss + c0] * scale;
  }
  for (; r0 < R; ++r0)
    for (int64_t c = 0; c < C; ++c) dst[c * ds + r0] = src[r0 * ss + c] * scale;
}

#if !defined(FASTLM_SIMD_AVX512)
inline vf scale_pow2(vf p, vf n) {  // p 2^n for integer-valued n in [-126, 127]
  return mul(p, pow2i(n));
}
#endif

// exp(x): x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial (relative error
// ~2 ulp), scaled by 2^n. Inputs are clamped to [-87.3, 88.3], so large positive x
// saturates near 2e38 and large negative x gives ~1e-38 rather than 0.
inline vf exp(vf x) {
  x = min(max(x, set1(-87.3f)), set1(88.3f));
  const vf n = round_nearest(mul(x, set1(1.44269504088896341f)));
  vf r = fnma(n, set1(0.693359375f), x);
  r = fnma(n, set1(-2.12194440e-4f), r);
  vf p = set1(1.9875691500e-4f);
  p = fma(p, r, set1(1.3981999507e-3f));
  p = fma(p, r, set1(8.3334519073e-3f));
  p = fma(p, r, set1(4.1665795894e-2f));
  p = fma(p, r, set1(1.6666665459e-1f));
  p = fma(p, r, set1(5.0000001201e-1f));
  p = fma(p, mul(r, r), add(r, set1(1.0f)));
  return scale_pow2(p, n);
}

// 2^x for x <= 0 (or -inf): round to nearest, a degree-7 polynomial on [-1/2, 1/2], 2^n.
// Below -126 the result is 0 (as the exact value flushed), -inf included.
inline vf exp2(vf x) {
  const vf xc = max(x, set1(-126.f));
  const vf n = round_nearest(xc);
  const vf f = sub(xc, n);
  vf p = set1(1.525273380405984e-05f);
  p = fma(p, f, set1(1.5403530393381606e-04f));
  p = fma(p, f, set1(1.3333558146428443e-03f));
  p = fma(p, f, set1(9.618129107628477e-03f));
  p = fma(p, f, set1(5.550410866482158e-02f));
  p = fma(p, f, set1(2.402265069591007e-01f));
  p = fma(p, f, set1(6.931471805599453e-01f));
  p = fma(p, f, set1(1.0f));
  return select_ge(x, set1(-126.f), scale_pow2(p, n), zero());
}

// ===================================================================== integer dot products
// For the quantized linear layers of generation (kernels/linear.h): vb holds 4W bytes, W groups
// of 4 consecutive bytes, and vd W int32 lanes, lane j the accumulator of group j. x points to
// 4 int8 values, the same for every group (one row's 4 activations):
//   loadb(p): 4W bytes; dzero(); dset1(v): v in every lane;
//   prep_w(w): the weight bytes as dot_s8 takes them, w + kWBias (kWBias: 0, or 128 where
//     dot_s8 multiplies them as unsigned bytes: the caller then takes kWBias sum_t x[t] off);
//   dot_s8(acc, prep_w(w), x): acc[j] + sum_t (w[4j+t] + kWBias) x[t], w in [-128, 127] and
//     x in [-127, 127];
//   dot_u4x2(acc, u0, x0, u1, x1): acc[j] + sum_t (u0[4j+t] x0[t] + u1[4j+t] x1[t]), u unsigned
//     in [0, 15], x in [-127, 127];
//   low4(b) / high4(b): each byte's low / high 4 bits; to_float(acc);
//   sbyte<T>(b): byte T of each group, sign-extended to its 32-bit lane.
// x86 has no signed-by-signed byte product: pmaddubsw multiplies unsigned by signed bytes, so
// dot_s8 moves w's sign onto x (|w| sign(w) x). Its 16-bit pair sums stay below 2^15
// (2 x 128 x 127), so nothing saturates. With AVX-512 VNNI, vpdpbusd does a whole group (four
// unsigned-by-signed products summed into the 32-bit lane) in one instruction, its signed
// operand broadcast from memory by the instruction itself: the weight, biased once per vector
// to unsigned bytes, is the unsigned operand, and x the broadcast one.
#if defined(FASTLM_SIMD_AVX512)
using vb = __m512i;
using vd = __m512i;
inline vb loadb(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline vb bcast4(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}
inline vd dzero() { return _mm512_setzero_si512(); }
inline vd dset1(int32_t v) { return _mm512_set1_epi32(v); }
#if defined(FASTLM_SIMD_VNNI)
constexpr int kWBias = 128;
inline vb prep_w(vb w) { return _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80))); }
// acc + vpdpbusd(u, the 4 bytes at x in every group). GCC does not fold the broadcast into the
// instruction's {1to16} operand, and a separate vpbroadcastd per row costs as much again; an
// emulated build (tests/cpu_kernels/avx512_emulated.cpp) takes the intrinsic.
inline vd dpbusd_x(vd acc, vb u, const int8_t* x) {
#if defined(FASTLM_SIMD_EMULATED)
  return _mm512_dpbusd_epi32(acc, u, bcast4(x));
#else
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*reinterpret_cast<const int32_t*>(x)));
  return acc;
#endif
}
inline vd dot_s8(vd acc, vb w, const int8_t* x) { return dpbusd_x(acc, w, x); }
inline vd dot_u4x2(vd acc, vb u0, const int8_t* x0, vb u1, const int8_t* x1) {
  return dpbusd_x(dpbusd_x(acc, u0, x0), u1, x1);
}
#else
inline vd dot_s8(vd acc, vb w, const int8_t* xp) {
  const vb x = bcast4(xp);
  const vb sx = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
  const __m512i p = _mm512_maddubs_epi16(_mm512_abs_epi8(w), sx);
  return _mm512_add_epi32(acc, _mm512_madd_epi16(p, _mm512_set1_epi16(1)));
}
inline vd dot_u4x2(vd acc, vb u0, const int8_t* x0, vb u1, const int8_t* x1) {
  const __m512i p = _mm512_add_epi16(_mm512_maddubs_epi16(u0, bcast4(x0)), _mm512_maddubs_epi16(u1, bcast4(x1)));
  return _mm512_add_epi32(acc, _mm512_madd_epi16(p, _mm512_set1_epi16(1)));
}
#endif
inline vb low4(vb b) { return _mm512_and_si512(b, _mm512_set1_epi8(0x0F)); }
inline vb high4(vb b) { return _mm512_and_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi8(0x0F)); }
inline vf to_float(vd a) { return _mm512_cvtepi32_ps(a); }
template <int T>
inline vd sbyte(vb b) { return _mm512_srai_epi32(_mm512_slli_epi32(b, 24 - 8 * T), 24); }
#elif defined(FASTLM_SIMD_AVX2)
using vb = __m256i;
using vd = __m256i;
inline vb loadb(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vb bcast4(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
inline vd dzero() { return _mm256_setzero_si256(); }
inline vd dset1(int32_t v) { return _mm256_set1_epi32(v); }
inline vd dot_s8(vd acc, vb w, const int8_t* xp) {
  const vb x = bcast4(xp);
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
inline vd dot_u4x2(vd acc, vb u0, const int8_t* x0, vb u1, const int8_t* x1) {
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(u0, bcast4(x0)), _mm256_maddubs_epi16(u1, bcast4(x1)));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
inline vb low4(vb b) { return _mm256_and_si256(b, _mm256_set1_epi8(0x0F)); }
inline vb high4(vb b) { return _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(0x0F)); }
inline vf to_float(vd a) { return _mm256_cvtepi32_ps(a); }
template <int T>
inline vd sbyte(vb b) { return _mm256_srai_epi32(_mm256_slli_epi32(b, 24 - 8 * T), 24); }
#elif defined(FASTLM_SIMD_NEON)
using vb = int8x16_t;
using vd = int32x4_t;
inline vb loadb(const uint8_t* p) { return vld1q_s8(reinterpret_cast<const int8_t*>(p)); }
inline vb bcast4(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return vreinterpretq_s8_s32(vdupq_n_s32(v));
}
inline vd dzero() { return vdupq_n_s32(0); }
inline vd dset1(int32_t v) { return vdupq_n_s32(v); }
inline vd dot_s8v(vd acc, vb w, vb x) {
#if defined(__ARM_FEATURE_DOTPROD)
  return vdotq_s32(acc, w, x);
#else
  // 8 products of two groups in each 16-bit half, pairwise sums to 32 bits, then per group.
  const int16x8_t lo = vmull_s8(vget_low_s8(w), vget_low_s8(x)), hi = vmull_high_s8(w, x);
  return vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)));
#endif
}
inline vd dot_s8(vd acc, vb w, const int8_t* x) { return dot_s8v(acc, w, bcast4(x)); }
inline vd dot_u4x2(vd acc, vb u0, const int8_t* x0, vb u1, const int8_t* x1) {
  return dot_s8v(dot_s8v(acc, u0, bcast4(x0)), u1, bcast4(x1));
}
inline vb low4(vb b) { return vandq_s8(b, vdupq_n_s8(0x0F)); }
inline vb high4(vb b) { return vreinterpretq_s8_u8(vshrq_n_u8(vreinterpretq_u8_s8(b), 4)); }
inline vf to_float(vd a) { return vcvtq_f32_s32(a); }
template <int T>
inline vd sbyte(vb b) { return vshrq_n_s32(vshlq_n_s32(vreinterpretq_s32_s8(b), 24 - 8 * T), 24); }
#else
typedef int8_t vb __attribute__((vector_size(16)));
typedef int32_t vd __attribute__((vector_size(16)));
inline vb loadb(const uint8_t* p) {
  vb v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline vb bcast4(const int8_t* p) { return vb{p[0], p[1], p[2], p[3], p[0], p[1], p[2], p[3], p[0], p[1], p[2], p[3], p[0], p[1], p[2], p[3]}; }
inline vd dzero() { return vd{0, 0, 0, 0}; }
inline vd dset1(int32_t v) { return vd{v, v, v, v}; }
inline vd dot_s8(vd acc, vb w, const int8_t* x) {
  for (int j = 0; j < 4; ++j)
    for (int t = 0; t < 4; ++t) acc[j] += int32_t(w[4 * j + t]) * int32_t(x[t]);
  return acc;
}
inline vd dot_u4x2(vd acc, vb u0, const int8_t* x0, vb u1, const int8_t* x1) {
  return dot_s8(dot_s8(acc, u0, x0), u1, x1);
}
inline vb low4(vb b) { return b & int8_t(0x0F); }
inline vb high4(vb b) { return (b >> 4) & int8_t(0x0F); }
inline vf to_float(vd a) { return __builtin_convertvector(a, vf); }
template <int T>
inline vd sbyte(vb b) { return vd{b[T], b[4 + T], b[8 + T], b[12 + T]}; }
#endif
#if !defined(FASTLM_SIMD_VNNI)
constexpr int kWBias = 0;  // dot_s8 takes the weight as it is: nothing to take off
inline vb prep_w(vb w) { return w; }
#endif

}  // namespace simd
