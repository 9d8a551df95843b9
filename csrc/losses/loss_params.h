// Plain descriptions of a row-loss call, shared by the torch-aware op file and the kernels.
#pragma once
#include <cstdint>

namespace fastloss {

enum class ScalarType : int { f32 = 0, f16 = 1, bf16 = 2 };

enum class LossKind : int { cross_entropy = 0, comp_sum = 1, ldr = 2, spherical_z = 3, stablemax = 4 };

// Scalars of every loss; each loss reads its own fields.
struct LossParams {
  LossKind kind = LossKind::cross_entropy;
  int64_t ignore_index = -100;
  // cross_entropy
  float label_smoothing = 0.f;
  float lse_square_scale = 0.f;
  float softcap = 0.f;                 // 0: no soft-capping
  const float* weight_sum = nullptr;   // sum of class weights (device memory on CUDA); null: C
  // comp_sum
  float tau = 1.f;
  // ldr
  float lam = 1.f, margin = 0.f, alpha = 2.f;
  bool adaptive = false;
  // spherical_z
  float a = 1.f, b = 0.f, eps = 0.f;
};

// logits [rows, cols], element (r, k) at data[r * row_stride + k] (columns contiguous).
struct LogitsView {
  const void* data = nullptr;
  ScalarType dtype = ScalarType::f32;
  int64_t rows = 0, cols = 0, row_stride = 0;
};

// target [rows] int64 (contiguous); weight [cols] float32 or null.
struct RowTargets {
  const int64_t* target = nullptr;
  const float* weight = nullptr;
};

// Per-row outputs of the forward (all float32, contiguous [rows]): the weighted row loss and
// two statistics the backward needs (their meaning is the loss's own, see loss_math.h).
struct RowStats {
  float* loss = nullptr;
  float* stat0 = nullptr;
  float* stat1 = nullptr;
};

// Inputs of the backward: d(total)/d(row loss) [rows] float32, the forward's statistics,
// and the gradient to write, in the logits' dtype with columns contiguous. grad_logits may
// be the logits themselves (in-place backward): each element is read before it is written.
struct RowGrad {
  const float* grad_loss = nullptr;
  const float* stat0 = nullptr;
  const float* stat1 = nullptr;
  void* grad_logits = nullptr;
  int64_t grad_row_stride = 0;
};

}  // namespace fastloss
