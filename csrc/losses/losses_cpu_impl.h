// The CPU row-loss drivers, instantiated once per instruction set: losses_cpu.cpp includes
// this with V = float (generic x86-64 / any CPU), losses_cpu_avx2.cpp with V = Vec8.
// One row at a time: the forward reads it once per pass (ALDR takes two passes), the
// backward reads it once and writes the gradient once.
#pragma once
#include <cstdint>
#include <type_traits>

#include "../common/prefetch.h"
#include "../common/storage.h"
#include "loss_math.h"
#include "loss_params.h"

namespace fastloss {
namespace FL_ISA {

// Fold the lanes of a vector accumulator into a scalar one. Accumulators are structs whose
// members are all V, so lane l of every member forms one Acc<float>.
template <class L, class V>
void merge_lanes(typename L::template Acc<float>& total, const typename L::template Acc<V>& va) {
  constexpr int kMembers = int(sizeof(va) / sizeof(V));
  constexpr int kWidth = VecTraits<V>::width;
  float lanes[kMembers][kWidth];
  const V* members = reinterpret_cast<const V*>(&va);
  for (int m = 0; m < kMembers; ++m) VecIo<V>::lanes(members[m], lanes[m]);
  for (int l = 0; l < kWidth; ++l) {
    typename L::template Acc<float> a;
    float* f = reinterpret_cast<float*>(&a);
    for (int m = 0; m < kMembers; ++m) f[m] = lanes[m][l];
    L::merge(total, a);
  }
}

// f(j, u) for each whole vector at j < body (a multiple of the width), u alternating 0, 1: the
// sweeps below keep two accumulators, as with one every vector's max / add would wait on the
// previous one's latency.
template <class V, class F>
void over_vectors2(int body, F&& f) {
  constexpr int kWidth = VecTraits<V>::width;
  int j = 0;
  for (; j + 2 * kWidth <= body; j += 2 * kWidth) {
    f(j, 0);
    f(j + kWidth, 1);
  }
  if (j < body) f(j, 0);
}

// max and sum of exp(x - max) over n <= kChunk logits taken as they are (no soft-cap, no
// affine map, no class left out): two sweeps over the logits themselves, whose second reads
// them from L1; the tail as one vector padded with -inf (tail: scratch of one vector).
template <class V, class T>
SoftmaxAcc<float> plain_lse_chunk(const T* x, int n, float* tail, const T* ahead) {
  constexpr int kWidth = VecTraits<V>::width;
  const int body = n / kWidth * kWidth, rem = n - body;
  for (int i = 0; i < kWidth; ++i) tail[i] = i < rem ? load1(x + body + i) : -__builtin_inff();
  V vmax_a[2] = {V(kLowest), V(kLowest)};
  over_vectors2<V>(body, [&](int j, int u) {
    if (ahead) __builtin_prefetch(ahead + j);
    vmax_a[u] = vmax(vmax_a[u], VecIo<V>::load(x + j));
  });
  if (ahead && rem) __builtin_prefetch(ahead + body);
  if (rem) vmax_a[1] = vmax(vmax_a[1], VecIo<V>::load(tail));
  const float m = hmax(vmax(vmax_a[0], vmax_a[1]));
  const V vm = V(m);
  V vs[2] = {V(0.f), V(0.f)};
  over_vectors2<V>(body, [&](int j, int u) { vs[u] += vexp(VecIo<V>::load(x + j) - vm); });
  if (rem) vs[1] += vexp(VecIo<V>::load(tail) - vm);
  return {m, hsum(vs[0] + vs[1]), 0.f, 0.f};
}

// The softmax family's log-sum-exp over a row's classes k != y, in chunks that stay in L1:
// a first sweep transforms the chunk into a buffer (soft-cap, a = alpha z + beta, float32),
// the target's slot and the padding after the chunk are set to -inf (exp gives 0 whatever
// the maximum, so the exponentials are all whole vectors), a second sweep takes the maximum,
// a third sums exp(a - max) (and, for ALDR's first pass, exp(a - max) (a - max)). One
// exponential per element and no rescaling inside the loop, where the online form (the CUDA
// kernels') needs two; the row is not split at y (two short spans cost their per-span work
// twice, and their scalar tails). t = sum_k w_k z_k (label smoothing) is summed over the
// whole chunk and the target's term taken off again.
// total is overwritten; y < 0: no class is left out.
template <class V, class T>
void softmax_row(SoftmaxAcc<float>& total, const T* x, const float* w, int64_t n, int64_t y,
                 const SoftmaxCtx& c, const T* ahead = nullptr) {
  constexpr int kWidth = VecTraits<V>::width;
  constexpr int kChunk = 2048;
  static_assert(kChunk % kWidth == 0, "the padded tail must fit the buffer");
  alignas(64) float buf[kChunk];
  const bool affine = c.alpha != 1.f || c.beta != 0.f;
  const auto transform = [&](auto z) { return affine ? decltype(z)(c.alpha) * z + decltype(z)(c.beta) : z; };
  // Plain logits (cross-entropy and comp-sum without options): no buffer to fill.
  const bool plain = y < 0 && !affine && c.cap <= 0.f && !c.linear && !c.entropy;
  for (int64_t base = 0; base < n; base += kChunk) {
    const int len = int(n - base < kChunk ? n - base : kChunk);
    const T* xc = x + base;
    SoftmaxAcc<float> part;
    if (plain) {
      part = plain_lse_chunk<V>(xc, len, buf, ahead ? ahead + base : nullptr);
    } else {
      V vt[2] = {V(0.f), V(0.f)};
      const int body = len / kWidth * kWidth;
      over_vectors2<V>(body, [&](int k, int u) {
        if (ahead) __builtin_prefetch(ahead + base + k);
        const V z = softcap_apply(VecIo<V>::load(xc + k), c);
        if (c.linear) vt[u] += (w ? VecIo<V>::load(w + base + k) : V(1.f)) * z;
        VecIo<V>::store(buf + k, transform(z));
      });
      float t = hsum(vt[0] + vt[1]);
      for (int k = body; k < len; ++k) {
        const float z = softcap_apply(load1(xc + k), c);
        if (c.linear) t += (w ? w[base + k] : 1.f) * z;
        buf[k] = transform(z);
      }
      const int padded = (len + kWidth - 1) / kWidth * kWidth;
      for (int k = len; k < padded; ++k) buf[k] = -__builtin_inff();
      if (y >= base && y < base + len) {
        buf[y - base] = -__builtin_inff();
        if (c.linear) t -= (w ? w[y] : 1.f) * softcap_apply(load1(x + y), c);
      }
      V vmax_a[2] = {V(kLowest), V(kLowest)};  // kLowest: a chunk of -inf gives exp(-inf) = 0
      over_vectors2<V>(padded, [&](int j, int u) { vmax_a[u] = vmax(vmax_a[u], VecIo<V>::load(buf + j)); });
      const float m = hmax(vmax(vmax_a[0], vmax_a[1]));
      V vs[2] = {V(0.f), V(0.f)}, ve[2] = {V(0.f), V(0.f)};
      const V vm = V(m);
      if (c.entropy) {  // also sum p (a - m), for ALDR's KL(p || uniform)
        over_vectors2<V>(padded, [&](int j, int u) {
          const V d = vmax(VecIo<V>::load(buf + j) - vm, V(-1e30f));  // masked: 0 * -1e30, not NaN
          const V p = vexp(d);
          vs[u] += p;
          ve[u] += p * d;
        });
      } else {
        over_vectors2<V>(padded, [&](int j, int u) { vs[u] += vexp(VecIo<V>::load(buf + j) - vm); });
      }
      part = {m, hsum(vs[0] + vs[1]), hsum(ve[0] + ve[1]), t};
    }
    if (base == 0)
      total = part;  // (a merge into the empty start costs two exponentials per row)
    else
      SoftmaxFamilyBase::merge(total, part);
  }
}

// Accumulate elements [begin, end) of one row (the target column is never inside): the
// losses outside the softmax family.
template <class L, class V, class T>
void accumulate_range(const T* x, const float* w, int64_t begin, int64_t end,
                      const typename L::Ctx& ctx, typename L::template Acc<float>& total) {
  constexpr int kWidth = VecTraits<V>::width;
  int64_t k = begin;
  if (kWidth > 1 && end - begin >= kWidth) {
    typename L::template Acc<V> va;
    L::init(va);
    for (; k + kWidth <= end; k += kWidth)
      L::add(va, VecIo<V>::load(x + k), w ? VecIo<V>::load(w + k) : V(1.f), ctx);
    merge_lanes<L, V>(total, va);
  }
  typename L::template Acc<float> tail;
  L::init(tail);
  for (; k < end; ++k) L::add(tail, load1(x + k), w ? w[k] : 1.f, ctx);
  L::merge(total, tail);
}

// Row r's lines asked for ahead of its turn (common/prefetch.h: short rows only).
template <class T>
inline void prefetch_row(const void* base, int64_t row_stride, int64_t cols, int64_t r) {
  prefetch_row_bytes(static_cast<const T*>(base) + r * row_stride, cols * int64_t(sizeof(T)));
}

// Returns -1, or the first row whose target is neither a class nor ignore_index.
template <class L, class V, class T>
int64_t forward_rows(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                     const RowStats& out, int64_t r0, int64_t r1) {
  const int64_t C = lv.cols;
  constexpr bool kSoftmax = std::is_base_of_v<SoftmaxFamilyBase, L>;
  const bool short_rows = C * int64_t(sizeof(T)) <= kPrefetchRowBytes;
  for (int64_t r = r0; r < r1; ++r) {
    // the softmax family asks for the next row's lines one by one while it sweeps this one
    // (softmax_row's ahead), the others for the whole next row here
    const T* next = kSoftmax && short_rows && r + 1 < r1
                        ? static_cast<const T*>(lv.data) + (r + 1) * lv.row_stride
                        : nullptr;
    if (!kSoftmax && r + 1 < r1) prefetch_row<T>(lv.data, lv.row_stride, C, r + 1);
    const int64_t y = rt.target[r];
    if (y == p.ignore_index) {
      out.loss[r] = out.stat0[r] = out.stat1[r] = 0.f;
      continue;
    }
    if (y < 0 || y >= C) return r;
    const T* x = static_cast<const T*>(lv.data) + r * lv.row_stride;
    const float x_y = load1(x + y);
    const float w_y = rt.weight ? rt.weight[y] : 1.f;
    typename L::template Acc<float> acc;
    L::init(acc);
    typename L::Ctx ctx{};
    for (int pass = 0; pass < L::passes(p); ++pass) {
      ctx = L::make_ctx(p, pass, acc, x_y, C);
      typename L::template Acc<float> total;
      L::init(total);
      if constexpr (std::is_base_of_v<SoftmaxFamilyBase, L>) {
        // Without an offset (beta = 0) the target's a_y = alpha z_y is formed like every
        // other class's, so it stays in the sums instead of being added on its own; not with
        // a soft-cap, whose vector tanh differs from the scalar one finish() and make_bwd()
        // take z_y from by a few ulp (a confident row's loss would come out below 0).
        const bool fold_target = ctx.beta == 0.f && ctx.cap <= 0.f;
        softmax_row<V>(total, x, rt.weight, C, fold_target ? -1 : y, ctx, next);
        if (!fold_target) L::add_target(total, x_y, w_y, ctx);
      } else {
        accumulate_range<L, V>(x, rt.weight, 0, y, ctx, total);
        accumulate_range<L, V>(x, rt.weight, y + 1, C, ctx, total);
        L::add_target(total, x_y, w_y, ctx);
      }
      acc = total;
    }
    const RowResult res = L::finish(acc, ctx, p, x_y, w_y, C);
    out.loss[r] = res.loss;
    out.stat0[r] = res.stat0;
    out.stat1[r] = res.stat1;
  }
  return -1;
}

template <class L, class V, class T>
void backward_rows(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                   const RowGrad& g, int64_t r0, int64_t r1) {
  constexpr int kWidth = VecTraits<V>::width;
  const int64_t C = lv.cols;
  const float* w = rt.weight;
  const bool short_rows = C * int64_t(sizeof(T)) <= kPrefetchRowBytes;
  const bool apart = g.grad_logits != lv.data;  // (in place: the gradient's row is the logits')
  for (int64_t r = r0; r < r1; ++r) {
    // the next row's lines (logits, and gradient for writing) asked for one vector at a time
    // while this row is swept, as the forward's (forward_rows)
    const bool ahead = short_rows && r + 1 < r1;
    T* out = static_cast<T*>(g.grad_logits) + r * g.grad_row_stride;
    const T* x_next = ahead ? static_cast<const T*>(lv.data) + (r + 1) * lv.row_stride : nullptr;
    const T* out_next = ahead ? out + g.grad_row_stride : nullptr;
    const int64_t y = rt.target[r];
    // ignore_index may itself be a class index, so it is tested first; an out-of-range
    // target was refused by the forward, and gets NaN here rather than a wild read.
    if (y == p.ignore_index || y < 0 || y >= C) {
      const float fill = y == p.ignore_index ? 0.f : __builtin_nanf("");
      for (int64_t k = 0; k < C; ++k) store1(out + k, fill);
      continue;
    }
    const T* x = static_cast<const T*>(lv.data) + r * lv.row_stride;
    const float x_y = load1(x + y);
    const float w_y = w ? w[y] : 1.f;
    const auto b = L::make_bwd(p, g.grad_loss[r], g.stat0[r], g.stat1[r], x_y, w_y, C);
    int64_t k = 0;
    for (; k + kWidth <= C; k += kWidth) {
      if (ahead) {
        __builtin_prefetch(x_next + k);
        if (apart) __builtin_prefetch(out_next + k, 1);
      }
      const V wk = w ? VecIo<V>::load(w + k) : V(1.f);
      VecIo<V>::store(out + k, family_grad(VecIo<V>::load(x + k), wk, b));
    }
    if constexpr (kWidth > 1) {  // the tail as one vector too (a scalar exp per element costs more)
      const int rem = int(C - k);
      if (rem > 0) {
        alignas(64) float xt[kWidth], wt[kWidth], gt[kWidth];
        for (int i = 0; i < kWidth; ++i) {
          xt[i] = i < rem ? load1(x + k + i) : 0.f;
          wt[i] = i < rem && w ? w[k + i] : 1.f;
        }
        VecIo<V>::store(gt, family_grad(VecIo<V>::load(xt), VecIo<V>::load(wt), b));
        for (int i = 0; i < rem; ++i) store1(out + k + i, gt[i]);
      }
    } else {
      for (; k < C; ++k) store1(out + k, family_grad(load1(x + k), w ? w[k] : 1.f, b));
    }
    store1(out + y, b.target_grad);
  }
}

// Forward and backward of each row back to back: the backward reads the row from cache.
template <class L, class V, class T>
int64_t forward_backward_rows(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                              const RowStats& out, const RowGrad& g, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    if (r + 1 < r1) prefetch_row<T>(lv.data, lv.row_stride, lv.cols, r + 1);
    const int64_t bad = forward_rows<L, V, T>(lv, rt, p, out, r, r + 1);
    if (bad >= 0) return bad;
    backward_rows<L, V, T>(lv, rt, p, g, r, r + 1);
  }
  return -1;
}

// Stores n floats as storage type t with the kernels' own conversions (vector body, scalar
// tail); tests compare the result bit for bit with torch's conversions.
template <class V>
void store_floats_isa(const float* in, void* out, int64_t n, ScalarType t) {
  visit_storage(t, [&]<class T>() {
    T* o = static_cast<T*>(out);
    constexpr int kWidth = VecTraits<V>::width;
    int64_t k = 0;
    for (; k + kWidth <= n; k += kWidth) VecIo<V>::store(o + k, VecIo<V>::load(in + k));
    for (; k < n; ++k) store1(o + k, in[k]);
  });
}

template <class V>
int64_t forward_cpu_isa(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                        const RowStats& out, int64_t r0, int64_t r1) {
  return visit_loss(p.kind, [&]<class L>() {
    return visit_storage(lv.dtype, [&]<class T>() { return forward_rows<L, V, T>(lv, rt, p, out, r0, r1); });
  });
}

template <class V>
void backward_cpu_isa(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                      const RowGrad& g, int64_t r0, int64_t r1) {
  visit_loss(p.kind, [&]<class L>() {
    visit_storage(lv.dtype, [&]<class T>() { backward_rows<L, V, T>(lv, rt, p, g, r0, r1); });
  });
}

template <class V>
int64_t forward_backward_cpu_isa(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                                 const RowStats& out, const RowGrad& g, int64_t r0, int64_t r1) {
  return visit_loss(p.kind, [&]<class L>() {
    return visit_storage(lv.dtype, [&]<class T>() {
      return forward_backward_rows<L, V, T>(lv, rt, p, out, g, r0, r1);
    });
  });
}

// The entry points of one instruction set's file (declared in losses_cpu.cpp): a file
// defines FL_ISA_VEC as its vector type before including this header.
#if defined(FL_ISA_VEC)
int64_t forward_cpu(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                    const RowStats& out, int64_t r0, int64_t r1) {
  return forward_cpu_isa<FL_ISA_VEC>(lv, rt, p, out, r0, r1);
}
void backward_cpu(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                  const RowGrad& g, int64_t r0, int64_t r1) {
  backward_cpu_isa<FL_ISA_VEC>(lv, rt, p, g, r0, r1);
}
int64_t forward_backward_cpu(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                             const RowStats& out, const RowGrad& g, int64_t r0, int64_t r1) {
  return forward_backward_cpu_isa<FL_ISA_VEC>(lv, rt, p, out, g, r0, r1);
}
void store_floats(const float* in, void* out, int64_t n, ScalarType t) {
  store_floats_isa<FL_ISA_VEC>(in, out, n, t);
}
#endif

}  // namespace FL_ISA
}  // namespace fastloss
