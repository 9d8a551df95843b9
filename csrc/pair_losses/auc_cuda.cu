// CUDA kernels of the Mann-Whitney (AUC) loss (auc_kernels.h), compiled with FL_ISA=cuda.
//
// The P x N pairs of a query are never stored. The positive side: a thread per positive i
// walks the query's negatives, staged 256 at a time in shared memory (every thread of the block
// reads each staged score), adding softplus(n_j - p_i) for the loss and sigmoid(n_j - p_i) for
// d loss / d p_i. The negative side (when the gradients are wanted) is the same walk with the
// roles swapped, for d loss / d n_j: two passes over the pairs instead of atomics. Each block's
// loss is a float64 partial sum, added per query in a fixed order by a last kernel.
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_storage.cuh"
#include "auc_kernels.h"

namespace fastloss {
namespace FL_ISA {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Thread per "own" score o_i of a query b (blocks along y, looping past 65535 queries),
// walking every "other" score t_j of the query with d = n_j - p_i: own = positives adds
// softplus(d) (the loss) and sigmoid(d); own = negatives adds sigmoid(d).
// grad[b, i] = -+ scale * sum sigmoid (minus for positives); with the loss,
// loss_part[b * gridDim.x + blockIdx.x] = the block's sum of softplus.
template <class T, bool kPositives>
__global__ void __launch_bounds__(kThreads)
    auc_side_kernel(const T* __restrict__ own, int64_t own_stride, int64_t n_own,
                    const T* __restrict__ other, int64_t other_stride, int64_t n_other, int64_t B,
                    float scale, float* __restrict__ grad, double* __restrict__ loss_part) {
  __shared__ float staged[kThreads];
  __shared__ double block_loss[kWarps];
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const bool live = i < n_own;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {  // the same b for the whole block
    const float oi = live ? load1(own + b * own_stride + i) : 0.f;
    const T* ot = other + b * other_stride;
    float sg_sum = 0.f;
    double sp_total = 0.0;  // float sums per staged tile, added in float64 (long rows)
    for (int64_t j0 = 0; j0 < n_other; j0 += kThreads) {
      const int64_t j = j0 + threadIdx.x;
      staged[threadIdx.x] = j < n_other ? load1(ot + j) : 0.f;
      __syncthreads();
      const int count = n_other - j0 < kThreads ? int(n_other - j0) : kThreads;
      float sp_tile = 0.f;
      for (int k = 0; live && k < count; ++k) {
        const float d = kPositives ? staged[k] - oi : oi - staged[k];
        const float e = __expf(-fabsf(d)), r = 1.f / (1.f + e);
        sg_sum += d >= 0.f ? r : e * r;
        if (kPositives) sp_tile += fmaxf(d, 0.f) + log1pf(e);
      }
      sp_total += double(sp_tile);
      __syncthreads();  // staged is rewritten next
    }
    if (grad && live) grad[b * n_own + i] = (kPositives ? -scale : scale) * sg_sum;
    if (!kPositives) continue;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sp_total += __shfl_xor_sync(0xffffffffu, sp_total, off);
    if (threadIdx.x % 32 == 0) block_loss[threadIdx.x / 32] = sp_total;
    __syncthreads();
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int w = 0; w < kWarps; ++w) total += block_loss[w];
      loss_part[b * gridDim.x + blockIdx.x] = total;
    }
    __syncthreads();  // block_loss is rewritten for the next query
  }
}

// loss[b] = scale * the sum of the query's block partials, in order.
__global__ void auc_loss_kernel(const double* __restrict__ loss_part, int64_t B, int64_t blocks,
                                double scale, float* __restrict__ loss) {
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
       b += int64_t(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t k = 0; k < blocks; ++k) s += loss_part[b * blocks + k];
    loss[b] = float(s * scale);
  }
}

const char* launch_status() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace
}  // namespace FL_ISA

int64_t auc_cuda_scratch(const AucProblem& q) {
  return q.B * ((q.P + FL_ISA::kThreads - 1) / FL_ISA::kThreads);
}

const char* auc_cuda(const AucProblem& q, float* loss, float* grad_pos, float* grad_neg,
                     double* scratch, void* stream) {
  using namespace FL_ISA;
  if (q.B == 0) return nullptr;
  const unsigned queries = unsigned(q.B < 65535 ? q.B : 65535);
  auto s = static_cast<cudaStream_t>(stream);
  const float scale = float(1.0 / (double(q.P) * double(q.N)));
  const int64_t pos_blocks = (q.P + kThreads - 1) / kThreads, neg_blocks = (q.N + kThreads - 1) / kThreads;
  visit_dtype(q.dtype, [&]<class T>() {
    const T* pos = static_cast<const T*>(q.pos);
    const T* neg = static_cast<const T*>(q.neg);
    auc_side_kernel<T, true><<<dim3(unsigned(pos_blocks), queries), kThreads, 0, s>>>(
        pos, q.pos_stride, q.P, neg, q.neg_stride, q.N, q.B, scale, grad_pos, scratch);
    if (grad_neg)
      auc_side_kernel<T, false><<<dim3(unsigned(neg_blocks), queries), kThreads, 0, s>>>(
          neg, q.neg_stride, q.N, pos, q.pos_stride, q.P, q.B, scale, grad_neg, nullptr);
  });
  if (const char* e = launch_status()) return e;
  auc_loss_kernel<<<unsigned((q.B + kThreads - 1) / kThreads), kThreads, 0, s>>>(
      scratch, q.B, pos_blocks, 1.0 / (double(q.P) * double(q.N)), loss);
  return launch_status();
}

}  // namespace fastloss
