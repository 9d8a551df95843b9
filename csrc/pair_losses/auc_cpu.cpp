// Generic CPU Mann-Whitney loss (any CPU), and the run-time choice between it and the AVX2 /
// AVX-512 instantiations.
#include "../common/cpu_features.h"
#define FL_ISA_VEC float
#include "auc_cpu_impl.h"

namespace fastloss {

// the AVX2 / AVX-512 instantiations, compiled in their own files with those flags
FASTLOSS_DECLARE_ISAS(
    void auc(const AucProblem&, double*, float*, float*, int64_t, int64_t, int64_t);)

void auc_cpu(const AucProblem& q, double* loss_part, float* grad_pos, float* neg_part,
             int64_t part0, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(auc(q, loss_part, grad_pos, neg_part, part0, r0, r1));
}

}  // namespace fastloss
