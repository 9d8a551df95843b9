// The linear + cross-entropy kernels' entry points (CUDA: linear_ce_cuda.cu,
// linear_ce_tiles_cuda.cu; CPU: linear_ce_filter_cpu.cpp), torch-free.
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

// One vocabulary tile of the low-memory path's logits (linear_ce_tiles_cuda.cu): z [rows, n]
// (row stride ld) of raw logits in dtype (bias included; the kernels apply the soft cap);
// target [rows] global class indices of the tile's rows; the tile holds classes first_class ..
// first_class + n - 1; class_weight: the tile's n class weights, or null.
struct LinearCeTile {
  void* z = nullptr;
  ScalarType dtype = ScalarType::f32;
  int64_t rows = 0, n = 0, ld = 0;
  const int64_t* target = nullptr;
  int64_t first_class = 0;
  const float* class_weight = nullptr;
  float softcap = 0.f;
};

// stats [rows, 3] float32: the tile's log-sum-exp written to column 0 (first) or merged into it
// (log(e^a + e^b)); the target's logit added to column 1 when the target is one of the tile's
// classes; with weighted_sum the (class-weighted) sum of the logits added to column 2.
const char* linear_ce_tile_stats_cuda(const LinearCeTile& t, bool first, bool weighted_sum, float* stats,
                                      void* stream);
// z := d loss / d z = (a p_k - hit [k = y] - smooth w_k) * d cap / d z, p_k = exp(capped z_k - lse),
// in place and in z's dtype; per row lse [rows] and coef [rows, 3] = (a, hit, smooth) (smooth
// read only with `smoothing`).
const char* linear_ce_tile_grad_cuda(const LinearCeTile& t, const float* lse, const float* coef, bool smoothing,
                                     void* stream);

// Gradient filtering's test of a float32 tile g [rows, n] (row stride ld) on the CPU: keep[c]
// (c < ceil(n / chunk)) = 1 when some entry of columns [c chunk, (c + 1) chunk) exceeds its
// row's threshold[r] in magnitude (or is NaN), else 0.
void linear_ce_chunks_kept(const float* g, int64_t rows, int64_t n, int64_t ld, const float* threshold,
                           int64_t chunk, uint8_t* keep);

}  // namespace fastloss
