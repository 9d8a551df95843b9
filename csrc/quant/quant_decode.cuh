// Decoding of the packed low-bit layout (quant_kernels.h) inside CUDA kernels, shared by the
// GEMV / dequantize kernels (quant_cuda.cu) and the tensor-core GEMM (quant_mma_cuda.cu).
// Torch-free; included only by .cu files.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/macros.h"
#include "quant_kernels.h"

namespace fastloss {
namespace FL_ISA {

// the packed code of value v (0 <= v < group) of the group whose bytes start at b
__device__ __forceinline__ int code_at(const uint8_t* b, int bits, int64_t P, int64_t v) {
  const int64_t j = v / P, i = v - j * P;
  if (bits == 3) {
    const int lo = (b[(j & 1) * P + i] >> (2 * (j >> 1))) & 3;
    return lo | (((b[2 * P + i] >> j) & 1) << 2);
  }
  return (b[i] >> (j * bits)) & ((1 << bits) - 1);
}

// the bits of plane j at the 4 byte positions of word `word` (32 bits): field j of each byte
template <int BITS>
__device__ __forceinline__ int field(uint32_t word, int byte, int j) {
  return int(word >> (8 * byte + j * BITS)) & ((1 << BITS) - 1);
}

// the code of plane j at byte t of a unit's words (lo1, hi: bits 3 only)
template <int BITS>
__device__ __forceinline__ int unit_code(uint32_t lo0, uint32_t lo1, uint32_t hi, int t, int j) {
  if constexpr (BITS == 3) return field<2>((j & 1) ? lo1 : lo0, t, j >> 1) | (field<1>(hi, t, j) << 2);
  return field<BITS>(lo0, t, j);
}

struct Table {  // v(q): the row's codebook (in shared memory) or the integer itself
  const float* t;
  __device__ __forceinline__ float operator()(int q) const { return t ? t[q] : float(q); }
};

}  // namespace FL_ISA
}  // namespace fastloss
