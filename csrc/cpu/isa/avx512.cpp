// The CPU kernels for x86-64 with AVX-512 F, BW, VL and DQ (Intel Skylake-SP / Cascade Lake
// and later server parts, Ice Lake, AMD Zen 4 and later).
#if defined(__x86_64__) || defined(_M_X64)
#define FASTLM_ISA avx512
#define FASTLM_ISA_NAME "avx512"
#define FASTLM_SIMD_AVX512 1
#define FASTLM_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,sse4.2"
#include "cpu/isa/kernels.inc"
#endif
