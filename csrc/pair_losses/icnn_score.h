// ICNN's score from each embedding's chosen neighbours (torch-free; icnn_score.cpp). The
// formula is icnn_loss's (python/fastloss/ops/few_shot.py), with eps = 1e-7:
//   delta_i = min over the n neighbours of the other-class distances (infinite if none),
//   v_ij = d_ij / (delta_i + eps) and u_ij = v_ij / max(1, max_j v_ij) over the first k,
//   lambda_sc = 1 - mean over rows with a same-class neighbour of (sum_same u / n_same),
//   dc_ij = d_ij on other-class neighbours (else 0) over the first k, divided by (max dc + eps),
//   lambda_dc = mean over rows with an other-class neighbour of (sum dc / n_other), or
//   1 - that when no row has one, gamma = mean n_same / k (1 when k was clipped),
//   score = ((lambda_sc + lambda_dc) / 2 + gamma) / 2, loss = -log(score).
// The ~40 small tensor operations of that formula (and their autograd graph) cost more than
// the neighbour search itself at B = 256 on the CPU, hence one pass here, in float64.
#pragma once
#include <cstdint>

namespace fastloss {

// d [N, n] float32 (row-major), same [N, n] (1: same class), k <= n. Returns the loss and
// writes grad_d [N, n] = d loss / d d (ties of a max or min share its gradient equally, as
// torch's amax / amin).
double icnn_score(const float* d, const bool* same, int64_t N, int64_t n, int64_t k, bool clipped,
                  float* grad_d);

// The same on the device (neighbours_cuda.cu), on `stream`: loss [] float32 stays on the
// device; scratch holds icnn_score_cuda_scratch(N) float64. Returns nullptr or the launch error.
int64_t icnn_score_cuda_scratch(int64_t N);
const char* icnn_score_cuda(const float* d, const bool* same, int64_t N, int64_t n, int64_t k,
                            bool clipped, float* grad_d, float* loss, double* scratch, void* stream);

}  // namespace fastloss
