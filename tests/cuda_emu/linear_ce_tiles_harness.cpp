// The low-memory linear + cross-entropy path's per-tile kernels of
// csrc/linear_losses/linear_ce_tiles_cuda.cu under the emulator (emu.h), behind a C interface
// for ctypes (tests/test_cuda_emulation.py). Returns null or the error.
#include "kernels.inc"

namespace {

// shape: rows, n, ld, first_class; dtype 0 float32, 1 float16, 2 bfloat16
fastloss::LinearCeTile tile(void* z, int dtype, const int64_t* shape, const int64_t* target,
                            const float* class_weight, float softcap) {
  fastloss::LinearCeTile t;
  t.z = z;
  t.dtype = fastloss::ScalarType(dtype);
  t.rows = shape[0];
  t.n = shape[1];
  t.ld = shape[2];
  t.first_class = shape[3];
  t.target = target;
  t.class_weight = class_weight;
  t.softcap = softcap;
  return t;
}

}  // namespace

extern "C" {

const char* emu_linear_ce_tile_stats(void* z, int dtype, const int64_t* shape, const int64_t* target,
                                     const float* class_weight, float softcap, int first, int weighted_sum,
                                     float* stats) {
  return fastloss::linear_ce_tile_stats_cuda(tile(z, dtype, shape, target, class_weight, softcap), first != 0,
                                             weighted_sum != 0, stats, nullptr);
}

const char* emu_linear_ce_tile_grad(void* z, int dtype, const int64_t* shape, const int64_t* target,
                                    const float* class_weight, float softcap, const float* lse, const float* coef,
                                    int smoothing) {
  return fastloss::linear_ce_tile_grad_cuda(tile(z, dtype, shape, target, class_weight, softcap), lse, coef,
                                            smoothing != 0, nullptr);
}

}  // extern "C"
