// The AMX-BF16 dequant GEMM for batches from kQuantAmxMinRows on (compiled with -mamx-tile
// -mamx-bf16 -mavx512f -mavx512bw; entered only when the active CPU path is "amx", after the
// CPUID and permission checks of common/cpu_features.cpp).
//
// Why: from batch ~32 on, a float32 GEMM is compute-bound on the CPU, so dequantizing tiles
// for torch's GEMM can at best tie it, and from batch ~8 the GEMV's FMAs (one per weight and
// batch row) cost more than the packed bytes. The tile unit's bfloat16 products run at ~8x the float32
// FMA rate; exact float32 results come from
//   - the weights' values v(q) (unscaled, zero points not subtracted): integers below 256,
//     exact in bfloat16 (8 significant bits);
//   - x = hi + mid + lo, each a bfloat16 (truncations of x, x - hi and x - hi - mid: 24
//     significant bits in three 8-bit pieces), so each v x is the sum of three exact products;
// and each group's float32 sums times its scale s, minus s z (sum of x over the group). A
// bfloat16 x is its hi term alone, a float16 x (11 significant bits) hi + mid: one and two tile
// products per weight tile instead of three.
// Where it differs from float32: the tile unit treats bfloat16 subnormals as zero, so |x| below
// ~2^-110 loses low terms (below 2^-126 all of x), and the sums are of v x before the scaling,
// so they overflow first (|x| above ~1e36 / 255).
//
// Tiles (16 rows of 64 bytes): C[n, m] += A[n, k] B[k, m], A = the weight rows' values (16
// rows, 32 inputs; decoded a chunk of inputs at a time into 1 KiB bfloat16 tiles), B = x's
// packed terms (16 pairs of inputs, 16 batch rows: one 32-bit word per pair; packed once per
// call). Tiles 0-3 accumulate a 32 x 32 block (two A tiles 4-5 times two B tiles 6-7) over a
// group, then are scaled into float32 accumulators [weight row, batch row]. A block of 128
// weight rows and 512-input chunks: ad-hoc single-thread timings on a 2-vCPU Xeon put 64 x 512
// and 128 x 256 within 10% of it, smaller blocks up to 25% slower (the VM's timings swing 2x
// from minute to minute: tune on minima of many runs).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/cpu_features.h"
#include "quant_amx_tiles.h"
#include "quant_kernels.h"

namespace fastloss {

// the AVX-512 decoder (quant_cpu_impl.h): the values v(q) of rows and groups
FASTLOSS_DECLARE_AVX512(void quant_unpack(const QuantWeight&, float*, int64_t, int64_t, int64_t,
                                          int64_t, int64_t);)

namespace {

using amx::configure_tiles;
using amx::kStep;
using amx::kTerms;
using amx::kTileRows;
using amx::split3;

constexpr int64_t kHalves = 4;       // 32-row halves per block of weight rows
constexpr int64_t kBlockRows = 32 * kHalves;
constexpr int64_t kChunk = 512;     // inputs decoded at a time (x's 32-row chunk: 192 KiB)

// (the tile intrinsics are statement macros: one per statement)
inline void zero_accumulators() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// The inputs of a chunk: chunks hold whole groups (or one group, when longer than kChunk).
int64_t chunk_length(const QuantWeight& w) {
  return w.group >= kChunk ? w.group : kChunk - kChunk % w.group;
}

// One chunk of inputs for a block of weight rows: what batch_tiles needs.
struct Chunk {
  const QuantWeight& w;
  const uint32_t* packed;  // x's terms (quant_amx_pack_x)
  int terms;
  int64_t T, KP;           // batch row tiles, input pairs
  int64_t nb, rows;        // the block's first weight row, its rows below N
  int64_t k0, steps;       // the chunk's first input, its tile steps
  int64_t Mp;              // the accumulators' row length
};

// acc[32 h + r, 16 t + j] += the chunk's products of weight rows 32 h + [0, 32) (A tiles at a0:
// two row tiles, each `steps` tiles of 1 KiB) with batch tiles t .. t + TILES - 1, scaled group
// by group. Accumulators: tiles 0 (rows 0-15) and 2 (rows 16-31) for batch tile t, 1 and 3 for
// t + 1.
template <int TILES>
void batch_tiles(const Chunk& ch, const uint16_t* a0, int64_t t, int64_t h, float* acc) {
  const QuantWeight& w = ch.w;
  const uint16_t* a1 = a0 + ch.steps * kTileRows * kStep;
  const int64_t G = w.K / w.group;
  alignas(64) float c[4][kTileRows][kTileRows];
  zero_accumulators();
  for (int64_t step = 0; step < ch.steps; ++step) {
    _tile_loadd(4, a0 + step * kTileRows * kStep, 64);
    _tile_loadd(5, a1 + step * kTileRows * kStep, 64);
    const int64_t p = (ch.k0 + step * kStep) / 2;
    for (int s = 0; s < ch.terms; ++s) {
      _tile_loadd(6, ch.packed + ((s * ch.T + t) * ch.KP + p) * kTileRows, 64);
      if constexpr (TILES == 2) _tile_loadd(7, ch.packed + ((s * ch.T + t + 1) * ch.KP + p) * kTileRows, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (TILES == 2) {
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    const int64_t k_end = ch.k0 + (step + 1) * kStep;
    if (k_end % w.group != 0) continue;
    // the group's sums, times its scale, into the accumulators
    _tile_stored(0, c[0], 64);
    _tile_stored(2, c[2], 64);
    if constexpr (TILES == 2) {
      _tile_stored(1, c[1], 64);
      _tile_stored(3, c[3], 64);
    }
    zero_accumulators();
    const int64_t g = k_end / w.group - 1;
    for (int64_t r = 0; r < 32; ++r) {
      const int64_t row = h * 32 + r;  // in the block
      const __m512 sv = _mm512_set1_ps(row < ch.rows ? w.scale[(ch.nb + row) * G + g] : 0.f);
      float* out = acc + row * ch.Mp + t * kTileRows;
      const int q = r < 16 ? 0 : 2;
      for (int i = 0; i < TILES; ++i)
        _mm512_storeu_ps(out + 16 * i, _mm512_fmadd_ps(sv, _mm512_load_ps(c[q + i][r % 16]),
                                                       _mm512_loadu_ps(out + 16 * i)));
    }
  }
}

}  // namespace

bool quant_amx_applies(const QuantWeight& w) {
  return active_cpu_isa() == CpuIsa::amx && w.codebook == nullptr && w.group % kStep == 0;
}

int64_t quant_amx_padded_rows(int64_t M) { return (M + 15) / 16 * 16; }

int64_t quant_amx_packed_words(int64_t M, int64_t K, int terms) {
  return terms * quant_amx_padded_rows(M) * (K / 2);
}

int64_t quant_amx_block_rows() { return kBlockRows; }

// word (term s, row tile t, pair p, row j) at ((s * T + t) * (K / 2) + p) * 16 + j: a tile of
// B is 16 consecutive pairs of one row tile, 1 KiB contiguous
void quant_amx_pack_x(const float* x, int64_t M, int64_t K, int terms, uint32_t* packed,
                      int64_t t0, int64_t t1) {
  const int64_t T = quant_amx_padded_rows(M) / kTileRows, KP = K / 2;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t j = 0; j < kTileRows; ++j) {
      const int64_t m = t * kTileRows + j;
      for (int64_t p = 0; p < KP; ++p) {
        uint32_t a[kTerms] = {0, 0, 0}, b[kTerms] = {0, 0, 0};
        if (m < M) split3(x[m * K + 2 * p], a), split3(x[m * K + 2 * p + 1], b);
        for (int s = 0; s < terms; ++s)
          packed[((s * T + t) * KP + p) * kTileRows + j] = (a[s] >> 16) | (b[s] & 0xffff0000u);
      }
    }
  }
}

void quant_amx_gemm(const QuantWeight& w, const uint32_t* packed, int terms, int64_t M,
                    const float* xsum_t, const float* bias, float* y, int64_t n0, int64_t n1) {
  const int64_t Mp = quant_amx_padded_rows(M), T = Mp / kTileRows, KP = w.K / 2;
  const int64_t G = w.K / w.group, chunk = chunk_length(w);
  std::vector<float> values(kBlockRows * chunk);
  std::vector<uint16_t> a_tiles(kBlockRows * chunk);  // bfloat16 A operand, in tile order
  std::vector<float> acc(kBlockRows * Mp);           // [block row, batch row]
  configure_tiles();
  for (int64_t nb = n0; nb < n1; nb += kBlockRows) {
    const int64_t rows = std::min(kBlockRows, n1 - nb);
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t k0 = 0; k0 < w.K; k0 += chunk) {
      const int64_t kc = std::min(chunk, w.K - k0), steps = kc / kStep;
      avx512::quant_unpack(w, values.data(), kc, nb, nb + rows, k0 / w.group, (k0 + kc) / w.group);
      // bfloat16 (truncation: exact for these integers) in tile order: tile (row tile i, step)
      // is 1 KiB contiguous at (i * steps + step) * 512; rows past N are zeros
      for (int64_t r = 0; r < kBlockRows; ++r) {
        uint16_t* out = a_tiles.data() + ((r / kTileRows) * steps * kTileRows + r % kTileRows) * kStep;
        const float* in = values.data() + r * kc;
        for (int64_t step = 0; step < steps; ++step, out += kTileRows * kStep) {
          for (int64_t i = 0; i < kStep; i += 16) {
            const __m512i v = r < rows ? _mm512_srli_epi32(_mm512_castps_si512(_mm512_loadu_ps(in + step * kStep + i)), 16)
                                       : _mm512_setzero_si512();
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi32_epi16(v));
          }
        }
      }
      const Chunk ch{w, packed, terms, T, KP, nb, rows, k0, steps, Mp};
      for (int64_t t = 0; t < T; t += 2) {  // 32 batch rows, or the last 16
        for (int64_t h = 0; h < kHalves; ++h) {
          const uint16_t* a0 = a_tiles.data() + (2 * h) * steps * kTileRows * kStep;
          if (t + 1 < T)
            batch_tiles<2>(ch, a0, t, h, acc.data());
          else
            batch_tiles<1>(ch, a0, t, h, acc.data());
        }
      }
    }
    // zero points: minus s z (sum of x over the group); then y = acc^T (+ bias)
    for (int64_t r = 0; r < rows; ++r) {
      float* out = acc.data() + r * Mp;
      if (w.zero) {
        for (int64_t g = 0; g < G; ++g) {
          const __m512 sz = _mm512_set1_ps(-w.scale[(nb + r) * G + g] * w.zero[(nb + r) * G + g]);
          const float* xs = xsum_t + g * Mp;
          for (int64_t m = 0; m < Mp; m += 16)
            _mm512_storeu_ps(out + m, _mm512_fmadd_ps(sz, _mm512_loadu_ps(xs + m), _mm512_loadu_ps(out + m)));
        }
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < rows; ++r)
        y[m * w.N + nb + r] = acc[r * Mp + m] + (bias ? bias[nb + r] : 0.f);
  }
  _tile_release();
}

}  // namespace fastloss
