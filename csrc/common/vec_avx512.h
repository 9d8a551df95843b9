// Sixteen-lane float vector for the AVX-512 CPU kernels (AVX512F only). Compiled into its own
// translation unit with -mavx512f and entered only after a run-time CPU check.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "macros.h"
#include "storage.h"
#include "vec_scalar.h"
#include "vec_tanh.h"

namespace fastloss {
namespace FL_ISA {

struct Vec16 {
  __m512 v;
  Vec16() = default;
  Vec16(__m512 x) : v(x) {}
  Vec16(float x) : v(_mm512_set1_ps(x)) {}
};
struct Mask16 {
  __mmask16 m;
};

template <>
struct VecTraits<Vec16> {
  static constexpr int width = 16;
  using Int = __m512i;
};

inline Vec16 operator+(Vec16 a, Vec16 b) { return _mm512_add_ps(a.v, b.v); }
inline Vec16 operator-(Vec16 a, Vec16 b) { return _mm512_sub_ps(a.v, b.v); }
inline Vec16 operator*(Vec16 a, Vec16 b) { return _mm512_mul_ps(a.v, b.v); }
inline Vec16 operator/(Vec16 a, Vec16 b) { return _mm512_div_ps(a.v, b.v); }
inline Vec16 operator-(Vec16 a) {
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MIN)));
}
inline Vec16& operator+=(Vec16& a, Vec16 b) { return a = a + b; }
inline Mask16 operator<(Vec16 a, Vec16 b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ)}; }
inline Mask16 operator>=(Vec16 a, Vec16 b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ)}; }
inline Vec16 vselect(Mask16 c, Vec16 a, Vec16 b) { return _mm512_mask_blend_ps(c.m, b.v, a.v); }
inline Mask16 operator<=(Vec16 a, Vec16 b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LE_OQ)}; }
inline Mask16 operator>(Vec16 a, Vec16 b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ)}; }
inline Mask16 mask_and(Mask16 a, Mask16 b) { return {__mmask16(a.m & b.m)}; }
inline Mask16 mask_andnot(Mask16 a, Mask16 b) { return {__mmask16(~a.m & b.m)}; }
inline unsigned lane_bits(Mask16 m) { return m.m; }
// Operand order keeps a NaN in `a` (the data) in the result, as in vec_avx2.h.
inline Vec16 vmax(Vec16 a, Vec16 b) { return _mm512_max_ps(b.v, a.v); }
inline Vec16 vmin(Vec16 a, Vec16 b) { return _mm512_min_ps(b.v, a.v); }
inline Vec16 vabs(Vec16 a) { return _mm512_abs_ps(a.v); }
inline Vec16 vfma(Vec16 a, Vec16 b, Vec16 c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
inline float hsum(Vec16 a) { return _mm512_reduce_add_ps(a.v); }
inline float hmax(Vec16 a) { return _mm512_reduce_max_ps(a.v); }

// exp(x): the same reduction and polynomial as the AVX2 version, and like it exactly 0 below
// the smallest normal float (-inf included: masked classes contribute nothing): a subnormal
// result would cost a microcode assist in every add or multiply that takes it (logits spread
// over more than ~87 made a whole cross-entropy 12x slower). scalef applies 2^n with overflow
// to +inf; a NaN passes through the clamps, which keep the data operand last.
inline Vec16 vexp(Vec16 x) {
  const __m512 lo = _mm512_set1_ps(-87.33654f);  // the float just above ln(FLT_MIN)
  const __mmask16 keep = _mm512_cmp_ps_mask(x.v, lo, _CMP_NLT_UQ);  // (NaN kept)
  __m512 xc = _mm512_max_ps(lo, x.v);
  xc = _mm512_min_ps(_mm512_set1_ps(89.0f), xc);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

inline bool all_lanes(Mask16 m) { return m.m == 0xFFFF; }
// |mag| with the sign of `sign` (mag >= 0)
inline Vec16 vcopysign(Vec16 mag, Vec16 sign) {
  const __m512i s = _mm512_and_si512(_mm512_castps_si512(sign.v), _mm512_set1_epi32(INT32_MIN));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(mag.v), s));
}
inline Vec16 vtanh(Vec16 x) { return vtanh_simd(x); }

inline Vec16 vlog(Vec16 x) {  // per-row scalars only (a libm call per lane): see vec_avx2.h
  alignas(64) float t[16];
  _mm512_store_ps(t, x.v);
  for (float& f : t) f = logf(f);
  return _mm512_load_ps(t);
}

// log(x): the same reduction and polynomial as the AVX2 version (vec_avx2.h).
inline Vec16 vlog_fast(Vec16 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(1.17549435e-38f), _CMP_LT_OQ);
  const __m512 xs = _mm512_mask_mul_ps(x.v, tiny, x.v, _mm512_set1_ps(8388608.0f));
  const __m512i bits = _mm512_castps_si512(xs);
  const __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(127));
  __m512 m = _mm512_castsi512_ps(_mm512_or_si512(
      _mm512_and_si512(bits, _mm512_set1_epi32(0x007FFFFF)), _mm512_set1_epi32(0x3F800000)));
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  __m512 ef = _mm512_cvtepi32_ps(e);
  ef = _mm512_mask_add_ps(ef, big, ef, _mm512_set1_ps(1.0f));
  ef = _mm512_mask_sub_ps(ef, tiny, ef, _mm512_set1_ps(23.0f));
  const __m512 f = _mm512_sub_ps(m, _mm512_set1_ps(1.0f));
  const __m512 z = _mm512_mul_ps(f, f);
  __m512 p = _mm512_set1_ps(7.0376836292e-2f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.1514610310e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.1676998740e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.2420140846e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.4249322787e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-1.6668057665e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.0000714765e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(-2.4999993993e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(3.3333331174e-1f));
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, f), z);
  y = _mm512_fmadd_ps(ef, _mm512_set1_ps(-2.12194440e-4f), y);
  y = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5f), y);
  __m512 r = _mm512_fmadd_ps(ef, _mm512_set1_ps(0.693359375f), _mm512_add_ps(f, y));
  r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_EQ_OQ), r,
                           _mm512_set1_ps(-INFINITY));
  const __mmask16 pass = _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ) |
                         _mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q);
  r = _mm512_mask_blend_ps(pass, r, x.v);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, _mm512_setzero_ps(), _CMP_LT_OQ), r,
                              _mm512_set1_ps(NAN));
}

// Low-bit weights, sixteen lanes: bit fields of sixteen bytes as integers, two fields joined,
// and the integers as floats or as indices into a table of floats (codebooks).
inline __m512i bit_field(const uint8_t* p, int shift, int mask, Vec16) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_and_si512(_mm512_srl_epi32(b, _mm_cvtsi32_si128(shift)), _mm512_set1_epi32(mask));
}
inline __m512i or_shifted(__m512i a, __m512i b, int shift) {
  return _mm512_or_si512(a, _mm512_sll_epi32(b, _mm_cvtsi32_si128(shift)));
}
inline Vec16 int_to_float(__m512i a) { return _mm512_cvtepi32_ps(a); }
// table[i] for i < 16: one in-register permute
inline Vec16 lookup16(const float* table, __m512i i, Vec16) {
  return _mm512_permutexvar_ps(i, _mm512_loadu_ps(table));
}
inline Vec16 gather(const float* table, __m512i i, Vec16) { return _mm512_i32gather_ps(i, table, 4); }

template <>
struct VecIo<Vec16> {
  static Vec16 load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec16 load(const bf16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static Vec16 load(const half_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store(float* p, Vec16 v) { _mm512_storeu_ps(p, v.v); }
  static void store(half_t* p, Vec16 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT));
  }
  static void store(bf16_t* p, Vec16 v) {
    // round to nearest even; NaN made quiet, as float_to_bf16 does
    const __m512i u = _mm512_castps_si512(v.v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v.v, v.v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static void lanes(Vec16 v, float* out) { _mm512_storeu_ps(out, v.v); }
};

}  // namespace FL_ISA
}  // namespace fastloss
