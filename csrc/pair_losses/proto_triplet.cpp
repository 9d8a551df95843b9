// Proto-Triplet's CPU loops (proto_triplet.h).
#include "proto_triplet.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace fastloss {

bool proto_classes(const int64_t* labels, int64_t S, std::vector<int64_t>& classes,
                   int64_t* inverse, std::vector<float>& counts) {
  if (S == 0) return false;
  const auto [lo, hi] = std::minmax_element(labels, labels + S);
  const uint64_t span = uint64_t(*hi) - uint64_t(*lo);  // (wraps only past int64: refused)
  if (*hi < *lo || span >= uint64_t(4 * S + 64)) return false;
  std::vector<int64_t> class_of(span + 1, -1);
  for (int64_t j = 0; j < S; ++j) class_of[uint64_t(labels[j] - *lo)] = 0;
  classes.clear();
  for (uint64_t v = 0; v <= span; ++v)
    if (class_of[v] == 0) {
      class_of[v] = int64_t(classes.size());
      classes.push_back(*lo + int64_t(v));
    }
  counts.assign(classes.size(), 0.f);
  for (int64_t j = 0; j < S; ++j) {
    inverse[j] = class_of[uint64_t(labels[j] - *lo)];
    counts[size_t(inverse[j])] += 1.f;
  }
  return true;
}

void proto_means(const float* support, const int64_t* inverse, const float* counts, int64_t S,
                 int64_t K, int64_t D, int64_t f0, int64_t f1, float* protos) {
  for (int64_t k = 0; k < K; ++k) std::fill(protos + k * D + f0, protos + k * D + f1, 0.f);
  for (int64_t j = 0; j < S; ++j) {
    float* c = protos + inverse[j] * D;
    const float* s = support + j * D;
    for (int64_t f = f0; f < f1; ++f) c[f] += s[f];
  }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t f = f0; f < f1; ++f) protos[k * D + f] /= counts[k];
}

void proto_negatives(const float* score, const int64_t* pos, int64_t Q, int64_t K, int64_t* idx) {
  for (int64_t i = 0; i < Q; ++i) {
    const float* r = score + i * K;
    int64_t best = -1;
    float v = std::numeric_limits<float>::infinity();
    for (int64_t k = 0; k < K; ++k) {  // strict <: ties to the lower class; the first NaN wins, as argmin
      if (k == pos[i]) continue;
      if (r[k] != r[k]) {
        best = k;
        break;
      }
      if (best < 0 || r[k] < v) best = k, v = r[k];
    }
    idx[2 * i] = pos[i];
    idx[2 * i + 1] = best;
  }
}

double proto_hinge_mean(const float* dist, int64_t Q, double margin) {
  double sum = 0;
  for (int64_t i = 0; i < Q; ++i) {  // a NaN distance gives a NaN loss, as torch's relu
    const double h = double(dist[2 * i]) - dist[2 * i + 1] + margin;
    sum += std::isnan(h) ? h : std::max(0.0, h);
  }
  return Q > 0 ? sum / double(Q) : std::numeric_limits<double>::quiet_NaN();
}

void proto_query_grads(const float* query, const float* protos, const int64_t* idx,
                       const float* dist, int64_t Q, int64_t D, double margin, float g, int64_t i0,
                       int64_t i1, float* grad_query, float* grad_protos) {
  const float w = g / float(std::max<int64_t>(Q, 1));
  for (int64_t i = i0; i < i1; ++i) {
    float* gq = grad_query + i * D;
    const float* q = query + i * D;
    const double hinge = double(dist[2 * i]) - dist[2 * i + 1] + margin;
    if (!(hinge > 0) && hinge == hinge) {  // inactive; a NaN hinge goes on, as 0 / NaN below
      std::fill(gq, gq + D, 0.f);
      continue;
    }
    const int64_t p = idx[2 * i], n = idx[2 * i + 1];
    const float wi = hinge > 0 ? w : 0.f;  // NaN distances make the terms NaN (the generic path's)
    const float wp = wi / dist[2 * i], wn = -wi / dist[2 * i + 1];
    const float *cp = protos + p * D, *cn = protos + n * D;
    float *gp = grad_protos + p * D, *gn = grad_protos + n * D;
    for (int64_t f = 0; f < D; ++f) {
      const float dp = wp * (q[f] - cp[f]), dn = wn * (q[f] - cn[f]);
      gq[f] = dp + dn;
      gp[f] -= dp;
      gn[f] -= dn;
    }
  }
}

void proto_support_grads(const float* grad_protos, const int64_t* inverse, const float* counts,
                         int64_t D, int64_t j0, int64_t j1, bool add, float* grad_support) {
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t k = inverse[j];
    const float* gc = grad_protos + k * D;
    const float c = counts[k];
    float* gs = grad_support + j * D;
    if (add)
      for (int64_t f = 0; f < D; ++f) gs[f] += gc[f] / c;
    else
      for (int64_t f = 0; f < D; ++f) gs[f] = gc[f] / c;
  }
}

}  // namespace fastloss
