// The AVX-512 levels of the CPU kernels compiled on a machine without AVX-512, for the kernel
// check (tests/test_cpu_levels.py): SIMDe implements the AVX-512 intrinsics over AVX2
// (compile with -mavx2 -mfma -mf16c), and the few that SIMDe 0.7 lacks are written below
// element by element. It checks the level's logic (masks, permutes, conversions, tails), not
// the compiler's AVX-512 code generation.
#include <immintrin.h>
#define SIMDE_ENABLE_NATIVE_ALIASES 1
#include <simde/x86/avx512.h>
static inline float emu_reduce_add_ps(simde__m512 v) {
  float t[16];
  simde_mm512_storeu_ps(t, v);
  float s = 0.f;
  for (float x : t) s += x;
  return s;
}
static inline float emu_reduce_max_ps(simde__m512 v) {
  float t[16];
  simde_mm512_storeu_ps(t, v);
  float m = t[0];
  for (float x : t) m = x > m ? x : m;
  return m;
}
static inline simde__m512 emu_maskz_loadu_ps(simde__mmask16 k, const void* p) {
  float t[16] = {0};
  for (int i = 0; i < 16; ++i) if ((k >> i) & 1) t[i] = static_cast<const float*>(p)[i];
  return simde_mm512_loadu_ps(t);
}
static inline void emu_mask_storeu_ps(void* p, simde__mmask16 k, simde__m512 v) {
  float t[16];
  simde_mm512_storeu_ps(t, v);
  for (int i = 0; i < 16; ++i) if ((k >> i) & 1) static_cast<float*>(p)[i] = t[i];
}
static inline simde__m256i emu_maskz_loadu_epi16(simde__mmask16 k, const void* p) {
  unsigned short t[16] = {0};
  for (int i = 0; i < 16; ++i) if ((k >> i) & 1) t[i] = static_cast<const unsigned short*>(p)[i];
  return simde_mm256_loadu_si256(t);
}
static inline void emu_mask_storeu_epi16(void* p, simde__mmask16 k, simde__m256i v) {
  unsigned short t[16];
  simde_mm256_storeu_si256(t, v);
  for (int i = 0; i < 16; ++i) if ((k >> i) & 1) static_cast<unsigned short*>(p)[i] = t[i];
}
static inline simde__m512i emu_cvtepu16_epi32(simde__m256i v) {
  unsigned short t[16];
  int r[16];
  simde_mm256_storeu_si256(t, v);
  for (int i = 0; i < 16; ++i) r[i] = t[i];
  return simde_mm512_loadu_si512(r);
}
static inline simde__m256i emu_cvtepi32_epi16(simde__m512i v) {
  int t[16];
  unsigned short r[16];
  simde_mm512_storeu_si512(t, v);
  for (int i = 0; i < 16; ++i) r[i] = static_cast<unsigned short>(t[i]);
  return simde_mm256_loadu_si256(r);
}
static inline simde__m512 emu_cvtph_ps(simde__m256i v) {
  __m128i t[2];
  simde_mm256_storeu_si256(t, v);
  float r[16];
  _mm256_storeu_ps(r, _mm256_cvtph_ps(t[0]));
  _mm256_storeu_ps(r + 8, _mm256_cvtph_ps(t[1]));
  return simde_mm512_loadu_ps(r);
}
#define emu_cvtps_ph(v, mode)                                  \
  ([&] {                                                       \
    float t_[16];                                              \
    simde_mm512_storeu_ps(t_, v);                              \
    __m128i r_[2] = {_mm256_cvtps_ph(_mm256_loadu_ps(t_), mode), \
                     _mm256_cvtps_ph(_mm256_loadu_ps(t_ + 8), mode)}; \
    return simde_mm256_loadu_si256(r_);                        \
  }())
static inline simde__m512i emu_cvtepi8_epi32(simde__m128i v) {
  signed char t[16];
  int r[16];
  simde_mm_storeu_si128(t, v);
  for (int i = 0; i < 16; ++i) r[i] = t[i];
  return simde_mm512_loadu_si512(r);
}
static inline simde__m512 emu_cvtepi32_ps(simde__m512i v) {
  int t[16];
  float r[16];
  simde_mm512_storeu_si512(t, v);
  for (int i = 0; i < 16; ++i) r[i] = float(t[i]);
  return simde_mm512_loadu_ps(r);
}
static inline simde__m512i emu_cvtepu8_epi32(simde__m128i v) {
  unsigned char t[16];
  int r[16];
  simde_mm_storeu_si128(t, v);
  for (int i = 0; i < 16; ++i) r[i] = t[i];
  return simde_mm512_loadu_si512(r);
}
// SIMDe 0.7's native alias of _mm512_madd_epi16 takes the masked form's four arguments.
static inline simde__m512i emu_madd_epi16(simde__m512i a, simde__m512i b) {
  short x[32], y[32];
  int r[16];
  simde_mm512_storeu_si512(x, a);
  simde_mm512_storeu_si512(y, b);
  for (int i = 0; i < 16; ++i) r[i] = int(x[2 * i]) * y[2 * i] + int(x[2 * i + 1]) * y[2 * i + 1];
  return simde_mm512_loadu_si512(r);
}
// Shifts of 32-bit lanes by a constant (GCC's own definitions win over SIMDe's aliases).
static inline simde__m512i emu_slli_epi32(simde__m512i a, unsigned n) {
  unsigned r[16];
  simde_mm512_storeu_si512(r, a);
  for (unsigned& x : r) x = n > 31 ? 0u : x << n;
  return simde_mm512_loadu_si512(r);
}
static inline simde__m512i emu_srai_epi32(simde__m512i a, unsigned n) {
  int r[16];
  simde_mm512_storeu_si512(r, a);
  for (int& x : r) x = x >> (n > 31 ? 31 : n);
  return simde_mm512_loadu_si512(r);
}
// vpdpbusd (AVX-512 VNNI): acc + the four products of unsigned a and signed b bytes per lane.
static inline simde__m512i emu_dpbusd_epi32(simde__m512i acc, simde__m512i a, simde__m512i b) {
  unsigned char x[64];
  signed char y[64];
  int r[16];
  simde_mm512_storeu_si512(x, a);
  simde_mm512_storeu_si512(y, b);
  simde_mm512_storeu_si512(r, acc);
  for (int i = 0; i < 16; ++i)
    for (int t = 0; t < 4; ++t) r[i] += int(x[4 * i + t]) * int(y[4 * i + t]);
  return simde_mm512_loadu_si512(r);
}
#undef _mm512_dpbusd_epi32
#define _mm512_dpbusd_epi32 emu_dpbusd_epi32
#undef _mm512_madd_epi16
#define _mm512_madd_epi16 emu_madd_epi16
#undef _mm512_slli_epi32
#define _mm512_slli_epi32 emu_slli_epi32
#undef _mm512_srai_epi32
#define _mm512_srai_epi32 emu_srai_epi32
#define _mm512_stream_ps(p, v) simde_mm512_storeu_ps(p, v)
#define _mm512_cvtepu8_epi32 emu_cvtepu8_epi32
#define _mm512_cvtepi32_ps emu_cvtepi32_ps
#define _mm512_cvtepi8_epi32 emu_cvtepi8_epi32
#define _mm512_cvtepu16_epi32 emu_cvtepu16_epi32
#define _mm512_cvtepi32_epi16 emu_cvtepi32_epi16
#define _mm512_cvtph_ps emu_cvtph_ps
#define _mm512_cvtps_ph emu_cvtps_ph
#define _mm512_maskz_loadu_ps emu_maskz_loadu_ps
#define _mm512_mask_storeu_ps emu_mask_storeu_ps
#define _mm256_maskz_loadu_epi16 emu_maskz_loadu_epi16
#define _mm256_mask_storeu_epi16 emu_mask_storeu_epi16
#define _mm512_reduce_add_ps emu_reduce_add_ps
#define _mm512_reduce_max_ps emu_reduce_max_ps
// Built twice: as the avx512 level, and with -DFASTLM_EMULATE_VNNI as the avx512_vnni one.
#if defined(FASTLM_EMULATE_VNNI)
#define FASTLM_ISA avx512_vnni
#define FASTLM_ISA_NAME "avx512_vnni"
#define FASTLM_SIMD_VNNI 1
#else
#define FASTLM_ISA avx512
#define FASTLM_ISA_NAME "avx512"
#endif
#define FASTLM_SIMD_AVX512 1
#define FASTLM_SIMD_EMULATED 1
#include "cpu/isa/kernels.inc"
