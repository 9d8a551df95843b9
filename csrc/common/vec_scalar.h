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
FL_HD float vlog_fast(float x) { return logf(x); }  // the vector versions' scalar twin
FL_HD float vlog1p(float x) { return log1pf(x); }
FL_HD float vtanh(float x) { return tanhf(x); }
// As the vector versions (maxps / minps with the operands swapped): a NaN in `a` (the data)
// is kept, one in `b` alone is not.
FL_HD float vmax(float a, float b) { return b > a ? b : a; }
FL_HD float vmin(float a, float b) { return b < a ? b : a; }
FL_HD float vabs(float a) { return fabsf(a); }
FL_HD float vfma(float a, float b, float c) { return fmaf(a, b, c); }
// select(c, a, b) = c ? a : b, with c a comparison result
FL_HD float vselect(bool c, float a, float b) { return c ? a : b; }
// masks of the one-lane vector: a and b, (not a) and b, and as lane bits (vec_avx2.h's names)
FL_HD bool mask_and(bool a, bool b) { return a && b; }
FL_HD bool mask_andnot(bool a, bool b) { return !a && b; }
FL_HD unsigned lane_bits(bool m) { return m ? 1u : 0u; }
// Low-bit weights: a bit field of a byte as an integer lane, two fields joined, and the
// integer as a float or as an index into a table of floats (codebooks).
FL_HD int32_t bit_field(const uint8_t* p, int shift, int mask, float) { return (*p >> shift) & mask; }
FL_HD int32_t or_shifted(int32_t a, int32_t b, int shift) { return a | (b << shift); }
FL_HD float int_to_float(int32_t a) { return float(a); }
FL_HD float lookup16(const float* table, int32_t i, float) { return table[i]; }
FL_HD float gather(const float* table, int32_t i, float) { return table[i]; }
FL_HD float hsum(float a) { return a; }
FL_HD float hmax(float a) { return a; }

template <class V>
struct VecTraits;
template <>
struct VecTraits<float> {
  static constexpr int width = 1;
  using Int = int32_t;
};

}  // namespace FL_ISA
}  // namespace fastloss
