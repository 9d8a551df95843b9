// What the AMX kernels share (quant_cpu_amx.cpp: the AMX-BF16 GEMM; quant_cpu_amx_gemv.cpp:
// the AMX-INT8 GEMV): the tile configuration, float bits, and x's split into bfloat16 terms.
// Included only by files compiled with the AMX flags.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace fastloss {
namespace amx {

constexpr int64_t kTileRows = 16;  // rows of every tile
constexpr int64_t kStep = 32;      // inputs per tile product (32 bfloat16 per 64-byte row)
constexpr int kTerms = 3;          // x = hi + mid + lo (float32 x; fewer for 16-bit x)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles 0-7, each 16 rows of 64 bytes
inline void configure_tiles() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = kTileRows;
  _tile_loadconfig(&c);
}

inline uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
inline float float_of(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// x's three bfloat16 terms on 16 lanes (upper halves of the returned words): hi, mid and lo
// are truncations of x, x - hi and x - hi - mid, 24 significant bits in three 8-bit pieces; an
// infinite x stays in hi, a NaN becomes the quiet NaN (its payload may be in the low half alone)
inline void split3(__m512 x, __m512i out[kTerms]) {
  const __m512i high = _mm512_set1_epi32(int(0xffff0000u)), exponent = _mm512_set1_epi32(0x7f800000);
  const __m512i bits = _mm512_castps_si512(x);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __mmask16 finite = _mm512_cmpneq_epi32_mask(_mm512_and_si512(bits, exponent), exponent);
  const __m512i hi = _mm512_mask_blend_epi32(nan, _mm512_and_si512(bits, high), _mm512_set1_epi32(0x7fc00000));
  const __m512 r = _mm512_maskz_sub_ps(finite, x, _mm512_castsi512_ps(hi));  // 0 for inf / NaN
  const __m512i mid = _mm512_and_si512(_mm512_castps_si512(r), high);
  out[0] = hi, out[1] = mid;
  out[2] = _mm512_castps_si512(_mm512_sub_ps(r, _mm512_castsi512_ps(mid)));  // the rest: exact in bfloat16
}

}  // namespace amx
}  // namespace fastloss
