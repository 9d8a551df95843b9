// The torch-aware side of the low-bit dequant GEMM: argument checks (the packed format's
// consistency), allocation, and the CPU (quant_cpu_impl.h) or CUDA (quant_cuda.cu) kernels.
// Schemas in registration.cpp; fake kernels and the packing in python/fastloss/ops/quant.py;
// autograd here (C++: a call that records nothing runs no Python; the autograd section below).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string_view>
#include <vector>

#include "../op_helpers.h"
#include "quant_kernels.h"

namespace fastloss {
namespace {

using at::Tensor;
constexpr const char* kOp = "dequant_gemm";
constexpr int64_t kTileRows = 256;  // output features dequantized at a time (large batches, backward)

using OptTensor = std::optional<Tensor>;
constexpr int64_t kGemvBlockRows = 64;  // output features a GEMV thread takes at a time

// fn(queue, thread) on each thread of a team sharing blocks [0, count) (BlockQueue: each thread's
// own range, then stealing), where threads split memory-bound GEMVs unevenly from call to call;
// no more threads than blocks (one block: this thread alone)
template <typename F>
void run_team(int64_t count, const F& fn) {
  BlockQueue queue(count, int(std::clamp<int64_t>(count, 1, at::get_num_threads())));
  if (queue.threads() == 1) return fn(queue, 0);
  at::parallel_for(0, queue.threads(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(queue, int(t));
  });
}

QuantWeight check_weight(const Tensor& q, const Tensor& scale, const OptTensor& zero,
                         const OptTensor& codebook, int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, kOp,
              ": bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && (q.size(1) * 8) % bits == 0, kOp,
              ": qweight must be a 2-D uint8 tensor [N, K * bits / 8], got ", q.scalar_type(), " ",
              q.sizes());
  const int64_t N = q.size(0), K = q.size(1) * 8 / bits, planes = quant_planes(int(bits));
  TORCH_CHECK(group >= 1 && K % group == 0, kOp, ": group_size (", group,
              ") must divide the input features K = ", K);
  TORCH_CHECK(group % planes == 0, kOp, ": ", bits, "-bit groups must have a length divisible by ",
              planes, ", got ", group);
  std::vector<const Tensor*> tensors = {&q, &scale};
  auto check_f32 = [&](const Tensor& t, const char* what, int64_t rows, int64_t cols) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols &&
                    t.scalar_type() == at::kFloat,
                kOp, ": ", what, " must be float32 [", rows, ", ", cols, "], got ",
                t.scalar_type(), " ", t.sizes());
    tensors.push_back(&t);
  };
  check_f32(scale, "scales", N, K / group);
  if (zero.has_value()) check_f32(*zero, "zeros", N, K / group);
  if (codebook.has_value()) {
    TORCH_CHECK(codebook->dim() == 2 && (codebook->size(0) == 1 || codebook->size(0) == N), kOp,
                ": codebook must be [1, 2^bits] (per tensor) or [N, 2^bits] (per output channel) "
                "with N = ", N, ", got ", codebook->sizes());
    check_f32(*codebook, "codebook", codebook->size(0), int64_t(1) << bits);
  }
  TORCH_CHECK(q.is_cpu() || q.is_cuda(), kOp, ": qweight must be on the CPU or a CUDA device, got ",
              q.device());
#if !defined(FASTLOSS_WITH_CUDA)
  TORCH_CHECK(q.is_cpu(), kOp, ": fastloss was built without CUDA; reinstall it with a CUDA build of torch and nvcc");
#endif
  for (const Tensor* t : tensors) {
    TORCH_CHECK(t->device() == q.device(), kOp, ": the packed tensors must be on one device (qweight is on ",
                q.device(), ", another on ", t->device(), ")");
    TORCH_CHECK(t->is_contiguous(), kOp,
                ": the packed tensors must be contiguous (as quantize_weight returns them)");
  }
  // the CUDA kernel reads qweight in 32-bit words
  TORCH_CHECK(reinterpret_cast<uintptr_t>(q.data_ptr()) % 4 == 0, kOp,
              ": qweight must start on a 4-byte boundary (as quantize_weight returns it)");
  QuantWeight w;
  w.q = q.data_ptr<uint8_t>();
  w.scale = scale.data_ptr<float>();
  w.zero = zero.has_value() ? zero->data_ptr<float>() : nullptr;
  w.codebook = codebook.has_value() ? codebook->data_ptr<float>() : nullptr;
  w.codebook_rows = codebook.has_value() ? codebook->size(0) : 0;
  w.N = N;
  w.K = K;
  w.group = group;
  w.bits = int(bits);
  return w;
}

// Output features dequantized at a time (large batches, backward): 256 rows on the CPU (they
// stay in cache), about 64 MB of float32 on a GPU (big enough for cuBLAS to run at full rate).
int64_t tile_rows(const QuantWeight& w, const Tensor& q) {
  return q.is_cuda() ? std::max<int64_t>(kTileRows, (int64_t(1) << 24) / std::max<int64_t>(w.K, 1))
                     : kTileRows;
}

// The float32 rows [n0, n0 + rows) of the weight, written into the first rows of `buffer`
// ([>= rows, K] float32, reused from tile to tile: a fresh tile each time cost its page faults).
Tensor dequant_tile(const QuantWeight& w, int64_t n0, int64_t rows, const Tensor& buffer) {
  Tensor tile = buffer.narrow(0, 0, rows);
  float* out = tile.data_ptr<float>();
  if (tile.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    check_cuda_launch(quant_dequant_rows_cuda(w, out, ScalarType::f32, n0, n0 + rows, cuda_stream()), kOp);
#endif
    return tile;
  }
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    quant_dequant_rows_cpu(w, out + r0 * w.K, n0 + r0, n0 + r1);
  });
  return tile;
}

// Weights in 16-bit tiles for cuBLAS's 16-bit GEMM (tensor cores, float32 sums inside each
// product), as a float16 / bfloat16 matmul of the dequantized weights would run. On CUDA with
// 16-bit activations: the backward always (its float32 GEMMs ran at the float32 rate, a tenth
// of the tensor cores'), the forward from kQuantCublasMinRows rows on (below, the tensor-core
// kernels, which never form the weight; the crossover is not measured yet: bench_quant.py
// times both at 1024 rows; dequantizing an 8192 x 28672 layer moves ~0.6 GB).
constexpr int64_t kQuantCublasMinRows = 512;
// The same for the formats the pipelined GEMM does not read (3-bit, codebooks, 8-bit with
// bfloat16 x), which take the shared-memory GEMM below it: that kernel took 0.52-4.59 ms at
// 8192 x 28672, batch 64-256 (4-bit, H200, f95b002) against 0.14-0.22 ms for the float16
// matmul, while the tiles cost about that matmul plus dequantizing the layer (~0.6 GB moved,
// ~0.15-0.25 ms): cuBLAS from 64 rows (an estimate, not measured).
constexpr int64_t kQuantCublasMinRowsSmem = 64;
bool sixteen_bit(const Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

// Rows [n0, n0 + rows) of the weight in `tile16`'s dtype (a CUDA tensor), written into its
// first rows by the dequantize kernel itself (no float32 tile: that was a write and a read of
// 4 bytes per weight more).
Tensor dequant_tile16(const QuantWeight& w, int64_t n0, int64_t rows, const Tensor& tile16) {
  Tensor tile = tile16.narrow(0, 0, rows);
#if defined(FASTLOSS_WITH_CUDA)
  const ScalarType dtype = tile.scalar_type() == at::kHalf ? ScalarType::f16 : ScalarType::bf16;
  check_cuda_launch(quant_dequant_rows_cuda(w, tile.data_ptr(), dtype, n0, n0 + rows, cuda_stream()), kOp);
#endif
  return tile;
}

// Output features per 16-bit tile: about 256 MB of them (one tile for most layers: the backward
// then sums one product, rounded once, as a 16-bit matmul would). FASTLOSS_QUANT_TILE16_ROWS
// sets it (tests/test_quant.py: several tiles on a small layer).
int64_t tile16_rows(const QuantWeight& w) {
  const char* rows = std::getenv("FASTLOSS_QUANT_TILE16_ROWS");
  if (rows != nullptr && std::atoll(rows) > 0) return std::atoll(rows);
  return std::max<int64_t>(64, (int64_t(1) << 27) / std::max<int64_t>(w.K, 1));
}

Tensor dequantize_weight(const Tensor& q, const Tensor& scale, const OptTensor& zero,
                         const OptTensor& codebook, int64_t bits, int64_t group) {
  const QuantWeight w = check_weight(q, scale, zero, codebook, bits, group);
  const c10::DeviceGuard guard(q.device());
  return dequant_tile(w, 0, w.N, at::empty({w.N, w.K}, q.options().dtype(at::kFloat)));
}

// y = x32 @ W^T + bias by the AMX path (quant_cpu_amx.cpp): x packed once, blocks of weight
// rows split between the threads. x32 holds the values of x (dtype): a bfloat16 x is one
// bfloat16 term, a float16 x two, a float32 x three. xsum [M, G]: x's group sums (zero points).
void gemm_amx(const QuantWeight& w, const Tensor& x32, at::ScalarType dtype, const Tensor& xsum,
              const Tensor& b32, Tensor& y) {
  const int64_t M = x32.size(0), Mp = quant_amx_padded_rows(M), G = w.K / w.group;
  const int terms = dtype == at::kBFloat16 ? 1 : dtype == at::kHalf ? 2 : 3;
  const Tensor packed = at::empty({quant_amx_packed_words(M, w.K, terms)}, x32.options().dtype(at::kInt));
  auto* words = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  const float* xp = x32.data_ptr<float>();
  at::parallel_for(0, Mp / 16, 1, [&](int64_t t0, int64_t t1) {
    quant_amx_pack_x(xp, M, w.K, terms, words, t0, t1);
  });
  Tensor xsum_t;  // [G, Mp]: sums of x over each group, for the zero points
  if (w.zero) {
    xsum_t = at::zeros({G, Mp}, x32.options());
    xsum_t.narrow(1, 0, M).copy_(xsum.t());
  }
  const float* sp = xsum_t.defined() ? xsum_t.data_ptr<float>() : nullptr;
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t block = quant_amx_block_rows(), blocks = (w.N + block - 1) / block;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    quant_amx_gemm(w, words, terms, M, sp, bp, yp, b0 * block, std::min(b1 * block, w.N));
  });
}

// y = x32 @ W^T + bias by the AMX-INT8 GEMV (quant_cpu_amx_gemv.cpp; slots:
// quant_amx_gemv_slots): x packed once (~5 us at K = 4096, batch 1, on one thread: each
// thread then reads all of it), blocks of weight rows split between the threads.
// Returns false (y untouched) where x has a non-finite value or one outside the fixed point's
// range (quant_amx_gemv_exponents).
bool gemv_amx(const QuantWeight& w, const Tensor& x32, int64_t slots, const Tensor& b32, Tensor& y) {
  const int64_t M = x32.size(0), G = w.K / w.group;
  const float* xp = x32.data_ptr<float>();
  const Tensor exponents = at::empty({M, G}, x32.options().dtype(at::kInt));
  int32_t* ep = exponents.data_ptr<int32_t>();
  if (!quant_amx_gemv_exponents(w, xp, M, ep)) return false;
  const Tensor digit_sums = w.zero ? at::empty({M, G, 4}, x32.options()) : Tensor();  // (zero points)
  float* dp = digit_sums.defined() ? digit_sums.data_ptr<float>() : nullptr;
  const Tensor packed = at::empty({quant_amx_gemv_packed_bytes(w, M, slots)}, x32.options().dtype(at::kByte));
  uint8_t* pp = packed.data_ptr<uint8_t>();
  quant_amx_gemv_pack_x(w, xp, ep, M, slots, pp, dp);
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // (static halves of the blocks ended a median ~100 us apart at 4096 x 4096 4-bit batch 1,
  // ~0.5 ms of streaming on 2 threads; BlockQueue's stealing: ~3 us)
  const int64_t block = quant_amx_gemv_block_rows();
  run_team((w.N + block - 1) / block, [&](BlockQueue& queue, int t) {
    quant_amx_gemv(w, pp, ep, dp, M, slots, bp, yp, queue, t);
  });
  return true;
}

// y = x @ W^T (+ bias), x [M, K] -> [M, N] in x's dtype.
Tensor dequant_gemm(const Tensor& x, const Tensor& q, const Tensor& scale, const OptTensor& zero,
                    const OptTensor& codebook, int64_t bits, int64_t group, const OptTensor& bias) {
  const QuantWeight w = check_weight(q, scale, zero, codebook, bits, group);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.K, kOp, ": x must be [M, K] with K = ", w.K,
              " (the weight's input features), got ", x.sizes());
  kernel_dtype(x, kOp, "x");
  TORCH_CHECK(x.device() == q.device(), kOp, ": x is on ", x.device(), " but qweight is on ", q.device());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == w.N), kOp,
              ": bias must be [N] = [", w.N, "]");
  TORCH_CHECK(!bias.has_value() || bias->device() == q.device(), kOp, ": bias is on ",
              bias->device(), " but qweight is on ", q.device());
  // (as F.linear: a bias of another dtype is refused, not silently added in float32)
  TORCH_CHECK(!bias.has_value() || bias->scalar_type() == x.scalar_type(), kOp, ": bias is ",
              bias->scalar_type(), " but x is ", x.scalar_type(), " (cast one, or use torch.autocast)");
  const c10::DeviceGuard guard(q.device());
  const auto f32 = x.options().dtype(at::kFloat);
  const Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : Tensor();
  const int64_t M = x.size(0);
#if defined(FASTLOSS_WITH_CUDA)
  // On a GPU the kernels read x and write y in x's dtype (no float32 copies): the GEMV up to
  // kQuantMaxRows rows (on tensor cores where quant_gemv_mma_applies: uniform formats, 16-bit
  // x; else warp per row, up to kQuantWarpGemvMaxRows rows where the GEMM applies), the
  // tensor-core GEMMs above where they apply (float16 / bfloat16 x), and from
  // kQuantCublasMinRows rows (kQuantCublasMinRowsSmem for the formats the pipelined GEMM does
  // not read) 16-bit tiles of the weight and cuBLAS (dequant_tile16).
  const ScalarType dtype = kernel_dtype(x, kOp, "x");
  // FASTLOSS_QUANT_GEMV=warp forces the warp-per-row GEMV up to kQuantMaxRows rows (bench_quant.py
  // measures it beside the default in one run; read per call, so a benchmark can switch)
  const char* choice = x.is_cuda() ? std::getenv("FASTLOSS_QUANT_GEMV") : nullptr;
  const bool warp_gemv = choice != nullptr && std::string_view(choice) == "warp";
  const bool small = M <= kQuantMaxRows;
  const bool tc_gemv = small && !warp_gemv && x.is_cuda() && quant_gemv_mma_applies(w, dtype, M);
  const bool mma = x.is_cuda() && quant_mma_applies(w, dtype);
  const bool gemv = small && (tc_gemv || warp_gemv || M <= kQuantWarpGemvMaxRows || !mma);
  // FASTLOSS_QUANT_GEMM=smem / pipe forces that tensor-core GEMM above kQuantMaxRows rows (where
  // it applies), at any batch (bench_quant.py compares them with the default in one run)
  const char* gemm = x.is_cuda() ? std::getenv("FASTLOSS_QUANT_GEMM") : nullptr;
  const std::string_view forced = gemm != nullptr ? std::string_view(gemm) : std::string_view();
  // (pipe_applies asks the device: only where it decides)
  const bool tiles16 = x.is_cuda() && M >= kQuantCublasMinRowsSmem && w.N > 0 && sixteen_bit(x) &&
                       forced != "smem" && forced != "pipe" &&
                       (M >= kQuantCublasMinRows || !quant_gemm_pipe_applies(w, dtype));
  if (tiles16) {
    const int64_t step = std::min(tile16_rows(w), w.N);
    const Tensor tile16 = at::empty({step, w.K}, x.options());
    const Tensor bias16 = bias.has_value() ? bias->to(x.scalar_type()) : Tensor();
    auto product = [&](int64_t n0, int64_t rows) {
      const Tensor t = dequant_tile16(w, n0, rows, tile16).t();
      return bias16.defined() ? at::addmm(bias16.narrow(0, n0, rows), x, t) : at::mm(x, t);
    };
    if (step == w.N) return product(0, w.N);  // one tile (most layers): no copy of y
    Tensor yx = at::empty({M, w.N}, x.options());
    for (int64_t n0 = 0; n0 < w.N; n0 += step) {
      const int64_t rows = std::min(step, w.N - n0);
      yx.narrow(1, n0, rows).copy_(product(n0, rows));
    }
    return yx;
  }
  if (x.is_cuda() && M > 0 && w.N > 0 && (gemv || mma)) {
    Tensor xc = x.contiguous();
    if (reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16) xc = xc.clone();  // 16- / 8-byte loads
    Tensor yx = at::empty({M, w.N}, x.options());
    const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
    if (gemv) {
      // FASTLOSS_QUANT_GEMV_RING=<slots>: the tensor-core GEMV's shared slots per warp (2: one
      // step in flight), for benchmarks comparing depths in one run
      const char* ring_env = tc_gemv ? std::getenv("FASTLOSS_QUANT_GEMV_RING") : nullptr;
      const int ring = ring_env != nullptr ? std::atoi(ring_env) : kQuantGemvRing;
      check_cuda_launch(tc_gemv ? quant_gemv_mma_cuda(w, xc.data_ptr(), dtype, M, bp, yx.data_ptr(), cuda_stream(),
                                                      ring)
                                : quant_gemv_cuda(w, xc.data_ptr(), dtype, M, bp, yx.data_ptr(), cuda_stream()),
                        kOp);
    } else {
      // the pipelined GEMM for the uniform formats it reads, the shared-memory one for the rest
      const bool pipe = forced != "smem" && quant_gemm_pipe_applies(w, dtype);
      const int64_t floats = pipe ? quant_gemm_pipe_workspace_floats(w, M) : quant_mma_workspace_floats(w, M);
      Tensor workspace = at::empty({floats}, f32);  // split-K partial sums, or nothing
      float* ws = floats ? workspace.data_ptr<float>() : nullptr;
      check_cuda_launch(pipe ? quant_gemm_pipe_cuda(w, xc.data_ptr(), dtype, M, bp, yx.data_ptr(), ws, cuda_stream())
                             : quant_mma_gemm_cuda(w, xc.data_ptr(), dtype, M, bp, yx.data_ptr(), ws, cuda_stream()),
                        kOp);
    }
    return yx;
  }
#endif
  Tensor x32 = x.to(at::kFloat).contiguous();
  Tensor y = at::empty({M, w.N}, f32);
  if (M == 0 || w.N == 0) return y.to(x.scalar_type());
  // AMX-INT8 integer tile products up to 16 rows, where they apply (finite x, uniform formats)
  const int64_t amx_gemv_slots = x.is_cpu() ? quant_amx_gemv_slots(w, M) : 0;
  if (amx_gemv_slots > 0 && gemv_amx(w, x32, amx_gemv_slots, b32, y)) return y.to(x.scalar_type());
  const bool amx = x.is_cpu() && M >= kQuantAmxMinRows && quant_amx_applies(w);
  // the AMX and batch 1-2 GEMV paths' zero points: sum_k (q - z) s x = s (q . x - z sum_k x),
  // with the sums of x over each group (the tiles and the GEMV from 3 rows subtract z in the
  // dequantized weights)
  const Tensor xsum = w.zero && (amx || M <= kQuantGemvXsumRows)
                          ? x32.view({M, w.K / w.group, w.group}).sum(2) : Tensor();
  if (amx) {  // compute-bound: AMX tile products
    gemm_amx(w, x32, x.scalar_type(), xsum, b32, y);
  } else if (M <= kQuantMaxRows) {  // memory-bound: each packed row is read once for all M rows
    const float* xp = x32.data_ptr<float>();
    const float* sp = xsum.defined() ? xsum.data_ptr<float>() : nullptr;
    const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    run_team((w.N + kGemvBlockRows - 1) / kGemvBlockRows, [&](BlockQueue& queue, int t) {
      bool forward = true;
      for (int64_t b; (b = queue.next(t, &forward)) >= 0;)
        quant_gemv_cpu(w, xp, sp, M, bp, yp, b * kGemvBlockRows, std::min(w.N, (b + 1) * kGemvBlockRows));
    });
  } else {  // compute-bound: dequantize tiles of rows and use torch's GEMM
    const int64_t step = std::min(tile_rows(w, q), w.N);
    const Tensor buffer = at::empty({step, w.K}, f32);
    for (int64_t n0 = 0; n0 < w.N; n0 += step) {
      const int64_t rows = std::min(step, w.N - n0);
      const Tensor tile = dequant_tile(w, n0, rows, buffer);
      y.narrow(1, n0, rows).copy_(at::mm(x32, tile.t()));
    }
    if (b32.defined()) y.add_(b32);
  }
  return y.to(x.scalar_type());
}

// grad_x = grad_y @ W, grad_y [M, N] -> [M, K] in grad_y's dtype (float32 sums), by tiles of
// dequantized rows (16-bit ones for 16-bit grad_y on CUDA: their product is the result, with
// no float32 copy to convert back).
Tensor dequant_gemm_grad_input(const Tensor& grad_y, const Tensor& q, const Tensor& scale,
                               const OptTensor& zero, const OptTensor& codebook, int64_t bits,
                               int64_t group) {
  const QuantWeight w = check_weight(q, scale, zero, codebook, bits, group);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(1) == w.N, kOp, ": grad_y must be [M, N] with N = ",
              w.N, ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.device() == q.device(), kOp, ": grad_y is on ", grad_y.device(),
              " but qweight is on ", q.device());
  const c10::DeviceGuard guard(q.device());
  const auto f32 = grad_y.options().dtype(at::kFloat);
  if (grad_y.is_cuda() && sixteen_bit(grad_y) && w.N > 0) {  // 16-bit tiles (dequant_tile16)
    const int64_t step = std::min(tile16_rows(w), w.N);
    const Tensor tile16 = at::empty({step, w.K}, grad_y.options());
    if (step == w.N) return at::mm(grad_y, dequant_tile16(w, 0, w.N, tile16));
    Tensor gx = at::zeros({grad_y.size(0), w.K}, f32);  // the tiles' products summed in float32
    for (int64_t n0 = 0; n0 < w.N; n0 += step) {
      const int64_t rows = std::min(step, w.N - n0);
      gx.add_(at::mm(grad_y.narrow(1, n0, rows), dequant_tile16(w, n0, rows, tile16)));
    }
    return gx.to(grad_y.scalar_type());
  }
  const Tensor g32 = grad_y.to(at::kFloat);
  Tensor gx = at::zeros({grad_y.size(0), w.K}, f32);
  const int64_t step = std::min(tile_rows(w, q), std::max<int64_t>(w.N, 1));
  const Tensor buffer = at::empty({step, w.K}, f32);
  for (int64_t n0 = 0; n0 < w.N; n0 += step) {
    const int64_t rows = std::min(step, w.N - n0);
    gx.addmm_(g32.narrow(1, n0, rows), dequant_tile(w, n0, rows, buffer));
  }
  return gx.to(grad_y.scalar_type());
}

// ---- autograd -----------------------------------------------------------------------------
// y = x W^T + b is linear in x and b: grad_x = grad_y W (dequant_gemm_grad_input), grad_b = the
// column sums of grad_y; the packed weight gets no gradient (a scale, zero point or codebook that
// requires grad is refused rather than left without one). Both formulas call the ops through the
// dispatcher, so with create_graph they record in turn: dequant_gemm_grad_input's backward is
// dequant_gemm again (gradient penalties and Hessian-vector products through a QuantLinear work
// as through an nn.Linear).
// In C++ rather than torch.library.register_autograd: a batch-1 call then has no Python between
// the op and its kernel (~10 us per call with warm caches, 30-40 us after a weight stream has
// evicted the interpreter's lines; 4096 x 4096 4-bit takes ~0.6 ms in all).

using GemmOp = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                      int64_t, int64_t, const OptTensor&);
using GradInputOp = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                           const OptTensor&, int64_t, int64_t);

const c10::TypedOperatorHandle<GemmOp>& gemm_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastloss::dequant_gemm", "").typed<GemmOp>();
  return op;
}

const c10::TypedOperatorHandle<GradInputOp>& grad_input_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastloss::dequant_gemm_grad_input", "").typed<GradInputOp>();
  return op;
}

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// While autograd records: the packed weight's float tensors must not require grad.
void refuse_weight_grad(const char* op, const Tensor& scale, const OptTensor& zero, const OptTensor& codebook) {
  auto refuse = [&](const Tensor& t, const char* name) {
    TORCH_CHECK(!t.defined() || !t.requires_grad(), op, ": qw.", name, " requires grad, but ", op,
                " gives no gradient for the weight's ", name, "; pass qw.", name, ".detach()");
  };
  refuse(scale, "scales");
  refuse(zero.value_or(Tensor()), "zeros");
  refuse(codebook.value_or(Tensor()), "codebook");
}

// The packed weight's tensors, saved (zeros / codebook undefined where absent), and its format.
void save_weight(torch::autograd::AutogradContext* ctx, const Tensor& q, const Tensor& scale,
                 const OptTensor& zero, const OptTensor& codebook, int64_t bits, int64_t group) {
  ctx->save_for_backward({q, scale, zero.value_or(Tensor()), codebook.value_or(Tensor())});
  ctx->saved_data["bits"] = bits;
  ctx->saved_data["group"] = group;
}

// x and bias first: their gradient edges are then 0 and 1 (edges count defined tensors only).
struct DequantGemmFunction : public torch::autograd::Function<DequantGemmFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x, const OptTensor& bias,
                        const Tensor& q, const Tensor& scale, const OptTensor& zero,
                        const OptTensor& codebook, int64_t bits, int64_t group) {
    save_weight(ctx, q, scale, zero, codebook, bits, group);
    ctx->saved_data["x_dtype"] = x.scalar_type();
    if (bias.has_value()) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    at::AutoDispatchBelowADInplaceOrView guard;
    return gemm_op().call(x, q, scale, zero, codebook, bits, group, bias);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& grad_y = grads[0];
    Tensor grad_x, grad_bias;
    if (ctx->needs_input_grad(0) && grad_y.defined())
      grad_x = grad_input_op()
                   .call(grad_y, saved[0], saved[1], opt(saved[2]), opt(saved[3]), ctx->saved_data["bits"].toInt(),
                         ctx->saved_data["group"].toInt())
                   .to(ctx->saved_data["x_dtype"].toScalarType());
    if (ctx->saved_data.count("bias_dtype") && ctx->needs_input_grad(1) && grad_y.defined())
      grad_bias = grad_y.to(at::kFloat).sum(0).to(ctx->saved_data["bias_dtype"].toScalarType());
    return {grad_x, grad_bias, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct DequantGemmGradInputFunction : public torch::autograd::Function<DequantGemmGradInputFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& grad_y, const Tensor& q,
                        const Tensor& scale, const OptTensor& zero, const OptTensor& codebook, int64_t bits,
                        int64_t group) {
    save_weight(ctx, q, scale, zero, codebook, bits, group);
    ctx->saved_data["grad_y_dtype"] = grad_y.scalar_type();
    at::AutoDispatchBelowADInplaceOrView guard;
    return grad_input_op().call(grad_y, q, scale, zero, codebook, bits, group);
  }

  // d(grad_y W)/d(grad_y) applied to grad_grad_x: grad_grad_x W^T, the forward GEMM
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    Tensor g;
    if (ctx->needs_input_grad(0) && grads[0].defined())
      g = gemm_op()
              .call(grads[0].contiguous(), saved[0], saved[1], opt(saved[2]), opt(saved[3]),
                    ctx->saved_data["bits"].toInt(), ctx->saved_data["group"].toInt(), std::nullopt)
              .to(ctx->saved_data["grad_y_dtype"].toScalarType());
    return {g, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// The Autograd kernels: record only where a gradient is wanted, else straight to the kernel.
Tensor dequant_gemm_autograd(const Tensor& x, const Tensor& q, const Tensor& scale, const OptTensor& zero,
                             const OptTensor& codebook, int64_t bits, int64_t group, const OptTensor& bias) {
  const bool record = at::GradMode::is_enabled();
  if (record) refuse_weight_grad(kOp, scale, zero, codebook);
  if (record && (x.requires_grad() || (bias.has_value() && bias->requires_grad())))
    return DequantGemmFunction::apply(x, bias, q, scale, zero, codebook, bits, group);
  at::AutoDispatchBelowADInplaceOrView guard;
  return gemm_op().call(x, q, scale, zero, codebook, bits, group, bias);
}

Tensor dequant_gemm_grad_input_autograd(const Tensor& grad_y, const Tensor& q, const Tensor& scale,
                                        const OptTensor& zero, const OptTensor& codebook, int64_t bits,
                                        int64_t group) {
  const bool record = at::GradMode::is_enabled();
  if (record) refuse_weight_grad("dequant_gemm_grad_input", scale, zero, codebook);
  if (record && grad_y.requires_grad())
    return DequantGemmGradInputFunction::apply(grad_y, q, scale, zero, codebook, bits, group);
  at::AutoDispatchBelowADInplaceOrView guard;
  return grad_input_op().call(grad_y, q, scale, zero, codebook, bits, group);
}

void register_impls(torch::Library& m) {
  m.impl("dequant_gemm", &dequant_gemm);
  m.impl("dequant_gemm_grad_input", &dequant_gemm_grad_input);
  m.impl("dequantize_weight", &dequantize_weight);
}
}  // namespace
}  // namespace fastloss

TORCH_LIBRARY_IMPL(fastloss, Autograd, m) {
  m.impl("dequant_gemm", &fastloss::dequant_gemm_autograd);
  m.impl("dequant_gemm_grad_input", &fastloss::dequant_gemm_grad_input_autograd);
}
TORCH_LIBRARY_IMPL(fastloss, CPU, m) { fastloss::register_impls(m); }
#if defined(FASTLOSS_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastloss, CUDA, m) { fastloss::register_impls(m); }
#endif
