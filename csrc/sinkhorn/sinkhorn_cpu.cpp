// Generic CPU entropic-OT solver (any CPU), and the run-time choice between it and the AVX2 /
// AVX-512 instantiations.
#include "../common/cpu_features.h"
#define FL_ISA_VEC float
#include "sinkhorn_cpu_impl.h"

namespace fastloss {

// the AVX2 / AVX-512 instantiations, compiled in their own files with those flags
FASTLOSS_DECLARE_ISAS(
    OtResult sinkhorn_solve(const OtProblem&, void*, void*, const ParallelFor&);
    void sinkhorn_plan(const OtProblem&, const void*, const void*, double, void*, int64_t, int64_t);)

OtResult sinkhorn_solve_cpu(const OtProblem& q, void* f, void* g, const ParallelFor& parallel) {
  FASTLOSS_CPU_DISPATCH(sinkhorn_solve(q, f, g, parallel));
}

void sinkhorn_plan_cpu(const OtProblem& q, const void* f, const void* g, double scale, void* out,
                       int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH(sinkhorn_plan(q, f, g, scale, out, r0, r1));
}

}  // namespace fastloss
