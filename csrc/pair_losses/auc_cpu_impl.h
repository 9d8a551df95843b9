// The CPU Mann-Whitney loss, instantiated once per instruction set (auc_cpu.cpp: float,
// auc_cpu_avx2.cpp: Vec8, auc_cpu_avx512.cpp: Vec16).
#pragma once
#include <algorithm>
#include <cstdint>

#include "../common/storage.h"
#include "../common/vec_scalar.h"
#include "auc_kernels.h"

namespace fastloss {
namespace FL_ISA {

// softplus(z) and sigmoid(z) from one exponential: u = exp(-|z|).
template <class V>
inline void softplus_sigmoid(V z, V& sp, V& sig) {
  const V u = vexp(-vabs(z));
  const V lp = vselect(u < V(1e-4f), u * (V(1.f) - V(0.5f) * u), vlog_fast(V(1.f) + u));  // log1p(u)
  sp = vmax(z, V(0.f)) + lp;
  const V r = V(1.f) / (V(1.f) + u);
  sig = vselect(z < V(0.f), u * r, r);
}

template <class V, class T>
void auc_items_t(const AucProblem& q, double* loss_part, float* grad_pos, float* neg_part,
                 int64_t part0, int64_t r0, int64_t r1) {
  constexpr int kW = VecTraits<V>::width;
  const T* pos = static_cast<const T*>(q.pos);
  const T* neg = static_cast<const T*>(q.neg);
  const int64_t blocks = (q.P + kAucBlock - 1) / kAucBlock;
  const float scale = 1.f / (float(q.P) * float(q.N));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / blocks, i0 = (r % blocks) * kAucBlock;
    const int64_t i1 = std::min(q.P, i0 + kAucBlock);
    const T* nb = neg + b * q.neg_stride;
    float* gn = neg_part ? neg_part + (r - part0) * q.N : nullptr;
    if (gn) std::fill(gn, gn + q.N, 0.f);
    double loss = 0.0;
    for (int64_t i = i0; i < i1; ++i) {
      const float pi = load1(pos + b * q.pos_stride + i);
      V vloss = V(0.f), vsig = V(0.f);
      int64_t j = 0;
      for (; j + kW <= q.N; j += kW) {
        V sp, sig;
        softplus_sigmoid(VecIo<V>::load(nb + j) - V(pi), sp, sig);
        vloss += sp;
        vsig += sig;
        if (gn) VecIo<V>::store(gn + j, vfma(sig, V(scale), VecIo<V>::load(gn + j)));
      }
      float l = hsum(vloss), s = hsum(vsig);
      for (; j < q.N; ++j) {
        float sp, sig;
        softplus_sigmoid<float>(load1(nb + j) - pi, sp, sig);
        l += sp;
        s += sig;
        if (gn) gn[j] += sig * scale;
      }
      loss += l;
      if (grad_pos) grad_pos[b * q.P + i] = -s * scale;
    }
    loss_part[r] = loss;
  }
}

#if defined(FL_ISA_VEC)
void auc(const AucProblem& q, double* loss_part, float* grad_pos, float* neg_part, int64_t part0,
         int64_t r0, int64_t r1) {
  visit_storage(q.dtype, [&]<class T>() {
    auc_items_t<FL_ISA_VEC, T>(q, loss_part, grad_pos, neg_part, part0, r0, r1);
  });
}
#endif

}  // namespace FL_ISA
}  // namespace fastloss
