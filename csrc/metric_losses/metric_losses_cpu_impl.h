// The CPU kernels of the metric-driven losses (metric_losses_kernels.h), instantiated once per
// instruction set (metric_losses_cpu.cpp: float, _avx2.cpp: Vec8, _avx512.cpp: Vec16). The
// element math is written once for a vector type W (V or float) and used for the vector body
// and the scalar tail of every loop.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/macros.h"
#include "../common/storage.h"
#include "../common/vec_scalar.h"
#include "metric_losses_kernels.h"
#include "metric_math.h"

namespace fastloss {
namespace FL_ISA {
namespace metric_detail {

constexpr float kLowest = -3.0e38f;

// Each lane's index as a float: 0, 1, ..., width - 1.
template <class V>
inline V lane_index() {
  alignas(64) static constexpr float kIota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return VecIo<V>::load(kIota);
}

// Row loops without a scalar tail (a scalar exp and log cost about as much as a whole vector):
// the last partial vector is taken as the vector that ends at the range's end, which overlaps
// the previous one. f(W(0), k) returns the values of elements k .. k + width(W) - 1, for W = V
// or float (it loads what it needs itself, so one loop serves rows of one or two inputs).
// row_sum masks the overlapping lanes out of the sum over [k0, k1); row_store recomputes and
// rewrites out[k] there. Scalar only for ranges shorter than a vector.
template <class V, class F>
FL_INLINE float row_sum(int64_t k0, int64_t k1, F&& f) {
  constexpr int kW = VecTraits<V>::width;
  V acc(0.f);
  int64_t k = k0;
  for (; k + kW <= k1; k += kW) acc += f(V(0.f), k);
  if (k == k1) return hsum(acc);
  if (k1 - k0 >= kW) {
    const V last = f(V(0.f), k1 - kW);
    const V fresh = V(float(k - (k1 - kW)));  // lanes below this were summed already
    return hsum(acc + vselect(lane_index<V>() >= fresh, last, V(0.f)));
  }
  float tail = 0.f;
  for (; k < k1; ++k) tail += f(0.f, k);
  return hsum(acc) + tail;
}

template <class V, class T, class F>
FL_INLINE void row_store(T* out, int64_t n, F&& f) {
  constexpr int kW = VecTraits<V>::width;
  int64_t k = 0;
  for (; k + kW <= n; k += kW) VecIo<V>::store(out + k, f(V(0.f), k));
  if (k == n) return;
  if (n >= kW) {
    VecIo<V>::store(out + n - kW, f(V(0.f), n - kW));
    return;
  }
  for (; k < n; ++k) store1(out + k, f(0.f, k));
}

// W-wide load of p[0..width(W)), W = V or float.
template <class W, class T>
FL_INLINE W load_as(const T* p) {
  return VecIo<W>::load(p);
}

// --- sigmoid form --------------------------------------------------------------------------

// K = 1 (one prediction per row) runs as one row of N elements: vectors across rows.
template <class V, class T>
void sigmoid_forward_rows(const SigmoidDiceProblem& q, float* rows, int64_t r0, int64_t r1) {
  const DiceParams d = q.p;  // a local copy: the stores cannot alias it
  const T* x = static_cast<const T*>(q.logits);
  const float* y = q.target;
  if (q.K == 1) {
    row_store<V>(rows + r0, r1 - r0, [&](auto w, int64_t k) {
      using W = decltype(w);
      return sigmoid_dice_term(load_as<W>(x + r0 + k), load_as<W>(y + r0 + k), d);
    });
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * q.K;
    const float* yr = y + r * q.K;
    rows[r] = row_sum<V>(0, q.K, [&](auto w, int64_t k) {
      using W = decltype(w);
      return sigmoid_dice_term(load_as<W>(xr + k), load_as<W>(yr + k), d);
    });
  }
}

template <class V, class T>
void sigmoid_backward_rows(const SigmoidDiceProblem& q, const float* grad_rows, void* grad_out,
                           int64_t r0, int64_t r1) {
  const DiceParams d = q.p;  // a local copy: the stores cannot alias it
  const T* x = static_cast<const T*>(q.logits);
  const float* y = q.target;
  T* gx = static_cast<T*>(grad_out);
  if (q.K == 1) {
    row_store<V>(gx + r0, r1 - r0, [&](auto w, int64_t k) {
      using W = decltype(w);
      return sigmoid_dice_grad(load_as<W>(x + r0 + k), load_as<W>(y + r0 + k),
                               load_as<W>(grad_rows + r0 + k), d);
    });
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * q.K;
    const float g = grad_rows[r];
    row_store<V>(gx + o, q.K, [&](auto w, int64_t k) {
      using W = decltype(w);
      return sigmoid_dice_grad(load_as<W>(x + o + k), load_as<W>(y + o + k), W(g), d);
    });
  }
}

// --- softmax form --------------------------------------------------------------------------
// p_c = e^(x_c - m) / Z with m the row's maximum and Z = sum_c e^(x_c - m) = 1 + R, R the
// share of the classes other than the maximum's. The vector loops treat every class as a
// negative (y = 0) with q = 1 - p; the target (y = 1) is then corrected on its own. That q is
// accurate for every class while the largest p is at most 2/3 (R >= 1/2, the usual case).
// Otherwise the row is "saturated": the largest class `top` (the first maximum) takes
// q = R / Z with R summed without it (1 - p would round to 0 when the softmax saturates in
// float32), as a logarithm: R = e^(m2 - m) R2 with m2 the largest of the other classes and
// R2 = sum_{c != top} e^(x_c - m2) >= 1, so log q = m2 - m + log R2 - log(1 + R) stays exact
// where R itself is subnormal (flushed here) or below float32's range, while q^alpha is not
// small (a gap of 88 at alpha = 0.1 had made the top's Dice term 1.6e-4 off, its gradient 0);
// and it is corrected on its own too.

struct SoftmaxRow {
  float m = 0.f, rest = 0.f, inv_z = 1.f;
  bool saturated = false;
  int64_t top = -1;        // only when saturated:
  float log_q_top = 0.f;   // log(R / Z) (-inf: no other class has any share)
  float m2 = 0.f;          // the other classes' maximum, and 1 / R2: e_j / R = e^(x_j - m2) / R2
  float inv_rest2 = 0.f;
};

template <class V, class T>
float max_of(const T* xr, int64_t k0, int64_t k1) {
  constexpr int kW = VecTraits<V>::width;
  V vm(kLowest);
  float m = kLowest;
  int64_t k = k0;
  for (; k + kW <= k1; k += kW) vm = vmax(VecIo<V>::load(xr + k), vm);
  for (; k < k1; ++k) m = vmax(load1(xr + k), m);
  return vmax(hmax(vm), m);
}

template <class V, class T>
float sum_exp(const T* xr, int64_t k0, int64_t k1, float m) {
  return row_sum<V>(k0, k1, [&](auto w, int64_t k) {
    using W = decltype(w);
    return vexp(load_as<W>(xr + k) - W(m));
  });
}

template <class V, class T>
SoftmaxRow softmax_row(const T* xr, int64_t C) {
  constexpr int kW = VecTraits<V>::width;
  V vm(kLowest);
  float m = kLowest;
  int64_t k = 0;
  for (; k + kW <= C; k += kW) vm = vmax(VecIo<V>::load(xr + k), vm);
  if (k < C && C >= kW) {
    vm = vmax(VecIo<V>::load(xr + C - kW), vm);  // the overlapping last vector
  } else {
    for (; k < C; ++k) m = vmax(load1(xr + k), m);
  }
  SoftmaxRow s;
  s.m = vmax(hmax(vm), m);
  const float z = sum_exp<V>(xr, 0, C, s.m);
  if (!(z < 1.5f)) {  // R >= 1/2 (or a NaN row, which stays NaN)
    s.rest = z - 1.f;
    s.inv_z = 1.f / z;
    return s;
  }
  s.saturated = true;
  s.top = 0;
  while (s.top < C && !(load1(xr + s.top) == s.m)) ++s.top;
  if (s.top == C) s.top = 0;  // not reached for finite rows
  s.m2 = vmax(max_of<V>(xr, 0, s.top), max_of<V>(xr, s.top + 1, C));
  const float rest2 = s.m2 > kLowest ? sum_exp<V>(xr, 0, s.top, s.m2) + sum_exp<V>(xr, s.top + 1, C, s.m2) : 0.f;
  s.rest = rest2 * vexp(s.m2 - s.m);
  s.inv_z = 1.f / (1.f + s.rest);
  s.log_q_top = rest2 > 0.f ? (s.m2 - s.m) + std::log(rest2) - std::log1p(s.rest) : -INFINITY;
  s.inv_rest2 = rest2 > 0.f ? 1.f / rest2 : 0.f;
  return s;
}

template <class V, class T>
void softmax_forward_rows(const SoftmaxDiceProblem& q, float* rows, int64_t r0, int64_t r1) {
  const DiceParams d = q.p;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = q.target[r];
    if (t == q.ignore_index) {
      rows[r] = 0.f;
      continue;
    }
    const T* xr = static_cast<const T*>(q.logits) + r * q.stride;
    const SoftmaxRow s = softmax_row<V>(xr, q.C);
    auto negative = [&](auto x) {  // the term of a class with y = 0 and q = 1 - p
      using W = decltype(x);
      const W p = vexp(x - W(s.m)) * W(s.inv_z);
      return dice_term(decayed(p, W(1.f) - p, d.alpha), W(0.f), d);
    };
    auto exact = [&](int64_t c) {
      const float p = vexp(load1(xr + c) - s.m) * s.inv_z;
      const float pt = c == s.top ? pow_of_log(s.log_q_top, d.alpha) * p : decayed(p, 1.f - p, d.alpha);
      return dice_term(pt, c == t ? 1.f : 0.f, d);
    };
    float row = row_sum<V>(0, q.C, [&](auto w, int64_t k) {
      return negative(load_as<decltype(w)>(xr + k));
    });
    if (s.saturated) row += exact(s.top) - negative(load1(xr + s.top));
    if (t != s.top) row += exact(t) - negative(load1(xr + t));
    rows[r] = row;
  }
}

// With G_c = g slope_c p_c q_c^(alpha-1) (q_c - alpha p_c) (the chain rule through pt_c), the
// gradient is d/dx_j = G_j - p_j sum_c G_c. In a saturated row G_top is infinite when
// q_top = 0 and alpha < 1, so it is carried as H = G_top q_top (finite) and, since
// p_j / q_top = e_j / R for j != top:
//   d/dx_j = G_j - p_j S - (e_j / R) H  (j != top),   d/dx_top = H - p_top S,
// with S the sum of G over the classes other than top (H = 0 and S over all classes otherwise);
// e_j / R = e^(x_j - m2) / R2 and q_top^alpha from log q_top (softmax_row).
// G (the costly part: a log and two exps per class for alpha other than 0 and 1) is formed
// once into a float32 row buffer, summed, then read back for the gradient.
template <class V, class T>
void softmax_backward_rows(const SoftmaxDiceProblem& q, const float* grad_rows, void* grad_out,
                           int64_t r0, int64_t r1) {
  const DiceParams d = q.p;
  std::vector<float> g_row(q.C);
  float* G = g_row.data();
  for (int64_t r = r0; r < r1; ++r) {
    T* gr = static_cast<T*>(grad_out) + r * q.C;
    const int64_t t = q.target[r];
    if (t == q.ignore_index) {
      for (int64_t k = 0; k < q.C; ++k) store1(gr + k, 0.f);
      continue;
    }
    const T* xr = static_cast<const T*>(q.logits) + r * q.stride;
    const SoftmaxRow s = softmax_row<V>(xr, q.C);
    const float g = grad_rows[r];
    // G of a class other than a saturated top, with its q = 1 - p and target y
    auto g_of = [&](auto e, auto y) {
      using W = decltype(e);
      const W p = e * W(s.inv_z), qc = W(1.f) - p;
      const W qa1 = pow01(qc, d.alpha - 1.f);
      return W(g) * dice_slope(qa1 * qc * p, y, d) * p * qa1 * (qc - W(d.alpha) * p);
    };
    auto e_of = [&](auto w, int64_t k) {
      using W = decltype(w);
      return vexp(load_as<W>(xr + k) - W(s.m));
    };
    row_store<V>(G, q.C, [&](auto w, int64_t k) { return g_of(e_of(w, k), decltype(w)(0.f)); });
    if (t != s.top) G[t] = g_of(e_of(0.f, t), 1.f);
    if (s.saturated) G[s.top] = 0.f;  // not part of S (may be infinite as a negative's G)
    const float S = row_sum<V>(0, q.C, [&](auto w, int64_t k) { return load_as<decltype(w)>(G + k); });
    const float p_top = s.inv_z;
    if (!s.saturated) {
      row_store<V>(gr, q.C, [&](auto w, int64_t k) {
        using W = decltype(w);
        return load_as<W>(G + k) - e_of(w, k) * W(s.inv_z * S);
      });
      continue;
    }
    const float q_top = vexp(s.log_q_top), qa_top = pow_of_log(s.log_q_top, d.alpha);
    const float H = g * dice_slope(qa_top * p_top, t == s.top ? 1.f : 0.f, d) * p_top * qa_top *
                    (q_top - d.alpha * p_top);
    row_store<V>(gr, q.C, [&](auto w, int64_t k) {
      using W = decltype(w);
      const W x = load_as<W>(xr + k);
      return load_as<W>(G + k) - vexp(x - W(s.m)) * W(s.inv_z * S) - vexp(x - W(s.m2)) * W(s.inv_rest2 * H);
    });
    store1(gr + s.top, H - p_top * S);
  }
}

// --- AnyLoss's confusion matrix ------------------------------------------------------------

// Float32 partial sums of blocks of this many elements are added to the float64 totals.
constexpr int64_t kFlushElems = 1 << 14;

template <class V, class T>
void confusion_sums_rows(const ConfusionProblem& q, double* sums, int64_t r0, int64_t r1) {
  constexpr int kW = VecTraits<V>::width;
  const T* x = static_cast<const T*>(q.scores);
  const float* y = q.target;
  const int64_t K = q.K;
  if (K == 1) {  // one column: vectors across rows
    for (int64_t b0 = r0; b0 < r1; b0 += kFlushElems) {
      const int64_t b1 = std::min(r1, b0 + kFlushElems);
      V tp(0.f), fn(0.f), fp(0.f), tn(0.f);
      float s_tp = 0.f, s_fn = 0.f, s_fp = 0.f, s_tn = 0.f;
      int64_t r = b0;
      for (; r + kW <= b1; r += kW) add_cells(VecIo<V>::load(x + r), VecIo<V>::load(y + r), q, tp, fn, fp, tn);
      for (; r < b1; ++r) add_cells(load1(x + r), y[r], q, s_tp, s_fn, s_fp, s_tn);
      sums[0] += double(hsum(tp) + s_tp);
      sums[1] += double(hsum(fn) + s_fn);
      sums[2] += double(hsum(fp) + s_fp);
      sums[3] += double(hsum(tn) + s_tn);
    }
    return;
  }
  std::vector<float> acc(4 * K, 0.f);
  float* c[4] = {acc.data(), acc.data() + K, acc.data() + 2 * K, acc.data() + 3 * K};
  const int64_t rows_per_flush = std::max<int64_t>(1, kFlushElems / std::max<int64_t>(K, 1));
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * K;
    const float* yr = y + r * K;
    int64_t k = 0;
    for (; k + kW <= K; k += kW) {
      V tp = VecIo<V>::load(c[0] + k), fn = VecIo<V>::load(c[1] + k);
      V fp = VecIo<V>::load(c[2] + k), tn = VecIo<V>::load(c[3] + k);
      add_cells(VecIo<V>::load(xr + k), VecIo<V>::load(yr + k), q, tp, fn, fp, tn);
      VecIo<V>::store(c[0] + k, tp);
      VecIo<V>::store(c[1] + k, fn);
      VecIo<V>::store(c[2] + k, fp);
      VecIo<V>::store(c[3] + k, tn);
    }
    for (; k < K; ++k) add_cells(load1(xr + k), yr[k], q, c[0][k], c[1][k], c[2][k], c[3][k]);
    if ((r - r0 + 1) % rows_per_flush == 0 || r + 1 == r1) {
      for (int64_t i = 0; i < 4 * K; ++i) sums[i] += double(acc[i]);
      std::fill(acc.begin(), acc.end(), 0.f);
    }
  }
}

template <class V, class T>
void confusion_backward_rows(const ConfusionProblem& q, const float* gs, void* grad_out,
                             int64_t r0, int64_t r1) {
  constexpr int kW = VecTraits<V>::width;
  const T* x = static_cast<const T*>(q.scores);
  const float* y = q.target;
  T* gx = static_cast<T*>(grad_out);
  const int64_t K = q.K;
  std::vector<float> coef(2 * K);  // c1 = gTP - gFN, c0 = gFP - gTN per column
  for (int64_t k = 0; k < K; ++k) {
    coef[k] = gs[k] - gs[K + k];
    coef[K + k] = gs[2 * K + k] - gs[3 * K + k];
  }
  const float* c1 = coef.data();
  const float* c0 = coef.data() + K;
  if (K == 1) {
    int64_t r = r0;
    for (; r + kW <= r1; r += kW)
      VecIo<V>::store(gx + r, confusion_grad(VecIo<V>::load(x + r), VecIo<V>::load(y + r), V(c1[0]), V(c0[0]), q));
    for (; r < r1; ++r) store1(gx + r, confusion_grad(load1(x + r), y[r], c1[0], c0[0], q));
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * K;
    int64_t k = 0;
    for (; k + kW <= K; k += kW)
      VecIo<V>::store(gx + o + k, confusion_grad(VecIo<V>::load(x + o + k), VecIo<V>::load(y + o + k),
                                                 VecIo<V>::load(c1 + k), VecIo<V>::load(c0 + k), q));
    for (; k < K; ++k) store1(gx + o + k, confusion_grad(load1(x + o + k), y[o + k], c1[k], c0[k], q));
  }
}

}  // namespace metric_detail

#if defined(FL_ISA_VEC)
void dice_sigmoid_forward(const SigmoidDiceProblem& q, float* rows, int64_t r0, int64_t r1) {
  visit_storage(q.dtype, [&]<class T>() {
    metric_detail::sigmoid_forward_rows<FL_ISA_VEC, T>(q, rows, r0, r1);
  });
}
void dice_sigmoid_backward(const SigmoidDiceProblem& q, const float* grad_rows, void* grad,
                           int64_t r0, int64_t r1) {
  visit_storage(q.dtype, [&]<class T>() {
    metric_detail::sigmoid_backward_rows<FL_ISA_VEC, T>(q, grad_rows, grad, r0, r1);
  });
}
void dice_softmax_forward(const SoftmaxDiceProblem& q, float* rows, int64_t r0, int64_t r1) {
  visit_storage(q.dtype, [&]<class T>() {
    metric_detail::softmax_forward_rows<FL_ISA_VEC, T>(q, rows, r0, r1);
  });
}
void dice_softmax_backward(const SoftmaxDiceProblem& q, const float* grad_rows, void* grad,
                           int64_t r0, int64_t r1) {
  visit_storage(q.dtype, [&]<class T>() {
    metric_detail::softmax_backward_rows<FL_ISA_VEC, T>(q, grad_rows, grad, r0, r1);
  });
}
void confusion_sums(const ConfusionProblem& q, double* sums, int64_t r0, int64_t r1) {
  visit_storage(q.dtype, [&]<class T>() {
    metric_detail::confusion_sums_rows<FL_ISA_VEC, T>(q, sums, r0, r1);
  });
}
void confusion_backward(const ConfusionProblem& q, const float* grad_sums, void* grad, int64_t r0,
                        int64_t r1) {
  visit_storage(q.dtype, [&]<class T>() {
    metric_detail::confusion_backward_rows<FL_ISA_VEC, T>(q, grad_sums, grad, r0, r1);
  });
}
#endif

}  // namespace FL_ISA
}  // namespace fastloss
