// The element math of the metric-driven losses (metric_losses_kernels.h), written once for a
// value type W (float, or the CPU's vector types) and shared by the CPU kernels
// (metric_losses_cpu_impl.h) and the CUDA kernels (metric_losses_cuda.cu). Torch-free.
#pragma once
#include "../common/macros.h"
#include "../common/vec_scalar.h"
#include "metric_losses_kernels.h"

namespace fastloss {
namespace FL_ISA {
namespace metric_detail {

// sigmoid(x) and sigmoid(-x) = 1 - sigmoid(x), each from e^-|x| so that neither loses its
// small values to cancellation.
template <class W>
FL_INLINE void sigmoid_pair(W x, W e, W& p, W& q) {
  const W r = W(1.f) / (W(1.f) + e);
  const auto pos = x >= W(0.f);
  p = vselect(pos, r, e * r);
  q = vselect(pos, e * r, r);
}

// q^a for q in [0, 1]: a = 0 and a = 1 exactly (0^0 = 1), else exp(a log q) (0 for q = 0, a > 0).
template <class W>
FL_INLINE W pow01(W q, float a) {
  if (a == 1.f) return q;
  if (a == 0.f) return W(1.f);
  return vexp(W(a) * vlog_fast(q));
}

// Dice of one prediction with decayed probability pt and target y: 1 - DSC, and its slope
// d(1 - DSC)/d pt = (num - 2 y den) / den^2.
template <class W>
FL_INLINE W dice_term(W pt, W y, const DiceParams& d) {
  return W(1.f) - (W(2.f) * pt * y + W(d.gamma)) / (pt + y + W(d.gamma + d.smooth));
}
template <class W>
FL_INLINE W dice_slope(W pt, W y, const DiceParams& d) {
  const W den = pt + y + W(d.gamma + d.smooth), num = W(2.f) * pt * y + W(d.gamma);
  return (num - W(2.f) * y * den) / (den * den);
}

// p = sigmoid(x), q = 1 - p and pt = q^alpha p, with log q = -(max(x, 0) + log(1 + e^-|x|))
// (finite for any x).
template <class W>
struct SigmoidDecay {
  W p, q, pt;
  FL_INLINE SigmoidDecay(W x, float alpha) {
    const W e = vexp(-vabs(x));
    sigmoid_pair(x, e, p, q);
    const W qa = alpha == 1.f || alpha == 0.f
                     ? pow01(q, alpha)
                     : vexp(W(-alpha) * (vmax(x, W(0.f)) + vlog_fast(W(1.f) + e)));
    pt = qa * p;
  }
};

template <class W>
FL_INLINE W sigmoid_dice_term(W x, W y, const DiceParams& d) {
  return dice_term(SigmoidDecay<W>(x, d.alpha).pt, y, d);
}

// d term / d x = slope * p q^alpha (q - alpha p)   (dp/dx = p q)
template <class W>
FL_INLINE W sigmoid_dice_grad(W x, W y, W g, const DiceParams& d) {
  const SigmoidDecay<W> s(x, d.alpha);
  return g * dice_slope(s.pt, y, d) * s.pt * (s.q - W(d.alpha) * s.p);
}

// One class's decayed probability pt = q^alpha p, with q given.
template <class W>
FL_INLINE W decayed(W p, W q, float alpha) {
  return pow01(q, alpha) * p;
}

// q^a from log q (q in [0, 1], log q = -inf for q = 0): a = 0 and a = 1 as pow01. A saturated
// softmax's top class carries its q = 1 - p as a logarithm: q itself can be subnormal or
// below float32's range where q^a, for the Dice paper's a = 0.1 .. 0.001, is not small at all
// (q = e^-90: q^0.01 = 0.41).
FL_INLINE float pow_of_log(float log_q, float a) {
  if (a == 0.f) return 1.f;
  return vexp(a * log_q);
}

// a = A(p) = sigmoid(L (p - 1/2)) and b = 1 - a, with p = sigmoid(s) or s; also dA/ds.
template <class W>
FL_INLINE void amplified(W s, float L, bool from_logits, W& a, W& b, W& slope) {
  W p = s, pq = W(1.f);
  if (from_logits) {
    W q;
    sigmoid_pair(s, vexp(-vabs(s)), p, q);
    pq = p * q;
  }
  const W u = W(L) * (p - W(0.5f));
  sigmoid_pair(u, vexp(-vabs(u)), a, b);
  slope = W(L) * a * b * pq;
}

template <class W>
FL_INLINE void add_cells(W s, W y, const ConfusionProblem& q, W& tp, W& fn, W& fp, W& tn) {
  W a, b, slope;
  amplified(s, q.L, q.from_logits, a, b, slope);
  const W n = W(1.f) - y;
  tp += y * a;
  fn += y * b;
  fp += n * a;
  tn += n * b;
}

// d/ds = (y (gTP - gFN) + (1 - y)(gFP - gTN)) dA/ds
template <class W>
FL_INLINE W confusion_grad(W s, W y, W c1, W c0, const ConfusionProblem& q) {
  W a, b, slope;
  amplified(s, q.L, q.from_logits, a, b, slope);
  return (y * c1 + (W(1.f) - y) * c0) * slope;
}

}  // namespace metric_detail
}  // namespace FL_ISA
}  // namespace fastloss
