// Tensor-core GEMV: the memory-bound batches (M <= kQuantMaxRows) of uniform 2-, 4- and 8-bit
// weights with float16 x (2- and 4-bit with bfloat16 x), y [M, N] = x [M, K] W^T (+ bias).
//
// Why tensor cores at batch 1: the weights must stream at memory bandwidth (the byte floor),
// and the warp-per-row GEMV (quant_cuda.cu) spends several instructions per weight value
// (index arithmetic, an int -> float conversion, a float32 multiply-add for the scale and one
// for x) - on an H200 that is compute-bound at a fraction of the floor. Here each weight value
// costs about one instruction: packed codes become 16-bit floats by OR-ing them into the
// mantissa of a constant (float16 1024 = 0x6400, bfloat16 128 = 0x4300: 1024 + q is exact), one
// paired fused multiply-add removes the constant and the zero point, leaving q - z exactly
// (small integers are exact in 16-bit floats), and mma.sync m16n8k16 does the products with
// x and the float32 sums. The scale is applied to each group's float32 partial sum, so the
// weights are never rounded: the result is x W^T with W = (q - z) s as dequantize_weight gives
// it, up to float32 summation.
//
// Layout of the work: a block owns 16 output rows and kWarps warps; a step is 4 Wb contiguous
// bytes of each of the 16 rows (Wb = 16, 8 or 4: the largest whose step stays inside one
// group), warp w takes steps w, w + kWarps, ..., copied with cp.async into its own ring of
// shared slots (with the groups' scales and zero points) `ring` - 1 steps ahead, and the warps'
// float32 sums are added in order at the end (deterministic, no atomics). In a step, lane
// (g, t) (g = lane / 4, t = lane % 4) reads Wb bytes at offset t Wb of rows g and g + 8 from
// the slot. A 32-bit word
// of those bytes holds, per plane j, the codes of 4 consecutive positions i .. i + 3 of the
// group, i.e. of k = j P + i .. i + 3 (quant_kernels.h); the pair (bytes 0, 2) fills the
// fragment register of columns (2t, 2t + 1) and (bytes 1, 3) that of (2t + 8, 2t + 9). Which k
// a fragment column stands for does not matter to the sum as long as x's fragment (B, a column
// per batch row, lanes g < M) holds the same k: lane (g, t) loads x[g][k .. k + 3] and pairs
// (0, 2) and (1, 3) with byte permutes. So a warp does one mma per plane per word, per 8 batch
// rows.
//
// Zero points: z is split into an integer zi (in the range where the constants stay exact)
// and r = z - zi. r is 0 for every format quantize_weight makes; imported weights with
// fractional zeros (QuantizedWeight.from_int) add, for the steps where some lane has r != 0,
// one more mma of an all-ones A (the sums of x over the step) and subtract r times it.
//
// Written in session 14 without a GPU (tests/test_cuda_emulation.py runs it under the
// emulator); first run on an H200 at f95b002: its tests pass, batch 1 at 8192x28672 4-bit
// 0.11 ms (29% of the byte floor; the warp GEMV 0.20, cuBLAS float16 0.15), batch 16 0.13 ms
// (the warp GEMV 2.50), with a register double buffer (2 KB in flight per warp) where the ring
// is now (session 22, unmeasured; FASTLOSS_QUANT_GEMV_RING=2 gives one step in flight for the
// comparison in bench_quant.py). The other formats (3-bit,
// codebooks, float32 x, 8-bit with bfloat16 x, plane lengths not a multiple of 16) keep
// quant_cuda.cu's GEMV, or the tensor-core GEMM above 8 rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "../common/cuda_helpers.cuh"
#include "../common/mma.cuh"
#include "quant_half16.cuh"
#include "quant_kernels.h"

namespace fastloss {
namespace {
using FL_ISA::bits_as;
using FL_ISA::decode_halves;
using FL_ISA::Half16;
using FL_ISA::integer_zero;
using FL_ISA::mma_m16n8k16;
using FL_ISA::Planes;
using FL_ISA::cp_async16;
using FL_ISA::cp_async4;
using FL_ISA::cp_async_commit;
using FL_ISA::cp_async_wait_dynamic;
using FL_ISA::store1;

constexpr int kWarps = 8;  // warps per block, each on its own steps of the block's 16 rows

// The codes of plane j at bytes (h, h + 2) of `word` as a 16-bit pair, q - zi exactly
// (decode_halves, quant_half16.cuh).
template <int BITS, class T>
__device__ __forceinline__ uint32_t decode_pair(uint32_t word, int j, int h, uint32_t unscale,
                                                uint32_t minus_c) {
  return decode_halves<BITS, T>(word >> (8 * h), j, unscale, minus_c);
}

// What a lane loads for one step: Wb bytes of rows g and g + 8, and their groups' scale and zero.
template <int WB>
struct StepLoad {
  uint32_t a[WB / 4], b[WB / 4];
  float sa, sb, za, zb;
};

// A lane's WB bytes of a row from the warp's shared slot
template <int WB>
__device__ __forceinline__ void shared_words(uint32_t (&out)[WB / 4], const unsigned char* p) {
  if constexpr (WB == 16) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else if constexpr (WB == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    out[0] = v.x, out[1] = v.y;
  } else {
    out[0] = *reinterpret_cast<const uint32_t*>(p);
  }
}

// The block's geometry: bytes and groups per row, steps per row and per group.
struct Rows {
  int64_t row_bytes, G;
  int64_t steps, steps_per_group;
};

// A step's place: its index s in the row, its group gi and its index within the group. A warp's
// steps advance by a fixed stride, so the group is carried along rather than divided out per
// step (a 64-bit division is some 25 instructions).
struct StepPos {
  int64_t s, gi, within;
  __device__ static StepPos at(int64_t s, int64_t steps_per_group) {
    return {s, s / steps_per_group, s % steps_per_group};
  }
  // the place `stride` steps further on, stride = groups * steps_per_group + within
  __device__ StepPos plus(const StepPos& stride, int64_t steps_per_group) const {
    StepPos p{s + stride.s, gi + stride.gi, within + stride.within};
    if (p.within >= steps_per_group) p.within -= steps_per_group, ++p.gi;
    return p;
  }
};

// A warp's shared slot for one step: the 16 rows' 4 WB bytes each, then their groups' scales
// [16] and zero points [16].
template <int WB>
struct Slot {
  static constexpr int kWeightBytes = 16 * 4 * WB;
  static constexpr int kBytes = kWeightBytes + 32 * 4;
};

// A lane's copies of every step into its warp's slots: where its pieces come from at step 0
// and go in a slot (fixed for the block; a step adds its offset), and its row's scale (lanes
// 0-15) or zero point (16-31; none without zero points). Rows past N copy row N - 1 (their
// sums are not stored).
template <int WB>
struct LaneCopies {
  static constexpr int kPer = WB / 4;                      // 16-byte pieces per row and step
  static constexpr int kCopies = (16 * kPer + 31) / 32;   // a lane's pieces per step
  const uint8_t* src[kCopies];
  int at[kCopies];
  const float* sz;
  int sz_at;

  __device__ LaneCopies(const QuantWeight& w, const Rows& r, int64_t n0, int lane) {
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      const int c = lane + 32 * i, row = c / kPer, piece = c % kPer;
      const int64_t n = n0 + row < w.N ? n0 + row : w.N - 1;
      src[i] = c < 16 * kPer ? w.q + n * r.row_bytes + 16 * piece : nullptr;
      at[i] = row * 4 * WB + 16 * piece;
    }
    const int row = lane % 16;
    const int64_t n = n0 + row < w.N ? n0 + row : w.N - 1;
    sz = lane < 16 ? w.scale + n * r.G : (w.zero ? w.zero + n * r.G : nullptr);
    sz_at = Slot<WB>::kWeightBytes + 4 * lane;
  }

  // starts the copies of the step at `pos` into `slot`; every lane of the warp calls it (4-byte
  // lanes copy half a sector per row: through L1, where the next step's warp finds the rest)
  __device__ __forceinline__ void issue(unsigned char* slot, const StepPos& pos) const {
#pragma unroll
    for (int i = 0; i < kCopies; ++i)
      if (src[i]) cp_async16<WB == 4>(slot + at[i], src[i] + pos.s * 4 * WB);
    if (sz) cp_async4(slot + sz_at, sz + pos.gi);
  }
};

// Lane (g, t)'s share of the step in `slot`: WB bytes at t WB of rows g and g + 8, and their
// scales and zero points.
template <int WB>
__device__ __forceinline__ StepLoad<WB> read_step(const unsigned char* slot, bool zeros, int g, int t) {
  StepLoad<WB> l;
  shared_words<WB>(l.a, slot + g * 4 * WB + t * WB);
  shared_words<WB>(l.b, slot + (g + 8) * 4 * WB + t * WB);
  const float* sz = reinterpret_cast<const float*>(slot + Slot<WB>::kWeightBytes);
  l.sa = sz[g];
  l.sb = sz[g + 8];
  l.za = zeros ? sz[16 + g] : 0.f;
  l.zb = zeros ? sz[16 + g + 8] : 0.f;
  return l;
}

// x's B fragment for 8 batch rows at k .. k + 3 of the lane's batch row (xk: that row at k, or
// null past M): pairs (k, k + 2) and (k + 1, k + 3), as decode_pair pairs bytes (0, 2), (1, 3).
template <class T>
__device__ __forceinline__ void x_fragment(uint32_t (&b)[2], const T* xk) {
  if (xk == nullptr) {
    b[0] = b[1] = 0u;
    return;
  }
  const uint2 u = __ldg(reinterpret_cast<const uint2*>(xk));
  b[0] = __byte_perm(u.x, u.y, 0x5410);
  b[1] = __byte_perm(u.x, u.y, 0x7632);
}

// Adds one step's contribution to acc (d[0], d[1]: row g; d[2], d[3]: row g + 8; a fragment
// per 8 batch rows). Every lane of the warp calls it (mma and ballot are warp-wide).
template <int BITS, int WB, int NT, class T>
__device__ __forceinline__ void add_step(float (&acc)[NT][4], const StepLoad<WB>& l, const StepPos& pos,
                                         const QuantWeight& w, const Planes<BITS, T>& pl,
                                         const T* __restrict__ x, int64_t M, int g, int t) {
  using H = Half16<T>;
  constexpr int kPlanes = quant_planes(BITS);
  const uint32_t ones[4] = {H::kOne, H::kOne, H::kOne, H::kOne};  // A of the sums of x
  const float zia = integer_zero<T>(l.za), zib = integer_zero<T>(l.zb);
  const float fa = l.za - zia, fb = l.zb - zib;
  const bool fractional = __ballot_sync(0xffffffffu, !(fa == 0.f && fb == 0.f)) != 0u;
  uint32_t ca[kPlanes], cb[kPlanes];
#pragma unroll
  for (int j = 0; j < kPlanes; ++j) ca[j] = H::splat(-(pl.base[j] + zia)), cb[j] = H::splat(-(pl.base[j] + zib));
  float part[NT][4] = {}, xsum[NT][4] = {};
  const int64_t P = w.group / kPlanes;
  const int64_t k_lane = pos.gi * w.group + pos.within * 4 * WB + t * WB;
  const T* xl[NT];  // the lane's batch row of each fragment at k_lane (null past M)
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) xl[nt] = nt * 8 + g < M ? x + (int64_t(nt) * 8 + g) * w.K + k_lane : nullptr;
#pragma unroll
  for (int p = 0; p < WB / 4; ++p) {
#pragma unroll
    for (int j = 0; j < kPlanes; ++j) {
      const uint32_t a[4] = {decode_pair<BITS, T>(l.a[p], j, 0, pl.unscale[j], ca[j]),
                             decode_pair<BITS, T>(l.b[p], j, 0, pl.unscale[j], cb[j]),
                             decode_pair<BITS, T>(l.a[p], j, 1, pl.unscale[j], ca[j]),
                             decode_pair<BITS, T>(l.b[p], j, 1, pl.unscale[j], cb[j])};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        uint32_t b[2];
        x_fragment(b, xl[nt] ? xl[nt] + (j * P + 4 * p) : nullptr);
        mma_m16n8k16<T>(part[nt], a, b);
        if (fractional) mma_m16n8k16<T>(xsum[nt], ones, b);
      }
    }
  }
  // the step is inside one group: scale its sums
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // (rows with integer zeros skip the correction: an infinite sum of x must not make them NaN)
      const float sc = i < 2 ? l.sa : l.sb, fr = i < 2 ? fa : fb;
      acc[nt][i] = fmaf(sc, fractional && fr != 0.f ? fmaf(-fr, xsum[nt][i], part[nt][i]) : part[nt][i], acc[nt][i]);
    }
}

template <int BITS, int WB, int NT, class T>
__global__ void __launch_bounds__(32 * kWarps, 2)
    gemv_mma_kernel(QuantWeight w, const T* __restrict__ x, int64_t M, const float* __restrict__ bias,
                    T* __restrict__ y, int ring) {
  __shared__ float partial[kWarps][NT][4][32];
  FL_DYNAMIC_SHARED(unsigned char, slots);  // [kWarps][ring] Slot<WB>
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  const int64_t n0 = int64_t(blockIdx.x) * 16;
  Rows r;
  r.row_bytes = w.K * BITS / 8;
  r.G = w.K / w.group;
  r.steps = r.row_bytes / (4 * WB);
  r.steps_per_group = w.group / quant_planes(BITS) / (4 * WB);
  const Planes<BITS, T> planes;

  // Warp w takes steps w, w + kWarps, ...; its ring of `ring` shared slots holds the next
  // ring - 1 of them in flight (cp.async: the loads in flight hold no registers; only this
  // warp's lanes write and read its slots, so __syncwarp orders them). Why: the register
  // double buffer this replaces kept 2 KB in flight per warp (H200 at f95b002: batch 1 at
  // 8192x28672 4-bit 0.11 ms, 29% of the byte floor, perhaps issue-bound rather than short of
  // loads in flight); the default 4 slots keep 3 KB (2 blocks per multiprocessor: 96 KB), 8
  // slots 7 KB but take 144 KB of shared memory from L1, which holds x at 9-16 rows. Unmeasured:
  // bench_quant.py times rings of 2 (one step in flight, as before), 4 and 8 in one run.
  unsigned char* ring_base = slots + int64_t(warp) * ring * Slot<WB>::kBytes;
  float acc[NT][4] = {};
  const LaneCopies<WB> copies(w, r, n0, lane);
  const StepPos stride = StepPos::at(kWarps, r.steps_per_group);
  StepPos issued = StepPos::at(warp, r.steps_per_group), used = issued;
  for (int st = 0; st < ring - 1; ++st) {
    if (issued.s < r.steps) {
      copies.issue(ring_base + st * Slot<WB>::kBytes, issued);
      issued = issued.plus(stride, r.steps_per_group);
    }
    cp_async_commit();  // (empty past the row: the wait below counts ring - 2 younger groups)
  }
  int slot = 0;
  while (used.s < r.steps) {
    cp_async_wait_dynamic(ring - 2);  // this lane's copies of the step have landed
    __syncwarp();  // the warp's have, and its lanes are done with the previous step's slot
    if (issued.s < r.steps) {
      copies.issue(ring_base + (slot == 0 ? ring - 1 : slot - 1) * Slot<WB>::kBytes, issued);
      issued = issued.plus(stride, r.steps_per_group);
    }
    cp_async_commit();
    const StepLoad<WB> l = read_step<WB>(ring_base + slot * Slot<WB>::kBytes, w.zero != nullptr, g, t);
    add_step<BITS, WB, NT, T>(acc, l, used, w, planes, x, M, g, t);
    used = used.plus(stride, r.steps_per_group);
    slot = slot + 1 == ring ? 0 : slot + 1;
  }
  // the warps' sums, added in warp order by warp 0
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][nt][i][lane] = acc[nt][i];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float v = 0.f;
      for (int u = 0; u < kWarps; ++u) v += partial[u][nt][i][lane];
      const int64_t n = n0 + g + 8 * (i / 2), m = int64_t(nt) * 8 + 2 * t + i % 2;
      if (n < w.N && m < M) store1(y + m * w.N + n, v + (bias ? __ldg(bias + n) : 0.f));
    }
}

// Bytes per lane per step: the largest of 16, 8, 4 whose step (4 lanes) divides the group's
// bytes; 0 where even 4 does not (plane lengths not a multiple of 16).
int lane_bytes(const QuantWeight& w) {
  const int64_t P = w.group / quant_planes(w.bits);
  for (int wb : {16, 8, 4})
    if (P % (4 * wb) == 0) return wb;
  return 0;
}

// The dynamic shared memory of a launch: kWarps rings of `ring` slots
template <int WB>
constexpr int ring_bytes(int ring) {
  return kWarps * ring * Slot<WB>::kBytes;
}

template <int BITS, int WB, class T>
const char* launch(const QuantWeight& w, const T* x, int64_t M, const float* bias, T* y, cudaStream_t stream,
                   int ring) {
  const dim3 grid(unsigned((w.N + 15) / 16)), block(32 * kWarps);
  const size_t bytes = size_t(ring_bytes<WB>(ring));
  // (each kernel's limit is the largest ring's: the same value from every call and thread)
  constexpr int kMax = ring_bytes<WB>(kQuantGemvMaxRing);
  constexpr auto one = gemv_mma_kernel<BITS, WB, 1, T>;
  constexpr auto two = gemv_mma_kernel<BITS, WB, 2, T>;
  if (M <= 8) {
    if (!FL_ISA::allow_dynamic_shared<one, kMax>()) return "the tensor-core GEMV's shared memory was refused";
    one<<<grid, block, bytes, stream>>>(w, x, M, bias, y, ring);
  } else {
    if (!FL_ISA::allow_dynamic_shared<two, kMax>()) return "the tensor-core GEMV's shared memory was refused";
    two<<<grid, block, bytes, stream>>>(w, x, M, bias, y, ring);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <int BITS, class T>
const char* launch_bits(const QuantWeight& w, const T* x, int64_t M, const float* bias, T* y, cudaStream_t s,
                        int ring) {
  switch (lane_bytes(w)) {
    case 16: return launch<BITS, 16>(w, x, M, bias, y, s, ring);
    case 8: return launch<BITS, 8>(w, x, M, bias, y, s, ring);
    default: return launch<BITS, 4>(w, x, M, bias, y, s, ring);
  }
}

}  // namespace

bool quant_gemv_mma_applies(const QuantWeight& w, ScalarType dtype, int64_t M) {
  const bool bits_ok = w.bits == 2 || w.bits == 4 || (w.bits == 8 && dtype == ScalarType::f16);
  if (!bits_ok || w.codebook || dtype == ScalarType::f32 || M < 1 || M > kQuantMaxRows || w.N < 1 ||
      lane_bytes(w) == 0 || reinterpret_cast<uintptr_t>(w.q) % 16 != 0)
    return false;
  // the largest rings (72 KB) and the warps' sums
  if (!FL_ISA::shared_optin_at_least(ring_bytes<16>(kQuantGemvMaxRing) + int(sizeof(float)) * kWarps * 2 * 4 * 32))
    return false;
  return FL_ISA::mma_available<gemv_mma_kernel<4, 16, 1, __half>>();
}

const char* quant_gemv_mma_cuda(const QuantWeight& w, const void* x, ScalarType dtype, int64_t M,
                                const float* bias, void* y, void* stream, int ring) {
  auto s = static_cast<cudaStream_t>(stream);
  const int a = ring < 2 ? 2 : ring > kQuantGemvMaxRing ? kQuantGemvMaxRing : ring;
  if (dtype == ScalarType::f16) {
    const __half* xt = static_cast<const __half*>(x);
    __half* yt = static_cast<__half*>(y);
    if (w.bits == 2) return launch_bits<2>(w, xt, M, bias, yt, s, a);
    if (w.bits == 4) return launch_bits<4>(w, xt, M, bias, yt, s, a);
    return launch_bits<8>(w, xt, M, bias, yt, s, a);
  }
  const __nv_bfloat16* xt = static_cast<const __nv_bfloat16*>(x);
  __nv_bfloat16* yt = static_cast<__nv_bfloat16*>(y);
  if (w.bits == 2) return launch_bits<2>(w, xt, M, bias, yt, s, a);
  return launch_bits<4>(w, xt, M, bias, yt, s, a);
}

}  // namespace fastloss
