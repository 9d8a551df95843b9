// What the CUDA kernel files share: scalar loads and stores of the storage types (float32 math
// inside), the dtype -> storage type dispatch, a warp's sum, the grid size of a launch and its
// error.
// Torch-free; included only by .cu files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

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

// The sum of v over the 32 lanes of a warp (a butterfly: every lane gets it); every lane of the
// warp must call it.
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Blocks for `items` work items, `per_block` a block: at least one, at most 2^20 (the kernels
// stride over the rest).
inline unsigned blocks_for(int64_t items, int64_t per_block) {
  const int64_t b = (items + per_block - 1) / per_block;
  return unsigned(b < (int64_t(1) << 20) ? (b > 0 ? b : 1) : (int64_t(1) << 20));
}

// nullptr, or the text of the error of the launches so far (cudaGetLastError).
inline const char* launch_status() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace FL_ISA
}  // namespace fastloss
