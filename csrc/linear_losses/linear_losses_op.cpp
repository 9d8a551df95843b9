// Linear layer + row loss, fused by blocks of tokens, on any device torch has GEMMs for.
//
// logits = hidden @ weight^T + bias is formed for one block of rows at a time, into one
// reused [rows, V] buffer; the row-loss ops of losses_op.cpp (the same kernels and math as
// fastloss.ops.cross_entropy and its siblings) turn the block into its row losses and, in
// place, into d(loss)/d(logits); two GEMMs then fold that block gradient into grad_hidden and
// grad_weight. Extra memory: the block, plus float32 accumulators for grad_weight and
// grad_bias; never [N, V]. With reduction mean/sum and gradients wanted, the forward computes
// the gradients right away (the incoming gradient is then one scalar, applied in backward):
// three GEMMs in all, the flops of the unfused graph. With reduction="none" the backward
// forms each block again (four GEMMs).
//
// Schemas in registration.cpp; fake kernels in python/fastloss/ops/linear_losses.py.
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "linear_losses/linear_losses_op.h"
#include "losses/losses_op.h"

namespace fastloss {

// acc += a @ b (acc = a @ b when !add: acc is not read, it may hold garbage) for float16 /
// bfloat16 a, b and a float32 acc, by one GEMM that adds its float32 product to acc in its
// epilogue (cuBLAS through addmm's out_dtype overload, CUDA only), where
// torch has it; false where it does not (then the caller forms the product in a's dtype a
// slice at a time and adds it). Against the slices this saves a rounding of each block's
// product to 16 bits, a write and a read of each slice, and a hundred-odd narrow GEMMs per
// block at LLM sizes (a 4096-column weight gives 1024-class slices). Whether torch accepts a
// float32 `self` with 16-bit matrices (newer versions do) is learnt from the first call's
// error about dtypes. Any other refusal (e.g. float16 under
// torch.backends.cuda.matmul.allow_fp16_accumulation, which this GEMM cannot honour) falls
// back for that call only, not cached (bfloat16 may still take it); torch raises before it
// writes acc, and a real error (shapes) raises again in the caller's own GEMM.
bool add_product_in_float32(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b, bool add) {
  static std::atomic<int> supported{-1};  // -1: not known yet
  if (!acc.is_cuda() || supported.load(std::memory_order_relaxed) == 0) return false;
  try {
    at::addmm_out(acc, acc, a, b, at::kFloat, /*beta=*/add ? 1 : 0);  // (beta 0: acc not read)
  } catch (const c10::OutOfMemoryError&) {
    throw;
  } catch (const c10::Error& e) {
    if (std::string(e.what_without_backtrace()).find("dtype") != std::string::npos)
      supported.store(0, std::memory_order_relaxed);
    return false;
  }
  supported.store(1, std::memory_order_relaxed);
  return true;
}

namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;
using GradMask = std::array<bool, 3>;  // grad_hidden, grad_weight, grad_bias

struct LinearInputs {
  Tensor hidden, weight, target, bias, class_weight;
  int64_t N = 0, D = 0, V = 0;
};

// The user-facing op of each loss kind (errors name it): linear_cross_entropy, ...
const char* linear_name(LossKind kind) {
  switch (kind) {
    case LossKind::comp_sum: return "linear_comp_sum_loss";
    case LossKind::ldr: return "linear_ldr_loss";
    case LossKind::spherical_z: return "linear_spherical_z_loss";
    case LossKind::stablemax: return "linear_stablemax_cross_entropy";
    case LossKind::cross_entropy: break;
  }
  return "linear_cross_entropy";
}

bool is_float_dtype(const Tensor& t) {
  const auto d = t.scalar_type();
  return d == at::kFloat || d == at::kHalf || d == at::kBFloat16;
}

LinearInputs check_inputs(const char* op, const Tensor& hidden, const Tensor& weight,
                          const Tensor& target, const OptT& bias, const OptT& class_weight,
                          int64_t ignore_index) {
  TORCH_CHECK_VALUE(hidden.dim() == 2, op, ": hidden must be 2-D [N, D], got shape ", hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [V, D] (as nn.Linear stores it), got shape ",
              weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), op, ": hidden has D = ", hidden.size(1),
              " features but weight has ", weight.size(1), " columns (weight must be [V, D])");
  TORCH_CHECK_VALUE(weight.size(0) > 0, op, ": weight must have at least one row (class)");
  TORCH_CHECK_VALUE(is_float_dtype(hidden), op, ": hidden must be float32, float16 or bfloat16, got ",
              hidden.scalar_type());
  TORCH_CHECK_VALUE(weight.scalar_type() == hidden.scalar_type(), op, ": weight is ",
              weight.scalar_type(), " but hidden is ", hidden.scalar_type(),
              " (cast one, or use torch.autocast)");
  TORCH_CHECK_VALUE(weight.device() == hidden.device(), op, ": weight is on ", weight.device(),
              " but hidden is on ", hidden.device());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == hidden.size(0), op,
              ": target must be 1-D with one entry per row of hidden (", hidden.size(0),
              "), got shape ", target.sizes());
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt ||
                        target.scalar_type() == at::kByte,
                    op, ": target must hold class indices (int64, int32 or uint8), got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == hidden.device(), op, ": target is on ", target.device(),
              " but hidden is on ", hidden.device());
  LinearInputs in;
  in.N = hidden.size(0);
  in.D = hidden.size(1);
  in.V = weight.size(0);
  in.hidden = hidden;
  in.weight = weight;
  in.target = target.to(at::kLong).contiguous();
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == in.V, op,
                ": bias must be 1-D with one entry per row of weight (", in.V, "), got shape ",
                bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == hidden.scalar_type(), op, ": bias is ",
                bias->scalar_type(), " but hidden is ", hidden.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == hidden.device(), op, ": bias is on ", bias->device(),
                " but hidden is on ", hidden.device());
    in.bias = *bias;
  }
  if (class_weight.has_value() && class_weight->defined()) {
    const Tensor& w = *class_weight;
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == in.V, op,
                ": class_weight must be 1-D with one entry per class (", in.V, "), got shape ",
                w.sizes());
    TORCH_CHECK_VALUE(w.is_floating_point(), op, ": class_weight must be floating point, got ",
                w.scalar_type());
    TORCH_CHECK_VALUE(w.device() == hidden.device(), op, ": class_weight is on ", w.device(),
                " but hidden is on ", hidden.device());
    in.class_weight = w.to(at::kFloat).contiguous();
  }
  // The row ops check targets block by block; checking them here once names the right row.
  // (On CUDA that would need a host synchronisation: there a bad target gives NaN, as the
  // row losses do.)
  if (in.target.is_cpu()) {
    const int64_t* t = in.target.data_ptr<int64_t>();
    for (int64_t r = 0; r < in.N; ++r)
      TORCH_CHECK_VALUE(t[r] == ignore_index || (t[r] >= 0 && t[r] < in.V), op, ": target[", r,
                  "] = ", t[r], " is not a class index in [0, ", in.V, ") nor ignore_index (",
                  ignore_index, ")");
  }
  return in;
}

// Rows per block: the requested count, or as many as fit a budget of logits bytes equal to
// one float32 grad_weight (which the caller holds anyway), clamped to [16, 256] MiB; at least
// one row. Taller blocks run the GEMMs faster (measured on 2 cores at D = 256, V = 131072:
// 128 rows 6.5-7.1 s, 256 rows 6.0-6.8 s, 512 rows 5.6-5.8 s per forward + backward), and the
// budget keeps the extra memory within about twice the gradient itself.
// On CUDA the cap is 1 GiB, but at most half the rows (a block is never the whole logits
// unless those fit 256 MiB): each block's grad_weight GEMM reads and writes the float32
// accumulator (8 V D bytes) for 2 V D rows flops per row of the block, so at an H200's
// ~160 flops per byte of bandwidth blocks of R rows spend ~640 / R of that GEMM's time on the
// accumulator. By that estimate, about the gaps to eager measured on an H200 at f95b002
// (256 MiB blocks): 8192 x 4096 x 128256 bf16 (1046-row blocks) 47.8 ms vs 41.8,
// 16384 x 2048 x 262144 (512 rows, 32 blocks) 116 ms vs 93. 1 GiB gives 4096 and 2048 rows
// there (2 and 8 blocks). (Not yet measured on a GPU.)
int64_t rows_per_block(int64_t requested, const LinearInputs& in) {
  const int64_t all = std::max<int64_t>(in.N, 1);
  if (requested > 0) return std::min(requested, all);
  const int64_t row_bytes = in.V * int64_t(in.hidden.element_size());
  const auto fit = [&](int64_t cap) {
    return std::clamp<int64_t>(std::clamp<int64_t>(in.V * in.D * 4, int64_t(16) << 20, cap) / row_bytes, 1, all);
  };
  const int64_t rows = fit(int64_t(256) << 20);
  if (!in.hidden.is_cuda()) return rows;
  return std::max(rows, std::min(fit(int64_t(1) << 30), (all + 1) / 2));
}

std::vector<c10::IValue> row_args(std::vector<c10::IValue> head, const LossParams& p) {
  head.emplace_back(p.ignore_index);
  for (auto& v : scalar_args(p)) head.push_back(std::move(v));
  return head;
}

struct Accumulators {
  Tensor hidden;  // [N, D], hidden's dtype (each block's rows written once)
  Tensor weight;  // [V, D] float32
  Tensor bias;    // [V] float32
};

Accumulators make_accumulators(const LinearInputs& in, const GradMask& mask) {
  const auto f32 = in.hidden.options().dtype(at::kFloat);
  Accumulators acc;
  acc.hidden = at::empty({mask[0] ? in.N : 0, in.D}, in.hidden.options());
  // (grad_weight: the first block's GEMM writes it without reading; zeros only when no block runs)
  acc.weight = !mask[1] ? at::empty({0}, f32) : in.N > 0 ? at::empty({in.V, in.D}, f32) : at::zeros({in.V, in.D}, f32);
  acc.bias = mask[2] ? at::zeros({in.V}, f32) : at::empty({0}, f32);
  return acc;
}

// One pass over the blocks of rows. Forward (`rows_out` given): each block's row losses and
// statistics go to rows_out/stats_out. Backward (`stats_in` given): the forward's statistics
// are read instead. When `mask` asks for any gradient, d(total)/d(row loss) = grad_rows (or 1
// for every row when undefined) is pushed through the block into `acc`.
void run_blocks(const LinearInputs& in, const LossParams& p, int64_t block,
                std::array<Tensor, 3>* rows_out, const std::array<Tensor, 2>* stats_in,
                const Tensor& grad_rows, const GradMask& mask, Accumulators& acc) {
  const bool want_grad = mask[0] || mask[1] || mask[2];
  const bool f32 = in.hidden.scalar_type() == at::kFloat;
  const Tensor w_t = in.weight.t();
  const OptT cw = in.class_weight.defined() ? OptT(in.class_weight) : std::nullopt;
  Tensor buffer = at::empty({std::min(block, in.N), in.V}, in.hidden.options());
  // classes per slice of a reduced-precision grad_weight product: about 8 MiB of buffer
  const int64_t slice = std::clamp<int64_t>((int64_t(8) << 20) / std::max<int64_t>(2 * in.D, 1),
                                            256, std::max<int64_t>(in.V, 1));
  Tensor part_buffer;  // made when first needed (not when the GEMM adds in float32 itself)
  const Tensor ones = want_grad && !grad_rows.defined()
                          ? at::ones({block}, in.hidden.options().dtype(at::kFloat))
                          : Tensor();
  for (int64_t n0 = 0; n0 < in.N; n0 += block) {
    const int64_t nb = std::min(block, in.N - n0);
    const bool first = n0 == 0;  // (the first block writes grad_weight, the others add to it)
    const Tensor h = in.hidden.narrow(0, n0, nb), t = in.target.narrow(0, n0, nb);
    Tensor z = buffer.narrow(0, 0, nb);  // leading rows of a contiguous buffer: contiguous
    if (in.bias.defined())
      at::addmm_out(z, in.bias, h, w_t);
    else
      at::mm_out(z, h, w_t);

    Tensor s0, s1;
    if (rows_out != nullptr) {
      auto args = row_args({z, t, cw}, p);
      args.emplace_back(false);  // inplace_backward (read only by the row losses' autograd)
      const auto out = call_below_autograd(row_op(p.kind, kForwardOp), std::move(args));
      for (int k = 0; k < 3; ++k) (*rows_out)[k].narrow(0, n0, nb).copy_(out[k].toTensor());
      s0 = out[1].toTensor();
      s1 = out[2].toTensor();
    } else {
      s0 = (*stats_in)[0].narrow(0, n0, nb);
      s1 = (*stats_in)[1].narrow(0, n0, nb);
    }
    if (!want_grad) continue;

    const Tensor g = grad_rows.defined() ? grad_rows.narrow(0, n0, nb) : ones.narrow(0, 0, nb);
    call_below_autograd(row_op(p.kind, kBackwardInplaceOp), row_args({g, z, t, cw, s0, s1}, p));  // z := dL/dz
    if (mask[0]) {
      Tensor gh = acc.hidden.narrow(0, n0, nb);
      at::mm_out(gh, z, in.weight);
    }
    if (mask[1]) {
      // float32 accumulation across blocks (a large vocabulary's grad_weight sums many
      // blocks). A reduced-precision block's product goes into it by one GEMM where torch can
      // (CUDA), else it is formed by the GEMM of its own dtype (float32 accumulation inside,
      // one rounding) a slice of classes at a time into a small buffer, then added: widening
      // the block to float32 instead cost 2x its memory and ran the slower float32 GEMM.
      if (f32 && first) {
        at::mm_out(acc.weight, z.t(), h);
      } else if (f32) {
        acc.weight.addmm_(z.t(), h);
      } else if (!add_product_in_float32(acc.weight, z.t(), h, !first)) {
        if (!part_buffer.defined()) part_buffer = at::empty({slice, in.D}, in.hidden.options());
        for (int64_t v0 = 0; v0 < in.V; v0 += slice) {
          const int64_t nv = std::min(slice, in.V - v0);
          Tensor part = part_buffer.narrow(0, 0, nv);
          at::mm_out(part, z.narrow(1, v0, nv).t(), h);
          if (first)
            acc.weight.narrow(0, v0, nv).copy_(part);
          else
            acc.weight.narrow(0, v0, nv).add_(part);
        }
      }
    }
    if (mask[2]) acc.bias.add_(z.sum(0, /*keepdim=*/false, at::kFloat));
  }
}

// ---- the ops ---------------------------------------------------------------------------------

// -> (row_loss, stat0, stat1, grad_hidden, grad_weight, grad_bias). The gradients are those of
// sum(row_loss) (float32 for weight and bias), or empty where grad_mask says no.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_loss_forward(
    const Tensor& hidden, const Tensor& weight, const Tensor& target, const OptT& bias,
    const OptT& class_weight, int64_t kind, c10::ArrayRef<double> scalars, int64_t ignore_index,
    GradMask grad_mask, int64_t block_rows) {
  const LossParams p = loss_params(LossKind(kind), ignore_index, scalars);
  const LinearInputs in = check_inputs(linear_name(p.kind), hidden, weight, target, bias,
                                       class_weight, ignore_index);
  if (!in.bias.defined()) grad_mask[2] = false;
  const auto f32 = hidden.options().dtype(at::kFloat);
  std::array<Tensor, 3> rows{at::empty({in.N}, f32), at::empty({in.N}, f32),
                             at::empty({in.N}, f32)};
  Accumulators acc = make_accumulators(in, grad_mask);
  run_blocks(in, p, rows_per_block(block_rows, in), &rows, nullptr, Tensor(), grad_mask, acc);
  return {rows[0], rows[1], rows[2], acc.hidden, acc.weight, acc.bias};
}

// -> (grad_hidden, grad_weight, grad_bias) in the inputs' dtypes, empty where grad_mask says no.
std::tuple<Tensor, Tensor, Tensor> linear_loss_backward(
    const Tensor& grad_loss, const Tensor& hidden, const Tensor& weight, const Tensor& target,
    const OptT& bias, const OptT& class_weight, const Tensor& stat0, const Tensor& stat1,
    int64_t kind, c10::ArrayRef<double> scalars, int64_t ignore_index, GradMask grad_mask,
    int64_t block_rows) {
  const LossParams p = loss_params(LossKind(kind), ignore_index, scalars);
  const char* op = linear_name(p.kind);
  const LinearInputs in = check_inputs(op, hidden, weight, target, bias, class_weight, ignore_index);
  for (const Tensor* t : {&grad_loss, &stat0, &stat1})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == in.N && t->device() == hidden.device(), op,
                ": grad_loss, stat0 and stat1 must be [", in.N, "] on ", hidden.device(),
                ", got shape ", t->sizes(), " on ", t->device());
  if (!in.bias.defined()) grad_mask[2] = false;
  Accumulators acc = make_accumulators(in, grad_mask);
  const std::array<Tensor, 2> stats{stat0.to(at::kFloat).contiguous(),
                                    stat1.to(at::kFloat).contiguous()};
  run_blocks(in, p, rows_per_block(block_rows, in), nullptr, &stats,
             grad_loss.to(at::kFloat).contiguous(), grad_mask, acc);
  return {acc.hidden, acc.weight.to(weight.scalar_type()),
          in.bias.defined() ? acc.bias.to(in.bias.scalar_type()) : acc.bias};
}

// ---- the eager path: forward, reduction and a C++ autograd formula in one op --------------------

std::optional<Tensor> opt(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

const c10::OperatorHandle& linear_op(bool backward) {
  static const auto fwd =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastloss::linear_loss_forward", "");
  static const auto bwd =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastloss::linear_loss_backward", "");
  return backward ? bwd : fwd;
}

std::vector<c10::IValue> with_params(std::vector<c10::IValue> head, const LossParams& p,
                                     GradMask mask, int64_t block_rows) {
  head.emplace_back(int64_t(p.kind));
  std::vector<double> scalars;
  for (const auto& v : scalar_args(p)) scalars.push_back(v.isBool() ? double(v.toBool()) : v.toDouble());
  head.emplace_back(scalars);
  head.emplace_back(p.ignore_index);
  c10::List<bool> mask_list;
  for (bool b : mask) mask_list.push_back(b);
  head.emplace_back(mask_list);
  head.emplace_back(block_rows);
  return head;
}

constexpr const char* kEarlyGrad[3] = {"early_grad_hidden", "early_grad_weight", "early_grad_bias"};

// With reduction mean/sum and gradients wanted, the forward op also returns the gradients
// of sum(row loss) ("early" gradients); backward scales them by d(total)/d(loss). They are
// kept in saved_data rather than saved as variables so that the usual backward can hand
// them over without a copy and drop them; a later backward through a retained graph finds
// them gone and forms every block again from the saved inputs, as reduction="none" does.
struct LinearLossFunction : public torch::autograd::Function<LinearLossFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& hidden,
                        const Tensor& weight, const Tensor& target, const OptT& bias,
                        const OptT& class_weight, const LossParams& p, int64_t reduction,
                        int64_t block_rows, GradMask wants, bool round_loss) {
    const bool early = reduction != kNone && (wants[0] || wants[1] || wants[2]);
    auto out = call_below_autograd(
        linear_op(false),
        with_params({hidden, weight, target, bias, class_weight}, p,
                    early ? wants : GradMask{false, false, false}, block_rows));
    const Tensor rows = out[0].toTensor();
    Tensor denom;
    const Tensor loss = reduce_rows(rows, target, opt_weight(class_weight), weight.size(0),
                                    reduction, p.ignore_index, denom);
    // d(loss)/d(row loss): 1 for sum, 1/denominator for mean (0 when no row counts: the mean
    // over no rows is NaN but its gradients are 0, as torch's).
    const Tensor row_scale = reduction == kMean ? at::where(denom.ne(0), denom.reciprocal(), 0.0)
                                                : Tensor();
    if (early) {  // (three Tensor entries: compiled autograd lifts those, not a tensor list)
      for (int k = 3; k < 6; ++k) {
        Tensor g = out[k].toTensor();
        if (row_scale.defined()) g.mul_(row_scale);
        ctx->saved_data[kEarlyGrad[k - 3]] = g;
      }
    }
    ctx->save_for_backward({hidden, weight, target, bias.value_or(Tensor()),
                            class_weight.value_or(Tensor()), out[1].toTensor(), out[2].toTensor(),
                            row_scale});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["params"] = pack_params(p);
    ctx->saved_data["ignore_index"] = p.ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["block_rows"] = block_rows;
    return loss_in(loss, round_loss, hidden);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // needs_input_grad counts only the tensors given: (hidden, weight, target, bias if any, ...).
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const GradMask needs{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                         has_bias && ctx->needs_input_grad(3)};
    Tensor gh, gw, gb;
    const Tensor& up = grads[0];
    const char* name = linear_name(unpack_params(ctx->saved_data["params"].toDoubleVector(), 0).kind);
    if (!up.defined() || !(needs[0] || needs[1] || needs[2]))
      return once_differentiable(grads, {gh, gw, Tensor(), gb, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()},
                                 name);
    const auto saved = ctx->get_saved_variables();
    const Tensor &hidden = saved[0], &weight = saved[1];
    if (ctx->saved_data.count(kEarlyGrad[0]) && ctx->saved_data[kEarlyGrad[0]].isTensor()) {
      // handed over (the entries emptied): a later backward through a retained graph forms the
      // blocks again
      Tensor made[3];
      for (int k = 0; k < 3; ++k) made[k] = take_kept_gradient(ctx->saved_data[kEarlyGrad[k]]);
      // Scaled by d(total)/d(loss) in place (when this backward holds the only reference: see
      // scale_if_owned), or, where the dtype changes, in the pass that rounds them (one kernel,
      // no float32 copy: at 128256 x 4096 a copy of grad_weight's accumulator was 2 GiB more
      // peak memory and a pass). When d(total)/d(loss) is exactly 1 and can be read without a
      // device synchronisation there is nothing to scale.
      const bool unit = readable_cpu(up) && up.numel() == 1 && up.item<double>() == 1.0;
      const Tensor scale = up.to(at::kFloat);
      auto result = [&](Tensor t, const Tensor& like) {
        if (unit) return t.to(like.scalar_type());
        if (t.scalar_type() == like.scalar_type()) return scale_if_owned(std::move(t), scale);
        Tensor out = at::empty_like(t, t.options().dtype(like.scalar_type()));  // (traced from t)
        return at::mul_out(out, t, scale);
      };
      if (needs[0]) gh = result(std::move(made[0]), hidden);
      if (needs[1]) gw = result(std::move(made[1]), weight);
      if (needs[2]) gb = result(std::move(made[2]), saved[3]);
      return once_differentiable(grads, {gh, gw, Tensor(), gb, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()},
                                 name);
    }
    // Form every block again. d(total)/d(row loss) per row:
    Tensor g = up.to(at::kFloat);
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    if (reduction == kMean) g = g.mul(saved[7]);
    if (reduction != kNone) g = at::empty({hidden.size(0)}, g.options()).fill_(g);
    const LossParams p = unpack_params(ctx->saved_data["params"].toDoubleVector(),
                                       ctx->saved_data["ignore_index"].toInt());
    auto out = call_below_autograd(
        linear_op(true), with_params({g, hidden, weight, saved[2], opt(saved[3]), opt(saved[4]),
                                      saved[5], saved[6]},
                                     p, needs, ctx->saved_data["block_rows"].toInt()));
    if (needs[0]) gh = out[0].toTensor();
    if (needs[1]) gw = out[1].toTensor();
    if (needs[2]) gb = out[2].toTensor();
    return once_differentiable(grads, {gh, gw, Tensor(), gb, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()},
                               name);
  }
};

void check_reduction(LossKind kind, int64_t reduction) {
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kSum, linear_name(kind),
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

Tensor linear_loss_autograd(const Tensor& hidden, const Tensor& weight, const Tensor& target,
                            const OptT& bias, const OptT& class_weight, int64_t kind,
                            c10::ArrayRef<double> scalars, int64_t ignore_index,
                            int64_t reduction, int64_t block_rows, bool round_loss) {
  const LossParams p = loss_params(LossKind(kind), ignore_index, scalars);
  check_reduction(p.kind, reduction);
  // Which gradients autograd will ask for (none under no_grad: then the forward does not
  // compute any early).
  const bool grad_mode = at::GradMode::is_enabled();
  const GradMask wants{grad_mode && hidden.requires_grad(), grad_mode && weight.requires_grad(),
                       grad_mode && bias.has_value() && bias->defined() && bias->requires_grad()};
  return LinearLossFunction::apply(hidden, weight, target, bias, class_weight, p, reduction,
                                   block_rows, wants, round_loss);
}

// Without autograd (inference mode, no_grad, or below autograd).
Tensor linear_loss_no_grad(const Tensor& hidden, const Tensor& weight, const Tensor& target,
                           const OptT& bias, const OptT& class_weight, int64_t kind,
                           c10::ArrayRef<double> scalars, int64_t ignore_index,
                           int64_t reduction, int64_t block_rows, bool round_loss) {
  check_reduction(LossKind(kind), reduction);
  const Tensor rows = std::get<0>(linear_loss_forward(hidden, weight, target, bias, class_weight,
                                                      kind, scalars, ignore_index,
                                                      {false, false, false}, block_rows));
  Tensor denom;
  return loss_in(reduce_rows(rows, target, opt_weight(class_weight), weight.size(0), reduction,
                             ignore_index, denom),
                 round_loss, hidden);
}

void register_impls(torch::Library& m) {
  m.impl("linear_loss_forward", &linear_loss_forward);
  m.impl("linear_loss_backward", &linear_loss_backward);
  m.impl("linear_loss", &linear_loss_no_grad);
}

}  // namespace
}  // namespace fastloss

TORCH_LIBRARY_IMPL(fastloss, CPU, m) { fastloss::register_impls(m); }
TORCH_LIBRARY_IMPL(fastloss, Autograd, m) {
  m.impl("linear_loss", &fastloss::linear_loss_autograd);
}
#if defined(FASTLOSS_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastloss, CUDA, m) { fastloss::register_impls(m); }
#endif
