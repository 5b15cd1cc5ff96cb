// The CPU kernels for x86-64 with AVX-512 F, BW, VL, DQ and VNNI (Intel Cascade Lake, Ice
// Lake and later, AMD Zen 4 and later): the avx512 level's kernels, with the integer products
// of the quantized linear layers on vpdpbusd (simd.h, "integer dot products").
#if defined(__x86_64__) || defined(_M_X64)
#define FASTLM_ISA avx512_vnni
#define FASTLM_ISA_NAME "avx512_vnni"
#define FASTLM_SIMD_AVX512 1
#define FASTLM_SIMD_VNNI 1
#define FASTLM_ISA_TARGET \
  "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,sse4.2"
#include "cpu/isa/kernels.inc"
#endif
