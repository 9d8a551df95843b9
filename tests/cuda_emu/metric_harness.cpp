// The CUDA kernels of csrc/metric_losses/metric_losses_cuda.cu under the emulator (emu.h),
// behind a C interface for ctypes (tests/test_cuda_emulation.py). Each returns null or the error.
#include "kernels.inc"

namespace {

// params: alpha, gamma, smooth
fastloss::DiceParams dice(const float* params) { return {params[0], params[1], params[2]}; }

fastloss::SigmoidDiceProblem sigmoid(const void* x, int dtype, const float* y, int64_t N, int64_t K,
                                     const float* params) {
  fastloss::SigmoidDiceProblem q;
  q.logits = x;
  q.dtype = fastloss::ScalarType(dtype);
  q.target = y;
  q.N = N;
  q.K = K;
  q.p = dice(params);
  return q;
}

// shape: N, C, row stride, ignore_index
fastloss::SoftmaxDiceProblem softmax(const void* x, int dtype, const int64_t* y, const int64_t* shape,
                                     const float* params) {
  fastloss::SoftmaxDiceProblem q;
  q.logits = x;
  q.dtype = fastloss::ScalarType(dtype);
  q.target = y;
  q.N = shape[0];
  q.C = shape[1];
  q.stride = shape[2];
  q.ignore_index = shape[3];
  q.p = dice(params);
  return q;
}

fastloss::ConfusionProblem confusion(const void* x, int dtype, const float* y, int64_t N, int64_t K,
                                     float L, int from_logits) {
  fastloss::ConfusionProblem q;
  q.scores = x;
  q.dtype = fastloss::ScalarType(dtype);
  q.target = y;
  q.N = N;
  q.K = K;
  q.L = L;
  q.from_logits = from_logits != 0;
  return q;
}

}  // namespace

extern "C" {

const char* emu_dice_sigmoid(const void* x, int dtype, const float* y, int64_t N, int64_t K,
                             const float* params, float* rows, const float* grad_rows, void* grad) {
  const auto q = sigmoid(x, dtype, y, N, K, params);
  if (const char* e = fastloss::dice_sigmoid_forward_cuda(q, rows, nullptr)) return e;
  return fastloss::dice_sigmoid_backward_cuda(q, grad_rows, grad, nullptr);
}

const char* emu_dice_softmax(const void* x, int dtype, const int64_t* y, const int64_t* shape,
                             const float* params, float* rows, const float* grad_rows, void* grad) {
  const auto q = softmax(x, dtype, y, shape, params);
  if (const char* e = fastloss::dice_softmax_forward_cuda(q, rows, nullptr)) return e;
  return fastloss::dice_softmax_backward_cuda(q, grad_rows, grad, nullptr);
}

int64_t emu_confusion_scratch(int64_t N, int64_t K) {
  return fastloss::confusion_sums_cuda_scratch(confusion(nullptr, 0, nullptr, N, K, 1.f, 1));
}

const char* emu_confusion(const void* x, int dtype, const float* y, int64_t N, int64_t K, float L,
                          int from_logits, float* sums, float* scratch, const float* grad_sums,
                          void* grad) {
  const auto q = confusion(x, dtype, y, N, K, L, from_logits);
  if (const char* e = fastloss::confusion_sums_cuda(q, sums, scratch, nullptr)) return e;
  return fastloss::confusion_backward_cuda(q, grad_sums, grad, nullptr);
}

}  // extern "C"
