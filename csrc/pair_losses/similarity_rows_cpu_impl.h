// The CPU similarity-block kernels (similarity_rows_kernels.h), instantiated once per
// instruction set (similarity_rows_cpu.cpp: float, *_avx2.cpp: Vec8, *_avx512.cpp: Vec16).
// Each loop body is written once as a lambda over the lane type U and run on full vectors,
// then on the scalar tail (for_lanes), so the tail follows exactly the same math.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../common/storage.h"
#include "../common/vec_scalar.h"
#include "similarity_rows_kernels.h"

namespace fastloss {
namespace FL_ISA {
namespace sim {

constexpr float kInf = std::numeric_limits<float>::infinity();

// f.template operator()<V>(j) for each full vector of [0, n), then <float>(j) for the tail
template <class V, class F>
inline void for_lanes(int64_t n, F&& f) {
  constexpr int kW = VecTraits<V>::width;
  int64_t j = 0;
  for (; j + kW <= n; j += kW) f.template operator()<V>(j);
  for (; j < n; ++j) f.template operator()<float>(j);
}

struct SumOp {
  template <class U> static U apply(U x, U acc) { return acc + x; }
  static float fold(float a, float b) { return a + b; }
};
// Max / min reductions: whether a NaN survives depends on the lane type (the vector forms keep
// it, the scalar ones and the fold may not), so the kernels test for NaN themselves where it
// matters (ms_rows).
struct MaxOp {
  template <class U> static U apply(U x, U acc) { return vmax(x, acc); }
  static float fold(float a, float b) { return std::max(a, b); }
};
struct MinOp {
  template <class U> static U apply(U x, U acc) { return vmin(x, acc); }
  static float fold(float a, float b) { return std::min(a, b); }
};

// A reduction over the vector lanes and the scalar tail of one row.
template <class V, class Op>
struct LaneAcc {
  V v;
  float f;
  explicit LaneAcc(float init) : v(init), f(init) {}
  void add(V x) { v = Op::apply(x, v); }
  template <class W = V>
    requires(!std::is_same_v<W, float>)
  void add(float x) { f = Op::apply(x, f); }
  float total() const {
    float lanes[VecTraits<V>::width];
    VecIo<V>::store(lanes, v);
    float t = f;
    for (float x : lanes) t = Op::fold(t, x);
    return t;
  }
};

template <class U>
inline U load(const float* p) { return VecIo<U>::load(p); }

// keys are exact small integers: equal when they differ by less than 1/2
template <class U>
inline auto same_key(const float* keys, int64_t j, float key) {
  return vabs(load<U>(keys + j) - U(key)) < U(0.5f);
}

// f(i, row, key) for each anchor row i of [r0, r1), its self pair first set to +inf: no
// positive's minimum, never a kept or hard pair, exp(-inf) = 0
template <class F>
inline void for_anchor_rows(const SimBlock& q, int64_t r0, int64_t r1, F&& f) {
  for (int64_t i = r0; i < r1; ++i) {
    float* row = q.s + i * q.n;
    row[q.row0 + i] = kInf;
    f(i, row, q.keys[q.row0 + i]);
  }
}

template <class V>
void ms_rows_t(const SimBlock& q, const MsParams& p, float* lse_pos, float* lse_neg,
               bool write_grad, int64_t r0, int64_t r1) {
  const int64_t n = q.n;
  const float eps = p.mine ? p.epsilon : 0.f;
  for_anchor_rows(q, r0, r1, [&](int64_t i, float* s, float key) {
    LaneAcc<V, MinOp> min_pos(kInf);
    LaneAcc<V, MaxOp> max_neg(-kInf);
    LaneAcc<V, SumOp> nans(0.f);
    for_lanes<V>(n, [&]<class U>(int64_t j) {
      const U x = load<U>(s + j);
      const auto same = same_key<U>(q.keys, j, key);
      min_pos.add(vselect(same, x, U(kInf)));
      max_neg.add(vselect(same, U(-kInf), x));
      nans.add(vselect(x <= U(kInf), U(0.f), U(1.f)));  // only NaN fails x <= inf
    });
    if (nans.total() > 0.f) {  // a NaN similarity: the anchor's loss and gradient are NaN, as
      lse_pos[i] = lse_neg[i] = std::numeric_limits<float>::quiet_NaN();  // in torch / pml
      if (write_grad) std::fill(s, s + n, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    const float mp = min_pos.total(), mn = max_neg.total();
    // the miner keeps positives below the hardest negative + epsilon and negatives above the
    // hardest positive - epsilon; without it, every pair (the thresholds pass all finite S)
    const float thr_pos = p.mine ? mn : kInf, thr_neg = p.mine ? mp : -kInf;
    // the hardest positive (negative) is kept when any is: it sets the exponentials' shift
    const bool any_pos = mp - eps < thr_pos, any_neg = thr_neg < mn + eps;
    const float shift_p = any_pos ? std::max(0.f, p.alpha * (p.base - mp)) : 0.f;
    const float shift_n = any_neg ? std::max(0.f, p.beta * (mn - p.base)) : 0.f;
    LaneAcc<V, SumOp> sum_p(0.f), sum_n(0.f);
    for_lanes<V>(n, [&]<class U>(int64_t j) {
      const U x = load<U>(s + j);
      const auto same = same_key<U>(q.keys, j, key);
      const U zp = vselect(x - U(eps) < U(thr_pos), U(p.alpha) * (U(p.base) - x) - U(shift_p),
                           U(-kInf));
      const U zn = vselect(U(thr_neg) < x + U(eps), U(p.beta) * (x - U(p.base)) - U(shift_n),
                           U(-kInf));
      const U e = vexp(vselect(same, zp, zn));  // 0 where the pair is not kept
      sum_p.add(vselect(same, e, U(0.f)));
      sum_n.add(vselect(same, U(0.f), e));
      if (write_grad) VecIo<U>::store(s + j, vselect(same, -e, e));  // signed: pos < 0
    });
    // log(1 + sum e^z) = shift + log(e^-shift + sum e^(z - shift))
    auto log1p_sum = [](double shift, double sum) {
      return shift > 0 ? shift + std::log(std::exp(-shift) + sum) : std::log1p(sum);
    };
    const double lp = log1p_sum(shift_p, sum_p.total()), ln = log1p_sum(shift_n, sum_n.total());
    lse_pos[i] = float(lp);
    lse_neg[i] = float(ln);
    if (!write_grad) return;
    // d loss_i / d S = -e^(alpha (base - S) - lse_pos) on kept positives, +e^(beta (S - base)
    // - lse_neg) on kept negatives: the stored signed exponentials times e^(shift - lse)
    const float gp = float(std::exp(shift_p - lp)), gn = float(std::exp(shift_n - ln));
    for_lanes<V>(n, [&]<class U>(int64_t j) {
      const U v = load<U>(s + j);
      VecIo<U>::store(s + j, vselect(v < U(0.f), v * U(gp), v * U(gn)));
    });
  });
}

// hard positives and hard negatives of a TCM row
template <class U>
inline auto tcm_hard_pos(U x, decltype(U(0.f) < U(0.f)) same, const TcmParams& p) {
  return mask_and(same, x <= U(p.m_pos));
}
template <class U>
inline auto tcm_hard_neg(U x, decltype(U(0.f) < U(0.f)) same, const TcmParams& p) {
  return mask_andnot(same, x >= U(p.m_neg));
}

template <class V>
void tcm_rows_t(const SimBlock& q, const TcmParams& p, double* row_stats, int64_t r0,
                int64_t r1) {
  const int64_t n = q.n;
  for_anchor_rows(q, r0, r1, [&](int64_t i, float* s, float key) {
    LaneAcc<V, SumOp> sum_p(0.f), cnt_p(0.f), sum_n(0.f), cnt_n(0.f);
    for_lanes<V>(n, [&]<class U>(int64_t j) {
      const U x = load<U>(s + j);
      const auto same = same_key<U>(q.keys, j, key);
      const auto hp = tcm_hard_pos<U>(x, same, p), hn = tcm_hard_neg<U>(x, same, p);
      sum_p.add(vselect(hp, U(p.m_pos) - x, U(0.f)));
      cnt_p.add(vselect(hp, U(1.f), U(0.f)));
      sum_n.add(vselect(hn, x - U(p.m_neg), U(0.f)));
      cnt_n.add(vselect(hn, U(1.f), U(0.f)));
    });
    double* st = row_stats + 4 * i;
    st[0] = sum_p.total();
    st[1] = cnt_p.total();
    st[2] = sum_n.total();
    st[3] = cnt_n.total();
  });
}

template <class V>
void tcm_pairs_t(const SimBlock& q, const TcmParams& p, const int64_t* offsets, int32_t* cols,
                 int64_t r0, int64_t r1) {
  const int64_t n = q.n;
  for_anchor_rows(q, r0, r1, [&](int64_t i, float* s, float key) {
    int32_t* out = cols + offsets[i];
    for_lanes<V>(n, [&]<class U>(int64_t j) {
      const U x = load<U>(s + j);
      const auto same = same_key<U>(q.keys, j, key);
      unsigned bits = lane_bits(tcm_hard_pos<U>(x, same, p)) | lane_bits(tcm_hard_neg<U>(x, same, p));
      while (bits) {
        *out++ = int32_t(j + __builtin_ctz(bits));
        bits &= bits - 1;
      }
    });
  });
}

template <class V>
void tcm_rows_grad_t(const SimBlock& q, const TcmParams& p, float d_pos, float d_neg,
                     int64_t r0, int64_t r1) {
  const int64_t n = q.n;
  for_anchor_rows(q, r0, r1, [&](int64_t, float* s, float key) {
    for_lanes<V>(n, [&]<class U>(int64_t j) {
      const U x = load<U>(s + j);
      const auto same = same_key<U>(q.keys, j, key);
      VecIo<U>::store(s + j, vselect(tcm_hard_pos<U>(x, same, p), U(-d_pos),
                                     vselect(tcm_hard_neg<U>(x, same, p), U(d_neg), U(0.f))));
    });
  });
}

template <class V>
void pair_rows_grad_t(const float* e, int64_t d, const float* keys, const int64_t* row_ptr,
                      const int32_t* cols, float c_same, float c_diff, float* grad, int64_t r0,
                      int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    float* gi = grad + i * d;
    for (int64_t k = row_ptr[i]; k < row_ptr[i + 1]; ++k) {
      const int64_t j = cols[k];
      const float c = std::fabs(keys[j] - keys[i]) < 0.5f ? c_same : c_diff;
      const float* ej = e + j * d;
      for_lanes<V>(d, [&]<class U>(int64_t t) {
        VecIo<U>::store(gi + t, vfma(U(c), load<U>(ej + t), load<U>(gi + t)));
      });
    }
  }
}

template <class V>
void clip_rows_t(const SimBlock& q, float scale, float* lse_row, float* diag, float* col_max,
                 float* col_sum, int64_t r0, int64_t r1) {
  const int64_t n = q.n;
  const bool cols = col_max != nullptr;
  if (cols) {
    std::fill(col_max, col_max + n, -kInf);
    std::fill(col_sum, col_sum + n, 0.f);
  }
  // pass 1: the rows' maxima (kept in lse_row meanwhile) and the columns'
  for (int64_t i = r0; i < r1; ++i) {
    const float* s = q.s + i * n;
    LaneAcc<V, MaxOp> mx(-kInf);
    for_lanes<V>(n, [&]<class U>(int64_t j) {
      const U x = U(scale) * load<U>(s + j);
      mx.add(x);
      if (cols) VecIo<U>::store(col_max + j, vmax(x, load<U>(col_max + j)));
    });
    lse_row[i] = mx.total();
    diag[i] = scale * s[q.row0 + i];
  }
  // pass 2: the sums of exponentials below each maximum
  for (int64_t i = r0; i < r1; ++i) {
    const float* s = q.s + i * n;
    const float m = lse_row[i];
    LaneAcc<V, SumOp> sum(0.f);
    for_lanes<V>(n, [&]<class U>(int64_t j) {
      const U x = U(scale) * load<U>(s + j);
      sum.add(vexp(x - U(m)));
      if (cols) VecIo<U>::store(col_sum + j, load<U>(col_sum + j) + vexp(x - load<U>(col_max + j)));
    });
    lse_row[i] = m + std::log(sum.total());
  }
}

template <class V>
void clip_rows_grad_t(const SimBlock& q, float scale, const float* lse_row, const float* lse_col,
                      const float* g, int64_t r0, int64_t r1) {
  const int64_t n = q.n;
  for (int64_t i = r0; i < r1; ++i) {
    float* s = q.s + i * n;
    const int64_t self = q.row0 + i;
    const float gi = g[self], lr = lse_row[i];
    for_lanes<V>(n, [&]<class U>(int64_t j) {
      const U x = U(scale) * load<U>(s + j);
      U v = U(gi) * vexp(x - U(lr));
      if (lse_col) v = vfma(load<U>(g + j), vexp(x - load<U>(lse_col + j)), v);
      VecIo<U>::store(s + j, U(scale) * v);
    });
    // the target: the diagonal, in row i's term and (symmetric) in column i's
    s[self] -= scale * gi * (lse_col ? 2.f : 1.f);
  }
}

// The k smallest (d, column) seen so far, ascending; a new column enters when strictly below
// the current k-th (so of equal distances the earlier column stays).
struct NearestK {
  float d[kKnnMax];
  int64_t j[kKnnMax];
  int64_t k, count = 0;
  float worst = kInf;  // the k-th distance once there are k, else +inf: the admission bound
  explicit NearestK(int64_t k_) : k(k_) {}
  void offer(float dist, int64_t col) {
    if (!(dist < worst)) return;  // NaN never enters
    int64_t p = count < k ? count++ : k - 1;
    for (; p > 0 && d[p - 1] > dist; --p) {
      d[p] = d[p - 1];
      j[p] = j[p - 1];
    }
    d[p] = dist;
    j[p] = col;
    if (count == k) worst = d[k - 1];
  }
};

template <class V>
void knn_rows_t(const SimBlock& q, const float* row_sq, const float* col_sq, bool exclude_self,
                int64_t k, int64_t* idx, int64_t r0, int64_t r1) {
  const int64_t n = q.n;
  for (int64_t i = r0; i < r1; ++i) {
    const float* s = q.s + i * n;
    const int64_t self = exclude_self ? q.row0 + i : -1;
    NearestK best(k);
    for_lanes<V>(n, [&]<class U>(int64_t j) {
      const U raw = U(row_sq[i]) + load<U>(col_sq + j) - U(2.f) * load<U>(s + j);
      const U d = vselect(raw < U(0.f), U(0.f), raw);  // cdist's clamp; a NaN stays NaN, never enters
      unsigned bits = lane_bits(d < U(best.worst));
      if (!bits) return;  // the common case once k columns are in: one compare per vector
      float lanes[VecTraits<U>::width];
      VecIo<U>::store(lanes, d);
      for (; bits; bits &= bits - 1) {
        const int b = __builtin_ctz(bits);
        if (j + b != self) best.offer(lanes[b], j + b);
      }
    });
    int64_t* out = idx + i * k;
    std::copy(best.j, best.j + best.count, out);
    // fewer than k only when distances are NaN: the lowest other columns, for a defined result
    for (int64_t j = 0, c = best.count; c < k && j < n; ++j)
      if (j != self && std::find(out, out + c, j) == out + c) out[c++] = j;
  }
}

template <class V>
void neighbour_dist_t(const float* x, const float* t, int64_t d, const int64_t* idx, int64_t n_nb,
                      float eps, float* dist, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    const float* xi = x + i * d;
    for (int64_t c = 0; c < n_nb; ++c) {
      const float* tj = t + idx[i * n_nb + c] * d;
      LaneAcc<V, SumOp> sq(0.f);
      for_lanes<V>(d, [&]<class U>(int64_t k) {
        const U diff = load<U>(xi + k) - load<U>(tj + k);
        sq.add(diff * diff);
      });
      dist[i * n_nb + c] = std::sqrt(sq.total() + eps);
    }
  }
}

template <class V>
void neighbour_dist_grad_x_t(const float* x, const float* t, int64_t d, const int64_t* idx,
                             int64_t n_nb, const float* w, float* grad_x, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    const float* xi = x + i * d;
    float* gi = grad_x + i * d;
    for_lanes<V>(d, [&]<class U>(int64_t k) { VecIo<U>::store(gi + k, U(0.f)); });
    // sum_c w (x_i - t_j) from the differences: (sum_c w) x_i - sum_c w t_j cancelled away the
    // digits of embeddings far from the origin (offset 10, spread 0.01: 20% off)
    for (int64_t c = 0; c < n_nb; ++c) {
      const float* tj = t + idx[i * n_nb + c] * d;
      const float wc = w[i * n_nb + c];
      for_lanes<V>(d, [&]<class U>(int64_t k) {
        VecIo<U>::store(gi + k, vfma(U(wc), load<U>(xi + k) - load<U>(tj + k), load<U>(gi + k)));
      });
    }
  }
}

template <class V>
void neighbour_dist_grad_t_t(const float* x, const float* t, int64_t d, const int64_t* t_ptr,
                             const int64_t* pairs, int64_t n_nb, const float* w, float* grad_t,
                             int64_t r0, int64_t r1) {
  for (int64_t j = r0; j < r1; ++j) {
    const float* tj = t + j * d;
    float* gj = grad_t + j * d;
    for_lanes<V>(d, [&]<class U>(int64_t k) { VecIo<U>::store(gj + k, U(0.f)); });
    for (int64_t p = t_ptr[j]; p < t_ptr[j + 1]; ++p) {  // -sum w (x_i - t_j), by differences
      const float* xi = x + (pairs[p] / n_nb) * d;
      const float wp = w[pairs[p]];
      for_lanes<V>(d, [&]<class U>(int64_t k) {
        VecIo<U>::store(gj + k, vfma(U(-wp), load<U>(xi + k) - load<U>(tj + k), load<U>(gj + k)));
      });
    }
  }
}

}  // namespace sim

#if defined(FL_ISA_VEC)
void neighbour_dist(const float* x, const float* t, int64_t d, const int64_t* idx, int64_t n_nb,
                    float eps, float* dist, int64_t r0, int64_t r1) {
  sim::neighbour_dist_t<FL_ISA_VEC>(x, t, d, idx, n_nb, eps, dist, r0, r1);
}
void neighbour_dist_grad_x(const float* x, const float* t, int64_t d, const int64_t* idx,
                           int64_t n_nb, const float* w, float* grad_x, int64_t r0, int64_t r1) {
  sim::neighbour_dist_grad_x_t<FL_ISA_VEC>(x, t, d, idx, n_nb, w, grad_x, r0, r1);
}
void neighbour_dist_grad_t(const float* x, const float* t, int64_t d, const int64_t* t_ptr,
                           const int64_t* pairs, int64_t n_nb, const float* w, float* grad_t,
                           int64_t r0, int64_t r1) {
  sim::neighbour_dist_grad_t_t<FL_ISA_VEC>(x, t, d, t_ptr, pairs, n_nb, w, grad_t, r0, r1);
}
void knn_rows(const SimBlock& q, const float* row_sq, const float* col_sq, bool exclude_self,
              int64_t k, int64_t* idx, int64_t r0, int64_t r1) {
  sim::knn_rows_t<FL_ISA_VEC>(q, row_sq, col_sq, exclude_self, k, idx, r0, r1);
}
void ms_rows(const SimBlock& q, const MsParams& p, float* lse_pos, float* lse_neg,
             bool write_grad, int64_t r0, int64_t r1) {
  sim::ms_rows_t<FL_ISA_VEC>(q, p, lse_pos, lse_neg, write_grad, r0, r1);
}
void tcm_rows(const SimBlock& q, const TcmParams& p, double* row_stats, int64_t r0, int64_t r1) {
  sim::tcm_rows_t<FL_ISA_VEC>(q, p, row_stats, r0, r1);
}
void tcm_pairs(const SimBlock& q, const TcmParams& p, const int64_t* offsets, int32_t* cols,
               int64_t r0, int64_t r1) {
  sim::tcm_pairs_t<FL_ISA_VEC>(q, p, offsets, cols, r0, r1);
}
void tcm_rows_grad(const SimBlock& q, const TcmParams& p, float d_pos, float d_neg, int64_t r0,
                   int64_t r1) {
  sim::tcm_rows_grad_t<FL_ISA_VEC>(q, p, d_pos, d_neg, r0, r1);
}
void pair_rows_grad(const float* e, int64_t d, const float* keys, const int64_t* row_ptr,
                    const int32_t* cols, float c_same, float c_diff, float* grad, int64_t r0,
                    int64_t r1) {
  sim::pair_rows_grad_t<FL_ISA_VEC>(e, d, keys, row_ptr, cols, c_same, c_diff, grad, r0, r1);
}
void clip_rows(const SimBlock& q, float scale, float* lse_row, float* diag, float* col_max,
               float* col_sum, int64_t r0, int64_t r1) {
  sim::clip_rows_t<FL_ISA_VEC>(q, scale, lse_row, diag, col_max, col_sum, r0, r1);
}
void clip_rows_grad(const SimBlock& q, float scale, const float* lse_row, const float* lse_col,
                    const float* g, int64_t r0, int64_t r1) {
  sim::clip_rows_grad_t<FL_ISA_VEC>(q, scale, lse_row, lse_col, g, r0, r1);
}
#endif

}  // namespace FL_ISA
}  // namespace fastloss
