// The pipelined tensor-core dequant GEMM of csrc/quant/quant_gemm_pipe_cuda.cu under the
// emulator (emu.h, its mma model include/mma_emu.h and its cp.async model), behind a C
// interface for ctypes (tests/test_cuda_emulation.py). Returns null or the error.
#include "kernels.inc"
#include "emu_quant_weight.h"

extern "C" {

// shape: N, K, group, codebook rows; x [M, K] and y [M, N] in dtype (1 float16, 2 bfloat16);
// returns "not applicable" where quant_gemm_pipe_applies() refuses the weight.
const char* emu_quant_gemm_pipe(const uint8_t* q, const float* scale, const float* zero,
                                const float* codebook, const int64_t* shape, int bits, const void* x,
                                int dtype, int64_t M, const float* bias, void* y) {
  const fastloss::QuantWeight w = emu_quant_weight(q, scale, zero, codebook, shape, bits);
  if (!fastloss::quant_gemm_pipe_applies(w, fastloss::ScalarType(dtype))) return "not applicable";
  // the split-K workspace as the op allocates it (NaN: a partial sum left unwritten shows)
  std::vector<float> workspace(size_t(fastloss::quant_gemm_pipe_workspace_floats(w, M)), __builtin_nanf(""));
  return fastloss::quant_gemm_pipe_cuda(w, x, fastloss::ScalarType(dtype), M, bias, y,
                                        workspace.empty() ? nullptr : workspace.data(), nullptr);
}

}  // extern "C"
