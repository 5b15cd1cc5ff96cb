// The CPU kernels for the architecture's baseline (x86-64: SSE2; aarch64: Advanced SIMD
// through the compiler's vector extensions): portable code that runs on every CPU.
#define FASTLM_ISA baseline
#define FASTLM_ISA_NAME "baseline"
#define FASTLM_SIMD_GENERIC 1
#include "cpu/isa/kernels.inc"
