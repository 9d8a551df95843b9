// What the AMX kernels share (quant_cpu_amx.cpp: the AMX-BF16 GEMM; quant_cpu_amx_gemv.cpp:
// the AMX-INT8 GEMV): the tile configuration, float bits, and x's split into bfloat16 terms.
// Included only by files compiled with the AMX flags.
#pragma once
#include <immintrin.h>

#include <cmath>
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

// x's three bfloat16 terms (upper halves of the returned words); an infinite x stays in hi, a
// NaN becomes the quiet NaN (its payload may be in the low half alone)
inline void split3(float x, uint32_t out[kTerms]) {
  const uint32_t hi = std::isnan(x) ? 0x7fc00000u : bits_of(x) & 0xffff0000u;
  const float r = std::isfinite(x) ? x - float_of(hi) : 0.f;
  const uint32_t mid = bits_of(r) & 0xffff0000u;
  out[0] = hi, out[1] = mid, out[2] = bits_of(r - float_of(mid));  // the rest: exact in bfloat16
}

}  // namespace amx
}  // namespace fastloss
