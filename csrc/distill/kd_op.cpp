// The torch-aware side of the logit-distillation losses: argument checks, allocation, and the
// CPU kernels (kd_cpu_impl.h). Schemas in registration.cpp; fake kernels and autograd in
// python/fastloss/ops/distill.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../common/huge_pages.h"
#include "../op_helpers.h"
#include "kd_kernels.h"

namespace fastloss {
namespace {

using at::Tensor;
constexpr const char* kOp = "kd_loss";

struct Checked {
  Tensor student, teacher;
  KdProblem q;
};

Checked check(const Tensor& student, const Tensor& teacher, int64_t kind, double temperature,
              double beta) {
  TORCH_CHECK(student.dim() == 2, kOp, ": student must be 2-D [N, C], got shape ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), kOp, ": teacher must have student's shape ",
              student.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), kOp, ": teacher is ",
              teacher.scalar_type(), " but student is ", student.scalar_type());
  TORCH_CHECK(teacher.device() == student.device(), kOp, ": teacher is on ", teacher.device(),
              " but student is on ", student.device());
  TORCH_CHECK(student.is_cpu(), kOp, ": the fastloss kernel runs on the CPU");
  TORCH_CHECK(kind >= 0 && kind <= 2, kOp, ": kind must be 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got ", kind);
  TORCH_CHECK(temperature > 0.0, kOp, ": temperature must be > 0, got ", temperature);
  TORCH_CHECK(kind != 2 || (beta > 0.0 && beta < 1.0), kOp, ": beta must be in (0, 1) for jsd, got ", beta);
  TORCH_CHECK(student.size(1) >= 1 || student.size(0) == 0, kOp, ": at least one class is needed");
  Checked c;
  c.student = student.size(1) <= 1 || student.stride(1) == 1 ? student : student.contiguous();
  c.teacher = teacher.size(1) <= 1 || teacher.stride(1) == 1 ? teacher : teacher.contiguous();
  KdProblem& q = c.q;
  q.student = c.student.data_ptr();
  q.teacher = c.teacher.data_ptr();
  q.dtype = kernel_dtype(c.student, kOp, "student");
  q.N = student.size(0);
  q.C = student.size(1);
  q.s_stride = q.N > 1 ? c.student.stride(0) : q.C;
  q.t_stride = q.N > 1 ? c.teacher.stride(0) : q.C;
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
  Tensor grad = at::empty({c.q.N, c.q.C}, student.options());
  if (grad.numel() == 0) return grad;
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
  const float* gp = g.data_ptr<float>();
  const float* sp = st.data_ptr<float>();
  void* out = grad.data_ptr();
  at::parallel_for(0, c.q.N, grain(c.q.C), [&](int64_t r0, int64_t r1) {
    kd_backward_cpu(c.q, gp, sp, out, r0, r1);
  });
  return grad;
}

}  // namespace
}  // namespace fastloss

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("kd_forward", &fastloss::kd_forward);
  m.impl("kd_backward", &fastloss::kd_backward);
}
