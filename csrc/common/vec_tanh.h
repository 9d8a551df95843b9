// tanh for the SIMD vector types, written once. Each vec_<isa>.h includes this header and
// defines, for its vector type, the arithmetic, vexp, vselect, all_lanes(mask) and
// vcopysign(magnitude, sign); the template finds them by argument-dependent lookup.
#pragma once
#include "macros.h"

namespace fastloss {
namespace FL_ISA {

// Odd polynomial for |x| < 0.625 (where 1 - 2/(e^2x + 1) would cancel), the exponential form
// elsewhere. Relative error a few ulp. Soft-capped logits mostly sit well inside the cap: when
// every lane is on the polynomial side, the exponential and the division are skipped.
template <class V>
inline V vtanh_simd(V x) {
  const V a = vabs(x);
  const V z = x * x;
  V p = V(-5.70498872745e-3f);
  p = vfma(p, z, V(2.06390887954e-2f));
  p = vfma(p, z, V(-5.37397155531e-2f));
  p = vfma(p, z, V(1.33314422036e-1f));
  p = vfma(p, z, V(-3.33332819422e-1f));
  const V small = vfma(p * z, x, x);
  const auto small_lanes = a < V(0.625f);
  if (all_lanes(small_lanes)) return small;
  const V e = vexp(vmin(a, V(44.0f)) * V(2.0f));
  const V big = vcopysign(V(1.0f) - V(2.0f) / (e + V(1.0f)), x);
  return vselect(small_lanes, small, big);
}

}  // namespace FL_ISA
}  // namespace fastloss
