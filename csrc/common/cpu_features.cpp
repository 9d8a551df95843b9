#include "cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <optional>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastloss {

bool cpu_supports_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28),
             f16c = c & (1u << 29);
  if (!(fma && osxsave && avx && f16c)) return false;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0x6u) != 0x6u) return false;  // XMM and YMM state enabled by the OS
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, a, b, c, d);
  return b & (1u << 5);  // AVX2
#else
  return false;
#endif
}

bool cpu_supports_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  if (!cpu_supports_avx2_fma()) return false;
  unsigned a, b, c, d;
  __cpuid_count(7, 0, a, b, c, d);
  if (!(b & (1u << 16))) return false;  // AVX512F
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  return (xcr0_lo & 0xe6u) == 0xe6u;  // XMM, YMM, opmask, ZMM_Hi256, Hi16_ZMM
#else
  return false;
#endif
}

bool cpu_supports_amx_bf16() {
#if defined(FASTLOSS_HAVE_AMX) && defined(__linux__) && defined(__x86_64__)
  static const bool supported = [] {
    if (!cpu_supports_avx512()) return false;
    unsigned a, b, c, d;
    __cpuid_count(7, 0, a, b, c, d);
    if (!(d & (1u << 22)) || !(d & (1u << 24))) return false;  // AMX-BF16, AMX-TILE
    unsigned xcr0_lo, xcr0_hi;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & 0x60000u) != 0x60000u) return false;  // XTILECFG, XTILEDATA
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return supported;
#else
  return false;
#endif
}

bool cpu_supports_amx_int8() {
#if defined(FASTLOSS_HAVE_AMX) && defined(__linux__) && defined(__x86_64__)
  static const bool supported = [] {
    if (!cpu_supports_amx_bf16()) return false;
    unsigned a, b, c, d;
    __cpuid_count(7, 0, a, b, c, d);
    return (d & (1u << 25)) != 0;  // AMX-INT8
  }();
  return supported;
#else
  return false;
#endif
}

bool cpu_supports_gfni() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool supported = [] {  // (CPUID traps to the hypervisor in a VM: asked once)
    if (!cpu_supports_avx512()) return false;
    unsigned a, b, c, d;
    __cpuid_count(7, 0, a, b, c, d);
    return (c & (1u << 8)) != 0;  // GFNI
  }();
  return supported;
#else
  return false;
#endif
}

namespace {
CpuIsa best_isa() {
  if (cpu_supports_amx_bf16()) return CpuIsa::amx;
#if defined(FASTLOSS_HAVE_AVX512)
  if (cpu_supports_avx512()) return CpuIsa::avx512;
#endif
  return cpu_supports_avx2_fma() ? CpuIsa::avx2 : CpuIsa::generic;
}

// The level a name ("auto", "generic", "avx2", "avx512", "amx") stands for, if this CPU (and
// build) has it: set_cpu_isa and FASTLOSS_CPU_ISA read names the same way.
std::optional<CpuIsa> isa_named(const std::string& name) {
  if (name == "auto") return best_isa();
  if (name == "generic") return CpuIsa::generic;
  if (name == "avx2" && cpu_supports_avx2_fma()) return CpuIsa::avx2;
#if defined(FASTLOSS_HAVE_AVX512)
  if (name == "avx512" && cpu_supports_avx512()) return CpuIsa::avx512;
#endif
  if (name == "amx" && cpu_supports_amx_bf16()) return CpuIsa::amx;
  return std::nullopt;
}

CpuIsa initial_isa() {
  const char* env = std::getenv("FASTLOSS_CPU_ISA");
  return (env ? isa_named(env) : std::nullopt).value_or(best_isa());
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{int(initial_isa())};
  return slot;
}
}  // namespace

CpuIsa active_cpu_isa() { return CpuIsa(isa_slot().load(std::memory_order_relaxed)); }

bool set_cpu_isa(const std::string& name) {
  const std::optional<CpuIsa> isa = isa_named(name);
  if (isa) isa_slot().store(int(*isa));
  return isa.has_value();
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::amx: return "amx";
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    case CpuIsa::generic: break;
  }
  return "generic";
}

}  // namespace fastloss
