// Entry points of the Mann-Whitney (AUC) loss kernels, callable without torch headers.
//
// Per query b, with positive scores p[b, :P] and negative scores n[b, :N]:
//   loss_b = (1 / (P N)) sum_{i, j} softplus(n_j - p_i)        (BCE of sigmoid(p_i - n_j) vs 1)
//   d loss_b / d p_i = -(1 / (P N)) sum_j sigmoid(n_j - p_i),  d loss_b / d n_j = +(...) sum_i
// computed in one pass over the P x N pairs, which are never stored.
#pragma once
#include <cstdint>

#include "../losses/loss_params.h"  // ScalarType

namespace fastloss {

struct AucProblem {
  const void* pos = nullptr;  // [B, P], rows of stride pos_stride, columns contiguous
  const void* neg = nullptr;  // [B, N]
  ScalarType dtype = ScalarType::f32;
  int64_t B = 0, P = 0, N = 0, pos_stride = 0, neg_stride = 0;
};

// Positives per work item: item (b, k) takes p[b, k * kAucBlock : (k + 1) * kAucBlock].
constexpr int64_t kAucBlock = 256;
inline int64_t auc_items(const AucProblem& q) { return q.B * ((q.P + kAucBlock - 1) / kAucBlock); }

// Items [r0, r1): loss_part[item] = the item's sum of softplus (not yet divided by P N);
// grad_pos (float32 [B, P], contiguous, or null) gets -sum_j sigmoid / (P N) for the item's
// positives; neg_part (float32, or null) gets the item's sum_i sigmoid / (P N) in its row
// item - part0 (rows of N: the caller's scratch holds the rows of a chunk of items).
void auc_cpu(const AucProblem& q, double* loss_part, float* grad_pos, float* neg_part,
             int64_t part0, int64_t r0, int64_t r1);

// CUDA (auc_cuda.cu): all queries on `stream` (a cudaStream_t): loss [B] (already divided by
// P N), and when not null grad_pos [B, P] and grad_neg [B, N] (float32, contiguous; both or
// neither), using scratch of auc_cuda_scratch(q) float64 and float32 elements for the partial
// sums. Returns nullptr or the CUDA error.
struct AucCudaScratch {
  int64_t doubles = 0, floats = 0;
};
AucCudaScratch auc_cuda_scratch(const AucProblem& q);
const char* auc_cuda(const AucProblem& q, float* loss, float* grad_pos, float* grad_neg,
                     double* loss_scratch, float* grad_scratch, void* stream);

}  // namespace fastloss
