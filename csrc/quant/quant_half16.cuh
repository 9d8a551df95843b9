// Packed codes to 16-bit floats in about one instruction per value, for the tensor-core kernels
// of the uniform formats (quant_gemv_mma_cuda.cu, quant_gemm_pipe_cuda.cu): a code is OR-ed
// into the mantissa of a constant (float16 1024 = 0x6400, bfloat16 128 = 0x4300: 1024 + q is
// exact), and one paired fused multiply-add removes the constant and the integer part zi of the
// zero point, leaving q - zi exactly (small integers are exact in 16-bit floats).
// Torch-free; included only by .cu files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_helpers.cuh"
#include "quant_kernels.h"

namespace fastloss {
namespace FL_ISA {

// The 16-bit float type's constants: kMagic's mantissa takes a code in its low bits (two codes
// per 32-bit word); kScaledPlanes: planes j > 0 are masked in place (code << bits j, one fewer
// shift) and scaled back by the fused multiply-add (float16: 1024 + 64 q stays exact; bfloat16,
// with 7 mantissa bits, shifts every plane down instead).
template <class T>
struct Half16;
template <>
struct Half16<__half> {
  using Pair = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0
  static constexpr float kBase = 1024.f;
  static constexpr bool kScaledPlanes = true;
  static constexpr float kMaxZero = 1024.f;        // |zi| <= 1024: 1024 + zi and q - zi exact
  static constexpr uint32_t kOne = 0x3c003c00u;
  __device__ static uint32_t splat(float v) { return bits_as<uint32_t>(__floats2half2_rn(v, v)); }
  __device__ static uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    return bits_as<uint32_t>(__hfma2(bits_as<Pair>(a), bits_as<Pair>(b), bits_as<Pair>(c)));
  }
};
template <>
struct Half16<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0
  static constexpr float kBase = 128.f;
  static constexpr bool kScaledPlanes = false;
  static constexpr float kMaxZero = 128.f;         // 128 + zi in [0, 256]: exact
  static constexpr uint32_t kOne = 0x3f803f80u;
  __device__ static uint32_t splat(float v) { return bits_as<uint32_t>(__floats2bfloat162_rn(v, v)); }
  __device__ static uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    // (bfloat16 arithmetic needs sm_80; the kernels never run below it (mma_available),
    // but the files are compiled for the wheels' older targets too: the same values in float32)
    const float2 fa = __bfloat1622float2(bits_as<Pair>(a)), fb = __bfloat1622float2(bits_as<Pair>(b)),
                 fc = __bfloat1622float2(bits_as<Pair>(c));
    return bits_as<uint32_t>(__floats2bfloat162_rn(fmaf(fa.x, fb.x, fc.x), fmaf(fa.y, fb.y, fc.y)));
#else
    return bits_as<uint32_t>(__hfma2(bits_as<Pair>(a), bits_as<Pair>(b), bits_as<Pair>(c)));
#endif
  }
};

// zi: z rounded to an integer the constants hold exactly (NaN / inf land in r = z - zi)
template <class T>
__device__ __forceinline__ float integer_zero(float z) {
  return fminf(fmaxf(rintf(z), -Half16<T>::kMaxZero), Half16<T>::kMaxZero);
}

// The planes' constants: 2^-(bits j) as a 16-bit pair (float16) or 1, and base 2^-(bits j).
template <int BITS, class T>
struct Planes {
  static constexpr int kCount = quant_planes(BITS);
  uint32_t unscale[kCount];
  float base[kCount];
  __device__ Planes() {
#pragma unroll
    for (int j = 0; j < kCount; ++j) {
      const float f = Half16<T>::kScaledPlanes ? 1.f / float(1u << (BITS * j)) : 1.f;
      unscale[j] = Half16<T>::splat(f);
      base[j] = Half16<T>::kBase * f;
    }
  }
  // -(base_j + zi) as a 16-bit pair: the fused multiply-add's addend for plane j
  __device__ uint32_t minus_c(int j, float zi) const { return Half16<T>::splat(-(base[j] + zi)); }
};

// The pair of plane-j codes held in bits [0, 8) and [16, 24) of `v` (one byte of the packed
// layout per 16-bit half; what lies in bits [8, 16) and [24, 32) is masked off) as a 16-bit
// pair, q - zi exactly, given the plane's constants: `unscale` (2^-(bits j), or 1) and
// `minus_c` (-(base 2^-(bits j) + zi)).
template <int BITS, class T>
__device__ __forceinline__ uint32_t decode_halves(uint32_t v, int j, uint32_t unscale, uint32_t minus_c) {
  constexpr uint32_t kMask = ((1u << BITS) - 1) * 0x00010001u;
  using H = Half16<T>;
  const uint32_t m = H::kScaledPlanes ? (v & (kMask << (BITS * j))) | H::kMagic
                                      : ((v >> (BITS * j)) & kMask) | H::kMagic;
  return H::fma(m, unscale, minus_c);
}

}  // namespace FL_ISA
}  // namespace fastloss
