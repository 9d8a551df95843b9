// CUDA kernels of the Mann-Whitney (AUC) loss (auc_kernels.h), compiled with FL_ISA=cuda.
//
// The P x N pairs of a query are never stored. The positive side: a thread per positive i
// walks a chunk of the query's negatives, staged 256 at a time in shared memory (every thread
// of the block reads each staged score), adding softplus(n_j - p_i) for the loss and
// sigmoid(n_j - p_i) for d loss / d p_i. The negatives are cut into chunks across blocks so
// that a few positives facing many negatives still fill the GPU. The negative side (when the
// gradients are wanted) is the same walk with the roles swapped, for d loss / d n_j: two passes
// over the pairs instead of atomics. Every block writes its partial sums (float per score and
// chunk, float64 per block for the loss); a last kernel adds them in a fixed order.
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_helpers.cuh"
#include "auc_kernels.h"

namespace fastloss {
namespace FL_ISA {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kTargetBlocks = 2048;  // the chunks of the other side aim for this many blocks
constexpr int64_t kMaxChunks = 1024;

// How one side's walk is cut: blocks of own scores (grid.x), chunks of the other side (grid.y).
struct Side {
  int64_t own_blocks, chunks, chunk_len;
};

Side side_of(int64_t n_own, int64_t n_other, int64_t B) {
  Side s;
  s.own_blocks = (n_own + kThreads - 1) / kThreads;
  const int64_t queries = B < kMaxGridYZ ? B : kMaxGridYZ;
  const int64_t tiles = (n_other + kThreads - 1) / kThreads;  // staged tiles of the other side
  int64_t chunks = (kTargetBlocks + s.own_blocks * queries - 1) / (s.own_blocks * queries);
  chunks = chunks < tiles ? chunks : tiles;
  chunks = chunks < kMaxChunks ? chunks : kMaxChunks;
  chunks = chunks > 1 ? chunks : 1;
  s.chunk_len = (tiles + chunks - 1) / chunks * kThreads;  // whole tiles per chunk
  s.chunks = (n_other + s.chunk_len - 1) / s.chunk_len;
  return s;
}

// Thread per "own" score o_i of query b (grid.z, looping past 65535 queries), walking the
// other side's chunk blockIdx.y with d = n_j - p_i: own = positives adds softplus(d) (the loss)
// and sigmoid(d); own = negatives adds sigmoid(d). grad_part[(chunk * B + b) * n_own + i] = the
// chunk's sum of sigmoid; for positives, loss_part[(b * chunks + chunk) * own_blocks +
// blockIdx.x] = the block's sum of softplus.
template <class T, bool kPositives>
__global__ void __launch_bounds__(kThreads)
    auc_side_kernel(const T* __restrict__ own, int64_t own_stride, int64_t n_own,
                    const T* __restrict__ other, int64_t other_stride, int64_t n_other, int64_t B,
                    int64_t chunk_len, float* __restrict__ grad_part, double* __restrict__ loss_part) {
  __shared__ float staged[kThreads];
  __shared__ double block_loss[kWarps];
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const bool live = i < n_own;
  const int64_t j_begin = int64_t(blockIdx.y) * chunk_len;
  const int64_t j_end = j_begin + chunk_len < n_other ? j_begin + chunk_len : n_other;
  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {  // the same b for the whole block
    const float oi = live ? load1(own + b * own_stride + i) : 0.f;
    const T* ot = other + b * other_stride;
    float sg_sum = 0.f;
    double sp_total = 0.0;  // float sums per staged tile, added in float64
    for (int64_t j0 = j_begin; j0 < j_end; j0 += kThreads) {
      const int64_t j = j0 + threadIdx.x;
      staged[threadIdx.x] = j < j_end ? load1(ot + j) : 0.f;
      __syncthreads();
      const int count = j_end - j0 < kThreads ? int(j_end - j0) : kThreads;
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
    if (live) grad_part[(int64_t(blockIdx.y) * B + b) * n_own + i] = sg_sum;
    if (!kPositives) continue;
    sp_total = block_sum(sp_total, block_loss);
    if (threadIdx.x == 0) loss_part[(b * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x] = sp_total;
  }
}

// grad[b, i] = sign * scale * the sum over the chunks of grad_part, in chunk order.
__global__ void auc_grad_kernel(const float* __restrict__ grad_part, int64_t chunks, int64_t B,
                                int64_t n_own, float signed_scale, float* __restrict__ grad) {
  const int64_t total = B * n_own;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t c = 0; c < chunks; ++c) s += grad_part[c * total + e];
    grad[e] = signed_scale * s;
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



}  // namespace
}  // namespace FL_ISA

AucCudaScratch auc_cuda_scratch(const AucProblem& q) {
  using namespace FL_ISA;
  const Side pos = side_of(q.P, q.N, q.B), neg = side_of(q.N, q.P, q.B);
  AucCudaScratch s;
  s.doubles = q.B * pos.chunks * pos.own_blocks;
  s.floats = q.B * (pos.chunks * q.P + neg.chunks * q.N);
  return s;
}

const char* auc_cuda(const AucProblem& q, float* loss, float* grad_pos, float* grad_neg,
                     double* loss_scratch, float* grad_scratch, void* stream) {
  using namespace FL_ISA;
  if (q.B == 0) return nullptr;
  const unsigned queries = unsigned(q.B < kMaxGridYZ ? q.B : kMaxGridYZ);
  auto s = static_cast<cudaStream_t>(stream);
  const double scale = 1.0 / (double(q.P) * double(q.N));
  const Side ps = side_of(q.P, q.N, q.B), ns = side_of(q.N, q.P, q.B);
  float* pos_part = grad_scratch;
  float* neg_part = grad_scratch + q.B * ps.chunks * q.P;
  visit_dtype(q.dtype, [&]<class T>() {
    const T* pos = static_cast<const T*>(q.pos);
    const T* neg = static_cast<const T*>(q.neg);
    auc_side_kernel<T, true><<<dim3(unsigned(ps.own_blocks), unsigned(ps.chunks), queries), kThreads, 0, s>>>(
        pos, q.pos_stride, q.P, neg, q.neg_stride, q.N, q.B, ps.chunk_len, pos_part, loss_scratch);
    if (grad_neg)
      auc_side_kernel<T, false><<<dim3(unsigned(ns.own_blocks), unsigned(ns.chunks), queries), kThreads, 0, s>>>(
          neg, q.neg_stride, q.N, pos, q.pos_stride, q.P, q.B, ns.chunk_len, neg_part, nullptr);
  });
  if (const char* e = launch_status()) return e;
  if (grad_pos)
    auc_grad_kernel<<<blocks_for(q.B * q.P, kThreads), kThreads, 0, s>>>(pos_part, ps.chunks, q.B, q.P, float(-scale), grad_pos);
  if (grad_neg)
    auc_grad_kernel<<<blocks_for(q.B * q.N, kThreads), kThreads, 0, s>>>(neg_part, ns.chunks, q.B, q.N, float(scale), grad_neg);
  auc_loss_kernel<<<blocks_for(q.B, kThreads), kThreads, 0, s>>>(loss_scratch, q.B, ps.chunks * ps.own_blocks, scale, loss);
  return launch_status();
}

}  // namespace fastloss
