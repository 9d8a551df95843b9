// Split-K for the tensor-core dequant GEMMs (quant_mma_cuda.cu, quant_gemm_pipe_cuda.cu): when
// a layer's output tiles are too few to fill the GPU (a 4096-row layer at small batches), K is
// split over blockIdx.z into a float32 workspace [splits, M, N] that reduce_splits adds up in
// split order (the same bits every run, no atomics). Torch-free; included only by .cu files.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_helpers.cuh"

namespace fastloss {
namespace {

// Splits of `steps` K steps for `tiles` output tiles of a kernel that runs `blocks_per_sm`
// blocks per multiprocessor: one when the tiles fill the GPU; else the count of the fewest
// step-times, waves ceil(tiles s / slots) of ceil(steps / s) steps each (a ragged last wave
// costs as much as a full one: 32 tiles of 112 steps on 132 multiprocessors at one block each
// take 39 step-times in 9 splits, 28 in 4), each split at least kMinSplitSteps steps, at most
// kMaxSplits, none left without steps.
constexpr int64_t kMinSplitSteps = 4, kMaxSplits = 16;
inline int quant_split_count(int64_t tiles, int64_t steps, int blocks_per_sm) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t slots = int64_t(sms > 0 ? sms : 1) * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  if (tiles >= slots) return 1;
  int64_t best = 1, best_cost = steps;
  for (int64_t s = 2; s <= kMaxSplits && (steps + s - 1) / s >= kMinSplitSteps; ++s) {
    const int64_t cost = (tiles * s + slots - 1) / slots * ((steps + s - 1) / s);
    if (cost < best_cost) best = s, best_cost = cost;
  }
  const int64_t per_split = (steps + best - 1) / best;
  return int((steps + per_split - 1) / per_split);
}

// y = the splits' partial sums in split order + bias
template <class T>
__global__ void __launch_bounds__(256)
    reduce_splits(const float* __restrict__ partial, int splits, int64_t M, int64_t N,
                  const float* __restrict__ bias, T* __restrict__ y) {
  const int64_t total = M * N, stride = int64_t(gridDim.x) * 256;
  for (int64_t e = int64_t(blockIdx.x) * 256 + threadIdx.x; e < total; e += stride) {
    float v = bias ? bias[e % N] : 0.f;
    for (int z = 0; z < splits; ++z) v += partial[int64_t(z) * total + e];
    FL_ISA::store1(y + e, v);
  }
}

}  // namespace
}  // namespace fastloss
