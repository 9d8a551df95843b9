// Linear + cross-entropy by tiles of the vocabulary: a few hundred classes or more at a time, for
// every row or (when that would pass the tile's memory budget) for a thousand-odd rows at a
// time, so that the extra memory is one [rows, tile] tile (float32 on the CPU, the inputs' dtype
// on CUDA) instead of a block of whole rows of logits. Two ops, each one pass over the tiles (a
// GEMM per tile, then float32 math on it: torch operations on the CPU, one kernel on CUDA):
//
//   linear_ce_tile_stats -> [N, 3]: per row, the log-sum-exp of this weight's logits, the
//     target's logit when the target is one of this weight's classes (else 0), and the
//     class-weighted sum of the logits (label smoothing; 0 unless asked);
//   linear_ce_tile_grads: d(loss)/d(z_k) = a p_k - hit [k = y] - smooth w_k with p = exp(z - lse)
//     (a, hit, smooth per row from the caller in coef [N, 3]; the smooth term only when
//     `smoothing`; w_k = 1 without class weights), pushed through the GEMMs into grad_hidden
//     (float32), grad_weight and grad_bias. With filter_eps > 0 (Cut Cross-Entropy's gradient
//     filtering, opt-in), the classes of a tile whose every entry is at most filter_eps |a| of
//     its row are left out of both GEMMs (see kept_runs).
//
// `weight` may be a slice of a larger vocabulary (a rank's shard): class_offset is the global
// index of its first class, and class_weight holds that slice's weights. The caller (the
// Python side, python/fastloss/ops/vocab_parallel.py) merges statistics across slices or ranks
// and forms the coefficients. Softcap z = c tanh(x / c) is applied to the logits, and its
// derivative to the gradient. Tiles go classes outer, rows inner: each tile of grad_weight is
// finished (summed over the row blocks, in float32 for 16-bit weights) before the next.
// On CUDA the tile stays in the inputs' dtype as cuBLAS writes it and one kernel does each
// tile's row work (linear_ce_tiles_cuda.cu) in place of the float32 copy and torch passes;
// FASTLOSS_LINEAR_CE_STATS=fused takes the statistics from the tensor-core kernel instead
// (linear_ce_cuda.cu: no tile in memory, but its 64 x 64 mma tiles ran far below cuBLAS's
// rate: low_memory 0.30-0.32x eager on an H200 at f95b002 with it).
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_put.h>
#include <ATen/ops/logaddexp.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/outer.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#if defined(FASTLOSS_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif

#include "../op_helpers.h"
#include "linear_ce_kernels.h"
#include "linear_losses_op.h"

namespace fastloss {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

constexpr const char* kOp = "linear_cross_entropy (vocabulary tiles)";

struct TileInputs {
  Tensor hidden, weight, bias, target, class_weight;
  int64_t N = 0, D = 0, V = 0;
  int64_t tile = 0;  // classes per tile
  int64_t rows = 0;  // rows per tile (N unless the tile would pass its budget with every row)
};

// Narrowest default tile: GEMMs of [N, D] x [D, tile] ran slower below it on the CPU (2 cores,
// D = 256: 4096 x 128 tiles 161-175 GFLOP/s for the three GEMMs, 1024 x 512 tiles 204-219).
constexpr int64_t kMinTileCols = 512;

TileInputs check(const Tensor& hidden, const Tensor& weight, const OptT& bias,
                 const Tensor& target, const OptT& class_weight, int64_t tile_cols,
                 int64_t tile_rows) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && weight.size(1) == hidden.size(1), kOp,
              ": hidden must be [N, D] and weight [V, D], got ", hidden.sizes(), " and ",
              weight.sizes());
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, kOp,
              ": hidden must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt && (!bias.has_value() || bias->scalar_type() == dt), kOp,
              ": weight and bias must have hidden's dtype ", dt);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == hidden.size(0), kOp,
              ": target must be [", hidden.size(0), "], got ", target.sizes());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)), kOp,
              ": bias must be [", weight.size(0), "]");
  TORCH_CHECK(!class_weight.has_value() ||
                  (class_weight->dim() == 1 && class_weight->size(0) == weight.size(0)),
              kOp, ": class_weight must hold this weight's ", weight.size(0), " classes");
  for (const Tensor* t : {&weight, &target})
    TORCH_CHECK(t->device() == hidden.device(), kOp, ": every tensor must be on ",
                hidden.device(), ", got one on ", t->device());
  for (const OptT* t : {&bias, &class_weight})
    TORCH_CHECK(!t->has_value() || (*t)->device() == hidden.device(), kOp, ": every tensor must be on ",
                hidden.device(), ", got one on ", (*t)->device());
  TileInputs in;
  in.hidden = hidden;
  in.weight = weight;
  in.bias = bias.value_or(Tensor());
  in.target = target.to(at::kLong);
  if (class_weight.has_value()) in.class_weight = class_weight->to(at::kFloat).contiguous();
  in.N = hidden.size(0);
  in.D = hidden.size(1);
  in.V = weight.size(0);
  // Tile shape: a budget of 2 MiB (CPU) or 256 MiB (GPU) of logits. Classes: tile_cols,
  // or as many as fit the budget with every row but at least kMinTileCols; rows: tile_rows, or
  // as many as fit the budget at that width (every row while they fit). CPU: 8 MiB left the
  // low-memory path 16 MiB above the gradients at 4096 x 256 x 131072 (torch's chunked path:
  // 4 MiB); tiles of every row there were 128 classes wide, and their thin GEMMs the slowest
  // part (1024 x 512 tiles since). GPU: 2 MiB tiles were 64 classes wide at 8192 tokens, and
  // the thousands of thin GEMMs took 919 ms at 8192 x 4096 x 128256 on an H200 against eager's
  // 40 ms (e808290); 256 MiB (8192 classes, every row there) keeps the GEMMs wide.
  // (elements: float32 tiles on the CPU, the inputs' dtype on CUDA, where the tile stays as
  // cuBLAS writes it: 16-bit tiles twice as wide, half as many GEMMs)
  const int64_t budget = hidden.is_cuda() ? (int64_t(256) << 20) / int64_t(hidden.element_size())
                                          : (int64_t(2) << 20) / 4;
  const int64_t all = std::max<int64_t>(in.N, 1);
  in.tile = tile_cols > 0 ? tile_cols : std::max(budget / all, kMinTileCols);
  in.tile = std::max<int64_t>(1, std::min(in.V, in.tile));
  in.rows = tile_rows > 0 ? std::min(tile_rows, all) : std::clamp<int64_t>(budget / in.tile, 1, all);
  return in;
}

// The GEMM's output buffer for a float16/bfloat16 tile (none for float32: the GEMM writes the
// float32 buffer directly).
Tensor low_buffer(const TileInputs& in) {
  return in.hidden.scalar_type() == at::kFloat ? Tensor()
                                               : at::empty({in.rows * in.tile}, in.hidden.options());
}

// One tile: rows [r0, r0 + nr) by classes [c0, c0 + n).
struct Tile {
  int64_t r0, nr, c0, n;
};

// The tile's float32 logits after the soft cap, in `buf` (reused across tiles: no allocation
// per tile); `dz` receives d(capped)/d(raw) when capping.
Tensor tile_logits(const TileInputs& in, const Tile& t, double softcap, Tensor& buf,
                   Tensor& buf_low, Tensor* dz) {
  const Tensor h = in.hidden.narrow(0, t.r0, t.nr), w = in.weight.narrow(0, t.c0, t.n);
  const bool f32 = in.hidden.scalar_type() == at::kFloat;
  Tensor z = buf.narrow(0, 0, t.nr * t.n).view({t.nr, t.n});
  Tensor out = f32 ? z : buf_low.narrow(0, 0, t.nr * t.n).view({t.nr, t.n});
  if (in.bias.defined())
    at::addmm_out(out, in.bias.narrow(0, t.c0, t.n), h, w.t());
  else
    at::mm_out(out, h, w.t());
  if (!f32) z.copy_(out);
  if (softcap > 0) {
    z.div_(softcap).tanh_();
    if (dz != nullptr) *dz = z.mul(z).neg_().add_(1);
    z.mul_(softcap);
  }
  return z;
}

// Whether each of the tile's rows has its target among the tile's classes, and where.
std::pair<Tensor, Tensor> target_in_tile(const TileInputs& in, const Tile& t, int64_t class_offset) {
  const Tensor local = in.target.narrow(0, t.r0, t.nr).sub(class_offset + t.c0);
  return {local.ge(0).logical_and(local.lt(t.n)), local.clamp(0, t.n - 1).unsqueeze(1)};
}

// Each row's log-sum-exp of z [N, n], overwriting z with exp(z - row max): at::logsumexp
// forms z - max in a new [N, n] tensor, which doubled the extra memory of the statistics pass
// (the tile is the only logits-sized buffer here). Same arithmetic as at::logsumexp: an
// infinite row max counts as 0, so an all -inf row gives -inf and a +inf logit +inf; NaN
// propagates.
Tensor logsumexp_in_place(const Tensor& z) {
  Tensor m = z.amax(1, /*keepdim=*/true);
  m.masked_fill_(m.abs().eq(std::numeric_limits<double>::infinity()), 0.0);
  z.sub_(m).exp_();
  return z.sum(1).log_().add_(m.squeeze(1));
}

#if defined(FASTLOSS_WITH_CUDA)
// The tile's raw logits (bias included) in the inputs' dtype, by one GEMM into `buf`, described
// for the CUDA tile kernels (linear_ce_tiles_cuda.cu; `target`: the contiguous int64 targets).
LinearCeTile cuda_tile(const TileInputs& in, const Tile& t, const Tensor& target, int64_t class_offset,
                       double softcap, Tensor& buf) {
  const Tensor h = in.hidden.narrow(0, t.r0, t.nr), w = in.weight.narrow(0, t.c0, t.n);
  Tensor z = buf.narrow(0, 0, t.nr * t.n).view({t.nr, t.n});
  if (in.bias.defined())
    at::addmm_out(z, in.bias.narrow(0, t.c0, t.n), h, w.t());
  else
    at::mm_out(z, h, w.t());
  LinearCeTile lt;
  lt.z = z.data_ptr();
  lt.dtype = kernel_dtype(z, kOp, "logits");
  lt.rows = t.nr;
  lt.n = t.n;
  lt.ld = t.n;
  lt.target = target.data_ptr<int64_t>() + t.r0;
  lt.first_class = class_offset + t.c0;
  lt.class_weight = in.class_weight.defined() ? in.class_weight.data_ptr<float>() + t.c0 : nullptr;
  lt.softcap = float(softcap);
  return lt;
}
#endif

// FASTLOSS_LINEAR_CE_STATS=fused: the statistics from the tensor-core kernel below (read per
// call, so that a benchmark can time both in one run).
bool fused_stats_asked() {
  const char* v = std::getenv("FASTLOSS_LINEAR_CE_STATS");
  return v != nullptr && std::strcmp(v, "fused") == 0;
}

// The statistics by the tensor-core kernel (linear_ce_cuda.cu: no logits tile in memory at all)
// where it applies: CUDA, float16 / bfloat16, D % 8 == 0, rows 16-byte aligned, sm_80+ code,
// and no tile width asked for. Only when FASTLOSS_LINEAR_CE_STATS=fused (see the top).
bool fused_stats(const TileInputs& in, int64_t class_offset, double softcap, bool weighted_sum,
                 Tensor& out) {
#if defined(FASTLOSS_WITH_CUDA)
  const auto dt = in.hidden.scalar_type();
  if (!in.hidden.is_cuda() || (dt != at::kHalf && dt != at::kBFloat16) || in.D % 8 != 0) return false;
  const Tensor h = in.hidden.contiguous(), w = in.weight.contiguous();
  const Tensor b = in.bias.defined() ? in.bias.contiguous() : Tensor();
  for (const Tensor* t : {&h, &w})
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  const c10::cuda::CUDAGuard guard(h.device());
  if (!linear_ce_stats_available()) return false;
  const Tensor y = in.target.contiguous();
  LinearCeStatsArgs a;
  a.hidden = h.data_ptr();
  a.weight = w.data_ptr();
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.dtype = dt == at::kHalf ? ScalarType::f16 : ScalarType::bf16;
  a.N = in.N;
  a.D = in.D;
  a.V = in.V;
  a.target = y.data_ptr<int64_t>();
  a.class_offset = class_offset;
  a.class_weight = in.class_weight.defined() ? in.class_weight.data_ptr<float>() : nullptr;
  a.softcap = float(softcap);
  a.weighted_sum = weighted_sum;
  const int splits = linear_ce_stats_splits(in.N, in.V);
  Tensor partial = at::empty({int64_t(splits) * in.N * 4}, h.options().dtype(at::kFloat));
  check_cuda_launch(linear_ce_stats_cuda(a, partial.data_ptr<float>(), splits, out.data_ptr<float>(),
                                         cuda_stream()),
                    kOp);
  return true;
#else
  (void)in, (void)class_offset, (void)softcap, (void)weighted_sum, (void)out;
  return false;
#endif
}

Tensor linear_ce_tile_stats(const Tensor& hidden, const Tensor& weight, const OptT& bias,
                            const Tensor& target, const OptT& class_weight, int64_t class_offset,
                            double softcap, bool weighted_sum, int64_t tile_cols,
                            int64_t tile_rows) {
  const TileInputs in = check(hidden, weight, bias, target, class_weight, tile_cols, tile_rows);
  const auto f32 = hidden.options().dtype(at::kFloat);
  Tensor out = at::zeros({in.N, 3}, f32);
  if (in.N == 0) return out;
  if (in.V == 0) {  // no classes here (an empty shard): log of an empty sum, for the merge
    out.select(1, 0).fill_(-std::numeric_limits<double>::infinity());
    return out;
  }
  // the tensor-core kernel when asked, unless tiles were asked for (a tile shape keeps the tiles)
  if (fused_stats_asked() && tile_cols <= 0 && tile_rows <= 0 &&
      fused_stats(in, class_offset, softcap, weighted_sum, out))
    return out;
#if defined(FASTLOSS_WITH_CUDA)
  if (in.hidden.is_cuda()) {  // tiles in the inputs' dtype, one kernel pass each
    const c10::cuda::CUDAGuard guard(in.hidden.device());
    const Tensor targets = in.target.contiguous();
    Tensor buf = at::empty({in.rows * in.tile}, in.hidden.options());
    for (int64_t c0 = 0; c0 < in.V; c0 += in.tile)
      for (int64_t r0 = 0; r0 < in.N; r0 += in.rows) {
        const Tile t{r0, std::min(in.rows, in.N - r0), c0, std::min(in.tile, in.V - c0)};
        const LinearCeTile lt = cuda_tile(in, t, targets, class_offset, softcap, buf);
        check_cuda_launch(linear_ce_tile_stats_cuda(lt, c0 == 0, weighted_sum, out.data_ptr<float>() + r0 * 3,
                                                    cuda_stream()),
                          kOp);
      }
    return out;
  }
#endif
  // Classes outer, rows inner: a tile of the weight is read from memory once.
  Tensor buf = at::empty({in.rows * in.tile}, f32), buf_low = low_buffer(in);
  for (int64_t c0 = 0; c0 < in.V; c0 += in.tile) {
    for (int64_t r0 = 0; r0 < in.N; r0 += in.rows) {
      const Tile t{r0, std::min(in.rows, in.N - r0), c0, std::min(in.tile, in.V - c0)};
      const Tensor z = tile_logits(in, t, softcap, buf, buf_low, nullptr);
      const Tensor o = out.narrow(0, t.r0, t.nr);
      Tensor lse = o.select(1, 0), z_y = o.select(1, 1), sum_wz = o.select(1, 2);
      const auto [mine, where_y] = target_in_tile(in, t, class_offset);
      z_y.add_(at::where(mine, z.gather(1, where_y).squeeze(1), 0.0));
      if (weighted_sum)
        sum_wz.add_(in.class_weight.defined() ? at::mv(z, in.class_weight.narrow(0, c0, t.n))
                                              : z.sum(1));
      const Tensor tile_lse = logsumexp_in_place(z);  // the logits are used up: last
      if (c0 == 0)
        lse.copy_(tile_lse);
      else
        lse.copy_(at::logaddexp(lse, tile_lse));
    }
  }
  return out;
}

// A tile's gradient d(loss)/d(z_k) = (a p_k - hit [k = y] - smooth w_k) * d cap: float32 torch
// operations (the CPU).
Tensor tile_grad(const TileInputs& in, const Tile& t, int64_t class_offset, double softcap, const Tensor& lse,
                 const Tensor& a, const Tensor& hit, const Tensor& smooth, bool smoothing, Tensor& buf,
                 Tensor& buf_low) {
  Tensor dz;
  Tensor g = tile_logits(in, t, softcap, buf, buf_low, softcap > 0 ? &dz : nullptr);
  g.sub_(lse.narrow(0, t.r0, t.nr)).exp_().mul_(a.narrow(0, t.r0, t.nr));  // a p_k
  const auto [mine, where_y] = target_in_tile(in, t, class_offset);
  g.scatter_add_(1, where_y, at::where(mine, -hit.narrow(0, t.r0, t.nr), 0.0).unsqueeze(1));
  if (smoothing) {
    const Tensor s = smooth.narrow(0, t.r0, t.nr);
    if (in.class_weight.defined())
      g.sub_(at::outer(s, in.class_weight.narrow(0, t.c0, t.n)));
    else
      g.sub_(s.unsqueeze(1));
  }
  if (dz.defined()) g.mul_(dz);
  return g;
}

// The same on CUDA: one kernel over the GEMM's output (the inputs' dtype), in place.
Tensor device_tile_grad(const TileInputs& in, const Tile& t, const Tensor& target, int64_t class_offset,
                        double softcap, const Tensor& lse, const Tensor& coef, bool smoothing, Tensor& buf) {
#if defined(FASTLOSS_WITH_CUDA)
  const c10::cuda::CUDAGuard guard(in.hidden.device());
  const LinearCeTile lt = cuda_tile(in, t, target, class_offset, softcap, buf);
  check_cuda_launch(linear_ce_tile_grad_cuda(lt, lse.data_ptr<float>() + t.r0, coef.data_ptr<float>() + t.r0 * 3,
                                             smoothing, cuda_stream()),
                    kOp);
  return buf.narrow(0, 0, t.nr * t.n).view({t.nr, t.n});
#else
  (void)in, (void)t, (void)target, (void)class_offset, (void)softcap, (void)lse, (void)coef, (void)smoothing,
      (void)buf;
  TORCH_CHECK(false, kOp, ": fastloss was built without CUDA");
#endif
}

// ---- gradient filtering (filter_eps > 0: Cut Cross-Entropy's, opt-in) ------------------------
// A tile's gradient without its targets' entries goes into the GEMMs by chunks of classes; a
// chunk whose every entry is at most filter_eps |a| of its row (|a|: the row's softmax
// coefficient; for plain cross-entropy: every probability <= filter_eps) would add at most that
// to grad_hidden and grad_weight, and is left out of both.
// The targets' entries, one per row, are added apart (take_targets, add_targets), so that a
// chunk holding some row's target can still be left out: with a peaked softmax the target's
// entry is the large one.

// Classes per filtering chunk: the GEMMs of a run stay wide enough for the BLAS (CPU tiles are
// 512+ classes, CUDA ones thousands).
constexpr int64_t kFilterChunkCpu = 128, kFilterChunkCuda = 256;

// The runs [k0, k1) of consecutive kept columns of g [rows, n] (one run [0, n) when no chunk is
// left out: the GEMMs are then those of the unfiltered path). eps_a: [rows] float32 thresholds.
// A NaN keeps its chunk. CPU: one pass (linear_ce_filter_cpu.cpp); CUDA: torch reductions to
// [rows, chunks] maxima (no tile-sized temporary), copied to the host (a wait per tile, beside
// rows_with_target's; a tile's GEMMs take milliseconds; no CUDA graph can capture either).
// FASTLOSS_LINEAR_CE_FILTER=reductions takes the CUDA branch's torch reductions on the CPU too
// (read per call): the tests run that branch's arithmetic where no GPU is at hand.
bool filter_by_reductions() {
  const char* v = std::getenv("FASTLOSS_LINEAR_CE_FILTER");
  return v != nullptr && std::strcmp(v, "reductions") == 0;
}

std::vector<std::pair<int64_t, int64_t>> kept_runs(const Tensor& g, const Tensor& eps_a, int64_t chunk) {
  const int64_t rows = g.size(0), n = g.size(1), chunks = (n + chunk - 1) / chunk;
  Tensor keep;
  if (g.is_cpu() && !filter_by_reductions()) {
    TORCH_CHECK(g.scalar_type() == at::kFloat && g.stride(1) == 1 && eps_a.is_contiguous(), kOp,
                ": filtering expects a float32 tile with contiguous rows");
    keep = at::empty({chunks}, g.options().dtype(at::kByte));
    linear_ce_chunks_kept(g.data_ptr<float>(), rows, n, g.stride(0), eps_a.data_ptr<float>(), chunk,
                          keep.data_ptr<uint8_t>());
  } else {
    const int64_t full = n / chunk;
    std::vector<Tensor> most;  // max |g| per row and chunk
    const auto max_abs = [](const Tensor& x, int64_t dim) {
      const auto [lo, hi] = at::aminmax(x, dim);
      return at::maximum(hi, lo.neg()).to(at::kFloat);
    };
    if (full > 0) most.push_back(max_abs(g.narrow(1, 0, full * chunk).unflatten(1, {full, chunk}), 2));
    if (n > full * chunk) most.push_back(max_abs(g.narrow(1, full * chunk, n - full * chunk), 1).view({rows, 1}));
    keep = at::cat(most, 1).le(eps_a.unsqueeze(1)).logical_not_().any(0).to(at::kByte).cpu();
  }
  const uint8_t* k = keep.data_ptr<uint8_t>();
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t c = 0; c < chunks; ++c) {
    if (!k[c]) continue;
    const int64_t k0 = c * chunk, k1 = std::min(n, k0 + chunk);
    if (!runs.empty() && runs.back().second == k0)
      runs.back().second = k1;
    else
      runs.emplace_back(k0, k1);
  }
  return runs;
}

// The tile's rows whose target is one of its classes: their indices in the tile and their
// targets' columns (int64 [m] each; on CUDA the count waits for the device, as kept_runs does).
std::pair<Tensor, Tensor> rows_with_target(const TileInputs& in, const Tile& t, int64_t class_offset) {
  const auto [mine, where_y] = target_in_tile(in, t, class_offset);
  const Tensor rows = mine.nonzero().squeeze(1);
  return {rows, where_y.squeeze(1).index_select(0, rows)};
}

// The targets' entries e (float32 [m]) of the tile's gradient, taken out of it (set to 0) to be
// added apart: grad_hidden[r] += e_r w_y and grad_weight[y] += e_r h_r (gw: the tile's float32
// grad_weight rows; gh_rows undefined when grad_hidden is not wanted). e is read from the tile
// itself: on CUDA the unfiltered path's entry exactly; on the CPU its float32 value (the
// unfiltered path rounds it to 16 bits for the GEMM). On CUDA index_add_ sums repeated targets
// with atomics (run to run order; torch's deterministic mode takes its deterministic version).
Tensor take_targets(Tensor& g, const Tensor& rows, const Tensor& cols) {
  const c10::List<std::optional<Tensor>> at_targets{rows, cols};
  const Tensor e = g.index(at_targets).to(at::kFloat);
  g.index_put_(at_targets, at::zeros({}, g.options()));
  return e;
}
void add_targets(const TileInputs& in, const Tile& t, const Tensor& rows, const Tensor& cols, const Tensor& e,
                 const std::array<bool, 3>& mask, Tensor gh_rows, Tensor gw) {
  if (rows.numel() == 0) return;
  const Tensor c = e.unsqueeze(1);
  if (mask[0])
    gh_rows.index_add_(0, rows, in.weight.narrow(0, t.c0, t.n).index_select(0, cols).to(at::kFloat).mul_(c));
  if (mask[1])
    gw.index_add_(0, cols, in.hidden.narrow(0, t.r0, t.nr).index_select(0, rows).to(at::kFloat).mul_(c));
}

std::tuple<Tensor, Tensor, Tensor> linear_ce_tile_grads(
    const Tensor& hidden, const Tensor& weight, const OptT& bias, const Tensor& target,
    const OptT& class_weight, int64_t class_offset, double softcap, const Tensor& lse_in,
    const Tensor& coef_in, bool smoothing, std::array<bool, 3> mask, int64_t tile_cols,
    int64_t tile_rows, double filter_eps) {
  const TileInputs in = check(hidden, weight, bias, target, class_weight, tile_cols, tile_rows);
  TORCH_CHECK(lse_in.dim() == 1 && lse_in.size(0) == in.N && coef_in.dim() == 2 &&
                  coef_in.size(0) == in.N && coef_in.size(1) == 3,
              kOp, ": lse must be [N] and coef [N, 3]");
  TORCH_CHECK(filter_eps >= 0 && std::isfinite(filter_eps), kOp, ": filter_eps must be a finite number >= 0, got ",
              filter_eps);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const bool low = hidden.scalar_type() != at::kFloat;
  if (!in.bias.defined()) mask[2] = false;
  Tensor gh = mask[0] ? at::zeros({in.N, in.D}, f32) : at::empty({0}, f32);
  Tensor gw = mask[1] ? at::empty({in.V, in.D}, weight.options()) : at::empty({0}, weight.options());
  Tensor gb = mask[2] ? at::empty({in.V}, f32) : at::empty({0}, f32);
  if (in.N == 0 || !(mask[0] || mask[1] || mask[2])) {
    if (mask[1]) gw.zero_();
    if (mask[2]) gb.zero_();
    return {gh, gw, gb.to(in.bias.defined() ? in.bias.scalar_type() : at::kFloat)};
  }
  const Tensor lse = lse_in.to(at::kFloat).contiguous().unsqueeze(1);
  const Tensor coef = coef_in.to(at::kFloat).contiguous();
  // CUDA: the kernel writes each tile's gradient over the GEMM's output, in the inputs' dtype
  const bool cuda = in.hidden.is_cuda();
  const Tensor targets = cuda ? in.target.contiguous() : Tensor();
  const Tensor a = coef.select(1, 0).unsqueeze(1), hit = coef.select(1, 1),
               smooth = coef.select(1, 2);
  // filtering: each row's threshold filter_eps |a| (see kept_runs)
  const bool filter = filter_eps > 0 && (mask[0] || mask[1]);
  const Tensor eps_a = filter ? a.squeeze(1).abs().mul(filter_eps).contiguous() : Tensor();
  const int64_t chunk = cuda ? kFilterChunkCuda : kFilterChunkCpu;
  // A float16 / bfloat16 grad_weight tile summed over more than one block of rows (or given
  // the targets' terms apart) is summed in float32 here (one [tile, D] buffer), then rounded once.
  const bool blocks = in.rows < in.N;
  Tensor gw_acc = mask[1] && low && (blocks || filter) ? at::empty({in.tile, in.D}, f32) : Tensor();
  // (CUDA: one tile in the inputs' dtype; the CPU: the float32 tile and, for 16-bit inputs, the
  // GEMM's own output)
  Tensor buf = cuda ? Tensor() : at::empty({in.rows * in.tile}, f32),
         buf_low = cuda ? at::empty({in.rows * in.tile}, in.hidden.options()) : low_buffer(in);
  for (int64_t c0 = 0; c0 < in.V; c0 += in.tile) {  // classes outer: each grad_weight tile
    const int64_t n = std::min(in.tile, in.V - c0);   // is finished before the next
    const Tensor w = in.weight.narrow(0, c0, n);
    Tensor gw_tile = mask[1] ? gw.narrow(0, c0, n) : Tensor();
    Tensor gw_sum = gw_acc.defined() ? gw_acc.narrow(0, 0, n) : gw_tile;
    for (int64_t r0 = 0; r0 < in.N; r0 += in.rows) {
      const Tile t{r0, std::min(in.rows, in.N - r0), c0, n};
      const bool first = r0 == 0;
      // the tile's gradient: float32 g (CPU) or the inputs' dtype (CUDA); g_low in the inputs' dtype
      Tensor g = cuda ? device_tile_grad(in, t, targets, class_offset, softcap, lse, coef, smoothing, buf_low)
                      : tile_grad(in, t, class_offset, softcap, lse, a, hit, smooth, smoothing, buf, buf_low);
      if (mask[2]) {  // (before filtering takes the targets' entries out: grad_bias is exact)
        Tensor gb_tile = gb.narrow(0, c0, n);
        const Tensor col = g.sum(0, /*keepdim=*/false, at::kFloat);
        if (first) gb_tile.copy_(col); else gb_tile.add_(col);
      }
      Tensor target_rows, target_cols, target_grad;  // (filtering: the targets' entries, apart)
      if (filter) {
        std::tie(target_rows, target_cols) = rows_with_target(in, t, class_offset);
        target_grad = take_targets(g, target_rows, target_cols);
      }
      const Tensor h = in.hidden.narrow(0, r0, t.nr);
      const Tensor g_low = low ? g.to(hidden.scalar_type()) : g;  // (CUDA: g itself)
      // classes [k0, k1) of the tile into both GEMMs; add_w: grad_weight's rows already hold a
      // sum (else the GEMM writes them)
      const auto push = [&](int64_t k0, int64_t k1, bool add_w) {
        const int64_t nk = k1 - k0;
        const Tensor gk = g.narrow(1, k0, nk), gk_low = g_low.narrow(1, k0, nk), wk = w.narrow(0, k0, nk);
        // 16-bit products go into the float32 sums by one GEMM with a float32 epilogue on CUDA
        // (no rounding of each tile's product to 16 bits, no temporary), else formed and added
        if (mask[0]) {
          Tensor gh_rows = gh.narrow(0, r0, t.nr);
          if (!low)
            gh_rows.addmm_(gk, wk);
          else if (!add_product_in_float32(gh_rows, gk_low, wk, /*add=*/true))
            gh_rows.add_(at::mm(gk_low, wk));
        }
        if (mask[1]) {
          Tensor gw_rows = gw_sum.narrow(0, k0, nk);
          if (gw_acc.defined()) {  // 16-bit weights, several blocks or filtering: the float32 sum
            if (!add_product_in_float32(gw_rows, gk_low.t(), h, /*add=*/add_w)) {
              const Tensor part = at::mm(gk_low.t(), h);
              if (add_w) gw_rows.add_(part); else gw_rows.copy_(part);
            }
          } else if (!add_w) {
            at::mm_out(gw_rows, gk_low.t(), h);
          } else {
            gw_rows.addmm_(gk.t(), h);  // (float32 here)
          }
        }
      };
      if (!filter) {
        push(0, n, !first);
      } else {
        if (first && mask[1]) gw_sum.zero_();  // (a chunk left out of every block stays 0)
        for (const auto& [k0, k1] : kept_runs(g, eps_a.narrow(0, r0, t.nr), chunk)) push(k0, k1, true);
        add_targets(in, t, target_rows, target_cols, target_grad, mask, mask[0] ? gh.narrow(0, r0, t.nr) : Tensor(),
                    gw_sum);
      }
    }
    if (gw_acc.defined()) gw_tile.copy_(gw_sum);
  }
  return {gh, gw, gb.to(in.bias.defined() ? in.bias.scalar_type() : at::kFloat)};
}

}  // namespace
}  // namespace fastloss

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("linear_ce_tile_stats", &fastloss::linear_ce_tile_stats);
  m.impl("linear_ce_tile_grads", &fastloss::linear_ce_tile_grads);
}
#if defined(FASTLOSS_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastloss, CUDA, m) {
  m.impl("linear_ce_tile_stats", &fastloss::linear_ce_tile_stats);
  m.impl("linear_ce_tile_grads", &fastloss::linear_ce_tile_grads);
}
#endif
