// The linear + cross-entropy statistics kernel of csrc/linear_losses/linear_ce_cuda.cu under
// the emulator (emu.h and its mma model), behind a C interface for ctypes
// (tests/test_cuda_emulation.py). Returns null or the error.
#include <vector>

#include "kernels.inc"

extern "C" {

// shape: N, D, V, class_offset; dtype 1 float16, 2 bfloat16; out [N, 3]
const char* emu_linear_ce_stats(const void* hidden, const void* weight, const void* bias, int dtype,
                                const int64_t* shape, const int64_t* target, const float* class_weight,
                                float softcap, int weighted_sum, float* out) {
  fastloss::LinearCeStatsArgs a;
  a.hidden = hidden;
  a.weight = weight;
  a.bias = bias;
  a.dtype = fastloss::ScalarType(dtype);
  a.N = shape[0];
  a.D = shape[1];
  a.V = shape[2];
  a.class_offset = shape[3];
  a.target = target;
  a.class_weight = class_weight;
  a.softcap = softcap;
  a.weighted_sum = weighted_sum != 0;
  if (!fastloss::linear_ce_stats_available()) return "not available";
  const int splits = fastloss::linear_ce_stats_splits(a.N, a.V);
  std::vector<float> partial(size_t(splits) * size_t(a.N) * 4, __builtin_nanf(""));
  return fastloss::linear_ce_stats_cuda(a, partial.data(), splits, out, nullptr);
}

}  // extern "C"
