// CUDA dequant-GEMM kernels (torch-free; layout in quant_kernels.h).
//
// gemv (batch <= kQuantMaxRows, the memory-bound path): one warp per output row, or per 4 rows
// (large layers at batch <= 4, launch_gemv says when; each lane on the same positions of the 4
// rows). A row's packed bytes are cut into units of 4 plane positions of one group; consecutive lanes take
// consecutive units, so a warp reads 128 contiguous bytes per plane set (coalesced), and each
// lane loads kUnits units before it decodes any, to keep bytes in flight. A unit is one 32-bit
// word per plane set (bits 2, 4, 8) or three (bits 3: two words of low bits, one of third
// bits), holding 4 x planes values; they are decoded in registers (shift, mask, and a codebook
// lookup in shared memory), scaled, and multiplied with 4-wide loads of x in its own dtype (x
// is small and shared by every row: it stays in L1/L2); y is written in x's dtype. Lanes' sums are merged by warp shuffles.
// Rows whose plane length P is not a multiple of 4 (unusual per-channel K) take the same
// kernel with units of one position and byte loads.
//
// dequant: one thread per weight value (float32 x above batch 16 and the backward multiply
// tiles of these with cuBLAS; float16 / bfloat16 x there take quant_mma_cuda.cu).
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_helpers.cuh"
#include "quant_decode.cuh"
#include "quant_kernels.h"

namespace fastloss {
namespace {
using FL_ISA::code_at;
using FL_ISA::load1;
using FL_ISA::store1;
using FL_ISA::Table;
using FL_ISA::unit_code;

constexpr int kWarpsPerBlock = 4;
constexpr int kUnits = 4;  // units each lane loads before decoding

// 4 consecutive activations as float32, from 16 (float) or 8 (float16 / bfloat16) aligned bytes:
// x is read in its own dtype (a float32 copy would be one more pass and twice the bytes)
__device__ __forceinline__ float4 load4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
__device__ __forceinline__ float half_bits(unsigned b) { return __half2float(__ushort_as_half((unsigned short)b)); }
__device__ __forceinline__ float4 load4(const __half* p) {
  const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
  float4 v;
  v.x = half_bits(u.x & 0xffffu);
  v.y = half_bits(u.x >> 16);
  v.z = half_bits(u.y & 0xffffu);
  v.w = half_bits(u.y >> 16);
  return v;
}
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) {  // bfloat16: float32's top half
  const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
  float4 v;
  v.x = __uint_as_float(u.x << 16);
  v.y = __uint_as_float(u.x & 0xffff0000u);
  v.z = __uint_as_float(u.y << 16);
  v.w = __uint_as_float(u.y & 0xffff0000u);
  return v;
}

// y[m, n] for one row n of the weight, a warp's work. WORDS: 4 positions per unit (32-bit
// loads) or 1 (byte loads). x float32 [M, K], y float32 [M, N].
template <int BITS, bool WORDS, class T>
__device__ void row_gemv(const QuantWeight& w, const T* __restrict__ x, int M,
                         const float* __restrict__ bias, T* __restrict__ y, int64_t n,
                         const Table& table, int lane) {
  constexpr int kPlanes = quant_planes(BITS), kPos = WORDS ? 4 : 1;
  const int64_t G = w.K / w.group, P = w.group / kPlanes, units_per_group = P / kPos;
  const int64_t row_bytes = w.K * BITS / 8, group_bytes = w.group * BITS / 8;
  const uint8_t* row = w.q + n * row_bytes;
  float acc[kQuantMaxRows];
#pragma unroll
  for (int m = 0; m < kQuantMaxRows; ++m) acc[m] = 0.f;
  const int64_t units = G * units_per_group;
  for (int64_t u0 = lane; u0 < units; u0 += 32 * kUnits) {
    // load: the words (or bytes) of up to kUnits units
    uint32_t lo0[kUnits], lo1[kUnits], hi[kUnits];
#pragma unroll
    for (int r = 0; r < kUnits; ++r) {
      const int64_t u = u0 + int64_t(r) * 32;
      lo0[r] = lo1[r] = hi[r] = 0;
      if (u >= units) continue;
      const int64_t g = u / units_per_group, i = (u - g * units_per_group) * kPos;
      const uint8_t* b = row + g * group_bytes;
      if constexpr (WORDS) {
        lo0[r] = __ldg(reinterpret_cast<const uint32_t*>(b + i));
        if constexpr (BITS == 3) {
          lo1[r] = __ldg(reinterpret_cast<const uint32_t*>(b + P + i));
          hi[r] = __ldg(reinterpret_cast<const uint32_t*>(b + 2 * P + i));
        }
      } else {
        lo0[r] = __ldg(b + i);
        if constexpr (BITS == 3) {
          lo1[r] = __ldg(b + P + i);
          hi[r] = __ldg(b + 2 * P + i);
        }
      }
    }
    // decode and multiply
#pragma unroll
    for (int r = 0; r < kUnits; ++r) {
      const int64_t u = u0 + int64_t(r) * 32;
      if (u >= units) break;
      const int64_t g = u / units_per_group, i = (u - g * units_per_group) * kPos;
      const float s = __ldg(w.scale + n * G + g);
      const float zs = w.zero ? __ldg(w.zero + n * G + g) * s : 0.f;
#pragma unroll
      for (int j = 0; j < kPlanes; ++j) {
        float wv[kPos];
#pragma unroll
        for (int t = 0; t < kPos; ++t)  // (v - z) s
          wv[t] = fmaf(table(unit_code<BITS>(lo0[r], lo1[r], hi[r], t, j)), s, -zs);
        const int64_t k = g * w.group + j * P + i;
#pragma unroll
        for (int m = 0; m < kQuantMaxRows; ++m) {  // (constant indices keep acc in registers)
          if (m >= M) break;
          const T* xm = x + int64_t(m) * w.K + k;
          if constexpr (WORDS) {
            const float4 xv = load4(xm);
            acc[m] += wv[0] * xv.x + wv[1] * xv.y + wv[2] * xv.z + wv[3] * xv.w;
          } else {
            acc[m] += wv[0] * load1(xm);
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kQuantMaxRows; ++m) {
    if (m >= M) break;
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) store1(y + int64_t(m) * w.N + n, v + (bias ? bias[n] : 0.f));
  }
}

template <int BITS, bool WORDS, class T>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    gemv_kernel(QuantWeight w, const T* __restrict__ x, int M, const float* __restrict__ bias,
                T* __restrict__ y) {
  __shared__ float tables[kWarpsPerBlock][256];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (n >= w.N) return;  // a whole warp leaves together: the shuffles below stay full-warp
  Table table{nullptr};
  if (w.codebook) {
    const float* src = w.codebook + (w.codebook_rows > 1 ? n : 0) * (int64_t(1) << BITS);
    for (int c = lane; c < (1 << BITS); c += 32) tables[warp][c] = src[c];
    __syncwarp();
    table.t = tables[warp];
  }
  row_gemv<BITS, WORDS, T>(w, x, M, bias, y, n, table, lane);
}

// y[m, n] for R consecutive rows n0 .. n0 + R - 1 of the weight, a warp's work (rows past N
// are skipped). Every lane handles the same positions of the R rows, so each x load feeds R
// rows: x is re-read from L1 / L2 by every warp, and with one row per warp those reads, not the
// packed weights, bounded the kernel (H200, 8192 x 28672 4-bit, batch 1: 11% of the byte
// floor). WORDS as row_gemv. The decoding is row_gemv's, for R rows at once; row_gemv stays a
// kernel of its own because this one at R = 1 takes 72-80 registers at 4-bit (row_gemv: 64),
// fewer warps per SM for the one-row path the H200 runs measured.
template <int BITS, bool WORDS, int R, class T>
__device__ void rows_gemv(const QuantWeight& w, const T* __restrict__ x, int M,
                          const float* __restrict__ bias, T* __restrict__ y, int64_t n0,
                          const Table (&table)[R], int lane) {
  constexpr int kPlanes = quant_planes(BITS), kPos = WORDS ? 4 : 1;
  constexpr int kU = R == 1 ? kUnits : 2;  // units per lane per pass: R * kU loads in flight
  const int64_t G = w.K / w.group, P = w.group / kPlanes, units_per_group = P / kPos;
  const int64_t row_bytes = w.K * BITS / 8, group_bytes = w.group * BITS / 8;
  constexpr int kMaxM = kQuantMaxRows / R;  // the launch takes R = 4 up to batch 4, ...
  const int rows = int(w.N - n0 < R ? w.N - n0 : R);
  float acc[R][kMaxM];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) acc[r][m] = 0.f;
  const int64_t units = G * units_per_group;
  for (int64_t u0 = lane; u0 < units; u0 += 32 * kU) {
    // load: the words (or bytes) of up to kU units of each row
    uint32_t lo0[kU][R], lo1[kU][R], hi[kU][R];
#pragma unroll
    for (int c = 0; c < kU; ++c) {
      const int64_t u = u0 + int64_t(c) * 32;
      const int64_t g = u / units_per_group, i = (u - g * units_per_group) * kPos;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        lo0[c][r] = lo1[c][r] = hi[c][r] = 0;
        if (u >= units || r >= rows) continue;
        const uint8_t* b = w.q + (n0 + r) * row_bytes + g * group_bytes;
        if constexpr (WORDS) {
          lo0[c][r] = __ldg(reinterpret_cast<const uint32_t*>(b + i));
          if constexpr (BITS == 3) {
            lo1[c][r] = __ldg(reinterpret_cast<const uint32_t*>(b + P + i));
            hi[c][r] = __ldg(reinterpret_cast<const uint32_t*>(b + 2 * P + i));
          }
        } else {
          lo0[c][r] = __ldg(b + i);
          if constexpr (BITS == 3) {
            lo1[c][r] = __ldg(b + P + i);
            hi[c][r] = __ldg(b + 2 * P + i);
          }
        }
      }
    }
    // decode and multiply: x once per plane, for the R rows
#pragma unroll
    for (int c = 0; c < kU; ++c) {
      const int64_t u = u0 + int64_t(c) * 32;
      if (u >= units) break;
      const int64_t g = u / units_per_group, i = (u - g * units_per_group) * kPos;
      float s[R], zs[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t n = n0 + (r < rows ? r : 0);
        s[r] = __ldg(w.scale + n * G + g);
        zs[r] = w.zero ? __ldg(w.zero + n * G + g) * s[r] : 0.f;
      }
#pragma unroll
      for (int j = 0; j < kPlanes; ++j) {
        float wv[R][kPos];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int t = 0; t < kPos; ++t)  // (v - z) s
            wv[r][t] = fmaf(table[r](unit_code<BITS>(lo0[c][r], lo1[c][r], hi[c][r], t, j)), s[r], -zs[r]);
        const int64_t k = g * w.group + j * P + i;
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) {  // (constant indices keep acc in registers)
          if (m >= M) break;
          const T* xm = x + int64_t(m) * w.K + k;
          if constexpr (WORDS) {
            const float4 xv = load4(xm);
#pragma unroll
            for (int r = 0; r < R; ++r)
              acc[r][m] += wv[r][0] * xv.x + wv[r][1] * xv.y + wv[r][2] * xv.z + wv[r][3] * xv.w;
          } else {
            const float xv = load1(xm);
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r][m] += wv[r][0] * xv;
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      if (m >= M) break;
      float v = acc[r][m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0 && r < rows) store1(y + int64_t(m) * w.N + n0 + r, v + (bias ? bias[n0 + r] : 0.f));
    }
}

template <int BITS, bool WORDS, int R, class T>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    gemv_rows_kernel(QuantWeight w, const T* __restrict__ x, int M, const float* __restrict__ bias,
                     T* __restrict__ y) {
  // per warp and row: the row's codebook (a per-tensor codebook is copied R times)
  __shared__ float tables[kWarpsPerBlock][R][256];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = (int64_t(blockIdx.x) * kWarpsPerBlock + warp) * R;
  if (n0 >= w.N) return;  // a whole warp leaves together: the shuffles below stay full-warp
  Table table[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    table[r].t = nullptr;
    if (w.codebook) {
      const int64_t n = n0 + r < w.N ? n0 + r : n0;
      const float* src = w.codebook + (w.codebook_rows > 1 ? n : 0) * (int64_t(1) << BITS);
      for (int c = lane; c < (1 << BITS); c += 32) tables[warp][r][c] = src[c];
      table[r].t = tables[warp][r];
    }
  }
  __syncwarp();
  rows_gemv<BITS, WORDS, R, T>(w, x, M, bias, y, n0, table, lane);
}

// (T: float, or a 16-bit dtype for the cuBLAS tiles of the activations' dtype: the float32
// value rounded once, as a float32 tile converted would be)
template <class T>
__global__ void dequant_kernel(QuantWeight w, T* __restrict__ out, int64_t n0, int64_t rows) {
  const int64_t total = rows * w.K;
  const int64_t P = w.group / quant_planes(w.bits);
  const int64_t row_bytes = w.K * w.bits / 8, group_bytes = w.group * w.bits / 8, G = w.K / w.group;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / w.K, k = e - r * w.K, n = n0 + r, g = k / w.group;
    const int q = code_at(w.q + n * row_bytes + g * group_bytes, w.bits, P, k - g * w.group);
    const float v = w.codebook ? w.codebook[(w.codebook_rows > 1 ? n : 0) * (int64_t(1) << w.bits) + q]
                               : float(q);
    store1(out + e, (v - (w.zero ? w.zero[n * G + g] : 0.f)) * w.scale[n * G + g]);
  }
}

// Large layers at batch <= 4 take R = 4 rows per warp (one x load for 4 rows); the rest one row
// per warp. From the H200 runs at e808290 (one row per warp) and f482297 (4 rows up to batch 4,
// 2 up to 8): 4 rows took 8192x28672 batch 1 from 0.29 to 0.18 ms and batch 4 from 0.80 to
// 0.40 ms, 14336x4096 batch 1 from 0.089 to 0.077 ms, but 4096x4096 batch 1 from 0.052 to
// 0.080 ms (a quarter of the warps: too few to fill the GPU), and 2 rows at batch 5-16 were
// slower than one; kRowsMinN keeps 4 rows to layers of at least 2048 such warps.
constexpr int kRows = 4;
constexpr int64_t kRowsMinN = 8192;

template <int BITS, class T>
void launch_gemv(const QuantWeight& w, const T* x, int M, const float* bias, T* y,
                 cudaStream_t stream) {
  const int64_t P = w.group / quant_planes(BITS);
  const bool words = P % 4 == 0;
  if (M <= kQuantMaxRows / kRows && w.N >= kRowsMinN) {
    const int64_t per_block = int64_t(kWarpsPerBlock) * kRows;
    const dim3 grid(unsigned((w.N + per_block - 1) / per_block));
    if (words) gemv_rows_kernel<BITS, true, kRows, T><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(w, x, M, bias, y);
    else gemv_rows_kernel<BITS, false, kRows, T><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(w, x, M, bias, y);
    return;
  }
  const dim3 grid(unsigned((w.N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  if (words) gemv_kernel<BITS, true, T><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(w, x, M, bias, y);
  else gemv_kernel<BITS, false, T><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(w, x, M, bias, y);
}

}  // namespace

const char* quant_gemv_cuda(const QuantWeight& w, const void* x, ScalarType dtype, int64_t M,
                            const float* bias, void* y, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  FL_ISA::visit_dtype(dtype, [&]<class T>() {
    const T* xt = static_cast<const T*>(x);
    T* yt = static_cast<T*>(y);
    switch (w.bits) {
      case 2: launch_gemv<2>(w, xt, int(M), bias, yt, s); break;
      case 3: launch_gemv<3>(w, xt, int(M), bias, yt, s); break;
      case 4: launch_gemv<4>(w, xt, int(M), bias, yt, s); break;
      default: launch_gemv<8>(w, xt, int(M), bias, yt, s); break;
    }
  });
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* quant_dequant_rows_cuda(const QuantWeight& w, void* out, ScalarType dtype, int64_t n0, int64_t n1,
                                    void* stream) {
  const int64_t total = (n1 - n0) * w.K;
  if (total == 0) return nullptr;
  const int64_t blocks = (total + 255) / 256;
  FL_ISA::visit_dtype(dtype, [&]<class T>() {
    dequant_kernel<T><<<unsigned(blocks < 65535 * 8 ? blocks : 65535 * 8), 256, 0,
                        static_cast<cudaStream_t>(stream)>>>(w, static_cast<T*>(out), n0, n1 - n0);
  });
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace fastloss
