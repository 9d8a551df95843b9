// The one-lane "vector" the generic CPU kernels and the CUDA kernels are written with.
// The AVX2 kernels use Vec8 (vec_avx2.h) with the same function names, so every loss's math
// is written once (losses/loss_math.h) and instantiated for each.
#pragma once
#include <cstdint>
#include <cmath>

#include "macros.h"

namespace fastloss {
namespace FL_ISA {

FL_HD float vexp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}
FL_HD float vexpm1(float x) { return expm1f(x); }
FL_HD float vlog(float x) { return logf(x); }
FL_HD float vlog1p(float x) { return log1pf(x); }
FL_HD float vtanh(float x) { return tanhf(x); }
FL_HD float vmax(float a, float b) { return a > b ? a : b; }
FL_HD float vmin(float a, float b) { return a < b ? a : b; }
FL_HD float vabs(float a) { return fabsf(a); }
FL_HD float vfma(float a, float b, float c) { return fmaf(a, b, c); }
// select(c, a, b) = c ? a : b, with c a comparison result
FL_HD float vselect(bool c, float a, float b) { return c ? a : b; }
// A byte as a float: itself, its low nibble, its high nibble (low-bit weights).
FL_HD float load_u8(const uint8_t* p, float) { return float(*p); }
FL_HD float load_lo_nibbles(const uint8_t* p, float) { return float(*p & 15); }
FL_HD float load_hi_nibbles(const uint8_t* p, float) { return float(*p >> 4); }
FL_HD float hsum(float a) { return a; }
FL_HD float hmax(float a) { return a; }

template <class V>
struct VecTraits;
template <>
struct VecTraits<float> {
  static constexpr int width = 1;
};

}  // namespace FL_ISA
}  // namespace fastloss
