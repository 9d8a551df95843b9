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

// Splits of `steps` K steps for `tiles` output tiles: one unless the tiles cannot fill the GPU
// twice over (a 4096-row layer has 64 tiles of 64 x 64 at batch <= 64 for 132 multiprocessors
// on an H100 / H200); then enough to, with at least kMinSplitSteps steps each, at most
// kMaxSplits, and no split left without steps.
constexpr int64_t kMinSplitSteps = 4, kMaxSplits = 16;
inline int quant_split_count(int64_t tiles, int64_t steps) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t target = 2 * int64_t(sms > 0 ? sms : 1);
  if (tiles >= target) return 1;
  int64_t s = (target + tiles - 1) / tiles;
  s = s < kMaxSplits ? s : kMaxSplits;
  const int64_t by_steps = steps / kMinSplitSteps;
  s = s < by_steps ? s : by_steps;
  if (s <= 1) return 1;
  const int64_t per_split = (steps + s - 1) / s;
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
