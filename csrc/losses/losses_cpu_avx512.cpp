// AVX-512 row-loss kernels. This file alone is compiled with -mavx512f (and FL_ISA=avx512);
// it is only entered after cpu_supports_avx512() said yes.
#include "../common/vec_avx512.h"
#include "losses_cpu_impl.h"

namespace fastloss {
namespace avx512 {

int64_t forward_cpu(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                    const RowStats& out, int64_t r0, int64_t r1) {
  return forward_cpu_isa<Vec16>(lv, rt, p, out, r0, r1);
}

void backward_cpu(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                  const RowGrad& g, int64_t r0, int64_t r1) {
  backward_cpu_isa<Vec16>(lv, rt, p, g, r0, r1);
}

void store_floats(const float* in, void* out, int64_t n, ScalarType t) {
  store_floats_isa<Vec16>(in, out, n, t);
}

}  // namespace avx512
}  // namespace fastloss
