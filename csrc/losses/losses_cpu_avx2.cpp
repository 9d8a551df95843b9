// AVX2+FMA row-loss kernels. This file alone is compiled with -mavx2 -mfma -mf16c and
// FL_ISA=avx2; it is only entered after cpu_supports_avx2_fma() said yes.
#include "../common/vec_avx2.h"
#include "losses_cpu_impl.h"

namespace fastloss {
namespace avx2 {

int64_t forward_cpu(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                    const RowStats& out, int64_t r0, int64_t r1) {
  return forward_cpu_isa<Vec8>(lv, rt, p, out, r0, r1);
}

void backward_cpu(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                  const RowGrad& g, int64_t r0, int64_t r1) {
  backward_cpu_isa<Vec8>(lv, rt, p, g, r0, r1);
}

void store_floats(const float* in, void* out, int64_t n, ScalarType t) {
  store_floats_isa<Vec8>(in, out, n, t);
}

}  // namespace avx2
}  // namespace fastloss
