// The CPU dequant-GEMM kernels, instantiated once per instruction set (quant_cpu.cpp: float,
// quant_cpu_avx2.cpp: Vec8, quant_cpu_avx512.cpp: Vec16 with Vec8 for short planes).
//
// Every loop walks a group plane by plane (quant_kernels.h): the codes of values
// j * P + i .. + width come from one vector load of bytes, a shift and a mask; a decoder turns
// them into floats (uniform: the integers; codebook: an in-register table or a gather). A
// plane shorter than the vector width falls to the next narrower vector, then to scalars.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/storage.h"
#include "../common/vec_scalar.h"
#include "quant_kernels.h"

namespace fastloss {
namespace FL_ISA {

// the next narrower vector (float: none)
template <class V>
struct Narrower {
  using type = float;
};
#if defined(FL_ISA_NARROW)
template <>
struct Narrower<FL_ISA_VEC> {
  using type = FL_ISA_NARROW;
};
#endif

// codes of values j * P + i .. + width of the group whose bytes start at b; with kLow the bits
// above a 2- or 4-bit code are left as they are (for lookups that read only the index's low
// four bits), saving the mask
template <int BITS, class V, bool kLow = false>
inline typename VecTraits<V>::Int codes(const uint8_t* b, int64_t P, int j, int64_t i) {
  if constexpr (BITS == 3) {
    const auto lo = bit_field(b + (j & 1) * P + i, 2 * (j >> 1), 3, V());
    return or_shifted(lo, bit_field(b + 2 * P + i, j, 1, V()), 2);
  } else {
    return bit_field(b + i, j * BITS, kLow ? -1 : (1 << BITS) - 1, V());
  }
}

// Decoders: value<BITS, V>(b, P, j, i) = v(q) of codes<BITS, V>(b, P, j, i) (quant_kernels.h).
struct Uniform {  // the integers
  template <int BITS, class V>
  V value(const uint8_t* b, int64_t P, int j, int64_t i) const {
    return int_to_float(codes<BITS, V>(b, P, j, i));
  }
};
// Up to 16 entries, kept in registers; entry c is the value of code c mod 2^BITS, so that the
// vector permutes (lookup16 on AVX2 / AVX-512: they read the index's low four bits) take 2- and
// 4-bit codes unmasked.
struct SmallCodebook {
  alignas(64) float table[16];
  template <int BITS, class V>
  V value(const uint8_t* b, int64_t P, int j, int64_t i) const {
    constexpr bool kLow = VecTraits<V>::width > 1 && BITS != 3;
    return lookup16(table, codes<BITS, V, kLow>(b, P, j, i), V());
  }
};
struct LargeCodebook {  // 256 entries (8 bits), gathered from memory
  const float* table;
  template <int BITS, class V>
  V value(const uint8_t* b, int64_t P, int j, int64_t i) const {
    return gather(table, codes<BITS, V>(b, P, j, i), V());
  }
};

// sum_k v(q[k]) x[k] over plane positions [i, P) of a group (x: the group's inputs), unpacked
// in registers: the batch-1 path, where the packed bytes are the traffic. Returns the lanes
// unreduced (reduced once per output row, not per group) for the positions a whole V covers,
// and leaves i at the first position it did not cover.
template <int BITS, class V, class Dec>
inline V plane_dot(const uint8_t* b, int64_t P, const float* x, const Dec& dec, int64_t& i) {
  constexpr int kW = VecTraits<V>::width, kPlanes = quant_planes(BITS);
  constexpr int kAcc = kPlanes > 1 ? 2 : 1;  // two chains hide the FMA latency
  V acc[kAcc];
  for (V& a : acc) a = V(0.f);
  for (; i + kW <= P; i += kW) {
#pragma GCC unroll 8
    for (int j = 0; j < kPlanes; ++j)
      acc[j % kAcc] = vfma(dec.template value<BITS, V>(b, P, j, i),
                           VecIo<V>::load(x + j * P + i), acc[j % kAcc]);
  }
  return kAcc > 1 ? acc[0] + acc[kAcc - 1] : acc[0];
}

// plane_dot for two rows' groups b0, b1 over the same inputs x: one load of x feeds both rows'
// FMAs (at batch 1 with long rows x comes from L2, and its loads were half the traffic of a
// row); each row's sums run in plane_dot's order.
template <int BITS, class V, class Dec0, class Dec1>
inline void plane_dot2(const uint8_t* b0, const uint8_t* b1, int64_t P, const float* x, const Dec0& dec0,
                       const Dec1& dec1, int64_t& i, V& out0, V& out1) {
  constexpr int kW = VecTraits<V>::width, kPlanes = quant_planes(BITS);
  constexpr int kAcc = kPlanes > 1 ? 2 : 1;
  V acc0[kAcc], acc1[kAcc];
  for (int a = 0; a < kAcc; ++a) acc0[a] = V(0.f), acc1[a] = V(0.f);
  for (; i + kW <= P; i += kW) {
#pragma GCC unroll 8
    for (int j = 0; j < kPlanes; ++j) {
      const V xv = VecIo<V>::load(x + j * P + i);
      acc0[j % kAcc] = vfma(dec0.template value<BITS, V>(b0, P, j, i), xv, acc0[j % kAcc]);
      acc1[j % kAcc] = vfma(dec1.template value<BITS, V>(b1, P, j, i), xv, acc1[j % kAcc]);
    }
  }
  out0 = kAcc > 1 ? acc0[0] + acc0[kAcc - 1] : acc0[0];
  out1 = kAcc > 1 ? acc1[0] + acc1[kAcc - 1] : acc1[0];
}

// the positions [i, P) plane_dot<V> left (planes shorter than V), with narrower vectors
template <int BITS, class V, class Dec>
inline float plane_dot_rest(const uint8_t* b, int64_t P, const float* x, const Dec& dec, int64_t i) {
  using N = typename Narrower<V>::type;
  float s = hsum(plane_dot<BITS, N>(b, P, x, dec, i));
  if constexpr (VecTraits<N>::width > 1) {
    if (i < P) s += plane_dot_rest<BITS, N>(b, P, x, dec, i);
  }
  return s;
}

// the values v(q) of a group into out[0, group), plane positions [i0, P), each as f(v): f is
// generic (it sees every vector width the tail narrows to), the identity or decode_rows' (v - z) s
// (applied here, not in a second pass over the values)
template <int BITS, class V, class Dec, class F>
inline void unpack_group(const uint8_t* b, int64_t P, float* out, const Dec& dec, int64_t i0, const F& f) {
  constexpr int kW = VecTraits<V>::width, kPlanes = quant_planes(BITS);
  int64_t i = i0;
  for (; i + kW <= P; i += kW) {
#pragma GCC unroll 8
    for (int j = 0; j < kPlanes; ++j)
      VecIo<V>::store(out + j * P + i, f(dec.template value<BITS, V>(b, P, j, i)));
  }
  if constexpr (kW > 1) {
    if (i < P) unpack_group<BITS, typename Narrower<V>::type>(b, P, out, dec, i, f);
  }
}

// Calls f(dec) with the decoder of row n's codebook (or the uniform one). Uniform 2- and 4-bit
// codes on AVX-512 decode by a permute of the table 0 .. 15: one instruction for the mask and
// the integer conversion (two more on AVX2, where the conversion stays).
template <int BITS, class F>
inline void with_decoder(const QuantWeight& w, int64_t n, F&& f) {
  constexpr int kCodes = 1 << BITS;
  if (!w.codebook) {
    if constexpr (VecTraits<FL_ISA_VEC>::width == 16 && (BITS == 2 || BITS == 4)) {
      SmallCodebook dec;
      for (int c = 0; c < 16; ++c) dec.table[c] = float(c % kCodes);
      return f(dec);
    } else {
      return f(Uniform());
    }
  }
  const float* table = w.codebook + (w.codebook_rows > 1 ? n : 0) * int64_t(kCodes);
  if constexpr (BITS == 8) {
    f(LargeCodebook{table});
  } else {
    SmallCodebook dec;
    for (int c = 0; c < 16; ++c) dec.table[c] = table[c % kCodes];
    f(dec);
  }
}

// Runs f.template operator()<BITS>() for the weight's bit width.
template <class F>
inline void with_bits(int bits, F&& f) {
  switch (bits) {
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    default: return f(std::integral_constant<int, 8>());
  }
}

// Batch 1 reads each row pair's packed bytes once, as two streams that restart every pair of
// rows (and every 4 KiB page, which the hardware prefetchers do not cross: a pair of 4-bit rows
// of 4096 inputs is one page). Each group step asks for the bytes 1 KiB ahead in its row and
// for the same group of the next pair's rows. Cold weights (rotated copies beyond the 300 MB
// L3), 4-bit, 2 threads, ad hoc, against the float32 matmul in the same script: 1 KiB ahead
// alone 1.9-2.8x at 4096x4096 and 2.1-3.1x at 14336x4096 (it had helped the long rows of
// 8192x28672: 11.6-13.1 -> 7.1-10.6 ms), the next pair alone 3.5-4.7x and 3.1-5.1x, both
// 3.0-4.5x and 3.9-5.1x.
constexpr int64_t kPrefetchBytes = 1024;

// Batch 1, rows n and n + 1 together (plane_dot2): y[n], y[n + 1], each summed in the order of
// the one-row loop below (the same results).
template <int BITS, class V>
void gemv_pair(const QuantWeight& w, const float* x, const float* xsum, const float* bias, float* y,
               int64_t n) {
  const int64_t G = w.K / w.group, row_bytes = w.K * w.bits / 8, group_bytes = w.group * w.bits / 8;
  const int64_t P = w.group / quant_planes(w.bits);
  with_decoder<BITS>(w, n, [&](const auto& dec0) {
    with_decoder<BITS>(w, n + 1, [&](const auto& dec1) {
      V lanes0(0.f), lanes1(0.f);
      float acc0 = 0.f, acc1 = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t* b0 = w.q + n * row_bytes + g * group_bytes;
        const uint8_t* b1 = b0 + row_bytes;
        // past the weight's end: harmless hints
        __builtin_prefetch(b0 + kPrefetchBytes);
        __builtin_prefetch(b1 + kPrefetchBytes);
        __builtin_prefetch(b0 + 2 * row_bytes);
        __builtin_prefetch(b1 + 2 * row_bytes);
        const float s0 = w.scale[n * G + g], s1 = w.scale[(n + 1) * G + g];
        if (w.zero) {
          acc0 -= s0 * w.zero[n * G + g] * xsum[g];
          acc1 -= s1 * w.zero[(n + 1) * G + g] * xsum[g];
        }
        const float* xg = x + g * w.group;
        int64_t i = 0;
        V d0, d1;
        plane_dot2<BITS, V>(b0, b1, P, xg, dec0, dec1, i, d0, d1);
        lanes0 = vfma(V(s0), d0, lanes0);
        lanes1 = vfma(V(s1), d1, lanes1);
        if (i < P) {
          acc0 += s0 * plane_dot_rest<BITS, V>(b0, P, xg, dec0, i);
          acc1 += s1 * plane_dot_rest<BITS, V>(b1, P, xg, dec1, i);
        }
      }
      y[n] = hsum(lanes0) + acc0 + (bias ? bias[n] : 0.f);
      y[n + 1] = hsum(lanes1) + acc1 + (bias ? bias[n + 1] : 0.f);
    });
  });
}

// decode_rows for a bit width known at compile time
template <int BITS, bool kScale, class V>
inline void decode_rows_of(const QuantWeight& w, float* out, int64_t ld, int64_t n0, int64_t n1, int64_t g0,
                           int64_t g1) {
  const int64_t G = w.K / w.group, row_bytes = w.K * w.bits / 8, group_bytes = w.group * w.bits / 8;
  const int64_t P = w.group / quant_planes(w.bits);
  for (int64_t n = n0; n < n1; ++n) {
    with_decoder<BITS>(w, n, [&](const auto& dec) {
      for (int64_t g = g0; g < g1; ++g) {
        float* o = out + (n - n0) * ld + (g - g0) * w.group;
        const uint8_t* b = w.q + n * row_bytes + g * group_bytes;
        if constexpr (kScale) {
          const float s = w.scale[n * G + g], z = w.zero ? w.zero[n * G + g] : 0.f;
          unpack_group<BITS, V>(b, P, o, dec, 0, [s, z](auto v) {
            using T = decltype(v);
            return (v - T(z)) * T(s);
          });
        } else {
          unpack_group<BITS, V>(b, P, o, dec, 0, [](auto v) { return v; });
        }
      }
    });
  }
}

// Inputs of the weights gemv_quad decodes at a time (whole groups; one group where a group is
// longer): the four rows' values (8 KiB) and a block of four batch rows of x (8 KiB) stay in L1.
constexpr int64_t kQuadChunkInputs = 512;

// Batch rows m0 .. m0 + MB - 1 against weight rows n .. n + R - 1 over `vectors` inputs of a
// chunk: values (R rows, stride ld), x from xc (stride x_ld); the MB x R sums carried in acc
// from chunk to chunk. MB and R known at compile time: the sums stay in registers.
template <int MB, int R, class V>
inline void quad_block(const float* values, int64_t ld, const float* xc, int64_t x_ld, int64_t vectors,
                       V (*acc)[4]) {
  constexpr int kW = VecTraits<V>::width;
  V a[MB][R];
  for (int j = 0; j < MB; ++j)
    for (int r = 0; r < R; ++r) a[j][r] = acc[j][r];
  for (int64_t i = 0; i < vectors; i += kW) {
    V wv[R];
    for (int r = 0; r < R; ++r) wv[r] = VecIo<V>::load(values + r * ld + i);
    for (int j = 0; j < MB; ++j) {
      const V xv = VecIo<V>::load(xc + j * x_ld + i);
      for (int r = 0; r < R; ++r) a[j][r] = vfma(wv[r], xv, a[j][r]);
    }
  }
  for (int j = 0; j < MB; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = a[j][r];
}

// From 3 batch rows, rows n .. n + R - 1 together (R = 4): chunks of kQuadChunkInputs inputs,
// the four rows' weights (v - z) s of a chunk decoded once (values: 4 x max(group,
// kQuadChunkInputs) floats), then per block of up to four batch rows 16 sums over the chunk's
// vectors (a load of x and one of the weights per 2 FMAs), carried across chunks and reduced
// once per row; the next chunk's bytes asked for meanwhile. Reducing them per group, with the
// batch block's bounds as run-time values (session 27), bound the loop: ad hoc, cold, 2
// threads, 4096 x 4096 NF4 batch 16 6.7 -> 3.4-3.9 ms, batch 4 2.7-3.0 -> 1.9-2.0 ms; the
// 4-bit weight on the AVX-512 kernels batch 16 6.0-6.4 -> 3.5-3.9 ms; the scale applied while
// unpacking instead of in a second pass over the values: NF4 batch 4 1.64-1.70 -> 1.30-1.35 ms,
// batch 16 3.29-3.33 -> 2.83-3.17 (the FMA bound ~1.7 ms).
// R < 4: the rows left at the end of a thread's range, with the same sums (so a row's result
// does not depend on where the threads' ranges begin).
template <int BITS, int R, class V>
void gemv_quad(const QuantWeight& w, const float* x, int64_t M, const float* bias, float* y, int64_t n,
               float* values) {
  constexpr int kW = VecTraits<V>::width;
  const int64_t G = w.K / w.group, per_chunk = std::max<int64_t>(1, kQuadChunkInputs / w.group);
  const int64_t ld = per_chunk * w.group, row_bytes = w.K * BITS / 8, group_bytes = w.group * BITS / 8;
  V acc[kQuantMaxRows][4];
  float tail[kQuantMaxRows][4];
  for (int64_t m = 0; m < M; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = V(0.f), tail[m][r] = 0.f;
  for (int64_t g0 = 0; g0 < G; g0 += per_chunk) {
    const int64_t g1 = std::min(G, g0 + per_chunk), k0 = g0 * w.group, len = (g1 - g0) * w.group;
    decode_rows_of<BITS, true, V>(w, values, ld, n, n + R, g0, g1);
    // the next chunk's packed bytes (this rows', or the next four rows' first), asked for while
    // this one's sums run: decoding waited on them (38% of the samples at NF4 batch 16)
    {
      const bool last = g1 == G;
      const int64_t row = last ? n + R : n, rows = std::min<int64_t>(4, w.N - row), next_g = last ? 0 : g1;
      const uint8_t* next = w.q + std::min(row, w.N - 1) * row_bytes + next_g * group_bytes;
      const int64_t bytes = (std::min(G, next_g + per_chunk) - next_g) * group_bytes;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(next + r * row_bytes + b, 0, 3);
    }
    const int64_t vectors = len / kW * kW;
    // batch rows per block: 4 (16 sums + 4 weight vectors in 32 zmm registers), 2 with AVX2's
    // 16 ymm ones (4 spilled: NF4 batch 16 at 4096 x 4096 on the AVX2 kernels 6.6-7.0 ms, 2:
    // 6.1-6.2 ms, ad hoc)
    constexpr int64_t kMB = kW == 8 ? 2 : 4;
    for (int64_t m0 = 0; m0 < M; m0 += kMB) {
      const float* xc = x + m0 * w.K + k0;
      switch (std::min<int64_t>(kMB, M - m0)) {
        case 4: quad_block<4, R, V>(values, ld, xc, w.K, vectors, acc + m0); break;
        case 3: quad_block<3, R, V>(values, ld, xc, w.K, vectors, acc + m0); break;
        case 2: quad_block<2, R, V>(values, ld, xc, w.K, vectors, acc + m0); break;
        default: quad_block<1, R, V>(values, ld, xc, w.K, vectors, acc + m0); break;
      }
    }
    // the inputs past the last whole vector (groups that are not a multiple of the width)
    for (int64_t i = vectors; i < len; ++i)
      for (int64_t m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) tail[m][r] += values[r * ld + i] * x[m * w.K + k0 + i];
  }
  for (int64_t m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) y[m * w.N + n + r] = hsum(acc[m][r]) + tail[m][r] + (bias ? bias[n + r] : 0.f);
}

// Batch 1-2: each group's dot products are accumulated unreduced, times the group's scale, and
// reduced once per output row: a horizontal sum per group would cost more than the group's
// FMAs. From 3 rows: gemv_quad.
template <class V>
void gemv(const QuantWeight& w, const float* x, const float* xsum, int64_t M, const float* bias,
          float* y, int64_t n0, int64_t n1) {
  const int64_t G = w.K / w.group, row_bytes = w.K * w.bits / 8, group_bytes = w.group * w.bits / 8;
  const int64_t P = w.group / quant_planes(w.bits);
  std::vector<float> values4(M > kQuantGemvXsumRows ? 4 * std::max(w.group, kQuadChunkInputs) : 0);
  V lanes[kQuantMaxRows];
  float acc[kQuantMaxRows];
  with_bits(w.bits, [&](auto bits_c) {
    constexpr int BITS = decltype(bits_c)::value;
    int64_t n = n0;
    if (M == 1) {  // batch 1: two rows at a time over each load of x (gemv_pair)
      for (; n + 2 <= n1; n += 2) gemv_pair<BITS, V>(w, x, xsum, bias, y, n);
    }
    if (M > kQuantGemvXsumRows) {  // from 3 rows: four weight rows at a time (gemv_quad)
      for (; n + 4 <= n1; n += 4) gemv_quad<BITS, 4, V>(w, x, M, bias, y, n, values4.data());
      switch (n1 - n) {
        case 3: gemv_quad<BITS, 3, V>(w, x, M, bias, y, n, values4.data()); break;
        case 2: gemv_quad<BITS, 2, V>(w, x, M, bias, y, n, values4.data()); break;
        case 1: gemv_quad<BITS, 1, V>(w, x, M, bias, y, n, values4.data()); break;
        default: break;
      }
      return;
    }
    for (; n < n1; ++n) {  // batch 1-2 (one row at a time)
      with_decoder<BITS>(w, n, [&](const auto& dec) {
        for (int64_t m = 0; m < M; ++m) acc[m] = 0.f, lanes[m] = V(0.f);
        for (int64_t g = 0; g < G; ++g) {
          const uint8_t* b = w.q + n * row_bytes + g * group_bytes;
          const float s = w.scale[n * G + g];
          const V sv(s);
          // sum_k (v - z) s x = s (sum_k v x - z sum_k x): the zero point costs one multiply
          if (w.zero)
            for (int64_t m = 0; m < M; ++m) acc[m] -= s * w.zero[n * G + g] * xsum[m * G + g];
          for (int64_t m = 0; m < M; ++m) {  // unpacked in registers, once per row of x
            const float* xg = x + m * w.K + g * w.group;
            int64_t i = 0;
            lanes[m] = vfma(sv, plane_dot<BITS, V>(b, P, xg, dec, i), lanes[m]);
            if (i < P) acc[m] += s * plane_dot_rest<BITS, V>(b, P, xg, dec, i);
          }
        }
      });
      for (int64_t m = 0; m < M; ++m) y[m * w.N + n] = hsum(lanes[m]) + acc[m] + (bias ? bias[n] : 0.f);
    }
  });
}

// The weights of rows [n0, n1), groups [g0, g1), row n at out + (n - n0) * ld: (v(q) - z) s,
// or with kScale false the values v(q) alone (the AMX path's operand: small integers for the
// uniform formats, exact in bfloat16; it applies s and z to the products).
template <bool kScale>
inline void decode_rows(const QuantWeight& w, float* out, int64_t ld, int64_t n0, int64_t n1,
                        int64_t g0, int64_t g1) {
  with_bits(w.bits, [&](auto bits_c) {
    decode_rows_of<decltype(bits_c)::value, kScale, FL_ISA_VEC>(w, out, ld, n0, n1, g0, g1);
  });
}

#if defined(FL_ISA_VEC)
void quant_gemv(const QuantWeight& w, const float* x, const float* xsum, int64_t M,
                const float* bias, float* y, int64_t n0, int64_t n1) {
  gemv<FL_ISA_VEC>(w, x, xsum, M, bias, y, n0, n1);
}
void quant_dequant(const QuantWeight& w, float* out, int64_t n0, int64_t n1) {
  decode_rows<true>(w, out, w.K, n0, n1, 0, w.K / w.group);
}
void quant_unpack(const QuantWeight& w, float* out, int64_t ld, int64_t n0, int64_t n1, int64_t g0,
                  int64_t g1) {
  decode_rows<false>(w, out, ld, n0, n1, g0, g1);
}
#endif

}  // namespace FL_ISA
}  // namespace fastloss
