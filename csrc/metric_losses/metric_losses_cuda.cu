// CUDA kernels of the metric-driven losses (metric_losses_kernels.h), compiled with FL_ISA=cuda;
// the element math is metric_math.h, shared with the CPU kernels.
//
// Dice, sigmoid form: a warp per row (a thread per row when rows are shorter than a warp);
// the backward is element-wise. Softmax form: a block per row. Its statistics come from one
// read of the row: an online state (max m, the first index of the max, and the other classes'
// own max m2 and sum s2 of e^(x - m2)), merged by shuffles and shared memory; Z = 1 + rest,
// rest = s2 e^(m2 - m), and the saturated rows (Z < 1.5) take log q_top = log(rest / Z) from
// m2 and s2, as on the CPU. The forward
// reads the row a second time for the terms; the backward a second time for S = sum of G and a
// third for the gradient (G recomputed: no row buffer).
// AnyLoss's confusion sums: thread t of S (a multiple of K, about 2^18: enough loads in flight)
// adds the elements t, t + S, t + 2S, ... of the flattened [N, K] scores, all of column t % K
// (consecutive threads read consecutive elements); a second kernel adds the per-thread sums of
// each (cell, column) in a fixed order in float64 (deterministic; no atomics).
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_helpers.cuh"
#include "../common/vec_scalar.h"
#include "metric_losses_kernels.h"
#include "metric_math.h"

namespace fastloss {
namespace FL_ISA {
namespace {

using namespace metric_detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kLowest = -3.0e38f;
constexpr int64_t kSumThreads = 1 << 18;  // confusion sums: threads (partial sums) to aim for


// ---- Dice, sigmoid form ------------------------------------------------------------------

// kWarp: a warp per row, else a thread per row.
template <bool kWarp, class T>
__global__ void __launch_bounds__(kThreads) dice_sigmoid_forward_kernel(SigmoidDiceProblem q, float* rows) {
  const T* x = static_cast<const T*>(q.logits);
  const int lane = kWarp ? threadIdx.x % 32 : 0, group = kWarp ? 32 : 1;
  const int64_t per_block = kThreads / group;
  for (int64_t r = int64_t(blockIdx.x) * per_block + threadIdx.x / group; r < q.N;
       r += int64_t(gridDim.x) * per_block) {
    float acc = 0.f;
    // a target outside [0, 1] makes the row NaN (the op does not check values on CUDA: that
    // would wait for the device)
    for (int64_t k = lane; k < q.K; k += group) {
      const float y = q.target[r * q.K + k];
      acc += y >= 0.f && y <= 1.f ? sigmoid_dice_term(load1(x + r * q.K + k), y, q.p)
                                  : __int_as_float(0x7fc00000);
    }
    if (kWarp) acc = warp_sum(acc);
    if (lane == 0) rows[r] = acc;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    dice_sigmoid_backward_kernel(SigmoidDiceProblem q, const float* grad_rows, T* grad) {
  const T* x = static_cast<const T*>(q.logits);
  const int64_t total = q.N * q.K;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kThreads) {
    const float g = grad_rows[q.K == 1 ? e : e / q.K], y = q.target[e];
    store1(grad + e, y >= 0.f && y <= 1.f ? sigmoid_dice_grad(load1(x + e), y, g, q.p)
                                          : __int_as_float(0x7fc00000));  // as the forward
  }
}

// ---- Dice, softmax form --------------------------------------------------------------------

// The row's statistics: the max m, its first index `top`, and the other classes (ties with
// the max included) as their own max m2 and s2 = sum of e^(x - m2) over them, so that their
// share R = s2 e^(m2 - m) is kept as a logarithm where it is subnormal or below float32's
// range (metric_losses_cpu_impl.h: a saturated top's q^alpha from log q).
struct RowMax {
  float m = kLowest, m2 = kLowest, s2 = 0.f;
  int64_t top = -1;
  __device__ __forceinline__ void push(float om2, float os2) {  // a share joins the others'
    if (os2 == 0.f || om2 == -INFINITY) return;  // (no share: 0 * inf had made NaN; NaN passes)
    if (s2 == 0.f || om2 > m2) {
      s2 = os2 + s2 * vexp(m2 - om2);
      m2 = om2;
    } else {
      s2 += os2 * vexp(om2 - m2);
    }
  }
  __device__ __forceinline__ void add(float v, int64_t k) {  // k increasing per thread
    if (top < 0) {
      m = v, top = k;
    } else if (v > m) {
      push(m, 1.f);
      m = v, top = k;
    } else {
      push(v, 1.f);
    }
  }
  __device__ __forceinline__ void merge(float om, float om2, float os2, int64_t otop) {
    if (otop < 0) return;
    if (top < 0) {
      m = om, m2 = om2, s2 = os2, top = otop;
      return;
    }
    push(om2, os2);
    if (om > m || (om == m && otop < top)) {  // the other holds the (first) max
      push(m, 1.f);
      m = om, top = otop;
    } else {
      push(om, 1.f);
    }
  }
};

struct RowStats {
  float m, rest, inv_z;
  bool saturated;
  int64_t top;      // the first max (the top class of a saturated row)
  float log_q_top;  // log(R / Z) (-inf: the others have no share)
  float m2, inv_s2; // e_j / R = e^(x_j - m2) / s2
};

// The whole block's RowMax of row xr, then the row's statistics (valid in every thread).
template <class T>
__device__ RowStats row_stats(const T* xr, int64_t C, float (*sf)[3], int64_t* si) {
  RowMax st;
  for (int64_t k = threadIdx.x; k < C; k += kThreads) st.add(load1(xr + k), k);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, st.m, off);
    const float om2 = __shfl_xor_sync(0xffffffffu, st.m2, off);
    const float os2 = __shfl_xor_sync(0xffffffffu, st.s2, off);
    const int64_t otop = __shfl_xor_sync(0xffffffffu, st.top, off);
    st.merge(om, om2, os2, otop);
  }
  if (threadIdx.x % 32 == 0) {
    sf[threadIdx.x / 32][0] = st.m;
    sf[threadIdx.x / 32][1] = st.m2;
    sf[threadIdx.x / 32][2] = st.s2;
    si[threadIdx.x / 32] = st.top;
  }
  __syncthreads();
  RowMax all;
  for (int w = 0; w < kWarps; ++w) all.merge(sf[w][0], sf[w][1], sf[w][2], si[w]);
  __syncthreads();
  RowStats s;
  s.m = all.m == -INFINITY ? kLowest : all.m;  // (an all -inf row as on the CPU: finite, not NaN)
  s.rest = all.s2 > 0.f ? all.s2 * vexp(all.m2 - all.m) : 0.f;
  s.top = all.top < 0 ? 0 : all.top;
  const float z = 1.f + s.rest;
  s.saturated = z < 1.5f;
  s.inv_z = 1.f / z;
  s.log_q_top = all.s2 > 0.f ? (all.m2 - all.m) + logf(all.s2) - log1pf(s.rest) : -INFINITY;
  s.m2 = all.m2;
  s.inv_s2 = all.s2 > 0.f ? 1.f / all.s2 : 0.f;
  return s;
}

// A block per row. Every class is first taken as a negative with q = 1 - p; the target, and
// the top class of a saturated row, are then corrected exactly (as the CPU kernel does).
template <class T>
__global__ void __launch_bounds__(kThreads) dice_softmax_forward_kernel(SoftmaxDiceProblem q, float* rows) {
  __shared__ float sf[kWarps][3];
  __shared__ int64_t si[kWarps];
  __shared__ float ssum[kWarps];
  const DiceParams d = q.p;
  for (int64_t r = blockIdx.x; r < q.N; r += gridDim.x) {
    const int64_t t = q.target[r];
    if (t == q.ignore_index) {
      if (threadIdx.x == 0) rows[r] = 0.f;
      continue;  // the same t for the whole block
    }
    if (t < 0 || t >= q.C) {  // (the op checks the classes; a direct call gets a NaN row)
      if (threadIdx.x == 0) rows[r] = __int_as_float(0x7fc00000);
      continue;
    }
    const T* xr = static_cast<const T*>(q.logits) + r * q.stride;
    const RowStats s = row_stats(xr, q.C, sf, si);
    auto negative = [&](float x) {
      const float p = vexp(x - s.m) * s.inv_z;
      return dice_term(decayed(p, 1.f - p, d.alpha), 0.f, d);
    };
    auto exact = [&](int64_t c) {
      const float p = vexp(load1(xr + c) - s.m) * s.inv_z;
      const float pt = (s.saturated && c == s.top) ? pow_of_log(s.log_q_top, d.alpha) * p
                                                   : decayed(p, 1.f - p, d.alpha);
      return dice_term(pt, c == t ? 1.f : 0.f, d);
    };
    float acc = 0.f;
    for (int64_t k = threadIdx.x; k < q.C; k += kThreads) acc += negative(load1(xr + k));
    const float row = block_sum(acc, ssum);
    if (threadIdx.x == 0) {
      float fix = 0.f;
      if (s.saturated) fix += exact(s.top) - negative(load1(xr + s.top));
      if (!(s.saturated && t == s.top)) fix += exact(t) - negative(load1(xr + t));
      rows[r] = row + fix;
    }
  }
}

// d/dx_j = G_j - p_j S - (e_j / R) H for j != top, d/dx_top = H - p_top S in a saturated row
// (metric_losses_cpu_impl.h derives it); G of the target is its own, G of a saturated top is
// not part of S.
template <class T>
__global__ void __launch_bounds__(kThreads)
    dice_softmax_backward_kernel(SoftmaxDiceProblem q, const float* grad_rows, T* grad) {
  __shared__ float sf[kWarps][3];
  __shared__ int64_t si[kWarps];
  __shared__ float ssum[kWarps];
  const DiceParams d = q.p;
  for (int64_t r = blockIdx.x; r < q.N; r += gridDim.x) {
    T* gr = grad + r * q.C;
    const int64_t t = q.target[r];
    const bool bad = t != q.ignore_index && (t < 0 || t >= q.C);
    if (t == q.ignore_index || bad) {
      const float fill = bad ? __int_as_float(0x7fc00000) : 0.f;
      for (int64_t k = threadIdx.x; k < q.C; k += kThreads) store1(gr + k, fill);
      continue;
    }
    const T* xr = static_cast<const T*>(q.logits) + r * q.stride;
    const RowStats s = row_stats(xr, q.C, sf, si);
    const float g = grad_rows[r];
    auto e_of = [&](int64_t k) { return vexp(load1(xr + k) - s.m); };
    auto g_of = [&](int64_t k) {  // G of class k (not a saturated top)
      const float p = e_of(k) * s.inv_z, qc = 1.f - p, y = k == t ? 1.f : 0.f;
      const float qa1 = pow01(qc, d.alpha - 1.f);
      return g * dice_slope(qa1 * qc * p, y, d) * p * qa1 * (qc - d.alpha * p);
    };
    float acc = 0.f;
    for (int64_t k = threadIdx.x; k < q.C; k += kThreads)
      if (!(s.saturated && k == s.top)) acc += g_of(k);
    const float S = block_sum(acc, ssum);
    float H = 0.f, inv_s2 = 0.f;
    const float p_top = s.inv_z;
    if (s.saturated) {
      const float q_top = vexp(s.log_q_top), qa_top = pow_of_log(s.log_q_top, d.alpha);
      H = g * dice_slope(qa_top * p_top, t == s.top ? 1.f : 0.f, d) * p_top * qa_top * (q_top - d.alpha * p_top);
      inv_s2 = s.inv_s2;
    }
    for (int64_t k = threadIdx.x; k < q.C; k += kThreads) {
      if (s.saturated && k == s.top) {
        store1(gr + k, H - p_top * S);
        continue;
      }
      const float x = load1(xr + k);
      store1(gr + k, g_of(k) - vexp(x - s.m) * (s.inv_z * S) - vexp(x - s.m2) * (inv_s2 * H));
    }
  }
}

// ---- AnyLoss's confusion sums --------------------------------------------------------------

// S = the number of summing threads: a multiple of K (each thread stays in one column).
int64_t sum_threads(const ConfusionProblem& q) {
  const int64_t per_column = kSumThreads / q.K > 1 ? kSumThreads / q.K : 1;
  const int64_t rows_cap = q.N > 1 ? q.N : 1;
  return q.K * (per_column < rows_cap ? per_column : rows_cap);
}

// partial[t * 4 + cell] for thread t < S.
template <class T>
__global__ void __launch_bounds__(kThreads)
    confusion_partial_kernel(ConfusionProblem q, int64_t S, float* __restrict__ partial) {
  const T* x = static_cast<const T*>(q.scores);
  for (int64_t tid = int64_t(blockIdx.x) * kThreads + threadIdx.x; tid < S;
       tid += int64_t(gridDim.x) * kThreads) {  // (S can pass the grid when K is huge)
    float tp = 0.f, fn = 0.f, fp = 0.f, tn = 0.f;
    for (int64_t e = tid; e < q.N * q.K; e += S) add_cells(load1(x + e), q.target[e], q, tp, fn, fp, tn);
    partial[tid * 4] = tp;
    partial[tid * 4 + 1] = fn;
    partial[tid * 4 + 2] = fp;
    partial[tid * 4 + 3] = tn;
  }
}

// sums[cell * K + k] = the sum over the threads t = k, k + K, ... < S of partial[t * 4 + cell]:
// a block per (cell, column), every 256th thread's partial per thread in float64, then a
// fixed tree (shuffles, then the warps in order).
__global__ void __launch_bounds__(kThreads)
    confusion_total_kernel(const float* __restrict__ partial, int64_t S, int64_t K, float* __restrict__ sums) {
  __shared__ double warp_sums[kWarps];
  const int64_t per_column = S / K;
  for (int64_t e = blockIdx.x; e < 4 * K; e += gridDim.x) {  // the same e for the whole block
    const int64_t cell = e / K, k = e % K;
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < per_column; i += kThreads) s += double(partial[(k + i * K) * 4 + cell]);
    s = block_sum(s, warp_sums);
    if (threadIdx.x == 0) sums[e] = float(s);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    confusion_backward_kernel(ConfusionProblem q, const float* __restrict__ gs, T* __restrict__ grad) {
  const T* x = static_cast<const T*>(q.scores);
  const int64_t total = q.N * q.K;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kThreads) {
    const int64_t k = q.K == 1 ? 0 : e % q.K;
    const float c1 = gs[k] - gs[q.K + k], c0 = gs[2 * q.K + k] - gs[3 * q.K + k];
    store1(grad + e, confusion_grad(load1(x + e), q.target[e], c1, c0, q));
  }
}


}  // namespace
}  // namespace FL_ISA

const char* dice_sigmoid_forward_cuda(const SigmoidDiceProblem& q, float* rows, void* stream) {
  using namespace FL_ISA;
  if (q.N == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(q.dtype, [&]<class T>() {
    if (q.K >= 32)
      dice_sigmoid_forward_kernel<true, T><<<blocks_for(q.N, kWarps), kThreads, 0, s>>>(q, rows);
    else
      dice_sigmoid_forward_kernel<false, T><<<blocks_for(q.N, kThreads), kThreads, 0, s>>>(q, rows);
  });
  return launch_status();
}

const char* dice_sigmoid_backward_cuda(const SigmoidDiceProblem& q, const float* grad_rows, void* grad,
                                       void* stream) {
  using namespace FL_ISA;
  if (q.N * q.K == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(q.dtype, [&]<class T>() {
    dice_sigmoid_backward_kernel<T><<<blocks_for(q.N * q.K, kThreads), kThreads, 0, s>>>(
        q, grad_rows, static_cast<T*>(grad));
  });
  return launch_status();
}

const char* dice_softmax_forward_cuda(const SoftmaxDiceProblem& q, float* rows, void* stream) {
  using namespace FL_ISA;
  if (q.N == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(q.dtype, [&]<class T>() {
    dice_softmax_forward_kernel<T><<<blocks_for(q.N, 1), kThreads, 0, s>>>(q, rows);
  });
  return launch_status();
}

const char* dice_softmax_backward_cuda(const SoftmaxDiceProblem& q, const float* grad_rows, void* grad,
                                       void* stream) {
  using namespace FL_ISA;
  if (q.N == 0 || q.C == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(q.dtype, [&]<class T>() {
    dice_softmax_backward_kernel<T><<<blocks_for(q.N, 1), kThreads, 0, s>>>(q, grad_rows,
                                                                           static_cast<T*>(grad));
  });
  return launch_status();
}

int64_t confusion_sums_cuda_scratch(const ConfusionProblem& q) {
  return q.K == 0 ? 0 : 4 * FL_ISA::sum_threads(q);
}

const char* confusion_sums_cuda(const ConfusionProblem& q, float* sums, float* scratch, void* stream) {
  using namespace FL_ISA;
  if (q.K == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t S = sum_threads(q);
  visit_dtype(q.dtype, [&]<class T>() {
    confusion_partial_kernel<T><<<blocks_for(S, kThreads), kThreads, 0, s>>>(q, S, scratch);
  });
  if (const char* e = launch_status()) return e;
  confusion_total_kernel<<<blocks_for(4 * q.K, 1), kThreads, 0, s>>>(scratch, S, q.K, sums);
  return launch_status();
}

const char* confusion_backward_cuda(const ConfusionProblem& q, const float* grad_sums, void* grad,
                                    void* stream) {
  using namespace FL_ISA;
  if (q.N * q.K == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(q.dtype, [&]<class T>() {
    confusion_backward_kernel<T><<<blocks_for(q.N * q.K, kThreads), kThreads, 0, s>>>(
        q, grad_sums, static_cast<T*>(grad));
  });
  return launch_status();
}

}  // namespace fastloss
