// The CPU kernels for aarch64 with Advanced SIMD (NEON), written with its intrinsics: every
// 64-bit ARM CPU (Apple silicon, Graviton, Ampere, Raspberry Pi 4/5).
#if defined(__aarch64__)
#define FASTLM_ISA neon
#define FASTLM_ISA_NAME "neon"
#define FASTLM_SIMD_NEON 1
#include "cpu/isa/kernels.inc"
#endif
