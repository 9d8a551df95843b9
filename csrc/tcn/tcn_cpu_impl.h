// The CPU drivers of the depthwise dilated convolution, instantiated once per instruction set
// (tcn_cpu.cpp: V = float, tcn_cpu_avx2.cpp: Vec8, tcn_cpu_avx512.cpp: Vec16). float32 math,
// inputs and outputs in float32 / float16 / bfloat16 storage.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/storage.h"
#include "../common/vec_scalar.h"
#include "activations.h"
#include "tcn_kernels.h"

namespace fastloss {
namespace FL_ISA {

// The epilogue of ConvTaps on an output h, with `o` pointing at other[b, c, t] (or null).
template <class V, class T>
inline V finish(V h, const ConvTaps& p, const T* o) {
  const Act act = Act(p.act);
  if (p.mode == 1) return VecIo<V>::load(o) * act_derivative(h, act);
  const V y = act_apply(h, act);
  return o ? VecIo<V>::load(o) + y : y;
}

// kW inputs x[i0 .. i0 + kW) of a row of length L as a vector, zeros outside [0, L).
template <class V, class T>
inline V load_clipped(const T* x, int64_t i0, int64_t L) {
  constexpr int kW = VecTraits<V>::width;
  if (i0 >= 0 && i0 + kW <= L) return VecIo<V>::load(x + i0);
  if (i0 + kW <= 0 || i0 >= L) return V(0.f);
  float tmp[kW];
  for (int j = 0; j < kW; ++j) tmp[j] = (i0 + j >= 0 && i0 + j < L) ? load1(x + i0 + j) : 0.f;
  return VecIo<V>::load(tmp);
}

// Channels first: one (b, c) row. Outputs whose taps are all inside [0, L) (the interior) go
// four vectors at a time (independent accumulators: one chain of K dependent FMAs would leave
// the FMA units idle) without bounds checks; the edges a vector at a time, each tap's inputs
// loaded with zeros outside the row (a scalar loop with a check per tap cost as much as the
// whole interior at pad = 48 of L = 1024). Every tap is added, the padding's zeros included,
// as F.conv1d does: a non-finite tap gives NaN at the edges on every instruction set.
template <class V, class T>
void conv_row(const T* x, T* y, const T* o, int64_t L, const float* w, float bias,
              const ConvTaps& p) {
  constexpr int kW = VecTraits<V>::width;
  const int64_t K = p.K, d = p.dilation, pad = p.pad;
  const int64_t lo = std::min<int64_t>(pad, L);                          // first interior output
  const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(L, L - (K - 1) * d + pad));
  // outputs [t, t + n), n <= kW, with the taps' bounds checked
  auto edge = [&](int64_t t, int64_t n) {
    V acc = V(bias);
    for (int64_t k = 0; k < K; ++k) acc = vfma(V(w[k]), load_clipped<V>(x, t - pad + k * d, L), acc);
    if (n == kW) {
      VecIo<V>::store(y + t, finish<V>(acc, p, o ? o + t : o));
      return;
    }
    float h[kW];
    VecIo<V>::lanes(acc, h);
    for (int64_t j = 0; j < n; ++j) store1(y + t + j, finish<float>(h[j], p, o ? o + t + j : o));
  };
  int64_t t = 0;
  for (; t < lo && t + kW <= L; t += kW) edge(t, kW);
  for (; t + 4 * kW <= hi; t += 4 * kW) {
    const T* xt = x + t - pad;
    V a0 = V(bias), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; ++k) {
      const V wk = V(w[k]);
      const T* xk = xt + k * d;
      a0 = vfma(wk, VecIo<V>::load(xk), a0);
      a1 = vfma(wk, VecIo<V>::load(xk + kW), a1);
      a2 = vfma(wk, VecIo<V>::load(xk + 2 * kW), a2);
      a3 = vfma(wk, VecIo<V>::load(xk + 3 * kW), a3);
    }
    VecIo<V>::store(y + t, finish<V>(a0, p, o ? o + t : o));
    VecIo<V>::store(y + t + kW, finish<V>(a1, p, o ? o + t + kW : o));
    VecIo<V>::store(y + t + 2 * kW, finish<V>(a2, p, o ? o + t + 2 * kW : o));
    VecIo<V>::store(y + t + 3 * kW, finish<V>(a3, p, o ? o + t + 3 * kW : o));
  }
  for (; t + kW <= hi; t += kW) {
    const T* xt = x + t - pad;
    V acc = V(bias);
    for (int64_t k = 0; k < K; ++k) acc = vfma(V(w[k]), VecIo<V>::load(xt + k * d), acc);
    VecIo<V>::store(y + t, finish<V>(acc, p, o ? o + t : o));
  }
  for (; t < L; t += kW) edge(t, std::min<int64_t>(kW, L - t));
}

// Channels last: one (b, t) position, every channel; w is [K, C]. Taps past the ends multiply
// the padding's zeros, as in conv_row.
template <class V, class T>
void conv_position(const T* x_b, T* y_bt, const T* o_bt, int64_t t, const SeqView& xv,
                   const float* w, const ConvTaps& p) {
  constexpr int kW = VecTraits<V>::width;
  const int64_t C = xv.C;
  int64_t c = 0;
  for (; c + kW <= C; c += kW) {
    V acc = p.bias ? VecIo<V>::load(p.bias + c) : V(0.f);
    for (int64_t k = 0; k < p.K; ++k) {
      const int64_t i = t - p.pad + k * p.dilation;
      const V xi = (i >= 0 && i < xv.L) ? VecIo<V>::load(x_b + i * xv.st + c) : V(0.f);  // the padding's zeros
      acc = vfma(VecIo<V>::load(w + k * C + c), xi, acc);
    }
    VecIo<V>::store(y_bt + c, finish<V>(acc, p, o_bt ? o_bt + c : o_bt));
  }
  for (; c < C; ++c) {
    float acc = p.bias ? p.bias[c] : 0.f;
    for (int64_t k = 0; k < p.K; ++k) {
      const int64_t i = t - p.pad + k * p.dilation;
      acc += w[k * C + c] * ((i >= 0 && i < xv.L) ? load1(x_b + i * xv.st + c) : 0.f);
    }
    store1(y_bt + c, finish<float>(acc, p, o_bt ? o_bt + c : o_bt));
  }
}

template <class V, class T>
void conv_forward_t(const SeqView& xv, const ConvTaps& p, void* y_out, int64_t r0, int64_t r1) {
  const T* x = static_cast<const T*>(xv.data);
  T* y = static_cast<T*>(y_out);
  const T* o = static_cast<const T*>(p.other);
  for (int64_t r = r0; r < r1; ++r) {
    if (xv.channels_last()) {
      const int64_t b = r / xv.L, t = r % xv.L;
      const int64_t off = b * xv.sb + t * xv.st;
      conv_position<V>(x + b * xv.sb, y + off, o ? o + off : o, t, xv, p.w, p);
    } else {
      const int64_t b = r / xv.C, c = r % xv.C;
      const int64_t off = b * xv.sb + c * xv.sc;
      conv_row<V>(x + off, y + off, o ? o + off : o, xv.L, p.w + c * p.K,
                  p.bias ? p.bias[c] : 0.f, p);
    }
  }
}

// sum_t g[t] x[t + shift] over the t where both are inside [0, L).
template <class V, class T>
float shifted_dot(const T* g, const T* x, int64_t L, int64_t shift) {
  constexpr int kW = VecTraits<V>::width;
  const int64_t t0 = std::max<int64_t>(0, -shift), t1 = std::min<int64_t>(L, L - shift);
  V acc0 = V(0.f), acc1 = V(0.f);
  int64_t t = t0;
  for (; t + 2 * kW <= t1; t += 2 * kW) {
    acc0 = vfma(VecIo<V>::load(g + t), VecIo<V>::load(x + t + shift), acc0);
    acc1 = vfma(VecIo<V>::load(g + t + kW), VecIo<V>::load(x + t + kW + shift), acc1);
  }
  float s = hsum(acc0 + acc1);
  for (; t < t1; ++t) s += load1(g + t) * load1(x + t + shift);
  return s;
}

template <class V, class T>
float row_sum(const T* g, int64_t L) {
  constexpr int kW = VecTraits<V>::width;
  V s = V(0.f);
  int64_t t = 0;
  for (; t + kW <= L; t += kW) s += VecIo<V>::load(g + t);
  float r = hsum(s);
  for (; t < L; ++t) r += load1(g + t);
  return r;
}

template <class V, class T>
void weight_grad_t(const SeqView& xv, const SeqView& gv, const ConvTaps& p, float* gw, float* gb,
                   int64_t c0, int64_t c1) {
  constexpr int kW = VecTraits<V>::width;
  const T* x = static_cast<const T*>(xv.data);
  const T* g = static_cast<const T*>(gv.data);
  const int64_t K = p.K, L = xv.L;
  if (!xv.channels_last()) {
    for (int64_t c = c0; c < c1; ++c) {
      double bsum = 0.0;
      std::vector<double> acc(size_t(K), 0.0);  // double across the batch: long sums
      for (int64_t b = 0; b < xv.B; ++b) {
        const T* xr = x + b * xv.sb + c * xv.sc;
        const T* gr = g + b * gv.sb + c * gv.sc;
        for (int64_t k = 0; k < K; ++k) acc[size_t(k)] += shifted_dot<V>(gr, xr, L, k * p.dilation - p.pad);
        if (gb) bsum += row_sum<V>(gr, L);
      }
      for (int64_t k = 0; k < K; ++k) gw[c * K + k] = float(acc[size_t(k)]);
      if (gb) gb[c] = float(bsum);
    }
    return;
  }
  // Channels last: accumulators for the channels [c0, c1) and every tap, over all (b, t).
  const int64_t n = c1 - c0;
  std::vector<float> acc(size_t(K * n), 0.f), bacc(size_t(n), 0.f);
  for (int64_t b = 0; b < xv.B; ++b) {
    for (int64_t t = 0; t < L; ++t) {
      const T* gt = g + b * gv.sb + t * gv.st + c0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t i = t - p.pad + k * p.dilation;
        if (i < 0 || i >= L) continue;
        const T* xi = x + b * xv.sb + i * xv.st + c0;
        float* a = acc.data() + k * n;
        int64_t c = 0;
        for (; c + kW <= n; c += kW)
          VecIo<V>::store(a + c, vfma(VecIo<V>::load(gt + c), VecIo<V>::load(xi + c), VecIo<V>::load(a + c)));
        for (; c < n; ++c) a[c] += load1(gt + c) * load1(xi + c);
      }
      if (gb) {
        int64_t c = 0;
        for (; c + kW <= n; c += kW)
          VecIo<V>::store(bacc.data() + c, VecIo<V>::load(gt + c) + VecIo<V>::load(bacc.data() + c));
        for (; c < n; ++c) bacc[size_t(c)] += load1(gt + c);
      }
    }
  }
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t k = 0; k < K; ++k) gw[(c0 + c) * K + k] = acc[size_t(k * n + c)];
    if (gb) gb[c0 + c] = bacc[size_t(c)];
  }
}

#if defined(FL_ISA_VEC)
void conv_forward(const SeqView& x, const ConvTaps& p, void* y, int64_t r0, int64_t r1) {
  visit_storage(x.dtype, [&]<class T>() { conv_forward_t<FL_ISA_VEC, T>(x, p, y, r0, r1); });
}
void weight_grad(const SeqView& x, const SeqView& g, const ConvTaps& p, float* gw, float* gb,
                 int64_t c0, int64_t c1) {
  visit_storage(x.dtype, [&]<class T>() {
    weight_grad_t<FL_ISA_VEC, T>(x, g, p, gw, gb, c0, c1);
  });
}
#endif

}  // namespace FL_ISA
}  // namespace fastloss
