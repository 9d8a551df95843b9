// Proto-Triplet's per-call bookkeeping on the CPU in plain loops (torch-free; proto_triplet.cpp):
// the classes of the support, the prototypes, each query's nearest other prototype, the mean
// hinge and its gradients. pair_losses_op.cpp's proto_triplet_forward / _backward call these
// on the CPU instead of ~20 small tensor operations (at B = 256 those cost more than the
// work); the prototypes' scores stay one GEMM there. CUDA tensors keep the tensor operations.
#pragma once
#include <cstdint>
#include <vector>

namespace fastloss {

// The distinct labels of the support, ascending, when they span fewer than 4 S + 64 values
// (else false: the caller takes torch.unique); inverse[j] = the class of support row j,
// counts[k] = rows of class k.
bool proto_classes(const int64_t* labels, int64_t S, std::vector<int64_t>& classes,
                   int64_t* inverse, std::vector<float>& counts);

// Features [f0, f1) of protos [K, D] = the mean of the support rows of each class (float32
// sums in row order: the same bits however the features are split among threads).
void proto_means(const float* support, const int64_t* inverse, const float* counts, int64_t S,
                 int64_t K, int64_t D, int64_t f0, int64_t f1, float* protos);

// idx [Q, 2] = (pos[i], the class k != pos[i] of the least score[i, k]; ties to the lower k).
void proto_negatives(const float* score, const int64_t* pos, int64_t Q, int64_t K, int64_t* idx);

// mean over the Q queries of max(0, dist[i, 0] - dist[i, 1] + margin) (float64 sum)
double proto_hinge_mean(const float* dist, int64_t Q, double margin);

// d (g * mean hinge) / d query for the queries [i0, i1): an active query i (hinge > 0) gets
// w (q_i - c_pos) / d_pos - w (q_i - c_neg) / d_neg with w = g / Q, written to its row of
// grad_query [Q, D]; the prototypes' opposite terms are added to grad_protos [K, D] (the
// caller's, zeroed; one per thread, summed afterwards).
void proto_query_grads(const float* query, const float* protos, const int64_t* idx,
                       const float* dist, int64_t Q, int64_t D, double margin, float g, int64_t i0,
                       int64_t i1, float* grad_query, float* grad_protos);

// Support rows [j0, j1) of the gradient: each row's prototype gradient divided by its class's
// count, written to grad_support [S, D], or added to it (`add`: the query set is its own
// support and grad_support holds its query gradient already).
void proto_support_grads(const float* grad_protos, const int64_t* inverse, const float* counts,
                         int64_t D, int64_t j0, int64_t j1, bool add, float* grad_support);

}  // namespace fastloss
