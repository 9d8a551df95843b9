// Entry points of the similarity-block kernels, callable without torch headers.
//
// The embedding losses of this family (Multi-Similarity, the TCM regularizer, the contrastive
// loss) go over blocks of anchor rows: the caller forms a block S[i, j] = <e_{row0+i}, e_j>
// (float32, [rows, n], rows contiguous) with a GEMM, and these kernels do everything else a
// block needs in one or two passes over each row while it is in cache: the masks and mining,
// the per-row statistics and, in place, the gradient d loss / d S of the block that the
// caller's next two GEMMs turn into embedding gradients. They replace the dozen block-sized
// temporaries the same math takes in torch operations.
//
// Labels arrive as float keys (label_keys in pair_losses_op.cpp: exact small integers), so the
// "same class" test is a vector compare. Column row0 + i of row i is the anchor itself, never
// a pair. Every function takes a row range [r0, r1) of the block, for the caller's threads.
#pragma once
#include <cstdint>

namespace fastloss {

struct SimBlock {
  float* s = nullptr;            // [rows, n], row i at s + i * n; rewritten by *_grad kernels
  int64_t rows = 0, n = 0;
  int64_t row0 = 0;              // global index of row 0 (its self pair is column row0)
  const float* keys = nullptr;   // [n] class keys of the columns (rows: keys[row0 + i])
};

// s [n, n] (row-major) := s + s^T in place, for tile rows [t0, t1) of 32 x 32 tiles (tile row
// I handles the tiles (I, J >= I)). torch's s.add(s.t()) walks the transposed operand a column
// at a time: 2.1 ms at n = 1024 on the 2-core CPU machine, more than the GEMM it saves.
constexpr int64_t kSymTile = 32;
void symmetrize_add(float* s, int64_t n, int64_t t0, int64_t t1);

// Rows [r0, r1) of x (float32, d contiguous values from x + i * ldx) scaled to unit length as
// F.normalize scales them, into e [*, d]: norms[i] = ||x_i||, e_i = x_i / max(||x_i||, kUnitEps). unit_rows_grad: the gradient for x of
// sum(g * e), (g_i - e_i <e_i, g_i>) / ||x_i|| where ||x_i|| > kUnitEps, else g_i / kUnitEps
// (F.normalize's backward). The embedding losses normalise with these on the CPU: the half
// dozen torch operations they replace cost ~80 us at B = 256, D = 128 on the 2-core machine.
constexpr float kUnitEps = 1e-12f;
void unit_rows(const float* x, int64_t ldx, int64_t d, float* e, float* norms, int64_t r0, int64_t r1);
void unit_rows_grad(const float* g, const float* e, const float* norms, int64_t d, float* out,
                    int64_t r0, int64_t r1);

// ---- Multi-Similarity with its miner ------------------------------------------------------
// Positives of anchor i: same key, not i; negatives: other keys. With `mine`, positives with
// S - epsilon < max(negatives) and negatives with S + epsilon > min(positives) are kept.
//   lse_pos[i] = log(1 + sum_kept_pos exp(alpha (base - S_ij)))
//   lse_neg[i] = log(1 + sum_kept_neg exp(beta (S_ij - base)))
// (loss_i = lse_pos / alpha + lse_neg / beta; NaN, and a NaN gradient row, when the row holds
// a NaN similarity). With write_grad, row i of S becomes
// d loss_i / d S_i. (= -exp(alpha (base - S) - lse_pos) on kept positives, +exp(beta (S - base)
// - lse_neg) on kept negatives, 0 elsewhere).
struct MsParams {
  float alpha = 2.f, beta = 50.f, base = 0.5f, epsilon = 0.1f;
  bool mine = true;
};
void ms_rows(const SimBlock& q, const MsParams& p, float* lse_pos, float* lse_neg,
             bool write_grad, int64_t r0, int64_t r1);

// ---- Threshold-Consistent Margin ----------------------------------------------------------
// Hard positives: same key, not the anchor, S <= m_pos; hard negatives: other key, S >= m_neg.
// tcm_rows: row_stats[4 i ..] = (sum of m_pos - S, count) over hard positives, then (sum of
// S - m_neg, count) over hard negatives. tcm_pairs: the columns of row i's hard pairs, in
// order, at cols + offsets[i]. tcm_rows_grad: row i becomes -d_pos on hard positives, +d_neg
// on hard negatives, 0 elsewhere.
struct TcmParams {
  float m_pos = 0.9f, m_neg = 0.5f;
};
void tcm_rows(const SimBlock& q, const TcmParams& p, double* row_stats, int64_t r0, int64_t r1);
void tcm_pairs(const SimBlock& q, const TcmParams& p, const int64_t* offsets, int32_t* cols,
               int64_t r0, int64_t r1);
void tcm_rows_grad(const SimBlock& q, const TcmParams& p, float d_pos, float d_neg, int64_t r0,
                   int64_t r1);

// grad[i] += sum_{k in [row_ptr[i], row_ptr[i + 1])} c_k e[cols[k]] for rows [r0, r1), with
// c_k = c_same when keys[i] == keys[cols[k]] else c_diff: the gradient of a sum over a sparse
// set of pairs (e, grad: [n, d] float32 rows).
void pair_rows_grad(const float* e, int64_t d, const float* keys, const int64_t* row_ptr,
                    const int32_t* cols, float c_same, float c_diff, float* grad, int64_t r0,
                    int64_t r1);

// ---- contrastive (InfoNCE / CLIP) ---------------------------------------------------------
// X = scale * S. clip_rows: lse_row[i] = logsumexp_j X_ij, diag[i] = X_{i, row0 + i}; with
// col_max / col_sum not null, the columns' running max and sum of exp(X - max) over rows
// [r0, r1) (overwritten; clip_merge_cols combines the parts of several row ranges into the
// block's column logsumexp).
void clip_rows(const SimBlock& q, float scale, float* lse_row, float* diag, float* col_max,
               float* col_sum, int64_t r0, int64_t r1);
void clip_merge_cols(const float* col_max, const float* col_sum, int64_t parts, int64_t n,
                     float* lse_col);
// Row i of S becomes scale * (g_i softmax_row(X)_ij - g_i [j == row0 + i]), plus, when lse_col
// is not null (the symmetric loss), scale * (g_j softmax_col(X)_ij - g_j [j == row0 + i]); g is
// [n], the upstream gradient of each row's term (row i's at g[row0 + i]).
void clip_rows_grad(const SimBlock& q, float scale, const float* lse_row, const float* lse_col,
                    const float* g, int64_t r0, int64_t r1);

// ---- CUDA (similarity_rows_cuda.cu) ---------------------------------------------------------
// The same ops on a device block (every pointer on the device), on `stream` (a cudaStream_t);
// each returns nullptr or the CUDA error. The anchor's own pair is skipped, not overwritten.
// tcm_rows_cuda writes row_stats [rows, 4] (no pair lists: the CUDA backward forms the blocks
// again); coef is a device float64 [2]. clip_rows_cuda: with lse_col not null, also the block's
// column log-sum-exps, using col_max / col_sum scratch of clip_cuda_parts(q) x n floats each.
const char* ms_rows_cuda(const SimBlock& q, const MsParams& p, float* lse_pos, float* lse_neg,
                         bool write_grad, void* stream);
const char* tcm_rows_cuda(const SimBlock& q, const TcmParams& p, double* row_stats, void* stream);
const char* tcm_rows_grad_cuda(const SimBlock& q, const TcmParams& p, const double* coef,
                               void* stream);
int64_t clip_cuda_parts(const SimBlock& q);
const char* clip_rows_cuda(const SimBlock& q, float scale, float* lse_row, float* diag,
                           float* col_max, float* col_sum, float* lse_col, void* stream);
const char* clip_rows_grad_cuda(const SimBlock& q, float scale, const float* lse_row,
                                const float* lse_col, const float* g, void* stream);

// ---- k nearest neighbours (ICNN) ---------------------------------------------------------
// Row i of S holds <x_{row0+i}, t_j>; d2_ij = max(0, row_sq[i] + col_sq[j] - 2 S_ij) (as
// torch.cdist's matrix-product form). idx[i k .. i k + k) = the columns of the k smallest d2 of
// row i, ascending, ties to the lower column, column row0 + i skipped when exclude_self; NaN
// distances come last (the lowest such columns, only when fewer than k are numbers).
// 1 <= k <= kKnnMax and k <= the columns available (the caller checks).
constexpr int64_t kKnnMax = 64;
void knn_rows(const SimBlock& q, const float* row_sq, const float* col_sq, bool exclude_self,
              int64_t k, int64_t* idx, int64_t r0, int64_t r1);
// The same on the device for every row of the block (neighbours_cuda.cu; a radix selection per
// row), on `stream`; the columns of each row's k nearest, ascending, ties to the lower column.
const char* knn_rows_cuda(const SimBlock& q, const float* row_sq, const float* col_sq,
                          bool exclude_self, int64_t k, int64_t* idx, void* stream);

// ---- distances of chosen pairs (ICNN's neighbours, Proto-Triplet's prototypes) -----------
// x [N, d], t [M, d] float32 rows; idx [N, n_nb] (columns of t, in [0, M)).
// neighbour_dist: dist[i, c] = sqrt(||x_i - t_idx[i,c]||^2 + eps), rows [r0, r1) of x.
// neighbour_dist_grad_x: grad_x[i] = sum_c w[i, c] (x_i - t_idx[i,c]), rows [r0, r1) of x.
// neighbour_dist_grad_t: grad_t[j] = -sum over pairs p = (i, c) with idx[i, c] = j of
// w[p] (x_i - t_j), rows [r0, r1) of t, the pairs of row j listed (as p = i n_nb + c) at
// pairs[t_ptr[j] : t_ptr[j + 1]] (the transposed list). w = d loss / d dist / dist.
void neighbour_dist(const float* x, const float* t, int64_t d, const int64_t* idx, int64_t n_nb,
                    float eps, float* dist, int64_t r0, int64_t r1);
void neighbour_dist_grad_x(const float* x, const float* t, int64_t d, const int64_t* idx,
                           int64_t n_nb, const float* w, float* grad_x, int64_t r0, int64_t r1);
void neighbour_dist_grad_t(const float* x, const float* t, int64_t d, const int64_t* t_ptr,
                           const int64_t* pairs, int64_t n_nb, const float* w, float* grad_t,
                           int64_t r0, int64_t r1);
// The same on the device (neighbours_cuda.cu), every row at once (x has n rows, t m), on
// `stream`; an idx outside [0, m) gives NaN. The caller lists the pairs by target (t_ptr [m + 1],
// pairs [n n_nb]) for the targets' gradient. Return nullptr or the launch error.
const char* neighbour_dist_cuda(const float* x, const float* t, int64_t d, const int64_t* idx,
                                int64_t n, int64_t n_nb, int64_t m, float eps, float* dist,
                                void* stream);
const char* neighbour_dist_grad_x_cuda(const float* x, const float* t, int64_t d, const int64_t* idx,
                                       int64_t n, int64_t n_nb, int64_t m, const float* w,
                                       float* grad_x, void* stream);
const char* neighbour_dist_grad_t_cuda(const float* x, const float* t, int64_t d, const int64_t* t_ptr,
                                       const int64_t* pairs, int64_t m, int64_t n_nb, const float* w,
                                       float* grad_t, void* stream);

}  // namespace fastloss
