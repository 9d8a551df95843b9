// CUDA kernels of the depthwise dilated convolution (tcn_kernels.h), compiled with FL_ISA=cuda.
//
// Both memory layouts are seen as rows of a contiguous inner axis: channels first, a row is
// (b, c) and the inner axis t; channels last, a row is (b, t) and the inner axis c. A block is
// tx x ty threads: ty rows at a time, tx threads along the inner axis (fewer than a warp for
// short rows), each thread owning kPerThread inner elements tx apart, so that every load of a
// warp (x at each tap, the residual, the output) is made of contiguous runs. Taps past the
// sequence's ends multiply the padding's zeros. The taps
// are re-read from L1 / L2 rather than staged in shared memory: each x element is read K times
// by the block (or its neighbour along t) but reaches DRAM about once.
//
// The taps' gradient is reduced without atomics: each block writes one partial sum per (group
// of its rows, channel, tap) into a float32 scratch, and a second kernel adds the partials of
// each (channel, tap), a warp per pair, in a fixed order in float64. The grid depends only on the shape, so the
// result does not depend on the GPU or on scheduling (deterministic).
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_helpers.cuh"
#include "../common/vec_scalar.h"
#include "activations.h"
#include "tcn_kernels.h"

namespace fastloss {
namespace FL_ISA {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;       // inner elements per thread, tx apart
constexpr int kTapChunk = 4;        // taps accumulated in registers per pass of the gradient
constexpr int64_t kMaxGridY = 65535;
// The taps' gradient: blocks along t (channels first), blocks across the positions and the
// fewest positions per thread (channels last), the number of partial sums per (channel, tap)
// and the blocks a launch aims for when the batch can be split (channels first). They bound the
// partial sums to a fraction of x.
constexpr int64_t kMaxTilesX = 256;
constexpr int64_t kMaxRowGroups = 1024;
constexpr int64_t kMinRowsPerThread = 32;
constexpr int64_t kMaxPartials = 1024;
constexpr int64_t kTargetBlocks = 2048;

// The launch shape for `rows` rows of `inner` elements: whole warps along rows of at least
// 32 * kPerThread elements; below that the fewest threads (a power of two, at least min_tx)
// that cover a row, so that a warp spans several rows (adjacent in memory when the inner axis
// is the channels of a channels-last tensor) instead of leaving most of its lanes idle. The
// kernels that reduce along x by warp shuffles ask for min_tx = 32.
struct Geometry {
  int tx = 32, ty = 8;
  int64_t tiles = 1;   // blocks along the inner axis (grid.x) before any cap
  int64_t row_blocks = 1;  // ceil(rows / ty)
};

Geometry geometry(int64_t rows, int64_t inner, int min_tx) {
  Geometry g;
  const int64_t lanes = (inner + kPerThread - 1) / kPerThread;  // threads that cover a row
  if (lanes >= 32) {
    const int64_t warps = (lanes + 31) / 32;
    g.tx = 32 * int(warps > kThreads / 32 ? kThreads / 32 : warps);
  } else {
    g.tx = min_tx;
    while (g.tx < lanes) g.tx *= 2;
  }
  g.ty = kThreads / g.tx;
  const int64_t tile = int64_t(g.tx) * kPerThread;
  g.tiles = (inner + tile - 1) / tile;
  g.row_blocks = (rows + g.ty - 1) / g.ty;
  return g;
}

int64_t rows_of(const SeqView& v) { return v.channels_last() ? v.B * v.L : v.B * v.C; }
int64_t inner_of(const SeqView& v) { return v.channels_last() ? v.C : v.L; }

// One row: its base offset and its fixed coordinate (c channels first, t channels last).
struct Row {
  int64_t base, fixed;
};
template <bool kCL>
__device__ __forceinline__ Row row_at(const SeqView& v, int64_t r) {
  if (kCL) return {(r / v.L) * v.sb + (r % v.L) * v.st, r % v.L};
  return {(r / v.C) * v.sb + (r % v.C) * v.sc, r % v.C};
}

// The epilogue of ConvTaps (tcn_kernels.h) on h, with `o` = other + the element's offset.
template <class T>
__device__ __forceinline__ float finish(float h, const ConvTaps& p, const T* o) {
  const Act act = Act(p.act);
  if (p.mode == 1) return load1(o) * act_derivative(h, act);
  const float y = act_apply(h, act);
  return o ? load1(o) + y : y;
}

template <bool kCL, class T>
__global__ void __launch_bounds__(kThreads)
    conv_forward_kernel(SeqView xv, ConvTaps p, T* __restrict__ y) {
  const T* __restrict__ x = static_cast<const T*>(xv.data);
  const T* o = static_cast<const T*>(p.other);
  const int64_t rows = kCL ? xv.B * xv.L : xv.B * xv.C, inner = kCL ? xv.C : xv.L;
  const int64_t jstride = kCL ? xv.sc : xv.st;  // stride of the inner index
  const int64_t j0 = int64_t(blockIdx.x) * blockDim.x * kPerThread + threadIdx.x;
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += int64_t(gridDim.y) * blockDim.y) {
    const Row row = row_at<kCL>(xv, r);
    float h[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t j = j0 + u * int64_t(blockDim.x);
      h[u] = (p.bias && j < inner) ? __ldg(p.bias + (kCL ? j : row.fixed)) : 0.f;
    }
    for (int64_t k = 0; k < p.K; ++k) {
      const int64_t shift = k * p.dilation - p.pad;  // input t + shift feeds output t
      // taps past the ends multiply the padding's zeros (as F.conv1d: a non-finite tap gives NaN)
      const bool row_in = !kCL || (row.fixed + shift >= 0 && row.fixed + shift < xv.L);
      const float w_row = kCL ? 0.f : __ldg(p.w + row.fixed * p.K + k);  // [C, K]
#pragma unroll
      for (int u = 0; u < kPerThread; ++u) {
        const int64_t j = j0 + u * int64_t(blockDim.x);
        if (j >= inner) continue;
        const bool in = row_in && (kCL || (j + shift >= 0 && j + shift < xv.L));
        const float w = kCL ? __ldg(p.w + k * xv.C + j) : w_row;  // [K, C] channels last
        h[u] = fmaf(w, in ? load1(x + row.base + j * jstride + shift * xv.st) : 0.f, h[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t j = j0 + u * int64_t(blockDim.x);
      if (j >= inner) continue;
      const int64_t off = row.base + j * jstride;
      store1(y + off, finish(h[u], p, o ? o + off : o));
    }
  }
}

// ---- the taps' gradient -------------------------------------------------------------------
// nt = K taps, or K + 1 when the bias's gradient is wanted: "tap" K stands for the bias, whose
// input is 1 (its gradient is the sum of grad_y). Partial sums are laid out [C, nt, P]: the P
// partials of one (channel, tap) are contiguous for the kernel that adds them.

// Sum of v over the tx threads of this thread's row of the block (tx a multiple of 32); the
// result is valid in the thread with threadIdx.x == 0. `scratch` holds kThreads / 32 floats.
__device__ __forceinline__ float sum_along_x(float v, float* scratch) {
  v = warp_sum(v);
  const int warp = (threadIdx.y * blockDim.x + threadIdx.x) / 32, per_row = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0)
    for (int i = 0; i < per_row; ++i) total += scratch[threadIdx.y * per_row + i];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

// Sum of v over the ty rows of the block for this thread's column, valid where threadIdx.y ==
// 0. `scratch` holds kThreads floats.
__device__ __forceinline__ float sum_along_y(float v, float* scratch) {
  scratch[threadIdx.y * blockDim.x + threadIdx.x] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.y == 0)
    for (int i = 0; i < int(blockDim.y); ++i) total += scratch[i * blockDim.x + threadIdx.x];
  __syncthreads();
  return total;
}

// Channels first. A block row owns ty channels (looping over the rest), a block column the
// tiles blockIdx.x, blockIdx.x + gridDim.x, ... of t, and a block layer the batch rows
// blockIdx.z, blockIdx.z + gridDim.z, ...: P = gridDim.x * gridDim.z partials.
template <class T>
__global__ void __launch_bounds__(kThreads, 2)  // <= 128 registers: 2 blocks per SM
    weight_grad_cf_kernel(SeqView xv, SeqView gv, int64_t K, int64_t nt, int64_t dilation,
                          int64_t pad, float* __restrict__ partial) {
  __shared__ float scratch[kThreads / 32];
  const T* __restrict__ x = static_cast<const T*>(xv.data);
  const T* __restrict__ g = static_cast<const T*>(gv.data);
  const int64_t C = xv.C, L = xv.L;
  const int64_t tile = int64_t(blockDim.x) * kPerThread;
  // Every thread of the block runs the same iterations of the loops that hold a reduction
  // (it syncs); a thread past the last channel adds nothing.
  for (int64_t c0 = int64_t(blockIdx.y) * blockDim.y; c0 < C; c0 += int64_t(gridDim.y) * blockDim.y) {
    const int64_t c = c0 + threadIdx.y;
    const bool live = c < C;
    for (int64_t k0 = 0; k0 < nt; k0 += kTapChunk) {
      float acc[kTapChunk] = {};
      for (int64_t b = blockIdx.z; live && b < xv.B; b += gridDim.z) {
        const T* xr = x + b * xv.sb + c * xv.sc;
        const T* gr = g + b * gv.sb + c * gv.sc;
        for (int64_t t0 = int64_t(blockIdx.x) * tile; t0 < L; t0 += int64_t(gridDim.x) * tile) {
#pragma unroll
          for (int u = 0; u < kPerThread; ++u) {
            const int64_t t = t0 + threadIdx.x + u * int64_t(blockDim.x);
            if (t >= L) continue;
            const float gt = load1(gr + t * gv.st);
#pragma unroll
            for (int q = 0; q < kTapChunk; ++q) {
              const int64_t k = k0 + q;
              const int64_t i = t + k * dilation - pad;
              if (k == K && k < nt) acc[q] += gt;
              else if (k < K && i >= 0 && i < L) acc[q] = fmaf(gt, load1(xr + i * xv.st), acc[q]);
            }
          }
        }
      }
#pragma unroll
      for (int q = 0; q < kTapChunk; ++q) {
        const float s = sum_along_x(acc[q], scratch);
        const int64_t P = int64_t(gridDim.x) * gridDim.z, p = int64_t(blockIdx.z) * gridDim.x + blockIdx.x;
        if (live && threadIdx.x == 0 && k0 + q < nt) partial[(c * nt + k0 + q) * P + p] = s;
      }
    }
  }
}

// Channels last. Block column blockIdx.x owns tx * kPerThread channels, block row blockIdx.y
// the positions (b, t) = rows blockIdx.y * ty + threadIdx.y + n * gridDim.y * ty:
// P = gridDim.y partials.
template <class T>
__global__ void __launch_bounds__(kThreads)
    weight_grad_cl_kernel(SeqView xv, SeqView gv, int64_t K, int64_t nt, int64_t dilation,
                          int64_t pad, float* __restrict__ partial) {
  __shared__ float scratch[kThreads];
  const T* __restrict__ x = static_cast<const T*>(xv.data);
  const T* __restrict__ g = static_cast<const T*>(gv.data);
  const int64_t rows = xv.B * xv.L, C = xv.C, L = xv.L;
  const int64_t j0 = int64_t(blockIdx.x) * blockDim.x * kPerThread + threadIdx.x;
  for (int64_t k0 = 0; k0 < nt; k0 += kTapChunk) {
    float acc[kTapChunk][kPerThread] = {};
    for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
         r += int64_t(gridDim.y) * blockDim.y) {
      const int64_t b = r / L, t = r % L;
      const T* gt = g + b * gv.sb + t * gv.st;
      float gj[kPerThread];
#pragma unroll
      for (int u = 0; u < kPerThread; ++u) {
        const int64_t j = j0 + u * int64_t(blockDim.x);
        gj[u] = j < C ? load1(gt + j * gv.sc) : 0.f;
      }
#pragma unroll
      for (int q = 0; q < kTapChunk; ++q) {
        const int64_t k = k0 + q, i = t + k * dilation - pad;
        if (k == K && k < nt) {
#pragma unroll
          for (int u = 0; u < kPerThread; ++u) acc[q][u] += gj[u];
        } else if (k < K && i >= 0 && i < L) {
          const T* xi = x + b * xv.sb + i * xv.st;
#pragma unroll
          for (int u = 0; u < kPerThread; ++u) {
            const int64_t j = j0 + u * int64_t(blockDim.x);
            if (j < C) acc[q][u] = fmaf(gj[u], load1(xi + j * xv.sc), acc[q][u]);
          }
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kTapChunk; ++q) {
#pragma unroll
      for (int u = 0; u < kPerThread; ++u) {
        const float s = sum_along_y(acc[q][u], scratch);
        const int64_t j = j0 + u * int64_t(blockDim.x);
        if (threadIdx.y == 0 && j < C && k0 + q < nt)
          partial[(j * nt + k0 + q) * gridDim.y + blockIdx.y] = s;
      }
    }
  }
}

// grad_w[c, k] (and grad_b[c] from "tap" K) = the sum of the P partials of (c, k): a warp per
// pair, each lane adding every 32nd partial in float64, then a fixed shuffle tree.
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const float* __restrict__ partial, int64_t P, int64_t C, int64_t K,
                        int64_t nt, float* __restrict__ gw, float* __restrict__ gb) {
  const int64_t n = C * nt, warps = int64_t(gridDim.x) * (blockDim.x / 32);
  const int lane = threadIdx.x % 32;
  for (int64_t e = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; e < n; e += warps) {
    double s = 0.0;
    for (int64_t q = lane; q < P; q += 32) s += double(partial[e * P + q]);
    s = warp_sum(s);
    if (lane != 0) continue;
    const int64_t c = e / nt, k = e % nt;
    if (k < K) gw[c * K + k] = float(s);
    else gb[c] = float(s);
  }
}

// The grid of the taps' gradient and the number P of partial sums it writes per (c, tap).
struct GradLaunch {
  Geometry g;
  dim3 grid;
  int64_t partials;
};

GradLaunch grad_launch(const SeqView& x) {
  GradLaunch l;
  if (x.channels_last()) {
    // At least kMinRowsPerThread positions per thread: the scratch stays a fraction of x.
    l.g = geometry(x.B * x.L, x.C, 1);
    const int64_t groups = (l.g.row_blocks + kMinRowsPerThread - 1) / kMinRowsPerThread;
    l.partials = groups < kMaxRowGroups ? groups : kMaxRowGroups;
    l.grid = dim3(unsigned(l.g.tiles), unsigned(l.partials));
  } else {
    l.g = geometry(x.C, x.L, 32);  // sum_along_x shuffles within warps of one row
    const int64_t tiles = l.g.tiles < kMaxTilesX ? l.g.tiles : kMaxTilesX;
    const int64_t rb = l.g.row_blocks < kMaxGridY ? l.g.row_blocks : kMaxGridY;
    // split the batch when the channels and tiles alone give few blocks
    int64_t batch_groups = (kTargetBlocks + tiles * rb - 1) / (tiles * rb);
    batch_groups = batch_groups < x.B ? batch_groups : x.B;
    batch_groups = batch_groups < kMaxPartials / tiles ? batch_groups : kMaxPartials / tiles;
    batch_groups = batch_groups > 1 ? batch_groups : 1;
    l.partials = tiles * batch_groups;
    l.grid = dim3(unsigned(tiles), unsigned(rb), unsigned(batch_groups));
  }
  return l;
}


}  // namespace
}  // namespace FL_ISA

const char* conv_forward_cuda(const SeqView& x, const ConvTaps& taps, void* y, void* stream) {
  using namespace FL_ISA;
  const int64_t rows = rows_of(x);
  if (rows == 0 || inner_of(x) == 0) return nullptr;
  const Geometry g = geometry(rows, inner_of(x), 1);
  const dim3 block(unsigned(g.tx), unsigned(g.ty));
  // grid.x: the inner axis is at most C (channels last, tx * kPerThread per block) or L.
  const dim3 grid(unsigned(g.tiles), unsigned(g.row_blocks < kMaxGridY ? g.row_blocks : kMaxGridY));
  if (g.tiles > 0x7fffffff) return "the sequence is too long for one grid (L / 1024 > 2^31)";
  auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(x.dtype, [&]<class T>() {
    if (x.channels_last())
      conv_forward_kernel<true, T><<<grid, block, 0, s>>>(x, taps, static_cast<T*>(y));
    else
      conv_forward_kernel<false, T><<<grid, block, 0, s>>>(x, taps, static_cast<T*>(y));
  });
  return launch_status();
}

int64_t conv_weight_grad_cuda_scratch(const SeqView& x, const ConvTaps& taps) {
  return FL_ISA::grad_launch(x).partials * x.C * (taps.K + 1);
}

const char* conv_weight_grad_cuda(const SeqView& x, const SeqView& grad_y, const ConvTaps& taps,
                                  float* grad_w, float* grad_b, float* scratch, void* stream) {
  using namespace FL_ISA;
  const int64_t K = taps.K, nt = K + (grad_b ? 1 : 0);
  if (x.C == 0 || nt == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const bool empty = x.B == 0 || x.L == 0;  // no partials: the sums are zeros
  const GradLaunch l = grad_launch(x);
  if (!empty) {
    if (l.g.tiles > 0x7fffffff) return "too many channels for one grid";
    const dim3 block(unsigned(l.g.tx), unsigned(l.g.ty));
    visit_dtype(x.dtype, [&]<class T>() {
      if (x.channels_last())
        weight_grad_cl_kernel<T><<<l.grid, block, 0, s>>>(x, grad_y, K, nt, taps.dilation, taps.pad, scratch);
      else
        weight_grad_cf_kernel<T><<<l.grid, block, 0, s>>>(x, grad_y, K, nt, taps.dilation, taps.pad, scratch);
    });
    if (const char* err = launch_status()) return err;
  }
  const int64_t warps_per_block = kThreads / 32, n = x.C * nt;
  const int64_t blocks = (n + warps_per_block - 1) / warps_per_block;
  sum_partials_kernel<<<unsigned(blocks < (1 << 20) ? blocks : (1 << 20)), kThreads, 0, s>>>(
      scratch, empty ? 0 : l.partials, x.C, K, nt, grad_w, grad_b);
  return launch_status();
}

}  // namespace fastloss
