// Entry points of the low-bit dequant GEMM CPU kernels (torch-free).
//
// Packed layout (one format family, see README "Low-bit dequant GEMM"): a weight [N, K] is
// quantized in groups of `group` consecutive inputs of one output row; group g of row n has a
// float32 scale s[n, g] and zero point z[n, g] (absent: 0), and
//   w[n, k] = (v(q[n, k]) - z) s,   v(q) = q (uniform) or codebook[c, q] (c = 0 or n).
// A row is K * bits / 8 bytes, a group group * bits / 8 of them, laid out in planes so that
// unpacking is a few contiguous vector loops: with P = group / planes,
//   bits 2, 4, 8 (planes = 8 / bits): byte i of the group holds value j * P + i in its bits
//     [j * bits, (j + 1) * bits), j = 0 .. planes - 1;
//   bits 3 (planes = 8): the group's low two bits in the 2-bit layout (2P bytes), then its third
//     bits in P bytes: bit j of byte 2P + i is the third bit of value j * P + i.
// Hence a group's length is a multiple of `planes`.
#pragma once
#include <cstdint>

#include "../common/block_queue.h"
#include "../losses/loss_params.h"  // ScalarType

namespace fastloss {

struct QuantWeight {
  const uint8_t* q = nullptr;         // [N, K * bits / 8]
  const float* scale = nullptr;       // [N, K / group]
  const float* zero = nullptr;        // [N, K / group], or nullptr (no zero points)
  const float* codebook = nullptr;    // [codebook_rows, 2^bits], or nullptr (uniform)
  int64_t N = 0, K = 0, group = 0;
  int64_t codebook_rows = 0;          // 1 (per tensor) or N (per output channel)
  int bits = 4;
};

// planes per group of a bit width (the layout above)
constexpr int quant_planes(int bits) { return bits == 3 ? 8 : 8 / bits; }

// y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for output features [n0, n1), float32 x [M, K]
// (contiguous) with xsum[m, g] = sum of x over group g (read with zero points up to
// kQuantGemvXsumRows rows; from there the GEMV subtracts z in the dequantized weights), y
// float32 [M, N] (row stride N). For small M (the memory-bound path: each packed row is read
// once for all M rows).
constexpr int64_t kQuantMaxRows = 16;
constexpr int64_t kQuantGemvXsumRows = 2;
// On CUDA, formats without the tensor-core GEMV (3-bit, codebooks, 8-bit with bfloat16 x) take
// the warp-per-row GEMV only up to this many rows, the tensor-core GEMM above it: the warp GEMV
// streams the weights again for every few rows (H200 at f95b002, batch 16 on the warp GEMV
// against batch 64 on the GEMM: 8192x28672 3-bit 1.86 vs 0.74 ms, NF4 2.60 vs 0.62,
// 4096x14336 3-bit 0.40 vs 0.26; batch 4 on the warp GEMV 0.16 ms there).
constexpr int64_t kQuantWarpGemvMaxRows = 8;
void quant_gemv_cpu(const QuantWeight& w, const float* x, const float* xsum, int64_t M,
                    const float* bias, float* y, int64_t n0, int64_t n1);

// The float32 weights of rows [n0, n1) into out [(n1 - n0), K] (the large-batch path and the
// backward dequantize tiles of rows and multiply them with torch's GEMM).
void quant_dequant_rows_cpu(const QuantWeight& w, float* out, int64_t n0, int64_t n1);

// The AMX path for batches from kQuantAmxMinRows on (quant_cpu_amx.cpp, on CPUs with AMX-BF16
// when the active CPU path is "amx"; below, the GEMV's single pass over the packed bytes is
// faster: an ad-hoc timing on a 2-vCPU Xeon had the two even at batch 8, 4096 x 4096): tile
// products of the weights' values v(q) (exact in bfloat16) with x split into three bfloat16
// terms, x = hi + mid + lo exactly, so the products are those of float32 and only the float32
// accumulation order differs from a float32 GEMM; each group's sums are scaled by s, and the
// zero points enter as s z sum_k x over the group. Uniform formats with group lengths that are
// a multiple of 32.
constexpr int64_t kQuantAmxMinRows = 8;
bool quant_amx_applies(const QuantWeight& w);
// x [M, K] float32 (contiguous) packed for the tile products: `terms` bfloat16 terms (3 for
// float32 values; 1 where x holds bfloat16 values, 2 for float16 ones: the rest are zero), 16
// batch rows per tile (rows past M are zeros), pairs of inputs in 32-bit words.
// quant_amx_packed_words(M, K, terms) words; quant_amx_pack_x writes the tiles of batch rows
// [16 t0, 16 t1).
int64_t quant_amx_padded_rows(int64_t M);  // M rounded up to whole tiles of 16 batch rows
int64_t quant_amx_packed_words(int64_t M, int64_t K, int terms);
void quant_amx_pack_x(const float* x, int64_t M, int64_t K, int terms, uint32_t* packed, int64_t t0,
                      int64_t t1);
// y[m, n] (row stride N) for output features [n0, n1), n0 a multiple of quant_amx_block_rows();
// x on the CPU; xsum_t [G, quant_amx_padded_rows(M)]: sum of x over each group (unused without
// zero points).
int64_t quant_amx_block_rows();
void quant_amx_gemm(const QuantWeight& w, const uint32_t* packed, int terms, int64_t M,
                    const float* xsum_t, const float* bias, float* y, int64_t n0, int64_t n1);

// The AMX-INT8 GEMV for batches of 1 to 16 rows (quant_cpu_amx_gemv.cpp; uniform 2-, 4- and
// 8-bit formats whose groups fill 64-byte chunks S at a time, or hold 64 or 128 inputs (2-bit)
// or 64 (4-bit); 3-bit with groups of 64, 128, 256 or a multiple of 512 inputs; x's tiles
// within 2 MiB): integer tile products of the codes with x
// in fixed point per group (four base-256 digits), the digits and batch rows of S groups side by
// side in one to four tiles' columns. quant_amx_gemv_slots(w, M) is S, or 0 where this path does
// not apply. x [M, K] float32 (contiguous): quant_amx_gemv_exponents writes E [M, G] (false for
// a non-finite x, or a group's largest |x| outside [2^-91, 2^100): this path does not apply);
// quant_amx_gemv_pack_x writes the digits into quant_amx_gemv_packed_bytes(w, M, S) bytes and,
// with zero points (digit_sums not null), the digits' sums over each group [M, G, 4];
// quant_amx_gemv, as thread `thread` of queue's team, writes y[m, n] (row stride N) for the
// blocks of quant_amx_gemv_block_rows() output features it takes from queue (every block once,
// by one thread: a team of queue.threads() calls, one per thread, writes all of y;
// digit_sums: nullptr without zero points).
int64_t quant_amx_gemv_slots(const QuantWeight& w, int64_t M);
int64_t quant_amx_gemv_packed_bytes(const QuantWeight& w, int64_t M, int64_t S);
int64_t quant_amx_gemv_block_rows();
bool quant_amx_gemv_exponents(const QuantWeight& w, const float* x, int64_t M, int32_t* E);
void quant_amx_gemv_pack_x(const QuantWeight& w, const float* x, const int32_t* E, int64_t M, int64_t S,
                           uint8_t* packed, float* digit_sums);
void quant_amx_gemv(const QuantWeight& w, const uint8_t* packed, const int32_t* E, const float* digit_sums,
                    int64_t M, int64_t S, const float* bias, float* y, BlockQueue& queue, int thread);

// The CUDA kernels (quant_cuda.cu, built with FASTLOSS_WITH_CUDA), on `stream` (a
// cudaStream_t); the same contracts over all rows, xsum not needed, except that the gemv's x
// [M, K] (contiguous, 16-byte aligned) and y [M, N] are in `dtype` (float32 math). Return
// nullptr, or the launch error's text.
const char* quant_gemv_cuda(const QuantWeight& w, const void* x, ScalarType dtype, int64_t M,
                            const float* bias, void* y, void* stream);
// The tensor-core path for M > kQuantMaxRows (quant_mma_cuda.cu): same contract as the gemv,
// for the weights and dtypes quant_mma_applies() accepts (float16 / bfloat16 x, plane length a
// multiple of 4, a device binary built for sm_80 or later); x's rows start 8-byte aligned.
// `workspace` holds quant_mma_workspace_floats(w, M) floats (split-K partial sums; null when 0).
bool quant_mma_applies(const QuantWeight& w, ScalarType dtype);
int64_t quant_mma_workspace_floats(const QuantWeight& w, int64_t M);
const char* quant_mma_gemm_cuda(const QuantWeight& w, const void* x, ScalarType dtype, int64_t M,
                                const float* bias, void* y, float* workspace, void* stream);
// The pipelined tensor-core GEMM (quant_gemm_pipe_cuda.cu) for M > kQuantMaxRows: the same
// contract as quant_mma_gemm_cuda, for what quant_gemm_pipe_applies() accepts (the tensor-core
// GEMV's formats: uniform 2- and 4-bit weights, 8-bit with float16 x, float16 / bfloat16 x,
// plane lengths a multiple of 16, qweight 16-byte aligned, x 16-byte aligned, sm_80 or later
// with 120 KB of shared memory per block); the other formats take quant_mma_gemm_cuda.
bool quant_gemm_pipe_applies(const QuantWeight& w, ScalarType dtype);
int64_t quant_gemm_pipe_workspace_floats(const QuantWeight& w, int64_t M);
const char* quant_gemm_pipe_cuda(const QuantWeight& w, const void* x, ScalarType dtype, int64_t M,
                                 const float* bias, void* y, float* workspace, void* stream);
// The tensor-core GEMV for M <= kQuantMaxRows (quant_gemv_mma_cuda.cu): same contract as
// quant_gemv_cuda, for what quant_gemv_mma_applies() accepts (uniform 2 / 4 / 8-bit weights
// with float16 x, 2 / 4-bit with bfloat16 x, plane length a multiple of 16, qweight 16-byte
// aligned, a device binary built for sm_80 or later); the rest takes quant_gemv_cuda.
// ring: shared slots per warp, each a step of the weight stream (ring - 1 steps in flight;
// 2 to kQuantGemvMaxRing; FASTLOSS_QUANT_GEMV_RING overrides the default for benchmarks,
// quant_op.cpp).
constexpr int kQuantGemvRing = 4, kQuantGemvMaxRing = 8;
bool quant_gemv_mma_applies(const QuantWeight& w, ScalarType dtype, int64_t M);
const char* quant_gemv_mma_cuda(const QuantWeight& w, const void* x, ScalarType dtype, int64_t M,
                                const float* bias, void* y, void* stream, int ring = kQuantGemvRing);
// The rows' weights into out [(n1 - n0), K] in `dtype` (float32, or the activations' 16-bit
// dtype for cuBLAS: each value rounded once).
const char* quant_dequant_rows_cuda(const QuantWeight& w, void* out, ScalarType dtype, int64_t n0, int64_t n1,
                                    void* stream);

}  // namespace fastloss
