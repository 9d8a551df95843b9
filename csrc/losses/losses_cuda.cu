// CUDA row-loss kernels. A group of threads owns one row: one warp for rows of up to 1024
// classes, the whole 256-thread block above that. The row is read in 16-byte packs
// (common/cuda_packs.cuh: consecutive threads on consecutive packs, several packs in flight per
// thread, the unaligned head and tail one element at a time). Statistics are merged by warp
// shuffles, then through shared memory. Compiled with FL_ISA=cuda; the loss math is the same
// loss_math.h as the CPU kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common/cuda_helpers.cuh"
#include "../common/cuda_packs.cuh"
#include "loss_math.h"
#include "losses_kernels.h"

namespace fastloss {
namespace FL_ISA {
namespace {

constexpr int kBlock = 256;
constexpr int kStageMargin = 4096;  // shared memory left to forward_backward_kernel's own

// N elements k != y into the statistics: the loss's add_block when it has one.
template <class L, class Acc, class Ctx, int N>
__device__ __forceinline__ void add_pack(Acc& acc, const float (&v)[N], const float (&w)[N],
                                         const Ctx& ctx) {
  if constexpr (requires { L::add_block(acc, v, w, ctx); }) {
    L::add_block(acc, v, w, ctx);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) L::add(acc, v[e], w[e], ctx);
  }
}

template <int N>
__device__ __forceinline__ void class_weights(const float* weight, int64_t k0, float (&w)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) w[e] = weight ? __ldg(weight + k0 + e) : 1.f;
}

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

// The statistics of row r (every thread of the group ends with the same merged values) and
// its result; `ctx` is the last pass's context. kStaged: the row's first `staged` packs go on
// chip at `stage` in the first pass (walk_row), for the passes and the backward after.
template <class L, class T, int kWarps, bool kStaged = false>
__device__ __forceinline__ RowResult row_forward(const T* x, int64_t C, int64_t y, float x_y,
                                                 float w_y, const RowTargets& rt,
                                                 const LossParams& p, int lane,
                                                 typename L::template Acc<float>* smem,
                                                 uint4* stage = nullptr, int64_t staged = 0) {
  using Acc = typename L::template Acc<float>;
  constexpr int kGroup = kWarps * 32;
  Acc acc;
  L::init(acc);
  typename L::Ctx ctx{};
  for (int pass = 0; pass < L::passes(p); ++pass) {
    ctx = L::make_ctx(p, pass, acc, x_y, C);
    Acc part;
    L::init(part);
    const auto on_pack = [&](int64_t k0, const float (&v)[kPack<T>]) {
      float w[kPack<T>];
      class_weights(rt.weight, k0, w);
      if (y - k0 >= 0 && y - k0 < kPack<T>) {  // the pack holding the target: y is fed apart
#pragma unroll
        for (int e = 0; e < kPack<T>; ++e)
          if (k0 + e != y) L::add(part, v[e], w[e], ctx);
      } else {
        add_pack<L>(part, v, w, ctx);
      }
    };
    const auto on_one = [&](int64_t k, float v) {
      if (k != y) L::add(part, v, rt.weight ? __ldg(rt.weight + k) : 1.f, ctx);
    };
    // (staged: the first pass puts the row on chip, later ones read it there)
    walk_row<kGroup, kStaged>(x, C, lane, on_pack, on_one, stage, staged, pass == 0);
    group_merge<L, kWarps>(part, smem);
    L::add_target(part, x_y, w_y, ctx);
    acc = part;
  }
  return L::finish(acc, ctx, p, x_y, w_y, C);
}

// Writes d(total)/d(logits) of row r from its per-row constants `b`.
template <int kGroup, bool kStaged = false, class T, class B>
__device__ __forceinline__ void row_backward(const T* x, T* out, int64_t C, int64_t y,
                                             const RowTargets& rt, const B& b, int lane,
                                             uint4* stage = nullptr, int64_t staged = 0) {
  const auto grad_one = [&](int64_t k, float v) {
    return k == y ? b.target_grad : family_grad(v, rt.weight ? __ldg(rt.weight + k) : 1.f, b);
  };
  if (((reinterpret_cast<uintptr_t>(out) ^ reinterpret_cast<uintptr_t>(x)) & 15) == 0) {
    // The gradient row has the logits row's alignment (always so for contiguous or in-place
    // gradients): its packs line up with the logits' packs.
    const auto on_pack = [&](int64_t k0, const float (&v)[kPack<T>]) {
      float w[kPack<T>], o[kPack<T>];
      class_weights(rt.weight, k0, w);
#pragma unroll
      for (int e = 0; e < kPack<T>; ++e)
        o[e] = k0 + e == y ? b.target_grad : family_grad(v[e], w[e], b);
      store_pack(reinterpret_cast<uint4*>(out + k0), pack<T>(o));
    };
    const auto on_one = [&](int64_t k, float v) { store1(out + k, grad_one(k, v)); };
    walk_row<kGroup, kStaged>(x, C, lane, on_pack, on_one, stage, staged);  // (staged: read on chip)
  } else {
    for (int64_t k = lane; k < C; k += kGroup) store1(out + k, grad_one(k, load1(x + k)));
  }
}

// A row whose target is ignore_index (loss and gradient 0) or out of range (NaN).
__device__ __forceinline__ bool skipped_row(int64_t y, int64_t C, const LossParams& p,
                                            float& fill) {
  if (y == p.ignore_index || y < 0 || y >= C) {  // ignore_index may be a class index
    fill = y == p.ignore_index ? 0.f : __int_as_float(0x7fc00000);
    return true;
  }
  return false;
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
    float fill;
    if (skipped_row(y, C, p, fill)) {
      if (lane == 0) {
        out.loss[r] = fill;
        out.stat0[r] = out.stat1[r] = 0.f;
      }
      continue;  // uniform across the group: every thread of it sees the same row
    }
    const T* x = static_cast<const T*>(lv.data) + r * lv.row_stride;
    const float x_y = load1(x + y);
    const float w_y = rt.weight ? rt.weight[y] : 1.f;
    const RowResult res = row_forward<L, T, kWarps>(x, C, y, x_y, w_y, rt, p, lane, smem);
    if (lane == 0) {
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
    float fill;
    if (skipped_row(y, C, p, fill)) {
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
    row_backward<kGroup>(x, out, C, y, rt, b, lane);
  }
}

// Forward and backward of each row back to back in one group of threads, so that the logits
// cross HBM once: kStaged (a block per row) keeps the row's first `staged` 16-byte packs in
// dynamic shared memory from the forward's first read to the backward (up to ~220 KB: whole
// rows of up to ~56k float32 / ~113k 16-bit classes); the rest of the row, and short rows (a
// warp each), are read again from global memory, which L2 may still hold. g.grad_loss is
// d(total)/d(row loss), known before the launch; g.stat0/1 unused.
// (On an H200 at f95b002, before the staging, the second read came from HBM: the kernel was no
// faster than the two-kernel path, 30-61% of the read-once-write-once floor at 8192 x 128256.)
template <class L, class T, int kWarps, int kThreads = kBlock, bool kStaged = false>
__global__ void __launch_bounds__(kThreads)
    forward_backward_kernel(LogitsView lv, RowTargets rt, LossParams p, RowStats out, RowGrad g,
                            int64_t staged) {
  using Acc = typename L::template Acc<float>;
  constexpr int kGroup = kWarps * 32, kGroupsPerBlock = kThreads / kGroup;
  static_assert(!kStaged || kGroupsPerBlock == 1, "staging needs the whole block on one row");
  __shared__ Acc smem[kWarps];
  uint4* stage = nullptr;
  if constexpr (kStaged) {
    FL_DYNAMIC_SHARED(uint4, dynamic);
    stage = dynamic;
  }
  const int lane = threadIdx.x % kGroup;
  const int64_t C = lv.cols;
  for (int64_t r = int64_t(blockIdx.x) * kGroupsPerBlock + threadIdx.x / kGroup; r < lv.rows;
       r += int64_t(gridDim.x) * kGroupsPerBlock) {
    T* grad = static_cast<T*>(g.grad_logits) + r * g.grad_row_stride;
    const int64_t y = rt.target[r];
    float fill;
    if (skipped_row(y, C, p, fill)) {
      if (lane == 0) {
        out.loss[r] = fill;
        out.stat0[r] = out.stat1[r] = 0.f;
      }
      for (int64_t k = lane; k < C; k += kGroup) store1(grad + k, fill);
      continue;
    }
    const T* x = static_cast<const T*>(lv.data) + r * lv.row_stride;
    const float x_y = load1(x + y);
    const float w_y = rt.weight ? rt.weight[y] : 1.f;
    // row_forward ends with a barrier of the group (its merge), after which no thread reads
    // the row's statistics again: the gradient may then overwrite the logits in place.
    const RowResult res = row_forward<L, T, kWarps, kStaged>(x, C, y, x_y, w_y, rt, p, lane, smem, stage, staged);
    if (lane == 0) {
      out.loss[r] = res.loss;
      out.stat0[r] = res.stat0;
      out.stat1[r] = res.stat1;
    }
    const auto b = L::make_bwd(p, g.grad_loss[r], res.stat0, res.stat1, x_y, w_y, C);
    // In place, x_y must be read by every thread before its owner overwrites it: the merge's
    // shuffles order no memory accesses, so a barrier (as backward_kernel has).
    if constexpr (kWarps > 1)
      __syncthreads();
    else
      __syncwarp();
    row_backward<kGroup, kStaged>(x, grad, C, y, rt, b, lane, stage, staged);
  }
}

// A kept row's weight in the mean's divisor (NaN for a target out of range: its loss is NaN)
__device__ __forceinline__ double kept_weight(const int64_t* target, const float* weight, int64_t r, int64_t C,
                                              int64_t ignore_index) {
  const int64_t y = target[r];
  if (y == ignore_index) return 0.0;
  return weight ? (y >= 0 && y < C ? double(weight[y]) : NAN) : 1.0;
}

// reduce_rows_cuda's and mean_factor_rows_cuda's block: each thread adds its rows (stride
// blockDim) in float64, then the block adds the threads' sums in a fixed order. rows null:
// only the kept rows' weight total (the mean's divisor), written to `factor` as its inverse
// for every row; else the sum of rows (divided by that total for the mean) to loss[0] and the
// total to denom[0] (mean only).
__global__ void __launch_bounds__(kBlock)
    reduce_rows_kernel(const float* __restrict__ rows, const int64_t* __restrict__ target,
                       const float* __restrict__ weight, int64_t N, int64_t C, int64_t ignore_index,
                       bool mean, float* __restrict__ loss, float* __restrict__ denom, float* __restrict__ factor) {
  __shared__ double sums[kBlock / 32];
  double total = 0.0, count = 0.0;
  for (int64_t r = threadIdx.x; r < N; r += blockDim.x) {
    if (rows) total += rows[r];
    if (mean) count += kept_weight(target, weight, r, C, ignore_index);
  }
  if (rows) total = block_sum(total, sums);
  if (mean) count = block_sum(count, sums);
  if (!rows) {
    for (int64_t r = threadIdx.x; r < N; r += blockDim.x) factor[r] = float(1.0 / count);
  } else if (threadIdx.x == 0) {
    loss[0] = float(mean ? total / count : total);  // (no kept row: 0 / 0, NaN as torch)
    if (mean) denom[0] = float(count);
  }
}

template <class T>
__global__ void __launch_bounds__(kBlock)
    upstream_rows_kernel(const T* __restrict__ grad, const float* __restrict__ denom, double divisor, int64_t n,
                         float* __restrict__ out) {
  const float g = float(double(load1(grad)) / (denom ? double(denom[0]) : divisor));
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < n; r += int64_t(gridDim.x) * blockDim.x)
    out[r] = g;
}

// Rows of data *= their factor unless it is exactly 1 (a whole block skips such a row: the
// branch is uniform); a block per row, striding over rows past the grid.
template <class T>
__global__ void __launch_bounds__(kBlock)
    scale_rows_unless_one_kernel(T* __restrict__ data, int64_t rows, int64_t cols,
                                 const float* __restrict__ factor, bool per_row) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float f = factor[per_row ? r : 0];
    if (f == 1.f) continue;
    T* row = data + r * cols;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) store1(row + j, load1(row + j) * f);
  }
}

}  // namespace
}  // namespace FL_ISA

const char* scale_rows_unless_one_cuda(void* data, ScalarType dtype, int64_t rows, int64_t cols,
                                       const float* factor, bool per_row, void* stream) {
  using namespace FL_ISA;
  if (rows == 0 || cols == 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(dtype, [&]<class T>() {
    scale_rows_unless_one_kernel<T><<<blocks_for(rows, 1), kBlock, 0, s>>>(static_cast<T*>(data), rows, cols,
                                                                          factor, per_row);
  });
  return launch_status();
}

const char* reduce_rows_cuda(const float* rows, const int64_t* target, const float* weight, int64_t N,
                             int64_t C, int64_t ignore_index, bool mean, float* loss, float* denom,
                             void* stream) {
  using namespace FL_ISA;
  reduce_rows_kernel<<<1, kBlock, 0, static_cast<cudaStream_t>(stream)>>>(rows, target, weight, N, C,
                                                                          ignore_index, mean, loss, denom, nullptr);
  return launch_status();
}

const char* mean_factor_rows_cuda(const int64_t* target, const float* weight, int64_t N, int64_t C,
                                  int64_t ignore_index, float* out, void* stream) {
  using namespace FL_ISA;
  if (N == 0) return nullptr;
  reduce_rows_kernel<<<1, kBlock, 0, static_cast<cudaStream_t>(stream)>>>(nullptr, target, weight, N, C,
                                                                          ignore_index, true, nullptr, nullptr, out);
  return launch_status();
}

const char* upstream_rows_cuda(const void* grad, ScalarType dtype, const float* denom, double divisor,
                               int64_t n, float* out, void* stream) {
  using namespace FL_ISA;
  if (n == 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(dtype, [&]<class T>() {
    upstream_rows_kernel<T><<<blocks_for(n, kBlock), kBlock, 0, s>>>(static_cast<const T*>(grad), denom,
                                                                     divisor, n, out);
  });
  return launch_status();
}

// Instantiates `launch` for the loss, the storage type and the row-group size (one warp for
// rows up to 1024 classes, the whole block above), and reports the launch's error.
template <class F>
const char* launch_rows(const LogitsView& lv, LossKind kind, F&& launch) {
  using namespace FL_ISA;
  if (lv.rows == 0) return nullptr;
  visit_loss(kind, [&]<class L>() {
    visit_dtype(lv.dtype, [&]<class T>() {
      if (lv.cols <= 1024)
        launch.template operator()<L, T, 1>(blocks_for(lv.rows, kBlock / 32));
      else
        launch.template operator()<L, T, 8>(blocks_for(lv.rows, 1));
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

const char* losses_forward_backward_cuda(const LogitsView& lv, const RowTargets& rt,
                                         const LossParams& p, const RowStats& out,
                                         const RowGrad& g, void* stream) {
  using namespace FL_ISA;
  const auto s = static_cast<cudaStream_t>(stream);
  if (lv.rows == 0) return nullptr;
  // Rows of more than 1024 classes: one 1024-thread block per row and one block per
  // multiprocessor, the row's first packs kept in as much shared memory as the device lets one
  // block have (less a margin for the kernel's own), while each multiprocessor still has 64 KB
  // of loads in flight. Short rows: a warp each, as in the other kernels.
  int device = 0, sms = 1, optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const int64_t stage_bytes = optin > kStageMargin ? int64_t(optin - kStageMargin) / 16 * 16 : 0;
  visit_loss(p.kind, [&]<class L>() {
    visit_dtype(lv.dtype, [&]<class T>() {
      if (lv.cols <= 1024) {
        forward_backward_kernel<L, T, 1><<<blocks_for(lv.rows, kBlock / 32), kBlock, 0, s>>>(
            lv, rt, p, out, g, 0);
        return;
      }
      const unsigned grid = unsigned(lv.rows < sms ? lv.rows : sms);
      const int64_t bytes = std::min<int64_t>(stage_bytes, (lv.cols + kPack<T> - 1) / kPack<T> * 16);
      if (bytes >= 16) {
        // The kernel's limit is set to the device's largest (the same value from every call and
        // thread: a call's own smaller size could undercut another thread's launch in between)
        const auto staged = forward_backward_kernel<L, T, 32, 1024, true>;
        if (cudaFuncSetAttribute(staged, cudaFuncAttributeMaxDynamicSharedMemorySize, int(stage_bytes)) ==
            cudaSuccess) {
          staged<<<grid, 1024, size_t(bytes), s>>>(lv, rt, p, out, g, bytes / 16);
          return;
        }
        (void)cudaGetLastError();  // (refused: the kernel that reads the row twice)
      }
      forward_backward_kernel<L, T, 32, 1024><<<grid, 1024, 0, s>>>(lv, rt, p, out, g, 0);
    });
  });
  return launch_status();
}

const char* losses_backward_cuda(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                                 const RowGrad& g, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  return launch_rows(lv, p.kind, [&]<class L, class T, int kWarps>(unsigned grid) {
    FL_ISA::backward_kernel<L, T, kWarps><<<grid, FL_ISA::kBlock, 0, s>>>(lv, rt, p, g);
  });
}

}  // namespace fastloss
