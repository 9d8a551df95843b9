// The per-row work on one vocabulary tile of linear + cross-entropy's low-memory path
// (linear_ce_tiles_op.cpp) on CUDA: cuBLAS forms the tile [rows, n] of logits in the inputs'
// dtype, and one pass of a kernel over it does what the torch path does in a float32 copy and
// half a dozen passes (cap, max, exp, sums; the gradient's exp, target, smoothing, cap factor and
// the cast back): at 8192 rows x 8192 classes that was ~1.5 GB (statistics) and ~2.6 GB
// (gradient) of traffic per tile against one read (and one write) of 128 MB here.
//
// One warp per row, the row read in 16-byte packs (cuda_packs.cuh). Statistics: an online
// log-sum-exp of the capped logits (one exponential per element; lanes merged by shuffles in a
// fixed order), merged into the running value of earlier tiles. Gradient: written over the
// tile, in its dtype (the GEMMs that follow take it as it is).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "../common/cuda_helpers.cuh"
#include "../common/cuda_packs.cuh"
#include "linear_ce_kernels.h"

namespace fastloss {
namespace FL_ISA {
namespace {

constexpr int kWarps = 8;  // rows (warps) per block

__device__ __forceinline__ float capped(float v, float cap) { return cap > 0.f ? cap * tanhf(v / cap) : v; }

// log(e^a + e^b), as torch.logaddexp: NaN propagates, -inf with -inf gives -inf, +inf wins.
__device__ __forceinline__ float log_add_exp(float a, float b) {
  if (a != a || b != b) return a + b;  // (NaN)
  const float mx = fmaxf(a, b);
  if (fabsf(mx) == INFINITY) return mx;
  return mx + log1pf(expf(-fabsf(a - b)));
}

template <class T>
__global__ void __launch_bounds__(kWarps * 32)
    tile_stats_kernel(LinearCeTile t, bool first, bool weighted_sum, float* __restrict__ stats) {
  const int lane = int(threadIdx.x % 32);
  const T* base = static_cast<const T*>(t.z);
  for (int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; r < t.rows; r += int64_t(gridDim.x) * kWarps) {
    const int64_t y = t.target[r] - t.first_class;  // the target's column when in [0, n)
    // m starts at the lowest finite float: no inf - inf below; an equal maximum adds 1
    // (two +inf logits sum to +inf, not NaN); a NaN logit makes s NaN.
    float m = -FLT_MAX, s = 0.f, zy = 0.f, wz = 0.f;
    for_each_value<32>(base + r * t.ld, t.n, lane, [&](int64_t k, float v) {
      v = capped(v, t.softcap);
      if (v > m) {
        s = s * expf(m - v) + 1.f;
        m = v;
      } else {
        s += v == m ? 1.f : expf(v - m);
      }
      if (k == y) zy = v;
      if (weighted_sum) wz += (t.class_weight != nullptr ? t.class_weight[k] : 1.f) * v;
    });
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, m, off), os = __shfl_xor_sync(0xffffffffu, s, off);
      const float mm = fmaxf(m, om);
      s = (m == mm ? s : s * expf(m - mm)) + (om == mm ? os : os * expf(om - mm));
      m = mm;
    }
    zy = warp_sum(zy);  // (one lane holds it, the others add 0)
    if (weighted_sum) wz = warp_sum(wz);
    if (lane == 0) {
      const float lse = m + logf(s);  // (no finite logit: -FLT_MAX + log 0 = -inf)
      float* o = stats + r * 3;
      o[0] = first ? lse : log_add_exp(o[0], lse);
      if (y >= 0 && y < t.n) o[1] += zy;
      if (weighted_sum) o[2] += wz;
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kWarps * 32)
    tile_grad_kernel(LinearCeTile t, const float* __restrict__ lse, const float* __restrict__ coef, bool smoothing) {
  constexpr int P = kPack<T>;
  const int lane = int(threadIdx.x % 32);
  T* base = static_cast<T*>(t.z);
  for (int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; r < t.rows; r += int64_t(gridDim.x) * kWarps) {
    T* x = base + r * t.ld;
    const int64_t y = t.target[r] - t.first_class;
    const float l = lse[r], a = coef[3 * r], hit = coef[3 * r + 1], smooth = smoothing ? coef[3 * r + 2] : 0.f;
    const auto grad = [&](int64_t k, float v) {
      float z = v, dz = 1.f;
      if (t.softcap > 0.f) {
        const float th = tanhf(v / t.softcap);
        z = t.softcap * th;
        dz = 1.f - th * th;
      }
      float g = a * expf(z - l);
      if (k == y) g -= hit;
      if (smoothing) g -= smooth * (t.class_weight != nullptr ? t.class_weight[k] : 1.f);
      return g * dz;
    };
    // each thread reads a pack, then writes its gradient back to the same place
    walk_row<32>(
        static_cast<const T*>(x), t.n, lane,
        [&](int64_t k0, const float (&v)[P]) {
          float g[P];
#pragma unroll
          for (int e = 0; e < P; ++e) g[e] = grad(k0 + e, v[e]);
          store_pack(reinterpret_cast<uint4*>(x + k0), pack<T>(g));
        },
        [&](int64_t k, float v) { store1(x + k, grad(k, v)); });
  }
}

}  // namespace
}  // namespace FL_ISA

const char* linear_ce_tile_stats_cuda(const LinearCeTile& t, bool first, bool weighted_sum, float* stats,
                                      void* stream) {
  using namespace FL_ISA;
  if (t.rows == 0 || t.n == 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(t.dtype, [&]<class T>() {
    tile_stats_kernel<T><<<blocks_for(t.rows, kWarps), kWarps * 32, 0, s>>>(t, first, weighted_sum, stats);
  });
  return launch_status();
}

const char* linear_ce_tile_grad_cuda(const LinearCeTile& t, const float* lse, const float* coef, bool smoothing,
                                     void* stream) {
  using namespace FL_ISA;
  if (t.rows == 0 || t.n == 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(t.dtype, [&]<class T>() {
    tile_grad_kernel<T><<<blocks_for(t.rows, kWarps), kWarps * 32, 0, s>>>(t, lse, coef, smoothing);
  });
  return launch_status();
}

}  // namespace fastloss
