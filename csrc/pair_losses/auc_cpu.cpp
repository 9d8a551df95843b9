// Generic CPU Mann-Whitney loss (any CPU), and the run-time choice between it and the AVX2 /
// AVX-512 instantiations.
#include "../common/cpu_features.h"
#define FL_ISA_VEC float
#include "auc_cpu_impl.h"

namespace fastloss {

#define FASTLOSS_DECLARE_AUC_ISA(ns) \
  namespace ns {                     \
  void auc(const AucProblem&, double*, float*, float*, int64_t, int64_t); \
  }
#if defined(FASTLOSS_HAVE_AVX2)
FASTLOSS_DECLARE_AUC_ISA(avx2)
#endif
#if defined(FASTLOSS_HAVE_AVX512)
FASTLOSS_DECLARE_AUC_ISA(avx512)
#endif

void auc_cpu(const AucProblem& q, double* loss_part, float* grad_pos, float* neg_part,
             int64_t r0, int64_t r1) {
#if defined(FASTLOSS_HAVE_AVX512)
  if (active_cpu_isa() == CpuIsa::avx512) return avx512::auc(q, loss_part, grad_pos, neg_part, r0, r1);
#endif
#if defined(FASTLOSS_HAVE_AVX2)
  if (active_cpu_isa() == CpuIsa::avx2) return avx2::auc(q, loss_part, grad_pos, neg_part, r0, r1);
#endif
  generic::auc(q, loss_part, grad_pos, neg_part, r0, r1);
}

}  // namespace fastloss
