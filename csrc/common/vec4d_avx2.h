// Four-lane double vector for the float64 paths of the AVX2+FMA (and AVX-512) CPU kernels. Only
// compiled into translation units built with -mavx2 -mfma, and only called after a run-time
// CPU check. The same function names as the float vectors (vexp, vfma, hsum, ...).
#pragma once
#include <immintrin.h>

#include <cmath>

#include "macros.h"
#include "vec_scalar.h"

namespace fastloss {
namespace FL_ISA {

struct Vec4d {
  __m256d v;
  Vec4d() = default;
  Vec4d(__m256d x) : v(x) {}
  Vec4d(double x) : v(_mm256_set1_pd(x)) {}
};

template <>
struct VecTraits<Vec4d> {
  static constexpr int width = 4;
};
template <class V>
struct VecIo;
template <>
struct VecIo<Vec4d> {
  static Vec4d load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, Vec4d x) { _mm256_storeu_pd(p, x.v); }
};

inline Vec4d operator+(Vec4d a, Vec4d b) { return _mm256_add_pd(a.v, b.v); }
inline Vec4d operator-(Vec4d a, Vec4d b) { return _mm256_sub_pd(a.v, b.v); }
inline Vec4d operator*(Vec4d a, Vec4d b) { return _mm256_mul_pd(a.v, b.v); }
inline Vec4d& operator+=(Vec4d& a, Vec4d b) { return a = a + b; }
// Operand order keeps a NaN in `a` (the data) in the result.
inline Vec4d vmax(Vec4d a, Vec4d b) { return _mm256_max_pd(b.v, a.v); }
inline Vec4d vfma(Vec4d a, Vec4d b, Vec4d c) { return _mm256_fmadd_pd(a.v, b.v, c.v); }

inline double hsum(Vec4d a) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a.v), _mm256_extractf128_pd(a.v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
inline double hmax(Vec4d a) {
  __m128d s = _mm_max_pd(_mm256_castpd256_pd128(a.v), _mm256_extractf128_pd(a.v, 1));
  return _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)));
}

// exp(x) to about 1 ulp: x = n ln2 + r (ln2 in two parts, |r| <= ln2 / 2), e^r by its Taylor
// series to r^13 (the remainder is below 2^-55 relative), times 2^n built in the exponent
// field. Below -708.39 (where e^x leaves the normal doubles) the result is 0; above 709.78 it is
// +inf; between 709.4 and 709.78 it saturates at e^709.4 (n stays <= 1023); NaN stays NaN.
inline Vec4d vexp(Vec4d x) {
  const __m256d lo = _mm256_set1_pd(-708.39641853226408);
  const __m256d xc = _mm256_min_pd(_mm256_max_pd(x.v, lo), _mm256_set1_pd(709.4));
  const __m256d n = _mm256_round_pd(_mm256_mul_pd(xc, _mm256_set1_pd(1.4426950408889634)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93147180369123816490e-01), xc);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.90821492927058770002e-10), r);
  static constexpr double kInvFact[14] = {1.0,
                                          1.0,
                                          1.0 / 2,
                                          1.0 / 6,
                                          1.0 / 24,
                                          1.0 / 120,
                                          1.0 / 720,
                                          1.0 / 5040,
                                          1.0 / 40320,
                                          1.0 / 362880,
                                          1.0 / 3628800,
                                          1.0 / 39916800,
                                          1.0 / 479001600,
                                          1.0 / 6227020800.0};
  __m256d p = _mm256_set1_pd(kInvFact[13]);
  for (int k = 12; k >= 0; --k) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(kInvFact[k]));
  // n in [-1022, 1023]: 2^n is a normal double
  const __m256i ni = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n));
  const __m256i pow2 = _mm256_slli_epi64(_mm256_add_epi64(ni, _mm256_set1_epi64x(1023)), 52);
  __m256d res = _mm256_mul_pd(p, _mm256_castsi256_pd(pow2));
  res = _mm256_andnot_pd(_mm256_cmp_pd(x.v, lo, _CMP_LT_OQ), res);
  const __m256d over = _mm256_cmp_pd(x.v, _mm256_set1_pd(709.782712893384), _CMP_GT_OQ);
  res = _mm256_blendv_pd(res, _mm256_set1_pd(INFINITY), over);
  const __m256d isnan = _mm256_cmp_pd(x.v, x.v, _CMP_UNORD_Q);
  return _mm256_blendv_pd(res, x.v, isnan);
}

}  // namespace FL_ISA
}  // namespace fastloss
