// Pipelined tensor-core dequant GEMM for batches above the GEMV's (M > kQuantMaxRows) of the
// formats the tensor-core GEMV reads (uniform 2- and 4-bit weights, 8-bit with float16 x;
// plane lengths a multiple of 16): y [M, N] = x [M, K] W^T (+ bias). The other formats keep
// the shared-memory GEMM of quant_mma_cuda.cu.
//
// Why: that GEMM decodes every weight to a float, rounds it to x's dtype, writes it to shared
// memory and reads it back, in 64 x 64 tiles with one 32-value step between two barriers, and
// its address arithmetic divides 64-bit integers per load. On an H200 at f95b002, 8192 x 28672
// 4-bit: 0.63 ms at batch 64 and 3.2 ms at 256, where cuBLAS float16 takes 0.14 and 0.22.
// Here (written without a GPU; tests/test_cuda_emulation.py runs it under the emulator):
// - the packed bytes, the groups' scales and zero points, and x go to shared memory as they
//   are with cp.async, kStages steps deep: the loads in flight hold no registers, and no
//   decode waits on a load from global memory;
// - the weights are the mma's B operand, decoded from shared memory straight into fragment
//   registers. Lane (g, t) of an 8-row tile reads 32-bit word 4p + t of row g's step: 4
//   consecutive positions of one group, every plane (quant_kernels.h). One byte permute per
//   pair of positions, (0, 1) and (2, 3), and per plane a mask, an OR into a 16-bit float's
//   mantissa and a paired fma (decode_halves, quant_half16.cuh) give b[0] and b[1] of an
//   m16n8k16 fragment. Which k a fragment column stands for does not matter to the sum as long
//   as x's A fragment holds the same k: lane (g, t) reads x[m][k .. k + 3] of those positions,
//   one 8-byte load giving a[0] = (k, k + 1) and a[2] = (k + 2, k + 3), so x is not permuted;
// - a step stays inside one group, and each group's float32 partial sums, kept over its
//   steps, are scaled once at its end (the weights are never rounded: x W^T with W as
//   dequantize_weight gives it, up to float32 summation, as the GEMV); fractional zero points
//   are corrected as the GEMV does, with the sums of x from one more mma against all-ones B;
// - shared rows are padded so that a warp's 8-byte x loads (4 rows x 32 bytes per half-warp)
//   and 4-byte word loads (8 rows x 16 bytes) fall on distinct banks.
// A block computes 64 batch rows x 128 output features with 8 warps of 32 x 32 (2 x 4 m16n8
// tiles each), one block per multiprocessor; K is split over blockIdx.z when the tiles cannot
// fill the GPU (quant_split_k.cuh). Reviewed by a helper in session 22 (fragment layouts, byte
// permutes, cp.async waits and barriers, bounds: no defect found; its performance points on
// split counts, per-group scaling, staged scales, copy addresses and block order are in).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "../common/cuda_helpers.cuh"
#include "../common/mma.cuh"
#include "quant_half16.cuh"
#include "quant_kernels.h"
#include "quant_split_k.cuh"

namespace fastloss {
namespace {
using FL_ISA::cp_async16;
using FL_ISA::cp_async4;
using FL_ISA::cp_async_commit;
using FL_ISA::cp_async_wait;
using FL_ISA::decode_halves;
using FL_ISA::Half16;
using FL_ISA::integer_zero;
using FL_ISA::mma_m16n8k16;
using FL_ISA::Planes;
using FL_ISA::store1;

// steps in shared memory: one being multiplied, three in flight. One block of 8 warps per
// multiprocessor (their accumulators, the group's partial sums and the decoded fragments take
// 143-173 registers; capped at 128 for two blocks, ptxas for sm_90 spilled 32-300 bytes), so
// the loads in flight come from the stages: 3 x 8 KB of 4-bit weights per multiprocessor.
constexpr int kStages = 4;
constexpr int kBM = 64, kBN = 128;  // batch rows x output features of a block
constexpr int kThreads = 256;
constexpr int kWarpsN = 4;          // warps along the features; kBM / 32 = 2 along the batch
constexpr int kMT = 2, kNT = 4;     // a warp's m16 tiles (batch rows) and n8 tiles (features)

// A step: WB packed bytes per lane and row, 4 lanes: 4 WB bytes of each weight row, i.e. 4 WB
// positions of one group in every plane, the group's scales and zero points of the block's
// rows, and x at those positions. A stage (bytes): weights [kBN][kWPitch], scales [kBN],
// zeros [kBN] (float32), x [planes][kBM][kXPitch]. The weights' rows are padded to an odd
// multiple of 16 (8 rows x 16 bytes on distinct banks), x's to 32 more than a multiple of 64
// past 128 (4 rows x 32 bytes on distinct banks).
template <int BITS, int WB>
struct Step {
  static constexpr int kPlanes = quant_planes(BITS);
  static constexpr int kRowBytes = 4 * WB;
  static constexpr int kWPitch = kRowBytes + (WB >= 8 ? 16 : 0);
  static constexpr int kXPitch = 2 * kRowBytes + (WB >= 8 ? 32 : 0);
  static constexpr int kScales = kBN * kWPitch, kZeros = kScales + 4 * kBN, kX = kZeros + 4 * kBN;
  static constexpr int kStageBytes = kX + kPlanes * kBM * kXPitch;
  static constexpr int kSharedBytes = kStages * kStageBytes;
  // 16-byte copies per step: weight rows' pieces and x rows' pieces, and a thread's share
  static constexpr int kWPer = kRowBytes / 16, kWPieces = kBN * kWPer;
  static constexpr int kXPer = 2 * kRowBytes / 16, kXPieces = kPlanes * kBM * kXPer;
  static constexpr int kWCopies = (kWPieces + kThreads - 1) / kThreads;
  static constexpr int kXCopies = (kXPieces + kThreads - 1) / kThreads;
};
static_assert(kThreads == 2 * kBN, "a thread per row's scale, one per row's zero point");

// The group and place within it of a step; steps are walked in order, so the group is carried
// along rather than divided out per step.
struct StepAt {
  int64_t gi, within;
  __device__ StepAt(int64_t step, int64_t per_group) : gi(step / per_group), within(step % per_group) {}
  __device__ void advance(int64_t per_group) {
    if (++within == per_group) within = 0, ++gi;
  }
};

// A thread's copies of every step: where its pieces come from at step 0 (null: none) and go in
// a stage, fixed for the block; a step adds its offset. Weight rows past N read row N - 1 and x
// rows past M read row M - 1 (their sums are not stored).
template <int BITS, int WB, class T>
struct Copies {
  using S = Step<BITS, WB>;
  const uint8_t* w[S::kWCopies];
  int w_at[S::kWCopies];
  const T* x[S::kXCopies];
  int x_at[S::kXCopies];
  const float* sz;  // the scale (threads < kBN) or zero point (the rest) of a row, group 0
  int sz_at;

  __device__ Copies(const QuantWeight& wt, const T* __restrict__ xp, int64_t M, int64_t m0, int64_t n0,
                    int64_t row_bytes, int64_t P, int64_t G) {
    const int tid = int(threadIdx.x);
#pragma unroll
    for (int i = 0; i < S::kWCopies; ++i) {
      const int c = tid + i * kThreads, r = c / S::kWPer, piece = c % S::kWPer;
      const int64_t n = n0 + r < wt.N ? n0 + r : wt.N - 1;
      w[i] = c < S::kWPieces ? wt.q + n * row_bytes + 16 * piece : nullptr;
      w_at[i] = r * S::kWPitch + 16 * piece;
    }
#pragma unroll
    for (int i = 0; i < S::kXCopies; ++i) {
      const int c = tid + i * kThreads, piece = c % S::kXPer, row = c / S::kXPer, m = row % kBM, j = row / kBM;
      const int64_t mr = m0 + m < M ? m0 + m : M - 1;
      x[i] = c < S::kXPieces ? xp + mr * wt.K + j * P + 8 * piece : nullptr;
      x_at[i] = S::kX + row * S::kXPitch + 16 * piece;
    }
    const int r = tid % kBN;
    const int64_t n = n0 + r < wt.N ? n0 + r : wt.N - 1;
    sz = tid < kBN ? wt.scale + n * G : (wt.zero ? wt.zero + n * G : nullptr);
    sz_at = (tid < kBN ? S::kScales : S::kZeros) + 4 * r;
  }

  // starts the copies of step `step` (at `at`) into `stage`
  __device__ void issue(unsigned char* stage, int64_t step, const StepAt& at, int64_t group) const {
#pragma unroll
    for (int i = 0; i < S::kWCopies; ++i)
      if (w[i]) cp_async16(stage + w_at[i], w[i] + step * S::kRowBytes);
    const int64_t k0 = at.gi * group + at.within * S::kRowBytes;  // the step's first position, plane 0
#pragma unroll
    for (int i = 0; i < S::kXCopies; ++i)
      if (x[i]) cp_async16(stage + x_at[i], x[i] + k0);
    if (sz) cp_async4(stage + sz_at, sz + at.gi);
  }
};

// A warp's state over the steps of one group: its rows' scales and zero points (wn 32 + ni 8 +
// g), the decode constants, and the group's float32 partial sums (part; xsum: the sums of x,
// for fractional zero points), folded into the running sums at the group's end.
template <int BITS, class T>
struct Group {
  float s_row[kNT], fr_row[kNT];
  uint32_t minus_c[kNT][quant_planes(BITS)];
  bool fractional;
  float part[kMT][kNT][4], xsum[kMT][4];

  // from the group's first step in `stage`; every lane of the warp calls it
  template <int WB>
  __device__ __forceinline__ void begin(const unsigned char* stage, bool zeros, const Planes<BITS, T>& pl, int wn,
                                        int g) {
    using S = Step<BITS, WB>;
    const float* scales = reinterpret_cast<const float*>(stage + S::kScales);
    const float* zs = reinterpret_cast<const float*>(stage + S::kZeros);
    bool lane_fractional = false;
#pragma unroll
    for (int ni = 0; ni < kNT; ++ni) {
      const int row = wn * 32 + ni * 8 + g;
      s_row[ni] = scales[row];
      const float z = zeros ? zs[row] : 0.f, zi = integer_zero<T>(z);
      fr_row[ni] = z - zi;
      lane_fractional |= !(fr_row[ni] == 0.f);
#pragma unroll
      for (int j = 0; j < S::kPlanes; ++j) minus_c[ni][j] = pl.minus_c(j, zi);
    }
    fractional = __ballot_sync(0xffffffffu, lane_fractional) != 0u;
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
      for (int r = 0; r < 4; ++r) xsum[mi][r] = 0.f;
#pragma unroll
      for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
        for (int r = 0; r < 4; ++r) part[mi][ni][r] = 0.f;
    }
  }

  // adds the step in `stage` to part (d[0], d[1]: batch row g, features 2t, 2t + 1 of the n8
  // tile; d[2], d[3]: row g + 8); every lane of the warp calls it
  template <int WB>
  __device__ __forceinline__ void add(const unsigned char* stage, const Planes<BITS, T>& pl, int wm, int wn, int g,
                                      int t) {
    using S = Step<BITS, WB>;
    const uint32_t ones[2] = {Half16<T>::kOne, Half16<T>::kOne};  // B of the sums of x
    const unsigned char* ws = stage + (wn * 32 + g) * S::kWPitch + 4 * t;
    const unsigned char* xs = stage + S::kX + (wm * 32 + g) * S::kXPitch + 8 * t;
#pragma unroll
    for (int p = 0; p < WB / 4; ++p) {
      uint32_t lo[kNT], hi[kNT];  // positions (0, 1) and (2, 3) of the lane's word, a byte per 16-bit half
#pragma unroll
      for (int ni = 0; ni < kNT; ++ni) {
        const uint32_t word = *reinterpret_cast<const uint32_t*>(ws + ni * 8 * S::kWPitch + 16 * p);
        lo[ni] = __byte_perm(word, 0u, 0x4140);
        hi[ni] = __byte_perm(word, 0u, 0x4342);
      }
#pragma unroll
      for (int j = 0; j < S::kPlanes; ++j) {
        uint32_t b[kNT][2];
#pragma unroll
        for (int ni = 0; ni < kNT; ++ni) {
          b[ni][0] = decode_halves<BITS, T>(lo[ni], j, pl.unscale[j], minus_c[ni][j]);
          b[ni][1] = decode_halves<BITS, T>(hi[ni], j, pl.unscale[j], minus_c[ni][j]);
        }
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
          const unsigned char* xr = xs + (j * kBM + mi * 16) * S::kXPitch + 32 * p;
          const uint2 u = *reinterpret_cast<const uint2*>(xr), v = *reinterpret_cast<const uint2*>(xr + 8 * S::kXPitch);
          const uint32_t a[4] = {u.x, v.x, u.y, v.y};
#pragma unroll
          for (int ni = 0; ni < kNT; ++ni) mma_m16n8k16<T>(part[mi][ni], a, b[ni]);
          if (fractional) mma_m16n8k16<T>(xsum[mi], a, ones);
        }
      }
    }
  }

  // acc += the group's sums times the scales of the accumulators' features (2t, 2t + 1 of each
  // n8 tile: weight rows whose scales lanes 4 (2t) and 4 (2t + 1) hold); every lane calls it
  __device__ __forceinline__ void fold(float (&acc)[kMT][kNT][4], int t) const {
#pragma unroll
    for (int ni = 0; ni < kNT; ++ni) {
      float s_col[2], fr_col[2] = {0.f, 0.f};
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s_col[e] = __shfl_sync(0xffffffffu, s_row[ni], 4 * (2 * t + e));
        if (fractional) fr_col[e] = __shfl_sync(0xffffffffu, fr_row[ni], 4 * (2 * t + e));
      }
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          // (features with integer zeros skip the correction: an infinite sum of x must not
          // make them NaN)
          const float fr = fr_col[r % 2], sum = part[mi][ni][r];
          acc[mi][ni][r] = fmaf(s_col[r % 2], fr != 0.f ? fmaf(-fr, xsum[mi][r], sum) : sum, acc[mi][ni][r]);
        }
    }
  }
};

// y [M, N] (+ bias), or with `partial` the split blockIdx.z's float32 sums over its steps
// [steps_per_split z, + steps_per_split) into partial [splits, M, N] (reduce_splits adds them).
// Blocks of one weight tile are consecutive (blockIdx.x: the batch rows), so that a tile's
// bytes are read from memory once and from L2 by the tile's other batch blocks.
template <int BITS, int WB, class T>
__global__ void __launch_bounds__(kThreads, 1)
    pipe_gemm_kernel(QuantWeight w, const T* __restrict__ x, int64_t M, const float* __restrict__ bias,
                     T* __restrict__ y, float* __restrict__ partial, int64_t steps_per_split) {
  using S = Step<BITS, WB>;
  FL_DYNAMIC_SHARED(unsigned char, smem);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int64_t m0 = int64_t(blockIdx.x) * kBM, n0 = int64_t(blockIdx.y) * kBN;
  const int64_t row_bytes = w.K * BITS / 8, P = w.group / S::kPlanes, G = w.K / w.group;
  const int64_t per_group = P / S::kRowBytes, all_steps = row_bytes / S::kRowBytes;
  const int64_t first = partial ? int64_t(blockIdx.z) * steps_per_split : 0;
  const int64_t count = partial ? (all_steps - first < steps_per_split ? all_steps - first : steps_per_split)
                                : all_steps;  // (<= 0: a split past K writes zeros)
  const Planes<BITS, T> planes;
  const Copies<BITS, WB, T> copies(w, x, M, m0, n0, row_bytes, P, G);
  const bool active = m0 + wm * 32 < M;  // (warps whose 32 batch rows lie past M add nothing)
  float acc[kMT][kNT][4] = {};
  Group<BITS, T> group;
  StepAt issued(first, per_group), used(first, per_group);
  // the first kStages - 1 steps in flight (a group per stage, empty past the split's steps,
  // so that the wait below always counts kStages - 2 younger groups)
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < count) {
      copies.issue(smem + st * S::kStageBytes, first + st, issued, w.group);
      issued.advance(per_group);
    }
    cp_async_commit();
  }
  int stage = 0;
  for (int64_t i = 0; i < count; ++i) {
    cp_async_wait<kStages - 2>();  // this thread's copies of step i have landed
    __syncthreads();  // everyone's have, and everyone is done with step i - 1's stage
    const int64_t ahead = i + kStages - 1;
    if (ahead < count) {
      const int into = stage == 0 ? kStages - 1 : stage - 1;  // step i - 1's stage
      copies.issue(smem + into * S::kStageBytes, first + ahead, issued, w.group);
      issued.advance(per_group);
    }
    cp_async_commit();
    const unsigned char* cur = smem + stage * S::kStageBytes;
    if (active) {
      if (i == 0 || used.within == 0) group.template begin<WB>(cur, w.zero != nullptr, planes, wn, g);
      group.template add<WB>(cur, planes, wm, wn, g, t);
      if (i + 1 == count || used.within + 1 == per_group) group.fold(acc, t);
    }
    used.advance(per_group);
    stage = stage + 1 == kStages ? 0 : stage + 1;
  }
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
    for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t m = m0 + wm * 32 + mi * 16 + g + 8 * (r / 2), n = n0 + wn * 32 + ni * 8 + 2 * t + r % 2;
        if (m >= M || n >= w.N) continue;
        if (partial) partial[(int64_t(blockIdx.z) * M + m) * w.N + n] = acc[mi][ni][r];
        else store1(y + m * w.N + n, acc[mi][ni][r] + (bias ? __ldg(bias + n) : 0.f));
      }
}

// Bytes per lane per step: the largest of 16, 8, 4 whose step (4 lanes) divides the plane
// length and whose x (every plane) fits the stage: 8 at most for 2-bit weights (4 planes);
// 0 where even 4 does not divide it.
int lane_bytes(const QuantWeight& w) {
  const int64_t P = w.group / quant_planes(w.bits);
  for (int wb : {16, 8, 4})
    if (wb * quant_planes(w.bits) <= 32 && P % (4 * wb) == 0) return wb;
  return 0;
}

int64_t steps_of(const QuantWeight& w) { return w.K * w.bits / 8 / (4 * int64_t(lane_bytes(w))); }

int splits_for(const QuantWeight& w, int64_t M) {
  // (one block per multiprocessor: __launch_bounds__ and its registers)
  return quant_split_count((w.N + kBN - 1) / kBN * ((M + kBM - 1) / kBM), steps_of(w), 1);
}

template <int BITS, int WB, class T>
const char* launch(const QuantWeight& w, const T* x, int64_t M, const float* bias, T* y, float* workspace,
                   int splits, cudaStream_t stream) {
  using S = Step<BITS, WB>;
  constexpr auto kernel = pipe_gemm_kernel<BITS, WB, T>;
  if (!FL_ISA::allow_dynamic_shared<kernel, S::kSharedBytes>())
    return "the pipelined GEMM's shared memory was refused";
  const int64_t per_split = (steps_of(w) + splits - 1) / splits;
  const dim3 grid(unsigned((M + kBM - 1) / kBM), unsigned((w.N + kBN - 1) / kBN), unsigned(splits));
  kernel<<<grid, kThreads, S::kSharedBytes, stream>>>(w, x, M, bias, y, splits > 1 ? workspace : nullptr,
                                                      per_split);
  if (splits > 1)
    reduce_splits<T><<<FL_ISA::blocks_for(M * w.N, 256), 256, 0, stream>>>(workspace, splits, M, w.N, bias, y);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <int BITS, class T>
const char* launch_bits(const QuantWeight& w, const T* x, int64_t M, const float* bias, T* y, float* workspace,
                        int splits, cudaStream_t s) {
  switch (lane_bytes(w)) {
    case 16:
      if constexpr (BITS != 2) return launch<BITS, 16>(w, x, M, bias, y, workspace, splits, s);
      [[fallthrough]];
    case 8: return launch<BITS, 8>(w, x, M, bias, y, workspace, splits, s);
    default: return launch<BITS, 4>(w, x, M, bias, y, workspace, splits, s);
  }
}

}  // namespace

bool quant_gemm_pipe_applies(const QuantWeight& w, ScalarType dtype) {
  const bool bits_ok = w.bits == 2 || w.bits == 4 || (w.bits == 8 && dtype == ScalarType::f16);
  if (!bits_ok || w.codebook || (dtype != ScalarType::f16 && dtype != ScalarType::bf16) || lane_bytes(w) == 0 ||
      reinterpret_cast<uintptr_t>(w.q) % 16 != 0 || w.N > int64_t(65535) * kBN)
    return false;
  // the largest stages (2-bit: the same), 124 KB
  if (!FL_ISA::shared_optin_at_least(Step<4, 16>::kSharedBytes)) return false;
  return FL_ISA::mma_available<pipe_gemm_kernel<4, 16, __half>>();
}

int64_t quant_gemm_pipe_workspace_floats(const QuantWeight& w, int64_t M) {
  const int splits = M > 0 && w.N > 0 ? splits_for(w, M) : 1;
  return splits > 1 ? int64_t(splits) * M * w.N : 0;
}

const char* quant_gemm_pipe_cuda(const QuantWeight& w, const void* x, ScalarType dtype, int64_t M,
                                 const float* bias, void* y, float* workspace, void* stream) {
  if (M == 0 || w.N == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const int splits = workspace ? splits_for(w, M) : 1;  // the count the workspace was sized for
  if (dtype == ScalarType::f16) {
    const __half* xt = static_cast<const __half*>(x);
    __half* yt = static_cast<__half*>(y);
    if (w.bits == 2) return launch_bits<2>(w, xt, M, bias, yt, workspace, splits, s);
    if (w.bits == 4) return launch_bits<4>(w, xt, M, bias, yt, workspace, splits, s);
    return launch_bits<8>(w, xt, M, bias, yt, workspace, splits, s);
  }
  const __nv_bfloat16* xt = static_cast<const __nv_bfloat16*>(x);
  __nv_bfloat16* yt = static_cast<__nv_bfloat16*>(y);
  if (w.bits == 2) return launch_bits<2>(w, xt, M, bias, yt, workspace, splits, s);
  return launch_bits<4>(w, xt, M, bias, yt, workspace, splits, s);
}

}  // namespace fastloss
