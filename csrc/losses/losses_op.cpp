// The torch-aware side of the row losses: argument checks, allocation, and the choice of the
// CPU or CUDA kernels. Every op is registered for both devices; the schemas are in
// registration.cpp, the fake kernels (and the autograd of the *_forward ops, which
// torch.compile traces) in python/fastloss/ops/losses.py. The *_loss ops are the eager path:
// forward, reduction and backward in C++ (a C++ autograd Function), so that a call costs one
// Python-to-C++ crossing instead of a Python autograd.Function and a dozen small torch calls.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <c10/util/Exception.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(FASTLOSS_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif

#include "../common/huge_pages.h"
#include "../op_helpers.h"
#include "losses_kernels.h"
#include "losses_op.h"

namespace fastloss {
namespace {

using at::Tensor;

// Checked, kernel-ready views of (logits, target, weight).
struct Inputs {
  Tensor logits, target, weight;
  LogitsView view;
  RowTargets targets;
};

Inputs check_inputs(const char* op, const Tensor& logits_in, const Tensor& target_in,
                    const std::optional<Tensor>& weight_in) {
  TORCH_CHECK(logits_in.dim() == 2, op, ": logits must be 2-D [N, C], got shape ",
              logits_in.sizes(), " (flatten leading dimensions with logits.flatten(0, -2))");
  const auto dt = logits_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": logits must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(target_in.dim() == 1, op, ": target must be 1-D [N], got shape ",
              target_in.sizes());
  // (uint8 as F.cross_entropy takes it: segmentation masks with ignore_index 255)
  const auto tt = target_in.scalar_type();
  TORCH_CHECK(tt == at::kLong || tt == at::kInt || tt == at::kByte, op,
              ": target must hold class indices (int64, int32 or uint8), got ", tt);
  TORCH_CHECK(target_in.size(0) == logits_in.size(0), op, ": target has ", target_in.size(0),
              " entries but logits has ", logits_in.size(0), " rows");
  TORCH_CHECK(target_in.device() == logits_in.device(), op, ": target is on ",
              target_in.device(), " but logits is on ", logits_in.device());
  const int64_t N = logits_in.size(0), C = logits_in.size(1);
  TORCH_CHECK(C > 0 || N == 0, op, ": logits must have at least one class, got shape ",
              logits_in.sizes());

  Inputs in;
  // Rows may have any stride; classes must be contiguous (a transposed view is copied once).
  in.logits = logits_in.stride(1) == 1 || C <= 1 ? logits_in : logits_in.contiguous();
  in.target = target_in.to(at::kLong).contiguous();
  if (weight_in.has_value() && weight_in->defined()) {
    const Tensor& w = *weight_in;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == C, op, ": weight must be 1-D with one entry per class (",
                C, "), got shape ", w.sizes());
    TORCH_CHECK(w.is_floating_point(), op, ": weight must be a floating-point tensor, got ",
                w.scalar_type());
    TORCH_CHECK(w.device() == logits_in.device(), op, ": weight is on ", w.device(),
                " but logits is on ", logits_in.device());
    in.weight = w.to(at::kFloat).contiguous();
  }
  in.view.data = in.logits.data_ptr();
  in.view.dtype = kernel_dtype(in.logits, op, "logits");
  in.view.rows = N;
  in.view.cols = C;
  in.view.row_stride = N > 1 ? in.logits.stride(0) : C;
  in.targets.target = in.target.data_ptr<int64_t>();
  in.targets.weight = in.weight.defined() ? in.weight.data_ptr<float>() : nullptr;
  return in;
}


// Label-smoothed cross-entropy needs sum_k w_k; it stays on the device (no host sync). The
// returned tensor must outlive the kernel launch.
Tensor set_weight_sum(LossParams& p, const Inputs& in) {
  if (!in.weight.defined() || p.kind != LossKind::cross_entropy || p.label_smoothing == 0.f)
    return Tensor();
  Tensor sum = at::sum(in.weight);
  p.weight_sum = sum.data_ptr<float>();
  return sum;
}

// Rows per CPU task: at least ~16k elements each so small rows are not scheduled one by one.
int64_t cpu_grain(int64_t C) { return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(C, 1)); }

std::tuple<Tensor, Tensor, Tensor> forward(const char* op, LossParams p, const Tensor& logits,
                                           const Tensor& target,
                                           const std::optional<Tensor>& weight) {
  Inputs in = check_inputs(op, logits, target, weight);
  const Tensor weight_sum = set_weight_sum(p, in);
  const int64_t N = in.view.rows;
  auto opts = in.logits.options().dtype(at::kFloat);
  Tensor loss = at::empty({N}, opts), stat0 = at::empty({N}, opts), stat1 = at::empty({N}, opts);
  RowStats out{loss.data_ptr<float>(), stat0.data_ptr<float>(), stat1.data_ptr<float>()};

  if (in.logits.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    c10::cuda::CUDAGuard guard(in.logits.device());
    check_cuda_launch(losses_forward_cuda(in.view, in.targets, p, out,
                                          cuda_stream()), op);
#else
    TORCH_CHECK(false, op, ": fastloss was built without CUDA; reinstall it with a CUDA build of torch and nvcc");
#endif
    return {loss, stat0, stat1};
  }
  TORCH_CHECK(in.logits.is_cpu(), op, ": logits must be on the CPU or a CUDA device, got ",
              in.logits.device());
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, N, cpu_grain(in.view.cols), [&](int64_t r0, int64_t r1) {
    const int64_t r = losses_forward_cpu(in.view, in.targets, p, out, r0, r1);
    if (r >= 0) {
      int64_t cur = bad.load();
      while ((cur < 0 || r < cur) && !bad.compare_exchange_weak(cur, r)) {
      }
    }
  });
  const int64_t r = bad.load();
  TORCH_CHECK(r < 0, op, ": target[", r, "] = ", in.targets.target[r],
              " is not a class index in [0, ", in.view.cols, ") nor ignore_index (",
              p.ignore_index, ")");
  return {loss, stat0, stat1};
}

// Where a gradient goes: over the logits themselves (inplace; they must be the checked view,
// i.e. have contiguous classes) or into a new [N, C] tensor; row_stride is set to its rows'.
Tensor gradient_out(const char* op, const Inputs& in, const Tensor& logits, bool inplace,
                    int64_t& row_stride) {
  if (inplace) {
    TORCH_CHECK(in.logits.is_same(logits), op, ": writing the gradient over the logits needs "
                "logits whose classes are contiguous (stride 1), got strides ", logits.strides());
    TORCH_CHECK(in.view.rows <= 1 || in.view.row_stride >= in.view.cols, op, ": writing the "
                "gradient over the logits needs rows that do not overlap (row stride >= ",
                in.view.cols, " classes), got strides ", logits.strides());
    row_stride = in.view.row_stride;
    return in.logits;
  }
  Tensor grad = at::empty({in.view.rows, in.view.cols}, in.logits.options());
  if (grad.is_cpu()) advise_huge_pages(grad.data_ptr(), grad.nbytes());
  row_stride = in.view.cols;
  return grad;
}

// inplace: write the gradient over the logits (the *_backward_ ops) instead of a new tensor.
Tensor backward(const char* op, LossParams p, const Tensor& grad_loss, const Tensor& logits,
                const Tensor& target, const std::optional<Tensor>& weight, const Tensor& stat0,
                const Tensor& stat1, bool inplace = false) {
  Inputs in = check_inputs(op, logits, target, weight);
  const Tensor weight_sum = set_weight_sum(p, in);
  const int64_t N = in.view.rows, C = in.view.cols;
  auto as_rows = [&](const Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == N, op, ": ", name, " must have shape [", N,
                "], got ", t.sizes());
    TORCH_CHECK(t.device() == in.logits.device(), op, ": ", name, " is on ", t.device(),
                " but logits is on ", in.logits.device());
    return t.to(at::kFloat).contiguous();
  };
  const Tensor g = as_rows(grad_loss, "grad_loss"), s0 = as_rows(stat0, "stat0"),
               s1 = as_rows(stat1, "stat1");
  int64_t grad_row_stride;
  const Tensor grad = gradient_out(op, in, logits, inplace, grad_row_stride);
  RowGrad rg{g.data_ptr<float>(), s0.data_ptr<float>(), s1.data_ptr<float>(), grad.data_ptr(),
             grad_row_stride};

  if (in.logits.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    c10::cuda::CUDAGuard guard(in.logits.device());
    check_cuda_launch(losses_backward_cuda(in.view, in.targets, p, rg,
                                           cuda_stream()), op);
#else
    TORCH_CHECK(false, op, ": fastloss was built without CUDA");
#endif
    return grad;
  }
  at::parallel_for(0, N, cpu_grain(C), [&](int64_t r0, int64_t r1) {
    losses_backward_cpu(in.view, in.targets, p, rg, r0, r1);
  });
  return grad;
}

// Forward and gradient with one pass over the logits (each row's second read comes from
// cache): grad_loss is d(total)/d(row loss), known before the call.
// inplace: the gradient overwrites the logits (the *_forward_grad_ ops), each row once its
// statistics are known (the kernels read a row's target logit before writing any of it).
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_grad(const char* op, LossParams p,
                                                        const Tensor& grad_loss,
                                                        const Tensor& logits,
                                                        const Tensor& target,
                                                        const std::optional<Tensor>& weight,
                                                        bool inplace = false) {
  Inputs in = check_inputs(op, logits, target, weight);
  const Tensor weight_sum = set_weight_sum(p, in);
  const int64_t N = in.view.rows, C = in.view.cols;
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == N, op, ": grad_loss must have shape [",
              N, "], got ", grad_loss.sizes());
  TORCH_CHECK(grad_loss.device() == in.logits.device(), op, ": grad_loss is on ",
              grad_loss.device(), " but logits is on ", in.logits.device());
  const Tensor g = grad_loss.to(at::kFloat).contiguous();
  auto opts = in.logits.options().dtype(at::kFloat);
  Tensor loss = at::empty({N}, opts), stat0 = at::empty({N}, opts), stat1 = at::empty({N}, opts);
  int64_t grad_row_stride;
  const Tensor grad = gradient_out(op, in, logits, inplace, grad_row_stride);
  if (inplace && !in.logits.is_cuda()) {
    // the kernel finds a bad target only at its row, after the rows before it were
    // overwritten: look first (N integers)
    for (int64_t r = 0; r < N; ++r) {
      const int64_t y = in.targets.target[r];
      TORCH_CHECK(y == p.ignore_index || (y >= 0 && y < C), op, ": target[", r, "] = ", y,
                  " is not a class index in [0, ", C, ") nor ignore_index (", p.ignore_index, ")");
    }
  }
  RowStats out{loss.data_ptr<float>(), stat0.data_ptr<float>(), stat1.data_ptr<float>()};
  RowGrad rg{g.data_ptr<float>(), out.stat0, out.stat1, grad.data_ptr(), grad_row_stride};
  if (in.logits.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    c10::cuda::CUDAGuard guard(in.logits.device());
    const char* err = losses_forward_backward_cuda(in.view, in.targets, p, out, rg,
                                                   c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err);
#else
    TORCH_CHECK(false, op, ": fastloss was built without CUDA");
#endif
    return {loss, stat0, stat1, grad};
  }
  std::atomic<int64_t> bad{-1};
  at::parallel_for(0, N, cpu_grain(C), [&](int64_t r0, int64_t r1) {
    const int64_t r = losses_forward_backward_cpu(in.view, in.targets, p, out, rg, r0, r1);
    if (r >= 0) {
      int64_t cur = bad.load();
      while ((cur < 0 || r < cur) && !bad.compare_exchange_weak(cur, r)) {
      }
    }
  });
  const int64_t r = bad.load();
  TORCH_CHECK(r < 0, op, ": target[", r, "] = ", in.targets.target[r],
              " is not a class index in [0, ", C, ") nor ignore_index (", p.ignore_index, ")");
  return {loss, stat0, stat1, grad};
}


// ---- the ops: each names its loss and its scalars -------------------------------------------

LossParams cross_entropy_params(int64_t ignore_index, double label_smoothing,
                                double lse_square_scale, double softcap) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "cross_entropy: label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(softcap >= 0.0, "cross_entropy: softcap must be positive (or None), got ", softcap);
  TORCH_CHECK(lse_square_scale >= 0.0, "cross_entropy: lse_square_scale must be >= 0, got ", lse_square_scale);
  LossParams p;
  p.kind = LossKind::cross_entropy;
  p.ignore_index = ignore_index;
  p.label_smoothing = float(label_smoothing);
  p.lse_square_scale = float(lse_square_scale);
  p.softcap = float(softcap);
  return p;
}

LossParams comp_sum_params(int64_t ignore_index, double tau) {
  TORCH_CHECK(tau >= 0.0, "comp_sum_loss: tau must be >= 0, got ", tau);
  LossParams p;
  p.kind = LossKind::comp_sum;
  p.ignore_index = ignore_index;
  p.tau = float(tau);
  return p;
}

LossParams ldr_params(int64_t ignore_index, double lam, double margin, bool adaptive,
                      double alpha) {
  TORCH_CHECK(lam > 0.0, "ldr_loss: lam must be > 0, got ", lam);
  TORCH_CHECK(!adaptive || alpha > 1.0, "ldr_loss: alpha must be > 1 for the adaptive loss, got ",
              alpha);
  LossParams p;
  p.kind = LossKind::ldr;
  p.ignore_index = ignore_index;
  p.lam = float(lam);
  p.margin = float(margin);
  p.adaptive = adaptive;
  p.alpha = float(alpha);
  return p;
}

LossParams spherical_z_params(int64_t ignore_index, double a, double b, double eps) {
  TORCH_CHECK(a > 0.0, "spherical_z_loss: a must be > 0, got ", a);
  TORCH_CHECK(eps >= 0.0, "spherical_z_loss: eps must be >= 0, got ", eps);
  LossParams p;
  p.kind = LossKind::spherical_z;
  p.ignore_index = ignore_index;
  p.a = float(a);
  p.b = float(b);
  p.eps = float(eps);
  return p;
}

LossParams stablemax_params(int64_t ignore_index) {
  LossParams p;
  p.kind = LossKind::stablemax;
  p.ignore_index = ignore_index;
  return p;
}

using Fwd = std::tuple<Tensor, Tensor, Tensor>;
using OptT = std::optional<Tensor>;

Fwd cross_entropy_forward(const Tensor& logits, const Tensor& target, const OptT& weight,
                          int64_t ignore_index, double label_smoothing, double lse_square_scale,
                          double softcap, bool /*inplace_backward*/) {
  return forward("cross_entropy", cross_entropy_params(ignore_index, label_smoothing, lse_square_scale, softcap),
                 logits, target, weight);
}
Tensor cross_entropy_backward(const Tensor& grad, const Tensor& logits, const Tensor& target,
                              const OptT& weight, const Tensor& s0, const Tensor& s1,
                              int64_t ignore_index, double label_smoothing,
                              double lse_square_scale, double softcap) {
  return backward("cross_entropy", cross_entropy_params(ignore_index, label_smoothing, lse_square_scale, softcap),
                  grad, logits, target, weight, s0, s1);
}

Fwd comp_sum_forward(const Tensor& logits, const Tensor& target, const OptT& weight,
                     int64_t ignore_index, double tau, bool /*inplace_backward*/) {
  return forward("comp_sum_loss", comp_sum_params(ignore_index, tau), logits, target, weight);
}
Tensor comp_sum_backward(const Tensor& grad, const Tensor& logits, const Tensor& target,
                         const OptT& weight, const Tensor& s0, const Tensor& s1,
                         int64_t ignore_index, double tau) {
  return backward("comp_sum_loss", comp_sum_params(ignore_index, tau), grad, logits, target,
                  weight, s0, s1);
}

Fwd ldr_forward(const Tensor& logits, const Tensor& target, const OptT& weight,
                int64_t ignore_index, double lam, double margin, bool adaptive, double alpha, bool /*inplace_backward*/) {
  return forward("ldr_loss", ldr_params(ignore_index, lam, margin, adaptive, alpha), logits,
                 target, weight);
}
Tensor ldr_backward(const Tensor& grad, const Tensor& logits, const Tensor& target,
                    const OptT& weight, const Tensor& s0, const Tensor& s1, int64_t ignore_index,
                    double lam, double margin, bool adaptive, double alpha) {
  return backward("ldr_loss", ldr_params(ignore_index, lam, margin, adaptive, alpha), grad,
                  logits, target, weight, s0, s1);
}

Fwd spherical_z_forward(const Tensor& logits, const Tensor& target, const OptT& weight,
                        int64_t ignore_index, double a, double b, double eps, bool /*inplace_backward*/) {
  return forward("spherical_z_loss", spherical_z_params(ignore_index, a, b, eps), logits, target,
                 weight);
}
Tensor spherical_z_backward(const Tensor& grad, const Tensor& logits, const Tensor& target,
                            const OptT& weight, const Tensor& s0, const Tensor& s1,
                            int64_t ignore_index, double a, double b, double eps) {
  return backward("spherical_z_loss", spherical_z_params(ignore_index, a, b, eps), grad, logits,
                  target, weight, s0, s1);
}

Fwd stablemax_forward(const Tensor& logits, const Tensor& target, const OptT& weight,
                      int64_t ignore_index, bool /*inplace_backward*/) {
  return forward("stablemax_cross_entropy", stablemax_params(ignore_index), logits, target,
                 weight);
}
Tensor stablemax_backward(const Tensor& grad, const Tensor& logits, const Tensor& target,
                          const OptT& weight, const Tensor& s0, const Tensor& s1,
                          int64_t ignore_index) {
  return backward("stablemax_cross_entropy", stablemax_params(ignore_index), grad, logits, target,
                  weight, s0, s1);
}

using Fwd4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
Fwd4 cross_entropy_forward_grad(const Tensor& g, const Tensor& logits, const Tensor& target,
                                const OptT& weight, int64_t ignore_index, double label_smoothing,
                                double lse_square_scale, double softcap) {
  return forward_grad("cross_entropy", cross_entropy_params(ignore_index, label_smoothing, lse_square_scale, softcap),
                      g, logits, target, weight);
}
Fwd4 comp_sum_forward_grad(const Tensor& g, const Tensor& logits, const Tensor& target,
                           const OptT& weight, int64_t ignore_index, double tau) {
  return forward_grad("comp_sum_loss", comp_sum_params(ignore_index, tau), g, logits, target,
                      weight);
}
Fwd4 ldr_forward_grad(const Tensor& g, const Tensor& logits, const Tensor& target,
                      const OptT& weight, int64_t ignore_index, double lam, double margin,
                      bool adaptive, double alpha) {
  return forward_grad("ldr_loss", ldr_params(ignore_index, lam, margin, adaptive, alpha), g,
                      logits, target, weight);
}
Fwd4 spherical_z_forward_grad(const Tensor& g, const Tensor& logits, const Tensor& target,
                              const OptT& weight, int64_t ignore_index, double a, double b,
                              double eps) {
  return forward_grad("spherical_z_loss", spherical_z_params(ignore_index, a, b, eps), g, logits,
                      target, weight);
}
Fwd4 stablemax_forward_grad(const Tensor& g, const Tensor& logits, const Tensor& target,
                            const OptT& weight, int64_t ignore_index) {
  return forward_grad("stablemax_cross_entropy", stablemax_params(ignore_index), g, logits,
                      target, weight);
}

// The same, the gradient written over the logits: (row loss, stat0, stat1).
using Fwd3 = std::tuple<Tensor, Tensor, Tensor>;
Fwd3 first3(const Fwd4& r) { return {std::get<0>(r), std::get<1>(r), std::get<2>(r)}; }
Fwd3 cross_entropy_forward_grad_(const Tensor& g, const Tensor& logits, const Tensor& target,
                                 const OptT& weight, int64_t ignore_index, double label_smoothing,
                                 double lse_square_scale, double softcap) {
  return first3(forward_grad("cross_entropy", cross_entropy_params(ignore_index, label_smoothing, lse_square_scale, softcap),
                             g, logits, target, weight, true));
}
Fwd3 comp_sum_forward_grad_(const Tensor& g, const Tensor& logits, const Tensor& target,
                            const OptT& weight, int64_t ignore_index, double tau) {
  return first3(forward_grad("comp_sum_loss", comp_sum_params(ignore_index, tau), g, logits, target,
                             weight, true));
}
Fwd3 ldr_forward_grad_(const Tensor& g, const Tensor& logits, const Tensor& target,
                       const OptT& weight, int64_t ignore_index, double lam, double margin,
                       bool adaptive, double alpha) {
  return first3(forward_grad("ldr_loss", ldr_params(ignore_index, lam, margin, adaptive, alpha), g,
                             logits, target, weight, true));
}
Fwd3 spherical_z_forward_grad_(const Tensor& g, const Tensor& logits, const Tensor& target,
                               const OptT& weight, int64_t ignore_index, double a, double b,
                               double eps) {
  return first3(forward_grad("spherical_z_loss", spherical_z_params(ignore_index, a, b, eps), g,
                             logits, target, weight, true));
}
Fwd3 stablemax_forward_grad_(const Tensor& g, const Tensor& logits, const Tensor& target,
                             const OptT& weight, int64_t ignore_index) {
  return first3(forward_grad("stablemax_cross_entropy", stablemax_params(ignore_index), g, logits,
                             target, weight, true));
}

// In-place backward: the gradient overwrites the logits (opt-in from Python).
void cross_entropy_backward_(const Tensor& grad, const Tensor& logits, const Tensor& target,
                              const OptT& weight, const Tensor& s0, const Tensor& s1,
                              int64_t ignore_index, double label_smoothing,
                              double lse_square_scale, double softcap) {
  backward("cross_entropy", cross_entropy_params(ignore_index, label_smoothing, lse_square_scale, softcap),
                  grad, logits, target, weight, s0, s1, true);
}

void comp_sum_backward_(const Tensor& grad, const Tensor& logits, const Tensor& target,
                         const OptT& weight, const Tensor& s0, const Tensor& s1,
                         int64_t ignore_index, double tau) {
  backward("comp_sum_loss", comp_sum_params(ignore_index, tau), grad, logits, target,
                  weight, s0, s1, true);
}

void ldr_backward_(const Tensor& grad, const Tensor& logits, const Tensor& target,
                    const OptT& weight, const Tensor& s0, const Tensor& s1, int64_t ignore_index,
                    double lam, double margin, bool adaptive, double alpha) {
  backward("ldr_loss", ldr_params(ignore_index, lam, margin, adaptive, alpha), grad,
                  logits, target, weight, s0, s1, true);
}

void spherical_z_backward_(const Tensor& grad, const Tensor& logits, const Tensor& target,
                            const OptT& weight, const Tensor& s0, const Tensor& s1,
                            int64_t ignore_index, double a, double b, double eps) {
  backward("spherical_z_loss", spherical_z_params(ignore_index, a, b, eps), grad, logits,
                  target, weight, s0, s1, true);
}

void stablemax_backward_(const Tensor& grad, const Tensor& logits, const Tensor& target,
                          const OptT& weight, const Tensor& s0, const Tensor& s1,
                          int64_t ignore_index) {
  backward("stablemax_cross_entropy", stablemax_params(ignore_index), grad, logits, target,
                  weight, s0, s1, true);
}

// ---- the eager path: forward, reduction and backward in C++ ----------------------------------
//
// The helpers up to RowLossFunction are shared with the fused linear losses
// (linear_losses/linear_losses_op.cpp) through losses_op.h.

}  // namespace

LossParams loss_params(LossKind kind, int64_t ignore_index, c10::ArrayRef<double> s) {
  const size_t want[] = {3, 1, 4, 3, 0};  // scalars of each kind, in scalar_args' order
  TORCH_CHECK(int(kind) >= 0 && int(kind) <= int(LossKind::stablemax),
              "fastloss: unknown loss kind ", int(kind));
  TORCH_CHECK(s.size() == want[int(kind)], op_name(kind), ": expected ", want[int(kind)],
              " scalar parameters, got ", s.size());
  switch (kind) {
    case LossKind::comp_sum: return comp_sum_params(ignore_index, s[0]);
    case LossKind::ldr: return ldr_params(ignore_index, s[0], s[1], s[2] != 0.0, s[3]);
    case LossKind::spherical_z: return spherical_z_params(ignore_index, s[0], s[1], s[2]);
    case LossKind::stablemax: return stablemax_params(ignore_index);
    case LossKind::cross_entropy: break;
  }
  return cross_entropy_params(ignore_index, s[0], s[1], s[2]);
}

const char* op_name(LossKind kind) {
  switch (kind) {
    case LossKind::comp_sum: return "comp_sum_loss";
    case LossKind::ldr: return "ldr_loss";
    case LossKind::spherical_z: return "spherical_z_loss";
    case LossKind::stablemax: return "stablemax_cross_entropy";
    case LossKind::cross_entropy: break;
  }
  return "cross_entropy";
}

// The loss's scalars travel through the autograd context (a map of IValues) as doubles; every
// float field converts exactly. ignore_index travels apart, as an int.
std::vector<double> pack_params(const LossParams& p) {
  return {double(int(p.kind)), p.label_smoothing, p.lse_square_scale, p.softcap, p.tau, p.lam,
          p.margin, p.alpha, p.adaptive ? 1.0 : 0.0, p.a, p.b, p.eps};
}
LossParams unpack_params(const std::vector<double>& v, int64_t ignore_index) {
  LossParams p;
  p.kind = LossKind(int(v[0]));
  p.ignore_index = ignore_index;
  p.label_smoothing = float(v[1]);
  p.lse_square_scale = float(v[2]);
  p.softcap = float(v[3]);
  p.tau = float(v[4]);
  p.lam = float(v[5]);
  p.margin = float(v[6]);
  p.alpha = float(v[7]);
  p.adaptive = v[8] != 0.0;
  p.a = float(v[9]);
  p.b = float(v[10]);
  p.eps = float(v[11]);
  return p;
}

// F.cross_entropy's mean denominator: the summed class weights of the non-ignored rows'
// targets (their count without weights). The gather index is clamped to the weights' range so
// that no row reads out of range (an ignored one; on CUDA, where targets are not checked on
// the host, one outside [0, C), whose loss is NaN anyway). The bound is weight's own size as
// a SymInt: an int read of a traced size would fix it into a torch.compile graph.
static Tensor mean_denominator(const Tensor& target, const std::optional<Tensor>& weight,
                               int64_t ignore_index) {
  // (in int64: a uint8 target compared with ignore_index -100 would wrap it to 156)
  const Tensor t = target.to(at::kLong);
  const Tensor valid = t.ne(ignore_index);
  if (!weight.has_value()) return valid.sum(at::kFloat);
  const Tensor safe = t.clamp(0, c10::Scalar(weight->sym_size(0) - 1));
  return at::where(valid, weight->to(at::kFloat).index_select(0, safe), 0.0).sum();
}

std::optional<at::Tensor> opt_weight(const std::optional<Tensor>& w) {
  return w.has_value() && w->defined() ? w : std::nullopt;
}

bool traced_tensor(const Tensor& t) {
  return t.key_set().has(c10::DispatchKey::Python) || t.key_set().has(c10::DispatchKey::Functionalize);
}

bool readable_cpu(const Tensor& t) { return t.is_cpu() && !traced_tensor(t); }

// (losses_op.h) a CPU 0-d value written as it is: one allocation, no dispatch
Tensor loss_in(const Tensor& loss, bool round_loss, const Tensor& like) {
  const at::ScalarType dtype = like.scalar_type();
  if (!round_loss || loss.scalar_type() == dtype) return loss;
  if (readable_cpu(loss) && loss.dim() == 0 && loss.scalar_type() == at::kFloat &&
      (dtype == at::kBFloat16 || dtype == at::kHalf)) {
    Tensor t = at::detail::empty_cpu({}, dtype, /*pin_memory=*/false, std::nullopt);
    const float v = *loss.data_ptr<float>();
    if (dtype == at::kBFloat16)
      *t.data_ptr<at::BFloat16>() = at::BFloat16(v);
    else
      *t.data_ptr<at::Half>() = at::Half(v);
    return t;
  }
  return loss.to(dtype);
}

Tensor take_kept_gradient(c10::IValue& slot) {
  if (!slot.isTensor()) return Tensor();
  Tensor t = slot.toTensor();
  slot = c10::IValue();
  return t;
}

Tensor scale_if_owned(Tensor t, const Tensor& factor) {
  if (t.use_count() == 1) return t.mul_(factor);
  Tensor out = at::empty_like(t);
  return at::mul_out(out, t, factor);
}

Tensor scale_by_upstream(Tensor made, const Tensor& up, bool per_row) {
  if (per_row) return scale_if_owned(std::move(made), up.reshape({-1, 1}));
  if (readable_cpu(up) && up.item<double>() == 1.0) return made;
  return scale_if_owned(std::move(made), up);
}

// Sum and mean of the rows on the CPU in one loop over the few [N] values (double
// accumulation): a few small ATen calls cost more than that at classifier sizes. The targets
// were validated by the forward op, so every non-ignored one indexes `weight` safely.
static Tensor reduce_rows_cpu(const Tensor& rows, const Tensor& target, const std::optional<Tensor>& weight,
                       int64_t reduction, int64_t ignore_index, Tensor& denom) {
  const float* l = rows.data_ptr<float>();
  const int64_t N = rows.numel();
  double total = 0.0;
  for (int64_t r = 0; r < N; ++r) total += l[r];
  // (0-d results made directly: at::scalar_tensor's dispatch was ~5% of a small call's host time)
  const auto scalar = [](double v) {
    Tensor t = at::detail::empty_cpu({}, at::kFloat, /*pin_memory=*/false, std::nullopt);
    *t.data_ptr<float>() = float(v);
    return t;
  };
  if (reduction == kSum) return scalar(total);
  const Tensor t = target.to(at::kLong).contiguous();
  const Tensor w = weight.has_value() ? weight->to(at::kFloat).contiguous() : Tensor();
  const int64_t* tp = t.data_ptr<int64_t>();
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  double d = 0.0;
  for (int64_t r = 0; r < N; ++r)
    if (tp[r] != ignore_index) d += wp ? double(wp[tp[r]]) : 1.0;
  denom = scalar(d);
  return scalar(total / d);
}

#if defined(FASTLOSS_WITH_CUDA)
// The CUDA tensors a one-launch reduction takes (real ones, in the kernels' types), else the
// ATen calls below (under tracing, torch.compile and opcheck see those).
static bool plain_cuda(const Tensor& t, at::ScalarType dtype, const Tensor& like) {
  return t.is_cuda() && !traced_tensor(t) && t.scalar_type() == dtype && t.is_contiguous() &&
         t.device() == like.device();
}
// (the shapes and devices are checked here too: grad_in_forward calls this before its op has
// validated them, and a kernel given a short or foreign tensor would read out of bounds).
// At most kOneBlockRows rows: the kernels are one block, which reads ~12 bytes a row at about
// one multiprocessor's bandwidth (~8 us at 65536 rows); more rows (a segmentation batch's
// pixels, [N, C, H, W] logits) take ATen's grid-wide reductions.
constexpr int64_t kOneBlockRows = int64_t(1) << 16;
static bool one_launch_targets(const Tensor& target, const std::optional<Tensor>& weight, const Tensor& like,
                               int64_t N, int64_t C) {
  return N <= kOneBlockRows && plain_cuda(target, at::kLong, like) && target.dim() == 1 && target.numel() == N &&
         (!weight.has_value() || (plain_cuda(*weight, at::kFloat, like) && weight->dim() == 1 && weight->numel() == C));
}
// (C read as a number only once rows are known to be real CUDA tensors: a traced class count
// stays symbolic)
static bool one_launch(const Tensor& rows, const Tensor& target, const std::optional<Tensor>& weight,
                       const c10::SymInt& C) {
  return plain_cuda(rows, at::kFloat, rows) && rows.dim() == 1 &&
         one_launch_targets(target, weight, rows, rows.numel(), C.guard_int(__FILE__, __LINE__));
}
#endif

// Row losses and their reduction; `denom` is set for the mean.
Tensor reduce_rows(const Tensor& rows, const Tensor& target, const std::optional<Tensor>& weight,
                   const c10::SymInt& C, int64_t reduction, int64_t ignore_index, Tensor& denom) {
  if (reduction == kNone) return rows;
  if (readable_cpu(rows) && readable_cpu(target))
    return reduce_rows_cpu(rows, target, weight, reduction, ignore_index, denom);
#if defined(FASTLOSS_WITH_CUDA)
  if (one_launch(rows, target, weight, C)) {  // one launch instead of four (sum, ne, sum, div)
    const c10::cuda::CUDAGuard guard(rows.device());
    Tensor loss = at::empty({}, rows.options());
    if (reduction == kMean) denom = at::empty({}, rows.options());
    check_cuda_launch(reduce_rows_cuda(rows.data_ptr<float>(), target.data_ptr<int64_t>(),
                                       weight.has_value() ? weight->data_ptr<float>() : nullptr, rows.numel(),
                                       C.guard_int(__FILE__, __LINE__), ignore_index, reduction == kMean,
                                       loss.data_ptr<float>(),
                                       reduction == kMean ? denom.data_ptr<float>() : nullptr, cuda_stream()),
                      "loss reduction");
    return loss;
  }
#endif
  if (reduction == kSum) return rows.sum();
  denom = mean_denominator(target, weight, ignore_index);
  return rows.sum().div(denom);
}

// The autograd formula calls the *_forward / *_backward ops through the dispatcher, below
// autograd, rather than the kernels directly: then torch.compile and opcheck trace it into
// those ops (with their fake kernels) instead of into a kernel reading fake tensors.
const c10::OperatorHandle& row_op(LossKind kind, int which) {
  static const auto handles = [] {
    std::vector<c10::OperatorHandle> h;
    for (const char* base : {"cross_entropy", "comp_sum", "ldr", "spherical_z", "stablemax"})
      for (const char* suffix : {"_forward", "_backward", "_backward_", "_forward_grad", "_forward_grad_"})
        h.push_back(c10::Dispatcher::singleton().findSchemaOrThrow(
            (std::string("fastloss::") + base + suffix).c_str(), ""));
    return h;
  }();
  return handles[size_t(kind) * 5 + size_t(which)];
}

// The op arguments after ignore_index, from the loss's parameters (float -> double is exact).
std::vector<c10::IValue> scalar_args(const LossParams& p) {
  switch (p.kind) {
    case LossKind::comp_sum: return {double(p.tau)};
    case LossKind::ldr: return {double(p.lam), double(p.margin), p.adaptive, double(p.alpha)};
    case LossKind::spherical_z: return {double(p.a), double(p.b), double(p.eps)};
    case LossKind::stablemax: return {};
    case LossKind::cross_entropy: break;
  }
  return {double(p.label_smoothing), double(p.lse_square_scale), double(p.softcap)};
}

Tensor reduce_loss_rows(const Tensor& rows, int64_t reduction, const Tensor& mean_count) {
  if (reduction == kSum) return rows.sum();
  if (reduction == kMean) return mean_count.defined() ? rows.sum().div(mean_count) : rows.mean();
  return rows;
}

Tensor row_upstream(const Tensor& grad, int64_t reduction, const c10::SymInt& rows, const Tensor& mean_count) {
  if (reduction != kNone && readable_cpu(grad) && (!mean_count.defined() || readable_cpu(mean_count))) {
    const int64_t n = rows.guard_int(__FILE__, __LINE__);  // (real tensors: a plain count)
    // one value known on the host: one fill (a division and a fill from a tensor cost more
    // than the whole backward kernel of a small classifier batch)
    double v = grad.item<double>();
    if (reduction == kMean) v /= mean_count.defined() ? mean_count.item<double>() : double(n);
    return at::empty({n}, grad.options().dtype(at::kFloat)).fill_(v);
  }
#if defined(FASTLOSS_WITH_CUDA)
  // one launch instead of a division and a fill
  if (reduction != kNone && grad.is_cuda() && !traced_tensor(grad) && grad.numel() == 1 &&
      (at::isFloatingType(grad.scalar_type()) && grad.scalar_type() != at::kDouble) &&
      (reduction != kMean || !mean_count.defined() ||
       (mean_count.is_cuda() && !traced_tensor(mean_count) && mean_count.scalar_type() == at::kFloat &&
        mean_count.numel() == 1 && mean_count.device() == grad.device()))) {
    const c10::cuda::CUDAGuard guard(grad.device());
    const Tensor gc = grad.contiguous();
    const int64_t n = rows.guard_int(__FILE__, __LINE__);
    Tensor out = at::empty({n}, grad.options().dtype(at::kFloat));
    const bool by_count = reduction == kMean && mean_count.defined();
    check_cuda_launch(upstream_rows_cuda(gc.data_ptr(), kernel_dtype(gc, "loss backward", "grad"),
                                         by_count ? mean_count.data_ptr<float>() : nullptr,
                                         reduction == kMean ? double(n) : 1.0, n, out.data_ptr<float>(),
                                         cuda_stream()),
                      "loss backward");
    return out;
  }
#endif
  // (from here traced tensors too: the count stays symbolic)
  Tensor g = grad.to(at::kFloat);
  if (reduction == kMean) g = mean_count.defined() ? g.div(mean_count) : g.div(c10::Scalar(rows));
  // one fill instead of an expand and a contiguous copy
  return reduction == kNone ? g.contiguous() : at::empty_symint({rows}, g.options()).fill_(g);
}

namespace {

// An Error node of the pointer kind this torch's graph uses (std::shared_ptr before 2.14,
// c10::intrusive_ptr since).
using NodePtr = decltype(torch::autograd::get_current_node());
template <class Ptr = NodePtr>  // (a template: only the branch of this torch is instantiated)
Ptr error_node(std::string msg, torch::autograd::edge_list&& edges) {
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<torch::autograd::Node>>)
    return std::make_shared<torch::autograd::Error>(std::move(msg), std::move(edges));
  else
    return c10::make_intrusive<torch::autograd::Error>(std::move(msg), std::move(edges));
}

}  // namespace

std::vector<Tensor> once_differentiable(const std::vector<Tensor>& incoming,
                                        const std::vector<Tensor>& grads, const std::string& op) {
  // Grad mode is on in a backward exactly when it runs with create_graph=True. The gradients
  // then depend on inputs that require grad even when the incoming gradient does not (a
  // gradient penalty differentiates d(loss)/d(x) of a scalar loss): checking only the incoming
  // gradients, as torch's @once_differentiable does, would let such a penalty drop silently.
  if (!at::GradMode::is_enabled()) return grads;
  // The returned gradients' grad_fn: a node that raises when reached, whose next edges are
  // those of the node now running (the op's inputs) and of the incoming gradients, so that it
  // lies on every path from these gradients back to the op's inputs: torch.autograd.grad(...,
  // inputs) and backward(inputs=...) run only the nodes on such paths. Nothing is saved for
  // it, so no saved tensor's version is checked (in-place edits of the loss stay allowed).
  // Outside the eager engine's node loop (compiled autograd, a direct call of a grad_fn) no
  // node is current, the op's input edges are unknown, and a refusal without them would let
  // grad(..., inputs) skip it: say so now rather than risk a silently partial result.
  const auto current = torch::autograd::get_current_node();
  TORCH_CHECK(current, op, ": create_graph=True is supported only in the eager autograd engine (not "
              "under compiled autograd, nor by calling a grad_fn directly): its gradient cannot be "
              "differentiated again");
  torch::autograd::edge_list edges = current->next_edges();
  for (const Tensor& t : incoming)
    if (t.defined() && t.requires_grad()) edges.push_back(torch::autograd::impl::gradient_edge(t));
  auto node = error_node(op + ": double backward (differentiating its gradient again, e.g. a gradient "
                              "penalty taken with create_graph=True) is not supported",
                         std::move(edges));
  std::vector<Tensor> out;
  out.reserve(grads.size());
  for (const Tensor& g : grads) {
    Tensor alias = g.defined() ? g.detach() : Tensor();  // (the same storage, no graph)
    if (alias.defined() && alias.is_floating_point()) torch::autograd::set_history(alias, node);
    out.push_back(alias);
  }
  return out;
}

std::vector<c10::IValue> call_below_autograd(const c10::OperatorHandle& op,
                                             std::vector<c10::IValue> stack) {
  at::AutoDispatchBelowADInplaceOrView guard;
  op.callBoxed(&stack);  // the results replace the arguments
  return stack;
}

namespace {

std::optional<Tensor> opt(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

struct RowLossFunction : public torch::autograd::Function<RowLossFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& logits_in,
                        const Tensor& target, const std::optional<Tensor>& weight,
                        const LossParams& p, int64_t reduction, bool inplace, bool fused, bool round_loss) {
    // The kernels need contiguous classes: copy once here, so that the backward reuses the
    // copy (and an in-place backward overwrites the copy, not the caller's tensor).
    // Rows that overlap in memory (an expanded tensor) are copied too when the gradient is
    // to be written over them.
    // (sym_size / sym_stride: under torch.compile an int read of a traced size fixes the
    // batch size into the graph, one compiled graph per batch size)
    const auto holds = [](const c10::SymBool& b) { return b.guard_bool(__FILE__, __LINE__); };
    const bool overlap = inplace && logits_in.dim() == 2 && holds(logits_in.sym_size(0) > 1) &&
                         holds(logits_in.sym_stride(0) < logits_in.sym_size(1));
    const Tensor logits = logits_in.dim() == 2 && holds(logits_in.sym_size(1) > 1) &&
                                  (holds(logits_in.sym_stride(1) != 1) || overlap)
                              ? logits_in.contiguous()
                              : logits_in;
    // the node's flags in one entry of saved_data (a map of IValues: an entry per value cost a
    // hashed insertion each, a tenth of a small call's host time); "params" holds the scalars
    ctx->saved_data["flags"] = std::vector<int64_t>{fused, inplace, reduction, int64_t(p.kind), p.ignore_index};
    if (fused) return loss_in(forward_with_grad(ctx, logits, target, weight, p, reduction, inplace), round_loss, logits);
    std::vector<c10::IValue> args{logits, target, weight, p.ignore_index};
    for (auto& v : scalar_args(p)) args.push_back(std::move(v));
    args.emplace_back(inplace);
    auto out = call_below_autograd(row_op(p.kind, kForwardOp), std::move(args));
    const Tensor rows = out[0].toTensor(), stat0 = out[1].toTensor(), stat1 = out[2].toTensor();
    Tensor denom;
    const Tensor loss =
        reduce_rows(rows, target, opt_weight(weight), logits.sym_size(1), reduction, p.ignore_index, denom);
    ctx->save_for_backward({logits, target, weight.value_or(Tensor()), stat0, stat1, denom});
    ctx->saved_data["params"] = pack_params(p);
    return loss_in(loss, round_loss, logits);
  }

  // grad_in_forward: the gradient for an incoming gradient of 1 is made with the forward (one
  // pass over the logits) and saved; the backward returns it, scaled when the incoming gradient
  // is not 1. On the CPU that is read (free); on CUDA reading it would wait for the GPU, so the
  // saved gradient is scaled in place on the device, rows whose factor is exactly 1 neither read
  // nor written (scale_rows_unless_one_cuda), and its version bumped: a second backward through
  // a retained graph (or a double backward, which runs this one again) then raises the op's own
  // error (see backward) instead of scaling twice. (Kept as a saved variable, not in saved_data: saved-tensor hooks such as
  // save_on_cpu and checkpointing see it.)
  // With inplace (inplace_backward=True too) the gradient is written over the logits (or over
  // forward()'s copy of them): no [N, C] allocation; their version is bumped before they are
  // saved, so that an op which saved them earlier raises rather than reads gradients.
  static Tensor forward_with_grad(torch::autograd::AutogradContext* ctx, const Tensor& logits,
                                  const Tensor& target, const std::optional<Tensor>& weight,
                                  const LossParams& p, int64_t reduction, bool inplace) {
    const auto fopts = logits.options().dtype(at::kFloat);
    const int64_t N = logits.size(0);
    Tensor grad_loss = at::empty({N}, fopts);
    if (reduction != kMean) {
      grad_loss.fill_(1.0);
#if defined(FASTLOSS_WITH_CUDA)
    } else if (one_launch_targets(target, opt_weight(weight), logits, N, logits.size(1))) {  // (one launch, not four)
      const c10::cuda::CUDAGuard guard(target.device());
      check_cuda_launch(mean_factor_rows_cuda(target.data_ptr<int64_t>(),
                                              opt_weight(weight) ? weight->data_ptr<float>() : nullptr, N,
                                              logits.size(1), p.ignore_index, grad_loss.data_ptr<float>(),
                                              cuda_stream()),
                        op_name(p.kind));
#endif
    } else {
      grad_loss.fill_(mean_denominator(target, opt_weight(weight), p.ignore_index).reciprocal());
    }
    std::vector<c10::IValue> args{grad_loss, logits, target, weight, p.ignore_index};
    for (auto& v : scalar_args(p)) args.push_back(std::move(v));
    auto out = call_below_autograd(row_op(p.kind, inplace ? kForwardGradInplaceOp : kForwardGradOp),
                                   std::move(args));
    Tensor denom;  // (reduce_rows' own divisor: the backward needs none)
    const Tensor loss =
        reduce_rows(out[0].toTensor(), target, opt_weight(weight), logits.size(1), reduction, p.ignore_index, denom);
    if (inplace) torch::autograd::impl::bump_version(logits);
    ctx->save_for_backward({inplace ? logits : out[3].toTensor()});
    return loss;
  }

  // The made gradient times the incoming gradient g (float32: [N] for reduction none, else one
  // value), without a host synchronisation; in_place says whether made itself was scaled.
  // over_logits (inplace_backward too): made is the logits, already overwritten, and is scaled
  // in place as well (no [N, C] allocation; its version bumped).
  static Tensor scale_made(const Tensor& made, const Tensor& g, bool per_row, bool over_logits,
                           bool& in_place) {
    in_place = false;
    const auto scale_in_place = [&] {
      in_place = true;
      if (per_row)
        made.mul_(g.unsqueeze(1));
      else
        made.mul_(g);
      torch::autograd::impl::bump_version(made);
      return made;
    };
    if (readable_cpu(g)) {  // (the CPU reads g for free: 1 returns the gradient as made)
      if (g.eq(1.0).all().item<bool>()) return made;
      if (over_logits) return scale_in_place();
      return (per_row ? made.mul(g.unsqueeze(1)) : made.mul(g)).to(made.scalar_type());
    }
#if defined(FASTLOSS_WITH_CUDA)
    if (made.is_cuda() && !traced_tensor(made) && !traced_tensor(g) && made.is_contiguous() && made.dim() == 2 &&
        g.is_cuda() && g.device() == made.device() && g.is_contiguous()) {
      const c10::cuda::CUDAGuard guard(made.device());
      check_cuda_launch(scale_rows_unless_one_cuda(made.data_ptr(), kernel_dtype(made, "grad_in_forward", "grad"),
                                                   made.size(0), made.size(1), g.data_ptr<float>(),
                                                   per_row, cuda_stream()),
                        "grad_in_forward");
      torch::autograd::impl::bump_version(made);
      in_place = true;
      return made;
    }
#endif
    if (over_logits && !traced_tensor(made)) return scale_in_place();  // (strided rows on CUDA)
    return (per_row ? made.mul(g.unsqueeze(1)) : made.mul(g)).to(made.scalar_type());  // (tracing)
  }

  // A backward that overwrote what it saved, or handed out its storage as the gradient (the
  // in-place modes; grad_in_forward's scaling on CUDA), marks the node: running it again (a
  // second backward through a retained graph, or a double backward, which reruns it) would
  // read a gradient instead of logits, and raises the op's own error rather than torch's
  // anonymous "modified by an inplace operation".
  // The flags saved by forward: fused, inplace, reduction, kind (the op's name in errors), ignore_index.
  struct Flags {
    bool fused, inplace;
    int64_t reduction;
    LossKind kind;
    int64_t ignore_index;
  };
  static Flags flags(torch::autograd::AutogradContext* ctx) {
    const auto f = ctx->saved_data.at("flags").toIntVector();
    return {f[0] != 0, f[1] != 0, f[2], LossKind(f[3]), f[4]};
  }

  static void refuse_second_run(torch::autograd::AutogradContext* ctx, LossKind kind) {
    TORCH_CHECK(!ctx->saved_data.count("consumed"), op_name(kind),
                ": a second backward or a double backward through this graph is not supported: the "
                "first backward overwrote the tensor it saved (inplace_backward=True, or "
                "grad_in_forward=True with a gradient scaled in place on CUDA); use the default "
                "mode for that");
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const Flags f = flags(ctx);
    refuse_second_run(ctx, f.kind);
    Tensor grad;
    if (ctx->needs_input_grad(0) && grads[0].defined() && f.fused) {
      const int64_t reduction = f.reduction;
      const bool over_logits = f.inplace;
      bool in_place = false;
      grad = scale_made(ctx->get_saved_variables()[0], grads[0].to(at::kFloat).contiguous(), reduction == kNone,
                        over_logits, in_place);
      if (over_logits || in_place) ctx->saved_data["consumed"] = true;
      // (the logits' storage, without their autograd identity: autograd.grad must not hand
      // back the input tensor itself)
      if (over_logits) grad = grad.detach();
    } else if (ctx->needs_input_grad(0) && grads[0].defined()) {
      const auto saved = ctx->get_saved_variables();
      const Tensor& logits = saved[0];
      const LossParams p = unpack_params(ctx->saved_data["params"].toDoubleVector(), f.ignore_index);
      const int64_t reduction = f.reduction;
      const bool inplace = f.inplace;
      // d(total)/d(row loss) for every row (the mean's divisor: the kept rows' class weights)
      const Tensor g = row_upstream(grads[0], reduction, logits.sym_size(0), saved[5]);
      std::vector<c10::IValue> args{g, logits, saved[1], opt(saved[2]), saved[3], saved[4],
                                    p.ignore_index};
      for (auto& v : scalar_args(p)) args.push_back(std::move(v));
      if (inplace) {
        call_below_autograd(row_op(p.kind, kBackwardInplaceOp), std::move(args));
        grad = logits.detach();  // (the same storage, not the input tensor itself)
        // The logits now hold the gradient: an op that saved them for its own backward must
        // raise ("modified by an inplace operation") rather than read gradients.
        torch::autograd::impl::bump_version(logits);
        ctx->saved_data["consumed"] = true;
      } else {
        grad = call_below_autograd(row_op(p.kind, kBackwardOp), std::move(args))[0].toTensor();
      }
    }
    return once_differentiable(grads, {grad, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()},
                               op_name(f.kind));
  }
};

Tensor row_loss(LossParams p, const Tensor& logits, const Tensor& target, const OptT& weight,
                int64_t reduction, bool inplace, bool grad_in_forward, bool round_loss) {
  TORCH_CHECK(reduction >= kNone && reduction <= kSum, op_name(p.kind),
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  const bool fused = grad_in_forward && at::GradMode::is_enabled() && logits.requires_grad();
  return RowLossFunction::apply(logits, target, weight, p, reduction, inplace, fused, round_loss);
}

// Backend kernels of the *_loss ops, reached without autograd (inference mode, or below it).
Tensor row_loss_no_grad(LossParams p, const Tensor& logits, const Tensor& target,
                        const OptT& weight, int64_t reduction, bool round_loss) {
  TORCH_CHECK(reduction >= kNone && reduction <= kSum, op_name(p.kind),
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  Tensor denom;
  const Tensor rows = std::get<0>(forward(op_name(p.kind), p, logits, target, weight));
  const int64_t C = logits.dim() == 2 ? logits.size(1) : 0;
  const Tensor loss = reduce_rows(rows, target, opt_weight(weight), C, reduction, p.ignore_index, denom);
  return loss_in(loss, round_loss, logits);
}

// One entry point per loss for both dispatch keys: `Grad` picks the autograd path.
template <bool Grad>
Tensor dispatch_loss(LossParams p, const Tensor& logits, const Tensor& target, const OptT& weight,
                     int64_t reduction, bool inplace, bool grad_in_forward, bool round_loss) {
  if constexpr (Grad)
    return row_loss(p, logits, target, weight, reduction, inplace, grad_in_forward, round_loss);
  else
    return row_loss_no_grad(p, logits, target, weight, reduction, round_loss);
}

template <bool Grad>
Tensor cross_entropy_loss(const Tensor& logits, const Tensor& target, const OptT& weight,
                          int64_t ignore_index, int64_t reduction, double label_smoothing,
                          double lse_square_scale, double softcap, bool inplace, bool grad_in_forward,
                          bool round_loss) {
  return dispatch_loss<Grad>(cross_entropy_params(ignore_index, label_smoothing, lse_square_scale, softcap),
                             logits, target, weight, reduction, inplace, grad_in_forward, round_loss);
}
template <bool Grad>
Tensor comp_sum_loss(const Tensor& logits, const Tensor& target, const OptT& weight,
                     int64_t ignore_index, int64_t reduction, double tau, bool inplace,
                     bool grad_in_forward, bool round_loss) {
  return dispatch_loss<Grad>(comp_sum_params(ignore_index, tau), logits, target, weight, reduction,
                             inplace, grad_in_forward, round_loss);
}
template <bool Grad>
Tensor ldr_loss(const Tensor& logits, const Tensor& target, const OptT& weight,
                int64_t ignore_index, int64_t reduction, double lam, double margin, bool adaptive,
                double alpha, bool inplace, bool grad_in_forward, bool round_loss) {
  return dispatch_loss<Grad>(ldr_params(ignore_index, lam, margin, adaptive, alpha), logits, target,
                             weight, reduction, inplace, grad_in_forward, round_loss);
}
template <bool Grad>
Tensor spherical_z_loss(const Tensor& logits, const Tensor& target, const OptT& weight,
                        int64_t ignore_index, int64_t reduction, double a, double b, double eps,
                        bool inplace, bool grad_in_forward, bool round_loss) {
  return dispatch_loss<Grad>(spherical_z_params(ignore_index, a, b, eps), logits, target, weight,
                             reduction, inplace, grad_in_forward, round_loss);
}
template <bool Grad>
Tensor stablemax_loss(const Tensor& logits, const Tensor& target, const OptT& weight,
                      int64_t ignore_index, int64_t reduction, bool inplace,
                      bool grad_in_forward, bool round_loss) {
  return dispatch_loss<Grad>(stablemax_params(ignore_index), logits, target, weight, reduction,
                             inplace, grad_in_forward, round_loss);
}

template <bool Grad>
void register_losses(torch::Library& m) {
  m.impl("cross_entropy_loss", &cross_entropy_loss<Grad>);
  m.impl("comp_sum_loss", &comp_sum_loss<Grad>);
  m.impl("ldr_loss", &ldr_loss<Grad>);
  m.impl("spherical_z_loss", &spherical_z_loss<Grad>);
  m.impl("stablemax_loss", &stablemax_loss<Grad>);
}

void register_impls(torch::Library& m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
  m.impl("comp_sum_forward", &comp_sum_forward);
  m.impl("comp_sum_backward", &comp_sum_backward);
  m.impl("ldr_forward", &ldr_forward);
  m.impl("ldr_backward", &ldr_backward);
  m.impl("spherical_z_forward", &spherical_z_forward);
  m.impl("spherical_z_backward", &spherical_z_backward);
  m.impl("stablemax_forward", &stablemax_forward);
  m.impl("stablemax_backward", &stablemax_backward);
  m.impl("cross_entropy_backward_", &cross_entropy_backward_);
  m.impl("comp_sum_backward_", &comp_sum_backward_);
  m.impl("ldr_backward_", &ldr_backward_);
  m.impl("spherical_z_backward_", &spherical_z_backward_);
  m.impl("stablemax_backward_", &stablemax_backward_);
  m.impl("cross_entropy_forward_grad", &cross_entropy_forward_grad);
  m.impl("comp_sum_forward_grad", &comp_sum_forward_grad);
  m.impl("ldr_forward_grad", &ldr_forward_grad);
  m.impl("spherical_z_forward_grad", &spherical_z_forward_grad);
  m.impl("stablemax_forward_grad", &stablemax_forward_grad);
  m.impl("cross_entropy_forward_grad_", &cross_entropy_forward_grad_);
  m.impl("comp_sum_forward_grad_", &comp_sum_forward_grad_);
  m.impl("ldr_forward_grad_", &ldr_forward_grad_);
  m.impl("spherical_z_forward_grad_", &spherical_z_forward_grad_);
  m.impl("stablemax_forward_grad_", &stablemax_forward_grad_);
  register_losses<false>(m);
}

}  // namespace
}  // namespace fastloss

TORCH_LIBRARY_IMPL(fastloss, CPU, m) { fastloss::register_impls(m); }
TORCH_LIBRARY_IMPL(fastloss, Autograd, m) { fastloss::register_losses<true>(m); }
// (above autograd: it builds graph nodes itself; any device)
TORCH_LIBRARY_IMPL(fastloss, CompositeImplicitAutograd, m) {
  m.impl("_refuse_second_order", [](at::TensorList grads, at::TensorList incoming, c10::string_view op) {
    return fastloss::once_differentiable(incoming.vec(), grads.vec(), std::string(op.data(), op.size()));
  });
}
#if defined(FASTLOSS_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastloss, CUDA, m) { fastloss::register_impls(m); }
#endif
