// Scalar loads and stores of the CUDA kernels' storage types (float32 math inside), and the
// dtype -> storage type dispatch. Torch-free; included only by .cu files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../losses/loss_params.h"  // ScalarType
#include "macros.h"

namespace fastloss {
namespace FL_ISA {

__device__ __forceinline__ float load1(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load1(const __half* p) { return __half2float(__ldg(p)); }
__device__ __forceinline__ float load1(const __nv_bfloat16* p) {
  return __bfloat162float(__ldg(p));
}
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Calls f.template operator()<T>() with T the CUDA storage type of dtype.
template <class F>
void visit_dtype(ScalarType t, F&& f) {
  switch (t) {
    case ScalarType::f32: return f.template operator()<float>();
    case ScalarType::f16: return f.template operator()<__half>();
    case ScalarType::bf16: return f.template operator()<__nv_bfloat16>();
  }
}

}  // namespace FL_ISA
}  // namespace fastloss
