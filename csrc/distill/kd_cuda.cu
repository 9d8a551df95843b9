// CUDA logit-distillation kernels (kd_kernels.h), compiled with FL_ISA=cuda.
//
// Forward: one block per row. Each thread keeps, for its elements of the row, an online
// softmax state of the student (max, sum of e^(s - max), sum of e^(s - max) (s - t)) and of the
// teacher (the same with s and t swapped): one read of both rows gives lse(s), lse(t) and the
// weighted differences both KLs need (the CPU kernel reads the rows twice: a max, then the
// sums). The states are merged by warp shuffles, then through shared memory. The JSD reads
// the rows once more with both lse known. Rows are read in 16-byte packs where the student and
// teacher rows share their alignment (common/cuda_packs.cuh; since session 14, not yet
// measured on a GPU: the H200 runs of session 11 loaded one element per thread at a time).
// Backward: element-wise from the forward's statistics; a block per (row, tile of 16-byte
// packs). Consecutive threads take consecutive packs: every load and store of a warp is
// contiguous.
// Top-k KL: a block per row finds the teacher's k-th largest value by a radix selection over
// order-preserving 32-bit keys (four 8-bit passes, histograms in shared memory), so that the
// top-k set I is "key above the k-th's, or equal to it and among the first ties by class
// index" without sorting or storing indices; then the loss over I and the whole row's gradient.
// Long rows select among the keys above a sampled threshold, kept in shared memory by the pass
// that also forms the log-normalizers (topk_kl_kernel), instead of four passes over the row.
// PLD: a block per row on the teacher's descending order (the op sorts with torch, stable, and
// passes the indices): the ranking is the target first, then that order without it. Each
// thread owns a run of consecutive ranks. A pass over the ranks from the last gives the
// suffix log-sum-exps l_k of the student (each thread's run total, a block scan of the totals,
// then the run walked back from the later runs' total), stored in a float32 scratch row, and
// the loss; a pass from the first gives B_k = B_(k-1) e^(l_k - l_(k-1)) + w_k (each run's
// affine map, a block scan of the maps, the run walked forward) and the gradient, scattered
// back to class order.
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_helpers.cuh"
#include "../common/cuda_packs.cuh"
#include "../common/vec_scalar.h"
#include "kd_kernels.h"

namespace fastloss {
namespace FL_ISA {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerThread = 4;  // backward: 16-byte packs per thread, kThreads apart
constexpr float kLowest = -3.0e38f;  // PLD: an empty log-sum-exp (finite: no inf - inf)

// A masked class (a scaled logit of -inf, or below -1e30) as -1e30, as kd_cpu_impl.h's unmask:
// the KLs' terms of a class one or both rows mask come out 0 instead of NaN; NaN stays NaN. A
// row whose classes are all masked has no distribution: NaN (all_masked, as on the CPU).
__device__ __forceinline__ float unmask(float v) { return vmax(v, kKdMaskedLogit); }
__device__ __forceinline__ bool all_masked(float row_max) { return row_max <= kKdMaskedLogit; }

// Online softmax of a stream of x with a weighted sum of d (common/cuda_helpers.cuh), with the
// fast exponential.
using Online = OnlineLse<float, FastExp>;

// The block's merge of each thread's N states; the result is valid in every thread.
// `shared` holds the warps' states, [kWarps][N states][m, z, w].
template <int N>
__device__ __forceinline__ void block_merge(Online (&st)[N], float (*shared)[N][3]) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
#pragma unroll
    for (int j = 0; j < N; ++j) st[j].merge(st[j].shuffled(off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0)
    for (int j = 0; j < N; ++j) {
      shared[warp][j][0] = st[j].m;
      shared[warp][j][1] = st[j].z;
      shared[warp][j][2] = st[j].w;
    }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < N; ++j) {
    Online merged;
    for (int i = 0; i < kWarps; ++i) merged.merge(shared[i][j][0], shared[i][j][1], shared[i][j][2]);
    st[j] = merged;
  }
  __syncthreads();  // shared is reused by the next row
}


template <class T>
__global__ void __launch_bounds__(kThreads) kd_forward_kernel(KdProblem q, float* __restrict__ loss,
                                                              float* __restrict__ stats) {
  __shared__ float states[kWarps][2][3];
  __shared__ float sums[kWarps];
  const float inv_t = 1.f / q.temperature, beta = q.beta;
  const int lane = int(threadIdx.x);
  for (int64_t r = blockIdx.x; r < q.N; r += gridDim.x) {
    const T* sr = static_cast<const T*>(q.student) + r * q.s_stride;
    const T* tr = static_cast<const T*>(q.teacher) + r * q.t_stride;
    Online st[2];  // student (weights s - t), teacher (weights t - s)
    for_each_pair<kThreads>(sr, tr, q.C, lane, [&](int64_t, float sv, float tv) {
      const float s = unmask(sv * inv_t), t = unmask(tv * inv_t);
      st[0].add(s, s - t);
      st[1].add(t, t - s);
    });
    block_merge(st, states);
    const Online &S = st[0], &Q = st[1];
    if (all_masked(S.m) || all_masked(Q.m)) {  // (the backward reads NaN statistics: a NaN row)
      if (threadIdx.x == 0) loss[r] = stats[3 * r] = stats[3 * r + 1] = stats[3 * r + 2] = __int_as_float(0x7fc00000);
      continue;  // (the same for the whole block)
    }
    const float lse_s = S.m + logf(S.z), lse_t = Q.m + logf(Q.z);
    float row = 0.f, extra = 0.f;
    if (q.kind == KdKind::forward_kl) {
      row = Q.w / Q.z - lse_t + lse_s;
    } else if (q.kind == KdKind::reverse_kl) {
      row = S.w / S.z - lse_s + lse_t;
      extra = row;
    } else {  // jsd, as kd_cpu_impl.h: loss and the backward's row constant S
      float l = 0.f, sc = 0.f;
      for_each_pair<kThreads>(sr, tr, q.C, lane, [&](int64_t, float sv, float tv) {
        const float lp = unmask(sv * inv_t) - lse_s, lq = unmask(tv * inv_t) - lse_t;
        const float p = vexp(lp), qq = vexp(lq);
        const float lm = logf(vmax(beta * qq + (1.f - beta) * p, 1.2e-38f));
        const float dp = p * (lp - lm);
        l += beta * qq * (lq - lm) + (1.f - beta) * dp;
        sc += (1.f - beta) * dp;
      });
      l = block_sum(l, sums);
      sc = block_sum(sc, sums);
      row = l;
      extra = sc;
    }
    if (threadIdx.x == 0) {
      loss[r] = q.temperature * q.temperature * row;
      stats[3 * r] = lse_s;
      stats[3 * r + 1] = lse_t;
      stats[3 * r + 2] = extra;
    }
  }
}

// Block x of a row covers kThreads * kPerThread 16-byte packs of it (each thread kPerThread of
// them, kThreads apart, all loaded before any is used) when the student, teacher and gradient
// rows share their alignment, else the same number of elements' worth one at a time; block 0
// also takes the unaligned head and tail (fewer than a pack each).
template <class T>
__global__ void __launch_bounds__(kThreads)
    kd_backward_kernel(KdProblem q, const float* __restrict__ grad_loss,
                       const float* __restrict__ stats, T* __restrict__ grad) {
  constexpr int P = kPack<T>;
  const float inv_t = 1.f / q.temperature, beta = q.beta;
  const int64_t C = q.C;
  for (int64_t r = blockIdx.y; r < q.N; r += gridDim.y) {
    const T* sr = static_cast<const T*>(q.student) + r * q.s_stride;
    const T* tr = static_cast<const T*>(q.teacher) + r * q.t_stride;
    T* gr = grad + r * C;
    const float lse_s = stats[3 * r], lse_t = stats[3 * r + 1], extra = stats[3 * r + 2];
    const float g = grad_loss[r] * q.temperature;  // d(T^2 L)/d(student) = T dL/ds
    auto grad_of = [&](float sv, float tv) {
      const float lp = unmask(sv * inv_t) - lse_s, lq = unmask(tv * inv_t) - lse_t;
      const float p = vexp(lp);
      float d;
      if (q.kind == KdKind::forward_kl) {
        d = p - vexp(lq);
      } else if (q.kind == KdKind::reverse_kl) {
        d = p * (lp - lq - extra);
      } else {
        const float lm = logf(vmax(beta * vexp(lq) + (1.f - beta) * p, 1.2e-38f));
        d = p * ((1.f - beta) * (lp - lm) - extra);
      }
      return g * d;
    };
    const RowSplit sp = split_row(sr, C);
    if (split_row(tr, C).head == sp.head && split_row(gr, C).head == sp.head) {
      const uint4* ps = reinterpret_cast<const uint4*>(sr + sp.head);
      const uint4* pt = reinterpret_cast<const uint4*>(tr + sp.head);
      uint4* pg = reinterpret_cast<uint4*>(gr + sp.head);
      const int64_t i0 = int64_t(blockIdx.x) * kThreads * kPerThread + threadIdx.x;
      uint4 rs[kPerThread], rt[kPerThread];
#pragma unroll
      for (int u = 0; u < kPerThread; ++u) {
        const int64_t i = i0 + int64_t(u) * kThreads;
        if (i < sp.packs) rs[u] = __ldg(ps + i), rt[u] = __ldg(pt + i);
      }
#pragma unroll
      for (int u = 0; u < kPerThread; ++u) {
        const int64_t i = i0 + int64_t(u) * kThreads;
        if (i >= sp.packs) break;
        float vs[P], vt[P], out[P];
        unpack<T>(rs[u], vs);
        unpack<T>(rt[u], vt);
#pragma unroll
        for (int e = 0; e < P; ++e) out[e] = grad_of(vs[e], vt[e]);
        store_pack(pg + i, pack<T>(out));
      }
      if (blockIdx.x == 0) {
        const int64_t tail = sp.head + sp.packs * P;
        if (threadIdx.x < sp.head) store1(gr + threadIdx.x, grad_of(load1(sr + threadIdx.x), load1(tr + threadIdx.x)));
        const int64_t k = tail + threadIdx.x;
        if (k < C) store1(gr + k, grad_of(load1(sr + k), load1(tr + k)));
      }
    } else {
      const int64_t k0 = int64_t(blockIdx.x) * kThreads * kPerThread * P + threadIdx.x;
      for (int u = 0; u < kPerThread * P; ++u) {
        const int64_t k = k0 + int64_t(u) * kThreads;
        if (k >= C) break;
        store1(gr + k, grad_of(load1(sr + k), load1(tr + k)));
      }
    }
  }
}

// ---- top-k KL -------------------------------------------------------------------------------

// An order-preserving map of floats onto unsigned integers (NaN beyond +-inf, -0 equal to +0),
// as the CPU's.
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f == 0.f ? 0.f : f);  // -0 and +0 tie
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The top-k membership rule: key > kth, or key == kth with class index <= last_tie.
struct TopkSet {
  uint32_t kth;
  int64_t last_tie;
  __device__ __forceinline__ bool has(uint32_t key, int64_t j) const {
    return key > kth || (key == kth && j <= last_tie);
  }
};

// The k-th largest of n keys (1 = the largest), valid in every thread: the key, how many of the
// keys equal to it are among the k largest (`take`) and how many keys equal it (`ties`).
struct KthKey {
  uint32_t key;
  int64_t take, ties;
};

// A radix selection, four 8-bit passes from the top (histograms in shared memory) over
// key_at(i), i < n; every thread of the block calls it. hist: 256 counters, shared_i: 2 slots.
template <class KeyAt>
__device__ KthKey kth_largest(int64_t n, int64_t k, KeyAt key_at, unsigned* hist, int64_t* shared_i) {
  uint32_t prefix = 0, mask = 0;
  int64_t remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kThreads) hist[b] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const uint32_t key = key_at(i);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // the bin that holds the remaining-th largest key: warp 0 scans
      // lane l owns bins 255 - 8 l down to 248 - 8 l; the lane whose running count passes
      // `remaining` walks its 8 (one thread walking 256 dependent bins cost thousands of cycles)
      const int lane = int(threadIdx.x);
      int64_t c[8], own = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) own += c[e] = hist[255 - 8 * lane - e];
      int64_t incl = own;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int64_t v = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += v;
      }
      const int64_t excl = incl - own;
      // (remaining never exceeds the keys counted; lane 31 ends at bin 0 regardless, as a walk
      // down from 255 that stops at 0 would)
      if ((excl < remaining && remaining <= incl) || (lane == 31 && incl < remaining)) {
        int64_t above = excl;
        int e = 0;
        bool found = false;
#pragma unroll
        for (int i = 0; i < 7; ++i) {  // (constant indices keep c in registers)
          found = found || above + c[i] >= remaining;
          if (!found) above += c[i], e = i + 1;
        }
        shared_i[0] = 255 - 8 * lane - e;
        shared_i[1] = above;
      }
    }
    __syncthreads();
    remaining -= shared_i[1];
    prefix |= uint32_t(shared_i[0]) << shift;
    mask |= 255u << shift;
    __syncthreads();  // shared_i and hist are rewritten next
  }
  // hist[prefix & 255] now counts the keys equal to the k-th
  const KthKey out{prefix, remaining, int64_t(hist[prefix & 255u])};
  __syncthreads();  // hist is rewritten by the next call
  return out;
}

// The membership rule of the k largest of the teacher row tr[0..C) once its k-th key is known:
// when more keys equal the k-th than are taken (equal logits, common in bfloat16), the class
// index of the take-th of them, by tiles in index order; a block-wide count skips the tiles
// before the one that holds it, which thread 0 then scans.
template <class T>
__device__ TopkSet resolve_ties(const T* tr, int64_t C, const KthKey& kth, unsigned* flags, int64_t* shared_i) {
  TopkSet set{kth.key, C};
  if (kth.ties <= kth.take) return set;
  int64_t seen = 0;
  if (threadIdx.x == 0) shared_i[1] = C - 1;  // (always found below; read after a barrier)
  for (int64_t t0 = 0; t0 < C; t0 += kThreads) {
    const int64_t j = t0 + threadIdx.x;
    const bool tie = j < C && order_key(load1(tr + j)) == kth.key;
    const int64_t count = __syncthreads_count(tie);
    if (seen + count < kth.take) {
      seen += count;
      continue;  // the same decision in every thread
    }
    flags[threadIdx.x] = tie;
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t n = seen;
      for (int i = 0; i < kThreads; ++i)
        if (flags[i] && ++n == kth.take) {
          shared_i[1] = t0 + i;
          break;
        }
    }
    __syncthreads();
    break;
  }
  set.last_tie = shared_i[1];
  __syncthreads();
  return set;
}

// The sampled threshold of long rows (as kd_rank_impl.h's top_k_by_sample, with fewer samples
// per class on long rows: each strided sample costs a 32-byte sector, so S = C / 64, at least
// min(256, C / 4) and at most 1024, keeps sampling at 1/8 of a float32 row's sectors from 16384
// classes on): kappa is the r-th largest of S strided keys, r = S k / C * 5/4 + 16, so about
// 1.25 k + 16 C / S classes have keys >= kappa (the count of samples above the k-th key is
// binomial, mean S k / C: r sits 5-6 standard deviations above it at the issue's shapes; the
// CPU takes + 24 for its larger buffers). Rows of 512+ classes with k <= C / 8 whose expected
// count fits 3/4 of kTopkCandidates take it, and keep it when the count does fit; the rest take
// the four passes of kth_largest over the row. 24 KB of keys: with the rest, 26 KB of shared
// memory per block, so that shared memory is not what limits the blocks per SM (8 would fit;
// 43 KB allowed 5; at the 64 registers ptxas gives the kernel for sm_90, registers allow 4).
constexpr int kTopkCandidates = 6144;

__device__ __forceinline__ bool is_nan_key(uint32_t key) {
  const uint32_t u = key & 0x80000000u ? key & 0x7fffffffu : ~key;  // order_key inverted
  const float f = __uint_as_float(u);
  return f != f;
}

// loss[r] = T^2 sum_{j in I} q_j (log q_j - log p_j) (p, q over all classes, or renormalized
// over I), and when grad is not null grad[r, m] = T (c p_m - [m in I] q_m) with c = q's mass
// on I (1 renormalized, and then only m in I), as kd_rank_impl.h.
// Per row: (sampled rows) the strided keys and their threshold kappa; one pass over the row that
// keeps the keys >= kappa in shared memory and, unless renormalized, gives both log-normalizers
// over all classes; the k-th largest key (of the kept keys, or of the row); unless found
// above, the log-normalizers over I; a pass for the loss and q's mass on I; the gradient pass.
// A sampled row reads the teacher 3 times (renormalized: 4), once more where ties at the k-th
// key need the index scan, and the student twice (renormalized: only at I); the four-pass
// selection alone read the teacher 4 times.
template <class T>
__global__ void __launch_bounds__(kThreads)
    topk_kl_kernel(TopkKlProblem q, float* __restrict__ loss, T* __restrict__ grad) {
  __shared__ unsigned hist[256];
  __shared__ unsigned flags[kThreads];  // the tie flags of one tile
  __shared__ uint32_t kept[kTopkCandidates];
  __shared__ unsigned kept_count;
  __shared__ int64_t shared_i[2];
  __shared__ float states[kWarps][2][3];
  __shared__ float sums[kWarps];
  const float inv_t = 1.f / q.temperature, T2 = q.temperature * q.temperature;
  const int64_t C = q.C, k = q.k < q.C ? q.k : q.C;
  // the samples (long rows): S keys `stride` apart, the threshold the rank-th largest; taken
  // when about rank * stride keys are expected to pass and fit 3/4 of the buffer
  bool sample_rows = C >= 512 && k <= C / 8 && C <= (int64_t(1) << 31);
  int64_t S = 0, stride = 0, rank = 0;
  if (sample_rows) {
    S = C / 64 < 256 ? 256 : (C / 64 > 1024 ? 1024 : C / 64);
    S = S < C / 4 ? S : C / 4;
    stride = C / S;
    rank = k * S / C * 5 / 4 + 16 < S ? k * S / C * 5 / 4 + 16 : S;
    sample_rows = rank * stride <= kTopkCandidates / 4 * 3;
  }
  for (int64_t r = blockIdx.x; r < q.N; r += gridDim.x) {
    const T* sr = static_cast<const T*>(q.student) + r * q.s_stride;
    const T* tr = static_cast<const T*>(q.teacher) + r * q.t_stride;
    bool sampled = sample_rows;
    uint32_t kappa = 0;
    if (sampled) {
      for (int64_t i = threadIdx.x; i < S; i += kThreads) kept[i] = order_key(load1(tr + i * stride));
      if (threadIdx.x == 0) kept_count = 0;
      __syncthreads();
      kappa = kth_largest(S, rank, [&](int64_t i) { return kept[i]; }, hist, shared_i).key;
      sampled = !is_nan_key(kappa);  // (the same in every thread) NaN rows: the four passes
    }
    Online st[2];  // log-normalizers of s = student / T and t = teacher / T (over I or all)
    auto keep = [&](float tv) {
      const uint32_t key = order_key(tv);
      if (key >= kappa) {
        const unsigned slot = atomicAdd(&kept_count, 1u);
        if (slot < unsigned(kTopkCandidates)) kept[slot] = key;
      }
    };
    if (!q.renormalize) {  // both rows: the log-normalizers over all classes (and the kept keys)
      for_each_pair<kThreads>(sr, tr, C, int(threadIdx.x), [&](int64_t, float sv, float tv) {
        st[0].add(unmask(sv * inv_t), 0.f);
        st[1].add(unmask(tv * inv_t), 0.f);
        if (sampled) keep(tv);
      });
      block_merge(st, states);  // (its barriers also publish kept_count)
    } else if (sampled) {  // the teacher's kept keys alone
      for_each_value<kThreads>(tr, C, int(threadIdx.x), [&](int64_t, float tv) { keep(tv); });
      __syncthreads();
    }
    const int64_t n_kept = sampled ? int64_t(kept_count) : 0;
    // kept_count counts every key >= kappa: the k-th largest of the row is among them when at
    // least k were counted, and they all fit
    const KthKey kth = sampled && n_kept >= k && n_kept <= kTopkCandidates
                           ? kth_largest(n_kept, k, [&](int64_t i) { return kept[i]; }, hist, shared_i)
                           : kth_largest(C, k, [&](int64_t j) { return order_key(load1(tr + j)); }, hist, shared_i);
    const TopkSet set = resolve_ties(tr, C, kth, flags, shared_i);
    if (q.renormalize) {
      for (int64_t j = threadIdx.x; j < C; j += kThreads) {
        const float tv = load1(tr + j);
        if (!set.has(order_key(tv), j)) continue;
        st[0].add(unmask(load1(sr + j) * inv_t), 0.f);
        st[1].add(unmask(tv * inv_t), 0.f);
      }
      block_merge(st, states);
    }
    const Online &S = st[0], &Q = st[1];
    if (all_masked(S.m) || all_masked(Q.m)) {  // (the same for the whole block)
      const float nan = __int_as_float(0x7fc00000);
      if (threadIdx.x == 0) loss[r] = nan;
      if (grad != nullptr)
        for (int64_t j = threadIdx.x; j < C; j += kThreads) store1(grad + r * C + j, nan);
      __syncthreads();  // (the shared state is reused by the next row)
      continue;
    }
    const float lse_s = S.m + logf(S.z), lse_t = Q.m + logf(Q.z);
    float kl = 0.f, mass = 0.f;
    for (int64_t j = threadIdx.x; j < C; j += kThreads) {
      const float tv = load1(tr + j);
      if (!set.has(order_key(tv), j)) continue;
      const float lq = unmask(tv * inv_t) - lse_t, lp = unmask(load1(sr + j) * inv_t) - lse_s, qj = vexp(lq);
      kl += qj * (lq - lp);
      mass += qj;
    }
    kl = block_sum(kl, sums);
    mass = block_sum(mass, sums);
    if (threadIdx.x == 0) loss[r] = T2 * kl;
    if (grad == nullptr) continue;
    const float c = q.renormalize ? 1.f : mass;
    T* gr = grad + r * C;
    if (q.renormalize) {  // nothing outside I (no student read there)
      for (int64_t j = threadIdx.x; j < C; j += kThreads) {
        const float tv = load1(tr + j);
        float g = 0.f;
        if (set.has(order_key(tv), j))
          g = q.temperature * (vexp(load1(sr + j) * inv_t - lse_s) - vexp(tv * inv_t - lse_t));
        store1(gr + j, g);
      }
    } else {
      map_rows2<kThreads>(sr, tr, gr, C, int(threadIdx.x), [&](int64_t j, float sv, float tv) {
        const float p = vexp(sv * inv_t - lse_s);
        return set.has(order_key(tv), j) ? q.temperature * (c * p - vexp(tv * inv_t - lse_t))
                                         : q.temperature * c * p;
      });
    }
  }
}

// ---- Plackett-Luce distillation ---------------------------------------------------------

// log(e^a + e^b), finite for a or b the lowest float (the empty sum)
__device__ __forceinline__ float log_add(float a, float b) {
  const float m = fmaxf(a, b);
  if (m == -INFINITY) return m;  // (-inf) - (-inf) would be NaN
  return m + log1pf(__expf(-fabsf(a - b)));
}

// The block's exclusive suffix log-sum-exp: log sum of v over the threads after this one
// (kLowest for the last); *all gets the block's whole log-sum-exp. `tot` holds kWarps floats.
__device__ __forceinline__ float block_suffix_lse(float v, float* tot, float* all) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {  // inclusive suffix within the warp
    const float o = __shfl_down_sync(0xffffffffu, v, off);
    if (lane + off < 32) v = log_add(v, o);
  }
  if (lane == 0) tot[warp] = v;
  __syncthreads();
  float after = kLowest;  // the later warps' total
  for (int w = kWarps - 1; w > warp; --w) after = log_add(after, tot[w]);
  float whole = after;
  for (int w = warp; w >= 0; --w) whole = log_add(whole, tot[w]);  // (the same order in every thread)
  *all = whole;
  float next = __shfl_down_sync(0xffffffffu, v, 1);  // the later lanes of this warp
  if (lane == 31) next = kLowest;
  __syncthreads();  // tot is reused
  return log_add(next, after);
}

// x -> a x + b; `then` applies this map, then g.
struct Affine {
  float a, b;
  __device__ __forceinline__ Affine then(Affine g) const { return {g.a * a, fmaf(g.a, b, g.b)}; }
};

// The block's exclusive prefix composition of the threads' maps: the maps of the threads
// before this one, applied in thread order (the identity for the first); *all gets the
// composition of every thread's map. `ta`, `tb` hold kWarps floats each.
__device__ __forceinline__ Affine block_prefix_affine(Affine f, float* ta, float* tb, Affine* all) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {  // inclusive prefix within the warp
    const float ao = __shfl_up_sync(0xffffffffu, f.a, off), bo = __shfl_up_sync(0xffffffffu, f.b, off);
    if (lane >= off) f = Affine{ao, bo}.then(f);
  }
  if (lane == 31) {
    ta[warp] = f.a;
    tb[warp] = f.b;
  }
  __syncthreads();
  Affine before{1.f, 0.f};
  for (int w = 0; w < warp; ++w) before = before.then(Affine{ta[w], tb[w]});
  Affine whole = before;
  for (int w = warp; w < kWarps; ++w) whole = whole.then(Affine{ta[w], tb[w]});
  *all = whole;
  Affine lanes{__shfl_up_sync(0xffffffffu, f.a, 1), __shfl_up_sync(0xffffffffu, f.b, 1)};
  if (lane == 0) lanes = Affine{1.f, 0.f};
  __syncthreads();  // ta, tb are reused
  return before.then(lanes);
}

// A block per row, the ranks in tiles of kThreads x kPldRanks: thread i owns ranks
// [i kPldRanks, (i + 1) kPldRanks) of each tile, so that the scans over the ranks are a pass
// over each thread's ranks and a block scan of the threads' totals, carried from tile to tile
// (a warp walking all C ranks serially took 22.8 ms at 256 x 128256 on an H200, three times
// eager: every 32 ranks waited on dependent gathers), and a warp's loads cover 32 kPldRanks
// consecutive ranks (with each thread on C / kThreads ranks of its own, a warp's load touched
// 32 lines, which the block's neighbours evicted from L1 before their next use). The rows come
// in the teacher's order (the sort's values, and the student gathered by torch), so every
// read walks the ranks and only the gradient's store is scattered: reading the class order's
// rows through `order` cost six dependent gathers per class (H200 at f95b002: 13.9 ms against
// eager's 7.0 at 1024 x 32000, with rows of a thousand blocks in flight, more than L2 holds).
constexpr int kPldRanks = 8;

template <class T>
__global__ void __launch_bounds__(kThreads)
    pld_kernel(PldProblem q, const int64_t* __restrict__ order, const T* __restrict__ sorted_teacher,
               const T* __restrict__ sorted_student, float* __restrict__ scratch, float* __restrict__ loss,
               T* __restrict__ grad) {
  __shared__ float sh_a[kWarps], sh_b[kWarps], sh_w[kWarps][1][3];
  __shared__ int64_t sh_pos;
  const int64_t C = q.C;
  const float inv_t = 1.f / q.temperature;
  for (int64_t r = blockIdx.x; r < q.N; r += gridDim.x) {  // the same r for the whole block
    const T* ss = sorted_student + r * C;  // the row in the teacher's order
    const T* ts = sorted_teacher + r * C;
    T* gr = grad ? grad + r * C : nullptr;
    const int64_t y = q.target[r];
    if (y == q.ignore_index || y < 0 || y >= C) {  // out of range: a NaN row (not checked on CUDA)
      const float fill = y == q.ignore_index ? 0.f : __int_as_float(0x7fc00000);
      if (threadIdx.x == 0) loss[r] = fill;
      for (int64_t j = threadIdx.x; gr && j < C; j += kThreads) store1(gr + j, fill);
      continue;
    }
    // the teacher's softmax(teacher / T): max and normalizer, one read of the row
    Online W[1];
    for (int64_t j = threadIdx.x; j < C; j += kThreads) W[0].add(load1(ts + j) * inv_t, 0.f);
    block_merge(W, sh_w);
    const float m = W[0].m, inv_z = 1.f / W[0].z;
    // where y sits in the teacher's order (a permutation: one thread finds it): rank k > 0 is
    // order[k - 1] up to it, order[k] after
    const int64_t* ord = order + r * C;
    if (threadIdx.x == 0) sh_pos = C;
    __syncthreads();
    for (int64_t p = threadIdx.x; p < C; p += kThreads)
      if (ord[p] == y) sh_pos = p;
    __syncthreads();
    const int64_t pos_y = sh_pos;
    // rank k's place in the sorted rows: y first, then the teacher's order without y
    auto at = [&](int64_t k) { return k == 0 ? pos_y : (k <= pos_y ? k - 1 : k); };
    auto weight = [&](int64_t p) { return vexp(load1(ts + p) * inv_t - m) * inv_z; };
    // ranks from the last: l_k = log sum_{j >= k} e^(s_j), and the loss sum_k w_k (l_k - s_k);
    // tiles from the last, `after` the log-sum-exp of the ranks past the tile
    const int64_t tile = int64_t(kThreads) * kPldRanks, tiles = (C + tile - 1) / tile;
    float* l = gr ? scratch + r * C : nullptr;
    float acc = 0.f, after = kLowest;
    for (int64_t ti = tiles - 1; ti >= 0; --ti) {
      const int64_t k0 = ti * tile + int64_t(threadIdx.x) * kPldRanks;
      float sk[kPldRanks], own = kLowest;
#pragma unroll
      for (int i = 0; i < kPldRanks; ++i) {
        sk[i] = k0 + i < C ? unmask(load1(ss + at(k0 + i))) : kLowest;
        own = log_add(own, sk[i]);
      }
      float tile_all;
      float v = log_add(block_suffix_lse(own, sh_a, &tile_all), after);
#pragma unroll
      for (int i = kPldRanks - 1; i >= 0; --i) {
        const int64_t k = k0 + i;
        if (k >= C) continue;
        v = log_add(sk[i], v);
        if (l) l[k] = v;  // (the gradient's pass reads it back, also from other threads)
        acc += weight(at(k)) * (v - sk[i]);
      }
      after = log_add(after, tile_all);
    }
    acc = block_sum(acc, sh_a);  // (its barriers also publish l to the block)
    if (threadIdx.x == 0) loss[r] = acc;
    if (!gr) continue;
    // ranks from the first: d loss / d s_k = B_k e^(s_k - l_k) - w_k, B_k = a_k B_(k-1) + w_k,
    // a_k = e^(l_k - l_(k-1)) <= 1 (a_0 = 0): each thread composes its ranks' maps, a block scan
    // gives the map from the B carried into the tile to the B before its first rank
    float carried = 0.f;
    for (int64_t ti = 0; ti < tiles; ++ti) {
      const int64_t k0 = ti * tile + int64_t(threadIdx.x) * kPldRanks;
      Affine f{1.f, 0.f};
#pragma unroll
      for (int i = 0; i < kPldRanks; ++i) {
        const int64_t k = k0 + i;
        if (k < C) f = f.then(Affine{k == 0 ? 0.f : vexp(l[k] - l[k - 1]), weight(at(k))});
      }
      Affine tile_all;
      const Affine before = block_prefix_affine(f, sh_a, sh_b, &tile_all);
      float b = fmaf(before.a, carried, before.b);
#pragma unroll
      for (int i = 0; i < kPldRanks; ++i) {
        const int64_t k = k0 + i;
        if (k >= C) continue;
        const int64_t p = at(k);
        const float wk = weight(p);
        b = fmaf(k == 0 ? 0.f : vexp(l[k] - l[k - 1]), b, wk);
        store1(gr + ord[p], b * vexp(unmask(load1(ss + p)) - l[k]) - wk);  // (the one scattered access)
      }
      carried = fmaf(tile_all.a, carried, tile_all.b);
    }
    __syncthreads();  // sh_pos and the scratch row are reused by the next row
  }
}


}  // namespace
}  // namespace FL_ISA

const char* kd_forward_cuda(const KdProblem& q, float* loss, float* stats, void* stream) {
  using namespace FL_ISA;
  if (q.N == 0) return nullptr;
  const unsigned blocks = blocks_for(q.N, 1);
  auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(q.dtype, [&]<class T>() { kd_forward_kernel<T><<<blocks, kThreads, 0, s>>>(q, loss, stats); });
  return launch_status();
}

const char* topk_kl_cuda(const TopkKlProblem& q, float* loss, void* grad, void* stream) {
  using namespace FL_ISA;
  if (q.N == 0) return nullptr;
  const unsigned blocks = blocks_for(q.N, 1);
  auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(q.dtype, [&]<class T>() {
    topk_kl_kernel<T><<<blocks, kThreads, 0, s>>>(q, loss, static_cast<T*>(grad));
  });
  return launch_status();
}

int64_t pld_cuda_scratch(const PldProblem& q) { return q.N * q.C; }

const char* pld_cuda(const PldProblem& q, const int64_t* order, const void* sorted_teacher,
                     const void* sorted_student, float* scratch, float* loss, void* grad, void* stream) {
  using namespace FL_ISA;
  if (q.N == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(q.dtype, [&]<class T>() {
    pld_kernel<T><<<blocks_for(q.N, 1), kThreads, 0, s>>>(q, order, static_cast<const T*>(sorted_teacher),
                                                          static_cast<const T*>(sorted_student), scratch, loss,
                                                          static_cast<T*>(grad));
  });
  return launch_status();
}

const char* kd_backward_cuda(const KdProblem& q, const float* grad_loss, const float* stats,
                             void* grad, void* stream) {
  using namespace FL_ISA;
  if (q.N == 0 || q.C == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const char* error = nullptr;
  visit_dtype(q.dtype, [&]<class T>() {
    const int64_t per_block = int64_t(kThreads) * kPerThread * kPack<T>;  // elements
    const int64_t tiles = (q.C + per_block - 1) / per_block;
    if (tiles > 0x7fffffff) {
      error = "kd_loss: too many classes for one grid";
      return;
    }
    const dim3 grid(unsigned(tiles), unsigned(q.N < 65535 ? q.N : 65535));
    kd_backward_kernel<T><<<grid, kThreads, 0, s>>>(q, grad_loss, stats, static_cast<T*>(grad));
  });
  if (error) return error;
  return launch_status();
}

}  // namespace fastloss
