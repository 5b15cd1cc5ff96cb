// Which SIMD level serves the CPU kernels: what the CPU reports, the levels this build
// compiled (csrc/cpu/isa/), and the one in use (the best supported by default; tests,
// benchmarks and FASTLM_CPU_ISA switch it through set_cpu_isa). Torch-free.
#include <atomic>
#include <cstdio>
#include <cstring>

#include <unistd.h>

#include "cpu/kernels.h"
#include "cpu/parallel.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace fastlm {
namespace {

#if defined(__x86_64__) || defined(_M_X64)
struct X86Features {
  bool avx2 = false, avx512 = false, avx512_vnni = false;
};

uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

// What the avx2, avx512 and avx512_vnni levels need: the instructions (CPUID) and the
// operating system's saving of the wider registers (XCR0).
X86Features detect_x86() {
  X86Features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12), f16c = c & (1u << 29);
  const bool popcnt = c & (1u << 23);
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = xgetbv0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6, zmm_state = (xcr0 & 0xe6) == 0xe6;
  unsigned a7, b7, c7, d7;
  if (!__get_cpuid_count(7, 0, &a7, &b7, &c7, &d7)) return f;
  const bool avx2 = b7 & (1u << 5), bmi1 = b7 & (1u << 3), bmi2 = b7 & (1u << 8);
  unsigned ae, be, ce, de;
  const bool lzcnt = __get_cpuid(0x80000001, &ae, &be, &ce, &de) && (ce & (1u << 5));
  f.avx2 = ymm_state && avx2 && fma && f16c && bmi1 && bmi2 && lzcnt && popcnt;
  const bool f512 = b7 & (1u << 16), dq = b7 & (1u << 17), bw = b7 & (1u << 30), vl = b7 & (1u << 31);
  f.avx512 = f.avx2 && zmm_state && f512 && dq && bw && vl;
  f.avx512_vnni = f.avx512 && (c7 & (1u << 11));
  return f;
}
#endif

struct Levels {
  IsaLevel list[5];
  int n = 0;
  Levels() {
    list[n++] = {"baseline", baseline::kernel_table(), true};
#if defined(__x86_64__) || defined(_M_X64)
    const X86Features f = detect_x86();
    list[n++] = {"avx2", avx2::kernel_table(), f.avx2};
    list[n++] = {"avx512", avx512::kernel_table(), f.avx512};
    list[n++] = {"avx512_vnni", avx512_vnni::kernel_table(), f.avx512_vnni};
#elif defined(__aarch64__)
    list[n++] = {"neon", neon::kernel_table(), true};
#endif
  }
};

const Levels& levels() {
  static const Levels l;
  return l;
}

const KernelTable* best() {
  const Levels& l = levels();
  const KernelTable* t = l.list[0].table;
  for (int i = 0; i < l.n; ++i)
    if (l.list[i].supported) t = l.list[i].table;
  return t;
}

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> c{best()};
  return c;
}

}  // namespace

int isa_levels(const IsaLevel** out) {
  *out = levels().list;
  return levels().n;
}

const KernelTable& cpu_kernels() { return *current().load(std::memory_order_relaxed); }

bool set_cpu_isa(const char* name) {
  const Levels& l = levels();
  for (int i = 0; i < l.n; ++i)
    if (std::strcmp(l.list[i].name, name) == 0) {
      if (!l.list[i].supported) return false;
      current().store(l.list[i].table, std::memory_order_relaxed);
      return true;
    }
  return false;
}

namespace {

// The size of the last-level cache this core reads through, in bytes, or -1: Linux's
// /sys/devices/system/cpu/cpu0/cache/index*/ (the cache instance cpu 0 shares with its own
// core complex). glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) can report the sum over every
// complex of the socket instead (10x the 32 MiB one AMD Zen 4 core complex has), which would
// put the threshold past any output that does not fit.
int64_t llc_bytes_sysfs() {
  int64_t best = -1;
  int best_level = 0;
  for (int i = 0; i < 8; ++i) {
    char path[96];
    std::snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/level", i);
    std::FILE* f = std::fopen(path, "r");
    if (!f) break;
    int level = 0;
    const bool ok = std::fscanf(f, "%d", &level) == 1;
    std::fclose(f);
    std::snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", i);
    f = std::fopen(path, "r");
    if (!f) continue;
    long long size = 0;
    char unit = 0;
    const int got = std::fscanf(f, "%lld%c", &size, &unit);
    std::fclose(f);
    if (!ok || got < 1 || size <= 0 || level < best_level) continue;
    const int64_t scale = unit == 'K' ? (1 << 10) : unit == 'M' ? (1 << 20) : unit == 'G' ? (1 << 30) : 1;
    best = int64_t(size) * scale;
    best_level = level;
  }
  return best;
}

}  // namespace

int64_t stream_threshold_bytes() {
  static const int64_t bytes = [] {
    int64_t llc = llc_bytes_sysfs();
#if defined(_SC_LEVEL3_CACHE_SIZE)
    if (llc <= 0) llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return (llc > 0 ? llc : int64_t(32) << 20) / 2;
  }();
  return bytes;
}

int64_t threads_for(double work) { return work < 4e6 ? 1 : (num_threads() > 1 ? num_threads() : 1); }

}  // namespace fastlm
