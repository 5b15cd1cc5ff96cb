// The CPU kernels for x86-64 with AVX2, FMA and F16C (Intel Haswell and later, AMD Zen and later).
#if defined(__x86_64__) || defined(_M_X64)
#define FASTLM_ISA avx2
#define FASTLM_ISA_NAME "avx2"
#define FASTLM_SIMD_AVX2 1
#define FASTLM_ISA_TARGET "avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,sse4.2"
#include "cpu/isa/kernels.inc"
#endif
