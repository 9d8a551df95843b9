// CUDA log-domain Sinkhorn for a batch of problems in one set of launches (sinkhorn_kernels.h),
// compiled with FL_ISA=cuda; float32 or float64 throughout (T).
//
// One iteration is four launches over the whole batch, each skipping the problems already done:
//   row pass    a warp per row i: s_i = LSE_j (h_j - x C_ij) with h_j = x g_j + log b_j and
//               x = 1 / eps, as an online (max, sum) state per lane, merged by shuffles; it gives
//               the row update f'_i = -eps s_i and, for the current (f, g), the row sum
//               (P 1)_i = a_i e^(x f_i + s_i) and the row's <P, C> (the state also carries
//               sum e^(v - max) C_ij): the error test costs no extra pass, as on the CPU.
//   decide      a block per problem: error = ||P 1 - a||_1 and <P, C> in float64; stop when
//               error < tol or the iterations are spent, else f = f' (and x f + log a for the
//               column pass).
//   column pass threads along j (coalesced), each adding a chunk of rows into an online state
//               per column; the chunks' states are merged in a fixed order by the next launch,
//               which writes g and h. Deterministic: no atomics.
// The host reads the problems' done flags every kCheckEvery iterations to leave early.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../common/cuda_helpers.cuh"
#include "sinkhorn_kernels.h"

namespace fastloss {
namespace {

using FL_ISA::block_sum;
using FL_ISA::warp_sum;
using FL_ISA::blocks_for;
using FL_ISA::launch_status;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridY = 65535;
constexpr int kCheckEvery = 16;       // iterations between the host's looks at the done flags
constexpr int64_t kTargetBlocks = 2048;  // the column pass splits rows into chunks toward this
constexpr int64_t kMinChunkRows = 32;

template <class T>
__device__ __forceinline__ T exp_t(T v) { return exp(v); }
template <>
__device__ __forceinline__ float exp_t(float v) { return expf(v); }
template <class T>
__device__ __forceinline__ T log_t(T v) { return log(v); }
template <>
__device__ __forceinline__ float log_t(float v) { return logf(v); }

// Online log-sum-exp with a weighted sum (common/cuda_helpers.cuh), accurate exponentials.
template <class T>
using Lse = FL_ISA::OnlineLse<T, FL_ISA::AccurateExp>;

// The device buffers of a solve (carved from one workspace allocation) and the problem.
template <class T>
struct Solve {
  const T* cost;            // [B, n, m]
  const T* a;               // [B, n]
  const T* b;               // [B, m]
  int64_t B, n, m, max_iter, chunks, chunk_rows;
  T eps, x;                 // x = 1 / eps
  double tol;
  T* f;                     // [B, n]
  T* g;                     // [B, m]
  int64_t* n_iter;          // [B]
  T* error;                 // [B]
  double* error64;          // [B] the same, unrounded (SNS decides on it after the warm-up)
  T* transport;             // [B]
  T* f_next;                // [B, n]
  T* row_sum;               // [B, n] (P 1)_i
  T* row_cost;              // [B, n] sum_j P_ij C_ij
  T* h_row;                 // [B, n] x f_i + log a_i
  T* h_col;                 // [B, m] x g_j + log b_j
  T* col_m;                 // [chunks, B, m]
  T* col_z;                 // [chunks, B, m]
  int* active;              // [B] 1 while the problem iterates
};

template <class T>
__global__ void __launch_bounds__(kThreads) init_kernel(Solve<T> s) {
  const int64_t rows = s.B * s.n, cols = s.B * s.m;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < rows + cols;
       e += int64_t(gridDim.x) * blockDim.x) {
    if (e < rows) {
      s.f[e] = T(0);
      s.h_row[e] = log_t(s.a[e]);
    } else {
      s.g[e - rows] = T(0);
      s.h_col[e - rows] = log_t(s.b[e - rows]);
    }
    if (e < s.B) {
      s.active[e] = 1;
      s.n_iter[e] = 0;
    }
  }
}

// A warp per row (k, i) of the batch.
template <class T>
__global__ void __launch_bounds__(kThreads) row_pass_kernel(Solve<T> s) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = s.B * s.n;
  for (int64_t r = (int64_t(blockIdx.x) * kWarps + threadIdx.x / 32); r < rows;
       r += int64_t(gridDim.x) * kWarps) {
    const int64_t k = r / s.n;
    if (!s.active[k]) continue;  // the same r for the whole warp: no divergence
    const T* c = s.cost + r * s.m;
    const T* h = s.h_col + k * s.m;
    Lse<T> st;
    for (int64_t j = lane; j < s.m; j += 32) {
      const T cij = c[j];
      st.add(h[j] - s.x * cij, cij);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const T om = __shfl_xor_sync(0xffffffffu, st.m, off);
      const T oz = __shfl_xor_sync(0xffffffffu, st.z, off);
      const T ow = __shfl_xor_sync(0xffffffffu, st.w, off);
      st.merge(om, oz, ow);
    }
    if (lane != 0) continue;
    const T lse = st.m + log_t(st.z);
    s.f_next[r] = -s.eps * lse;
    const T ai = s.a[r];
    // (P 1)_i = a_i e^(x f_i + lse); rows of zero mass carry no plan
    const T rs = ai > T(0) ? ai * exp_t(s.x * s.f[r] + lse) : T(0);
    s.row_sum[r] = rs;
    s.row_cost[r] = ai > T(0) ? rs * (st.w / st.z) : T(0);
  }
}

// A block per problem: the error and <P, C> of the current (f, g), then stop or take f'.
template <class T>
__global__ void __launch_bounds__(kThreads) decide_kernel(Solve<T> s) {
  __shared__ double partial[kWarps];
  __shared__ int go;
  const int64_t k = blockIdx.x;
  if (!s.active[k]) return;  // the whole block leaves together
  double err = 0.0, tr = 0.0;
  for (int64_t i = threadIdx.x; i < s.n; i += kThreads) {
    err += fabs(double(s.row_sum[k * s.n + i]) - double(s.a[k * s.n + i]));
    tr += double(s.row_cost[k * s.n + i]);
  }
  err = block_sum(err, partial);
  tr = block_sum(tr, partial);
  if (threadIdx.x == 0) {
    s.error[k] = T(err);
    s.error64[k] = err;
    s.transport[k] = T(tr);
    go = !(err < s.tol && s.n_iter[k] > 0) && s.n_iter[k] < s.max_iter;  // (one iteration at least: the CPU's)
    if (go) ++s.n_iter[k];
    else s.active[k] = 0;
  }
  __syncthreads();
  if (!go) return;
  for (int64_t i = threadIdx.x; i < s.n; i += kThreads) {
    const int64_t r = k * s.n + i;
    const T fi = s.f_next[r];
    s.f[r] = fi;
    s.h_row[r] = s.x * fi + log_t(s.a[r]);
  }
}

// grid (column tiles, row chunks, problems): chunk blockIdx.y's online state of each column.
template <class T>
__global__ void __launch_bounds__(kThreads) col_pass_kernel(Solve<T> s) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= s.m) return;  // no block-wide synchronisation below
  const int64_t i0 = int64_t(blockIdx.y) * s.chunk_rows;
  const int64_t i1 = i0 + s.chunk_rows < s.n ? i0 + s.chunk_rows : s.n;
  for (int64_t k = blockIdx.z; k < s.B; k += gridDim.z) {  // problems past 65535 loop
    if (!s.active[k]) continue;
    const T* c = s.cost + k * s.n * s.m + j;
    const T* h = s.h_row + k * s.n;
    Lse<T> st;
    for (int64_t i = i0; i < i1; ++i) st.add(h[i] - s.x * c[i * s.m], T(0));
    const int64_t o = (int64_t(blockIdx.y) * s.B + k) * s.m + j;
    s.col_m[o] = st.m;
    s.col_z[o] = st.z;
  }
}

// Thread per (problem, column): merges the chunks in order; g = -eps LSE, h = x g + log b.
template <class T>
__global__ void __launch_bounds__(kThreads) col_merge_kernel(Solve<T> s) {
  const int64_t cols = s.B * s.m;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < cols;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = e / s.m;
    if (!s.active[k]) continue;
    Lse<T> st;
    for (int64_t q = 0; q < s.chunks; ++q) st.merge(s.col_m[q * cols + e], s.col_z[q * cols + e], T(0));
    const T gj = -s.eps * (st.m + log_t(st.z));
    s.g[e] = gj;
    s.h_col[e] = s.x * gj + log_t(s.b[e]);
  }
}

// value[k] = <a, f> + <b, g>, a block per problem, in float64.
template <class T>
__global__ void __launch_bounds__(kThreads) value_kernel(Solve<T> s, T* value) {
  __shared__ double partial[kWarps];
  const int64_t k = blockIdx.x;
  double v = 0.0;
  for (int64_t i = threadIdx.x; i < s.n; i += kThreads) v += double(s.a[k * s.n + i]) * double(s.f[k * s.n + i]);
  for (int64_t j = threadIdx.x; j < s.m; j += kThreads) v += double(s.b[k * s.m + j]) * double(s.g[k * s.m + j]);
  v = block_sum(v, partial);
  if (threadIdx.x == 0) value[k] = T(v);
}

// out[k, i, j] = scale_k a_i b_j e^(x (f_i + g_j - C_ij)), as b_j e^(x (f_i + g_j - C_ij) +
// log a_i): the exponent is at most about 0 (P_ij <= b_j), so nothing overflows.
template <class T>
__global__ void __launch_bounds__(kThreads)
    plan_kernel(const T* __restrict__ cost, const T* __restrict__ a, const T* __restrict__ b,
                const T* __restrict__ f, const T* __restrict__ g, const double* __restrict__ scale,
                int64_t B, int64_t n, int64_t m, T x, T* __restrict__ out) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= m) return;
  for (int64_t r = blockIdx.y; r < B * n; r += gridDim.y) {
    const int64_t k = r / n;
    const T base = x * f[r] + log_t(a[r]);
    const T sk = scale ? T(scale[k]) : T(1);
    out[r * m + j] = sk * b[k * m + j] * exp_t(base + x * (g[k * m + j] - cost[r * m + j]));
  }
}


// The workspace: buffers of `count` T each, 256-byte aligned, carved in order.
struct Carver {
  char* base;
  size_t used = 0;
  template <class U>
  U* take(int64_t count) {
    U* p = reinterpret_cast<U*>(base ? base + used : nullptr);
    used += (size_t(count) * sizeof(U) + 255) / 256 * 256;
    return p;
  }
};

int64_t chunk_rows_of(const OtBatch& q) {
  const int64_t tiles = (q.m + kThreads - 1) / kThreads, per = tiles * (q.B > 1 ? q.B : 1);
  const int64_t want = kTargetBlocks / per > 1 ? kTargetBlocks / per : 1;
  int64_t rows = (q.n + want - 1) / want;
  rows = rows > kMinChunkRows ? rows : kMinChunkRows;
  // at most 65535 chunks (grid.y)
  const int64_t least = (q.n + kMaxGridY - 1) / kMaxGridY;
  return rows > least ? rows : least;
}

// The solve's view of the problem, its outputs and its workspace (null: only `used` counts the
// workspace's bytes).
template <class T>
Solve<T> carve(const OtBatch& q, const OtBatchOut& out, void* workspace, size_t* used = nullptr) {
  Solve<T> s;
  s.cost = static_cast<const T*>(q.cost);
  s.a = static_cast<const T*>(q.a);
  s.b = static_cast<const T*>(q.b);
  s.B = q.B, s.n = q.n, s.m = q.m, s.max_iter = q.max_iter;
  s.chunk_rows = chunk_rows_of(q);
  s.chunks = (q.n + s.chunk_rows - 1) / s.chunk_rows;
  s.eps = T(q.eps), s.x = T(1.0 / q.eps), s.tol = q.tol;
  s.f = static_cast<T*>(out.f);
  s.g = static_cast<T*>(out.g);
  s.n_iter = out.n_iter;
  s.error = static_cast<T*>(out.error);
  s.transport = static_cast<T*>(out.transport);
  Carver cv{static_cast<char*>(workspace)};
  s.f_next = cv.take<T>(q.B * q.n);
  s.row_sum = cv.take<T>(q.B * q.n);
  s.row_cost = cv.take<T>(q.B * q.n);
  s.h_row = cv.take<T>(q.B * q.n);
  s.h_col = cv.take<T>(q.B * q.m);
  s.col_m = cv.take<T>(s.chunks * q.B * q.m);
  s.col_z = cv.take<T>(s.chunks * q.B * q.m);
  s.active = cv.take<int>(q.B);
  s.error64 = cv.take<double>(q.B);
  if (used) *used = cv.used;
  return s;
}


// The Sinkhorn buffers' bytes (the Newton buffers of SNS follow them).
template <class T>
size_t sinkhorn_bytes(const OtBatch& q) {
  size_t used = 0;
  carve<T>(q, OtBatchOut{}, nullptr, &used);
  return used;
}

#include "sinkhorn_newton_cuda.cuh"

template <class T>
const char* sinkhorn_iterations(const OtBatch& q, const Solve<T>& s, cudaStream_t st, int* host_active);

template <class T>
const char* solve(const OtBatch& q, const OtBatchOut& out, void* workspace, cudaStream_t st,
                  int* host_active) {
  Solve<T> s = carve<T>(q, out, workspace);
  if (q.keep <= 0) {
    if (const char* e = sinkhorn_iterations(q, s, st, host_active)) return e;
  } else {
    // SNS: the warm-up's Sinkhorn iterations, then Newton steps up to max_iter in all
    const int64_t limit = s.max_iter;
    s.max_iter = q.warmup_iters < 1 ? 1 : (q.warmup_iters < limit ? q.warmup_iters : limit);
    if (const char* e = sinkhorn_iterations(q, s, st, host_active)) return e;
    s.max_iter = limit;
    Carver cv{static_cast<char*>(workspace)};
    cv.used = sinkhorn_bytes<T>(q);
    if (const char* e = newton(q, s, carve_newton<T>(q, s, cv), st, host_active)) return e;
  }
  value_kernel<T><<<unsigned(q.B), kThreads, 0, st>>>(s, static_cast<T*>(out.value));
  return launch_status();
}

// Sinkhorn iterations until every problem is done (tol or s.max_iter).
template <class T>
const char* sinkhorn_iterations(const OtBatch& q, const Solve<T>& s, cudaStream_t st, int* host_active) {
  init_kernel<T><<<blocks_for(q.B * (q.n + q.m), kThreads), kThreads, 0, st>>>(s);
  if (const char* e = launch_status()) return e;
  const dim3 col_grid(unsigned((q.m + kThreads - 1) / kThreads), unsigned(s.chunks),
                      unsigned(q.B < kMaxGridY ? q.B : kMaxGridY));
  // max_iter + 1 row passes: the last one measures the final potentials
  for (int64_t it = 0; it <= s.max_iter; ++it) {
    row_pass_kernel<T><<<blocks_for(q.B * q.n, kWarps), kThreads, 0, st>>>(s);
    decide_kernel<T><<<unsigned(q.B), kThreads, 0, st>>>(s);
    col_pass_kernel<T><<<col_grid, kThreads, 0, st>>>(s);
    col_merge_kernel<T><<<blocks_for(q.B * q.m, kThreads), kThreads, 0, st>>>(s);
    if (const char* e = launch_status()) return e;
    if ((it + 1) % kCheckEvery == 0 || it == s.max_iter) {
      if (cudaMemcpyAsync(host_active, s.active, size_t(q.B) * sizeof(int), cudaMemcpyDeviceToHost, st) !=
              cudaSuccess ||
          cudaStreamSynchronize(st) != cudaSuccess)
        return launch_status();
      bool any = false;
      for (int64_t k = 0; k < q.B; ++k) any = any || host_active[k] != 0;
      if (!any) break;
    }
  }
  return launch_status();
}

// With SNS, the Sinkhorn buffers and then the Newton ones.
template <class T>
size_t workspace_bytes(const OtBatch& q) {
  if (q.keep <= 0) return sinkhorn_bytes<T>(q);
  Carver cv{nullptr};
  cv.used = sinkhorn_bytes<T>(q);
  carve_newton<T>(q, Solve<T>{}, cv);
  return cv.used;
}

}  // namespace

size_t sinkhorn_cuda_workspace_bytes(const OtBatch& q) {
  return q.is_double ? workspace_bytes<double>(q) : workspace_bytes<float>(q);
}

const char* sinkhorn_solve_cuda(const OtBatch& q, const OtBatchOut& out, void* workspace,
                                int* host_active, void* stream) {
  if (q.B == 0) return nullptr;
  auto st = static_cast<cudaStream_t>(stream);
  return q.is_double ? solve<double>(q, out, workspace, st, host_active)
                     : solve<float>(q, out, workspace, st, host_active);
}

const char* sinkhorn_plan_cuda(const OtBatch& q, const void* f, const void* g, const double* scale,
                               void* out, void* stream) {
  if (q.B == 0) return nullptr;
  auto st = static_cast<cudaStream_t>(stream);
  const int64_t rows = q.B * q.n;
  const dim3 grid(unsigned((q.m + kThreads - 1) / kThreads), unsigned(rows < kMaxGridY ? rows : kMaxGridY));
  if (q.is_double)
    plan_kernel<double><<<grid, kThreads, 0, st>>>(
        static_cast<const double*>(q.cost), static_cast<const double*>(q.a), static_cast<const double*>(q.b),
        static_cast<const double*>(f), static_cast<const double*>(g), scale, q.B, q.n, q.m, 1.0 / q.eps,
        static_cast<double*>(out));
  else
    plan_kernel<float><<<grid, kThreads, 0, st>>>(
        static_cast<const float*>(q.cost), static_cast<const float*>(q.a), static_cast<const float*>(q.b),
        static_cast<const float*>(f), static_cast<const float*>(g), scale, q.B, q.n, q.m,
        float(1.0 / q.eps), static_cast<float*>(out));
  return launch_status();
}

}  // namespace fastloss
