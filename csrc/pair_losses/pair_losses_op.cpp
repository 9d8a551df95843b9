// The torch-aware side of the pair-based losses: argument checks, allocation, and the CPU
// kernels (auc_cpu_impl.h) or the CUDA kernels (auc_cuda.cu). Schemas in registration.cpp;
// fake kernels and autograd in python/fastloss/ops/pair_losses.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#if defined(FASTLOSS_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif

#include "../op_helpers.h"
#include "auc_kernels.h"

namespace fastloss {
namespace {

using at::Tensor;
constexpr const char* kOp = "mw_auc_loss";

// -> (loss of each query [B] float32, d loss_b / d pos [B, P] float32, d loss_b / d neg [B, N]
// float32); the gradients are empty unless compute_grad.
std::tuple<Tensor, Tensor, Tensor> mw_auc_forward(const Tensor& pos_in, const Tensor& neg_in,
                                                  bool compute_grad) {
  TORCH_CHECK(pos_in.dim() == 2 && neg_in.dim() == 2 && pos_in.size(0) == neg_in.size(0), kOp,
              ": scores_pos and scores_neg must be [B, P] and [B, N] (one row per query), got ",
              pos_in.sizes(), " and ", neg_in.sizes());
  TORCH_CHECK(pos_in.size(1) >= 1 && neg_in.size(1) >= 1, kOp,
              ": every query needs at least one positive and one negative score, got P = ",
              pos_in.size(1), " and N = ", neg_in.size(1));
  TORCH_CHECK(pos_in.scalar_type() == neg_in.scalar_type(), kOp, ": scores_pos is ",
              pos_in.scalar_type(), " but scores_neg is ", neg_in.scalar_type());
  TORCH_CHECK(pos_in.device() == neg_in.device(), kOp, ": scores_pos is on ", pos_in.device(),
              " but scores_neg is on ", neg_in.device());
#if defined(FASTLOSS_WITH_CUDA)
  TORCH_CHECK(pos_in.is_cpu() || pos_in.is_cuda(), kOp, ": the fastloss kernels run on the CPU "
              "or a CUDA device, got ", pos_in.device());
#else
  TORCH_CHECK(pos_in.is_cpu(), kOp, ": the fastloss kernel runs on the CPU (this build has no "
              "CUDA kernels), got ", pos_in.device());
#endif
  const Tensor pos = pos_in.stride(1) == 1 ? pos_in : pos_in.contiguous();
  const Tensor neg = neg_in.stride(1) == 1 ? neg_in : neg_in.contiguous();
  AucProblem q;
  q.pos = pos.data_ptr();
  q.neg = neg.data_ptr();
  q.dtype = kernel_dtype(pos, kOp, "scores");
  q.B = pos.size(0);
  q.P = pos.size(1);
  q.N = neg.size(1);
  q.pos_stride = q.B > 1 ? pos.stride(0) : q.P;
  q.neg_stride = q.B > 1 ? neg.stride(0) : q.N;
  const auto f32 = pos.options().dtype(at::kFloat);
  if (pos.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(pos.device());
    Tensor loss = at::empty({q.B}, f32);
    Tensor grad_pos = compute_grad ? at::empty({q.B, q.P}, f32) : at::empty({0}, f32);
    Tensor grad_neg = compute_grad ? at::empty({q.B, q.N}, f32) : at::empty({0}, f32);
    const AucCudaScratch sizes = auc_cuda_scratch(q);
    Tensor loss_scratch = at::empty({sizes.doubles}, pos.options().dtype(at::kDouble));
    Tensor grad_scratch = at::empty({sizes.floats}, f32);
    check_cuda_launch(auc_cuda(q, loss.data_ptr<float>(),
                               compute_grad ? grad_pos.data_ptr<float>() : nullptr,
                               compute_grad ? grad_neg.data_ptr<float>() : nullptr,
                               loss_scratch.data_ptr<double>(), grad_scratch.data_ptr<float>(),
                               cuda_stream()), kOp);
    return {loss, grad_pos, grad_neg};
#endif
  }
  const int64_t items = auc_items(q), blocks = items / std::max<int64_t>(q.B, 1);
  Tensor loss_part = at::empty({items}, pos.options().dtype(at::kDouble));
  Tensor grad_pos = compute_grad ? at::empty({q.B, q.P}, f32) : at::empty({0}, f32);
  Tensor neg_part = compute_grad ? at::empty({items, q.N}, f32) : at::empty({0}, f32);
  double* lp = loss_part.data_ptr<double>();
  float* gp = compute_grad ? grad_pos.data_ptr<float>() : nullptr;
  float* np = compute_grad ? neg_part.data_ptr<float>() : nullptr;
  at::parallel_for(0, items, 1, [&](int64_t r0, int64_t r1) { auc_cpu(q, lp, gp, np, r0, r1); });
  const double scale = 1.0 / (double(q.P) * double(q.N));
  const Tensor loss = loss_part.view({q.B, blocks}).sum(1).mul(scale).to(at::kFloat);
  const Tensor grad_neg = compute_grad ? neg_part.view({q.B, blocks, q.N}).sum(1) : neg_part;
  return {loss, grad_pos, grad_neg};
}

}  // namespace
}  // namespace fastloss

TORCH_LIBRARY_IMPL(fastloss, CPU, m) { m.impl("mw_auc_forward", &fastloss::mw_auc_forward); }
#if defined(FASTLOSS_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastloss, CUDA, m) { m.impl("mw_auc_forward", &fastloss::mw_auc_forward); }
#endif
