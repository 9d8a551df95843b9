// Entry points of the low-bit dequant GEMM CPU kernels (torch-free).
//
// Packed layout (one format family, see README "Low-bit dequant GEMM"): a weight [N, K] is
// quantized in groups of `group` consecutive inputs of one output row; group g of row n has a
// float32 scale s[n, g] and zero point z[n, g] (in quantized units) and w[n, k] = (q[n, k] - z) s.
//   bits = 8: q[n, k] is byte k of row n (row of K bytes).
//   bits = 4: a row is K / 2 bytes; within group g (bytes g * group / 2 ...), byte i holds
//             q[g * group + i] in its low nibble and q[g * group + group / 2 + i] in its high
//             nibble, so that unpacking a group is two contiguous loops.
#pragma once
#include <cstdint>

#include "../losses/loss_params.h"  // ScalarType

namespace fastloss {

struct QuantWeight {
  const uint8_t* q = nullptr;     // [N, K * bits / 8]
  const float* scale = nullptr;   // [N, K / group]
  const float* zero = nullptr;    // [N, K / group]
  int64_t N = 0, K = 0, group = 0;
  int bits = 4;
};

// y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for output features [n0, n1), float32 x [M, K]
// (contiguous) with xsum[m, g] = sum of x over group g, y float32 [M, N] (row stride N).
// For small M (the memory-bound path: each packed row is read once for all M rows).
constexpr int64_t kQuantMaxRows = 16;
void quant_gemv_cpu(const QuantWeight& w, const float* x, const float* xsum, int64_t M,
                    const float* bias, float* y, int64_t n0, int64_t n1);

// The float32 weights of rows [n0, n1) into out [(n1 - n0), K] (the large-batch path and the
// backward dequantize tiles of rows and multiply them with torch's GEMM).
void quant_dequant_rows_cpu(const QuantWeight& w, float* out, int64_t n0, int64_t n1);

}  // namespace fastloss
