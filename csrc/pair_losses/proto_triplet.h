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

// protos [K, D] = the mean of the support rows of each class (float32 sums, in row order).
void proto_means(const float* support, const int64_t* inverse, const float* counts, int64_t S,
                 int64_t K, int64_t D, float* protos);

// idx [Q, 2] = (pos[i], the class k != pos[i] of the least score[i, k]; ties to the lower k).
void proto_negatives(const float* score, const int64_t* pos, int64_t Q, int64_t K, int64_t* idx);

// mean over the Q queries of max(0, dist[i, 0] - dist[i, 1] + margin) (float64 sum)
double proto_hinge_mean(const float* dist, int64_t Q, double margin);

// d (g * mean hinge) / d query [Q, D] and / d support [S, D]: an active query i (hinge > 0)
// gets w (q_i - c_pos) / d_pos - w (q_i - c_neg) / d_neg with w = g / Q, and the prototypes
// the opposite, each divided by its class's count and handed to its support rows.
void proto_triplet_grads(const float* query, const float* protos, const int64_t* idx,
                         const float* dist, const int64_t* inverse, const float* counts,
                         int64_t Q, int64_t S, int64_t K, int64_t D, double margin, float g,
                         float* grad_query, float* grad_support);

}  // namespace fastloss
