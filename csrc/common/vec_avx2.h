// Eight-lane float vector for the AVX2+FMA CPU kernels. Only compiled into translation units
// built with -mavx2 -mfma -mf16c, and only called after a run-time CPU check.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "macros.h"
#include "vec_scalar.h"
#include "vec_tanh.h"

namespace fastloss {
namespace FL_ISA {

struct Vec8 {
  __m256 v;
  Vec8() = default;
  Vec8(__m256 x) : v(x) {}
  Vec8(float x) : v(_mm256_set1_ps(x)) {}
};
struct Mask8 {
  __m256 m;
};

template <>
struct VecTraits<Vec8> {
  static constexpr int width = 8;
  using Int = __m256i;
};

inline Vec8 operator+(Vec8 a, Vec8 b) { return _mm256_add_ps(a.v, b.v); }
inline Vec8 operator-(Vec8 a, Vec8 b) { return _mm256_sub_ps(a.v, b.v); }
inline Vec8 operator*(Vec8 a, Vec8 b) { return _mm256_mul_ps(a.v, b.v); }
inline Vec8 operator/(Vec8 a, Vec8 b) { return _mm256_div_ps(a.v, b.v); }
inline Vec8 operator-(Vec8 a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }
inline Vec8& operator+=(Vec8& a, Vec8 b) { return a = a + b; }
inline Mask8 operator<(Vec8 a, Vec8 b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
inline Mask8 operator>=(Vec8 a, Vec8 b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GE_OQ)}; }
inline Vec8 vselect(Mask8 c, Vec8 a, Vec8 b) { return _mm256_blendv_ps(b.v, a.v, c.m); }
inline Mask8 operator<=(Vec8 a, Vec8 b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LE_OQ)}; }
inline Mask8 operator>(Vec8 a, Vec8 b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
inline Mask8 mask_and(Mask8 a, Mask8 b) { return {_mm256_and_ps(a.m, b.m)}; }
// (not a) and b
inline Mask8 mask_andnot(Mask8 a, Mask8 b) { return {_mm256_andnot_ps(a.m, b.m)}; }
// bit k set when lane k is
inline unsigned lane_bits(Mask8 m) { return unsigned(_mm256_movemask_ps(m.m)); }
// Operand order keeps a NaN in `a` (the data) in the result.
inline Vec8 vmax(Vec8 a, Vec8 b) { return _mm256_max_ps(b.v, a.v); }
inline Vec8 vmin(Vec8 a, Vec8 b) { return _mm256_min_ps(b.v, a.v); }
inline Vec8 vabs(Vec8 a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v); }
inline Vec8 vfma(Vec8 a, Vec8 b, Vec8 c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }

inline float hsum(Vec8 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmax(Vec8 a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x): Cody-Waite range reduction x = n ln2 + r and a degree-6 polynomial for e^r
// (relative error about 2 ulp). Below the smallest normal float the result is exactly 0, so
// masked (-inf) classes contribute nothing; above log(FLT_MAX) it is +inf; NaN stays NaN.
inline Vec8 vexp(Vec8 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);  // the float just above ln(FLT_MIN)
  __m256 xc = _mm256_min_ps(_mm256_max_ps(x.v, lo), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // n is in [-126, 127] after the clamp, so 2^n is a normal float built in the exponent field
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23);
  __m256 res = _mm256_mul_ps(p, _mm256_castsi256_ps(pow2));
  res = _mm256_andnot_ps(_mm256_cmp_ps(x.v, lo, _CMP_LT_OQ), res);
  const __m256 over = _mm256_cmp_ps(x.v, _mm256_set1_ps(88.72283935546875f), _CMP_GT_OQ);
  res = _mm256_blendv_ps(res, _mm256_set1_ps(INFINITY), over);
  const __m256 isnan = _mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q);
  return _mm256_blendv_ps(res, x.v, isnan);
}

inline bool all_lanes(Mask8 m) { return _mm256_movemask_ps(m.m) == 0xFF; }
// |mag| with the sign of `sign` (mag >= 0)
inline Vec8 vcopysign(Vec8 mag, Vec8 sign) {
  return _mm256_or_ps(mag.v, _mm256_and_ps(sign.v, _mm256_set1_ps(-0.0f)));
}
inline Vec8 vtanh(Vec8 x) { return vtanh_simd(x); }

inline Vec8 vlog(Vec8 x) {
  // For per-row scalars only: a lane-wise libm call, exact. Per-element logarithms take
  // vlog_fast (AUC, JSD and PLD had called this per element: libm's logf was 30% of AUC's time).
  alignas(32) float t[8];
  _mm256_store_ps(t, x.v);
  for (float& f : t) f = logf(f);
  return _mm256_load_ps(t);
}

// ---- loads and stores of the three storage types --------------------------------------
// log(x) in vector arithmetic, for per-element logarithms (vlog above calls libm per lane):
// x = 2^e m with m in [sqrt(1/2), sqrt(2)), log(m) = f + f^2 P(f) with f = m - 1 (Cephes'
// polynomial; about 2 ulp). Subnormals are scaled by 2^23 first; 0 -> -inf, +inf -> +inf,
// negative or NaN -> NaN.
inline Vec8 vlog_fast(Vec8 x) {
  const __m256 tiny = _mm256_cmp_ps(x.v, _mm256_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
  const __m256 xs = _mm256_blendv_ps(x.v, _mm256_mul_ps(x.v, _mm256_set1_ps(8388608.0f)), tiny);
  const __m256i bits = _mm256_castps_si256(xs);
  const __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F800000)));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);  // m in [1, 2)
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  __m256 ef = _mm256_add_ps(_mm256_cvtepi32_ps(e), _mm256_and_ps(big, _mm256_set1_ps(1.0f)));
  ef = _mm256_sub_ps(ef, _mm256_and_ps(tiny, _mm256_set1_ps(23.0f)));
  const __m256 f = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 p = _mm256_set1_ps(7.0376836292e-2f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.1514610310e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.1676998740e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.2420140846e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.4249322787e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.6668057665e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0000714765e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-2.4999993993e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(3.3333331174e-1f));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f), z);
  y = _mm256_fmadd_ps(ef, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  __m256 r = _mm256_fmadd_ps(ef, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
  r = _mm256_blendv_ps(r, _mm256_set1_ps(-INFINITY), _mm256_cmp_ps(x.v, _mm256_setzero_ps(), _CMP_EQ_OQ));
  const __m256 pass = _mm256_or_ps(_mm256_cmp_ps(x.v, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ),
                                   _mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
  r = _mm256_blendv_ps(r, x.v, pass);
  return _mm256_blendv_ps(r, _mm256_set1_ps(NAN), _mm256_cmp_ps(x.v, _mm256_setzero_ps(), _CMP_LT_OQ));
}

inline Vec8 load8(const float* p) { return _mm256_loadu_ps(p); }
// Low-bit weights, eight lanes: bit fields of eight bytes as integers, two fields joined, and
// the integers as floats or as indices into a table of floats (codebooks).
inline __m256i bit_field(const uint8_t* p, int shift, int mask, Vec8) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_srl_epi32(b, _mm_cvtsi32_si128(shift)), _mm256_set1_epi32(mask));
}
inline __m256i or_shifted(__m256i a, __m256i b, int shift) {
  return _mm256_or_si256(a, _mm256_sll_epi32(b, _mm_cvtsi32_si128(shift)));
}
inline Vec8 int_to_float(__m256i a) { return _mm256_cvtepi32_ps(a); }
// table[i] for i < 16: two in-register permutes, the one for i >= 8 chosen by bit 3
inline Vec8 lookup16(const float* table, __m256i i, Vec8) {
  const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), i);
  const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 8), i);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));
}
inline Vec8 gather(const float* table, __m256i i, Vec8) { return _mm256_i32gather_ps(table, i, 4); }
inline Vec8 load8_bf16(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline Vec8 load8_half(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline void store8(float* p, Vec8 a) { _mm256_storeu_ps(p, a.v); }
inline void store8_half(uint16_t* p, Vec8 a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store8_bf16(uint16_t* p, Vec8 a) {
  // round to nearest even; NaN made quiet, as float_to_bf16 does
  const __m256i u = _mm256_castps_si256(a.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  r = _mm256_srli_epi32(r, 16);
  const __m256 isnan = _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q);
  const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(qnan), isnan));
  // pack 8 x u32 (values < 2^16) into 8 x u16
  const __m128i lo = _mm256_castsi256_si128(r), hi = _mm256_extracti128_si256(r, 1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(lo, hi));
}

}  // namespace FL_ISA
}  // namespace fastloss

#include "storage.h"

namespace fastloss {
namespace FL_ISA {

template <>
struct VecIo<Vec8> {
  static Vec8 load(const float* p) { return load8(p); }
  static Vec8 load(const bf16_t* p) { return load8_bf16(&p->bits); }
  static Vec8 load(const half_t* p) { return load8_half(&p->bits); }
  static void store(float* p, Vec8 v) { store8(p, v); }
  static void store(bf16_t* p, Vec8 v) { store8_bf16(&p->bits, v); }
  static void store(half_t* p, Vec8 v) { store8_half(&p->bits, v); }
  static void lanes(Vec8 v, float* out) { _mm256_storeu_ps(out, v.v); }
};

}  // namespace FL_ISA
}  // namespace fastloss
