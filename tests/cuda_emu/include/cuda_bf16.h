// Stub for the CUDA emulator of the tests: bfloat16 storage with the conversions fastloss
// uses, rounding to nearest even as the hardware does (csrc/common/half_convert.h).
#pragma once
#include "../emu.h"
#include "common/half_convert.h"

struct __nv_bfloat16 {
  uint16_t bits;
};
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }
inline float __bfloat162float(__nv_bfloat16 h) { return fastloss::FL_ISA::bf16_to_float(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {fastloss::FL_ISA::float_to_bf16(f)}; }

// A pair: element x in the low 16 bits, as the GPU lays it out.
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
// The paired fused multiply-add, a * b + c per half, computed in double and rounded to bfloat16
// through float (the hardware rounds once; the same wherever the result is representable).
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  auto one = [](__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
    const double v = double(__bfloat162float(a)) * __bfloat162float(b) + __bfloat162float(c);
    return __float2bfloat16_rn(float(v));
  };
  return {one(a.x, b.x, c.x), one(a.y, b.y, c.y)};
}
