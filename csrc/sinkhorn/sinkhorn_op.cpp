// The torch-aware side of entropic optimal transport: argument checks, allocation, and the CPU
// solver (sinkhorn_cpu_impl.h) over a batch, or the CUDA solver (sinkhorn_cuda.cu and
// sinkhorn_newton_cuda.cuh: Sinkhorn and SNS, the whole batch at once). Schemas in registration.cpp;
// fake kernels, autograd and the torch-operation path in python/fastloss/ops/sinkhorn.py (which
// also checks the values: finite, non-negative, equal masses).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#if defined(FASTLOSS_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif

#include "../op_helpers.h"
#include "sinkhorn_kernels.h"

namespace fastloss {
namespace {

using at::Tensor;
constexpr const char* kOp = "sinkhorn";

// cost [B, n, m], a [B, n], b [B, m]: one dtype (float32 / float64), on the CPU.
void check_problem(const Tensor& cost, const Tensor& a, const Tensor& b) {
  TORCH_CHECK(cost.dim() == 3 && cost.size(1) >= 1 && cost.size(2) >= 1, kOp,
              ": cost must be [B, n, m] with n, m >= 1, got ", cost.sizes());
  TORCH_CHECK(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble, kOp,
              ": cost must be float32 or float64, got ", cost.scalar_type());
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  TORCH_CHECK(a.dim() == 2 && a.size(0) == B && a.size(1) == n, kOp, ": a must be [", B, ", ", n,
              "], got ", a.sizes());
  TORCH_CHECK(b.dim() == 2 && b.size(0) == B && b.size(1) == m, kOp, ": b must be [", B, ", ", m,
              "], got ", b.sizes());
  TORCH_CHECK(a.scalar_type() == cost.scalar_type() && b.scalar_type() == cost.scalar_type(), kOp,
              ": a and b must have the cost's dtype ", cost.scalar_type(), ", got ", a.scalar_type(),
              " and ", b.scalar_type());
  TORCH_CHECK(a.device() == cost.device() && b.device() == cost.device(), kOp,
              ": a and b must be on the cost's device ", cost.device(), ", got ", a.device(),
              " and ", b.device());
#if defined(FASTLOSS_WITH_CUDA)
  TORCH_CHECK(cost.is_cpu() || cost.is_cuda(), kOp, ": cost must be on the CPU or a CUDA device, got ",
              cost.device());
#else
  TORCH_CHECK(cost.is_cpu(), kOp, ": the fastloss kernel runs on the CPU (this build has no CUDA "
              "kernels), got ", cost.device());
#endif
}

#if defined(FASTLOSS_WITH_CUDA)

OtBatch batch_of(const Tensor& cost, const Tensor& a, const Tensor& b, double eps) {
  OtBatch q;
  q.cost = cost.data_ptr();
  q.a = a.data_ptr();
  q.b = b.data_ptr();
  q.is_double = cost.scalar_type() == at::kDouble;
  q.B = cost.size(0);
  q.n = cost.size(1);
  q.m = cost.size(2);
  q.eps = eps;
  return q;
}
#endif

OtProblem problem(const Tensor& cost, const Tensor& a, const Tensor& b, int64_t k, double eps) {
  OtProblem q;
  const int64_t es = cost.element_size();
  q.cost = static_cast<const char*>(cost.data_ptr()) + k * cost.stride(0) * es;
  q.a = static_cast<const char*>(a.data_ptr()) + k * a.stride(0) * es;
  q.b = static_cast<const char*>(b.data_ptr()) + k * b.stride(0) * es;
  q.is_double = cost.scalar_type() == at::kDouble;
  q.n = cost.size(1);
  q.m = cost.size(2);
  q.eps = eps;
  return q;
}

void parallel(int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
  at::parallel_for(0, count, grain, body);
}
void serial(int64_t count, int64_t, const std::function<void(int64_t, int64_t)>& body) {
  if (count > 0) body(0, count);
}

// -> (value <a, f> + <b, g> [B], f [B, n], g [B, m], iterations [B] int64, marginal error [B],
// transport cost <P, C> [B]); keep = 0: Sinkhorn, keep >= 1: Sinkhorn-Newton-Sparse.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> sinkhorn_solve(
    const Tensor& cost_in, const Tensor& a_in, const Tensor& b_in, double eps, int64_t max_iter,
    double tol, int64_t warmup_iters, int64_t keep, int64_t cg_iters) {
  check_problem(cost_in, a_in, b_in);
  TORCH_CHECK(eps > 0, kOp, ": eps must be > 0, got ", eps);
  TORCH_CHECK(max_iter >= 1, kOp, ": max_iter must be >= 1, got ", max_iter);
  TORCH_CHECK(tol >= 0, kOp, ": tol must be >= 0, got ", tol);
  TORCH_CHECK(keep >= 0 && warmup_iters >= 0 && cg_iters >= 1, kOp,
              ": keep and warmup_iters must be >= 0 and cg_iters >= 1, got ", keep, ", ",
              warmup_iters, ", ", cg_iters);
  TORCH_CHECK(cost_in.size(2) < (int64_t(1) << 31), kOp, ": at most 2^31 - 1 columns, got ",
              cost_in.size(2));
  TORCH_CHECK(keep == 0 || cost_in.size(1) < (int64_t(1) << 31), kOp,
              ": SNS takes at most 2^31 - 1 rows, got ", cost_in.size(1));
  const Tensor cost = cost_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  const auto opts = cost.options();
  Tensor f = at::empty({B, n}, opts), g = at::empty({B, m}, opts);
  Tensor n_iter = at::empty({B}, opts.dtype(at::kLong));
  if (cost.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(cost.device());
    Tensor value = at::empty({B}, opts), error = at::empty({B}, opts), transport = at::empty({B}, opts);
    if (B == 0) return {value, f, g, n_iter, error, transport};
    OtBatch q = batch_of(cost, a, b, eps);
    q.tol = tol;
    q.max_iter = max_iter;
    q.keep = keep, q.warmup_iters = warmup_iters, q.cg_iters = cg_iters;
    Tensor work = at::empty({int64_t(sinkhorn_cuda_workspace_bytes(q))}, opts.dtype(at::kByte));
    Tensor host_active = at::empty({B}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
    OtBatchOut out;
    out.value = value.data_ptr();
    out.f = f.data_ptr();
    out.g = g.data_ptr();
    out.n_iter = n_iter.data_ptr<int64_t>();
    out.error = error.data_ptr();
    out.transport = transport.data_ptr();
    check_cuda_launch(sinkhorn_solve_cuda(q, out, work.data_ptr(), host_active.data_ptr<int>(),
                                          cuda_stream()), kOp);
    return {value, f, g, n_iter, error, transport};
#endif
  }
  std::vector<double> value(B), error(B), transport(B);
  auto solve = [&](int64_t k, const ParallelFor& inner) {
    OtProblem q = problem(cost, a, b, k, eps);
    q.tol = tol, q.max_iter = max_iter, q.keep = keep, q.warmup_iters = warmup_iters, q.cg_iters = cg_iters;
    char* fk = static_cast<char*>(f.data_ptr()) + k * n * f.element_size();
    char* gk = static_cast<char*>(g.data_ptr()) + k * m * g.element_size();
    const OtResult r = sinkhorn_solve_cpu(q, fk, gk, inner);
    n_iter.data_ptr<int64_t>()[k] = r.n_iter;
    value[k] = r.value;
    error[k] = r.error;
    transport[k] = r.transport;
  };
  // a batch of at least one problem per thread runs problems in parallel; else each problem's
  // passes run in parallel
  if (B >= at::get_num_threads()) {
    const ParallelFor inner = serial;
    at::parallel_for(0, B, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) solve(k, inner);
    });
  } else {
    const ParallelFor inner = parallel;
    for (int64_t k = 0; k < B; ++k) solve(k, inner);
  }
  auto vec = [&](const std::vector<double>& v) {
    Tensor t = at::empty({B}, opts.dtype(at::kDouble));
    std::copy(v.begin(), v.end(), t.data_ptr<double>());
    return t.to(cost.scalar_type());
  };
  return {vec(value), f, g, n_iter, vec(error), vec(transport)};
}

// scale[k] * P_k (scale: [B], or all ones when absent) -> [B, n, m]
Tensor sinkhorn_plan(const Tensor& cost_in, const Tensor& a_in, const Tensor& b_in, const Tensor& f_in,
                     const Tensor& g_in, double eps, const std::optional<Tensor>& scale_in) {
  check_problem(cost_in, a_in, b_in);
  TORCH_CHECK(eps > 0, kOp, ": eps must be > 0, got ", eps);
  TORCH_CHECK(f_in.sizes() == a_in.sizes() && g_in.sizes() == b_in.sizes() &&
                  f_in.scalar_type() == cost_in.scalar_type() &&
                  g_in.scalar_type() == cost_in.scalar_type(),
              kOp, ": f and g must be like a and b, got ", f_in.sizes(), " and ", g_in.sizes());
  TORCH_CHECK(f_in.device() == cost_in.device() && g_in.device() == cost_in.device(), kOp,
              ": f and g must be on the cost's device ", cost_in.device());
  const Tensor cost = cost_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  const Tensor f = f_in.contiguous(), g = g_in.contiguous();
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  Tensor scale;
  if (scale_in.has_value()) {
    TORCH_CHECK(scale_in->numel() == B, kOp, ": scale must have one value per problem (", B,
                "), got ", scale_in->sizes());
    scale = scale_in->to(cost.device(), at::kDouble).contiguous();
  }
  Tensor out = at::empty({B, n, m}, cost.options());
  if (cost.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(cost.device());
    check_cuda_launch(sinkhorn_plan_cuda(batch_of(cost, a, b, eps), f.data_ptr(), g.data_ptr(),
                                         scale.defined() ? scale.data_ptr<double>() : nullptr,
                                         out.data_ptr(), cuda_stream()), kOp);
#endif
    return out;
  }
  const int64_t es = cost.element_size();
  at::parallel_for(0, B * n, std::max<int64_t>(1, 16384 / m), [&](int64_t r0, int64_t r1) {
    while (r0 < r1) {
      const int64_t k = r0 / n, i0 = r0 % n, i1 = std::min(n, i0 + (r1 - r0));
      const OtProblem q = problem(cost, a, b, k, eps);
      const double s = scale.defined() ? scale.data_ptr<double>()[k] : 1.0;
      sinkhorn_plan_cpu(q, static_cast<const char*>(f.data_ptr()) + k * n * es,
                        static_cast<const char*>(g.data_ptr()) + k * m * es, s,
                        static_cast<char*>(out.data_ptr()) + k * n * m * es, i0, i1);
      r0 += i1 - i0;
    }
  });
  return out;
}

}  // namespace
}  // namespace fastloss

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("sinkhorn_solve", &fastloss::sinkhorn_solve);
  m.impl("sinkhorn_plan", &fastloss::sinkhorn_plan);
}
#if defined(FASTLOSS_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastloss, CUDA, m) {
  m.impl("sinkhorn_solve", &fastloss::sinkhorn_solve);
  m.impl("sinkhorn_plan", &fastloss::sinkhorn_plan);
}
#endif
