// Shared-memory tensor-core dequant GEMM, the path for batches above the GEMV's (M >
// kQuantMaxRows) with float16 / bfloat16 activations for the formats the pipelined GEMM
// (quant_gemm_pipe_cuda.cu) does not read: 3-bit, codebooks, 8-bit with bfloat16 x, plane
// lengths not a multiple of 16 (and every format under FASTLOSS_QUANT_GEMM=smem):
// y [M, N] = x [M, K] W^T (+ bias), W decoded from the packed layout (quant_kernels.h) into
// shared memory in x's dtype and never written to global memory.
//
// A block computes a 64 x 64 tile of y (64 rows of x, 64 output features) with 4 warps of
// 32 x 32 (2 x 4 mma m16n8k16 tiles each, common/mma.cuh). The reduction over K runs in steps
// of 32 values taken as whole units of the packed layout (4 plane positions of one group: 4 x
// planes values in one 32-bit word per plane set, three words at 3 bits), so a thread decodes
// its words with shifts and masks as the GEMV does. A step's 32 values of k are therefore not
// consecutive (k = g group + j P + i + t over the step's units, planes j and t < 4); x's
// columns are gathered into shared memory in the same order, and the sum does not care.
// Global loads of step s + 1 are issued before the multiplies of step s (register prefetch).
// When the output tiles are too few to fill the GPU (4096-row layers at small batches), K is
// split over blockIdx.z into a float32 workspace that a second kernel adds up in order.
// Weights are rounded to x's dtype before the multiply, as a float16 / bfloat16 matmul of the
// dequantized weights would; accumulation is float32.
//
// On an H200 at f95b002 (before the pipelined GEMM, when this kernel ran every format):
// 0.05-0.31x cuBLAS float16 at batch 64-256 (8192 x 28672 4-bit: 0.63 ms at 64, 3.2 at 256).
// Plane lengths that are not a multiple of 4 and float32 activations keep the dequantize +
// cuBLAS path (quant_op.cpp).
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_helpers.cuh"
#include "../common/mma.cuh"
#include "quant_decode.cuh"
#include "quant_kernels.h"
#include "quant_split_k.cuh"

namespace fastloss {
namespace {
using FL_ISA::bits_as;
using FL_ISA::load_a_fragment;
using FL_ISA::load_b_fragment;
using FL_ISA::mma_m16n8k16;
using FL_ISA::store1;
using FL_ISA::Table;
using FL_ISA::unit_code;

constexpr int kBM = 64, kBN = 64, kBK = 32, kThreads = 128;
constexpr int kLd = kBK + 8;  // 16-bit elements per shared row: 80 bytes, conflict-free fragment loads

// The packed layout's units in one K step, and each thread's share of the loads.
template <int BITS>
struct StepShape {
  static constexpr int kPlanes = quant_planes(BITS);
  static constexpr int kPerUnit = 4 * kPlanes;                 // values of k in a unit
  static constexpr int kUnits = kBK / kPerUnit;                // units per step: 1 (3-bit) .. 8 (8-bit)
  static constexpr int kWords = BITS == 3 ? 3 : 1;             // 32-bit words per unit
  static constexpr int kWItems = (kBN * kUnits + kThreads - 1) / kThreads;  // units a thread decodes
  static constexpr int kXItems = kBM * kBK / 4 / kThreads;     // 4-value pieces of x a thread loads
};

// What a thread loads from global memory for one step, before it writes shared memory.
template <int BITS>
struct Fetched {
  using S = StepShape<BITS>;
  uint32_t words[S::kWItems][S::kWords];
  float s[S::kWItems], zs[S::kWItems];
  uint2 x[S::kXItems];  // 4 values of x in its 16-bit dtype
};

// The packed layout's geometry of one weight (int64: rows of K * bits / 8 bytes). A row's
// units number fewer than 2^32 (quant_mma_applies), so a unit's group is a 32-bit division
// (a 64-bit one is some 70 instructions, and fetch makes 5-6 per thread per step).
struct Geometry {
  int64_t G, P, units_per_group, units, row_bytes, group_bytes;
  __device__ __forceinline__ void unit(int64_t u, int64_t& g, int64_t& i) const {
    const uint32_t gu = uint32_t(u) / uint32_t(units_per_group);
    g = gu;
    i = (u - g * units_per_group) * 4;
  }
};

template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  return bits_as<uint32_t>(__floats2half2_rn(lo, hi));
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  return bits_as<uint32_t>(__floats2bfloat162_rn(lo, hi));
}

template <int BITS, class T>
__device__ __forceinline__ void fetch(const QuantWeight& w, const Geometry& geo, const T* __restrict__ x,
                                      int64_t M, int64_t m0, int64_t n0, int64_t step, Fetched<BITS>& f) {
  using S = StepShape<BITS>;
#pragma unroll
  for (int it = 0; it < S::kWItems; ++it) {
    const int item = int(threadIdx.x) + it * kThreads;
    const int64_t n = n0 + item / S::kUnits, u = step * S::kUnits + item % S::kUnits;
#pragma unroll
    for (int r = 0; r < S::kWords; ++r) f.words[it][r] = 0;
    f.s[it] = f.zs[it] = 0.f;  // a unit past the row or a row past N decodes to 0
    if (item >= kBN * S::kUnits || n >= w.N || u >= geo.units) continue;
    int64_t g, i;
    geo.unit(u, g, i);
    const uint8_t* b = w.q + n * geo.row_bytes + g * geo.group_bytes + i;
#pragma unroll
    for (int r = 0; r < S::kWords; ++r) f.words[it][r] = __ldg(reinterpret_cast<const uint32_t*>(b + r * geo.P));
    f.s[it] = __ldg(w.scale + n * geo.G + g);
    f.zs[it] = w.zero ? __ldg(w.zero + n * geo.G + g) * f.s[it] : 0.f;
  }
#pragma unroll
  for (int it = 0; it < S::kXItems; ++it) {
    const int item = int(threadIdx.x) + it * kThreads, piece = item % (kBK / 4);
    const int64_t m = m0 + item / (kBK / 4), u = step * S::kUnits + piece / S::kPlanes;
    f.x[it] = make_uint2(0u, 0u);
    if (m >= M || u >= geo.units) continue;
    int64_t g, i;
    geo.unit(u, g, i);
    const int64_t k = g * w.group + (piece % S::kPlanes) * geo.P + i;
    f.x[it] = __ldg(reinterpret_cast<const uint2*>(x + m * w.K + k));
  }
}

// Shared memory column of value (unit c of the step, plane j, position t): c kPerUnit + 4 j + t,
// for the weights and for x alike.
template <int BITS, class T>
__device__ __forceinline__ void store_step(const QuantWeight& w, int64_t n0, const Fetched<BITS>& f,
                                           uint16_t (*xs)[kLd], uint16_t (*ws)[kLd]) {
  using S = StepShape<BITS>;
#pragma unroll
  for (int it = 0; it < S::kWItems; ++it) {
    const int item = int(threadIdx.x) + it * kThreads;
    if (item >= kBN * S::kUnits) break;
    const int row = item / S::kUnits, c = item % S::kUnits;
    // the row's codebook (rows past N: the last row's, their scale is 0)
    const int64_t n = n0 + row < w.N ? n0 + row : w.N - 1;
    const Table table{w.codebook ? w.codebook + (w.codebook_rows > 1 ? n : 0) * (int64_t(1) << BITS) : nullptr};
    const uint32_t lo0 = f.words[it][0];
    uint32_t lo1 = 0, hi = 0;
    if constexpr (S::kWords == 3) lo1 = f.words[it][1], hi = f.words[it][2];
#pragma unroll
    for (int j = 0; j < S::kPlanes; ++j) {
      float v[4];
#pragma unroll
      for (int t = 0; t < 4; ++t) v[t] = fmaf(table(unit_code<BITS>(lo0, lo1, hi, t, j)), f.s[it], -f.zs[it]);
      *reinterpret_cast<uint2*>(&ws[row][c * S::kPerUnit + 4 * j]) =
          make_uint2(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]));
    }
  }
#pragma unroll
  for (int it = 0; it < S::kXItems; ++it) {
    const int item = int(threadIdx.x) + it * kThreads;
    *reinterpret_cast<uint2*>(&xs[item / (kBK / 4)][(item % (kBK / 4)) * 4]) = f.x[it];
  }
}

// One step's x and weight tiles in x's 16-bit dtype (raw bits), 16-byte aligned for 8-byte stores.
struct alignas(16) SharedTiles {
  uint16_t x[kBM][kLd];
  uint16_t w[kBN][kLd];
};


// y [M, N] (+ bias), or with `partial` the split blockIdx.z's float32 sums over its K steps
// [steps_per_split z, + steps_per_split) into partial [splits, M, N] (reduce_splits adds them).
template <int BITS, class T>
__global__ void __launch_bounds__(kThreads)
    mma_gemm_kernel(QuantWeight w, const T* __restrict__ x, int64_t M, const float* __restrict__ bias,
                    T* __restrict__ y, float* __restrict__ partial, int64_t steps_per_split) {
  using S = StepShape<BITS>;
  __shared__ SharedTiles tiles;
  auto xs = tiles.x;
  auto ws = tiles.w;
  Geometry geo;
  geo.G = w.K / w.group;
  geo.P = w.group / S::kPlanes;
  geo.units_per_group = geo.P / 4;
  geo.units = geo.G * geo.units_per_group;
  geo.row_bytes = w.K * BITS / 8;
  geo.group_bytes = w.group * BITS / 8;
  const int64_t all_steps = (geo.units + S::kUnits - 1) / S::kUnits;
  const int64_t first = partial ? int64_t(blockIdx.z) * steps_per_split : 0;
  const int64_t steps = partial ? (all_steps - first < steps_per_split ? all_steps - first : steps_per_split)
                                : all_steps;  // (<= 0: a split past K writes zeros)
  const int64_t n0 = int64_t(blockIdx.x) * kBN;
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;  // the warp's 32 x 32 of the block tile
  const int64_t m_blocks = (M + kBM - 1) / kBM;
  for (int64_t mb = blockIdx.y; mb < m_blocks; mb += gridDim.y) {
    const int64_t m0 = mb * kBM;
    float acc[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[a][b][r] = 0.f;
    Fetched<BITS> f;
    if (steps > 0) fetch<BITS>(w, geo, x, M, m0, n0, first, f);
    for (int64_t step = 0; step < steps; ++step) {
      store_step<BITS, T>(w, n0, f, xs, ws);
      __syncthreads();
      if (step + 1 < steps) fetch<BITS>(w, geo, x, M, m0, n0, first + step + 1, f);  // in flight during the mma
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        uint32_t a[2][4], b[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) load_a_fragment<kLd>(a[mi], xs, wm + mi * 16, kk, lane);
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) load_b_fragment<kLd>(b[ni], ws, wn + ni * 8, kk, lane);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) mma_m16n8k16<T>(acc[mi][ni], a[mi], b[ni]);
      }
      __syncthreads();  // every warp done with this step's tiles before they are overwritten
    }
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int64_t m = m0 + wm + mi * 16 + g + 8 * (r / 2), n = n0 + wn + ni * 8 + 2 * t + r % 2;
          if (m >= M || n >= w.N) continue;
          if (partial) partial[(int64_t(blockIdx.z) * M + m) * w.N + n] = acc[mi][ni][r];
          else store1(y + m * w.N + n, acc[mi][ni][r] + (bias ? bias[n] : 0.f));
        }
  }
}

// K steps of 32 values for a weight (the packed layout's units, StepShape's)
int64_t k_steps(const QuantWeight& w) {
  const int64_t per_unit = 4 * quant_planes(w.bits), units = w.K / per_unit;
  const int64_t per_step = kBK / per_unit;
  return (units + per_step - 1) / per_step;
}

int splits_for(const QuantWeight& w, int64_t M) {
  const int64_t m_blocks = (M + kBM - 1) / kBM;
  // (2 blocks per multiprocessor: the count this kernel's splits were first sized for)
  return quant_split_count((w.N + kBN - 1) / kBN * (m_blocks < 65535 ? m_blocks : 65535), k_steps(w), 2);
}

template <int BITS, class T>
void launch(const QuantWeight& w, const T* x, int64_t M, const float* bias, T* y, float* workspace,
            int splits, cudaStream_t stream) {
  const int64_t m_blocks = (M + kBM - 1) / kBM;
  const int64_t steps = k_steps(w), per_split = (steps + splits - 1) / splits;
  const dim3 grid(unsigned((w.N + kBN - 1) / kBN), unsigned(m_blocks < 65535 ? m_blocks : 65535),
                  unsigned(splits));
  mma_gemm_kernel<BITS, T><<<grid, kThreads, 0, stream>>>(w, x, M, bias, y, splits > 1 ? workspace : nullptr,
                                                          per_split);
  if (splits > 1)
    reduce_splits<T><<<FL_ISA::blocks_for(M * w.N, 256), 256, 0, stream>>>(workspace, splits, M, w.N, bias, y);
}

}  // namespace

bool quant_mma_applies(const QuantWeight& w, ScalarType dtype) {
  if (dtype != ScalarType::f16 && dtype != ScalarType::bf16) return false;
  if ((w.group / quant_planes(w.bits)) % 4 != 0) return false;  // whole 32-bit units
  if (w.N > int64_t(0x7fffffff) * kBN) return false;
  if (w.K / (4 * quant_planes(w.bits)) >= (int64_t(1) << 32)) return false;  // Geometry::unit's 32 bits
  return FL_ISA::mma_available<mma_gemm_kernel<4, __half>>();
}

int64_t quant_mma_workspace_floats(const QuantWeight& w, int64_t M) {
  const int splits = M > 0 && w.N > 0 ? splits_for(w, M) : 1;
  return splits > 1 ? int64_t(splits) * M * w.N : 0;
}

const char* quant_mma_gemm_cuda(const QuantWeight& w, const void* x, ScalarType dtype, int64_t M,
                                const float* bias, void* y, float* workspace, void* stream) {
  if (M == 0 || w.N == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  // the split count the caller's workspace was sized for (quant_mma_workspace_floats)
  const int splits = workspace ? splits_for(w, M) : 1;
  auto run = [&]<class T>() {
    const T* xt = static_cast<const T*>(x);
    T* yt = static_cast<T*>(y);
    switch (w.bits) {
      case 2: launch<2>(w, xt, M, bias, yt, workspace, splits, s); break;
      case 3: launch<3>(w, xt, M, bias, yt, workspace, splits, s); break;
      case 4: launch<4>(w, xt, M, bias, yt, workspace, splits, s); break;
      default: launch<8>(w, xt, M, bias, yt, workspace, splits, s); break;
    }
  };
  if (dtype == ScalarType::f16) run.template operator()<__half>();
  else run.template operator()<__nv_bfloat16>();
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace fastloss
