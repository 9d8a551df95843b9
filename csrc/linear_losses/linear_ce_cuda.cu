// The vocabulary-tile statistics of linear + cross-entropy (linear_ce_tile_stats) on tensor
// cores, the logits never leaving the chip: for float16 / bfloat16 hidden [N, D] and weight
// [V, D] (D a multiple of 8), per row the log-sum-exp of hidden @ weight^T + bias over the
// weight's classes (after the soft cap), the target's logit, and the class-weighted sum of the
// logits (label smoothing). The tile path it replaces on CUDA formed [N, tile] float32 logits
// with cuBLAS and reduced them in a few more passes over that buffer.
//
// A block takes 64 rows and one split of the vocabulary, walks it in tiles of 64 classes, and
// forms each 64 x 64 logit tile with mma.sync m16n8k16 (4 warps, each 16 rows x 64 classes;
// K in steps of 32 through shared memory, 16-byte loads, the next step's loads in flight during
// the multiplies). Each lane keeps an online log-sum-exp of its two rows' 16 columns per tile;
// the quad's lanes merge at the end, and a second kernel merges the splits in split order (the
// same bits on every run). Each logit is rounded to the input dtype as the tile path's GEMM
// writes it (the backward forms its tiles with cuBLAS: the statistics must be of the same
// logits). Ran on an H200 at f95b002 (its CUDA tests pass; low_memory linear cross-entropy with
// it, forward + backward, 0.30-0.32x eager's time there: bench/results/linear_losses_cuda.json).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../common/cuda_helpers.cuh"
#include "../common/mma.cuh"
#include "linear_ce_kernels.h"

namespace fastloss {
namespace FL_ISA {
namespace {

constexpr int kRows = 64, kCols = 64, kK = 32, kThreads = 128;
constexpr int kLd = kK + 8;  // 16-bit elements per shared row (80 bytes: conflict-free fragments)

struct alignas(16) Tiles {
  uint16_t h[kRows][kLd];
  uint16_t w[kCols][kLd];
};

// What a thread loads from global memory for one K step: 2 x 8 values of hidden, 2 x 8 of weight.
struct Loaded {
  uint4 h[2], w[2];
};

__device__ __forceinline__ void load_step(const uint16_t* __restrict__ hidden, const uint16_t* __restrict__ weight,
                                          int64_t N, int64_t D, int64_t V, int64_t r0, int64_t c0, int64_t k0,
                                          Loaded& l) {
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int item = int(threadIdx.x) + it * kThreads, row = item / (kK / 8), col = (item % (kK / 8)) * 8;
    const int64_t k = k0 + col;  // D % 8 == 0: a piece is all inside or all outside
    const int64_t r = r0 + row, c = c0 + row;
    l.h[it] = r < N && k < D ? __ldg(reinterpret_cast<const uint4*>(hidden + r * D + k)) : make_uint4(0, 0, 0, 0);
    l.w[it] = c < V && k < D ? __ldg(reinterpret_cast<const uint4*>(weight + c * D + k)) : make_uint4(0, 0, 0, 0);
  }
}

__device__ __forceinline__ void store_step(const Loaded& l, Tiles& t) {
#pragma unroll
  for (int it = 0; it < 2; ++it) {
    const int item = int(threadIdx.x) + it * kThreads, row = item / (kK / 8), col = (item % (kK / 8)) * 8;
    *reinterpret_cast<uint4*>(&t.h[row][col]) = l.h[it];
    *reinterpret_cast<uint4*>(&t.w[row][col]) = l.w[it];
  }
}

// One lane's running statistics of one row: online log-sum-exp (max m, sum s of e^(z - m)),
// the target's logit, the weighted sum of the logits.
// A NaN logit makes the row's log-sum-exp NaN and a +inf one +inf, as torch's logsumexp: m
// carries them (s is then unused).
struct RowStat {
  float m = -INFINITY, s = 0.f, zy = 0.f, wz = 0.f;
  __device__ __forceinline__ void merge(float om, float os) {
    if (m != m || om != om) {
      m = __int_as_float(0x7fc00000);
      return;
    }
    if (m == INFINITY || om == INFINITY) {
      m = INFINITY;
      return;
    }
    const float nm = fmaxf(m, om);
    if (nm == -INFINITY) return;  // both empty
    s = s * __expf(m - nm) + os * __expf(om - nm);
    m = nm;
  }
  __device__ __forceinline__ float lse() const { return m != m || m == INFINITY ? m : m + logf(s); }
};

// a float32 logit rounded to the inputs' dtype, as the GEMM of the tile path (and of the
// backward, which forms the tiles again with cuBLAS) writes it: both passes see the same logits
__device__ __forceinline__ float round_to(float v, const __half*) { return __half2float(__float2half_rn(v)); }
__device__ __forceinline__ float round_to(float v, const __nv_bfloat16*) {
  return __bfloat162float(__float2bfloat16_rn(v));
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(LinearCeStatsArgs a, float* __restrict__ partial, int64_t tiles_per_split) {
  __shared__ Tiles tiles;
  const auto* hidden = static_cast<const uint16_t*>(a.hidden);
  const auto* weight = static_cast<const uint16_t*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  const int64_t r0 = int64_t(blockIdx.x) * kRows;
  const int64_t tiles_all = (a.V + kCols - 1) / kCols;
  const int64_t tile0 = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile1 = tile0 + tiles_per_split < tiles_all ? tile0 + tiles_per_split : tiles_all;
  const int64_t steps = (a.D + kK - 1) / kK;
  // this lane's two rows (g and g + 8 of the warp's 16)
  const int64_t rows[2] = {r0 + warp * 16 + g, r0 + warp * 16 + g + 8};
  int64_t local_y[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) local_y[h] = rows[h] < a.N ? a.target[rows[h]] - a.class_offset : -1;
  RowStat st[2];
  for (int64_t tile = tile0; tile < tile1; ++tile) {
    const int64_t c0 = tile * kCols;
    float acc[8][4];
#pragma unroll
    for (int ni = 0; ni < 8; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[ni][r] = 0.f;
    Loaded l;
    load_step(hidden, weight, a.N, a.D, a.V, r0, c0, 0, l);
    for (int64_t step = 0; step < steps; ++step) {
      store_step(l, tiles);
      __syncthreads();
      if (step + 1 < steps) load_step(hidden, weight, a.N, a.D, a.V, r0, c0, (step + 1) * kK, l);
#pragma unroll
      for (int kk = 0; kk < kK; kk += 16) {
        uint32_t af[4], bf[2];
        load_a_fragment<kLd>(af, tiles.h, warp * 16, kk, lane);
#pragma unroll
        for (int ni = 0; ni < 8; ++ni) {
          load_b_fragment<kLd>(bf, tiles.w, ni * 8, kk, lane);
          mma_m16n8k16<T>(acc[ni], af, bf);
        }
      }
      __syncthreads();  // the tiles are rewritten by the next step
    }
    // the tile's logits of this lane: rows g / g + 8, columns c0 + ni 8 + 2 t + {0, 1}
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float z[16], tile_max = -INFINITY;
#pragma unroll
      for (int ni = 0; ni < 8; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t c = c0 + ni * 8 + 2 * t + e;
          float v = acc[ni][2 * h + e];
          if (c < a.V) {
            if (bias) v += load1(bias + c);
            v = round_to(v, static_cast<const T*>(nullptr));
            if (a.softcap > 0.f) v = a.softcap * tanhf(v / a.softcap);
            if (c == local_y[h]) st[h].zy = v;
            if (a.weighted_sum) st[h].wz += (a.class_weight ? a.class_weight[c] : 1.f) * v;
          } else {
            v = -INFINITY;  // a column past the vocabulary
          }
          z[ni * 2 + e] = v;
          tile_max = v != v || tile_max != tile_max ? __int_as_float(0x7fc00000) : fmaxf(tile_max, v);
        }
      float sum = 0.f;
      if (tile_max > -INFINITY && tile_max < INFINITY)  // (NaN / +inf: carried by m alone)
#pragma unroll
        for (int e = 0; e < 16; ++e) sum += __expf(z[e] - tile_max);
      st[h].merge(tile_max, sum);
    }
  }
  // merge the quad's four lanes (the row's 64 columns of every tile), then write the split
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, st[h].m, off), os = __shfl_xor_sync(0xffffffffu, st[h].s, off);
      st[h].merge(om, os);
      st[h].zy += __shfl_xor_sync(0xffffffffu, st[h].zy, off);
      st[h].wz += __shfl_xor_sync(0xffffffffu, st[h].wz, off);
    }
    if (t == 0 && rows[h] < a.N) {
      float* p = partial + (int64_t(blockIdx.y) * a.N + rows[h]) * 4;
      p[0] = st[h].m;
      p[1] = st[h].s;
      p[2] = st[h].zy;
      p[3] = st[h].wz;
    }
  }
}

// out [N, 3] = (log-sum-exp, target logit, weighted sum) from the splits' partial states
__global__ void __launch_bounds__(256)
    merge_kernel(const float* __restrict__ partial, int splits, int64_t N, float* __restrict__ out) {
  for (int64_t r = int64_t(blockIdx.x) * 256 + threadIdx.x; r < N; r += int64_t(gridDim.x) * 256) {
    RowStat st;
    for (int z = 0; z < splits; ++z) {
      const float* p = partial + (int64_t(z) * N + r) * 4;
      st.merge(p[0], p[1]);
      st.zy += p[2];
      st.wz += p[3];
    }
    out[r * 3] = st.lse();
    out[r * 3 + 1] = st.zy;
    out[r * 3 + 2] = st.wz;
  }
}

}  // namespace
}  // namespace FL_ISA

int linear_ce_stats_splits(int64_t N, int64_t V) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // enough blocks to fill the GPU twice over, each split at least 8 tiles of 64 classes
  const int64_t row_blocks = (N + FL_ISA::kRows - 1) / FL_ISA::kRows, tiles = (V + FL_ISA::kCols - 1) / FL_ISA::kCols;
  int64_t s = (2 * int64_t(sms > 0 ? sms : 1) + row_blocks - 1) / row_blocks;
  const int64_t by_tiles = tiles / 8 > 0 ? tiles / 8 : 1;
  s = s < by_tiles ? s : by_tiles;
  s = s < 65535 ? s : 65535;
  return int(s > 0 ? s : 1);
}

bool linear_ce_stats_available() { return FL_ISA::mma_available<FL_ISA::stats_kernel<__half>>(); }

const char* linear_ce_stats_cuda(const LinearCeStatsArgs& a, float* partial, int splits, float* out,
                                 void* stream) {
  if (a.N == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t tiles = (a.V + FL_ISA::kCols - 1) / FL_ISA::kCols, per_split = (tiles + splits - 1) / splits;
  const dim3 grid(unsigned((a.N + FL_ISA::kRows - 1) / FL_ISA::kRows), unsigned(splits));
  if (a.dtype == ScalarType::f16)
    FL_ISA::stats_kernel<__half><<<grid, FL_ISA::kThreads, 0, s>>>(a, partial, per_split);
  else
    FL_ISA::stats_kernel<__nv_bfloat16><<<grid, FL_ISA::kThreads, 0, s>>>(a, partial, per_split);
  FL_ISA::merge_kernel<<<FL_ISA::blocks_for(a.N, 256), 256, 0, s>>>(partial, splits, a.N, out);
  return FL_ISA::launch_status();
}

}  // namespace fastloss
