// The Python module fastloss._C. Importing it loads the library, whose static initialisers
// register the ops with torch; the few functions here only report how it was built and let
// tests pick the CPU kernels. No torch headers: ops are reached through torch.ops.fastloss.
#include <pybind11/pybind11.h>

#include "common/cpu_features.h"

#ifndef FASTLOSS_CUDA_ARCHS
#define FASTLOSS_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastloss compiled kernels";
#if defined(FASTLOSS_WITH_CUDA)
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  m.attr("cuda_archs") = FASTLOSS_CUDA_ARCHS;
  m.def("cpu_supports_avx2", &fastloss::cpu_supports_avx2_fma,
        "Whether this CPU has AVX2, FMA and F16C (and the OS enables them).");
  m.def("cpu_supports_avx512", &fastloss::cpu_supports_avx512,
        "Whether this CPU has AVX512F (and the OS enables it).");
  m.def("cpu_isa", [] { return fastloss::cpu_isa_name(fastloss::active_cpu_isa()); },
        "The instruction set the CPU kernels run with now: 'avx512', 'avx2' or 'generic'.");
  m.def("set_cpu_isa", &fastloss::set_cpu_isa, pybind11::arg("name"),
        "Choose the CPU kernels: 'auto', 'avx512', 'avx2' or 'generic'. False if unavailable.");
}
