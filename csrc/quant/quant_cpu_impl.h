// The CPU dequant-GEMM kernels, instantiated once per instruction set (quant_cpu.cpp: float,
// quant_cpu_avx2.cpp: Vec8, quant_cpu_avx512.cpp: Vec16).
#pragma once
#include <algorithm>
#include <cstdint>

#include "../common/storage.h"
#include "../common/vec_scalar.h"
#include "quant_kernels.h"

namespace fastloss {
namespace FL_ISA {

// The quantized values q[n, g * group + k0 .. + len) as floats (elementwise: the compiler
// vectorizes it). 4-bit groups keep their first half in the low nibbles and their second half
// in the high nibbles of the group's bytes.
inline void unpack(const QuantWeight& w, int64_t n, int64_t g, int64_t k0, int64_t len, float* qf) {
  if (w.bits == 8) {
    const uint8_t* b = w.q + n * w.K + g * w.group + k0;
    for (int64_t i = 0; i < len; ++i) qf[i] = float(b[i]);
    return;
  }
  const uint8_t* b = w.q + n * (w.K / 2) + g * (w.group / 2);
  const int64_t half = w.group / 2;
  const int64_t lo_end = std::min(k0 + len, half);  // [k0, lo_end): low nibbles
  int64_t i = 0;
  for (int64_t k = k0; k < lo_end; ++k, ++i) qf[i] = float(b[k] & 15);
  for (int64_t k = std::max(k0, half); k < k0 + len; ++k, ++i) qf[i] = float(b[k - half] >> 4);
}

template <class V>
inline float dot(const float* a, const float* b, int64_t n) {
  constexpr int kW = VecTraits<V>::width;
  V acc0 = V(0.f), acc1 = V(0.f);
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    acc0 = vfma(VecIo<V>::load(a + i), VecIo<V>::load(b + i), acc0);
    acc1 = vfma(VecIo<V>::load(a + i + kW), VecIo<V>::load(b + i + kW), acc1);
  }
  float s = hsum(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

constexpr int64_t kPiece = 4096;  // inputs unpacked at a time (a group, or a piece of one)

// sum_k q[n, g * group + k] x[k] over a whole group, the values unpacked in registers (no
// buffer): the batch-1 path, where the packed bytes are the traffic that matters.
template <class V>
inline float group_dot(const QuantWeight& w, int64_t n, int64_t g, const float* x) {
  constexpr int kW = VecTraits<V>::width;
  V acc0 = V(0.f), acc1 = V(0.f);
  float s = 0.f;
  if (w.bits == 8) {
    const uint8_t* b = w.q + n * w.K + g * w.group;
    int64_t i = 0;
    for (; i + kW <= w.group; i += kW) acc0 = vfma(load_u8(b + i, V()), VecIo<V>::load(x + i), acc0);
    for (; i < w.group; ++i) s += float(b[i]) * x[i];
  } else {
    const uint8_t* b = w.q + n * (w.K / 2) + g * (w.group / 2);
    const int64_t half = w.group / 2;
    int64_t i = 0;
    for (; i + kW <= half; i += kW) {
      acc0 = vfma(load_lo_nibbles(b + i, V()), VecIo<V>::load(x + i), acc0);
      acc1 = vfma(load_hi_nibbles(b + i, V()), VecIo<V>::load(x + half + i), acc1);
    }
    for (; i < half; ++i) s += float(b[i] & 15) * x[i] + float(b[i] >> 4) * x[half + i];
  }
  return s + hsum(acc0 + acc1);
}

template <class V>
void gemv(const QuantWeight& w, const float* x, const float* xsum, int64_t M, const float* bias,
          float* y, int64_t n0, int64_t n1) {
  const int64_t G = w.K / w.group;
  alignas(64) float qf[kPiece];
  float acc[kQuantMaxRows];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) acc[m] = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      // sum_k (q - z) s x = s (sum_k q x - z sum_k x): the zero point costs one multiply
      const float s = w.scale[n * G + g], z = w.zero[n * G + g];
      for (int64_t m = 0; m < M; ++m) acc[m] -= s * z * xsum[m * G + g];
      if (M <= 2) {  // unpack in registers, once per row of x
        for (int64_t m = 0; m < M; ++m) acc[m] += s * group_dot<V>(w, n, g, x + m * w.K + g * w.group);
        continue;
      }
      for (int64_t k0 = 0; k0 < w.group; k0 += kPiece) {
        const int64_t len = std::min(kPiece, w.group - k0);
        unpack(w, n, g, k0, len, qf);
        for (int64_t m = 0; m < M; ++m)
          acc[m] += s * dot<V>(qf, x + m * w.K + g * w.group + k0, len);
      }
    }
    for (int64_t m = 0; m < M; ++m) y[m * w.N + n] = acc[m] + (bias ? bias[n] : 0.f);
  }
}

inline void dequant_rows(const QuantWeight& w, float* out, int64_t n0, int64_t n1) {
  const int64_t G = w.K / w.group;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      const float s = w.scale[n * G + g], z = w.zero[n * G + g];
      float* o = out + (n - n0) * w.K + g * w.group;
      for (int64_t k0 = 0; k0 < w.group; k0 += kPiece) {
        const int64_t len = std::min(kPiece, w.group - k0);
        unpack(w, n, g, k0, len, o + k0);
        for (int64_t i = 0; i < len; ++i) o[k0 + i] = (o[k0 + i] - z) * s;
      }
    }
  }
}

#if defined(FL_ISA_VEC)
void quant_gemv(const QuantWeight& w, const float* x, const float* xsum, int64_t M,
                const float* bias, float* y, int64_t n0, int64_t n1) {
  gemv<FL_ISA_VEC>(w, x, xsum, M, bias, y, n0, n1);
}
void quant_dequant(const QuantWeight& w, float* out, int64_t n0, int64_t n1) {
  dequant_rows(w, out, n0, n1);
}
#endif

}  // namespace FL_ISA
}  // namespace fastloss
