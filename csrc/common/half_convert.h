// float16 / bfloat16 <-> float32 conversions in plain C++ for the CPU kernels.
// Both round to nearest even, like the hardware conversions (F16C, CUDA), so the generic and
// the AVX2 paths store bit-identical results.
#pragma once
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace fastloss {
namespace FL_ISA {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                       // round to nearest even
  return uint16_t(u >> 16);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  // zero or subnormal: man * 2^-24, exact in float
  const float mag = float(man) * 5.9604644775390625e-8f;
  return sign ? -mag : mag;
}

inline uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);                // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);               // overflow (rounds to inf)
  if (a < 0x38800000u) {                                               // subnormal half or zero
    // Adding 0.5 (as float) puts the half subnormal's bits in the low mantissa with hardware
    // round-to-nearest-even.
    const float shifted = bits_to_float(a) + 0.5f;
    return uint16_t(sign | uint16_t(float_to_bits(shifted) - 0x3f000000u));
  }
  uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u);  // rebias exponent (-112 << 23) and round
  return uint16_t(sign | uint16_t(r >> 13));
}

}  // namespace FL_ISA
}  // namespace fastloss
