// Generic CPU similarity-block kernels (any CPU), and the run-time choice between them and the
// AVX2 / AVX-512 instantiations.
#include <algorithm>
#include <cmath>
#include <limits>

#include "../common/cpu_features.h"
#define FL_ISA_VEC float
#include "similarity_rows_cpu_impl.h"

namespace fastloss {

// the AVX2 / AVX-512 instantiations, compiled in their own files with those flags
FASTLOSS_DECLARE_ISAS(
    void ms_rows(const SimBlock&, const MsParams&, float*, float*, bool, int64_t, int64_t);
    void tcm_rows(const SimBlock&, const TcmParams&, double*, int64_t, int64_t);
    void tcm_pairs(const SimBlock&, const TcmParams&, const int64_t*, int32_t*, int64_t, int64_t);
    void tcm_rows_grad(const SimBlock&, const TcmParams&, float, float, int64_t, int64_t);
    void pair_rows_grad(const float*, int64_t, const float*, const int64_t*, const int32_t*, float,
                        float, float*, int64_t, int64_t);
    void clip_rows(const SimBlock&, float, float*, float*, float*, float*, int64_t, int64_t);
    void clip_rows_grad(const SimBlock&, float, const float*, const float*, const float*, int64_t,
                        int64_t);
    void knn_rows(const SimBlock&, const float*, const float*, bool, int64_t, int64_t*, int64_t,
                  int64_t);
    void neighbour_dist(const float*, const float*, int64_t, const int64_t*, int64_t, float,
                        float*, int64_t, int64_t);
    void neighbour_dist_grad_x(const float*, const float*, int64_t, const int64_t*, int64_t,
                               const float*, float*, int64_t, int64_t);
    void neighbour_dist_grad_t(const float*, const float*, int64_t, const int64_t*,
                               const int64_t*, int64_t, const float*, float*, int64_t, int64_t);)

void ms_rows(const SimBlock& q, const MsParams& p, float* lse_pos, float* lse_neg,
             bool write_grad, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(ms_rows(q, p, lse_pos, lse_neg, write_grad, r0, r1));
}
void tcm_rows(const SimBlock& q, const TcmParams& p, double* row_stats, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(tcm_rows(q, p, row_stats, r0, r1));
}
void tcm_pairs(const SimBlock& q, const TcmParams& p, const int64_t* offsets, int32_t* cols,
               int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(tcm_pairs(q, p, offsets, cols, r0, r1));
}
void tcm_rows_grad(const SimBlock& q, const TcmParams& p, float d_pos, float d_neg, int64_t r0,
                   int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(tcm_rows_grad(q, p, d_pos, d_neg, r0, r1));
}
void pair_rows_grad(const float* e, int64_t d, const float* keys, const int64_t* row_ptr,
                    const int32_t* cols, float c_same, float c_diff, float* grad, int64_t r0,
                    int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(pair_rows_grad(e, d, keys, row_ptr, cols, c_same, c_diff, grad, r0, r1));
}
void clip_rows(const SimBlock& q, float scale, float* lse_row, float* diag, float* col_max,
               float* col_sum, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(clip_rows(q, scale, lse_row, diag, col_max, col_sum, r0, r1));
}
void clip_rows_grad(const SimBlock& q, float scale, const float* lse_row, const float* lse_col,
                    const float* g, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(clip_rows_grad(q, scale, lse_row, lse_col, g, r0, r1));
}

void knn_rows(const SimBlock& q, const float* row_sq, const float* col_sq, bool exclude_self,
              int64_t k, int64_t* idx, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(knn_rows(q, row_sq, col_sq, exclude_self, k, idx, r0, r1));
}

void neighbour_dist(const float* x, const float* t, int64_t d, const int64_t* idx, int64_t n_nb,
                    float eps, float* dist, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(neighbour_dist(x, t, d, idx, n_nb, eps, dist, r0, r1));
}
void neighbour_dist_grad_x(const float* x, const float* t, int64_t d, const int64_t* idx,
                           int64_t n_nb, const float* w, float* grad_x, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(neighbour_dist_grad_x(x, t, d, idx, n_nb, w, grad_x, r0, r1));
}
void neighbour_dist_grad_t(const float* x, const float* t, int64_t d, const int64_t* t_ptr,
                           const int64_t* pairs, int64_t n_nb, const float* w, float* grad_t,
                           int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH_FLUSHED(neighbour_dist_grad_t(x, t, d, t_ptr, pairs, n_nb, w, grad_t, r0, r1));
}

void symmetrize_add(float* s, int64_t n, int64_t t0, int64_t t1) {
  // Each tile pair (I, J >= I) goes through two local tiles: rows of s are read and written
  // whole, the transposition happens in L1 (walking s a column at a time costs a cache line
  // per element: 3 ms at n = 1024 on one core, against 0.9-1.5 ms this way).
  alignas(64) float a[kSymTile][kSymTile], b[kSymTile][kSymTile];
  for (int64_t ti = t0; ti < t1; ++ti) {
    const int64_t i0 = ti * kSymTile, ri = std::min(n - i0, kSymTile);
    for (int64_t j0 = i0; j0 < n; j0 += kSymTile) {
      const int64_t rj = std::min(n - j0, kSymTile);
      for (int64_t i = 0; i < ri; ++i)
        for (int64_t j = 0; j < rj; ++j) a[i][j] = s[(i0 + i) * n + j0 + j];
      for (int64_t j = 0; j < rj; ++j)
        for (int64_t i = 0; i < ri; ++i) b[j][i] = s[(j0 + j) * n + i0 + i];
      for (int64_t i = 0; i < ri; ++i)
        for (int64_t j = 0; j < rj; ++j) a[i][j] += b[j][i];
      for (int64_t i = 0; i < ri; ++i)
        for (int64_t j = 0; j < rj; ++j) s[(i0 + i) * n + j0 + j] = a[i][j];
      for (int64_t j = 0; j < rj; ++j)
        for (int64_t i = 0; i < ri; ++i) s[(j0 + j) * n + i0 + i] = a[i][j];
    }
  }
}

namespace {
// sum_j a_j b_j over one row, in kLanes partial sums (vectorised without reassociating the
// compiler's own way; the partials are added in double)
constexpr int kLanes = 8;
float row_dot(const float* a, const float* b, int64_t d) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  double total = 0.0;
  for (; j < d; ++j) total += double(a[j]) * b[j];
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return float(total);
}
}  // namespace

void unit_rows(const float* x, int64_t ldx, int64_t d, float* e, float* norms, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    const float* xi = x + i * ldx;
    const float norm = std::sqrt(row_dot(xi, xi, d));
    norms[i] = norm;
    const float denom = std::max(norm, kUnitEps);  // (a NaN norm stays NaN, as clamp_min keeps it)
    float* ei = e + i * d;
    for (int64_t j = 0; j < d; ++j) ei[j] = xi[j] / denom;
  }
}

void unit_rows_grad(const float* g, const float* e, const float* norms, int64_t d, float* out,
                    int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    const float* gi = g + i * d;
    const float* ei = e + i * d;
    float* oi = out + i * d;
    if (norms[i] > kUnitEps) {
      const float dot = row_dot(ei, gi, d), norm = norms[i];
      for (int64_t j = 0; j < d; ++j) oi[j] = (gi[j] - ei[j] * dot) / norm;
    } else {
      for (int64_t j = 0; j < d; ++j) oi[j] = gi[j] / kUnitEps;
    }
  }
}

// log-sum-exp of column j over the parts: max of the parts' maxima, their sums rescaled to it
void clip_merge_cols(const float* col_max, const float* col_sum, int64_t parts, int64_t n,
                     float* lse_col) {
  for (int64_t j = 0; j < n; ++j) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t k = 0; k < parts; ++k) m = std::max(m, col_max[k * n + j]);
    if (m == -std::numeric_limits<float>::infinity()) {  // no rows, or all -inf: an empty sum
      lse_col[j] = m;
      continue;
    }
    double sum = 0.0;
    for (int64_t k = 0; k < parts; ++k) sum += col_sum[k * n + j] * std::exp(double(col_max[k * n + j]) - m);
    lse_col[j] = float(m + std::log(sum));
  }
}

}  // namespace fastloss
