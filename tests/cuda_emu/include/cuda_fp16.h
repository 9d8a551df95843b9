// Stub for the CUDA emulator of the tests: float16 storage with the conversions fastloss uses,
// rounding to nearest even as the hardware does (csrc/common/half_convert.h).
#pragma once
#include "../emu.h"
#include "common/half_convert.h"

struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) { return fastloss::FL_ISA::half_to_float(h.bits); }
inline __half __float2half_rn(float f) { return {fastloss::FL_ISA::float_to_half(f)}; }
