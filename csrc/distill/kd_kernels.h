// Entry points of the logit-distillation kernels (torch-free).
//
// Per row, with s = student / T and t = teacher / T, p = softmax(s), q = softmax(t):
//   forward_kl: T^2 KL(q || p)      reverse_kl: T^2 KL(p || q)
//   jsd:        T^2 [beta KL(q || m) + (1 - beta) KL(p || m)],  m = beta q + (1 - beta) p
// and the gradient with respect to the student's logits. The forward keeps three float32
// statistics per row (lse(s), lse(t), and a kind-specific one) for the backward, which reads
// both rows once more and writes the gradient once.
#pragma once
#include <cstdint>

#include "../losses/loss_params.h"  // ScalarType

namespace fastloss {

enum class KdKind : int { forward_kl = 0, reverse_kl = 1, jsd = 2 };

struct KdProblem {
  const void* student = nullptr;  // [N, C], classes contiguous, rows of stride s_stride
  const void* teacher = nullptr;  // [N, C], rows of stride t_stride (same dtype)
  ScalarType dtype = ScalarType::f32;
  int64_t N = 0, C = 0, s_stride = 0, t_stride = 0;
  KdKind kind = KdKind::forward_kl;
  float temperature = 1.f, beta = 0.5f;
};

// Rows [r0, r1): loss[r] (float32, already times T^2) and stats[3 r .. 3 r + 2].
void kd_forward_cpu(const KdProblem& q, float* loss, float* stats, int64_t r0, int64_t r1);
// grad[r * C + k] (the student's dtype, contiguous) = grad_loss[r] * d loss_r / d student[r, k].
void kd_backward_cpu(const KdProblem& q, const float* grad_loss, const float* stats, void* grad,
                     int64_t r0, int64_t r1);

}  // namespace fastloss
