// Generic CPU kernels of the metric-driven losses (any CPU), and the run-time choice between
// them and the AVX2 / AVX-512 instantiations.
#include "../common/cpu_features.h"
#define FL_ISA_VEC float
#include "metric_losses_cpu_impl.h"

namespace fastloss {

// the AVX2 / AVX-512 instantiations, compiled in their own files with those flags
FASTLOSS_DECLARE_ISAS(
    void dice_sigmoid_forward(const SigmoidDiceProblem&, float*, int64_t, int64_t);
    void dice_sigmoid_backward(const SigmoidDiceProblem&, const float*, void*, int64_t, int64_t);
    void dice_softmax_forward(const SoftmaxDiceProblem&, float*, int64_t, int64_t);
    void dice_softmax_backward(const SoftmaxDiceProblem&, const float*, void*, int64_t, int64_t);
    void confusion_sums(const ConfusionProblem&, double*, int64_t, int64_t);
    void confusion_backward(const ConfusionProblem&, const float*, void*, int64_t, int64_t);)

void dice_sigmoid_forward_cpu(const SigmoidDiceProblem& q, float* rows, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(dice_sigmoid_forward(q, rows, r0, r1));
}

void dice_sigmoid_backward_cpu(const SigmoidDiceProblem& q, const float* grad_rows, void* grad,
                               int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(dice_sigmoid_backward(q, grad_rows, grad, r0, r1));
}

void dice_softmax_forward_cpu(const SoftmaxDiceProblem& q, float* rows, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(dice_softmax_forward(q, rows, r0, r1));
}

void dice_softmax_backward_cpu(const SoftmaxDiceProblem& q, const float* grad_rows, void* grad,
                               int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(dice_softmax_backward(q, grad_rows, grad, r0, r1));
}

void confusion_sums_cpu(const ConfusionProblem& q, double* sums, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(confusion_sums(q, sums, r0, r1));
}

void confusion_backward_cpu(const ConfusionProblem& q, const float* grad_sums, void* grad,
                            int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(confusion_backward(q, grad_sums, grad, r0, r1));
}

}  // namespace fastloss
