// The torch-aware side of the logit-distillation losses: argument checks, allocation, and the
// CPU kernels (kd_cpu_impl.h, kd_rank_impl.h) or the CUDA kernels (kd_cuda.cu; PLD's sort of
// the teacher is torch's).
// Schemas in registration.cpp; fake kernels and autograd in python/fastloss/ops/distill.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/where.h>
#include <c10/util/Exception.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#if defined(FASTLOSS_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif

#include "../common/huge_pages.h"
#include "../losses/losses_op.h"  // call_below_autograd, Reduction
#include "../op_helpers.h"
#include "kd_kernels.h"

namespace fastloss {
namespace {

using at::Tensor;
constexpr const char* kOp = "kd_loss";

// student and teacher [N, C] of one float dtype on the CPU (or a CUDA device where the op has
// a CUDA kernel), classes contiguous.
struct Pair {
  Tensor student, teacher;
  ScalarType dtype;
  int64_t N, C, s_stride, t_stride;
};

Pair check_pair(const Tensor& student, const Tensor& teacher, const char* op, bool cuda_kernel = false) {
  TORCH_CHECK(student.dim() == 2, op, ": student must be 2-D [N, C], got shape ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), op, ": teacher must have student's shape ",
              student.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), op, ": teacher is ",
              teacher.scalar_type(), " but student is ", student.scalar_type());
  TORCH_CHECK(teacher.device() == student.device(), op, ": teacher is on ", teacher.device(),
              " but student is on ", student.device());
#if defined(FASTLOSS_WITH_CUDA)
  TORCH_CHECK(student.is_cpu() || (cuda_kernel && student.is_cuda()), op,
              ": the fastloss kernel runs on the CPU", cuda_kernel ? " or a CUDA device" : "",
              ", got ", student.device());
#else
  TORCH_CHECK(student.is_cpu(), op, ": the fastloss kernel runs on the CPU (this build has no "
              "CUDA kernels), got ", student.device());
#endif
  TORCH_CHECK(student.size(1) >= 1 || student.size(0) == 0, op, ": at least one class is needed");
  Pair p;
  p.student = student.size(1) <= 1 || student.stride(1) == 1 ? student : student.contiguous();
  p.teacher = teacher.size(1) <= 1 || teacher.stride(1) == 1 ? teacher : teacher.contiguous();
  p.dtype = kernel_dtype(p.student, op, "student");
  p.N = student.size(0);
  p.C = student.size(1);
  p.s_stride = p.N > 1 ? p.student.stride(0) : p.C;
  p.t_stride = p.N > 1 ? p.teacher.stride(0) : p.C;
  return p;
}

// A kernel problem (KdProblem, TopkKlProblem, PldProblem) with the pair's pointers and sizes.
template <class Problem>
Problem problem_of(const Pair& p) {
  Problem q;
  q.student = p.student.data_ptr();
  q.teacher = p.teacher.data_ptr();
  q.dtype = p.dtype;
  q.N = p.N;
  q.C = p.C;
  q.s_stride = p.s_stride;
  q.t_stride = p.t_stride;
  return q;
}

struct Checked {
  Pair pair;
  KdProblem q;
};

Checked check(const Tensor& student, const Tensor& teacher, int64_t kind, double temperature,
              double beta) {
  TORCH_CHECK(kind >= 0 && kind <= 2, kOp, ": kind must be 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got ", kind);
  TORCH_CHECK(temperature > 0.0, kOp, ": temperature must be > 0, got ", temperature);
  TORCH_CHECK(kind != 2 || (beta > 0.0 && beta < 1.0), kOp, ": beta must be in (0, 1) for jsd, got ", beta);
  Checked c{check_pair(student, teacher, kOp, /*cuda_kernel=*/true), {}};
  KdProblem& q = c.q = problem_of<KdProblem>(c.pair);
  q.kind = KdKind(kind);
  q.temperature = float(temperature);
  q.beta = float(beta);
  return c;
}

int64_t grain(int64_t C) { return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(C, 1)); }

// -> (loss of each row [N] float32, statistics [N, 3] float32 for the backward)
std::tuple<Tensor, Tensor> kd_forward(const Tensor& student, const Tensor& teacher, int64_t kind,
                                      double temperature, double beta) {
  const Checked c = check(student, teacher, kind, temperature, beta);
  const auto f32 = student.options().dtype(at::kFloat);
  Tensor loss = at::empty({c.q.N}, f32), stats = at::empty({c.q.N, 3}, f32);
  float* lp = loss.data_ptr<float>();
  float* sp = stats.data_ptr<float>();
  if (student.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(student.device());
    check_cuda_launch(kd_forward_cuda(c.q, lp, sp, cuda_stream()), kOp);
#endif
    return {loss, stats};
  }
  at::parallel_for(0, c.q.N, grain(c.q.C), [&](int64_t r0, int64_t r1) {
    kd_forward_cpu(c.q, lp, sp, r0, r1);
  });
  return {loss, stats};
}

Tensor kd_backward(const Tensor& grad_loss, const Tensor& student, const Tensor& teacher,
                   const Tensor& stats, int64_t kind, double temperature, double beta) {
  const Checked c = check(student, teacher, kind, temperature, beta);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == c.q.N && stats.dim() == 2 &&
                  stats.size(0) == c.q.N && stats.size(1) == 3,
              kOp, ": grad_loss must be [N] and stats [N, 3]");
  const Tensor g = grad_loss.to(at::kFloat).contiguous(), st = stats.to(at::kFloat).contiguous();
  TORCH_CHECK(grad_loss.device() == student.device() && stats.device() == student.device(), kOp,
              ": grad_loss and stats must be on student's device ", student.device());
  Tensor grad = at::empty({c.q.N, c.q.C}, student.options());
  if (grad.numel() == 0) return grad;
  const float* gp = g.data_ptr<float>();
  const float* sp = st.data_ptr<float>();
  void* out = grad.data_ptr();
  if (student.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(student.device());
    check_cuda_launch(kd_backward_cuda(c.q, gp, sp, out, cuda_stream()), kOp);
#endif
    return grad;
  }
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
  at::parallel_for(0, c.q.N, grain(c.q.C), [&](int64_t r0, int64_t r1) {
    kd_backward_cpu(c.q, gp, sp, out, r0, r1);
  });
  return grad;
}

// -> (loss of each row [N] float32, grad_scale * d row / d student [N, C]): both in one pass
// per row (CPU; kd_cpu_impl.h's forward_grad_rows).
std::tuple<Tensor, Tensor> kd_forward_grad(const Tensor& student, const Tensor& teacher, int64_t kind,
                                           double temperature, double beta, double grad_scale) {
  const Checked c = check(student, teacher, kind, temperature, beta);
  TORCH_CHECK(student.is_cpu(), kOp, ": kd_forward_grad runs on the CPU (on CUDA kd_forward and "
              "kd_backward), got a tensor on ", student.device());
  Tensor loss = at::empty({c.q.N}, student.options().dtype(at::kFloat));
  Tensor grad = at::empty({c.q.N, c.q.C}, student.options());
  if (grad.numel() > 0) advise_huge_pages(grad.data_ptr(), grad.nbytes());
  float* lp = loss.data_ptr<float>();
  void* gp = grad.data_ptr();
  at::parallel_for(0, c.q.N, grain(c.q.C), [&](int64_t r0, int64_t r1) {
    kd_forward_grad_cpu(c.q, float(grad_scale), lp, gp, r0, r1);
  });
  return {loss, grad};
}

// The gradient buffer of the order-based losses: [N, C] in the student's dtype, or an empty
// tensor (and a null pointer for the kernel) when not asked for.
// The rank losses' shared output: each row's loss [N] float32, and (compute_grad) the
// gradient [N, C] in the student's dtype (else empty), filled by
// kernel(loss, grad or nullptr, r0, r1) over blocks of rows.
template <class Kernel>
std::tuple<Tensor, Tensor> rows_and_grad(const Pair& p, bool compute_grad, Kernel kernel) {
  Tensor loss = at::empty({p.N}, p.student.options().dtype(at::kFloat));
  const Tensor grad = compute_grad ? at::empty({p.N, p.C}, p.student.options())
                                   : at::empty({0}, p.student.options());
  if (grad.numel() > 0) advise_huge_pages(grad.data_ptr(), grad.nbytes());
  float* lp = loss.data_ptr<float>();
  void* gp = compute_grad ? grad.data_ptr() : nullptr;
  at::parallel_for(0, p.N, grain(p.C), [&](int64_t r0, int64_t r1) { kernel(lp, gp, r0, r1); });
  return {loss, grad};
}

// -> (T^2-scaled loss of each row [N] float32, d loss_r / d student [N, C] or empty)
std::tuple<Tensor, Tensor> topk_kl_forward(const Tensor& student, const Tensor& teacher,
                                           int64_t k, double temperature, bool renormalize,
                                           bool compute_grad, double grad_scale) {
  constexpr const char* op = "topk_kl_loss";
  const Pair p = check_pair(student, teacher, op, /*cuda_kernel=*/true);
  TORCH_CHECK(k >= 1 && (k <= p.C || p.N == 0), op, ": k must be in [1, C = ", p.C, "], got ", k);
  TORCH_CHECK(temperature > 0.0, op, ": temperature must be > 0, got ", temperature);
  auto q = problem_of<TopkKlProblem>(p);
  q.k = k;
  q.temperature = float(temperature);
  q.renormalize = renormalize;
  q.grad_scale = float(grad_scale);
  // (the selection counts classes in 32 bits, on the CPU as on CUDA)
  TORCH_CHECK(p.C < (int64_t(1) << 32), op, ": at most 2^32 - 1 classes, got ", p.C);
  if (student.is_cuda()) {
    Tensor loss = at::empty({p.N}, p.student.options().dtype(at::kFloat));
    Tensor grad = compute_grad ? at::empty({p.N, p.C}, p.student.options()) : at::empty({0}, p.student.options());
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(student.device());
    check_cuda_launch(topk_kl_cuda(q, loss.data_ptr<float>(), compute_grad ? grad.data_ptr() : nullptr,
                                   cuda_stream()), op);
#endif
    if (grad_scale != 1.0) grad.mul_(grad_scale);  // (the CUDA kernels write the plain gradient)
    return {loss, grad};
  }
  return rows_and_grad(p, compute_grad, [&](float* lp, void* gp, int64_t r0, int64_t r1) {
    topk_kl_cpu(q, lp, gp, r0, r1);
  });
}

// -> (loss of each row [N] float32 (0 where ignored), d loss_r / d student [N, C] or empty)
std::tuple<Tensor, Tensor> pld_forward(const Tensor& student, const Tensor& teacher,
                                       const Tensor& target, double temperature,
                                       int64_t ignore_index, bool compute_grad, double grad_scale) {
  constexpr const char* op = "pld_loss";
  const Pair p = check_pair(student, teacher, op, /*cuda_kernel=*/true);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == p.N, op, ": target must be [N] = [", p.N,
              "], got shape ", target.sizes());
  TORCH_CHECK(target.device() == student.device(), op, ": target is on ", target.device(),
              " but student is on ", student.device());
  TORCH_CHECK(!at::isFloatingType(target.scalar_type()) && target.scalar_type() != at::kBool, op,
              ": target must hold integer class indices, got ", target.scalar_type());
  TORCH_CHECK(temperature > 0.0, op, ": temperature must be > 0, got ", temperature);
  TORCH_CHECK(p.C < (int64_t(1) << 32), op, ": at most 2^32 classes, got ", p.C);
  const Tensor y = target.to(at::kLong).contiguous();
  auto q = problem_of<PldProblem>(p);
  q.ignore_index = ignore_index;
  q.temperature = float(temperature);
  q.grad_scale = float(grad_scale);
  if (student.is_cuda()) {
    // the classes are not checked here (that would wait for the device on every call): the
    // kernel gives a row whose target is out of range a NaN loss and gradient, as fastloss's
    // cross_entropy kernels do (torch's own CUDA cross_entropy raises a device-side assert)
    Tensor loss = at::empty({p.N}, p.student.options().dtype(at::kFloat));
    Tensor grad = compute_grad ? at::empty({p.N, p.C}, p.student.options()) : at::empty({0}, p.student.options());
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(student.device());
    // the teacher's order by descending logit, ties towards the lower class (stable), and both
    // rows in that order (the kernel then reads ranks in sequence, not classes through order)
    const auto [sorted_teacher, order] = p.teacher.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true);
    const Tensor sorted_student = p.student.gather(1, order);
    Tensor scratch = at::empty({compute_grad ? pld_cuda_scratch(q) : 0}, loss.options());
    q.target = y.data_ptr<int64_t>();
    check_cuda_launch(pld_cuda(q, order.data_ptr<int64_t>(), sorted_teacher.contiguous().data_ptr(),
                               sorted_student.contiguous().data_ptr(),
                               compute_grad ? scratch.data_ptr<float>() : nullptr, loss.data_ptr<float>(),
                               compute_grad ? grad.data_ptr() : nullptr, cuda_stream()),
                      op);
#endif
    if (grad_scale != 1.0) grad.mul_(grad_scale);
    return {loss, grad};
  }
  const int64_t* yp = y.data_ptr<int64_t>();
  for (int64_t r = 0; r < p.N; ++r)
    TORCH_CHECK(yp[r] == ignore_index || (yp[r] >= 0 && yp[r] < p.C), op, ": target[", r, "] = ",
                yp[r], " is not a class in [0, ", p.C, ") nor ignore_index (", ignore_index, ")");
  q.target = yp;
  return rows_and_grad(p, compute_grad, [&](float* lp, void* gp, int64_t r0, int64_t r1) {
    pld_cpu(q, lp, gp, r0, r1);
  });
}

// The backward of the order-based losses: their saved gradient [N, C] times each row's
// upstream gradient, into a fresh tensor advised as huge pages before its first touch (a
// plain `grad * scale[:, None]` spends most of its time faulting in 4 KiB pages: 50 ms of
// 57 for 256 x 128256 float32, measured).
Tensor scale_rows(const Tensor& grad, const Tensor& scale) {
  TORCH_CHECK(grad.dim() == 2 && scale.dim() == 1 && scale.size(0) == grad.size(0),
              "scale_rows: grad must be [N, C] and scale [N], got ", grad.sizes(), " and ",
              scale.sizes());
  Tensor out = at::empty(grad.sizes(), grad.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() > 0) advise_huge_pages(out.data_ptr(), out.nbytes());
  at::mul_out(out, grad, scale.to(grad.scalar_type()).unsqueeze(1));
  return out;
}

// ---- kd_loss's eager path: forward, reduction and a C++ autograd formula in one op -----------
// (python/fastloss/ops/distill.py calls it; the Python autograd of kd_forward cost ~80 us of
// host time per call, most of a small call and all of it on a GPU). The formula calls the ops
// below autograd, so torch.compile traces it into them. On the CPU, when the student will want
// its gradient, the forward makes it with the rows (kd_forward_grad, scaled by the mean's 1 / N),
// and the backward hands that buffer over, scaled in place unless the incoming gradient is
// exactly 1 (a later backward through a retained graph makes it again); elsewhere kd_forward
// keeps three floats per row and kd_backward reads both rows again.

const c10::OperatorHandle& kd_op(int which) {  // 0: kd_forward, 1: kd_backward, 2: kd_forward_grad
  static const auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("fastloss::kd_forward", "");
  static const auto bwd = c10::Dispatcher::singleton().findSchemaOrThrow("fastloss::kd_backward", "");
  static const auto both = c10::Dispatcher::singleton().findSchemaOrThrow("fastloss::kd_forward_grad", "");
  return which == 0 ? fwd : which == 1 ? bwd : both;
}

struct KdLossFunction : public torch::autograd::Function<KdLossFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& student,
                        const Tensor& teacher, int64_t kind, double temperature, double beta,
                        int64_t reduction, bool want, bool round_loss) {
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["reduction"] = reduction;
    Tensor rows;
    // (float16: the made gradient's small entries would be flushed to zero before a large
    // upstream, e.g. a loss scale, multiplies them; its backward forms them in float32 first)
    // (real CPU tensors: traced ones take kd_forward, whose backward keeps the batch size
    // symbolic; the fold reads it as a number)
    if (want && readable_cpu(student) && student.scalar_type() != at::kHalf) {
      const double scale = reduction == kMean ? 1.0 / double(std::max<int64_t>(student.size(0), 1)) : 1.0;
      auto out = call_below_autograd(kd_op(2), {student, teacher, kind, temperature, beta, scale});
      rows = out[0].toTensor();
      ctx->saved_data["grad"] = out[1].toTensor();  // (not a saved variable: handed over)
      ctx->saved_data["grad_scale"] = scale;
      ctx->save_for_backward({student, teacher});
    } else {
      auto out = call_below_autograd(kd_op(0), {student, teacher, kind, temperature, beta});
      rows = out[0].toTensor();
      ctx->save_for_backward({student, teacher, out[1].toTensor()});
    }
    return loss_in(reduce_loss_rows(rows, reduction), round_loss, student);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    Tensor grad;
    if (ctx->needs_input_grad(0) && grads[0].defined()) {
      const int64_t reduction = ctx->saved_data["reduction"].toInt();
      const auto& k = ctx->saved_data["kind"];
      const auto& T = ctx->saved_data["temperature"];
      const auto& b = ctx->saved_data["beta"];
      if (ctx->saved_data.count("grad_scale")) {  // made by the forward (CPU)
        grad = take_kept_gradient(ctx->saved_data["grad"]);
        if (!grad.defined()) {  // a second backward through a retained graph
          const auto saved = ctx->get_saved_variables();  // (only now: their versions checked)
          grad = call_below_autograd(kd_op(2), {saved[0], saved[1], k, T, b, ctx->saved_data["grad_scale"]})[1]
                     .toTensor();
        }
        // (the mean's 1 / N is in already)
        grad = scale_by_upstream(std::move(grad), grads[0].to(at::kFloat), reduction == kNone);
      } else {
        const auto saved = ctx->get_saved_variables();
        // d(total)/d(row loss) for every row
        const Tensor g = row_upstream(grads[0], reduction, saved[0].sym_size(0));
        grad = call_below_autograd(kd_op(1), {g, saved[0], saved[1], saved[2], k, T, b})[0].toTensor();
      }
    }
    return once_differentiable(grads, {grad, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()},  // the teacher: a target
                               kOp);
  }
};

template <bool Grad>
Tensor kd_loss(const Tensor& student, const Tensor& teacher, int64_t kind, double temperature,
               double beta, int64_t reduction, bool round_loss) {
  TORCH_CHECK(reduction >= kNone && reduction <= kSum, kOp,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  if constexpr (Grad)  // the gradient is made in the forward only when it will be wanted
    return KdLossFunction::apply(student, teacher, kind, temperature, beta, reduction,
                                 at::GradMode::is_enabled() && student.requires_grad(), round_loss);
  return loss_in(reduce_loss_rows(std::get<0>(kd_forward(student, teacher, kind, temperature, beta)), reduction),
                 round_loss, student);
}

// ---- topk_kl_loss / pld_loss's eager paths, the same way ----------------------------------------
// Their forward ops make d row / d student with the rows when asked (compute_grad). The backward
// scales that buffer's rows in place by d(total) / d(row) and hands it over (no second [N, C]
// buffer: at 1024 x 32000 float32 that was 125 MiB more and a fresh allocation's page faults per
// step); when the incoming gradient of a sum is exactly 1 and readable without a device
// synchronisation, there is nothing to scale. A later backward through a retained graph finds
// the buffer gone and makes it again from the saved inputs.

const c10::OperatorHandle& rank_op(bool pld) {
  static const auto topk = c10::Dispatcher::singleton().findSchemaOrThrow("fastloss::topk_kl_forward", "");
  static const auto pl = c10::Dispatcher::singleton().findSchemaOrThrow("fastloss::pld_forward", "");
  return pld ? pl : topk;
}

// The forward op's outputs (rows, d rows / d student when `want`).
std::vector<c10::IValue> rank_forward(const Tensor& student, const Tensor& teacher,
                                      const std::optional<Tensor>& target, int64_t k_or_ignore,
                                      double temperature, bool renormalize, bool want,
                                      double grad_scale) {
  const bool pld = target.has_value();
  std::vector<c10::IValue> args{student, teacher};
  if (pld) args.emplace_back(*target);
  else args.emplace_back(k_or_ignore);
  args.emplace_back(temperature);
  if (pld) args.emplace_back(k_or_ignore);
  else args.emplace_back(renormalize);
  args.emplace_back(want);
  args.emplace_back(grad_scale);
  return call_below_autograd(rank_op(pld), std::move(args));
}

struct RankLossFunction : public torch::autograd::Function<RankLossFunction> {
  // target defined: PLD (k_or_ignore = ignore_index), else top-k KL (k_or_ignore = k)
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& student,
                        const Tensor& teacher, const std::optional<Tensor>& target,
                        int64_t k_or_ignore, double temperature, bool renormalize, int64_t reduction,
                        bool want, bool round_loss) {
    const bool pld = target.has_value();
    // PLD's mean is over the rows kept (F.cross_entropy's); top-k KL's over all rows
    const Tensor count = pld && reduction == kMean ? target->ne(k_or_ignore).sum() : Tensor();
    // On the CPU the mean's divisor is folded into the gradient the kernels write (no pass of
    // the backward over it for loss.backward()); 0 when no row is kept (a zero gradient)
    // (float16: not folded, as kd_loss's gradient is not made in its forward: its range would
    // flush the scaled entries)
    double scale = 1.0;
    const bool fold = reduction == kMean && readable_cpu(student) && student.scalar_type() != at::kHalf;
    if (fold) {
      const double n = count.defined() ? count.item<double>() : double(student.size(0));
      scale = n > 0 ? 1.0 / n : 0.0;
    }
    auto out = rank_forward(student, teacher, target, k_or_ignore, temperature, renormalize, want, scale);
    const Tensor loss = reduce_loss_rows(out[0].toTensor(), reduction, count);
    ctx->save_for_backward({student, teacher, target.value_or(Tensor())});
    ctx->saved_data["count"] = count;  // (not a saved variable: read without the inputs' version check)
    if (want) ctx->saved_data["grad"] = out[1].toTensor();  // (not a saved variable: handed over)
    ctx->saved_data["grad_scale"] = scale;
    ctx->saved_data["folded"] = fold || reduction != kMean;  // the backward applies only the upstream
    ctx->saved_data["k_or_ignore"] = k_or_ignore;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["renormalize"] = renormalize;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["want"] = want;
    ctx->saved_data["pld"] = pld;
    return loss_in(loss, round_loss, student);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    Tensor out;
    if (ctx->needs_input_grad(0) && grads[0].defined()) {
      TORCH_CHECK(ctx->saved_data["want"].toBool(), "topk_kl_loss / pld_loss: the gradient was "
                  "not made in the forward (the student did not require grad then)");
      // the saved inputs are unpacked (their versions checked) only when needed: an in-place
      // backward of another loss on the same logits may have run before this one
      out = take_kept_gradient(ctx->saved_data["grad"]);
      if (!out.defined()) {  // a second backward through a retained graph
        const auto saved = ctx->get_saved_variables();
        out = rank_forward(saved[0], saved[1], saved[2].defined() ? std::optional<Tensor>(saved[2]) : std::nullopt,
                           ctx->saved_data["k_or_ignore"].toInt(), ctx->saved_data["temperature"].toDouble(),
                           ctx->saved_data["renormalize"].toBool(), true,
                           ctx->saved_data["grad_scale"].toDouble())[1]
                  .toTensor();
      }
      const int64_t reduction = ctx->saved_data["reduction"].toInt();
      const Tensor up = grads[0].to(at::kFloat);
      if (reduction == kNone || ctx->saved_data["folded"].toBool()) {  // the mean's divisor is in, or none
        out = scale_by_upstream(std::move(out), up, reduction == kNone);
      } else {  // float16, or a device whose count is not read: divide here
        // (PLD's mean over no kept rows is NaN, and its gradient 0, as F.cross_entropy's)
        const auto& kept_count = ctx->saved_data["count"];
        const Tensor count = kept_count.isTensor() ? kept_count.toTensor() : Tensor();
        out = scale_if_owned(std::move(out), count.defined() ? at::where(count.ne(0), up.div(count), 0.0)
                                                             : up.div(c10::Scalar(out.sym_size(0))));
      }
    }
    return once_differentiable(grads, {out, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()},
                               ctx->saved_data["pld"].toBool() ? "pld_loss" : "topk_kl_loss");
  }
};

template <bool Grad>
Tensor rank_loss(const Tensor& student, const Tensor& teacher, const std::optional<Tensor>& target,
                 int64_t k_or_ignore,
                 double temperature, bool renormalize, int64_t reduction, bool round_loss, const char* op) {
  TORCH_CHECK(reduction >= kNone && reduction <= kSum, op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  if constexpr (Grad)  // the gradient is made in the forward only when it will be wanted
    return RankLossFunction::apply(student, teacher, target, k_or_ignore, temperature, renormalize,
                                   reduction, at::GradMode::is_enabled() && student.requires_grad(), round_loss);
  const bool pld = target.has_value();
  const Tensor rows = std::get<0>(pld ? pld_forward(student, teacher, *target, temperature, k_or_ignore, false, 1.0)
                                      : topk_kl_forward(student, teacher, k_or_ignore, temperature,
                                                        renormalize, false, 1.0));
  const Tensor count = pld && reduction == kMean ? target->ne(k_or_ignore).sum() : Tensor();
  return loss_in(reduce_loss_rows(rows, reduction, count), round_loss, student);
}

template <bool Grad>
Tensor topk_kl_loss(const Tensor& student, const Tensor& teacher, int64_t k, double temperature,
                    bool renormalize, int64_t reduction, bool round_loss) {
  return rank_loss<Grad>(student, teacher, std::nullopt, k, temperature, renormalize, reduction, round_loss,
                         "topk_kl_loss");
}

template <bool Grad>
Tensor pld_loss(const Tensor& student, const Tensor& teacher, const Tensor& target,
                double temperature, int64_t ignore_index, int64_t reduction, bool round_loss) {
  return rank_loss<Grad>(student, teacher, target, ignore_index, temperature, false, reduction, round_loss,
                         "pld_loss");
}

template <bool Grad>
void register_losses(torch::Library& m) {
  m.impl("kd_loss", &kd_loss<Grad>);
  m.impl("topk_kl_loss", &topk_kl_loss<Grad>);
  m.impl("pld_loss", &pld_loss<Grad>);
}

}  // namespace
}  // namespace fastloss

TORCH_LIBRARY_IMPL(fastloss, Autograd, m) { fastloss::register_losses<true>(m); }

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  fastloss::register_losses<false>(m);
  m.impl("scale_rows", &fastloss::scale_rows);
  m.impl("kd_forward", &fastloss::kd_forward);
  m.impl("kd_backward", &fastloss::kd_backward);
  m.impl("kd_forward_grad", &fastloss::kd_forward_grad);
  m.impl("topk_kl_forward", &fastloss::topk_kl_forward);
  m.impl("pld_forward", &fastloss::pld_forward);
}
#if defined(FASTLOSS_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastloss, CUDA, m) {
  fastloss::register_losses<false>(m);
  m.impl("kd_forward", &fastloss::kd_forward);
  m.impl("kd_backward", &fastloss::kd_backward);
  m.impl("topk_kl_forward", &fastloss::topk_kl_forward);
  m.impl("pld_forward", &fastloss::pld_forward);
}
#endif
