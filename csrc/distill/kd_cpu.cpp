// Generic CPU distillation kernels (any CPU), and the run-time choice between them and the
// AVX2 / AVX-512 instantiations.
#include "../common/cpu_features.h"
#define FL_ISA_VEC float
#include "kd_cpu_impl.h"
#include "kd_rank_impl.h"

namespace fastloss {

// the AVX2 / AVX-512 instantiations, compiled in their own files with those flags
FASTLOSS_DECLARE_ISAS(
    void kd_forward(const KdProblem&, float*, float*, int64_t, int64_t);
    void kd_backward(const KdProblem&, const float*, const float*, void*, int64_t, int64_t);
    void kd_forward_grad(const KdProblem&, float, float*, void*, int64_t, int64_t);
    void topk_kl(const TopkKlProblem&, float*, void*, int64_t, int64_t);
    void pld(const PldProblem&, float*, void*, int64_t, int64_t);)

void kd_forward_cpu(const KdProblem& q, float* loss, float* stats, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(kd_forward(q, loss, stats, r0, r1));
}

void kd_backward_cpu(const KdProblem& q, const float* grad_loss, const float* stats, void* grad,
                     int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(kd_backward(q, grad_loss, stats, grad, r0, r1));
}

void kd_forward_grad_cpu(const KdProblem& q, float grad_scale, float* loss, void* grad, int64_t r0,
                         int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(kd_forward_grad(q, grad_scale, loss, grad, r0, r1));
}

void topk_kl_cpu(const TopkKlProblem& q, float* loss, void* grad, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(topk_kl(q, loss, grad, r0, r1));
}

void pld_cpu(const PldProblem& q, float* loss, void* grad, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(pld(q, loss, grad, r0, r1));
}

}  // namespace fastloss
