// The torch-aware pieces of the row losses that other families build on (the fused linear
// losses call the row-loss ops block by block). Defined in losses_op.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "loss_params.h"

namespace fastloss {

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// A loss's parameters from its op scalars (in the order of the <name>_forward schema after
// ignore_index, bools as 0/1), checked as the op checks them.
LossParams loss_params(LossKind kind, int64_t ignore_index, c10::ArrayRef<double> scalars);
// The inverse: the op arguments after ignore_index.
std::vector<c10::IValue> scalar_args(const LossParams& p);
// The public name of a loss, for error messages.
const char* op_name(LossKind kind);

// The scalars as doubles for an autograd context, and back (every float converts exactly).
std::vector<double> pack_params(const LossParams& p);
LossParams unpack_params(const std::vector<double>& v, int64_t ignore_index);

// The row-loss ops: which = 0 <name>_forward, 1 <name>_backward, 2 <name>_backward_ (in place),
// 3 <name>_forward_grad (forward and gradient in one pass), 4 <name>_forward_grad_ (the same,
// the gradient written over the logits).
enum RowOp { kForwardOp = 0, kBackwardOp = 1, kBackwardInplaceOp = 2, kForwardGradOp = 3,
             kForwardGradInplaceOp = 4 };
const c10::OperatorHandle& row_op(LossKind kind, int which);
// Call an op below autograd; returns its outputs.
std::vector<c10::IValue> call_below_autograd(const c10::OperatorHandle& op,
                                             std::vector<c10::IValue> stack);

// Row losses [N] (float32) reduced for the single-op losses' autograd formulas: kNone, kSum,
// or kMean over `mean_count` (a tensor: the rows kept) or, undefined, over all N rows; and the
// backward of that reduction, d(total)/d(row loss) for each row ([N] float32, contiguous).
at::Tensor reduce_loss_rows(const at::Tensor& rows, int64_t reduction,
                            const at::Tensor& mean_count = at::Tensor());
// n: the row count as a SymInt (x.sym_size(0)), so that torch.compile's traced backward keeps
// it symbolic: an int read of a traced size fixes the batch size into the compiled graph.
at::Tensor row_upstream(const at::Tensor& grad, int64_t reduction, const c10::SymInt& n,
                        const at::Tensor& mean_count = at::Tensor());

// The gradients a C++ autograd formula returns, made to refuse a second differentiation: when
// the backward runs with create_graph=True, differentiating them again raises a clear error
// naming `op` (their formulas are kernels below autograd, which would otherwise give zero
// second-order terms silently). incoming: the backward's incoming gradients. The Python
// formulas reach the same code through the op fastloss::_refuse_second_order
// (fastloss/ops/_autograd.py).
std::vector<at::Tensor> once_differentiable(const std::vector<at::Tensor>& incoming,
                                            const std::vector<at::Tensor>& grads, const std::string& op);

// The fake or functional tensors of tracing, which hold no data to read or launch on.
bool traced_tensor(const at::Tensor& t);
// Plain CPU tensors, not traced ones, whose data can be read without a device wait.
bool readable_cpu(const at::Tensor& t);
// The float32 loss as an op returns it: in `like`'s (16-bit) dtype with round_loss, as torch's
// losses return it outside autocast (the Python caller asks for it: a Python-side cast after
// the op, with its own op and autograd node, had cost a small 16-bit call ~20% of its host
// time), else as it is.
at::Tensor loss_in(const at::Tensor& loss, bool round_loss, const at::Tensor& like);

// A gradient an autograd formula's forward made, kept in ctx->saved_data (`slot`) for its
// backward to hand over: taken out (the slot left empty), or undefined when a backward took it
// before (a second backward through a retained graph must make it again).
at::Tensor take_kept_gradient(c10::IValue& slot);
// t * factor in t's dtype (factor float32, broadcast against t): in place when t is the only
// reference to its tensor (the eager backward, after take_kept_gradient), else into a new
// tensor. Compiled autograd runs a backward on a copy of saved_data, whose original still
// holds the buffer: scaling it in place would alter the first backward's result and what a
// second one hands over. Pass t by std::move.
at::Tensor scale_if_owned(at::Tensor t, const at::Tensor& factor);
// A gradient made for an incoming gradient of 1, times the incoming gradient `up` (float32:
// one value, or one per row when per_row), through scale_if_owned; returned as it is when up
// is exactly 1 and readable without a device wait.
at::Tensor scale_by_upstream(at::Tensor made, const at::Tensor& up, bool per_row);

std::optional<at::Tensor> opt_weight(const std::optional<at::Tensor>& w);
// Reduce float32 row losses [N] as torch does (mean divides by the summed class weights of the
// non-ignored rows); for the mean, `denom` receives that divisor. C (the class count) as a
// SymInt: read as a number only for real CUDA tensors (see row_upstream).
at::Tensor reduce_rows(const at::Tensor& rows, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight, const c10::SymInt& C, int64_t reduction,
                       int64_t ignore_index, at::Tensor& denom);

}  // namespace fastloss
