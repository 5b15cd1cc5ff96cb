/* The peak float32 multiply-add rate of this CPU at one SIMD level, for the ceilings the
 * benchmarks report beside their figures (bench/equal_steps.py): T threads, each running
 * 12 independent chains of vector FMAs in registers (enough to cover the FMA latency on
 * every core these benchmarks meet), no memory traffic. Compiled by the benchmark:
 *   cc -O2 -fopenmp -mavx2 -mfma bench/fma_peak.c            (AVX2: 8 floats a vector)
 *   cc -O2 -fopenmp -mavx512f bench/fma_peak.c               (AVX-512: 16)
 * Prints GFLOP/s (2 flops a multiply-add), the best of 5 runs. Usage: fma_peak [threads]. */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#if defined(__AVX512F__)
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define ADD _mm512_add_ps
#define STORE _mm512_storeu_ps
#define LEVEL "avx512"
#else
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define ADD _mm256_add_ps
#define STORE _mm256_storeu_ps
#define LEVEL "avx2"
#endif
#define CHAINS 12

int main(int argc, char** argv) {
  const int threads = argc > 1 ? atoi(argv[1]) : 1;
  const long iters = 20000000;
  double best = 0;
  float sink = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      vec a[CHAINS];
      const vec b = SET1(0.999f), c = SET1(0.001f);
      for (int j = 0; j < CHAINS; ++j) a[j] = SET1((float)j);
      for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 12
        for (int j = 0; j < CHAINS; ++j) a[j] = FMA(a[j], b, c);
      }
      vec s = a[0];
      for (int j = 1; j < CHAINS; ++j) s = ADD(s, a[j]);
      float out[LANES];
      STORE(out, s);
      sink += out[0];
    }
    const double dt = omp_get_wtime() - t0;
    const double gflops = 2.0 * LANES * CHAINS * (double)iters * threads / dt / 1e9;
    if (gflops > best) best = gflops;
  }
  printf("%s %d %.1f %g\n", LEVEL, threads, best, (double)(sink == 12345.f));
  return 0;
}
