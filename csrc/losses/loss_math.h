// The math of every row loss, written once and instantiated by the generic CPU kernels
// (V = float), the AVX2 (V = Vec8) and AVX-512 (V = Vec16) kernels, and the CUDA kernels
// (V = float on the device).
//
// A loss is a policy struct with:
//   Acc<V>                    running statistics of one row (members all of type V)
//   passes(p)                 how many passes over the row the forward needs (1, or 2 for ALDR)
//   Ctx / make_ctx(...)       per-row constants of one pass, from the parameters and the
//                             statistics of the previous pass
//   init / add / add_target   start, take one element k != y (with its class weight), take the
//                             target element y (drivers always feed y separately)
//   add_block (optional)      take N elements k != y at once, cheaper than N add()s (CUDA)
//   merge(Acc<float>&, ...)   combine two partial statistics (lanes, threads, chunks)
//   finish(...)               the row loss (already times w_y) and two saved statistics
//   make_bwd(...)             per-row constants of the backward, from the saved statistics,
//                             including the finished gradient of the target element
//   family_grad(x, w, bwd)    d(row loss)/d(logit) for an element k != y
// The CPU driver sums the softmax family's log-sum-exp in L1-sized chunks instead of calling
// add() (losses_cpu_impl.h, softmax_row); the CUDA kernels use add().
// All accumulation is float32 whatever the storage type.
#pragma once
#include <cstdint>

#include "../common/macros.h"
#include "../common/vec_scalar.h"
#include "loss_params.h"

namespace fastloss {
namespace FL_ISA {

// Running maxima start at the lowest finite float, not -inf: then (m - m_new) and
// (a - m_new) are never (-inf) - (-inf), and a row of masked -inf classes gives exp(-inf) = 0.
constexpr float kLowest = -3.402823466e38f;

struct RowResult {
  float loss, stat0, stat1;
};

// ---- online log-sum-exp, optionally with the softmax-weighted mean of (a - m) -------------
template <class V>
FL_HD void lse_add(V& m, V& s, V a) {
  const V mn = vmax(m, a);
  s = s * vexp(m - mn) + vexp(a - mn);
  m = mn;
}
// e = sum_k exp(a_k - m) (a_k - m), kept consistent with (m, s) as m grows.
template <class V>
FL_HD void lse_add_entropy(V& m, V& s, V& e, V a) {
  const V mn = vmax(m, a);
  const V r = vexp(m - mn);
  const V pa = vexp(a - mn);
  // (a - mn) is -inf for a masked class; clamping keeps 0 * (-inf) out.
  e = r * (e + (m - mn) * s) + pa * vmax(a - mn, V(-1e30f));
  s = s * r + pa;
  m = mn;
}
FL_HD void lse_merge(float& m, float& s, float& e, float m2, float s2, float e2) {
  const float mn = vmax(m, m2);
  const float r1 = vexp(m - mn), r2 = vexp(m2 - mn);
  e = r1 * (e + (m - mn) * s) + r2 * (e2 + (m2 - mn) * s2);
  s = s * r1 + s2 * r2;
  m = mn;
}

FL_HD float softplus(float u) { return vmax(u, 0.f) + vlog1p(vexp(-vabs(u))); }
FL_HD float sigmoid(float u) { return 1.f / (1.f + vexp(-u)); }

// ============================================================================================
// Softmax family: cross-entropy, comp-sum, LDR-KL / ALDR-KL.
// Each works on a_k = alpha * z_k + beta (k != y) and a_y = alpha * z_y, with z = x, or
// z = cap * tanh(x / cap) when soft-capping (cross-entropy only).
// ============================================================================================
struct SoftmaxCtx {
  float alpha, beta;      // a_k = alpha z_k + beta for k != y
  float cap, inv_cap;     // soft-cap (cap = 0: none)
  bool entropy;           // also accumulate sum p (a - m) (ALDR's first pass)
  bool linear;            // also accumulate t = sum_k w_k z_k (label smoothing)
};

template <class V>
struct SoftmaxAcc {
  V m, s, e, t;
};

template <class V>
FL_HD V softcap_apply(V x, const SoftmaxCtx& c) {
  return c.cap > 0.f ? V(c.cap) * vtanh(x * V(c.inv_cap)) : x;
}

struct SoftmaxFamilyBase {
  template <class V>
  using Acc = SoftmaxAcc<V>;

  template <class V>
  static FL_HD void init(Acc<V>& a) {
    a.m = V(kLowest);
    a.s = V(0.f);
    a.e = V(0.f);
    a.t = V(0.f);
  }
  template <class V>
  static FL_HD void add(Acc<V>& acc, V x, V w, const SoftmaxCtx& c) {
    const V z = softcap_apply(x, c);
    const V a = V(c.alpha) * z + V(c.beta);
    if (c.entropy)
      lse_add_entropy(acc.m, acc.s, acc.e, a);
    else
      lse_add(acc.m, acc.s, a);
    if (c.linear) acc.t += w * z;
  }
  // N elements k != y at once (the CUDA kernels, after one 16-byte load): the running
  // maximum moves once per block, so the sum is rescaled once per block instead of once per
  // element: about one exp per element instead of two, which keeps bfloat16 rows memory-bound
  // on a GPU. ALDR's first pass (entropy) keeps the per-element update.
  template <int N>
  static FL_HD void add_block(Acc<float>& acc, const float (&x)[N], const float (&w)[N],
                              const SoftmaxCtx& c) {
    if (c.entropy) {
      for (int i = 0; i < N; ++i) add(acc, x[i], w[i], c);
      return;
    }
    float a[N];
    float mb = acc.m;
    for (int i = 0; i < N; ++i) {
      const float z = softcap_apply(x[i], c);
      a[i] = c.alpha * z + c.beta;
      mb = vmax(mb, a[i]);
      if (c.linear) acc.t += w[i] * z;
    }
    float s = acc.s * vexp(acc.m - mb);
    for (int i = 0; i < N; ++i) s += vexp(a[i] - mb);
    acc.s = s;
    acc.m = mb;
  }
  static FL_HD void add_target(Acc<float>& acc, float x, float w, const SoftmaxCtx& c) {
    const float z = softcap_apply(x, c);
    const float a = c.alpha * z;
    if (c.entropy)
      lse_add_entropy(acc.m, acc.s, acc.e, a);
    else
      lse_add(acc.m, acc.s, a);
    if (c.linear) acc.t += w * z;
  }
  static FL_HD void merge(Acc<float>& x, const Acc<float>& y) {
    lse_merge(x.m, x.s, x.e, y.m, y.s, y.e);
    x.t += y.t;
  }
};

// Per-row constants of the softmax-family backward:
//   grad_k = J(x_k) * (P * exp(alpha z_k + beta - lse) - Q w_k)      (k != y)
// with J = d z / d x (1 without soft-capping) and the incoming gradient in P and Q;
// grad_target is each loss's own expression. P is folded into the exponent, P exp(u) =
// sign(P) exp(u + log|P|): a product below the smallest normal float is then 0 from the
// vector exp instead of a subnormal, which costs a microcode assist in every x86 operation
// taking it (logits spread over ~60 made the CPU backward 7x slower). log|P| is added after
// lse is subtracted: (alpha z + beta) - lse stays exact for logits of 1e4, as in the forward.
struct SoftmaxBwd {
  float alpha, beta, lse, log_p, sign, Q;  // log_p = log|P|, sign = sign(P)
  float cap, inv_cap;
  float target_grad;  // the finished value for k = y
};

FL_HD SoftmaxBwd softmax_bwd(float alpha, float beta, float lse, float P, float Q, float cap,
                             float inv_cap, float target_grad) {
  return {alpha, beta, lse, vlog(vabs(P)), P < 0.f ? -1.f : 1.f, Q, cap, inv_cap, target_grad};
}

template <class V>
FL_HD V softmax_grad(V x, V w, const SoftmaxBwd& b) {
  if (b.cap > 0.f) {
    const V t = vtanh(x * V(b.inv_cap));
    const V z = V(b.cap) * t;
    const V p = vexp((V(b.alpha) * z + V(b.beta) - V(b.lse)) + V(b.log_p));
    return (V(1.f) - t * t) * (V(b.sign) * p - V(b.Q) * w);
  }
  const V p = vexp((V(b.alpha) * x + V(b.beta) - V(b.lse)) + V(b.log_p));
  return V(b.sign) * p - V(b.Q) * w;
}

// ---- cross-entropy with class weights, label smoothing, z-loss (lse^2) and soft-capping ----
//   loss = w_y [(1 - eps)(lse - z_y) + s lse^2] + (eps / C) sum_k w_k (lse - z_k)
// which is F.cross_entropy's formula (weights and smoothing included) plus the PaLM term.
// Saved: stat0 = lse, stat1 = its rounding residual (finish).
struct CrossEntropyLoss : SoftmaxFamilyBase {
  using Ctx = SoftmaxCtx;
  static FL_HD int passes(const LossParams&) { return 1; }
  static FL_HD Ctx make_ctx(const LossParams& p, int, const Acc<float>&, float, int64_t) {
    return {1.f, 0.f, p.softcap, p.softcap > 0.f ? 1.f / p.softcap : 0.f, false,
            p.label_smoothing > 0.f};
  }
  static FL_HD float weight_sum(const LossParams& p, int64_t C) {
    return p.weight_sum ? *p.weight_sum : float(C);
  }
  static FL_HD RowResult finish(const Acc<float>& a, const Ctx& c, const LossParams& p, float x_y,
                                float w_y, int64_t C) {
    const float z_y = softcap_apply(x_y, c);
    const float logs = vlog(a.s);
    const float lse = a.m + logs;
    const float nll = (a.m - z_y) + logs;
    float loss = w_y * ((1.f - p.label_smoothing) * nll + p.lse_square_scale * lse * lse);
    if (p.label_smoothing > 0.f)
      loss += p.label_smoothing / float(C) * (weight_sum(p, C) * lse - a.t);
    // Saved: lse and its rounding residual, m + log s - lse (exact in double): the backward's
    // z_y - lse - residual keeps a near-certain target's 1 - p_y where lse alone rounds it away
    // (below one float32 step of the largest logit: 2.4e-6 at logits of 64, a step 7.6e-6,
    // had given p_y - 1 = 0 or -7.6e-6)
    const float lse_lo = float((double(a.m) + double(logs)) - double(lse));
    return {loss, lse, lse_lo};
  }
  static FL_HD SoftmaxBwd make_bwd(const LossParams& p, float g, float stat0, float stat1, float x_y,
                                   float w_y, int64_t C) {
    const float eps = p.label_smoothing, lse = stat0, lse_lo = stat1;
    const float cap = p.softcap, inv_cap = cap > 0.f ? 1.f / cap : 0.f;
    const float R = (1.f - eps) * w_y;
    const float P = R + eps * weight_sum(p, C) / float(C) + 2.f * p.lse_square_scale * w_y * lse;
    const float Q = eps / float(C);
    // k = y: P p_y - Q w_y - R, with P p_y - R = R expm1(z_y - lse) + (P - R) p_y so that
    // 1 - p_y keeps its precision when p_y is close to 1.
    float t = 1.f, z_y = x_y;
    if (cap > 0.f) {
      t = vtanh(x_y * inv_cap);
      z_y = cap * t;
    }
    const float u = (z_y - lse) - lse_lo;  // (z_y - lse exact near the maximum)
    const float gy = R * vexpm1(u) + (P - R) * vexp(u) - Q * w_y;
    const float J = cap > 0.f ? 1.f - t * t : 1.f;
    return softmax_bwd(1.f, 0.f, lse, g * P, g * Q, cap, inv_cap, g * J * gy);
  }
};

// ---- comp-sum losses (Mao, Mohri, Zhong 2023): Phi_tau(sum_{k != y} exp(f_k - f_y)) ---------
// With d = lse - f_y (so 1 + u = e^d): tau = 1 gives d (cross-entropy), otherwise
// expm1((1 - tau) d) / (1 - tau). d loss / d f_k = e^{(1 - tau) d} (p_k - [k = y]).
// Saved: stat0 = lse.
struct CompSumLoss : SoftmaxFamilyBase {
  using Ctx = SoftmaxCtx;
  static FL_HD int passes(const LossParams&) { return 1; }
  static FL_HD Ctx make_ctx(const LossParams&, int, const Acc<float>&, float, int64_t) {
    return {1.f, 0.f, 0.f, 0.f, false, false};
  }
  static FL_HD float phi(float d, float tau) {
    return tau == 1.f ? d : vexpm1((1.f - tau) * d) / (1.f - tau);
  }
  static FL_HD RowResult finish(const Acc<float>& a, const Ctx&, const LossParams& p, float x_y,
                                float w_y, int64_t) {
    const float logs = vlog(a.s);
    const float d = (a.m - x_y) + logs;
    return {w_y * phi(d, p.tau), a.m + logs, 0.f};
  }
  static FL_HD SoftmaxBwd make_bwd(const LossParams& p, float g, float stat0, float, float x_y,
                                   float w_y, int64_t) {
    const float lse = stat0, d = lse - x_y, k = 1.f - p.tau;
    // e^{(1-tau) d} p_k = exp(x_k - (lse - (1-tau) d)): folding the factor into the exponent
    // keeps it finite wherever the product is.
    const float gy = w_y * vexp(k * d) * vexpm1(-d);
    return softmax_bwd(1.f, 0.f, lse - k * d, g * w_y, 0.f, 0.f, 0.f, g * gy);
  }
};

// ---- LDR-KL and ALDR-KL (Zhu, Ying, Yang 2023) ----------------------------------------------
// d_k = f_k - f_y + c [k != y];  loss = lam log((1/K) sum_k exp(d_k / lam)).
// In a = d / lam + f_y / lam terms: a_k = (f_k + c) / lam, a_y = f_y / lam, and
// loss = lam (lse(a) - a_y - log K).
// ALDR-KL: the first pass at lam gives p = softmax(d / lam) and KL(p || uniform); the row's
// temperature is lam_i = lam (1 - KL / (alpha log K)), the maximiser of
// -lam_i KL - (alpha log K / (2 lam)) (lam_i - lam)^2; the second pass evaluates
// lam_i (lse(d / lam_i) - log K) minus that penalty. lam_i is held constant in the gradient.
// Saved: stat0 = lse(a) at lam_i, stat1 = lam_i.
struct LdrLoss : SoftmaxFamilyBase {
  using Ctx = SoftmaxCtx;
  static FL_HD int passes(const LossParams& p) { return p.adaptive ? 2 : 1; }
  static FL_HD float adaptive_lambda(const Acc<float>& a, const LossParams& p, int64_t C) {
    if (C <= 1) return p.lam;
    const float logK = vlog(float(C));
    float kl = logK + a.e / a.s - vlog(a.s);
    kl = vmin(vmax(kl, 0.f), logK);
    return p.lam * (1.f - kl / (p.alpha * logK));
  }
  static FL_HD Ctx make_ctx(const LossParams& p, int pass, const Acc<float>& prev, float,
                            int64_t C) {
    const float lam = pass == 0 ? p.lam : adaptive_lambda(prev, p, C);
    return {1.f / lam, p.margin / lam, 0.f, 0.f, p.adaptive && pass == 0, false};
  }
  static FL_HD RowResult finish(const Acc<float>& a, const Ctx& c, const LossParams& p, float x_y,
                                float w_y, int64_t C) {
    const float lam = 1.f / c.alpha;
    const float logs = vlog(a.s);
    const float logK = vlog(float(C));
    float loss = lam * ((a.m - x_y * c.alpha) + logs - logK);
    if (p.adaptive && C > 1) {
      const float dl = lam - p.lam;
      loss -= p.alpha * logK / (2.f * p.lam) * dl * dl;
    }
    return {w_y * loss, a.m + logs, lam};
  }
  static FL_HD SoftmaxBwd make_bwd(const LossParams& p, float g, float stat0, float stat1,
                                   float x_y, float w_y, int64_t) {
    const float alpha = 1.f / stat1, lse = stat0;
    const float gy = w_y * vexpm1(alpha * x_y - lse);
    return softmax_bwd(alpha, p.margin * alpha, lse, g * w_y, 0.f, 0.f, 0.f, g * gy);
  }
};

// Losses whose forward is one pass with no per-row constants.
struct OnePassNoContext {
  struct Ctx {};
  static FL_HD int passes(const LossParams&) { return 1; }
  template <class Acc>
  static FL_HD Ctx make_ctx(const LossParams&, int, const Acc&, float, int64_t) {
    return {};
  }
};

// ============================================================================================
// Spherical Z-loss (de Brebisson and Vincent 2016):
//   mu, var = mean and population variance of the row, sigma = sqrt(var + eps),
//   z_y = (f_y - mu) / sigma,  loss = softplus(a (b - z_y)) / a.
// Statistics by Welford's update per lane and Chan's merge (no cancellation for large logits).
// Saved: stat0 = mu, stat1 = 1 / sigma.
// ============================================================================================
template <class V>
struct MomentsAcc {
  V n, mean, m2;
};

struct SphericalZLoss : OnePassNoContext {
  template <class V>
  using Acc = MomentsAcc<V>;
  template <class V>
  static FL_HD void init(Acc<V>& a) {
    a.n = V(0.f);
    a.mean = V(0.f);
    a.m2 = V(0.f);
  }
  template <class V>
  static FL_HD void add(Acc<V>& a, V x, V, const Ctx&) {
    a.n += V(1.f);
    const V d = x - a.mean;
    a.mean += d / a.n;
    a.m2 += d * (x - a.mean);
  }
  // N elements at once (CUDA): the block's own mean and squared deviations, then Chan's
  // merge, so one division per block instead of one per element. Scaling before summing
  // keeps the mean finite for logits near the float32 maximum.
  template <int N>
  static FL_HD void add_block(Acc<float>& a, const float (&x)[N], const float (&)[N], const Ctx&) {
    float mean = 0.f;
    for (int i = 0; i < N; ++i) mean += x[i] * (1.f / float(N));
    float m2 = 0.f;
    for (int i = 0; i < N; ++i) m2 += (x[i] - mean) * (x[i] - mean);
    merge(a, Acc<float>{float(N), mean, m2});
  }
  static FL_HD void add_target(Acc<float>& a, float x, float w, const Ctx& c) { add(a, x, w, c); }
  static FL_HD void merge(Acc<float>& x, const Acc<float>& y) {
    const float n = x.n + y.n;
    if (y.n == 0.f) return;
    if (x.n == 0.f) {
      x = y;
      return;
    }
    const float d = y.mean - x.mean;
    x.mean += d * (y.n / n);
    x.m2 += y.m2 + d * d * (x.n * y.n / n);
    x.n = n;
  }
  static FL_HD RowResult finish(const Acc<float>& a, const Ctx&, const LossParams& p, float x_y,
                                float w_y, int64_t C) {
    const float var = vmax(a.m2, 0.f) / float(C);
    const float rstd = 1.f / sqrtf(var + p.eps);
    const float z_y = (x_y - a.mean) * rstd;
    return {w_y * softplus(p.a * (p.b - z_y)) / p.a, a.mean, rstd};
  }
  // grad_k = A + B (x_k - mu) for k != y, and one more -g w_y sg / sigma at k = y, where
  // sg = sigmoid(a (b - z_y)), A = g w_y sg / (C sigma), B = g w_y sg z_y / (C sigma^2).
  struct Bwd {
    float A, B, mu, target_grad;
  };
  static FL_HD Bwd make_bwd(const LossParams& p, float g, float stat0, float stat1, float x_y,
                            float w_y, int64_t C) {
    const float mu = stat0, rstd = stat1;
    const float z_y = (x_y - mu) * rstd;
    const float gs = g * w_y * sigmoid(p.a * (p.b - z_y));
    const float A = gs * rstd / float(C), B = gs * z_y * rstd * rstd / float(C);
    return {A, B, mu, A + B * (x_y - mu) - gs * rstd};
  }
  template <class V>
  static FL_HD V grad(V x, V, const Bwd& b) {
    return V(b.A) + V(b.B) * (x - V(b.mu));
  }
};

// ============================================================================================
// StableMax cross-entropy (Prieto et al. 2025): s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0),
// loss = log(sum_j s(x_j)) - log s(x_y) = log1p(S' / s(x_y)), S' = sum_{k != y} s(x_k).
// d/dx_k = w_y s'(x_k) / S (k != y); at y it is -w_y s'(x_y) S' / (S s(x_y)).
// Saved: stat0 = S' (the sum without the target, which keeps the target's gradient exact).
// ============================================================================================
template <class V>
struct StableSumAcc {
  V s;
};

template <class V>
FL_HD V stablemax_s(V x) {
  // both branches are finite for every input: max(x, 0) + 1 and 1 / (1 - min(x, 0))
  return vselect(x >= V(0.f), vmax(x, V(0.f)) + V(1.f), V(1.f) / (V(1.f) - vmin(x, V(0.f))));
}
template <class V>
FL_HD V stablemax_ds(V x) {  // s'(x)
  const V r = V(1.f) / (V(1.f) - vmin(x, V(0.f)));
  return vselect(x >= V(0.f), V(1.f), r * r);
}

struct StableMaxLoss : OnePassNoContext {
  template <class V>
  using Acc = StableSumAcc<V>;
  template <class V>
  static FL_HD void init(Acc<V>& a) {
    a.s = V(0.f);
  }
  template <class V>
  static FL_HD void add(Acc<V>& a, V x, V, const Ctx&) {
    a.s += stablemax_s(x);
  }
  static FL_HD void add_target(Acc<float>&, float, float, const Ctx&) {}
  static FL_HD void merge(Acc<float>& x, const Acc<float>& y) { x.s += y.s; }
  static FL_HD RowResult finish(const Acc<float>& a, const Ctx&, const LossParams&, float x_y,
                                float w_y, int64_t) {
    return {w_y * vlog1p(a.s / stablemax_s(x_y)), a.s, 0.f};
  }
  struct Bwd {
    float scale, target_grad;  // scale = g w_y / S
  };
  static FL_HD Bwd make_bwd(const LossParams&, float g, float stat0, float, float x_y, float w_y,
                            int64_t) {
    const float sy = stablemax_s(x_y), S = stat0 + sy;
    const float scale = g * w_y / S;
    return {scale, -scale * stablemax_ds(x_y) * stat0 / sy};
  }
  template <class V>
  static FL_HD V grad(V x, V, const Bwd& b) {
    return V(b.scale) * stablemax_ds(x);
  }
};

// The softmax family shares one backward element function.
template <class V>
FL_HD V family_grad(V x, V w, const SoftmaxBwd& b) {
  return softmax_grad(x, w, b);
}
template <class V>
FL_HD V family_grad(V x, V w, const SphericalZLoss::Bwd& b) {
  return SphericalZLoss::grad(x, w, b);
}
template <class V>
FL_HD V family_grad(V x, V w, const StableMaxLoss::Bwd& b) {
  return StableMaxLoss::grad(x, w, b);
}

// Calls f.template operator()<Loss>() for the loss named by kind (host code).
template <class F>
auto visit_loss(LossKind kind, F&& f) {
  switch (kind) {
    case LossKind::comp_sum: return f.template operator()<CompSumLoss>();
    case LossKind::ldr: return f.template operator()<LdrLoss>();
    case LossKind::spherical_z: return f.template operator()<SphericalZLoss>();
    case LossKind::stablemax: return f.template operator()<StableMaxLoss>();
    case LossKind::cross_entropy: break;
  }
  return f.template operator()<CrossEntropyLoss>();
}

}  // namespace FL_ISA
}  // namespace fastloss
