// Which CPU kernels run: chosen at run time from CPUID, overridable for tests and comparison.
#pragma once
#include <string>

#include "flush_subnormals.h"

namespace fastloss {

// Ordered: each level runs the kernels of the levels below where it has none of its own (amx:
// the AVX-512 kernels everywhere but the low-bit GEMM's large batches).
enum class CpuIsa : int { generic = 0, avx2 = 1, avx512 = 2, amx = 3 };

bool cpu_supports_avx2_fma();  // AVX2 + FMA + F16C, and the OS saves YMM state
bool cpu_supports_avx512();    // AVX512F, and the OS saves ZMM and opmask state
// AVX-512 plus AMX-TILE and AMX-BF16, and the OS lets this process use the tile data (on Linux
// it has to be asked for once: arch_prctl(ARCH_REQ_XCOMP_PERM); false when refused)
bool cpu_supports_amx_bf16();
bool cpu_supports_amx_int8();  // cpu_supports_amx_bf16() and AMX-INT8
bool cpu_supports_gfni();      // cpu_supports_avx512() and GFNI (its 512-bit byte bit-matrix ops)
CpuIsa active_cpu_isa();       // the best supported, unless overridden
// name: "generic", "avx2", "avx512", "amx" or "auto". Returns false (and changes nothing) for an
// unknown name or an instruction set this CPU lacks.
bool set_cpu_isa(const std::string& name);
const char* cpu_isa_name(CpuIsa isa);

}  // namespace fastloss

// `return <isa>::call;` for the active instruction set: avx512:: or avx2:: (when this build has
// them) or generic::. For the families' CPU entry points (losses_cpu.cpp, tcn_cpu.cpp, ...),
// each of whose per-ISA namespaces declares the function.
#if defined(FASTLOSS_HAVE_AVX512)
#define FASTLOSS_TRY_AVX512(call) \
  if (::fastloss::active_cpu_isa() >= ::fastloss::CpuIsa::avx512) return avx512::call;
#else
#define FASTLOSS_TRY_AVX512(call)
#endif
#if defined(FASTLOSS_HAVE_AVX2)
#define FASTLOSS_TRY_AVX2(call) \
  if (::fastloss::active_cpu_isa() >= ::fastloss::CpuIsa::avx2) return avx2::call;
#else
#define FASTLOSS_TRY_AVX2(call)
#endif
#define FASTLOSS_CPU_DISPATCH(call) \
  do {                              \
    FASTLOSS_TRY_AVX512(call)       \
    FASTLOSS_TRY_AVX2(call)         \
    return generic::call;           \
  } while (0)
// The same with subnormals flushed for the call (flush_subnormals.h): the loss families, whose
// exponentials of widely spread logits make them. Not the solvers (Sinkhorn keeps
// denorm_min as a floor), the GEMMs and the convolution.
#define FASTLOSS_CPU_DISPATCH_FLUSHED(call)                          \
  do {                                                               \
    const ::fastloss::FlushSubnormals fastloss_flush_subnormals_{}; \
    FASTLOSS_CPU_DISPATCH(call);                                     \
  } while (0)

// Declares the per-ISA instantiations of a family's CPU functions (defined in its *_avx2.cpp and
// *_avx512.cpp files) in the namespaces FASTLOSS_CPU_DISPATCH calls into.
#if defined(FASTLOSS_HAVE_AVX2)
#define FASTLOSS_DECLARE_AVX2(...) namespace avx2 { __VA_ARGS__ }
#else
#define FASTLOSS_DECLARE_AVX2(...)
#endif
#if defined(FASTLOSS_HAVE_AVX512)
#define FASTLOSS_DECLARE_AVX512(...) namespace avx512 { __VA_ARGS__ }
#else
#define FASTLOSS_DECLARE_AVX512(...)
#endif
#define FASTLOSS_DECLARE_ISAS(...) FASTLOSS_DECLARE_AVX2(__VA_ARGS__) FASTLOSS_DECLARE_AVX512(__VA_ARGS__)
