// The torch-aware side of the metric-driven losses: argument checks, allocation, threading and
// the CPU kernels (metric_losses_cpu_impl.h) or the CUDA kernels (metric_losses_cuda.cu).
// Schemas in registration.cpp; fake kernels, autograd and the reductions in
// python/fastloss/ops/metric_losses.py.
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(FASTLOSS_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif

#include "../common/huge_pages.h"
#include "../losses/losses_op.h"  // call_below_autograd, Reduction
#include "../op_helpers.h"
#include "metric_losses_kernels.h"

namespace fastloss {
namespace {

using at::Tensor;

// Rows per parallel task: about 16k elements.
int64_t grain(int64_t width) { return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(width, 1)); }

Tensor rows_out(const Tensor& like, int64_t n) { return at::empty({n}, like.options().dtype(at::kFloat)); }

Tensor grad_like(const Tensor& x) {
  Tensor g = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (g.numel() > 0 && g.is_cpu()) advise_huge_pages(g.data_ptr(), g.nbytes());
  return g;
}

// Tensors on the CPU, or on one CUDA device in a CUDA build.
void check_device(const Tensor& x, const Tensor& y, const char* op) {
  TORCH_CHECK(y.device() == x.device(), op, ": target is on ", y.device(), " but the input is on ",
              x.device());
#if defined(FASTLOSS_WITH_CUDA)
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), op, ": the fastloss kernels run on the CPU or a CUDA "
              "device, got ", x.device());
#else
  TORCH_CHECK(x.is_cpu(), op, ": the fastloss kernel runs on CPU tensors (this build has no CUDA "
              "kernels), got ", x.device());
#endif
}

#if defined(FASTLOSS_WITH_CUDA)
// Runs `cuda(stream)` for CUDA tensors (false: the caller runs the CPU kernels). Its call sites
// sit inside #if FASTLOSS_WITH_CUDA like every CUDA call of the op files (tests/test_build.py).
template <class F>
bool on_cuda(const Tensor& x, const char* op, F&& cuda) {
  if (!x.is_cuda()) return false;
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda_launch(cuda(cuda_stream()), op);
  return true;
}
#endif

// grad_rows [N] as contiguous float32 (autograd may hand an expanded scalar)
Tensor rows_grad(const Tensor& grad_rows, int64_t n, const Tensor& like, const char* op) {
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == n, op, ": grad_rows must be [N] = [", n,
              "], got shape ", grad_rows.sizes());
  TORCH_CHECK(grad_rows.device() == like.device(), op, ": grad_rows is on ", grad_rows.device(),
              " but the input is on ", like.device());
  return grad_rows.to(at::kFloat).contiguous();
}

// Logits (or scores) [N, K] and a float32 target of the same shape, both on the CPU.
struct Elementwise {
  Tensor x, y;
  ScalarType dtype;
  int64_t N, K;
};

Elementwise check_elementwise(const Tensor& x, const Tensor& y, const char* op, const char* xname) {
  TORCH_CHECK(x.dim() == 2, op, ": ", xname, " must be 2-D [N, K], got shape ", x.sizes());
  TORCH_CHECK(y.sizes() == x.sizes(), op, ": target must have ", xname, "'s shape ", x.sizes(),
              ", got ", y.sizes());
  TORCH_CHECK(y.scalar_type() == at::kFloat, op, ": target must be float32 here, got ", y.scalar_type());
  check_device(x, y, op);
  Elementwise e{x.contiguous(), y.contiguous(), kernel_dtype(x, op, xname), x.size(0), x.size(1)};
  return e;
}

SigmoidDiceProblem sigmoid_problem(const Elementwise& e, double alpha, double gamma, double smooth) {
  SigmoidDiceProblem q;
  q.logits = e.x.data_ptr();
  q.dtype = e.dtype;
  q.target = e.y.data_ptr<float>();
  q.N = e.N;
  q.K = e.K;
  q.p = {float(alpha), float(gamma), float(smooth)};
  return q;
}

void check_dice_params(double alpha, double gamma, double smooth, const char* op) {
  TORCH_CHECK(alpha >= 0 && gamma >= 0 && smooth >= 0, op, ": alpha, gamma and smooth must be >= 0, got ",
              alpha, ", ", gamma, ", ", smooth);
  TORCH_CHECK(gamma + smooth > 0, op, ": gamma and smooth are both 0 (a negative predicted as 0 is 0 / 0)");
}

Tensor dice_sigmoid_forward(const Tensor& logits, const Tensor& target, double alpha, double gamma,
                            double smooth) {
  constexpr const char* op = "dice_loss";
  check_dice_params(alpha, gamma, smooth, op);
  const Elementwise e = check_elementwise(logits, target, op, "logits");
  const SigmoidDiceProblem q = sigmoid_problem(e, alpha, gamma, smooth);
  Tensor rows = rows_out(logits, e.N);
  float* rp = rows.data_ptr<float>();
#if defined(FASTLOSS_WITH_CUDA)
  if (on_cuda(e.x, op, [&](void* s) { return dice_sigmoid_forward_cuda(q, rp, s); })) return rows;
#endif
  at::parallel_for(0, e.N, grain(e.K), [&](int64_t r0, int64_t r1) { dice_sigmoid_forward_cpu(q, rp, r0, r1); });
  return rows;
}

Tensor dice_sigmoid_backward(const Tensor& grad_rows, const Tensor& logits, const Tensor& target,
                             double alpha, double gamma, double smooth) {
  constexpr const char* op = "dice_loss";
  check_dice_params(alpha, gamma, smooth, op);
  const Elementwise e = check_elementwise(logits, target, op, "logits");
  const SigmoidDiceProblem q = sigmoid_problem(e, alpha, gamma, smooth);
  const Tensor g = rows_grad(grad_rows, e.N, e.x, op);
  Tensor grad = grad_like(e.x);
  const float* gp = g.data_ptr<float>();
  void* out = grad.data_ptr();
#if defined(FASTLOSS_WITH_CUDA)
  if (on_cuda(e.x, op, [&](void* s) { return dice_sigmoid_backward_cuda(q, gp, out, s); })) return grad;
#endif
  at::parallel_for(0, e.N, grain(e.K), [&](int64_t r0, int64_t r1) {
    dice_sigmoid_backward_cpu(q, gp, out, r0, r1);
  });
  return grad;
}

// logits [N, C] (classes contiguous) and integer target [N] holding classes or ignore_index.
struct SoftmaxChecked {
  Tensor x, y;
  SoftmaxDiceProblem q;
};

SoftmaxChecked check_softmax(const Tensor& logits, const Tensor& target, double alpha, double gamma,
                             double smooth, int64_t ignore_index) {
  constexpr const char* op = "dice_loss";
  check_dice_params(alpha, gamma, smooth, op);
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, C], got shape ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1 || logits.size(0) == 0, op, ": at least one class is needed");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op, ": target must be [N] = [",
              logits.size(0), "], got shape ", target.sizes());
  TORCH_CHECK(!at::isFloatingType(target.scalar_type()) && target.scalar_type() != at::kBool, op,
              ": target must hold integer class indices, got ", target.scalar_type());
  check_device(logits, target, op);
  SoftmaxChecked c;
  c.x = logits.size(1) <= 1 || logits.stride(1) == 1 ? logits : logits.contiguous();
  c.y = target.to(at::kLong).contiguous();
  const int64_t n = logits.size(0), classes = logits.size(1);
  const int64_t* yp = c.y.data_ptr<int64_t>();
  // (CUDA: not checked, a wait for the device per call; the kernel gives a bad row NaN, as
  // fastloss's cross_entropy kernels do)
  for (int64_t r = 0; logits.is_cpu() && r < n; ++r)
    TORCH_CHECK(yp[r] == ignore_index || (yp[r] >= 0 && yp[r] < classes), op, ": target[", r, "] = ",
                yp[r], " is outside [0, C = ", classes, ") and not ignore_index (", ignore_index, ")");
  SoftmaxDiceProblem& q = c.q;
  q.logits = c.x.data_ptr();
  q.dtype = kernel_dtype(c.x, op, "logits");
  q.target = yp;
  q.N = n;
  q.C = classes;
  q.stride = n > 1 ? c.x.stride(0) : classes;
  q.ignore_index = ignore_index;
  q.p = {float(alpha), float(gamma), float(smooth)};
  return c;
}

Tensor dice_softmax_forward(const Tensor& logits, const Tensor& target, double alpha, double gamma,
                            double smooth, int64_t ignore_index) {
  const SoftmaxChecked c = check_softmax(logits, target, alpha, gamma, smooth, ignore_index);
  Tensor rows = rows_out(logits, c.q.N);
  float* rp = rows.data_ptr<float>();
#if defined(FASTLOSS_WITH_CUDA)
  if (on_cuda(c.x, "dice_loss", [&](void* s) { return dice_softmax_forward_cuda(c.q, rp, s); })) return rows;
#endif
  at::parallel_for(0, c.q.N, grain(c.q.C), [&](int64_t r0, int64_t r1) {
    dice_softmax_forward_cpu(c.q, rp, r0, r1);
  });
  return rows;
}

Tensor dice_softmax_backward(const Tensor& grad_rows, const Tensor& logits, const Tensor& target,
                             double alpha, double gamma, double smooth, int64_t ignore_index) {
  const SoftmaxChecked c = check_softmax(logits, target, alpha, gamma, smooth, ignore_index);
  const Tensor g = rows_grad(grad_rows, c.q.N, c.x, "dice_loss");
  Tensor grad = grad_like(logits);
  const float* gp = g.data_ptr<float>();
  void* out = grad.data_ptr();
#if defined(FASTLOSS_WITH_CUDA)
  if (on_cuda(c.x, "dice_loss", [&](void* s) { return dice_softmax_backward_cuda(c.q, gp, out, s); })) return grad;
#endif
  at::parallel_for(0, c.q.N, grain(c.q.C), [&](int64_t r0, int64_t r1) {
    dice_softmax_backward_cpu(c.q, gp, out, r0, r1);
  });
  return grad;
}

ConfusionProblem confusion_problem(const Elementwise& e, double L, bool from_logits) {
  TORCH_CHECK(L > 0, "anyloss: L must be > 0, got ", L);
  ConfusionProblem q;
  q.scores = e.x.data_ptr();
  q.dtype = e.dtype;
  q.target = e.y.data_ptr<float>();
  q.N = e.N;
  q.K = e.K;
  q.L = float(L);
  q.from_logits = from_logits;
  return q;
}

// The cells are summed over blocks of rows fixed by the shape alone (not by the thread count)
// into float64 partial sums, which are then added in block order: the result does not depend
// on how many threads ran.
Tensor confusion_sums(const Tensor& scores, const Tensor& target, double L, bool from_logits) {
  const Elementwise e = check_elementwise(scores, target, "anyloss", "scores");
  const ConfusionProblem q = confusion_problem(e, L, from_logits);
  if (e.x.is_cuda()) {
    Tensor sums = at::empty({4, e.K}, scores.options().dtype(at::kFloat));
#if defined(FASTLOSS_WITH_CUDA)
    Tensor scratch = at::empty({confusion_sums_cuda_scratch(q)}, sums.options());
    on_cuda(e.x, "anyloss", [&](void* s) {
      return confusion_sums_cuda(q, sums.data_ptr<float>(), scratch.data_ptr<float>(), s);
    });
#endif
    return sums;
  }
  const int64_t rows_per_block = std::max<int64_t>(256, (int64_t(1) << 16) / std::max<int64_t>(e.K, 1));
  const int64_t blocks = (e.N + rows_per_block - 1) / rows_per_block;
  std::vector<double> partial(size_t(std::max<int64_t>(blocks, 1)) * 4 * e.K, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      confusion_sums_cpu(q, partial.data() + b * 4 * e.K, b * rows_per_block,
                         std::min(e.N, (b + 1) * rows_per_block));
  });
  Tensor sums = at::empty({4, e.K}, scores.options().dtype(at::kFloat));
  float* sp = sums.data_ptr<float>();
  for (int64_t i = 0; i < 4 * e.K; ++i) {
    double s = 0.0;
    for (int64_t b = 0; b < blocks; ++b) s += partial[size_t(b * 4 * e.K + i)];
    sp[i] = float(s);
  }
  return sums;
}

Tensor confusion_sums_backward(const Tensor& grad_sums, const Tensor& scores, const Tensor& target,
                               double L, bool from_logits) {
  const Elementwise e = check_elementwise(scores, target, "anyloss", "scores");
  const ConfusionProblem q = confusion_problem(e, L, from_logits);
  TORCH_CHECK(grad_sums.dim() == 2 && grad_sums.size(0) == 4 && grad_sums.size(1) == e.K,
              "anyloss: grad_sums must be [4, K] = [4, ", e.K, "], got shape ", grad_sums.sizes());
  TORCH_CHECK(grad_sums.device() == e.x.device(), "anyloss: grad_sums is on ", grad_sums.device(),
              " but scores is on ", e.x.device());
  const Tensor gs = grad_sums.to(at::kFloat).contiguous();
  Tensor grad = grad_like(e.x);
  const float* gp = gs.data_ptr<float>();
  void* out = grad.data_ptr();
#if defined(FASTLOSS_WITH_CUDA)
  if (on_cuda(e.x, "anyloss", [&](void* s) { return confusion_backward_cuda(q, gp, out, s); })) return grad;
#endif
  at::parallel_for(0, e.N, grain(e.K), [&](int64_t r0, int64_t r1) {
    confusion_backward_cpu(q, gp, out, r0, r1);
  });
  return grad;
}

// ---- the eager paths: forward, reduction and a C++ autograd formula in one op ------------------
// (python/fastloss/ops/metric_losses.py calls them; Python autograd on the forward ops and the
// metric's small tensor operations cost 130-220 us of host time per call, all of a small call
// on a GPU). The formulas call the ops above through the dispatcher, below autograd, so
// torch.compile traces their fake kernels.

c10::OperatorHandle metric_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

struct DiceLossFunction : public torch::autograd::Function<DiceLossFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& logits,
                        const Tensor& target, bool softmax, double alpha, double gamma, double smooth,
                        int64_t ignore_index, int64_t reduction, bool round_loss) {
    static const auto sig = metric_op("fastloss::dice_sigmoid_forward");
    static const auto soft = metric_op("fastloss::dice_softmax_forward");
    std::vector<c10::IValue> args{logits, target, alpha, gamma, smooth};
    if (softmax) args.emplace_back(ignore_index);
    const Tensor rows = call_below_autograd(softmax ? soft : sig, std::move(args))[0].toTensor();
    // softmax: the mean over the rows kept (F.cross_entropy's)
    const Tensor count = softmax && reduction == kMean ? target.ne(ignore_index).sum() : Tensor();
    const Tensor loss = reduce_loss_rows(rows, reduction, count);
    ctx->save_for_backward({logits, target, count});
    ctx->saved_data["softmax"] = softmax;
    ctx->saved_data["params"] = std::vector<double>{alpha, gamma, smooth};
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    return loss_in(loss, round_loss, logits);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto sig = metric_op("fastloss::dice_sigmoid_backward");
    static const auto soft = metric_op("fastloss::dice_softmax_backward");
    Tensor grad;
    if (ctx->needs_input_grad(0) && grads[0].defined()) {
      const auto saved = ctx->get_saved_variables();
      const bool softmax = ctx->saved_data["softmax"].toBool();
      const auto params = ctx->saved_data["params"].toDoubleVector();
      const int64_t reduction = ctx->saved_data["reduction"].toInt();
      const Tensor g = row_upstream(grads[0], reduction, saved[0].sym_size(0), saved[2]);
      std::vector<c10::IValue> args{g, saved[0], saved[1], params[0], params[1], params[2]};
      if (softmax) args.emplace_back(ctx->saved_data["ignore_index"]);
      grad = call_below_autograd(softmax ? soft : sig, std::move(args))[0].toTensor();
    }
    return once_differentiable(grads, {grad, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
                                       Tensor()},
                               "dice_loss");
  }
};

template <bool Grad>
Tensor dice_loss(const Tensor& logits, const Tensor& target, bool softmax, double alpha,
                 double gamma, double smooth, int64_t ignore_index, int64_t reduction, bool round_loss) {
  TORCH_CHECK(reduction >= kNone && reduction <= kSum,
              "dice_loss: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  if constexpr (Grad)
    return DiceLossFunction::apply(logits, target, softmax, alpha, gamma, smooth, ignore_index,
                                   reduction, round_loss);
  const Tensor rows = softmax ? dice_softmax_forward(logits, target, alpha, gamma, smooth, ignore_index)
                              : dice_sigmoid_forward(logits, target, alpha, gamma, smooth);
  const Tensor count = softmax && reduction == kMean ? target.ne(ignore_index).sum() : Tensor();
  return loss_in(reduce_loss_rows(rows, reduction, count), round_loss, logits);
}

enum Metric : int64_t { kF1 = 0, kFbeta = 1, kAccuracy = 2, kBalancedAccuracy = 3, kGmean = 4 };

// The metric of each column from its confusion sums c [4, K] (TP, FN, FP, TN), and with
// `dm` (d total / d metric [K]) defined, d total / d c [4, K] instead.
Tensor metric_of(const Tensor& c, int64_t metric, double beta, const Tensor& dm = Tensor()) {
  const Tensor tp = c[0], fn = c[1], fp = c[2], tn = c[3];
  if (metric == kF1 || metric == kFbeta) {  // (1 + b2) tp / ((1 + b2) tp + b2 fn + fp)
    const double b2 = metric == kF1 ? 1.0 : beta * beta;
    const Tensor a = tp.mul(1 + b2), d = a + fn.mul(b2) + fp;
    if (!dm.defined()) return a / d;
    const Tensor k = dm / d.square();
    return at::stack({k * (fn.mul(b2) + fp).mul(1 + b2), -k * a.mul(b2), -k * a, at::zeros_like(tn)});
  }
  if (metric == kAccuracy) {  // (tp + tn) / (tp + tn + fp + fn)
    const Tensor right = tp + tn, s = right + fp + fn;
    if (!dm.defined()) return right / s;
    const Tensor up = dm * (fp + fn) / s.square(), down = -dm * right / s.square();
    return at::stack({up, down, down, up});
  }
  const Tensor pos = tp + fn, neg = tn + fp, tpr = tp / pos, tnr = tn / neg;
  if (!dm.defined())
    return metric == kBalancedAccuracy ? (tpr + tnr).div(2) : at::sqrt(tpr * tnr);
  // d metric / d tpr and / d tnr, then through tpr = tp / (tp + fn), tnr = tn / (tn + fp)
  Tensor d_tpr, d_tnr;
  if (metric == kBalancedAccuracy) {
    d_tpr = dm.div(2);
    d_tnr = d_tpr;
  } else {
    const Tensor m = at::sqrt(tpr * tnr);
    d_tpr = dm * tnr / (m * 2);
    d_tnr = dm * tpr / (m * 2);
  }
  return at::stack({d_tpr * fn / pos.square(), -d_tpr * tp / pos.square(),
                    -d_tnr * tn / neg.square(), d_tnr * fp / neg.square()});
}

struct AnyLossFunction : public torch::autograd::Function<AnyLossFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& scores,
                        const Tensor& target, int64_t metric, double L, double beta,
                        bool from_logits, bool round_loss) {
    static const auto sums = metric_op("fastloss::confusion_sums");
    const Tensor c = call_below_autograd(sums, {scores, target, L, from_logits})[0].toTensor();
    ctx->save_for_backward({scores, target, c});
    ctx->saved_data["metric"] = metric;
    ctx->saved_data["L"] = L;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["from_logits"] = from_logits;
    return loss_in(metric_of(c, metric, beta).neg().add(1).mean(), round_loss, scores);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto sums_backward = metric_op("fastloss::confusion_sums_backward");
    Tensor grad;
    if (ctx->needs_input_grad(0) && grads[0].defined()) {
      const auto saved = ctx->get_saved_variables();
      const Tensor& c = saved[2];
      // loss = mean over the K columns of 1 - metric: d loss / d metric = -g / K
      const Tensor dm = at::empty({c.size(1)}, c.options()).fill_(grads[0].to(at::kFloat).neg().div(double(c.size(1))));
      const Tensor dc = metric_of(c, ctx->saved_data["metric"].toInt(), ctx->saved_data["beta"].toDouble(), dm);
      grad = call_below_autograd(sums_backward, {dc.contiguous(), saved[0], saved[1], ctx->saved_data["L"],
                                                 ctx->saved_data["from_logits"]})[0]
                 .toTensor();
    }
    return once_differentiable(grads, {grad, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()}, "anyloss");
  }
};

template <bool Grad>
Tensor anyloss(const Tensor& scores, const Tensor& target, int64_t metric, double L, double beta,
               bool from_logits, bool round_loss) {
  TORCH_CHECK(metric >= kF1 && metric <= kGmean, "anyloss: metric must be 0 (f1) .. 4 (gmean), got ", metric);
  if constexpr (Grad) return AnyLossFunction::apply(scores, target, metric, L, beta, from_logits, round_loss);
  return loss_in(metric_of(confusion_sums(scores, target, L, from_logits), metric, beta).neg().add(1).mean(),
                 round_loss, scores);
}

template <bool Grad>
void register_losses(torch::Library& m) {
  m.impl("dice_loss", &dice_loss<Grad>);
  m.impl("anyloss", &anyloss<Grad>);
}

}  // namespace
}  // namespace fastloss

TORCH_LIBRARY_IMPL(fastloss, Autograd, m) { fastloss::register_losses<true>(m); }

namespace fastloss {
namespace {
void register_impls(torch::Library& m) {
  register_losses<false>(m);
  m.impl("dice_sigmoid_forward", &dice_sigmoid_forward);
  m.impl("dice_sigmoid_backward", &dice_sigmoid_backward);
  m.impl("dice_softmax_forward", &dice_softmax_forward);
  m.impl("dice_softmax_backward", &dice_softmax_backward);
  m.impl("confusion_sums", &confusion_sums);
  m.impl("confusion_sums_backward", &confusion_sums_backward);
}
}  // namespace
}  // namespace fastloss

TORCH_LIBRARY_IMPL(fastloss, CPU, m) { fastloss::register_impls(m); }
#if defined(FASTLOSS_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastloss, CUDA, m) { fastloss::register_impls(m); }
#endif
