// Stub for the CUDA emulator of the tests: float16 storage with the conversions fastloss uses,
// rounding to nearest even as the hardware does (csrc/common/half_convert.h).
#pragma once
#include "../emu.h"
#include "common/half_convert.h"

struct __half {
  uint16_t bits;
};
inline __half __ushort_as_half(unsigned short u) { return {u}; }
inline float __half2float(__half h) { return fastloss::FL_ISA::half_to_float(h.bits); }
inline __half __float2half_rn(float f) { return {fastloss::FL_ISA::float_to_half(f)}; }

// A pair: element x in the low 16 bits, as the GPU lays it out.
struct alignas(4) __half2 {
  __half x, y;
};
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
// The paired fused multiply-add, a * b + c per half, computed in double and rounded to float16
// through float (the hardware rounds once; the same wherever the result is representable, as
// in the kernels' decoding of small integers).
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  auto one = [](__half a, __half b, __half c) {
    return __half{fastloss::FL_ISA::float_to_half(float(double(__half2float(a)) * __half2float(b) + __half2float(c)))};
  };
  return {one(a.x, b.x, c.x), one(a.y, b.y, c.y)};
}
