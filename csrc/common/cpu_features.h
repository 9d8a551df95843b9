// Which CPU kernels run: chosen at run time from CPUID, overridable for tests and comparison.
#pragma once
#include <string>

namespace fastloss {

enum class CpuIsa : int { generic = 0, avx2 = 1, avx512 = 2 };

bool cpu_supports_avx2_fma();  // AVX2 + FMA + F16C, and the OS saves YMM state
bool cpu_supports_avx512();    // AVX512F, and the OS saves ZMM and opmask state
CpuIsa active_cpu_isa();       // the best supported, unless overridden
// name: "generic", "avx2", "avx512" or "auto". Returns false (and changes nothing) for an unknown name
// or an instruction set this CPU lacks.
bool set_cpu_isa(const std::string& name);
const char* cpu_isa_name(CpuIsa isa);

}  // namespace fastloss
