// CUDA kernels of the similarity-block ops (similarity_rows_kernels.h), compiled with
// FL_ISA=cuda: the Multi-Similarity, TCM and contrastive blocks. The caller (pair_losses_op.cpp)
// forms each block S with cuBLAS; these kernels replace the dozen element-wise passes and
// block-sized temporaries the same math takes in torch operations.
//
// A block of 256 threads per row (rows grid-strided), each thread owning the columns j = tid +
// 256 k in every pass, so a pass reads what the same thread wrote in the pass before without
// a barrier. The contrastive loss's column statistics go the other way: a thread per column
// walking a chunk of rows (online max / sum), the chunks merged by a last kernel.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../common/cuda_helpers.cuh"
#include "similarity_rows_kernels.h"

namespace fastloss {
namespace FL_ISA {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxRowBlocks = 65536;
constexpr int64_t kColRowsPerChunk = 64;  // rows per column-statistics chunk, at least
constexpr int64_t kMaxGridY = 65535;

__device__ __forceinline__ bool same_key(const float* keys, int64_t j, float key) {
  return fabsf(keys[j] - key) < 0.5f;
}

unsigned row_blocks(int64_t rows) {
  return unsigned(rows < kMaxRowBlocks ? (rows > 0 ? rows : 1) : kMaxRowBlocks);
}

// ---- Multi-Similarity ---------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    ms_rows_kernel(float* __restrict__ s, int64_t rows, int64_t n, int64_t row0,
                   const float* __restrict__ keys, MsParams p, float* __restrict__ lse_pos,
                   float* __restrict__ lse_neg, bool write_grad) {
  __shared__ float red[kWarps];
  __shared__ double red_d[kWarps];
  const float inf = INFINITY;
  const float eps = p.mine ? p.epsilon : 0.f;
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    float* row = s + i * n;
    const int64_t self = row0 + i;
    const float key = keys[self];
    // the anchor itself reads as +inf: no positive's minimum, never kept, exp(-inf) = 0
    float mp = inf, mn = -inf, nans = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const float x = j == self ? inf : row[j];
      if (!(x <= inf)) nans = 1.f;  // only NaN fails
      if (same_key(keys, j, key))
        mp = fminf(mp, x);
      else
        mn = fmaxf(mn, x);
    }
    mp = block_reduce(mp, red, MinOp());
    mn = block_reduce(mn, red, MaxOp());
    if (block_reduce(nans, red, MaxOp()) > 0.f) {  // a NaN similarity: NaN loss and gradient row
      if (threadIdx.x == 0) lse_pos[i] = lse_neg[i] = NAN;
      if (write_grad)
        for (int64_t j = threadIdx.x; j < n; j += kThreads) row[j] = NAN;
      continue;
    }
    const float thr_pos = p.mine ? mn : inf, thr_neg = p.mine ? mp : -inf;
    const bool any_pos = mp - eps < thr_pos, any_neg = thr_neg < mn + eps;
    const float shift_p = any_pos ? fmaxf(0.f, p.alpha * (p.base - mp)) : 0.f;
    const float shift_n = any_neg ? fmaxf(0.f, p.beta * (mn - p.base)) : 0.f;
    float sp = 0.f, sn = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const float x = j == self ? inf : row[j];
      const bool same = same_key(keys, j, key);
      const float z = same ? (x - eps < thr_pos ? p.alpha * (p.base - x) - shift_p : -inf)
                           : (thr_neg < x + eps ? p.beta * (x - p.base) - shift_n : -inf);
      const float e = expf(z);  // 0 where the pair is not kept
      if (same)
        sp += e;
      else
        sn += e;
      if (write_grad) row[j] = same ? -e : e;  // signed: positives < 0
    }
    const double sum_p = block_sum(double(sp), red_d), sum_n = block_sum(double(sn), red_d);
    const double lp = shift_p > 0 ? shift_p + log(exp(-double(shift_p)) + sum_p) : log1p(sum_p);
    const double ln = shift_n > 0 ? shift_n + log(exp(-double(shift_n)) + sum_n) : log1p(sum_n);
    if (threadIdx.x == 0) {
      lse_pos[i] = float(lp);
      lse_neg[i] = float(ln);
    }
    if (write_grad) {
      const float gp = float(exp(shift_p - lp)), gn = float(exp(shift_n - ln));
      for (int64_t j = threadIdx.x; j < n; j += kThreads) {
        const float v = row[j];
        row[j] = v < 0.f ? v * gp : v * gn;
      }
    }
  }
}

// ---- Threshold-Consistent Margin ----------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    tcm_rows_kernel(const float* __restrict__ s, int64_t rows, int64_t n, int64_t row0,
                    const float* __restrict__ keys, TcmParams p, double* __restrict__ row_stats) {
  __shared__ double red[kWarps];
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const float* row = s + i * n;
    const int64_t self = row0 + i;
    const float key = keys[self];
    float sum_p = 0.f, cnt_p = 0.f, sum_n = 0.f, cnt_n = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const float x = row[j];
      if (same_key(keys, j, key)) {
        if (j != self && x <= p.m_pos) sum_p += p.m_pos - x, cnt_p += 1.f;
      } else if (x >= p.m_neg) {
        sum_n += x - p.m_neg, cnt_n += 1.f;
      }
    }
    const double st[4] = {block_sum(double(sum_p), red), block_sum(double(cnt_p), red),
                          block_sum(double(sum_n), red), block_sum(double(cnt_n), red)};
    if (threadIdx.x < 4) row_stats[4 * i + threadIdx.x] = st[threadIdx.x];
  }
}

__global__ void __launch_bounds__(kThreads)
    tcm_rows_grad_kernel(float* __restrict__ s, int64_t rows, int64_t n, int64_t row0,
                         const float* __restrict__ keys, TcmParams p,
                         const double* __restrict__ coef) {
  const float d_pos = float(coef[0]), d_neg = float(coef[1]);
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    float* row = s + i * n;
    const int64_t self = row0 + i;
    const float key = keys[self];
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const float x = row[j];
      float d = 0.f;
      if (same_key(keys, j, key)) {
        if (j != self && x <= p.m_pos) d = -d_pos;
      } else if (x >= p.m_neg) {
        d = d_neg;
      }
      row[j] = d;
    }
  }
}

// ---- contrastive --------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    clip_rows_kernel(const float* __restrict__ s, int64_t rows, int64_t n, int64_t row0,
                     float scale, float* __restrict__ lse_row, float* __restrict__ diag) {
  __shared__ float red[kWarps];
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const float* row = s + i * n;
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < n; j += kThreads) mx = fmaxf(mx, scale * row[j]);
    mx = block_reduce(mx, red, MaxOp());
    float sum = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += kThreads) sum += expf(scale * row[j] - mx);
    sum = block_sum(sum, red);
    if (threadIdx.x == 0) {
      lse_row[i] = mx + logf(sum);
      diag[i] = scale * row[row0 + i];
    }
  }
}

// Rows per column-statistics chunk: kColRowsPerChunk, more when grid.y would pass its limit.
int64_t col_chunk_rows(int64_t rows) {
  const int64_t least = (rows + kMaxGridY - 1) / kMaxGridY;
  return least > kColRowsPerChunk ? least : kColRowsPerChunk;
}

// Thread per column j (grid.x), chunk c of chunk_rows rows (grid.y): the chunk's max of
// X = scale S and sum of exp(X - max), one exponential per entry (two when the max moves).
__global__ void __launch_bounds__(kThreads)
    clip_cols_kernel(const float* __restrict__ s, int64_t rows, int64_t n, float scale,
                     int64_t chunk_rows, float* __restrict__ col_max, float* __restrict__ col_sum) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= n) return;
  const int64_t r0 = int64_t(blockIdx.y) * chunk_rows;
  const int64_t r1 = r0 + chunk_rows < rows ? r0 + chunk_rows : rows;
  float m = -INFINITY, sum = 0.f;
  for (int64_t r = r0; r < r1; ++r) {
    const float x = scale * s[r * n + j];
    if (x == -INFINITY) continue;  // adds nothing (and exp(-inf - -inf) would be NaN)
    if (x > m) {
      sum = sum * expf(m - x) + 1.f;
      m = x;
    } else {
      sum += expf(x - m);
    }
  }
  col_max[blockIdx.y * n + j] = m;
  col_sum[blockIdx.y * n + j] = sum;
}

__global__ void __launch_bounds__(kThreads)
    clip_merge_kernel(const float* __restrict__ col_max, const float* __restrict__ col_sum,
                      int64_t parts, int64_t n, float* __restrict__ lse_col) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= n) return;
  float m = -INFINITY;
  for (int64_t k = 0; k < parts; ++k) m = fmaxf(m, col_max[k * n + j]);
  if (m == -INFINITY) {  // all -inf: an empty sum
    lse_col[j] = m;
    return;
  }
  float sum = 0.f;
  for (int64_t k = 0; k < parts; ++k) sum += col_sum[k * n + j] * expf(col_max[k * n + j] - m);
  lse_col[j] = m + logf(sum);
}

__global__ void __launch_bounds__(kThreads)
    clip_rows_grad_kernel(float* __restrict__ s, int64_t rows, int64_t n, int64_t row0,
                          float scale, const float* __restrict__ lse_row,
                          const float* __restrict__ lse_col, const float* __restrict__ g) {
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    float* row = s + i * n;
    const int64_t self = row0 + i;
    const float gi = g[self], lr = lse_row[i];
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const float x = scale * row[j];
      float v = gi * expf(x - lr);
      if (lse_col) v += g[j] * expf(x - lse_col[j]);
      if (j == self) v -= gi * (lse_col ? 2.f : 1.f);  // the targets: the diagonal
      row[j] = scale * v;
    }
  }
}

}  // namespace
}  // namespace FL_ISA

using namespace FL_ISA;

const char* ms_rows_cuda(const SimBlock& q, const MsParams& p, float* lse_pos, float* lse_neg,
                         bool write_grad, void* stream) {
  if (q.rows == 0) return nullptr;
  ms_rows_kernel<<<row_blocks(q.rows), kThreads, 0, cudaStream_t(stream)>>>(
      q.s, q.rows, q.n, q.row0, q.keys, p, lse_pos, lse_neg, write_grad);
  return launch_status();
}

const char* tcm_rows_cuda(const SimBlock& q, const TcmParams& p, double* row_stats, void* stream) {
  if (q.rows == 0) return nullptr;
  tcm_rows_kernel<<<row_blocks(q.rows), kThreads, 0, cudaStream_t(stream)>>>(
      q.s, q.rows, q.n, q.row0, q.keys, p, row_stats);
  return launch_status();
}

const char* tcm_rows_grad_cuda(const SimBlock& q, const TcmParams& p, const double* coef,
                               void* stream) {
  if (q.rows == 0) return nullptr;
  tcm_rows_grad_kernel<<<row_blocks(q.rows), kThreads, 0, cudaStream_t(stream)>>>(
      q.s, q.rows, q.n, q.row0, q.keys, p, coef);
  return launch_status();
}

int64_t clip_cuda_parts(const SimBlock& q) {
  const int64_t chunk = col_chunk_rows(q.rows);
  return (q.rows + chunk - 1) / chunk;
}

const char* clip_rows_cuda(const SimBlock& q, float scale, float* lse_row, float* diag,
                           float* col_max, float* col_sum, float* lse_col, void* stream) {
  if (q.rows == 0) return nullptr;
  const cudaStream_t st = cudaStream_t(stream);
  clip_rows_kernel<<<row_blocks(q.rows), kThreads, 0, st>>>(q.s, q.rows, q.n, q.row0, scale,
                                                             lse_row, diag);
  if (lse_col) {
    const int64_t parts = clip_cuda_parts(q);
    const dim3 grid(unsigned((q.n + kThreads - 1) / kThreads), unsigned(parts));
    clip_cols_kernel<<<grid, kThreads, 0, st>>>(q.s, q.rows, q.n, scale, col_chunk_rows(q.rows),
                                                 col_max, col_sum);
    clip_merge_kernel<<<unsigned((q.n + kThreads - 1) / kThreads), kThreads, 0, st>>>(
        col_max, col_sum, parts, q.n, lse_col);
  }
  return launch_status();
}

const char* clip_rows_grad_cuda(const SimBlock& q, float scale, const float* lse_row,
                                const float* lse_col, const float* g, void* stream) {
  if (q.rows == 0) return nullptr;
  clip_rows_grad_kernel<<<row_blocks(q.rows), kThreads, 0, cudaStream_t(stream)>>>(
      q.s, q.rows, q.n, q.row0, scale, lse_row, lse_col, g);
  return launch_status();
}

}  // namespace fastloss
