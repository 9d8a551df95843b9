// The CPU kernels of the two distillation losses that depend on the teacher's order of the
// classes: top-k KL (a selection per row) and Plackett-Luce distillation (a sort per row).
// Instantiated once per instruction set next to kd_cpu_impl.h (kd_cpu*.cpp). Both form the
// loss and, when asked, the gradient in the same call: the selection or sort is the costly part
// and is not repeated.
#pragma once
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

#include "kd_cpu_impl.h"

namespace fastloss {
namespace FL_ISA {

// An order-preserving map of floats onto unsigned integers (NaN beyond +-inf, -0 equal to +0,
// as the reference's comparisons and torch's sort see them): a total order,
// which the selections and the radix sort below need (a NaN logit makes the loss NaN, never
// an out-of-range access).
inline uint32_t order_key(float f) {
  const uint32_t u = float_to_bits(f == 0.f ? 0.f : f);  // -0 and +0 tie, as in comparisons
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct KthKey {
  uint32_t key;
  int64_t greater;  // how many keys are larger than it
};

// How many of keys[0..n) are >= v: a compare and an add per key, which the compiler vectorizes
// (n < 2^32 here: rows and their samples).
inline uint32_t count_at_least(const uint32_t* keys, int64_t n, uint32_t v) {
  uint32_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += keys[i] >= v ? 1u : 0u;
  return c;
}

// The r-th largest of keys[0..n) (1 = the largest, r <= n) by bisection over the key values
// between the smallest and the largest key: at most 32 counting passes, branch-free, over
// data in L1 / L2. std::nth_element, which this replaces for the sizes top-k KL selects from
// (samples of a few hundred keys, the classes kept above a threshold, rows up to 16k classes),
// spent most of its time on mispredicted branches: 24% of top-k KL's forward at 4096 x 1000,
// k = 100, by perf (session 15).
inline KthKey kth_key_by_counting(const uint32_t* keys, int64_t n, int64_t r) {
  uint32_t lo = UINT32_MAX, hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, keys[i]);
    hi = std::max(hi, keys[i]);
  }
  // invariant: count(keys >= lo) >= r, and the answer is in [lo, hi]
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2 + 1;  // in (lo, hi]
    if (int64_t(count_at_least(keys, n, mid)) >= r) lo = mid;
    else hi = mid - 1;
  }
  return {lo, lo == UINT32_MAX ? 0 : int64_t(count_at_least(keys, n, lo + 1))};
}

// The k-th largest key of row[0..C) (1 <= k <= C) and how many keys are larger; keys[j] =
// order_key(row[j]) on return. Rows up to 16k classes: counting bisection over the keys. Longer
// rows (k above C / 8, or a sample that misled: rare) first find the bin of the keys' top 12
// bits that holds the k-th with a histogram, then bisect within that bin's keys, copied to `bin`
// (a few hundred for k = 1000 of 128k logits; the whole row only when the values crowd into
// one bin): 32 passes over 128k keys would leave L1. keys, bin: scratch of C entries each.
template <class T>
KthKey kth_largest_key(const T* row, int64_t C, int64_t k, uint32_t* keys, uint32_t* bin) {
  if (C <= 16384) {
    for (int64_t j = 0; j < C; ++j) keys[j] = order_key(load1(row + j));
    return kth_key_by_counting(keys, C, k);
  }
  constexpr int kBits = 12;
  std::vector<int64_t> hist(int64_t(1) << kBits, 0);
  for (int64_t j = 0; j < C; ++j) ++hist[(keys[j] = order_key(load1(row + j))) >> (32 - kBits)];
  int64_t above = 0;  // keys in the bins above b
  uint32_t b = (1u << kBits) - 1;
  for (; above + hist[b] < k; --b) above += hist[b];
  int64_t n = 0;
  for (int64_t j = 0; j < C; ++j)
    if ((keys[j] >> (32 - kBits)) == b) bin[n++] = keys[j];
  const KthKey in_bin = kth_key_by_counting(bin, n, k - above);
  return {in_bin.key, above + in_bin.greater};
}

// idx[0..k) = the classes cls(i) of the keys above the k-th largest `kth` (kth.greater of them)
// and of the first ties at it, classes ascending with i: ties go to the lower class.
template <class Cls>
void collect_top_k(const uint32_t* keys, int64_t n, KthKey kth, int64_t k, Cls cls, int64_t* idx) {
  int64_t m = 0, ties = kth.greater;  // the larger keys fill idx[0..greater), ties the rest
  for (int64_t i = 0; i < n; ++i) {
    if (keys[i] > kth.key) idx[m++] = cls(i);
    else if (keys[i] == kth.key && ties < k) idx[ties++] = cls(i);
  }
}

// The k largest of a candidate list (keys[i] of class cls[i], classes ascending) into idx,
// ties at the k-th key going to the lower class.
inline void top_k_of(const uint32_t* keys, const int64_t* cls, int64_t n, int64_t k, int64_t* idx) {
  collect_top_k(keys, n, kth_key_by_counting(keys, n, k), k, [&](int64_t i) { return cls[i]; }, idx);
}

// Rows of 512+ classes, k well below C: a threshold from a sample of the row, one vector pass that
// keeps the classes at or above it (a compare and a lane mask per vector; a few thousand of
// 128k survive), then the exact selection among those. The histogram path below made three
// scalar passes over every class (a key, a histogram bin, a compare) and was most of top-k KL's
// time at C = 128k. The sample (min(1024, C / 4) logits at a fixed stride) puts the threshold
// where about 1.25 k + 24 C / samples classes pass (its rank r: some 8 standard deviations of
// the sample's count above the k-th value); when fewer than k pass (a sample far off the row's
// distribution) or the threshold is NaN, it returns false and the histogram path runs.
// keys, cls, bin: scratch of C entries each.
template <class V, class T>
bool top_k_by_sample(const T* row, int64_t C, int64_t k, uint32_t* keys, int64_t* cls, uint32_t* bin,
                     int64_t* idx) {
  constexpr int kW = VecTraits<V>::width;
  const int64_t samples = std::min<int64_t>(1024, C / 4), stride = C / samples;  // >= 128, >= 4
  for (int64_t i = 0; i < samples; ++i) bin[i] = order_key(load1(row + i * stride));
  const int64_t r = std::min<int64_t>(samples, k * samples / C * 5 / 4 + 24);  // 1 = the largest
  const uint32_t kappa = kth_key_by_counting(bin, samples, r).key;
  float tau = 0.f;
  {
    const uint32_t u = kappa & 0x80000000u ? kappa & 0x7fffffffu : ~kappa;  // order_key inverted
    tau = bits_to_float(u);
    if (tau != tau) return false;  // a NaN threshold: leave NaN rows to the histogram path
  }
  // keep v >= tau, and NaN (above every float when positive; the key test below drops -NaN)
  int64_t n = 0;
  auto keep = [&](int64_t j) {
    const uint32_t key = order_key(load1(row + j));
    if (key >= kappa) {
      keys[n] = key;
      cls[n++] = j;
    }
  };
  int64_t j = 0;
  for (; j + kW <= C; j += kW) {
    unsigned bits = ~lane_bits(VecIo<V>::load(row + j) < V(tau)) & ((1u << kW) - 1u);
    for (; bits != 0; bits &= bits - 1) keep(j + __builtin_ctz(bits));
  }
  for (; j < C; ++j) keep(j);
  if (n < k) return false;
  top_k_of(keys, cls, n, k, idx);
  return true;
}

// idx[0..k) = the classes of the k largest values of row[0..C), ties at the k-th value going
// to the lower class index (in no particular order: the losses sum over the set). keys, cls,
// bin: scratch of C entries each. Rows of 512 classes or more with k <= C / 8 take the sampled
// threshold; the rest kth_largest_key over the whole row, then a pass collecting the classes.
template <class V, class T>
void top_k_classes(const T* row, int64_t C, int64_t k, uint32_t* keys, int64_t* cls, uint32_t* bin,
                   int64_t* idx) {
  if (k >= C) {
    std::iota(idx, idx + C, int64_t(0));
    return;
  }
  if (C >= 512 && k <= C / 8 && top_k_by_sample<V>(row, C, k, keys, cls, bin, idx)) return;
  collect_top_k(keys, C, kth_largest_key(row, C, k, keys, bin), k, [](int64_t j) { return j; }, idx);
}

// A least-significant-digit radix sort of a[0..n) by the high 32 bits in digits of Bits bits
// (stable: equal keys keep their order). Every digit's histogram is counted in one sweep, and
// a pass is skipped when every key shares its digit. Returns where the sorted words are.
template <int Bits>
uint64_t* radix_by_high_word(uint64_t* a, uint64_t* tmp, int64_t n) {
  constexpr int kPasses = (32 + Bits - 1) / Bits, kBuckets = 1 << Bits;
  std::vector<int64_t> count(size_t(kPasses) * kBuckets, 0);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = uint32_t(a[i] >> 32);
    for (int d = 0; d < kPasses; ++d) ++count[d * kBuckets + ((key >> (Bits * d)) & (kBuckets - 1))];
  }
  uint64_t *src = a, *dst = tmp;
  for (int d = 0; d < kPasses; ++d) {
    int64_t* start = count.data() + d * kBuckets;
    const int shift = 32 + Bits * d;
    if (start[(src[0] >> shift) & (kBuckets - 1)] == n) continue;  // one digit: already in order
    int64_t sum = 0;
    for (int b = 0; b < kBuckets; ++b) sum += std::exchange(start[b], sum);
    for (int64_t i = 0; i < n; ++i) dst[start[(src[i] >> shift) & (kBuckets - 1)]++] = src[i];
    std::swap(src, dst);
  }
  return src;
}

// Sorts a[0..n) by the high 32 bits, keeping the order of equal keys: three 11-bit passes, four
// 8-bit ones under 1024 words (smaller histograms; std::sort had been 38% of pld_loss's time at
// 4096 x 1000), std::sort of the whole words under 64 (the same order when the low words
// ascend). Returns where the sorted words are: a or tmp.
inline uint64_t* sort_by_high_word(uint64_t* a, uint64_t* tmp, int64_t n) {
  if (n < 64) {
    std::sort(a, a + n);
    return a;
  }
  return n < 1024 ? radix_by_high_word<8>(a, tmp, n) : radix_by_high_word<11>(a, tmp, n);
}

// max over row[0..C) of row[k] * scale
template <class V, class T>
float row_max(const T* row, int64_t C, float scale) {
  constexpr int kW = VecTraits<V>::width;
  V vm = V(kKdLowest);
  float m = kKdLowest;
  int64_t k = 0;
  for (; k + kW <= C; k += kW) vm = vmax(vm, VecIo<V>::load(row + k) * V(scale));
  for (; k < C; ++k) m = vmax(m, load1(row + k) * scale);
  return vmax(m, hmax(vm));
}

// Sum over i < n of f(i) for a vector body f(V-lane offset) -> V and its scalar tail g(i) -> float.
template <class V, class F, class G>
float vsum_over(int64_t n, F&& f, G&& g) {
  constexpr int kW = VecTraits<V>::width;
  V acc = V(0.f);
  float tail = 0.f;
  int64_t i = 0;
  for (; i + kW <= n; i += kW) acc += f(i);
  for (; i < n; ++i) tail += g(i);
  return tail + hsum(acc);
}

template <class V, class T>
void topk_kl_rows(const TopkKlProblem& q, float* loss, void* grad_out, int64_t r0, int64_t r1) {
  constexpr int kW = VecTraits<V>::width;
  using Io = VecIo<V>;
  const int64_t C = q.C, k = std::min(q.k, q.C);
  const float T_ = q.temperature, inv_t = 1.f / T_;
  std::vector<uint32_t> keys(C), bin(C);
  std::vector<int64_t> idx(k), cls(C);
  // the selected classes' scaled logits, gathered once, so that the loops over I are vector
  // loops (k = 1000 scalar exps per row, four times over, cost as much as the selection)
  std::vector<float> s_sel(k), t_sel(k), g_sel(k);
  for (int64_t r = r0; r < r1; ++r) {
    const T* sr = static_cast<const T*>(q.student) + r * q.s_stride;
    const T* tr = static_cast<const T*>(q.teacher) + r * q.t_stride;
    top_k_classes<V>(tr, C, k, keys.data(), cls.data(), bin.data(), idx.data());
    float* si = s_sel.data();
    float* ti = t_sel.data();
    for (int64_t i = 0; i < k; ++i) {
      si[i] = unmask(load1(sr + idx[i]) * inv_t);  // (masked classes: kd_cpu_impl.h)
      ti[i] = unmask(load1(tr + idx[i]) * inv_t);
    }
    // log-normalizers of s = student / T and t = teacher / T: over I, or over every class
    float lse_s, lse_t;
    if (q.renormalize) {
      const float ms = row_max<V>(si, k, 1.f), mt = row_max<V>(ti, k, 1.f);
      lse_s = ms + std::log(vsum_over<V>(
                       k, [&](int64_t i) { return vexp(Io::load(si + i) - V(ms)); },
                       [&](int64_t i) { return vexp(si[i] - ms); }));
      lse_t = mt + std::log(vsum_over<V>(
                       k, [&](int64_t i) { return vexp(Io::load(ti + i) - V(mt)); },
                       [&](int64_t i) { return vexp(ti[i] - mt); }));
    } else {
      float ms, mt;
      pair_max<V>(sr, tr, C, inv_t, ms, mt);
      V vzs = V(0.f), vzt = V(0.f);
      float zs = 0.f, zt = 0.f;
      sweep<V>(sr, tr, C, inv_t,
               [&](V s, V t, int64_t) { vzs += vexp(s - V(ms)); vzt += vexp(t - V(mt)); },
               [&](float s, float t, int64_t) { zs += vexp(s - ms); zt += vexp(t - mt); });
      lse_s = ms + std::log(zs + hsum(vzs));
      lse_t = mt + std::log(zt + hsum(vzt));
    }
    // a row with every class (of I, renormalized) masked has no distribution: NaN
    if (all_masked(lse_s) || all_masked(lse_t)) {
      loss[r] = NAN;
      if (grad_out != nullptr)
        for (int64_t m = 0; m < C; ++m) store1(static_cast<T*>(grad_out) + r * C + m, NAN);
      continue;
    }
    // the KL terms over I, and the teacher's mass on I (q_j kept in g_sel for the gradient)
    float* gi = g_sel.data();
    const float mass = vsum_over<V>(
        k,
        [&](int64_t i) {
          const V qv = vexp(Io::load(ti + i) - V(lse_t));
          Io::store(gi + i, qv);
          return qv;
        },
        [&](int64_t i) { return gi[i] = vexp(ti[i] - lse_t); });
    const float kl = vsum_over<V>(
        k, [&](int64_t i) { return Io::load(gi + i) * ((Io::load(ti + i) - V(lse_t)) - (Io::load(si + i) - V(lse_s))); },
        [&](int64_t i) { return gi[i] * ((ti[i] - lse_t) - (si[i] - lse_s)); });
    loss[r] = T_ * T_ * kl;
    if (grad_out == nullptr) continue;
    // d(T^2 kl)/d student_m = T (c p_m - [m in I] q_m), c = mass (every class sees lse_s) or
    // 1 and only m in I (renormalized); written times grad_scale (gT)
    T* gr = static_cast<T*>(grad_out) + r * C;
    const float c = q.renormalize ? 1.f : mass, gT = q.grad_scale * T_;
    if (q.renormalize) {
      std::memset(static_cast<void*>(gr), 0, sizeof(T) * C);
    } else {
      const float tc = gT * c;
      int64_t m = 0;
      for (; m + kW <= C; m += kW)
        Io::store(gr + m, V(tc) * vexp(Io::load(sr + m) * V(inv_t) - V(lse_s)));
      for (; m < C; ++m) store1(gr + m, tc * vexp(load1(sr + m) * inv_t - lse_s));
    }
    int64_t i = 0;  // the classes of I: T (c p - q), formed in g_sel, then scattered
    for (; i + kW <= k; i += kW)
      Io::store(gi + i, V(gT) * (V(c) * vexp(Io::load(si + i) - V(lse_s)) - Io::load(gi + i)));
    for (; i < k; ++i) gi[i] = gT * (c * vexp(si[i] - lse_s) - gi[i]);
    for (i = 0; i < k; ++i) store1(gr + idx[i], gi[i]);
  }
}

// One PLD row (scratch arrays of C floats each: w, wk, s, l; and 2 C words for the sort).
struct PldScratch {
  std::vector<float> w, wk, s, l;
  std::vector<uint64_t> words, tmp;
  explicit PldScratch(int64_t C) : w(C), wk(C), s(C), l(C), words(C), tmp(C) {}
};

template <class V, class T>
float pld_row(const PldProblem& q, const T* sr, const T* tr, int64_t y, T* gr, PldScratch& b) {
  constexpr int kW = VecTraits<V>::width;
  const int64_t C = q.C;
  const float inv_t = 1.f / q.temperature;
  float* w = b.w.data();
  float* wk = b.wk.data();
  float* s = b.s.data();
  float* l = b.l.data();
  // teacher weights softmax(teacher / T), unnormalized, in class order
  const float mt = row_max<V>(tr, C, inv_t);
  V vz = V(0.f);
  float z = 0.f;
  int64_t j = 0;
  for (; j + kW <= C; j += kW) {
    const V e = vexp(VecIo<V>::load(tr + j) * V(inv_t) - V(mt));
    VecIo<V>::store(w + j, e);
    vz += e;
  }
  for (; j < C; ++j) z += (w[j] = vexp(load1(tr + j) * inv_t - mt));
  const float inv_z = 1.f / (z + hsum(vz));
  // the ranking: y, then the others by descending teacher logit (ascending inverted key), ties
  // by class index (the low word)
  int64_t n = 0;
  for (j = 0; j < C; ++j)
    if (j != y) b.words[n++] = (uint64_t(~order_key(load1(tr + j))) << 32) | uint64_t(j);
  const uint64_t* order = sort_by_high_word(b.words.data(), b.tmp.data(), n);
  auto cls = [&](int64_t k) { return k == 0 ? y : int64_t(uint32_t(order[k - 1])); };
  for (int64_t k = 0; k < C; ++k) {
    const int64_t c = cls(k);
    s[k] = unmask(load1(sr + c));  // (masked classes: kd_cpu_impl.h; their weight is 0 if the
    wk[k] = w[c] * inv_z;          // teacher masks them too, so their terms are 0, not NaN)
  }
  // suffix log-sum-exps l[k] = logsumexp(s[k..C)): the running maxima (into w, free now), the
  // scaled suffix sums, then the logarithms
  float* mx = w;
  mx[C - 1] = s[C - 1];
  for (int64_t k = C - 2; k >= 0; --k) mx[k] = vmax(mx[k + 1], s[k]);
  int64_t k = 0;
  for (; k + kW <= C; k += kW)
    VecIo<V>::store(l + k, vexp(VecIo<V>::load(s + k) - VecIo<V>::load(mx + k)));
  for (; k < C; ++k) l[k] = vexp(s[k] - mx[k]);
  for (k = C - 2; k >= 0; --k)  // the maximum changes rarely: rescale only then
    l[k] += mx[k + 1] == mx[k] ? l[k + 1] : l[k + 1] * vexp(mx[k + 1] - mx[k]);
  V vloss = V(0.f);
  float row = 0.f;
  for (k = 0; k + kW <= C; k += kW) {
    const V lk = VecIo<V>::load(mx + k) + vlog_fast(VecIo<V>::load(l + k));
    VecIo<V>::store(l + k, lk);
    vloss = vfma(VecIo<V>::load(wk + k), lk - VecIo<V>::load(s + k), vloss);
  }
  for (; k < C; ++k) {
    l[k] = mx[k] + std::log(l[k]);
    row += wk[k] * (l[k] - s[k]);
  }
  row += hsum(vloss);
  if (gr == nullptr) return row;
  // d row / d s_k = sum_{j <= k} wk_j e^{s_k - l_j} - wk_k = B_k e^{s_k - l_k} - wk_k with
  // B_k = sum_{j <= k} wk_j e^{l_k - l_j} = B_{k-1} e^{l_k - l_{k-1}} + wk_k (each factor <= 1)
  float* bk = mx;
  bk[0] = wk[0];
  for (k = 1; k + kW <= C; k += kW)
    VecIo<V>::store(bk + k, vexp(VecIo<V>::load(l + k) - VecIo<V>::load(l + k - 1)));
  for (; k < C; ++k) bk[k] = vexp(l[k] - l[k - 1]);
  for (k = 1; k < C; ++k) bk[k] = vfma(bk[k - 1], bk[k], wk[k]);
  const float gs = q.grad_scale;
  for (k = 0; k + kW <= C; k += kW) {
    const V g = VecIo<V>::load(bk + k) * vexp(VecIo<V>::load(s + k) - VecIo<V>::load(l + k)) -
                VecIo<V>::load(wk + k);
    VecIo<V>::store(s + k, V(gs) * g);
  }
  for (; k < C; ++k) s[k] = gs * (bk[k] * vexp(s[k] - l[k]) - wk[k]);
  for (k = 0; k < C; ++k) store1(gr + cls(k), s[k]);
  return row;
}

template <class V, class T>
void pld_rows(const PldProblem& q, float* loss, void* grad_out, int64_t r0, int64_t r1) {
  PldScratch scratch(q.C);
  for (int64_t r = r0; r < r1; ++r) {
    const T* sr = static_cast<const T*>(q.student) + r * q.s_stride;
    const T* tr = static_cast<const T*>(q.teacher) + r * q.t_stride;
    T* gr = grad_out == nullptr ? nullptr : static_cast<T*>(grad_out) + r * q.C;
    const int64_t y = q.target[r];
    if (y == q.ignore_index) {
      loss[r] = 0.f;
      if (gr != nullptr) std::memset(static_cast<void*>(gr), 0, sizeof(T) * q.C);
      continue;
    }
    loss[r] = pld_row<V>(q, sr, tr, y, gr, scratch);
  }
}

#if defined(FL_ISA_VEC)
void topk_kl(const TopkKlProblem& q, float* loss, void* grad, int64_t r0, int64_t r1) {
  visit_storage(q.dtype, [&]<class T>() { topk_kl_rows<FL_ISA_VEC, T>(q, loss, grad, r0, r1); });
}
void pld(const PldProblem& q, float* loss, void* grad, int64_t r0, int64_t r1) {
  visit_storage(q.dtype, [&]<class T>() { pld_rows<FL_ISA_VEC, T>(q, loss, grad, r0, r1); });
}
#endif

}  // namespace FL_ISA
}  // namespace fastloss
