// The AMX-INT8 GEMV: batches of 1 to 16 rows for the uniform 2-, 3-, 4- and 8-bit formats
// (compiled with -mamx-tile -mamx-int8 -mavx512f -mavx512bw; entered only when the active CPU
// path is "amx" and the CPU has AMX-INT8, after the checks of common/cpu_features.cpp).
//
// Why: the AVX-512 GEMV (quant_cpu_impl.h) spends three vector instructions on every 16
// weights of a batch row (widen / shift, permute to float, FMA), and those of every batch row
// again. Here the codes are the tile unit's unsigned bytes as they are: a 4-bit row's 64 packed
// bytes become two 64-byte rows of codes by an AND (and a shift) each, an 8-bit row is loaded
// as it is, and one integer tile product takes 16 weight rows x 64 inputs for up to 4 batch
// rows (16 with four column tiles). Ad hoc, one thread, 4096 x 4096 4-bit, batch 1, a C++ loop
// around the kernels: 0.89 cycles per 16 weights from L2, 1.3 from L3 (AVX-512 GEMV: 2.0), cold
// 0.80-0.82 ms (1.21-1.27); a bfloat16 variant (one permute and one 64-byte store per 32
// weights) was store-bound at 1.6.
//
// Numbers: x is integers in fixed point per (batch row, group): X = round(x 2^(30 - E)), 2^E
// above the group's largest |x| (|X| <= 2^30), as four signed base-256 digits, so every sum
// over a group is an exact integer (int32: groups up to 2^31 / (128 (2^bits - 1)) inputs); the
// rounding of x is at most 2^(E - 31), 2^-30 of the group's largest |x| (float32 rounds each x
// times its weight at 2^-24 of itself: the bounds differ where a group's largest |x| meets
// weights near zero and the rest of x is ~2^-24 of it or below). Zero points enter in the
// integers: sum_k (q - z) X = sum_k q X - z sum_k X. Each group's four digit sums times 2^(E -
// 30 + 8 d) and the group's scale are summed in float32 lanes per weight row. Non-finite x, and
// groups whose largest |x| is below 2^-91 or from 2^100 (those factors would leave float32's
// normal range), take the AVX-512 GEMV (quant_amx_gemv_exponents returns false).
//
// Layout. A tile (tiles 4 / 5) = 16 weight rows x 64 codes: the codes of plane j of a chunk of
// 64 packed bytes (quant_kernels.h: value j * P + i of a group is bit field j of its byte i; P =
// the group's bytes; input chunks: see InputCodes). B tiles (5-7) = 16 quads x 16 columns of 4 bytes: the
// digits of the inputs of A's lanes 4q .. 4q + 3, in the column of their (group slot, batch
// row, digit) and zero in the others. C tiles 0-3 accumulate a slab of S groups (S slots x M
// rows x 4 digits columns), in blocks of 32 weight rows (16 with four column tiles): see
// col_tiles_of. A 3-bit chunk is 64 consecutive inputs of a group, one plane of whole codes:
// each code's low two bits and its third bit come from the group's two sections (InputCodes: two
// GF(2) affine byte maps and an OR per 64 codes); so are 2- and 4-bit chunks where S groups do
// not fill whole 64-byte chunks (2-bit groups of 64 from 5 rows, of 128 from 9; 4-bit groups of
// 64 from 9: 1.3-2.3x the AMX-BF16 GEMM / AVX-512 GEMV they took before, ad hoc). Ad hoc, 2 threads, cold, 3-bit group 128
// against the AVX-512 GEMV in the same script: batch 1 1.25x at 4096 x 4096 (0.73 ms), 1.48x
// at 4096 x 14336; batch 4 3.3x / 4.0x; batch 16 3.8x / 4.7x (before the per-chunk maps were
// built once per call, their divisions took batch 1 to 1.09-1.18x; a first version, 2-bit
// planes of the low bits plus 8 planes of the third bits, 16 planes per 128 inputs, 1.1-1.3x
// at batch 1, 1.6-1.8x at 4). Batch 1 profile: the weight loads' misses, and the read-out of
// a slab's sums (tilestored waits for the tile unit) 15% of the samples.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/block_queue.h"
#include "../common/cpu_features.h"
#include "quant_amx_tiles.h"
#include "quant_kernels.h"

namespace fastloss {
namespace {

using amx::kTileRows;

constexpr int64_t kChunkBytes = 64;  // packed bytes of a row decoded at a time
constexpr int64_t kTileBytes = kTileRows * 64;
constexpr int64_t kCols = 16;      // C and B columns
constexpr int kDigits = 4;         // base-256 digits of x's fixed point
constexpr int kFixedBits = 30;     // |X| <= 2^30
// A group's largest |x| in [2^(kMinExponent - 1), 2^kMaxExponent) (or 0): the column factors
// 2^(E - 30 + 8 d) times a scale stay normal float32 numbers
constexpr int kMinExponent = -90, kMaxExponent = 100;
// Chunks of a block's rows asked for ahead (64 KiB: a block of rows of 2 KiB, 4096 4-bit
// inputs; one block ahead for longer rows had the next block's weight, this one's and x's
// tiles, 16 bytes per input, crowd the 2 MiB L2: 8192 x 28672 batch 1 took 1.5x the AVX-512
// GEMV's time)
constexpr int64_t kPrefetchChunks = 32;
// rows of a BlockQueue block (whole blocks of rows at every column-tile count: 32 or 16)
constexpr int64_t kUnitRows = 2 * kTileRows;
// x's packed tiles at most (the 2 MiB L2 of a core: see quant_amx_gemv_slots)
constexpr int64_t kMaxPackedBytes = int64_t(2) << 20;

// plane j of 64 packed bytes: the codes, one per byte
template <int BITS>
inline __m512i plane(__m512i b, int j) {
  if constexpr (BITS == 8) return b;
  const __m512i mask = _mm512_set1_epi8(char((1 << BITS) - 1));
  return _mm512_and_si512(j == 0 ? b : _mm512_srli_epi16(b, unsigned(j * BITS)), mask);
}

// Bytes of a section of a group whose value v sits in bit field v / P of byte v % P (P >= 8):
// for P = 8, 16, 32 one load, broadcast so that lane l reads byte (64 t + l) % P; for P a
// multiple of 64, the 64 bytes from 64 t % P.
inline __m512i section_bytes(const uint8_t* s, int64_t P, int64_t at) {
  if (P == 8) {
    int64_t bytes = 0;
    std::memcpy(&bytes, s, 8);
    return _mm512_set1_epi64(bytes);
  }
  if (P == 16) return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  if (P == 32) return _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
  return _mm512_loadu_si512(s + at);
}
constexpr bool section_loads(int64_t P) { return P == 8 || P == 16 || P == 32 || (P > 0 && P % 64 == 0); }

// Chunks of 64 consecutive inputs of a group, one plane of whole codes (the 3-bit format, and
// 2- / 4-bit groups that do not fill the S groups' whole 64-byte chunks the packed bytes need):
// value v's field of `width` bits is bit field v / P of byte v % P of the group's first section
// (P = group * width / 8); 3-bit adds the third bit, bit v / P3 of byte P + v % P3 (P3 = group
// / 8 = P / 2; quant_kernels.h). Each 64-bit element of the result (8 values) takes its bits from one
// place, so a GF(2) affine map per element (gf2p8affineqb: output bit i = parity of row 7 - i of
// the element's 8x8 bit matrix and the input byte) moves them: rows picking bits f w .. f w + w
// - 1 of the first section to bits 0 .. w - 1, bit b of the third bits to bit 2.
struct InputCodes {
  __m512i field_map, third_map;  // the 8 elements' matrices
  int64_t P = 0, P3 = 0, at = 0, third_at = 0;  // the sections' bytes per field, where each starts
  InputCodes() = default;
  InputCodes(int bits, int64_t group, int64_t t)
      : P(group * (bits == 3 ? 2 : bits) / 8), P3(bits == 3 ? group / 8 : 0), at(64 * t % P),
        third_at(bits == 3 ? 64 * t % P3 : 0) {
    const int width = bits == 3 ? 2 : bits;
    alignas(64) uint64_t field[8], third[8];
    for (int e = 0; e < 8; ++e) {
      const int64_t v = 64 * t + 8 * e, f = v / P;
      field[e] = 0;
      for (int i = 0; i < width; ++i) field[e] |= (uint64_t(1) << (f * width + i)) << (8 * (7 - i));
      third[e] = P3 ? (uint64_t(1) << (v / P3)) << 40 : 0;  // row 5: bit v / P3
    }
    field_map = _mm512_load_si512(field), third_map = _mm512_load_si512(third);
  }
  // the codes, from the group's bytes g
  __m512i operator()(const uint8_t* g) const {
    const __m512i codes = _mm512_gf2p8affine_epi64_epi8(section_bytes(g, P, at), field_map, 0);
    if (!P3) return codes;
    return _mm512_or_si512(codes, _mm512_gf2p8affine_epi64_epi8(section_bytes(g + P, P3, third_at), third_map, 0));
  }
};

// A row's chunks: its packed bytes 64 at a time, 8 / bits planes each (value j P + i of a group
// in bit field j of byte i, P the group's bytes), or (input chunks: InputCodes) 64
// inputs at a time, one plane. Where a chunk's plane tiles of x are, and which inputs their
// lanes hold.
struct ChunkMap {
  bool inputs;
  int64_t group, P, row_chunks, chunk_bytes, planes;
  ChunkMap(const QuantWeight& w, bool input_chunks)
      : inputs(input_chunks), group(w.group), P(w.group * w.bits / 8),
        row_chunks(input_chunks ? w.K / 64 : w.K * w.bits / 8 / kChunkBytes),
        chunk_bytes(input_chunks ? 8 * w.bits : kChunkBytes), planes(input_chunks ? 1 : 8 / w.bits) {}
  // the group and input of lane `lane` (a multiple of 16) of plane j of chunk c; the next 15
  // lanes are the next 15 inputs
  void input(int64_t c, int j, int64_t lane, int64_t& g, int64_t& k) const {
    if (inputs) {
      k = 64 * c + lane, g = k / group;
      return;
    }
    const int64_t byte = c * kChunkBytes + lane;
    g = byte / P, k = g * group + j * P + byte % P;
  }
};

// Which chunks a format takes at S groups per slab: the packed bytes where S groups fill whole
// 64-byte chunks (and 16 inputs of a group are consecutive bytes), else input chunks (3-bit
// always)
bool byte_chunks_fit(const QuantWeight& w, int64_t S) {
  const int64_t group_bytes = w.group * w.bits / 8;
  return w.bits != 3 && group_bytes % 16 == 0 && S * group_bytes % kChunkBytes == 0;
}
bool input_chunks_fit(const QuantWeight& w) {
  if (w.bits == 8 || w.group % 64 != 0 || !cpu_supports_gfni()) return false;
  const int64_t P = w.group * (w.bits == 3 ? 2 : w.bits) / 8;
  return section_loads(P) && (w.bits != 3 || section_loads(w.group / 8));
}

// 2^e as a float, e in float32's normal range [-126, 127] (std::ldexp was ~3 us of a
// 4096-input batch row's packing)
inline float pow2f(int e) { return amx::float_of(uint32_t(e + 127) << 23); }
static_assert(kMinExponent - kFixedBits >= -126 && kFixedBits - kMinExponent <= 127 &&
                  kMaxExponent - kFixedBits + 8 * (kDigits - 1) <= 127,
              "the fixed point's factors must be normal float32 powers of two");

// X = round(x 2^shift) for 16 inputs, by two exact power-of-two factors (shift in [-70, 120]:
// a group's exponent in [kMinExponent, kMaxExponent], or 0)
inline __m512i fixed_point(const float* x, int shift) {
  const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(pow2f(shift / 2))),
                                 _mm512_set1_ps(pow2f(shift - shift / 2)));
  return _mm512_cvtps_epi32(v);
}

// the low base-256 digit of X, in [-128, 127]; X becomes (X - digit) / 256
inline __m512i next_digit(__m512i& X) {
  const __m512i half = _mm512_set1_epi32(128);
  const __m512i digit = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(X, half), _mm512_set1_epi32(255)), half);
  X = _mm512_srai_epi32(_mm512_sub_epi32(X, digit), 8);
  return digit;
}

// Column tiles for slabs of S groups x M batch rows x 4 digits (the fewest of 1, 2, 4 that
// hold them; 0: none does), and the row tiles a block then holds in the four C tiles: CT = 1
// (up to 16 columns: batch 1-4): two row tiles, C tiles 0-1 for even slabs and 2-3 for odd
// ones; CT = 2 (batch 5-8, or 3-4 with two groups per slab): two row tiles x two column
// tiles; CT = 4: one row tile x four column tiles.
constexpr int col_tiles_of(int64_t M, int64_t S) {
  return S * M * kDigits <= kCols ? 1 : S * M * kDigits <= 2 * kCols ? 2 : S * M * kDigits <= 4 * kCols ? 4 : 0;
}
constexpr int64_t row_tiles_of(int CT) { return CT == 4 ? 1 : 2; }

// The tile products of one chunk, plane by plane (a(j, rt): A of plane j, row tile rt; b(j, ct):
// B of plane j, column tile ct; `planes` of them). Tile numbers must be literals (the intrinsics are statement
// macros that name the register): C tiles 0-3, A tiles 4-5, B tiles 5-7.
// CT = 1 into C tiles (c_lo, c_hi): planes (one-plane chunks: chunks) alternate between B
// tiles 6 and 7
#define FASTLOSS_CT1_PLANE(c_lo, c_hi, b_tile, j) \
  do {                                            \
    _tile_loadd(b_tile, b(j, 0), 64);             \
    _tile_loadd(4, a(j, 0), stride);              \
    _tile_dpbusd(c_lo, 4, b_tile);            \
    if (row_tiles > 1) {                          \
      _tile_loadd(5, a(j, 1), stride);            \
      _tile_dpbusd(c_hi, 5, b_tile);          \
    }                                             \
  } while (0)
#define FASTLOSS_CT1_CHUNK(c_lo, c_hi)                                       \
  if (planes == 1 && c % 2 == 1) {                                           \
    FASTLOSS_CT1_PLANE(c_lo, c_hi, 7, 0);                                    \
  } else {                                                                   \
    for (int j = 0; j < planes; j += 2) {                                    \
      FASTLOSS_CT1_PLANE(c_lo, c_hi, 6, j);                                  \
      if (j + 1 < planes) FASTLOSS_CT1_PLANE(c_lo, c_hi, 7, j + 1);         \
    }                                                                        \
  }
// CT = 2: C tile 2 rt + ct
#define FASTLOSS_CT2_CHUNK()                  \
  for (int j = 0; j < planes; ++j) {         \
    _tile_loadd(6, b(j, 0), 64);              \
    _tile_loadd(7, b(j, 1), 64);              \
    _tile_loadd(4, a(j, 0), stride);          \
    _tile_dpbusd(0, 4, 6);                \
    _tile_dpbusd(1, 4, 7);                \
    if (row_tiles > 1) {                      \
      _tile_loadd(5, a(j, 1), stride);        \
      _tile_dpbusd(2, 5, 6);              \
      _tile_dpbusd(3, 5, 7);              \
    }                                         \
  }
// CT = 4: C tile ct (B tile 5 holds column tiles 0 and then 3)
#define FASTLOSS_CT4_CHUNK()                  \
  for (int j = 0; j < planes; ++j) {         \
    _tile_loadd(4, a(j, 0), stride);          \
    _tile_loadd(5, b(j, 0), 64);              \
    _tile_loadd(6, b(j, 1), 64);              \
    _tile_loadd(7, b(j, 2), 64);              \
    _tile_dpbusd(0, 4, 5);                \
    _tile_dpbusd(1, 4, 6);                \
    _tile_dpbusd(2, 4, 7);                \
    _tile_loadd(5, b(j, 3), 64);              \
    _tile_dpbusd(3, 4, 5);                \
  }

// The C tiles of a slab zeroed, or stored to c ([block rows][16 CT columns]); parity picks
// C tiles 0-1 or 2-3 for CT = 1
template <int CT>
inline void zero_sums(int64_t parity) {
  if (CT > 1 || parity == 0) {
    _tile_zero(0);
    _tile_zero(1);
  }
  if (CT > 1 || parity == 1) {
    _tile_zero(2);
    _tile_zero(3);
  }
}
template <int CT>
inline void store_sums(int64_t parity, int32_t* c) {
  constexpr int64_t ld = CT * kCols, stride = ld * 4;  // row stride: elements, bytes
  if constexpr (CT == 1) {
    if (parity == 0) {
      _tile_stored(0, c, stride);
      _tile_stored(1, c + kTileRows * ld, stride);
    } else {
      _tile_stored(2, c, stride);
      _tile_stored(3, c + kTileRows * ld, stride);
    }
  } else if constexpr (CT == 2) {
    _tile_stored(0, c, stride);
    _tile_stored(1, c + kCols, stride);
    _tile_stored(2, c + kTileRows * ld, stride);
    _tile_stored(3, c + kTileRows * ld + kCols, stride);
  } else {
    _tile_stored(0, c, stride);
    _tile_stored(1, c + kCols, stride);
    _tile_stored(2, c + 2 * kCols, stride);
    _tile_stored(3, c + 3 * kCols, stride);
  }
}

// INPUTS: input chunks (InputCodes), else byte chunks
template <int BITS, int CT, bool INPUTS>
void gemv_rows(const QuantWeight& w, const uint8_t* packed, const int32_t* E, const float* digit_sums,
               int64_t M, int64_t S, const float* bias, float* y, BlockQueue& queue, int thread) {
  constexpr int kPlanes = INPUTS ? 1 : 8 / BITS;
  constexpr int64_t kLd = CT * kCols, kRows = row_tiles_of(CT) * kTileRows;  // columns, block rows
  const int64_t G = w.K / w.group, row_bytes = w.K * BITS / 8, group_bytes = w.group * BITS / 8;
  const ChunkMap map(w, INPUTS);
  // (a slab is whole chunks; 2-, 4-, 8-bit groups may be half or a quarter of a byte chunk)
  const int64_t row_chunks = map.row_chunks, chunks_per_slab = row_chunks * S / G;
  const int64_t chunks_per_group = INPUTS ? w.group / 64 : 1;  // (input chunks)
  const int64_t slabs = G / S;
  std::vector<InputCodes> codes_of;  // input chunks: per chunk of a group
  for (int64_t t = 0; t < (INPUTS ? chunks_per_group : 0); ++t) codes_of.emplace_back(BITS, w.group, t);
  const int64_t cols = S * M * kDigits;
  // column c of slab: 2^(E - 30 + 8 d) of its (slot, batch row, digit); the group's scale is
  // per weight row (slot_of_col picks it from the row's S scales); and, with zero points, the
  // sum of its digits over the group (the zero point's term is z times it: sum_k (q - z) X =
  // sum_k q X - z sum_k X, exact integers either way)
  std::vector<float> col_scale(slabs * kLd, 0.f), col_digits(slabs * kLd, 0.f);
  for (int64_t slab = 0; slab < slabs; ++slab)
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t slot = c / (M * kDigits), m = c / kDigits % M, d = c % kDigits, g = slab * S + slot;
      col_scale[slab * kLd + c] = pow2f(E[m * G + g] - kFixedBits + 8 * int(d));  // in [-120, 94]
      if (w.zero) col_digits[slab * kLd + c] = digit_sums[(m * G + g) * kDigits + d];
    }
  alignas(64) int32_t slot_values[kLd];
  for (int64_t c = 0; c < kLd; ++c) slot_values[c] = int32_t(std::min<int64_t>(c / (M * kDigits), S - 1));
  __mmask16 col_mask[CT] = {}, row_cols[CT][kCols] = {};  // the used columns; batch row m's
  for (int64_t c = 0; c < cols; ++c) {
    col_mask[c / kCols] |= __mmask16(1u << (c % kCols));
    row_cols[c / kCols][c / kDigits % M] |= __mmask16(1u << (c % kCols));
  }
  const __mmask16 slot_mask = __mmask16((1u << S) - 1);

  alignas(64) uint8_t a_tiles[kPlanes * kRows * 64];  // [plane][row][64 codes]
  // rows past N (a last block's) keep these zeros or a previous block's codes: their C rows are
  // never read
  std::memset(a_tiles, 0, sizeof(a_tiles));
  alignas(64) int32_t c_tiles[kRows * kLd];
  alignas(64) float acc[kRows * kLd];
  int64_t nb = 0, rows = 0, row_tiles = 0;
  // slab's sums, each column times its scale, into its row's lanes
  auto add_slab = [&](int64_t slab) {
    store_sums<CT>(slab % 2, c_tiles);
    for (int ct = 0; ct < CT; ++ct) {
      const __m512i slot_of_col = _mm512_load_si512(slot_values + ct * kCols);
      const __m512 x_scales = _mm512_loadu_ps(&col_scale[slab * kLd + ct * kCols]);
      const __m512 x_digits = _mm512_loadu_ps(&col_digits[slab * kLd + ct * kCols]);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t first = (nb + r) * G + slab * S;  // the row's scales (zero points) of the slab
        const __m512 s = _mm512_maskz_permutexvar_ps(col_mask[ct], slot_of_col,
                                                     _mm512_maskz_loadu_ps(slot_mask, w.scale + first));
        __m512 sums = _mm512_cvtepi32_ps(_mm512_load_si512(c_tiles + r * kLd + ct * kCols));
        if (w.zero)
          sums = _mm512_fnmadd_ps(_mm512_maskz_permutexvar_ps(col_mask[ct], slot_of_col,
                                                              _mm512_maskz_loadu_ps(slot_mask, w.zero + first)),
                                  x_digits, sums);
        float* a = acc + r * kLd + ct * kCols;
        _mm512_store_ps(a, _mm512_fmadd_ps(_mm512_mul_ps(s, x_scales), sums, _mm512_load_ps(a)));
      }
    }
  };
  amx::configure_tiles();
  bool forward = true;
  for (int64_t unit; (unit = queue.next(thread, &forward)) >= 0;) {
    const int64_t u0 = unit * kUnitRows, u1 = std::min(u0 + kUnitRows, w.N);
    // the rows likely read after this unit's: the next unit's (from the thread's own range), or
    // the previous one's (taken from the back of another's); this one's again at either end
    const int64_t after = forward ? (u1 < w.N ? u1 : u0) : std::max<int64_t>(u0 - kUnitRows, 0);
    for (nb = u0; nb < u1; nb += kRows) {
      rows = std::min(kRows, u1 - nb), row_tiles = (rows + kTileRows - 1) / kTileRows;
      const uint8_t* next_block = w.q + (nb + kRows < u1 ? nb + kRows : after) * row_bytes;
      // 8-bit codes are the packed bytes: A straight from the weight (whole blocks: the tile
      // loads read 16 rows)
      const bool direct = BITS == 8 && !INPUTS && rows == kRows;
      const int64_t stride = direct ? row_bytes : 64;
      std::fill(acc, acc + kRows * kLd, 0.f);
      const uint8_t* block = w.q + nb * row_bytes;
      // With one column tile, even slabs accumulate in C tiles 0-1, odd ones in 2-3: a slab's
      // sums are read out after the next slab's products are queued, so the tile unit has work
      // meanwhile (with more, all four C tiles hold one slab).
      for (int64_t slab = 0; slab < slabs; ++slab) {
        zero_sums<CT>(slab % 2);
        for (int64_t c = slab * chunks_per_slab; c < (slab + 1) * chunks_per_slab; ++c) {
          // the chunk kPrefetchChunks ahead (in this block's rows, or past their end in the block
          // read next), to L2: a block reads 16-32 rows at once (more streams than the hardware
          // prefetchers follow), so each line is asked for ahead, in the order it is read (ad hoc,
          // cold 4096 x 4096 4-bit, 1 thread: 1.34 ms without, 1.10 ms with the next block's bytes
          // in address order, 0.87-0.90 ms this way)
          const int64_t ahead = c * map.chunk_bytes + kPrefetchChunks * kChunkBytes;  // (bytes)
          const uint8_t* hint = ahead < row_bytes ? block + ahead : next_block + (ahead - row_bytes);
          constexpr int planes = kPlanes;
          const int64_t first = c * kPlanes;
          // input chunks: the chunk's group's bytes in the block's first row, and its codes' maps
          // (a copy: they stay in registers, where the stores to a_tiles could alias a reference);
          // a line asked for where the chunk's 16-32 bytes reach a new one
          const InputCodes codes = INPUTS ? codes_of[c % chunks_per_group] : InputCodes();
          const uint8_t* group_bytes_at = block + (INPUTS ? c / chunks_per_group * group_bytes : 0);
          const bool ask = !INPUTS || ahead % kChunkBytes < map.chunk_bytes;
          for (int64_t r = 0; r < rows; ++r) {
            if (ask) _mm_prefetch(reinterpret_cast<const char*>(hint + r * row_bytes), _MM_HINT_T1);
            if (direct) continue;
            if constexpr (INPUTS) {
              _mm512_store_si512(a_tiles + r * 64, codes(group_bytes_at + r * row_bytes));
            } else {
              const __m512i b = _mm512_loadu_si512(block + r * row_bytes + c * kChunkBytes);
#pragma GCC unroll 4
              for (int j = 0; j < kPlanes; ++j) _mm512_store_si512(a_tiles + (j * kRows + r) * 64, plane<BITS>(b, j));
            }
          }
          auto a = [&](int j, int rt) {
            return direct ? block + c * kChunkBytes + rt * kTileRows * row_bytes
                          : a_tiles + (j * kRows + rt * kTileRows) * 64;
          };
          auto b = [&](int j, int ct) { return packed + ((first + j) * CT + ct) * kTileBytes; };
          if constexpr (CT == 1) {
            if (slab % 2 == 0) {
              FASTLOSS_CT1_CHUNK(0, 1)
            } else {
              FASTLOSS_CT1_CHUNK(2, 3)
            }
          } else if constexpr (CT == 2) {
            FASTLOSS_CT2_CHUNK()
          } else {
            FASTLOSS_CT4_CHUNK()
          }
        }
        if (CT > 1) {
          add_slab(slab);
        } else if (slab > 0) {
          add_slab(slab - 1);  // the previous slab's sums
        }
      }
      if (CT == 1) add_slab(slabs - 1);
      // y = the row's columns of each batch row summed (+ bias)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t m = 0; m < M; ++m) {
          float sum = bias ? bias[nb + r] : 0.f;
          for (int ct = 0; ct < CT; ++ct)
            sum += _mm512_mask_reduce_add_ps(row_cols[ct][m], _mm512_load_ps(acc + r * kLd + ct * kCols));
          y[m * w.N + nb + r] = sum;
        }
    }
  }
  _tile_release();
}

#undef FASTLOSS_CT4_CHUNK
#undef FASTLOSS_CT2_CHUNK
#undef FASTLOSS_CT1_CHUNK
#undef FASTLOSS_CT1_PLANE

}  // namespace

int64_t quant_amx_gemv_slots(const QuantWeight& w, int64_t M) {
  if (active_cpu_isa() != CpuIsa::amx || !cpu_supports_amx_int8() || w.codebook != nullptr ||
      (w.bits != 2 && w.bits != 3 && w.bits != 4 && w.bits != 8) || M < 1 || col_tiles_of(M, 1) == 0)
    return 0;
  const int64_t G = w.K / w.group;
  // a group's sums within int32
  if (G == 0 || w.group * ((1 << w.bits) - 1) * 128 >= (int64_t(1) << 31)) return 0;
  // Byte chunks where S groups fill them (byte_chunks_fit) at the fewest column tiles, then the
  // most groups per slab, S dividing G; else input chunks (input_chunks_fit; any S) the same way.
  // x's tiles, read again by every block of rows, must stay in L2 beside the weights' stream:
  // bench_quant at a6c1190 (3-bit tiles then twice as many), 8192 x 28672 3-bit batch 4 with
  // 3.5 MiB of them took 42.7 ms against the AVX-512 GEMV's 38.7 (at 9813309); 1.75 MiB ran at
  // full speed. (Input chunks may need fewer column tiles than the byte chunks' S.)
  auto first_fit = [&](bool inputs) -> int64_t {
    for (int ct = 1; ct <= 4; ct *= 2)
      for (int64_t S = ct * kCols / (M * kDigits); S >= 1; --S)
        if (G % S == 0 && (inputs || byte_chunks_fit(w, S))) return S;
    return 0;
  };
  const int64_t S = first_fit(false);
  if (S > 0 && quant_amx_gemv_packed_bytes(w, M, S) <= kMaxPackedBytes) return S;
  const int64_t S_inputs = input_chunks_fit(w) ? first_fit(true) : 0;
  // (the input scan's first S comes no later than the byte scan's: if it is the same one, it is
  // byte chunks, whose tiles did not fit; any other one does not fit byte chunks)
  return S_inputs > 0 && S_inputs != S && quant_amx_gemv_packed_bytes(w, M, S_inputs) <= kMaxPackedBytes ? S_inputs : 0;
}

// (input chunks exactly where no byte chunks fit: quant_amx_gemv_slots tries those first, over
// every S this one could be)
int64_t quant_amx_gemv_packed_bytes(const QuantWeight& w, int64_t M, int64_t S) {
  const ChunkMap map(w, !byte_chunks_fit(w, S));
  return map.row_chunks * map.planes * col_tiles_of(M, S) * kTileBytes;
}

int64_t quant_amx_gemv_block_rows() { return kUnitRows; }

bool quant_amx_gemv_exponents(const QuantWeight& w, const float* x, int64_t M, int32_t* E) {
  const int64_t G = w.K / w.group;
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      // the largest |x| as integer bits: an infinity or NaN is above every finite value
      __m512i largest = _mm512_setzero_si512();
      const float* xg = x + m * w.K + g * w.group;
      for (int64_t k = 0; k < w.group; k += 16)
        largest = _mm512_max_epu32(largest, _mm512_and_si512(_mm512_loadu_si512(xg + k), magnitude));
      const uint32_t bits = _mm512_reduce_max_epu32(largest);
      if (bits >= 0x7f800000u) return false;
      int e = 0;
      std::frexp(amx::float_of(bits), &e);
      if (bits != 0 && (e < kMinExponent || e > kMaxExponent)) return false;
      E[m * G + g] = e;
    }
  return true;
}

// The four digits of 16 inputs (consecutive, one group) where B wants them: tile row q of the
// four from `rows` (their quads) gets, at its byte `at`, digit d's four bytes (its inputs 4q ..
// 4q + 3) at at + 4 d: a 4 x 4 transpose of the digits' 32-bit words
inline void store_digit_quads(__m512i X, uint8_t* rows, int64_t at) {
  __m128i d[kDigits];
  for (int i = 0; i < kDigits; ++i) d[i] = _mm512_cvtepi32_epi8(next_digit(X));
  const __m128i d01_lo = _mm_unpacklo_epi32(d[0], d[1]), d01_hi = _mm_unpackhi_epi32(d[0], d[1]);
  const __m128i d23_lo = _mm_unpacklo_epi32(d[2], d[3]), d23_hi = _mm_unpackhi_epi32(d[2], d[3]);
  const __m128i quad[4] = {_mm_unpacklo_epi64(d01_lo, d23_lo), _mm_unpackhi_epi64(d01_lo, d23_lo),
                           _mm_unpacklo_epi64(d01_hi, d23_hi), _mm_unpackhi_epi64(d01_hi, d23_hi)};
  for (int q = 0; q < 4; ++q) _mm_storeu_si128(reinterpret_cast<__m128i*>(rows + q * 64 + at), quad[q]);
}

void quant_amx_gemv_pack_x(const QuantWeight& w, const float* x, const int32_t* E, int64_t M, int64_t S,
                           uint8_t* packed, float* digit_sums) {
  const int CT = col_tiles_of(M, S);
  const int64_t G = w.K / w.group;
  const ChunkMap map(w, !byte_chunks_fit(w, S));
  const int planes = int(map.planes);
  for (int64_t c = 0; c < map.row_chunks; ++c) {
    for (int j = 0; j < planes; ++j) {
      uint8_t* tiles = packed + (c * planes + j) * CT * kTileBytes;  // column tile ct at ct * 1 KiB
      std::memset(tiles, 0, CT * kTileBytes);
      // 16 lanes at a time: consecutive inputs of one group, in quads lane / 4 ..
      for (int64_t lane = 0; lane < 64; lane += 16) {
        int64_t g = 0, k = 0;
        map.input(c, j, lane, g, k);
        for (int64_t m = 0; m < M; ++m) {
          const int64_t col = (g % S * M + m) * kDigits;  // digit 0's column (the four share a tile)
          store_digit_quads(fixed_point(x + m * w.K + k, kFixedBits - E[m * G + g]),
                            tiles + col / kCols * kTileBytes + lane / 4 * 64, col % kCols * 4);
        }
      }
    }
  }
  // (zero points) each group's sum of each digit, exact in float32 (|sum| <= 128 x group,
  // below 2^24 for groups up to 2^17)
  if (!digit_sums) return;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      __m512i sums[kDigits] = {};
      for (int64_t k = g * w.group; k < (g + 1) * w.group; k += 16) {
        __m512i X = fixed_point(x + m * w.K + k, kFixedBits - E[m * G + g]);
        for (int d = 0; d < kDigits; ++d) sums[d] = _mm512_add_epi32(sums[d], next_digit(X));
      }
      for (int d = 0; d < kDigits; ++d) digit_sums[(m * G + g) * kDigits + d] = float(_mm512_reduce_add_epi32(sums[d]));
    }
}

void quant_amx_gemv(const QuantWeight& w, const uint8_t* packed, const int32_t* E, const float* digit_sums,
                    int64_t M, int64_t S, const float* bias, float* y, BlockQueue& queue, int thread) {
  auto run = [&](auto bits_c, auto inputs_c) {
    constexpr int BITS = decltype(bits_c)::value;
    constexpr bool INPUTS = decltype(inputs_c)::value;
    switch (col_tiles_of(M, S)) {
      case 1: return gemv_rows<BITS, 1, INPUTS>(w, packed, E, digit_sums, M, S, bias, y, queue, thread);
      case 2: return gemv_rows<BITS, 2, INPUTS>(w, packed, E, digit_sums, M, S, bias, y, queue, thread);
      default: return gemv_rows<BITS, 4, INPUTS>(w, packed, E, digit_sums, M, S, bias, y, queue, thread);
    }
  };
  using bytes = std::false_type;
  using inputs = std::true_type;
  const bool by_inputs = !byte_chunks_fit(w, S);
  switch (w.bits) {
    case 2: return by_inputs ? run(std::integral_constant<int, 2>(), inputs()) : run(std::integral_constant<int, 2>(), bytes());
    case 3: return run(std::integral_constant<int, 3>(), inputs());
    case 4: return by_inputs ? run(std::integral_constant<int, 4>(), inputs()) : run(std::integral_constant<int, 4>(), bytes());
    default: return run(std::integral_constant<int, 8>(), bytes());
  }
}

}  // namespace fastloss
