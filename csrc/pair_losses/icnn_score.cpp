// ICNN's score and its gradient with respect to the neighbours' distances (icnn_score.h).
#include "icnn_score.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace fastloss {

double icnn_score(const float* d, const bool* same, int64_t N, int64_t n, int64_t k, bool clipped,
                  float* grad_d) {
  constexpr double kEps = 1e-7, kInf = std::numeric_limits<double>::infinity();
  std::vector<double> delta(N), big(N);  // delta_i; max_j v_ij over the first k
  std::vector<int64_t> n_same(N), n_other(N);
  double sc_sum = 0, dc_max = 0;  // sum of sc_i; the max of dc (0 when every dc is 0)
  double dc_sum = 0;  // sum_i sum_j dc_ij / (n_other_i + eps), before the division by max dc + eps
  int64_t rows_sc = 0, rows_dc = 0, same_total = 0;
  for (int64_t i = 0; i < N; ++i) {
    const float* di = d + i * n;
    const bool* si = same + i * n;
    double dl = kInf;
    for (int64_t j = 0; j < n; ++j)
      if (!si[j]) dl = std::min(dl, double(di[j]));
    delta[i] = dl;
    double mx = -kInf, other_sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      mx = std::max(mx, double(di[j]) / (dl + kEps));
      (si[j] ? n_same[i] : n_other[i]) += 1;
      if (!si[j]) {
        dc_max = std::max(dc_max, double(di[j]));
        other_sum += double(di[j]);
      }
    }
    dc_sum += other_sum / (double(n_other[i]) + kEps);
    big[i] = mx;
    const double m = std::max(1.0, mx);
    double s = 0;
    for (int64_t j = 0; j < k; ++j)
      if (si[j]) s += double(di[j]) / (dl + kEps) / m;
    sc_sum += s / (double(n_same[i]) + kEps);
    rows_sc += n_same[i] > 0;
    rows_dc += n_other[i] > 0;
    same_total += n_same[i];
  }
  const double c_sc = double(rows_sc) + kEps, c_dc = double(rows_dc) + kEps, g_den = dc_max + kEps;
  const bool any_other = rows_dc > 0;
  const double lambda_sc = 1 - sc_sum / c_sc;
  double lambda_dc = dc_sum / g_den / c_dc;
  if (!any_other) lambda_dc = 1 - lambda_dc;
  const double gamma = clipped ? 1.0 : double(same_total) / double(k) / double(N);
  const double score = ((lambda_sc + lambda_dc) / 2 + gamma) / 2;

  // d loss / d lambda_sc and / d lambda_dc
  const double g_sc = -1 / score / 4, g_dc = (any_other ? 1 : -1) * (-1 / score / 4);
  // the global max of dc takes -g_dc dc_sum / g_den^2 / c_dc, shared by its ties
  int64_t dc_ties = 0;
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < k; ++j)
      dc_ties += (same[i * n + j] ? 0.0 : double(d[i * n + j])) == dc_max;
  const double g_max = -g_dc * dc_sum / (g_den * g_den) / c_dc / double(std::max<int64_t>(dc_ties, 1));
  std::vector<double> gv(k), g(n);  // one row's d loss / d v and d loss / d d
  for (int64_t i = 0; i < N; ++i) {
    const float* di = d + i * n;
    const bool* si = same + i * n;
    float* gi = grad_d + i * n;
    const double dl = delta[i], den = dl + kEps, m = std::max(1.0, big[i]);
    // u_ij = v_ij / m: d lambda_sc / d u_ij = -same_ij / (n_same_i + eps) / c_sc
    const double gu = g_sc * -1 / (double(n_same[i]) + kEps) / c_sc;
    std::fill(gv.begin(), gv.end(), 0.0);
    std::fill(g.begin(), g.end(), 0.0);
    double through_m = 0;  // sum_j (d loss / d u_ij) v_ij, for the max's share
    for (int64_t j = 0; j < k; ++j)
      if (si[j]) {
        gv[j] = gu / m;
        through_m += gu * (double(di[j]) / den);
      }
    if (big[i] >= 1) {  // m = max_j v_ij (clamp(min=1) passes a value at its bound)
      int64_t ties = 0;
      for (int64_t j = 0; j < k; ++j) ties += double(di[j]) / den == big[i];
      for (int64_t j = 0; j < k; ++j)
        if (double(di[j]) / den == big[i]) gv[j] -= through_m / (m * m) / double(ties);
    }
    double g_delta = 0;
    for (int64_t j = 0; j < k; ++j) {  // v_ij = d_ij / (delta_i + eps)
      g[j] += gv[j] / den;
      g_delta -= gv[j] * double(di[j]) / (den * den);
    }
    if (std::isfinite(dl)) {  // delta_i = min over the other-class neighbours, ties sharing
      int64_t ties = 0;
      for (int64_t j = 0; j < n; ++j) ties += !si[j] && double(di[j]) == dl;
      for (int64_t j = 0; j < n; ++j)
        if (!si[j] && double(di[j]) == dl) g[j] += g_delta / double(ties);
    }
    const double gdc = g_dc / g_den / (double(n_other[i]) + kEps) / c_dc;
    for (int64_t j = 0; j < k; ++j)
      if (!si[j]) g[j] += gdc + (double(di[j]) == dc_max ? g_max : 0.0);
    for (int64_t j = 0; j < n; ++j) gi[j] = float(g[j]);
  }
  return -std::log(score);
}

}  // namespace fastloss
