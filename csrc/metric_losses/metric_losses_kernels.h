// Entry points of the metric-driven loss kernels (torch-free): the self-adjusting Dice loss
// (Li et al., ACL 2020) and AnyLoss's confusion matrix (Han, Moniz and Chawla, 2024).
//
// Dice, per prediction p of a class with target y in [0, 1]:
//   pt = (1 - p)^alpha p,  term = 1 - (2 pt y + gamma) / (pt + y + gamma + smooth)
// and a row's loss is the sum of its terms. Sigmoid form: p = sigmoid(x) for every element
// of logits [N, K]. Softmax form: p = softmax(x) over a row of logits [N, C], y one-hot of an
// integer target. Forward and backward are separate calls that read the logits once each (the
// backward recomputes the row's statistics), so nothing of size N x C is kept in between.
#pragma once
#include <cstdint>

#include "../losses/loss_params.h"  // ScalarType

namespace fastloss {

struct DiceParams {
  float alpha = 1.f, gamma = 1.f, smooth = 0.f;
};

// logits and target [N, K], both contiguous; target float32 in [0, 1].
struct SigmoidDiceProblem {
  const void* logits = nullptr;
  ScalarType dtype = ScalarType::f32;
  const float* target = nullptr;
  int64_t N = 0, K = 0;
  DiceParams p;
};

// logits [N, C], classes contiguous, rows of stride `stride`; target [N] in [0, C) or
// ignore_index (loss 0, gradient 0).
struct SoftmaxDiceProblem {
  const void* logits = nullptr;
  ScalarType dtype = ScalarType::f32;
  const int64_t* target = nullptr;
  int64_t N = 0, C = 0, stride = 0, ignore_index = -100;
  DiceParams p;
};

// Rows [r0, r1): rows[r] = the row's loss (float32). The backward writes
// grad[r * width + k] (the logits' dtype, contiguous) = grad_rows[r] * d rows[r] / d x[r, k].
void dice_sigmoid_forward_cpu(const SigmoidDiceProblem& q, float* rows, int64_t r0, int64_t r1);
void dice_sigmoid_backward_cpu(const SigmoidDiceProblem& q, const float* grad_rows, void* grad,
                               int64_t r0, int64_t r1);
void dice_softmax_forward_cpu(const SoftmaxDiceProblem& q, float* rows, int64_t r0, int64_t r1);
void dice_softmax_backward_cpu(const SoftmaxDiceProblem& q, const float* grad_rows, void* grad,
                               int64_t r0, int64_t r1);

// AnyLoss: scores [N, K] and float32 targets y [N, K] in [0, 1], both contiguous; with
// p = sigmoid(score) (from_logits) or the score itself, the amplified a = sigmoid(L (p - 1/2)),
// the four cells of each column k are
//   TP = sum y a,  FN = sum y (1 - a),  FP = sum (1 - y) a,  TN = sum (1 - y)(1 - a).
struct ConfusionProblem {
  const void* scores = nullptr;
  ScalarType dtype = ScalarType::f32;
  const float* target = nullptr;
  int64_t N = 0, K = 0;
  float L = 73.f;
  bool from_logits = true;
};

// Adds rows [r0, r1)'s share of the cells to sums[cell * K + k] (cell 0..3 = TP, FN, FP, TN).
void confusion_sums_cpu(const ConfusionProblem& q, double* sums, int64_t r0, int64_t r1);
// grad[r * K + k] (the scores' dtype) = sum over cells of grad_sums[cell * K + k] *
// d cell_k / d scores[r, k], rows [r0, r1).
void confusion_backward_cpu(const ConfusionProblem& q, const float* grad_sums, void* grad,
                            int64_t r0, int64_t r1);

// CUDA (metric_losses_cuda.cu): all rows at once on `stream` (a cudaStream_t), the same outputs
// as the CPU calls above (the confusion sums as float32 [4, K], from float64 totals, using a
// float32 scratch of confusion_sums_cuda_scratch(q) elements). A softmax-form target outside
// [0, C) that is not ignore_index gives that row a NaN loss and gradient (the op checks the
// classes before). Each returns nullptr or the CUDA error of the launch.
const char* dice_sigmoid_forward_cuda(const SigmoidDiceProblem& q, float* rows, void* stream);
const char* dice_sigmoid_backward_cuda(const SigmoidDiceProblem& q, const float* grad_rows, void* grad,
                                       void* stream);
const char* dice_softmax_forward_cuda(const SoftmaxDiceProblem& q, float* rows, void* stream);
const char* dice_softmax_backward_cuda(const SoftmaxDiceProblem& q, const float* grad_rows, void* grad,
                                       void* stream);
int64_t confusion_sums_cuda_scratch(const ConfusionProblem& q);
const char* confusion_sums_cuda(const ConfusionProblem& q, float* sums, float* scratch, void* stream);
const char* confusion_backward_cuda(const ConfusionProblem& q, const float* grad_sums, void* grad,
                                    void* stream);

}  // namespace fastloss
