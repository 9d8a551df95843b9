// Rows read and written in 16-byte packs (4 float32 or 8 float16 / bfloat16 values, float32
// math inside) by groups of threads: consecutive threads take consecutive packs (coalesced) and
// each loads kPacksInFlight packs before it uses any, so that enough bytes are in flight to keep
// HBM busy; the few elements before a row's first 16-byte boundary and after its last whole
// pack are read one at a time. Used by the row losses (losses_cuda.cu) and the logit
// distillation kernels (kd_cuda.cu). Torch-free; included only by .cu files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_helpers.cuh"

namespace fastloss {
namespace FL_ISA {

constexpr int kPacksInFlight = 4;  // per thread and row: 64 bytes

// A 16-byte store (through __stwb, the default write-back policy, so that the tests' CUDA
// emulator can trap a misaligned address as a GPU would).
__device__ __forceinline__ void store_pack(uint4* p, const uint4& v) { __stwb(p, v); }

template <class T>
constexpr int kPack = 16 / int(sizeof(T));

template <class T>
__device__ __forceinline__ void unpack(const uint4& r, float (&v)[kPack<T>]) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      v[i] = __uint_as_float(w[i]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // element 2i is the low half
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      __half2 h;
      static_assert(sizeof(h) == sizeof(w[i]));
      memcpy(&h, &w[i], sizeof(h));
      const float2 f = __half22float2(h);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
}

template <class T>
__device__ __forceinline__ uint4 pack(const float (&v)[kPack<T>]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      w[i] = __float_as_uint(v[i]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      const __nv_bfloat162 b = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
      memcpy(&w[i], &b, sizeof(b));
    } else {
      const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
      memcpy(&w[i], &h, sizeof(h));
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// A row of C elements at x: `head` elements before its first 16-byte boundary (fewer than one
// pack), then `packs` whole packs, then the tail.
struct RowSplit {
  int64_t head, packs;
};
template <class T>
__device__ __forceinline__ RowSplit split_row(const T* x, int64_t C) {
  const int misaligned = int((reinterpret_cast<uintptr_t>(x) & 15) / sizeof(T));
  int64_t head = misaligned == 0 ? 0 : kPack<T> - misaligned;
  head = head < C ? head : C;
  return {head, (C - head) / kPack<T>};
}

// Visits every element of one row once, split among the kGroup threads of its group:
// on_pack(k0, v[kPack]) for the packs (elements k0 .. k0 + kPack - 1), on_one(k, v) for the
// head and the tail.
// kStaged: the row's first `staged` whole packs are kept on chip at `stage` (shared memory):
// with `fill` they are loaded from x and stored there, else read back from there; later packs
// come from x. Each thread stores and reads back only its own packs (the same pack indices on
// every walk of a row by the same group), so no barrier is needed.
template <int kGroup, bool kStaged = false, class T, class OnPack, class OnOne>
__device__ __forceinline__ void walk_row(const T* x, int64_t C, int lane, OnPack&& on_pack, OnOne&& on_one,
                                         uint4* stage = nullptr, int64_t staged = 0, bool fill = false) {
  constexpr int P = kPack<T>;
  const RowSplit sp = split_row(x, C);
  for (int64_t k = lane; k < sp.head; k += kGroup) on_one(k, load1(x + k));
  const uint4* px = reinterpret_cast<const uint4*>(x + sp.head);
  const auto get = [&](int64_t j) {
    if constexpr (kStaged)
      if (!fill && j < staged) return stage[j];
    return __ldg(px + j);
  };
  const auto use = [&](int64_t j, const uint4& r) {
    if constexpr (kStaged)
      if (fill && j < staged) stage[j] = r;
    float v[P];
    unpack<T>(r, v);
    on_pack(sp.head + j * P, v);
  };
  int64_t i = lane;
  for (; i + int64_t(kPacksInFlight - 1) * kGroup < sp.packs; i += int64_t(kPacksInFlight) * kGroup) {
    uint4 r[kPacksInFlight];
#pragma unroll
    for (int u = 0; u < kPacksInFlight; ++u) r[u] = get(i + u * kGroup);
#pragma unroll
    for (int u = 0; u < kPacksInFlight; ++u) use(i + u * kGroup, r[u]);
  }
  for (; i < sp.packs; i += kGroup) use(i, get(i));
  for (int64_t k = sp.head + sp.packs * P + lane; k < C; k += kGroup) on_one(k, load1(x + k));
}

// walk_row over two rows a and b of C elements at once: on_pack(k0, va[kPack], vb[kPack]) and
// on_one(k, a_k, b_k). Packs where both rows have the same alignment (the same head), else every
// element one at a time.
template <int kGroup, class T, class OnPack, class OnOne>
__device__ __forceinline__ void walk_rows2(const T* a, const T* b, int64_t C, int lane, OnPack&& on_pack,
                                           OnOne&& on_one) {
  constexpr int P = kPack<T>;
  const RowSplit sp = split_row(a, C);
  if (split_row(b, C).head != sp.head) {
    for (int64_t k = lane; k < C; k += kGroup) on_one(k, load1(a + k), load1(b + k));
    return;
  }
  for (int64_t k = lane; k < sp.head; k += kGroup) on_one(k, load1(a + k), load1(b + k));
  const uint4* pa = reinterpret_cast<const uint4*>(a + sp.head);
  const uint4* pb = reinterpret_cast<const uint4*>(b + sp.head);
  int64_t i = lane;
  for (; i + int64_t(kPacksInFlight - 1) * kGroup < sp.packs; i += int64_t(kPacksInFlight) * kGroup) {
    uint4 ra[kPacksInFlight], rb[kPacksInFlight];
#pragma unroll
    for (int u = 0; u < kPacksInFlight; ++u) {
      ra[u] = __ldg(pa + i + u * kGroup);
      rb[u] = __ldg(pb + i + u * kGroup);
    }
#pragma unroll
    for (int u = 0; u < kPacksInFlight; ++u) {
      float va[P], vb[P];
      unpack<T>(ra[u], va);
      unpack<T>(rb[u], vb);
      on_pack(sp.head + (i + u * kGroup) * P, va, vb);
    }
  }
  for (; i < sp.packs; i += kGroup) {
    float va[P], vb[P];
    unpack<T>(__ldg(pa + i), va);
    unpack<T>(__ldg(pb + i), vb);
    on_pack(sp.head + i * P, va, vb);
  }
  for (int64_t k = sp.head + sp.packs * P + lane; k < C; k += kGroup) on_one(k, load1(a + k), load1(b + k));
}

// f(k, x_k) for every element of one row, and f(k, a_k, b_k) for two rows at once: walk_row /
// walk_rows2 for callers that work element by element (the packs' order is kept).
template <int kGroup, class T, class F>
__device__ __forceinline__ void for_each_value(const T* x, int64_t C, int lane, F&& f) {
  walk_row<kGroup>(
      x, C, lane,
      [&](int64_t k0, const float (&v)[kPack<T>]) {
#pragma unroll
        for (int e = 0; e < kPack<T>; ++e) f(k0 + e, v[e]);
      },
      f);
}
template <int kGroup, class T, class F>
__device__ __forceinline__ void for_each_pair(const T* a, const T* b, int64_t C, int lane, F&& f) {
  walk_rows2<kGroup>(
      a, b, C, lane,
      [&](int64_t k0, const float (&va)[kPack<T>], const float (&vb)[kPack<T>]) {
#pragma unroll
        for (int e = 0; e < kPack<T>; ++e) f(k0 + e, va[e], vb[e]);
      },
      f);
}

// out[k] = f(k, a_k, b_k) over a row of C elements, split among the kGroup threads of a group:
// walk_rows2 over a and b, each pack of results stored whole where out shares their alignment,
// else one element at a time.
template <int kGroup, class T, class F>
__device__ __forceinline__ void map_rows2(const T* a, const T* b, T* out, int64_t C, int lane, F&& f) {
  constexpr int P = kPack<T>;
  auto one = [&](int64_t k, float av, float bv) { store1(out + k, f(k, av, bv)); };
  if (split_row(out, C).head != split_row(a, C).head) {
    for (int64_t k = lane; k < C; k += kGroup) one(k, load1(a + k), load1(b + k));
    return;
  }
  walk_rows2<kGroup>(
      a, b, C, lane,
      [&](int64_t k0, const float (&va)[P], const float (&vb)[P]) {  // (out + k0: 16-byte aligned)
        float vo[P];
#pragma unroll
        for (int e = 0; e < P; ++e) vo[e] = f(k0 + e, va[e], vb[e]);
        store_pack(reinterpret_cast<uint4*>(out + k0), pack<T>(vo));
      },
      one);
}

}  // namespace FL_ISA
}  // namespace fastloss
