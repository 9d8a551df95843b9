// Kernels that break a CUDA rule on purpose, for the tests of the emulator itself
// (tests/test_cuda_emulation.py, through selftest_harness.cpp): each must be reported as an
// error, give NaN, or (lane_race) give results that depend on the thread order. Test code only.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/mma.cuh"

namespace selftest {

constexpr unsigned kFull = 0xffffffffu;

// After a shuffle, lane 0 writes shared memory that the other lanes read with no __syncwarp
// between (a race); with `sync`, the __syncwarp that makes it safe.
__global__ void lane_race_kernel(int* out, bool sync) {
  __shared__ int s;
  const int lane = int(threadIdx.x % 32);
  const int v = __shfl_xor_sync(kFull, lane, 1);
  if (lane == 0) s = 42 + v;
  if (sync) __syncwarp();
  out[threadIdx.x] = s;
}

// The two halves of a warp at full-mask shuffles of two different call sites.
__global__ void split_sites_kernel(int* out) {
  const int lane = int(threadIdx.x % 32);
  int v = lane;
  if (lane < 16)
    v = __shfl_xor_sync(kFull, v, 1) + 1000;
  else
    v = __shfl_xor_sync(kFull, v, 1) + 2000;
  out[threadIdx.x] = v;
}

// Half a warp at an mma.sync, the other half at a shuffle (as many lanes on each side).
__global__ void mma_vs_shuffle_kernel(int* out) {
  const int lane = int(threadIdx.x % 32);
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  const uint32_t a[4] = {0x3c003c00u, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u}, b[2] = {0x3c003c00u, 0x3c003c00u};
  if (lane < 16) {
    fastloss::FL_ISA::mma_m16n8k16<__half>(d, a, b);
    d[0] = __shfl_xor_sync(kFull, d[0], 1);
  } else {
    d[0] = __shfl_xor_sync(kFull, 1.f, 1);
    fastloss::FL_ISA::mma_m16n8k16<__half>(d, a, b);
  }
  out[threadIdx.x] = int(d[0]);
}

// A full-mask shuffle in every warp: launched with 48 threads, the second warp has 16 lanes.
__global__ void full_mask_kernel(int* out) { out[threadIdx.x] = __shfl_xor_sync(kFull, int(threadIdx.x), 1); }

// The mask of the lanes the warp has: right in a partial warp too.
__global__ void lanes_mask_kernel(int* out) {
  const unsigned left = blockDim.x - threadIdx.x / 32 * 32, lanes = left < 32 ? left : 32;
  const unsigned mask = lanes == 32 ? kFull : (1u << lanes) - 1u;
  out[threadIdx.x] = __shfl_xor_sync(mask, int(threadIdx.x), 1);
}

// Lanes 0-15 name the whole warp, lanes 16-31 only their half, at one shuffle.
__global__ void mask_mismatch_kernel(int* out) {
  const int lane = int(threadIdx.x % 32);
  out[threadIdx.x] = __shfl_xor_sync(lane < 16 ? kFull : 0xffff0000u, lane, 1);
}

// Lanes 0-15 exchange among themselves (mask 0xffff) while the others skip it: legal.
__global__ void half_warp_kernel(int* out) {
  const int lane = int(threadIdx.x % 32);
  int v = -lane;
  if (lane < 16) v = __shfl_xor_sync(0xffffu, lane, 1);
  out[threadIdx.x] = v;
}

// A vote of the lanes the warp has (every third lane true).
__global__ void ballot_kernel(int* out) {
  const unsigned left = blockDim.x - threadIdx.x / 32 * 32, lanes = left < 32 ? left : 32;
  out[threadIdx.x] = int(__ballot_sync(lanes == 32 ? kFull : (1u << lanes) - 1u, threadIdx.x % 3 == 0));
}

// The block's threads at two different __syncthreads.
__global__ void split_barrier_kernel(int* out) {
  if (threadIdx.x < 16)
    __syncthreads();
  else
    __syncthreads();
  out[threadIdx.x] = 1;
}

// Shared memory read before the block writes it (the previous block wrote it at its end).
__global__ void uninit_shared_kernel(float* out) {
  __shared__ float s[64];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x % 64];
  __syncthreads();
  s[threadIdx.x % 64] = 1.f;
}

// Launched with more threads than its bound.
__global__ void __launch_bounds__(64) bounded_kernel(int* out) { out[threadIdx.x] = 1; }

}  // namespace selftest

// Launches kernel `which` with `blocks` x `threads`; null or the launch's error.
inline const char* selftest_launch(int which, int blocks, int threads, void* out, int flag) {
  using namespace selftest;
  int* o = static_cast<int*>(out);
  switch (which) {
    case 0: lane_race_kernel<<<blocks, threads>>>(o, flag != 0); break;
    case 1: split_sites_kernel<<<blocks, threads>>>(o); break;
    case 2: mma_vs_shuffle_kernel<<<blocks, threads>>>(o); break;
    case 3: full_mask_kernel<<<blocks, threads>>>(o); break;
    case 4: lanes_mask_kernel<<<blocks, threads>>>(o); break;
    case 5: mask_mismatch_kernel<<<blocks, threads>>>(o); break;
    case 6: half_warp_kernel<<<blocks, threads>>>(o); break;
    case 7: split_barrier_kernel<<<blocks, threads>>>(o); break;
    case 8: uninit_shared_kernel<<<blocks, threads>>>(static_cast<float*>(out)); break;
    case 9: bounded_kernel<<<blocks, threads>>>(o); break;
    case 10: ballot_kernel<<<blocks, threads>>>(o); break;
    default: return "no such kernel";
  }
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
