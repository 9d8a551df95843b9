// CUDA kernels of the few-shot losses' chosen-pair steps (python/fastloss/ops/few_shot.py),
// compiled with FL_ISA=cuda: the distances of chosen pairs and their gradient (ICNN's
// neighbours, Proto-Triplet's prototypes; similarity_rows_kernels.h has the CPU contract) and
// ICNN's score with its gradient (icnn_score.h). The neighbour search itself is a cuBLAS GEMM
// (or cdist) and torch's topk per block of rows.
//
// Distances: a warp per pair (lanes across the features, one warp sum). Gradients: a thread
// per (row, feature); the targets' side walks the pairs sorted by target (the caller sorts
// them), so every sum has one order and no atomics: the same bits from run to run. An index
// outside [0, M) gives NaN, never a read outside t.
//
// ICNN's score couples the rows through batch-wide sums and a batch-wide max, so it takes
// three launches: per-row terms (a thread per row, float64 as the CPU op), one block that
// reduces them in a fixed order and forms the score and the coefficients of its gradient, and
// a thread per row for the gradient. No host synchronisation; the loss stays on the device.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../common/cuda_helpers.cuh"
#include "icnn_score.h"
#include "similarity_rows_kernels.h"

namespace fastloss {
namespace FL_ISA {
namespace {

constexpr int kThreads = 256;
constexpr double kEps = 1e-7;  // ICNN's divisions (icnn_score.h)

__device__ __forceinline__ bool valid_index(int64_t j, int64_t m) { return j >= 0 && j < m; }

__global__ void __launch_bounds__(kThreads)
    dist_kernel(const float* __restrict__ x, const float* __restrict__ t, int64_t d,
                const int64_t* __restrict__ idx, int64_t pairs, int64_t n_nb, int64_t m, float eps,
                float* __restrict__ dist) {
  const int lane = int(threadIdx.x) % 32;
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  for (int64_t p = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; p < pairs; p += warps) {
    const int64_t j = idx[p];
    if (!valid_index(j, m)) {  // the whole warp takes the same branch
      if (lane == 0) dist[p] = __int_as_float(0x7fc00000);
      continue;
    }
    const float* xi = x + (p / n_nb) * d;
    const float* tj = t + j * d;
    float sq = 0.f;
    for (int64_t f = lane; f < d; f += 32) {
      const float diff = xi[f] - tj[f];
      sq = fmaf(diff, diff, sq);
    }
    sq = warp_sum(sq);
    if (lane == 0) dist[p] = sqrtf(sq + eps);
  }
}

// grad_x[i, f] = sum_c w[i, c] (x[i, f] - t[idx[i, c], f])
__global__ void __launch_bounds__(kThreads)
    grad_x_kernel(const float* __restrict__ x, const float* __restrict__ t, int64_t d,
                  const int64_t* __restrict__ idx, int64_t n, int64_t n_nb, int64_t m,
                  const float* __restrict__ w, float* __restrict__ grad_x) {
  const int64_t total = n * d, stride = int64_t(gridDim.x) * kThreads;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / d, f = e - i * d;
    const float xf = x[e];
    float g = 0.f;
    for (int64_t c = 0; c < n_nb; ++c) {
      const int64_t j = idx[i * n_nb + c];
      g = valid_index(j, m) ? fmaf(w[i * n_nb + c], xf - t[j * d + f], g) : __int_as_float(0x7fc00000);
    }
    grad_x[e] = g;
  }
}

// grad_t[j, f] = -sum over the pairs p of target j (pairs[t_ptr[j] .. t_ptr[j + 1])) of
// w[p] (x[p / n_nb, f] - t[j, f]). A thread walks all of its target's pairs: few targets with
// many pairs each would leave the GPU mostly idle, so pair_losses_op.cpp takes a dense weight
// matrix and a GEMM instead when targets x rows is small (Proto-Triplet's prototypes); ICNN's
// hub neighbours still walk long lists here.
__global__ void __launch_bounds__(kThreads)
    grad_t_kernel(const float* __restrict__ x, const float* __restrict__ t, int64_t d,
                  const int64_t* __restrict__ t_ptr, const int64_t* __restrict__ pairs, int64_t m,
                  int64_t n_nb, const float* __restrict__ w, float* __restrict__ grad_t) {
  const int64_t total = m * d, stride = int64_t(gridDim.x) * kThreads;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total; e += stride) {
    const int64_t j = e / d, f = e - j * d;
    const float tf = t[e];
    float g = 0.f;
    for (int64_t q = t_ptr[j]; q < t_ptr[j + 1]; ++q) {
      const int64_t p = pairs[q];
      g = fmaf(-w[p], x[(p / n_nb) * d + f] - tf, g);
    }
    grad_t[e] = g;
  }
}

// ---- k nearest columns of a block of dot products (ICNN's neighbour search) ---------------------
// A block per row. Each column's key is (distance bits << 32 | column): distances are >= 0, so
// their float bits order them, and the column breaks ties towards the lower one; a non-finite
// distance gets the largest bits (after every number, by column, as the CPU kernel fills such
// rows) and the row's own column (exclude_self) the largest key of all. A radix selection,
// 8 bits a pass from the top (the column's high bytes only as far as n needs), finds the k-th
// smallest key T; the keys <= T are exactly the row's k nearest, ranked by a comparison count.

constexpr int kKnnThreads = 256;

__device__ __forceinline__ uint64_t knn_key(float raw, int64_t j, int64_t self) {
  if (j == self) return ~uint64_t(0);
  const float d = raw < 0.f ? 0.f : raw;  // cdist's clamp (a NaN stays NaN)
  const uint32_t bits = d <= 3.40282347e38f ? __float_as_uint(d) : 0xffffffffu;  // NaN, inf: last
  return (uint64_t(bits) << 32) | uint64_t(j);
}

__global__ void __launch_bounds__(kKnnThreads)
    knn_kernel(const float* __restrict__ s, int64_t rows, int64_t n, int64_t row0,
               const float* __restrict__ row_sq, const float* __restrict__ col_sq, bool exclude_self,
               int k, int col_bytes, int64_t* __restrict__ idx) {
  __shared__ unsigned hist[256];
  __shared__ uint64_t prefix_s;
  __shared__ unsigned want_s, found;
  __shared__ uint64_t chosen[kKnnMax];
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const float* si = s + i * n;
    const float ri = row_sq[i];
    const int64_t self = exclude_self ? row0 + i : -1;
    uint64_t prefix = 0, mask = 0;
    unsigned want = unsigned(k);  // the rank (1-based) of T among the keys matching prefix
    for (int shift = 56; shift >= 0; shift -= 8) {
      if (shift < 32 && shift >= 8 * col_bytes) continue;  // column bytes that are 0 for every j
      for (int b = threadIdx.x; b < 256; b += kKnnThreads) hist[b] = 0;
      __syncthreads();
      for (int64_t j = threadIdx.x; j < n; j += kKnnThreads) {
        const uint64_t key = knn_key(ri + col_sq[j] - 2.f * si[j], j, self);
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        unsigned before = 0, b = 0;
        while (before + hist[b] < want) before += hist[b++];
        prefix_s = prefix | (uint64_t(b) << shift);
        want_s = want - before;
      }
      __syncthreads();
      prefix = prefix_s;
      want = want_s;
      mask |= uint64_t(255) << shift;
      __syncthreads();  // prefix_s / want_s read by all before thread 0 writes them again
    }
    // prefix is now the k-th smallest key T itself (every byte that varies was decided)
    if (threadIdx.x == 0) found = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < n; j += kKnnThreads) {
      const uint64_t key = knn_key(ri + col_sq[j] - 2.f * si[j], j, self);
      if (key <= prefix) {  // exactly k keys (all distinct) if this pass's keys are the first's
        const unsigned slot = atomicAdd(&found, 1u);
        if (slot < unsigned(k)) chosen[slot] = key;  // never past chosen, whatever the count
      }
    }
    __syncthreads();
    const int have = found < unsigned(k) ? int(found) : k;  // k; fewer: only the slots written
    if (int(threadIdx.x) < have) {  // rank by comparison: the output order does not depend on the slots
      const uint64_t mine = chosen[threadIdx.x];
      int rank = 0;
      for (int c = 0; c < have; ++c) rank += chosen[c] < mine;
      idx[i * k + rank] = int64_t(mine & 0xffffffffu);
    } else if (int(threadIdx.x) < k) {  // (never, unless the passes disagreed: a valid column,
      idx[i * k + threadIdx.x] = have > 0 ? int64_t(chosen[0] & 0xffffffffu) : 0;  // not garbage)
    }
    __syncthreads();  // chosen / found reused by the next row
  }
}

// ---- ICNN's score -----------------------------------------------------------------------------
// Scratch (float64): kRowTerms values per row, then kScalars.
enum RowTerm { kDelta, kBig, kSame, kOther, kDcRow, kScRow, kDcMaxRow, kRowTerms };
enum Scalar { kGSc, kGDc, kGMax, kCSc, kCDc, kGDen, kDcMax, kScalars };

// Per row i (a thread each): delta_i (the nearest other-class distance among all n), big_i
// (max over the first k of d / (delta + eps)), the same / other counts over the first k,
// dc_i = sum of the other-class d over the first k / (n_other + eps), sc_i = sum over the
// same-class u / (n_same + eps), and the row's max other-class d (0 if none).
__global__ void __launch_bounds__(kThreads)
    icnn_rows_kernel(const float* __restrict__ d, const bool* __restrict__ same, int64_t N, int64_t n,
                     int64_t k, double* __restrict__ terms) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < N; i += stride) {
    const float* di = d + i * n;
    const bool* si = same + i * n;
    double dl = INFINITY;
    for (int64_t j = 0; j < n; ++j)
      if (!si[j]) dl = fmin(dl, double(di[j]));
    double mx = -INFINITY, other_sum = 0, dc_max = 0, n_same = 0, n_other = 0;
    for (int64_t j = 0; j < k; ++j) {
      mx = fmax(mx, double(di[j]) / (dl + kEps));
      if (si[j]) {
        n_same += 1;
      } else {
        n_other += 1;
        dc_max = fmax(dc_max, double(di[j]));
        other_sum += double(di[j]);
      }
    }
    const double m = fmax(1.0, mx);
    double s = 0;
    for (int64_t j = 0; j < k; ++j)
      if (si[j]) s += double(di[j]) / (dl + kEps) / m;
    double* r = terms + i * kRowTerms;
    r[kDelta] = dl;
    r[kBig] = mx;
    r[kSame] = n_same;
    r[kOther] = n_other;
    r[kDcRow] = other_sum / (n_other + kEps);
    r[kScRow] = s / (n_same + kEps);
    r[kDcMaxRow] = dc_max;
  }
}

// Sums of kValues values over the block's threads, in a fixed order (thread 0 gets them).
template <int kValues>
__device__ void block_sums(double (&v)[kValues], double (*shared)[kThreads]) {
  for (int q = 0; q < kValues; ++q) shared[q][threadIdx.x] = v[q];
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (int(threadIdx.x) < half)
      for (int q = 0; q < kValues; ++q) shared[q][threadIdx.x] += shared[q][threadIdx.x + half];
    __syncthreads();
  }
  for (int q = 0; q < kValues; ++q) v[q] = shared[q][0];
  __syncthreads();
}

// One block: the batch-wide terms, the score (loss = -log score) and the gradient's
// coefficients (icnn_score.cpp, the same formulas in the same order of terms per thread).
__global__ void __launch_bounds__(kThreads)
    icnn_reduce_kernel(const float* __restrict__ d, const bool* __restrict__ same, int64_t N,
                       int64_t n, int64_t k, bool clipped, double* __restrict__ terms,
                       float* __restrict__ loss) {
  __shared__ double shared[6][kThreads];
  // sc sum, dc sum, rows with a same-class neighbour, with an other-class one, same total, max dc
  double v[6] = {0, 0, 0, 0, 0, 0};
  for (int64_t i = threadIdx.x; i < N; i += kThreads) {
    const double* r = terms + i * kRowTerms;
    v[0] += r[kScRow];
    v[1] += r[kDcRow];
    v[2] += r[kSame] > 0;
    v[3] += r[kOther] > 0;
    v[4] += r[kSame];
    v[5] = fmax(v[5], r[kDcMaxRow]);
  }
  // the max first (a max is exact in any order), through the same shared rows
  shared[0][threadIdx.x] = v[5];
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (int(threadIdx.x) < half) shared[0][threadIdx.x] = fmax(shared[0][threadIdx.x], shared[0][threadIdx.x + half]);
    __syncthreads();
  }
  const double dc_max = shared[0][0];
  __syncthreads();
  double ties = 0;  // entries of the first k whose dc (0 for same-class ones) equals the max
  for (int64_t e = threadIdx.x; e < N * k; e += kThreads) {
    const int64_t i = e / k, j = e - i * k;
    ties += (same[i * n + j] ? 0.0 : double(d[i * n + j])) == dc_max;
  }
  double sums[6] = {v[0], v[1], v[2], v[3], v[4], ties};
  block_sums<6>(sums, shared);
  if (threadIdx.x != 0) return;
  const double c_sc = sums[2] + kEps, c_dc = sums[3] + kEps, g_den = dc_max + kEps;
  const bool any_other = sums[3] > 0;
  const double lambda_sc = 1 - sums[0] / c_sc;
  double lambda_dc = sums[1] / g_den / c_dc;
  if (!any_other) lambda_dc = 1 - lambda_dc;
  const double gamma = clipped ? 1.0 : sums[4] / double(k) / double(N);
  const double score = ((lambda_sc + lambda_dc) / 2 + gamma) / 2;
  double* s = terms + N * kRowTerms;
  s[kGSc] = -1 / score / 4;
  s[kGDc] = (any_other ? 1 : -1) * (-1 / score / 4);
  s[kGMax] = -s[kGDc] * sums[1] / (g_den * g_den) / c_dc / fmax(sums[5], 1.0);
  s[kCSc] = c_sc;
  s[kCDc] = c_dc;
  s[kGDen] = g_den;
  s[kDcMax] = dc_max;
  *loss = float(-log(score));
}

// d loss / d d for row i (a thread each), as icnn_score.cpp's second loop, without its per-row
// buffers: d loss / d v_ij is formed again where needed.
__global__ void __launch_bounds__(kThreads)
    icnn_grad_kernel(const float* __restrict__ d, const bool* __restrict__ same, int64_t N,
                     int64_t n, int64_t k, const double* __restrict__ terms, float* __restrict__ grad) {
  const double* s = terms + N * kRowTerms;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < N; i += stride) {
    const float* di = d + i * n;
    const bool* si = same + i * n;
    float* gi = grad + i * n;
    const double* r = terms + i * kRowTerms;
    const double dl = r[kDelta], den = dl + kEps, big = r[kBig], m = fmax(1.0, big);
    const double gu = s[kGSc] * -1 / (r[kSame] + kEps) / s[kCSc];
    double through_m = 0, max_ties = 0;
    for (int64_t j = 0; j < k; ++j) {
      if (si[j]) through_m += gu * (double(di[j]) / den);
      max_ties += double(di[j]) / den == big;
    }
    // d loss / d v_ij: gu / m on same-class entries, minus the max's share where v_ij is it
    auto gv = [&](int64_t j) {
      double g = si[j] ? gu / m : 0.0;
      if (big >= 1 && double(di[j]) / den == big) g -= through_m / (m * m) / max_ties;
      return g;
    };
    double g_delta = 0, min_ties = 0;
    for (int64_t j = 0; j < k; ++j) g_delta -= gv(j) * double(di[j]) / (den * den);
    const bool has_other = dl < INFINITY;  // delta is a distance, not the empty min
    if (has_other)
      for (int64_t j = 0; j < n; ++j) min_ties += !si[j] && double(di[j]) == dl;
    const double gdc = s[kGDc] / s[kGDen] / (r[kOther] + kEps) / s[kCDc];
    for (int64_t j = 0; j < n; ++j) {
      double g = j < k ? gv(j) / den : 0.0;
      if (has_other && !si[j] && double(di[j]) == dl) g += g_delta / min_ties;
      if (j < k && !si[j]) g += gdc + (double(di[j]) == s[kDcMax] ? s[kGMax] : 0.0);
      gi[j] = float(g);
    }
  }
}

}  // namespace
}  // namespace FL_ISA

using FL_ISA::blocks_for;
using FL_ISA::launch_status;

const char* neighbour_dist_cuda(const float* x, const float* t, int64_t d, const int64_t* idx,
                                int64_t n, int64_t n_nb, int64_t m, float eps, float* dist,
                                void* stream) {
  const int64_t pairs = n * n_nb;
  if (pairs == 0) return nullptr;
  FL_ISA::dist_kernel<<<blocks_for(pairs, FL_ISA::kThreads / 32), FL_ISA::kThreads, 0,
                        static_cast<cudaStream_t>(stream)>>>(x, t, d, idx, pairs, n_nb, m, eps, dist);
  return launch_status();
}

const char* neighbour_dist_grad_x_cuda(const float* x, const float* t, int64_t d, const int64_t* idx,
                                       int64_t n, int64_t n_nb, int64_t m, const float* w,
                                       float* grad_x, void* stream) {
  if (n * d == 0) return nullptr;
  FL_ISA::grad_x_kernel<<<blocks_for(n * d, FL_ISA::kThreads), FL_ISA::kThreads, 0,
                          static_cast<cudaStream_t>(stream)>>>(x, t, d, idx, n, n_nb, m, w, grad_x);
  return launch_status();
}

const char* neighbour_dist_grad_t_cuda(const float* x, const float* t, int64_t d, const int64_t* t_ptr,
                                       const int64_t* pairs, int64_t m, int64_t n_nb, const float* w,
                                       float* grad_t, void* stream) {
  if (m * d == 0) return nullptr;
  FL_ISA::grad_t_kernel<<<blocks_for(m * d, FL_ISA::kThreads), FL_ISA::kThreads, 0,
                          static_cast<cudaStream_t>(stream)>>>(x, t, d, t_ptr, pairs, m, n_nb, w, grad_t);
  return launch_status();
}

const char* knn_rows_cuda(const SimBlock& q, const float* row_sq, const float* col_sq,
                          bool exclude_self, int64_t k, int64_t* idx, void* stream) {
  if (q.rows == 0) return nullptr;
  int col_bytes = 1;  // bytes of the column index that vary (n <= 2^31 - 1)
  while (col_bytes < 4 && (q.n - 1) >> (8 * col_bytes)) ++col_bytes;
  const unsigned grid = unsigned(q.rows < 65536 ? q.rows : 65536);
  FL_ISA::knn_kernel<<<grid, FL_ISA::kKnnThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      q.s, q.rows, q.n, q.row0, row_sq, col_sq, exclude_self, int(k), col_bytes, idx);
  return launch_status();
}

int64_t icnn_score_cuda_scratch(int64_t N) { return N * FL_ISA::kRowTerms + FL_ISA::kScalars; }

const char* icnn_score_cuda(const float* d, const bool* same, int64_t N, int64_t n, int64_t k,
                            bool clipped, float* grad_d, float* loss, double* scratch, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned rows = blocks_for(N, FL_ISA::kThreads);
  FL_ISA::icnn_rows_kernel<<<rows, FL_ISA::kThreads, 0, s>>>(d, same, N, n, k, scratch);
  FL_ISA::icnn_reduce_kernel<<<1, FL_ISA::kThreads, 0, s>>>(d, same, N, n, k, clipped, scratch, loss);
  FL_ISA::icnn_grad_kernel<<<rows, FL_ISA::kThreads, 0, s>>>(d, same, N, n, k, scratch, grad_d);
  return launch_status();
}

}  // namespace fastloss
