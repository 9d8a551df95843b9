// The tensor-core GEMV of csrc/quant/quant_gemv_mma_cuda.cu under the emulator (emu.h and its
// mma model, include/mma_emu.h), behind a C interface for ctypes (tests/test_cuda_emulation.py).
// Returns null or the error.
#include "kernels.inc"
#include "emu_quant_weight.h"

extern "C" {

static int gemv_ring = fastloss::kQuantGemvRing;
// the ring of shared slots per warp the next calls use (FASTLOSS_QUANT_GEMV_RING in the op)
void emu_set_gemv_ring(int ring) { gemv_ring = ring; }

// shape: N, K, group, codebook rows; x [M, K] and y [M, N] in dtype (1 float16, 2 bfloat16);
// returns "not applicable" where quant_gemv_mma_applies() refuses the weight.
const char* emu_quant_gemv_mma(const uint8_t* q, const float* scale, const float* zero,
                               const float* codebook, const int64_t* shape, int bits, const void* x,
                               int dtype, int64_t M, const float* bias, void* y) {
  const fastloss::QuantWeight w = emu_quant_weight(q, scale, zero, codebook, shape, bits);
  if (!fastloss::quant_gemv_mma_applies(w, fastloss::ScalarType(dtype), M)) return "not applicable";
  return fastloss::quant_gemv_mma_cuda(w, x, fastloss::ScalarType(dtype), M, bias, y, nullptr, gemv_ring);
}

}  // extern "C"
