// What the CUDA kernel files share: scalar loads and stores of the storage types (float32 math
// inside), the dtype -> storage type dispatch, warp and block sums (and block min / max), an
// online log-sum-exp state, the grid size of a launch and its error.
// Torch-free; included only by .cu files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../losses/loss_params.h"  // ScalarType
#include "macros.h"

// The block's dynamic shared memory (the launch's third <<<>>> argument) as a T array named
// `name` (16-byte aligned); the tests' emulator hands out a per-launch buffer instead.
#if defined(__CUDACC__)
#define FL_DYNAMIC_SHARED(T, name)                                   \
  extern __shared__ __align__(16) unsigned char name##_dynamic_[]; \
  T* name = reinterpret_cast<T*>(name##_dynamic_)
#else
#define FL_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::emu::dynamic_shared())
#endif

namespace fastloss {
namespace FL_ISA {

__device__ __forceinline__ float load1(const float* p) { return __ldg(p); }
// 16-bit loads go through __ldg of unsigned short, a load the compiler knows as one: the
// __half / __nv_bfloat16 overloads of __ldg are inline assembly, which the compiler may hoist
// out of the branch that guards it (seen on an H200: a guarded load of a null pointer ran
// unconditionally in the convolution's half-precision forward and faulted).
__device__ __forceinline__ float load1(const __half* p) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}
__device__ __forceinline__ float load1(const __nv_bfloat16* p) {
  return __bfloat162float(__ushort_as_bfloat16(__ldg(reinterpret_cast<const unsigned short*>(p))));
}
// ask() (a yes / no about the current device that costs a driver call) asked once per device
// and remembered in `known` (0: not asked yet, 1: yes, -1: no); devices past the first 64 ask
// each time.
template <class Ask>
inline bool once_per_device(std::atomic<signed char> (&known)[64], Ask ask) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) {
    cudaGetLastError();
    return ask();
  }
  signed char v = known[device].load(std::memory_order_relaxed);
  if (v == 0) {
    v = ask() ? 1 : -1;
    known[device].store(v, std::memory_order_relaxed);
  }
  return v > 0;
}

// Lets Kernel launch with up to kBytes of dynamic shared memory (cudaFuncSetAttribute), once
// per device (the driver call costs microseconds, a batch-1 GEMV some tens of them); false
// where the device refuses (the error is cleared).
template <auto Kernel, int kBytes>
inline bool allow_dynamic_shared() {
  static std::atomic<signed char> known[64] = {};
  return once_per_device(known, [] {
    if (cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes) == cudaSuccess) return true;
    cudaGetLastError();
    return false;
  });
}

// Whether the current device lets a block opt in to `bytes` of shared memory.
inline bool shared_optin_at_least(int bytes) {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return optin >= bytes;
}

// Asynchronous 16-byte copies global -> shared (cp.async, sm_80 and later), committed in groups:
// cp_async_wait<N>() returns once at most the N newest committed groups are still in flight;
// what the copies wrote is then visible to the calling thread, and to the block after a
// __syncthreads. Why: the bytes in flight hold no registers, so a kernel can keep several steps
// of loads outstanding (a multi-stage pipeline). Below sm_80 (compiled for the wheels' older
// targets, never run: such kernels check mma_available) a plain copy. The emulator lands each
// copy at the issuing thread's wait, or at once in its reordered schedules (emu.h), so a read
// without the wait and the barrier, or a copy into a buffer other threads still read, shows.
// kL1: through L1 (cp.async.ca; for copies that use part of a sector, whose rest another warp
// copies soon after), else L2 only (.cg).
template <bool kL1 = false>
__device__ __forceinline__ void cp_async16(void* shared_dst, const void* global_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  if constexpr (kL1)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src) : "memory");
  else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src) : "memory");
#elif defined(__CUDA_ARCH__)
  *static_cast<uint4*>(shared_dst) = *static_cast<const uint4*>(global_src);
#elif !defined(__CUDACC__)
  ::emu::cp_async(shared_dst, global_src, 16);
#endif
}
// The same for 4 bytes (cp.async.ca: through L1; both addresses 4-byte aligned).
__device__ __forceinline__ void cp_async4(void* shared_dst, const void* global_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(global_src) : "memory");
#elif defined(__CUDA_ARCH__)
  *static_cast<uint32_t*>(shared_dst) = *static_cast<const uint32_t*>(global_src);
#elif !defined(__CUDACC__)
  ::emu::cp_async(shared_dst, global_src, 4);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif !defined(__CUDACC__)
  ::emu::cp_async_commit();
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif !defined(__CUDACC__)
  ::emu::cp_async_wait(N);
#endif
}
// cp_async_wait<n>() for a count known only at run time, 0 <= n <= 7 (the instruction takes
// an immediate); larger n wait as for 7, negative n as for 0 (waiting longer is always safe).
__device__ __forceinline__ void cp_async_wait_dynamic(int n) {
  switch (n < 0 ? 0 : n) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    case 5: cp_async_wait<5>(); break;
    case 6: cp_async_wait<6>(); break;
    default: cp_async_wait<7>(); break;
  }
}

__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Calls f.template operator()<T>() with T the CUDA storage type of dtype.
template <class F>
void visit_dtype(ScalarType t, F&& f) {
  switch (t) {
    case ScalarType::f32: return f.template operator()<float>();
    case ScalarType::f16: return f.template operator()<__half>();
    case ScalarType::bf16: return f.template operator()<__nv_bfloat16>();
  }
}

// The sum of v over the 32 lanes of a warp (a butterfly: every lane gets it); every lane of the
// warp must call it.
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// The sum of v over the threads of a one-dimensional block of a whole number of warps, in a
// fixed order (warp shuffles, then the warps in order); every thread gets it and must call it.
// `shared` holds blockDim.x / 32 values, free again when the call returns.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) total += shared[w];
  __syncthreads();
  return total;
}

// The minimum / maximum of v over a one-dimensional block, as block_sum (fminf / fmaxf: a NaN
// gives way to a number).
struct MinOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fminf(a, b); }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
template <class Op>
__device__ __forceinline__ float block_reduce(float v, float* shared, Op op) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  float total = shared[0];
  for (int w = 1; w < int(blockDim.x / 32); ++w) total = op(total, shared[w]);
  __syncthreads();
  return total;
}

// Exponentials for OnlineLse: the fast intrinsic (about 2 ulp, float) or the accurate libm
// functions (float or double).
struct FastExp {
  __device__ __forceinline__ float operator()(float x) const { return __expf(x); }
};
struct AccurateExp {
  __device__ __forceinline__ float operator()(float x) const { return expf(x); }
  __device__ __forceinline__ double operator()(double x) const { return exp(x); }
};

// Online log-sum-exp of a stream of v with a weighted sum: m = max v, z = sum e^(v - m),
// w = sum e^(v - m) c, one read of the stream; states merge in any order. The empty state's m
// is the lowest finite T, so that e^(-inf - m) = 0 and no inf - inf appears.
template <class T, class Exp>
struct OnlineLse {
  T m = std::numeric_limits<T>::lowest(), z = 0, w = 0;
  __device__ __forceinline__ void add(T v, T c) {
    if (v > m) {
      const T r = Exp()(m - v);
      z = z * r + T(1);
      w = w * r + c;
      m = v;
    } else {
      const T e = Exp()(v - m);
      z += e;
      w += e * c;
    }
  }
  __device__ __forceinline__ void merge(T om, T oz, T ow) {
    const T mm = m > om ? m : om, ra = Exp()(m - mm), rb = Exp()(om - mm);
    z = z * ra + oz * rb;
    w = w * ra + ow * rb;
    m = mm;
  }
  __device__ __forceinline__ void merge(const OnlineLse& o) { merge(o.m, o.z, o.w); }
  // The state of lane (this lane ^ lane_mask) of the warp; every lane must call it.
  __device__ __forceinline__ OnlineLse shuffled(int lane_mask) const {
    OnlineLse o;
    o.m = __shfl_xor_sync(0xffffffffu, m, lane_mask);
    o.z = __shfl_xor_sync(0xffffffffu, z, lane_mask);
    o.w = __shfl_xor_sync(0xffffffffu, w, lane_mask);
    return o;
  }
};

// Blocks for `items` work items, `per_block` a block: at least one, at most 2^20 (the kernels
// stride over the rest).
inline unsigned blocks_for(int64_t items, int64_t per_block) {
  const int64_t b = (items + per_block - 1) / per_block;
  int64_t cap = int64_t(1) << 20;
#if !defined(__CUDACC__)
  if (emu::grid_cap > 0) cap = emu::grid_cap;  // the tests' emulator: blocks walk several items
#endif
  return unsigned(b < cap ? (b > 0 ? b : 1) : cap);
}

// nullptr, or the text of the error of the launches so far (cudaGetLastError).
inline const char* launch_status() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

// The bits of v as a To of the same size (e.g. a __half2 as the uint32_t an mma register takes):
// a copy, not a read through a pointer of another type (no aliasing).
template <class To, class From>
__device__ __forceinline__ To bits_as(const From& v) {
  static_assert(sizeof(To) == sizeof(From));
  To r;
  memcpy(&r, &v, sizeof r);
  return r;
}

}  // namespace FL_ISA
}  // namespace fastloss
