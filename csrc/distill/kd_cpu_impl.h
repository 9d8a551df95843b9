// The CPU distillation kernels, instantiated once per instruction set (kd_cpu.cpp: float,
// kd_cpu_avx2.cpp: Vec8, kd_cpu_avx512.cpp: Vec16). A row is read two times in the forward
// (three for jsd) and once in the backward; C = 128k float32 rows of both models (1 MiB) stay
// in L2 between the sweeps.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common/storage.h"
#include "../common/vec_scalar.h"
#include "kd_kernels.h"

namespace fastloss {
namespace FL_ISA {

constexpr float kKdLowest = -3.0e38f;

// A masked class (a logit of -inf, or below -1e30) as -1e30: its probability is 0 all the same,
// and the KLs' p (log p - log q) terms of a class that one or both rows mask come out 0 (the
// 0 log 0 = 0 convention) where -inf - (-inf) made them NaN; NaN stays NaN (vmax keeps its
// first operand's). Not the lowest float: differences and their multiples must stay finite
// (at -3e38, 4 (s - t) overflowed in a gradient). A row whose logits are all masked has no
// distribution: its loss and gradient are NaN (all_masked), as log_softmax of it is (its
// log-sum-exp at the 1e30 scale would have lost log C to rounding: a KL of -7.6e22).
template <class W>
inline W unmask(W v) {
  return vmax(v, W(kKdMaskedLogit));
}
inline bool all_masked(float row_max) { return row_max <= kKdMaskedLogit; }  // (a NaN row goes on: NaN)

// Sweep over a row pair a vector at a time, then the tail one element at a time; `f` is
// called with (V s, V t, int64_t k) for the scaled logits of the elements at k (unmask-ed).
template <class V, class T, class F, class G>
inline void sweep(const T* sr, const T* tr, int64_t C, float inv_t, F&& fv, G&& fs) {
  constexpr int kW = VecTraits<V>::width;
  int64_t k = 0;
  for (; k + kW <= C; k += kW)
    fv(unmask(VecIo<V>::load(sr + k) * V(inv_t)), unmask(VecIo<V>::load(tr + k) * V(inv_t)), k);
  for (; k < C; ++k) fs(unmask(load1(sr + k) * inv_t), unmask(load1(tr + k) * inv_t), k);
}

// The columns of a row a vector at a time (fv(k)), then the tail one at a time (fs(k)).
template <class V, class F, class G>
inline void over_columns(int64_t C, F&& fv, G&& fs) {
  constexpr int kW = VecTraits<V>::width;
  int64_t k = 0;
  for (; k + kW <= C; k += kW) fv(k);
  for (; k < C; ++k) fs(k);
}

// The maxima of the scaled logits of both rows, in one sweep.
template <class V, class T>
void pair_max(const T* sr, const T* tr, int64_t C, float inv_t, float& ms, float& mt) {
  V vms = V(kKdLowest), vmt = V(kKdLowest);
  ms = mt = kKdLowest;
  sweep<V>(sr, tr, C, inv_t, [&](V s, V t, int64_t) { vms = vmax(vms, s); vmt = vmax(vmt, t); },
           [&](float s, float t, int64_t) { ms = vmax(ms, s); mt = vmax(mt, t); });
  ms = vmax(ms, hmax(vms));
  mt = vmax(mt, hmax(vmt));
}

// The sums of a row pair's second sweep: zs = sum e^(s - ms), zt = sum e^(t - mt), and the
// weighted differences the KLs need, a = sum e^(t - mt) (t - s), b = sum e^(s - ms) (s - t);
// with Store, the exponentials also go to es[k] and et[k].
struct PairSums {
  float zs, zt, a, b;
};

template <bool Store, class V, class T>
PairSums pair_sums(const T* sr, const T* tr, int64_t C, float inv_t, float ms, float mt, float* es, float* et) {
  V vzs = V(0.f), vzt = V(0.f), va = V(0.f), vb = V(0.f);
  float zs = 0.f, zt = 0.f, a = 0.f, b = 0.f;
  sweep<V>(sr, tr, C, inv_t,
           [&](V s, V t, int64_t k) {
             const V e_s = vexp(s - V(ms)), e_t = vexp(t - V(mt));
             if constexpr (Store) {
               VecIo<V>::store(es + k, e_s);
               VecIo<V>::store(et + k, e_t);
             }
             vzs += e_s;
             vzt += e_t;
             va = vfma(e_t, t - s, va);
             vb = vfma(e_s, s - t, vb);
           },
           [&](float s, float t, int64_t k) {
             const float e_s = vexp(s - ms), e_t = vexp(t - mt);
             if constexpr (Store) {
               es[k] = e_s;
               et[k] = e_t;
             }
             zs += e_s;
             zt += e_t;
             a += e_t * (t - s);
             b += e_s * (s - t);
           });
  return {zs + hsum(vzs), zt + hsum(vzt), a + hsum(va), b + hsum(vb)};
}

template <class V, class T>
void forward_rows(const KdProblem& q, float* loss, float* stats, int64_t r0, int64_t r1) {
  const float inv_t = 1.f / q.temperature, t2 = q.temperature * q.temperature;
  const float beta = q.beta;
  for (int64_t r = r0; r < r1; ++r) {
    const T* sr = static_cast<const T*>(q.student) + r * q.s_stride;
    const T* tr = static_cast<const T*>(q.teacher) + r * q.t_stride;
    // 1: the maxima
    float ms, mt;
    pair_max<V>(sr, tr, q.C, inv_t, ms, mt);
    if (all_masked(ms) || all_masked(mt)) {  // (the backward reads NaN statistics: a NaN row)
      loss[r] = stats[3 * r] = stats[3 * r + 1] = stats[3 * r + 2] = NAN;
      continue;
    }
    // 2: the partition functions, and the weighted differences the KLs need
    const auto [zs, zt, a, b] = pair_sums<false, V>(sr, tr, q.C, inv_t, ms, mt, nullptr, nullptr);
    const float lse_s = ms + std::log(zs), lse_t = mt + std::log(zt);
    float row = 0.f, extra = 0.f;
    if (q.kind == KdKind::forward_kl) {
      row = a / zt - lse_t + lse_s;
    } else if (q.kind == KdKind::reverse_kl) {
      row = b / zs - lse_s + lse_t;
      extra = row;
    } else {
      // 3 (jsd): with m = beta q + (1 - beta) p,
      //   loss = beta sum q (log q - log m) + (1 - beta) sum p (log p - log m)
      //   S = (1 - beta) sum p (log p - log m)   (the backward's row constant)
      V vl = V(0.f), vS = V(0.f);
      float l = 0.f, S = 0.f;
      auto elem = [&](auto s, auto t, auto& lacc, auto& sacc) {
        using W = std::decay_t<decltype(s)>;
        const W lp = s - W(lse_s), lq = t - W(lse_t);
        const W p = vexp(lp), qq = vexp(lq);
        const W m = W(beta) * qq + W(1.f - beta) * p;
        const W lm = vlog_fast(vmax(m, W(1.2e-38f)));
        const W dp = p * (lp - lm);
        lacc = lacc + W(beta) * qq * (lq - lm) + W(1.f - beta) * dp;
        sacc = sacc + W(1.f - beta) * dp;
      };
      sweep<V>(sr, tr, q.C, inv_t, [&](V s, V t, int64_t) { elem(s, t, vl, vS); },
               [&](float s, float t, int64_t) { elem(s, t, l, S); });
      row = l + hsum(vl);
      extra = S + hsum(vS);
    }
    loss[r] = t2 * row;
    stats[3 * r] = lse_s;
    stats[3 * r + 1] = lse_t;
    stats[3 * r + 2] = extra;
  }
}

template <class V, class T>
void backward_rows(const KdProblem& q, const float* grad_loss, const float* stats, void* grad_out,
                   int64_t r0, int64_t r1) {
  const float inv_t = 1.f / q.temperature, beta = q.beta;
  for (int64_t r = r0; r < r1; ++r) {
    const T* sr = static_cast<const T*>(q.student) + r * q.s_stride;
    const T* tr = static_cast<const T*>(q.teacher) + r * q.t_stride;
    T* gr = static_cast<T*>(grad_out) + r * q.C;
    const float lse_s = stats[3 * r], lse_t = stats[3 * r + 1], extra = stats[3 * r + 2];
    const float g = grad_loss[r] * q.temperature;  // d(T^2 L)/d(student) = T dL/ds
    auto elem = [&](auto s, auto t) {
      using W = std::decay_t<decltype(s)>;
      const W lp = s - W(lse_s), lq = t - W(lse_t);
      const W p = vexp(lp);
      if (q.kind == KdKind::forward_kl) return W(g) * (p - vexp(lq));
      if (q.kind == KdKind::reverse_kl) return W(g) * p * (lp - lq - W(extra));
      const W m = W(beta) * vexp(lq) + W(1.f - beta) * p;
      const W lm = vlog_fast(vmax(m, W(1.2e-38f)));
      return W(g) * p * (W(1.f - beta) * (lp - lm) - W(extra));
    };
    sweep<V>(sr, tr, q.C, inv_t, [&](V s, V t, int64_t k) { VecIo<V>::store(gr + k, elem(s, t)); },
             [&](float s, float t, int64_t k) { store1(gr + k, elem(s, t)); });
  }
}

// The loss rows and the gradient together (kd_forward_grad): per row one read of both rows
// from memory for the maxima, then passes over the rows and over e^(s - ms), e^(t - mt) kept in
// two row-sized float scratch arrays (L2-resident), writing grad_scale * d(T^2 loss_r)/d student
// once. Against kd_forward + kd_backward: the rows are read from memory once instead of three
// times, and the exponentials and logarithm of the backward are not recomputed (JSD: 2 exps and
// 1 log per element instead of 6 and 2).
template <class V, class T>
void forward_grad_rows(const KdProblem& q, float grad_scale, float* loss, void* grad_out,
                       int64_t r0, int64_t r1) {
  using Io = VecIo<V>;
  const int64_t C = q.C;
  const float inv_t = 1.f / q.temperature, t2 = q.temperature * q.temperature;
  const float beta = q.beta, g = grad_scale * q.temperature;  // d(T^2 L)/d(student) = T dL/ds
  std::vector<float> es_row(C), et_row(C);
  float* es = es_row.data();
  float* et = et_row.data();  // e^(t - mt); JSD: then u = (1 - beta) p (log p - log m)
  for (int64_t r = r0; r < r1; ++r) {
    const T* sr = static_cast<const T*>(q.student) + r * q.s_stride;
    const T* tr = static_cast<const T*>(q.teacher) + r * q.t_stride;
    T* gr = static_cast<T*>(grad_out) + r * C;
    float ms, mt;
    pair_max<V>(sr, tr, C, inv_t, ms, mt);
    if (all_masked(ms) || all_masked(mt)) {
      loss[r] = NAN;
      for (int64_t k = 0; k < C; ++k) store1(gr + k, NAN);
      continue;
    }
    const auto [zs, zt, a, b] = pair_sums<true, V>(sr, tr, C, inv_t, ms, mt, es, et);
    const float lse_s = ms + std::log(zs), lse_t = mt + std::log(zt);
    const float inv_zs = 1.f / zs, inv_zt = 1.f / zt, d_lse = lse_s - lse_t;
    float row = 0.f;
    if (q.kind == KdKind::forward_kl) {
      row = a / zt - lse_t + lse_s;
      // g (p - q)
      over_columns<V>(C,
                      [&](int64_t k) {
                        Io::store(gr + k, V(g) * (Io::load(es + k) * V(inv_zs) - Io::load(et + k) * V(inv_zt)));
                      },
                      [&](int64_t k) { store1(gr + k, g * (es[k] * inv_zs - et[k] * inv_zt)); });
    } else if (q.kind == KdKind::reverse_kl) {
      row = b / zs - lse_s + lse_t;
      // g p (log p - log q - row), log p - log q = s - t - (lse_s - lse_t)
      sweep<V>(sr, tr, C, inv_t,
               [&](V s, V t, int64_t k) {
                 Io::store(gr + k, V(g) * (Io::load(es + k) * V(inv_zs)) * ((s - t) - V(d_lse + row)));
               },
               [&](float s, float t, int64_t k) { store1(gr + k, g * (es[k] * inv_zs) * ((s - t) - (d_lse + row))); });
    } else {
      // JSD, m = beta q + (1 - beta) p: the loss, S = (1 - beta) sum p (log p - log m), and u
      // (in et); then the gradient g (u - p S)
      V vl = V(0.f), vS = V(0.f);
      float l = 0.f, S = 0.f;
      auto elem = [&](auto s, auto t, auto p, auto qq, auto& lacc, auto& sacc) {
        using W = std::decay_t<decltype(s)>;
        const W lp = s - W(lse_s), lq = t - W(lse_t);
        const W m = W(beta) * qq + W(1.f - beta) * p;
        const W lm = vlog_fast(vmax(m, W(1.2e-38f)));
        const W u = W(1.f - beta) * p * (lp - lm);
        lacc = lacc + W(beta) * qq * (lq - lm) + u;
        sacc = sacc + u;
        return u;
      };
      sweep<V>(sr, tr, C, inv_t,
               [&](V s, V t, int64_t k) {
                 Io::store(et + k, elem(s, t, Io::load(es + k) * V(inv_zs), Io::load(et + k) * V(inv_zt), vl, vS));
               },
               [&](float s, float t, int64_t k) { et[k] = elem(s, t, es[k] * inv_zs, et[k] * inv_zt, l, S); });
      row = l + hsum(vl);
      S += hsum(vS);
      over_columns<V>(C,
                      [&](int64_t k) {
                        Io::store(gr + k, V(g) * (Io::load(et + k) - Io::load(es + k) * V(inv_zs * S)));
                      },
                      [&](int64_t k) { store1(gr + k, g * (et[k] - es[k] * (inv_zs * S))); });
    }
    loss[r] = t2 * row;
  }
}

#if defined(FL_ISA_VEC)
void kd_forward(const KdProblem& q, float* loss, float* stats, int64_t r0, int64_t r1) {
  visit_storage(q.dtype, [&]<class T>() { forward_rows<FL_ISA_VEC, T>(q, loss, stats, r0, r1); });
}
void kd_backward(const KdProblem& q, const float* grad_loss, const float* stats, void* grad,
                 int64_t r0, int64_t r1) {
  visit_storage(q.dtype, [&]<class T>() {
    backward_rows<FL_ISA_VEC, T>(q, grad_loss, stats, grad, r0, r1);
  });
}
void kd_forward_grad(const KdProblem& q, float grad_scale, float* loss, void* grad, int64_t r0,
                     int64_t r1) {
  visit_storage(q.dtype, [&]<class T>() {
    forward_grad_rows<FL_ISA_VEC, T>(q, grad_scale, loss, grad, r0, r1);
  });
}
#endif

}  // namespace FL_ISA
}  // namespace fastloss
