// Generic CPU row-loss kernels (any x86-64 or other CPU) and the run-time choice between
// them and the AVX2 ones.
#include "../common/cpu_features.h"
#define FL_ISA_VEC float  // this file's own entry points: generic::forward_cpu, ...
#include "losses_cpu_impl.h"
#include "losses_kernels.h"

namespace fastloss {

// the AVX2 / AVX-512 instantiations, compiled in their own files with those flags
FASTLOSS_DECLARE_ISAS(
    int64_t forward_cpu(const LogitsView&, const RowTargets&, const LossParams&, const
        RowStats&, int64_t, int64_t);
    void backward_cpu(const LogitsView&, const RowTargets&, const LossParams&, const RowGrad&,
        int64_t, int64_t);
    int64_t forward_backward_cpu(const LogitsView&, const RowTargets&, const LossParams&,
        const RowStats&, const RowGrad&, int64_t, int64_t);
    void store_floats(const float*, void*, int64_t, ScalarType);)

int64_t losses_forward_cpu(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                           const RowStats& out, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(forward_cpu(lv, rt, p, out, r0, r1));
}

void losses_backward_cpu(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                         const RowGrad& g, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(backward_cpu(lv, rt, p, g, r0, r1));
}

int64_t losses_forward_backward_cpu(const LogitsView& lv, const RowTargets& rt,
                                    const LossParams& p, const RowStats& out, const RowGrad& g,
                                    int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(forward_backward_cpu(lv, rt, p, out, g, r0, r1));
}

void store_floats_cpu(const float* in, void* out, int64_t n, ScalarType t) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(store_floats(in, out, n, t));
}

}  // namespace fastloss
