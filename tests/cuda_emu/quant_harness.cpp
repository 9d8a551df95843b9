// The CUDA kernels of csrc/quant/quant_cuda.cu under the emulator (emu.h), behind a C
// interface for ctypes (tests/test_cuda_emulation.py). Each function returns null or the error.
#include "kernels.inc"
#include "emu_quant_weight.h"

extern "C" {

// shape: N, K, group, codebook rows
// x [M, K] and y [M, N] in dtype (0 float32, 1 float16, 2 bfloat16)
const char* emu_quant_gemv(const uint8_t* q, const float* scale, const float* zero,
                           const float* codebook, const int64_t* shape, int bits, const void* x,
                           int dtype, int64_t M, const float* bias, void* y) {
  return fastloss::quant_gemv_cuda(emu_quant_weight(q, scale, zero, codebook, shape, bits), x,
                                   fastloss::ScalarType(dtype), M, bias, y, nullptr);
}

const char* emu_quant_dequant(const uint8_t* q, const float* scale, const float* zero,
                              const float* codebook, const int64_t* shape, int bits, void* out, int dtype,
                              int64_t n0, int64_t n1) {
  return fastloss::quant_dequant_rows_cuda(emu_quant_weight(q, scale, zero, codebook, shape, bits), out,
                                           fastloss::ScalarType(dtype), n0, n1, nullptr);
}

}  // extern "C"
