// CUDA row-loss kernels. A group of threads owns one row: one warp for rows of up to 1024
// classes, the whole 256-thread block above that. Consecutive threads read consecutive
// columns (coalesced); statistics are merged by warp shuffles, then through shared memory.
// Compiled with FL_ISA=cuda; the loss math is the same loss_math.h as the CPU kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "loss_math.h"
#include "losses_kernels.h"

namespace fastloss {
namespace FL_ISA {
namespace {

constexpr int kBlock = 256;

__device__ __forceinline__ float load1(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load1(const __half* p) { return __half2float(__ldg(p)); }
__device__ __forceinline__ float load1(const __nv_bfloat16* p) {
  return __bfloat162float(__ldg(p));
}
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Merge an accumulator (a struct of floats) across the 32 lanes of a warp; lane 0's result is
// then broadcast so every lane holds bit-identical statistics (ALDR's second pass needs that).
template <class L, class Acc>
__device__ __forceinline__ void warp_merge(Acc& a) {
  constexpr int kMembers = int(sizeof(Acc) / sizeof(float));
  float* f = reinterpret_cast<float*>(&a);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Acc o;
    float* of = reinterpret_cast<float*>(&o);
#pragma unroll
    for (int m = 0; m < kMembers; ++m) of[m] = __shfl_xor_sync(0xffffffffu, f[m], off);
    L::merge(a, o);
  }
#pragma unroll
  for (int m = 0; m < kMembers; ++m) f[m] = __shfl_sync(0xffffffffu, f[m], 0);
}

// Merge across the threads of a row group: a warp (kWarps = 1) or the whole block (kWarps = 8).
template <class L, int kWarps, class Acc>
__device__ __forceinline__ void group_merge(Acc& a, Acc* smem) {
  warp_merge<L>(a);
  if constexpr (kWarps > 1) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) smem[warp] = a;
    __syncthreads();
    if (warp == 0) {
      Acc b;
      L::init(b);
      if (lane < kWarps) b = smem[lane];
      warp_merge<L>(b);
      if (lane == 0) smem[0] = b;
    }
    __syncthreads();
    a = smem[0];
    __syncthreads();  // smem is reused by the next row
  }
}

template <class L, class T, int kWarps>
__global__ void __launch_bounds__(kBlock)
    forward_kernel(LogitsView lv, RowTargets rt, LossParams p, RowStats out) {
  using Acc = typename L::template Acc<float>;
  constexpr int kGroup = kWarps * 32, kGroupsPerBlock = kBlock / kGroup;
  __shared__ Acc smem[kWarps];
  const int lane = threadIdx.x % kGroup;
  const int64_t C = lv.cols;
  for (int64_t r = int64_t(blockIdx.x) * kGroupsPerBlock + threadIdx.x / kGroup; r < lv.rows;
       r += int64_t(gridDim.x) * kGroupsPerBlock) {
    const int64_t y = rt.target[r];
    if (y == p.ignore_index || y < 0 || y >= C) {
      if (lane == 0) {
        const float v = y == p.ignore_index ? 0.f : __int_as_float(0x7fc00000);
        out.loss[r] = v;
        out.stat0[r] = out.stat1[r] = 0.f;
      }
      continue;  // uniform across the group: every thread of it sees the same row
    }
    const T* x = static_cast<const T*>(lv.data) + r * lv.row_stride;
    const float x_y = load1(x + y);
    const float w_y = rt.weight ? rt.weight[y] : 1.f;
    Acc acc;
    L::init(acc);
    typename L::Ctx ctx{};
    for (int pass = 0; pass < L::passes(p); ++pass) {
      ctx = L::make_ctx(p, pass, acc, x_y, C);
      Acc part;
      L::init(part);
      for (int64_t k = lane; k < C; k += kGroup) {
        if (k == y) continue;
        L::add(part, load1(x + k), rt.weight ? rt.weight[k] : 1.f, ctx);
      }
      group_merge<L, kWarps>(part, smem);
      L::add_target(part, x_y, w_y, ctx);
      acc = part;
    }
    if (lane == 0) {
      const RowResult res = L::finish(acc, ctx, p, x_y, w_y, C);
      out.loss[r] = res.loss;
      out.stat0[r] = res.stat0;
      out.stat1[r] = res.stat1;
    }
  }
}

template <class L, class T, int kWarps>
__global__ void __launch_bounds__(kBlock)
    backward_kernel(LogitsView lv, RowTargets rt, LossParams p, RowGrad g) {
  constexpr int kGroup = kWarps * 32, kGroupsPerBlock = kBlock / kGroup;
  const int lane = threadIdx.x % kGroup;
  const int64_t C = lv.cols;
  for (int64_t r = int64_t(blockIdx.x) * kGroupsPerBlock + threadIdx.x / kGroup; r < lv.rows;
       r += int64_t(gridDim.x) * kGroupsPerBlock) {
    T* out = static_cast<T*>(g.grad_logits) + r * g.grad_row_stride;
    const int64_t y = rt.target[r];
    if (y == p.ignore_index || y < 0 || y >= C) {  // ignore_index may be a class index
      const float fill = y == p.ignore_index ? 0.f : __int_as_float(0x7fc00000);
      for (int64_t k = lane; k < C; k += kGroup) store1(out + k, fill);
      continue;
    }
    const T* x = static_cast<const T*>(lv.data) + r * lv.row_stride;
    const float x_y = load1(x + y);
    const float w_y = rt.weight ? rt.weight[y] : 1.f;
    const auto b = L::make_bwd(p, g.grad_loss[r], g.stat0[r], g.stat1[r], x_y, w_y, C);
    // In place (grad_logits == logits), x_y must be read by every thread before its owner
    // overwrites it.
    if constexpr (kWarps > 1)
      __syncthreads();
    else
      __syncwarp();
    for (int64_t k = lane; k < C; k += kGroup) {
      const float v = k == y ? b.target_grad
                             : family_grad(load1(x + k), rt.weight ? rt.weight[k] : 1.f, b);
      store1(out + k, v);
    }
  }
}

template <class F>
void visit_dtype(ScalarType t, F&& f) {
  switch (t) {
    case ScalarType::f32: return f.template operator()<float>();
    case ScalarType::f16: return f.template operator()<__half>();
    case ScalarType::bf16: return f.template operator()<__nv_bfloat16>();
  }
}

// Grid: enough blocks to cover the rows, capped (the kernels stride over the rest).
unsigned grid_for(int64_t rows, int groups_per_block) {
  const int64_t blocks = (rows + groups_per_block - 1) / groups_per_block;
  return unsigned(blocks < (int64_t(1) << 20) ? blocks : (int64_t(1) << 20));
}

const char* launch_status() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace
}  // namespace FL_ISA

// Instantiates `launch` for the loss, the storage type and the row-group size (one warp for
// rows up to 1024 classes, the whole block above), and reports the launch's error.
template <class F>
const char* launch_rows(const LogitsView& lv, LossKind kind, F&& launch) {
  using namespace FL_ISA;
  if (lv.rows == 0) return nullptr;
  visit_loss(kind, [&]<class L>() {
    visit_dtype(lv.dtype, [&]<class T>() {
      if (lv.cols <= 1024)
        launch.template operator()<L, T, 1>(grid_for(lv.rows, kBlock / 32));
      else
        launch.template operator()<L, T, 8>(grid_for(lv.rows, 1));
    });
  });
  return launch_status();
}

const char* losses_forward_cuda(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                                const RowStats& out, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  return launch_rows(lv, p.kind, [&]<class L, class T, int kWarps>(unsigned grid) {
    FL_ISA::forward_kernel<L, T, kWarps><<<grid, FL_ISA::kBlock, 0, s>>>(lv, rt, p, out);
  });
}

const char* losses_backward_cuda(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                                 const RowGrad& g, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  return launch_rows(lv, p.kind, [&]<class L, class T, int kWarps>(unsigned grid) {
    FL_ISA::backward_kernel<L, T, kWarps><<<grid, FL_ISA::kBlock, 0, s>>>(lv, rt, p, g);
  });
}

}  // namespace fastloss
