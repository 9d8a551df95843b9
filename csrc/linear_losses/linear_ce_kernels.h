// The linear + cross-entropy CUDA kernels' entry points (linear_ce_cuda.cu), torch-free.
#pragma once
#include <cstdint>

#include "../losses/loss_params.h"  // ScalarType

namespace fastloss {

// linear_ce_tile_stats on the device for float16 / bfloat16 (dtype) hidden [N, D] and weight
// [V, D], rows contiguous and 16-byte aligned, D % 8 == 0; bias [V] of that dtype or null;
// target [N] int64 (global classes; this weight holds class_offset .. class_offset + V - 1);
// class_weight [V] float32 or null; softcap > 0 caps the logits; weighted_sum asks for the
// (class-weighted) sum of the logits (else 0).
struct LinearCeStatsArgs {
  const void* hidden = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  ScalarType dtype = ScalarType::bf16;
  int64_t N = 0, D = 0, V = 0;
  const int64_t* target = nullptr;
  int64_t class_offset = 0;
  const float* class_weight = nullptr;
  float softcap = 0.f;
  bool weighted_sum = false;
};

// Splits of the vocabulary (blocks per row block) for the GPU at hand; partial holds
// splits x N x 4 floats. out [N, 3] float32: log-sum-exp, target logit, weighted sum.
int linear_ce_stats_splits(int64_t N, int64_t V);
// Whether the device's code of the kernel has tensor-core mma (sm_80+).
bool linear_ce_stats_available();
const char* linear_ce_stats_cuda(const LinearCeStatsArgs& a, float* partial, int splits, float* out,
                                 void* stream);

}  // namespace fastloss
