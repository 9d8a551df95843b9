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

// A masked class's logit (-inf, or below this, after the temperature) is taken as this value
// by the CPU and CUDA kernels alike (kd_cpu_impl.h's unmask says why; the torch formulas of
// ops/distill.py use the same), and a row whose largest is this has every class masked.
constexpr float kKdMaskedLogit = -1.0e30f;

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

// Rows [r0, r1): loss[r] as kd_forward_cpu's, and grad[r * C + k] (the student's dtype,
// contiguous) = grad_scale * d loss_r / d student[r, k], in one call (the autograd path when the
// student needs its gradient: the rows are read from memory once, the exponentials not redone).
void kd_forward_grad_cpu(const KdProblem& q, float grad_scale, float* loss, void* grad, int64_t r0,
                         int64_t r1);

// CUDA (kd_cuda.cu): all rows on `stream` (a cudaStream_t), the same outputs; each returns
// nullptr or the CUDA error of the launch.
const char* kd_forward_cuda(const KdProblem& q, float* loss, float* stats, void* stream);
const char* kd_backward_cuda(const KdProblem& q, const float* grad_loss, const float* stats,
                             void* grad, void* stream);

// Top-k KL (OSTQuant's KL-Top): the forward KL restricted to the teacher's k largest logits
// I of each row (ties broken towards the lower class index). With s = student / T, t = teacher / T:
//   renormalize = false: T^2 sum_{j in I} q_j (log q_j - log p_j), p = softmax(s), q = softmax(t)
//                        over all C classes (OSTQuant's released scripts);
//   renormalize = true:  T^2 KL(softmax(t_I) || softmax(s_I)), both renormalized over I.
struct TopkKlProblem {
  const void* student = nullptr;  // [N, C], classes contiguous, rows of stride s_stride
  const void* teacher = nullptr;  // [N, C], rows of stride t_stride (same dtype)
  ScalarType dtype = ScalarType::f32;
  int64_t N = 0, C = 0, s_stride = 0, t_stride = 0, k = 1;
  float temperature = 1.f;
  bool renormalize = false;
  float grad_scale = 1.f;  // the gradient written is grad_scale * d loss_r / d student (CPU)
};

// Plackett-Luce distillation (PLD): the ranking pi puts the target class first, then the other
// classes by descending teacher logit (ties towards the lower index); w = softmax(teacher / T),
//   loss = sum_k w_{pi_k} (logsumexp_{l >= k} student_{pi_l} - student_{pi_k}).
// Rows whose target is ignore_index have loss 0 and gradient 0.
struct PldProblem {
  const void* student = nullptr;  // [N, C], classes contiguous, rows of stride s_stride
  const void* teacher = nullptr;  // [N, C], rows of stride t_stride (same dtype)
  const int64_t* target = nullptr;  // [N], contiguous, in [0, C) or ignore_index
  ScalarType dtype = ScalarType::f32;
  int64_t N = 0, C = 0, s_stride = 0, t_stride = 0, ignore_index = -100;
  float temperature = 1.f;
  float grad_scale = 1.f;  // the gradient written is grad_scale * d loss_r / d student (CPU)
};

// Rows [r0, r1): loss[r] (float32) and, when grad is not null, grad[r * C + k] (the student's
// dtype, contiguous) = d loss_r / d student[r, k]. Both find each row's order (a selection or a
// sort) once, so the forward forms the gradient too instead of repeating it in a backward.
void topk_kl_cpu(const TopkKlProblem& q, float* loss, void* grad, int64_t r0, int64_t r1);
// CUDA (kd_cuda.cu): all rows on `stream`; nullptr or the CUDA error of the launch. PLD takes
// the teacher's class order by descending logit, ties towards the lower index (a stable sort:
// order [N, C] int64), the rows in that order (sorted_teacher: the sort's values; sorted_student:
// the student gathered by order; both [N, C] contiguous in q.dtype), and, with the gradient, a
// float32 scratch of pld_cuda_scratch(q) elements (null without it).
const char* topk_kl_cuda(const TopkKlProblem& q, float* loss, void* grad, void* stream);
int64_t pld_cuda_scratch(const PldProblem& q);
const char* pld_cuda(const PldProblem& q, const int64_t* order, const void* sorted_teacher,
                     const void* sorted_student, float* scratch, float* loss, void* grad, void* stream);
void pld_cpu(const PldProblem& q, float* loss, void* grad, int64_t r0, int64_t r1);

}  // namespace fastloss
