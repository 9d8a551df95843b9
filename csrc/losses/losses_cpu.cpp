// Generic CPU row-loss kernels (any x86-64 or other CPU) and the run-time choice between
// them and the AVX2 ones.
#include "../common/cpu_features.h"
#define FL_ISA_VEC float  // this file's own entry points: generic::forward_cpu, ...
#include "losses_cpu_impl.h"
#include "losses_kernels.h"

namespace fastloss {

// The AVX2 and AVX-512 instantiations live in their own files, compiled with those flags.
#define FASTLOSS_DECLARE_ISA(ns)                                                               \
  namespace ns {                                                                               \
  int64_t forward_cpu(const LogitsView&, const RowTargets&, const LossParams&, const RowStats&, \
                      int64_t, int64_t);                                                       \
  void backward_cpu(const LogitsView&, const RowTargets&, const LossParams&, const RowGrad&,   \
                    int64_t, int64_t);                                                         \
  void store_floats(const float*, void*, int64_t, ScalarType);                                 \
  }
#if defined(FASTLOSS_HAVE_AVX2)
FASTLOSS_DECLARE_ISA(avx2)
#endif
#if defined(FASTLOSS_HAVE_AVX512)
FASTLOSS_DECLARE_ISA(avx512)
#endif

int64_t losses_forward_cpu(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                           const RowStats& out, int64_t r0, int64_t r1) {
#if defined(FASTLOSS_HAVE_AVX512)
  if (active_cpu_isa() == CpuIsa::avx512) return avx512::forward_cpu(lv, rt, p, out, r0, r1);
#endif
#if defined(FASTLOSS_HAVE_AVX2)
  if (active_cpu_isa() == CpuIsa::avx2) return avx2::forward_cpu(lv, rt, p, out, r0, r1);
#endif
  return generic::forward_cpu(lv, rt, p, out, r0, r1);
}

void losses_backward_cpu(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                         const RowGrad& g, int64_t r0, int64_t r1) {
#if defined(FASTLOSS_HAVE_AVX512)
  if (active_cpu_isa() == CpuIsa::avx512) return avx512::backward_cpu(lv, rt, p, g, r0, r1);
#endif
#if defined(FASTLOSS_HAVE_AVX2)
  if (active_cpu_isa() == CpuIsa::avx2) return avx2::backward_cpu(lv, rt, p, g, r0, r1);
#endif
  generic::backward_cpu(lv, rt, p, g, r0, r1);
}

void store_floats_cpu(const float* in, void* out, int64_t n, ScalarType t) {
#if defined(FASTLOSS_HAVE_AVX512)
  if (active_cpu_isa() == CpuIsa::avx512) return avx512::store_floats(in, out, n, t);
#endif
#if defined(FASTLOSS_HAVE_AVX2)
  if (active_cpu_isa() == CpuIsa::avx2) return avx2::store_floats(in, out, n, t);
#endif
  generic::store_floats(in, out, n, t);
}

}  // namespace fastloss
