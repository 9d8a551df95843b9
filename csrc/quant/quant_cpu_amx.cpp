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
// group, then are scaled into float32 accumulators [weight row, batch row]. A thread takes
// its rows a chunk of inputs at a time (x's terms for the chunk stay in L2), block by block of
// 128 weight rows. Where the time goes (2 threads, 4096 x 4096 4-bit, batch 256, ad hoc,
// TSC-timed phases): the tile products ~80% (with no tile loads and no group read-outs they
// took ~45% of that: x's B tile loads cost most, then A's, then the read-outs), decoding ~15%
// (before decode_tiles / decode_tiles_3bit, which take most formats to bfloat16 in one pass).
// Tried without gain: 64-row blocks, 128- / 256-input chunks, group read-outs spread over
// the next group's steps, x's tiles of a chunk in one contiguous range.
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
// x's packed terms for a chunk of inputs (every batch row): read by every block of a thread's
// rows, so they must stay in the 2 MiB L2 beside a block's tiles and sums. Streamed from L3
// once per block instead (chunks of 512 inputs inside each block), a batch-256 call ran at
// ~1/5 of the tile unit's rate: a core reads L3 at ~22 GB/s, about 5x slower than the products
// consume a step's 6 KiB of x (ad hoc, tile loads alone).
constexpr int64_t kXChunkBytes = int64_t(768) << 10;
// inputs per chunk at most (a block's tiles: 256 KiB), but for one group that is longer
constexpr int64_t kMaxChunk = 1024;
constexpr int64_t kDecode = 512;     // inputs decoded to float32 at a time (a block's: 256 KiB)
constexpr int64_t kAccBytes = int64_t(4) << 20;  // a thread's float32 sums [rows, batch rows]

// (the tile intrinsics are statement macros: one per statement)
inline void zero_accumulators() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// v[i][j] <- v[j][i]: 4 x 4 blocks within 128-bit lanes, then the lanes
inline void transpose16(__m512 v[16]) {
  __m512 t[16], u[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // u[4 k + j], lane L: column 4 L + j of rows 4 k .. 4 k + 3
    u[4 * k] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
    u[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0xee);
    u[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
    u[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xee);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 a = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44), b = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xee);
    const __m512 c = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44), d = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xee);
    v[j] = _mm512_shuffle_f32x4(a, c, 0x88);
    v[4 + j] = _mm512_shuffle_f32x4(a, c, 0xdd);
    v[8 + j] = _mm512_shuffle_f32x4(b, d, 0x88);
    v[12 + j] = _mm512_shuffle_f32x4(b, d, 0xdd);
  }
}

// Whether a block's codes go straight into its bfloat16 tiles (decode_tiles): 2-, 4- and 8-bit
// groups of whole 32-byte pieces (4-bit from group 64, 2-bit from 128, 8-bit always here),
// where field j of a piece holds 32 consecutive inputs, one tile step (quant_kernels.h: value
// j P + i of a group is field j of its byte i); 3-bit groups of a multiple of 128
// (decode_tiles_3bit). The rest go through float32 values (decode_through_values).
bool decodes_to_tiles(const QuantWeight& w) {
  if (w.bits == 3) return w.group % 128 == 0;
  return (w.bits == 2 || w.bits == 4 || w.bits == 8) && w.group * w.bits / 8 % 32 == 0;
}

// A block's tiles for a chunk of `steps` tile steps, in tile order (tile (row tile i, step) at
// (i * steps + step) * 512, each row 32 inputs): fill(r, the row's step-0 tile row) for the
// rows below `rows`, zeros in the rest up to kBlockRows
template <class Fill>
void fill_tile_rows(uint16_t* a_tiles, int64_t steps, int64_t rows, const Fill& fill) {
  for (int64_t r = 0; r < kBlockRows; ++r) {
    uint16_t* row_tiles = a_tiles + ((r / kTileRows) * steps * kTileRows + r % kTileRows) * kStep;
    if (r < rows) {
      fill(r, row_tiles);
    } else {
      for (int64_t step = 0; step < steps; ++step) _mm512_storeu_si512(row_tiles + step * kTileRows * kStep, _mm512_setzero_si512());
    }
  }
}

// the bfloat16 bits of the codes 0 .. 31 (a table for vpermw)
inline __m512i bf16_of_codes() {
  alignas(64) uint16_t bits[32];
  for (int v = 0; v < 32; ++v) bits[v] = uint16_t(amx::bits_of(float(v)) >> 16);
  return _mm512_load_si512(bits);
}

// The codes of rows [nb, nb + rows) and inputs [k0, k0 + kc) (whole groups) as bfloat16
// tiles (fill_tile_rows). One pass: the float32 values and their conversion took ~15% of a
// batch-256 call.
template <int BITS>
void decode_tiles(const QuantWeight& w, int64_t nb, int64_t rows, int64_t k0, int64_t kc, uint16_t* a_tiles) {
  constexpr int kPlanes = 8 / BITS;
  const int64_t row_bytes = w.K * BITS / 8, P = w.group * BITS / 8;
  const __m512i table = bf16_of_codes(), mask = _mm512_set1_epi16((1 << BITS) - 1);
  fill_tile_rows(a_tiles, kc / kStep, rows, [&](int64_t r, uint16_t* row_tiles) {
    const uint8_t* q = w.q + (nb + r) * row_bytes + k0 * BITS / 8;
    for (int64_t at = 0; at < kc * BITS / 8; at += 32) {  // the chunk's bytes, 32 at a time
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + at));
      const int64_t first = at / P * w.group + at % P;  // field 0's first input, of the chunk
      if constexpr (BITS == 8) {  // codes up to 255: through float32 (exact), its upper half
        const __m512i lo = _mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(bytes)))), 16);
        const __m512i hi = _mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(bytes, 1)))), 16);
        uint16_t* out = row_tiles + first / kStep * kTileRows * kStep;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(lo));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), _mm512_cvtepi32_epi16(hi));
        continue;
      }
      const __m512i words = _mm512_cvtepu8_epi16(bytes);
      for (int j = 0; j < kPlanes; ++j) {
        const __m512i codes = _mm512_and_si512(_mm512_srli_epi16(words, unsigned(j * BITS)), mask);
        _mm512_storeu_si512(row_tiles + (first + j * P) / kStep * kTileRows * kStep, _mm512_permutexvar_epi16(codes, table));
      }
    }
  });
}

// decode_tiles for 3-bit codes, groups of a multiple of 128 (quant_kernels.h: a group's low two
// bits in the 2-bit layout over its first 2P bytes, P = group / 8, then bit j of byte 2P + i
// is the third bit of value j P + i): a tile step's 32 inputs are one field of a 32-byte piece
// of the low bits, and two 16-byte pieces of third bits (one field each)
void decode_tiles_3bit(const QuantWeight& w, int64_t nb, int64_t rows, int64_t k0, int64_t kc, uint16_t* a_tiles) {
  const int64_t row_bytes = w.K * 3 / 8, P = w.group / 8, group_bytes = 3 * P;
  const __m512i table = bf16_of_codes(), low_mask = _mm512_set1_epi16(3), one = _mm512_set1_epi16(1);
  fill_tile_rows(a_tiles, kc / kStep, rows, [&](int64_t r, uint16_t* row_tiles) {
    const uint8_t* q = w.q + (nb + r) * row_bytes + k0 * 3 / 8;
    for (int64_t g = 0; g < kc / w.group; ++g) {
      const uint8_t* low = q + g * group_bytes;
      const uint8_t* third = low + 2 * P;
      uint16_t* group_tiles = row_tiles + g * w.group / kStep * kTileRows * kStep;
      for (int64_t at = 0; at < 2 * P; at += 32) {
        // field j's values j 2P + at ..: third bits in fields 2j + at / P (16 values from byte
        // at % P) and 2j + (at + 16) / P (from byte (at + 16) % P)
        const int64_t f0 = at / P, b0 = at % P, f1 = (at + 16) / P, b1 = (at + 16) % P;
        const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(low + at)));
        const __m512i third_bytes = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(third + b0)))),
            _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(third + b1))), 1);
        __m512i shifts = _mm512_inserti64x4(_mm512_set1_epi16(short(f0)), _mm256_set1_epi16(short(f1)), 1);
        const __m512i two = _mm512_set1_epi16(2);
        for (int j = 0; j < 4; ++j, shifts = _mm512_add_epi16(shifts, two)) {
          const __m512i thirds = _mm512_and_si512(_mm512_srlv_epi16(third_bytes, shifts), one);
          const __m512i codes = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(words, unsigned(2 * j)), low_mask),
                                                _mm512_slli_epi16(thirds, 2));
          _mm512_storeu_si512(group_tiles + (j * 2 * P + at) / kStep * kTileRows * kStep,
                              _mm512_permutexvar_epi16(codes, table));
        }
      }
    }
  });
}

// The other formats: the values v(q) decoded to float32 `decode` inputs at a time (whole
// groups) into `values`, then their bfloat16 upper halves (truncation: exact for integers)
void decode_through_values(const QuantWeight& w, int64_t nb, int64_t rows, int64_t k0, int64_t kc,
                           int64_t decode, float* values, uint16_t* a_tiles) {
  for (int64_t d0 = 0; d0 < kc; d0 += decode) {
    const int64_t dc = std::min(decode, kc - d0);
    avx512::quant_unpack(w, values, dc, nb, nb + rows, (k0 + d0) / w.group, (k0 + d0 + dc) / w.group);
    fill_tile_rows(a_tiles, kc / kStep, rows, [&](int64_t r, uint16_t* row_tiles) {
      uint16_t* out = row_tiles + d0 / kStep * kTileRows * kStep;
      for (int64_t step = 0; step < dc / kStep; ++step, out += kTileRows * kStep)
        for (int64_t i = 0; i < kStep; i += 16) {
          const __m512i v = _mm512_srli_epi32(_mm512_castps_si512(_mm512_loadu_ps(values + r * dc + step * kStep + i)), 16);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi32_epi16(v));
        }
    });
  }
}

// The inputs of a chunk: whole groups whose x terms fit kXChunkBytes (or one group, when
// longer), and of a decoding pass: whole groups up to kDecode (or one).
int64_t chunk_length(const QuantWeight& w, int terms, int64_t Mp) {
  const int64_t fit = std::clamp<int64_t>(kXChunkBytes / (terms * Mp * 2), kStep, kMaxChunk);
  return w.group >= fit ? w.group : fit - fit % w.group;
}
int64_t decode_length(const QuantWeight& w) { return w.group >= kDecode ? w.group : kDecode - kDecode % w.group; }

// One chunk of inputs for a block of weight rows: what batch_tiles needs.
struct Chunk {
  const QuantWeight& w;
  const uint32_t* packed;  // x's terms (quant_amx_pack_x)
  int terms;
  int64_t T, KP;           // batch row tiles, input pairs
  int64_t nb, rows;        // the block's first weight row, its rows below N
  int64_t k0, steps;       // the chunk's first input, its tile steps
  int64_t Mp;              // the accumulators' row length
  const float* xsum_t;     // [G, Mp]: x's group sums (zero points), or null
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
    // (zero points: minus s z times the group's sums of x, here where the row's accumulators
    // are read anyway; a pass of their own over [rows, G, M] was ~4% of a batch-256 call)
    const int64_t g = k_end / w.group - 1;
    const float* xs = ch.xsum_t ? ch.xsum_t + g * ch.Mp + t * kTileRows : nullptr;
    for (int64_t r = 0; r < 32; ++r) {
      const int64_t row = h * 32 + r;  // in the block
      const int64_t at = (ch.nb + row) * G + g;
      const __m512 sv = _mm512_set1_ps(row < ch.rows ? w.scale[at] : 0.f);
      const __m512 szv = _mm512_set1_ps(row < ch.rows && xs ? w.scale[at] * w.zero[at] : 0.f);
      float* out = acc + row * ch.Mp + t * kTileRows;
      const int q = r < 16 ? 0 : 2;
      for (int i = 0; i < TILES; ++i) {
        __m512 v = _mm512_fmadd_ps(sv, _mm512_load_ps(c[q + i][r % 16]), _mm512_loadu_ps(out + 16 * i));
        if (xs) v = _mm512_fnmadd_ps(szv, _mm512_loadu_ps(xs + 16 * i), v);
        _mm512_storeu_ps(out + 16 * i, v);
      }
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
// B is 16 consecutive pairs of one row tile, 1 KiB contiguous. The 16 rows' inputs 2p and 2p + 1
// are gathered (rows past M: zeros), so each pair's words are one 64-byte store per term (one
// word at a time, the packing was ~4% of a batch-256 call).
void quant_amx_pack_x(const float* x, int64_t M, int64_t K, int terms, uint32_t* packed,
                      int64_t t0, int64_t t1) {
  const int64_t T = quant_amx_padded_rows(M) / kTileRows, KP = K / 2;
  // row j's offset j K, for the rows of each half (64-bit: 15 K may pass 2^31)
  const __m512i first_half = _mm512_set_epi64(7 * K, 6 * K, 5 * K, 4 * K, 3 * K, 2 * K, K, 0);
  const __m512i second_half = _mm512_add_epi64(first_half, _mm512_set1_epi64(8 * K));
  const __m512i high = _mm512_set1_epi32(int(0xffff0000u));
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t rows = std::clamp<int64_t>(M - t * kTileRows, 0, kTileRows);
    const __mmask8 first_rows = __mmask8((1u << std::min<int64_t>(rows, 8)) - 1);
    const __mmask8 second_rows = __mmask8((1u << std::max<int64_t>(rows - 8, 0)) - 1);
    const float* base = x + t * kTileRows * K;
    auto gather = [&](const float* at) {
      const __m256 lo = _mm512_mask_i64gather_ps(_mm256_setzero_ps(), first_rows, first_half, at, 4);
      const __m256 hi = _mm512_mask_i64gather_ps(_mm256_setzero_ps(), second_rows, second_half, at, 4);
      return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
    };
    for (int64_t p = 0; p < KP; ++p) {
      __m512i a[kTerms], b[kTerms];
      split3(gather(base + 2 * p), a);
      split3(gather(base + 2 * p + 1), b);
      for (int s = 0; s < terms; ++s)
        _mm512_storeu_si512(packed + ((s * T + t) * KP + p) * kTileRows,
                            _mm512_or_si512(_mm512_srli_epi32(a[s], 16), _mm512_and_si512(b[s], high)));
    }
  }
}

void quant_amx_gemm(const QuantWeight& w, const uint32_t* packed, int terms, int64_t M,
                    const float* xsum_t, const float* bias, float* y, int64_t n0, int64_t n1) {
  const int64_t Mp = quant_amx_padded_rows(M), T = Mp / kTileRows, KP = w.K / 2;
  const int64_t chunk = chunk_length(w, terms, Mp), decode = std::min(decode_length(w), chunk);
  const bool direct = decodes_to_tiles(w);
  std::vector<float> values(direct ? 0 : kBlockRows * decode);
  std::vector<uint16_t> a_tiles(kBlockRows * chunk);  // bfloat16 A operand, in tile order
  // The rows a span at a time (whole blocks: within kAccBytes of accumulators, or one): each
  // chunk's sums added into acc [row of the span, batch row], block by block, then y = acc^T
  // (+ bias).
  const int64_t span = std::max<int64_t>(1, kAccBytes / (kBlockRows * Mp * 4)) * kBlockRows;
  std::vector<float> acc(std::min(span, (n1 - n0 + kBlockRows - 1) / kBlockRows * kBlockRows) * Mp);
  configure_tiles();
  for (int64_t s0 = n0; s0 < n1; s0 += span) {
    const int64_t s1 = std::min(n1, s0 + span);
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t k0 = 0; k0 < w.K; k0 += chunk) {
      const int64_t kc = std::min(chunk, w.K - k0), steps = kc / kStep;
      for (int64_t nb = s0; nb < s1; nb += kBlockRows) {
        const int64_t rows = std::min(kBlockRows, s1 - nb);
        if (!direct) {
          decode_through_values(w, nb, rows, k0, kc, decode, values.data(), a_tiles.data());
        } else if (w.bits == 3) {
          decode_tiles_3bit(w, nb, rows, k0, kc, a_tiles.data());
        } else {
          (w.bits == 2 ? decode_tiles<2> : w.bits == 4 ? decode_tiles<4> : decode_tiles<8>)(w, nb, rows, k0, kc, a_tiles.data());
        }
        float* block_acc = acc.data() + (nb - s0) * Mp;
        const Chunk ch{w, packed, terms, T, KP, nb, rows, k0, steps, Mp, w.zero ? xsum_t : nullptr};
        for (int64_t t = 0; t < T; t += 2) {  // 32 batch rows, or the last 16
          for (int64_t h = 0; h < kHalves; ++h) {
            const uint16_t* a0 = a_tiles.data() + (2 * h) * steps * kTileRows * kStep;
            if (t + 1 < T)
              batch_tiles<2>(ch, a0, t, h, block_acc);
            else
              batch_tiles<1>(ch, a0, t, h, block_acc);
          }
        }
      }
    }
    // 16 x 16 at a time (one element at a time, the transposition's strided reads were ~7% of
    // a batch-256 call)
    for (int64_t r0 = s0; r0 < s1; r0 += 16) {
      const __mmask16 in_range = __mmask16((1u << std::min<int64_t>(16, s1 - r0)) - 1);
      const __m512 b = bias ? _mm512_maskz_loadu_ps(in_range, bias + r0) : _mm512_setzero_ps();
      for (int64_t m0 = 0; m0 < M; m0 += 16) {
        __m512 v[16];  // rows r0 .. r0 + 15 (whole blocks in acc), batch rows m0 .. m0 + 15 (< Mp)
        for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_ps(acc.data() + (r0 - s0 + i) * Mp + m0);
        transpose16(v);
        for (int64_t j = 0; j < std::min<int64_t>(16, M - m0); ++j)
          _mm512_mask_storeu_ps(y + (m0 + j) * w.N + r0, in_range, _mm512_add_ps(v[j], b));
      }
    }
  }
  _tile_release();
}

}  // namespace fastloss
