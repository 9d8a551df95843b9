// CUDA logit-distillation kernels (kd_kernels.h), compiled with FL_ISA=cuda.
//
// Forward: one block per row. Each thread keeps, for its elements of the row, an online
// softmax state of the student (max, sum of e^(s - max), sum of e^(s - max) (s - t)) and of the
// teacher (the same with s and t swapped): one read of both rows gives lse(s), lse(t) and the
// weighted differences both KLs need (the CPU kernel reads the rows twice: a max, then the
// sums). The states are merged by warp shuffles, then through shared memory. The JSD reads
// the rows once more with both lse known.
// Backward: element-wise from the forward's statistics; a block per (row, tile of columns).
// Consecutive threads take consecutive columns: every load and store of a warp is contiguous.
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_storage.cuh"
#include "../common/vec_scalar.h"
#include "kd_kernels.h"

namespace fastloss {
namespace FL_ISA {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPerThread = 4;  // backward: columns per thread, kThreads apart
constexpr float kLowest = -3.0e38f;  // the max of an empty state (finite: no inf - inf)
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// Online softmax of a stream of x, with a weighted sum of d: m = max x, z = sum e^(x - m),
// w = sum e^(x - m) d.
struct Online {
  float m = kLowest, z = 0.f, w = 0.f;
  __device__ __forceinline__ void add(float x, float d) {
    if (x > m) {
      const float r = vexp(m - x);
      z = z * r + 1.f;
      w = w * r + d;
      m = x;
    } else {
      const float e = vexp(x - m);
      z += e;
      w = fmaf(e, d, w);
    }
  }
  __device__ __forceinline__ void merge(const Online& o) {
    const float mm = vmax(m, o.m), a = vexp(m - mm), b = vexp(o.m - mm);
    z = z * a + o.z * b;
    w = w * a + o.w * b;
    m = mm;
  }
  __device__ __forceinline__ Online shuffled(int lane_mask) const {
    Online o;
    o.m = __shfl_xor_sync(0xffffffffu, m, lane_mask);
    o.z = __shfl_xor_sync(0xffffffffu, z, lane_mask);
    o.w = __shfl_xor_sync(0xffffffffu, w, lane_mask);
    return o;
  }
};

// The block's merge of each thread's pair of states; the result is valid in every thread.
// `shared` holds the warps' states, [kWarps][2 states][m, z, w].
__device__ __forceinline__ void block_merge(Online& s, Online& t, float (*shared)[2][3]) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    s.merge(s.shuffled(off));
    t.merge(t.shuffled(off));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    const Online both[2] = {s, t};
    for (int j = 0; j < 2; ++j) {
      shared[warp][j][0] = both[j].m;
      shared[warp][j][1] = both[j].z;
      shared[warp][j][2] = both[j].w;
    }
  }
  __syncthreads();
  Online merged[2];
  for (int i = 0; i < kWarps; ++i)
    for (int j = 0; j < 2; ++j) {
      Online o;
      o.m = shared[i][j][0];
      o.z = shared[i][j][1];
      o.w = shared[i][j][2];
      merged[j].merge(o);
    }
  s = merged[0];
  t = merged[1];
  __syncthreads();  // shared is reused by the next row
}

// The block's sum of a and b; valid in every thread.
__device__ __forceinline__ void block_sum2(float& a, float& b, float (*shared)[2]) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared[warp][0] = a;
    shared[warp][1] = b;
  }
  __syncthreads();
  a = b = 0.f;
  for (int i = 0; i < kWarps; ++i) {
    a += shared[i][0];
    b += shared[i][1];
  }
  __syncthreads();
}

template <class T>
__global__ void __launch_bounds__(kThreads) kd_forward_kernel(KdProblem q, float* __restrict__ loss,
                                                              float* __restrict__ stats) {
  __shared__ float states[kWarps][2][3];
  __shared__ float sums[kWarps][2];
  const float inv_t = 1.f / q.temperature, beta = q.beta;
  for (int64_t r = blockIdx.x; r < q.N; r += gridDim.x) {
    const T* sr = static_cast<const T*>(q.student) + r * q.s_stride;
    const T* tr = static_cast<const T*>(q.teacher) + r * q.t_stride;
    Online S, Q;  // student (weights s - t), teacher (weights t - s)
    for (int64_t k = threadIdx.x; k < q.C; k += kThreads) {
      const float s = load1(sr + k) * inv_t, t = load1(tr + k) * inv_t;
      S.add(s, s - t);
      Q.add(t, t - s);
    }
    block_merge(S, Q, states);
    const float lse_s = S.m + logf(S.z), lse_t = Q.m + logf(Q.z);
    float row = 0.f, extra = 0.f;
    if (q.kind == KdKind::forward_kl) {
      row = Q.w / Q.z - lse_t + lse_s;
    } else if (q.kind == KdKind::reverse_kl) {
      row = S.w / S.z - lse_s + lse_t;
      extra = row;
    } else {  // jsd, as kd_cpu_impl.h: loss and the backward's row constant S
      float l = 0.f, sc = 0.f;
      for (int64_t k = threadIdx.x; k < q.C; k += kThreads) {
        const float lp = load1(sr + k) * inv_t - lse_s, lq = load1(tr + k) * inv_t - lse_t;
        const float p = vexp(lp), qq = vexp(lq);
        const float lm = logf(vmax(beta * qq + (1.f - beta) * p, 1e-38f));
        const float dp = p * (lp - lm);
        l += beta * qq * (lq - lm) + (1.f - beta) * dp;
        sc += (1.f - beta) * dp;
      }
      block_sum2(l, sc, sums);
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

template <class T>
__global__ void __launch_bounds__(kThreads)
    kd_backward_kernel(KdProblem q, const float* __restrict__ grad_loss,
                       const float* __restrict__ stats, T* __restrict__ grad) {
  const float inv_t = 1.f / q.temperature, beta = q.beta;
  const int64_t k0 = int64_t(blockIdx.x) * (kThreads * kPerThread) + threadIdx.x;
  for (int64_t r = blockIdx.y; r < q.N; r += gridDim.y) {
    const T* sr = static_cast<const T*>(q.student) + r * q.s_stride;
    const T* tr = static_cast<const T*>(q.teacher) + r * q.t_stride;
    const float lse_s = stats[3 * r], lse_t = stats[3 * r + 1], extra = stats[3 * r + 2];
    const float g = grad_loss[r] * q.temperature;  // d(T^2 L)/d(student) = T dL/ds
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t k = k0 + int64_t(u) * kThreads;
      if (k >= q.C) break;
      const float lp = load1(sr + k) * inv_t - lse_s, lq = load1(tr + k) * inv_t - lse_t;
      const float p = vexp(lp);
      float d;
      if (q.kind == KdKind::forward_kl) {
        d = p - vexp(lq);
      } else if (q.kind == KdKind::reverse_kl) {
        d = p * (lp - lq - extra);
      } else {
        const float lm = logf(vmax(beta * vexp(lq) + (1.f - beta) * p, 1e-38f));
        d = p * ((1.f - beta) * (lp - lm) - extra);
      }
      store1(grad + r * q.C + k, g * d);
    }
  }
}

const char* launch_status() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace
}  // namespace FL_ISA

const char* kd_forward_cuda(const KdProblem& q, float* loss, float* stats, void* stream) {
  using namespace FL_ISA;
  if (q.N == 0) return nullptr;
  const unsigned blocks = unsigned(q.N < kMaxBlocks ? q.N : kMaxBlocks);
  auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(q.dtype, [&]<class T>() { kd_forward_kernel<T><<<blocks, kThreads, 0, s>>>(q, loss, stats); });
  return launch_status();
}

const char* kd_backward_cuda(const KdProblem& q, const float* grad_loss, const float* stats,
                             void* grad, void* stream) {
  using namespace FL_ISA;
  if (q.N == 0 || q.C == 0) return nullptr;
  const int64_t tiles = (q.C + kThreads * kPerThread - 1) / (kThreads * kPerThread);
  if (tiles > 0x7fffffff) return "kd_loss: too many classes for one grid";
  const dim3 grid(unsigned(tiles), unsigned(q.N < 65535 ? q.N : 65535));
  auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(q.dtype, [&]<class T>() {
    kd_backward_kernel<T><<<grid, kThreads, 0, s>>>(q, grad_loss, stats, static_cast<T*>(grad));
  });
  return launch_status();
}

}  // namespace fastloss
