// Activations of the fused TCN level (y = x + act(conv(x) + b)) and their derivatives, on the
// vector types of csrc/common (float, Vec8, Vec16), on the CPU and in CUDA kernels. Torch-free.
#pragma once
#include "../common/macros.h"
#include "../common/vec_scalar.h"  // the float overloads (vexp, ...) the templates use

namespace fastloss {

enum class Act : int { none = 0, relu = 1, silu = 2, gelu = 3 };  // gelu: the erf form (F.gelu's default)

namespace FL_ISA {

// erf by Abramowitz and Stegun 7.1.26 (absolute error <= 1.5e-7), odd-extended.
template <class V>
FL_HD V verf(V x) {
  const V a = vabs(x);
  const V t = V(1.f) / (V(1.f) + V(0.3275911f) * a);
  const V poly = t * (V(0.254829592f) +
                      t * (V(-0.284496736f) + t * (V(1.421413741f) + t * (V(-1.453152027f) + t * V(1.061405429f)))));
  const V r = V(1.f) - poly * vexp(-(a * a));
  return vselect(x < V(0.f), -r, r);
}

template <class V>
FL_HD V act_apply(V h, Act act) {
  switch (act) {
    case Act::relu: return vmax(h, V(0.f));
    case Act::silu: return h / (V(1.f) + vexp(-h));
    case Act::gelu: return V(0.5f) * h * (V(1.f) + verf(h * V(0.70710678118654752f)));
    case Act::none: break;
  }
  return h;
}

template <class V>
FL_HD V act_derivative(V h, Act act) {
  switch (act) {
    case Act::relu: return vselect(V(0.f) < h, V(1.f), V(0.f));
    case Act::silu: {
      const V s = V(1.f) / (V(1.f) + vexp(-h));
      return s * (V(1.f) + h * (V(1.f) - s));
    }
    case Act::gelu:  // Phi(h) + h phi(h)
      return V(0.5f) * (V(1.f) + verf(h * V(0.70710678118654752f))) +
             h * V(0.39894228040143268f) * vexp(V(-0.5f) * h * h);
    case Act::none: break;
  }
  return V(1.f);
}

}  // namespace FL_ISA
}  // namespace fastloss
