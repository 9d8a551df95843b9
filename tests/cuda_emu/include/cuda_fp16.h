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
