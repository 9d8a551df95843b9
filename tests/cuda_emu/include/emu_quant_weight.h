// For the quant harnesses of the test emulator: a QuantWeight from the pointers and the shape
// (N, K, group, codebook rows) the tests pass through ctypes.
#pragma once
#include <cstdint>

#include "quant/quant_kernels.h"

inline fastloss::QuantWeight emu_quant_weight(const uint8_t* q, const float* scale, const float* zero,
                                              const float* codebook, const int64_t* shape, int bits) {
  fastloss::QuantWeight w;
  w.q = q;
  w.scale = scale;
  w.zero = zero;
  w.codebook = codebook;
  w.N = shape[0];
  w.K = shape[1];
  w.group = shape[2];
  w.codebook_rows = shape[3];
  w.bits = bits;
  return w;
}
