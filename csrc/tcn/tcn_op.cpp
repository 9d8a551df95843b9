// The torch-aware side of the depthwise dilated convolution: argument checks, memory layout
// (channels first [B, C, L] or channels last [B, L, C] memory, both without a copy), float32
// taps, and the CPU kernels of tcn_cpu_impl.h or the CUDA kernels of tcn_cuda.cu. Schemas in
// registration.cpp; fake kernels and autograd in python/fastloss/ops/tcn.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>

#if defined(FASTLOSS_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif

#include "../common/huge_pages.h"
#include "../op_helpers.h"
#include "tcn_kernels.h"

namespace fastloss {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;
constexpr const char* kOp = "dilated_conv1d";

bool is_channels_last(const Tensor& x) { return x.size(1) > 1 && x.stride(1) == 1 && x.stride(2) != 1; }

// x itself when its memory is dense channels first or dense channels last, else a copy in
// the layout closest to it.
Tensor canonical(const Tensor& x) {
  if (is_channels_last(x)) {
    const Tensor blc = x.transpose(1, 2);
    return blc.is_contiguous() ? x : blc.contiguous().transpose(1, 2);
  }
  return x.contiguous();
}

// `t` laid out exactly as `like` (both [B, C, L], `like` canonical).
Tensor same_layout(const Tensor& t, const Tensor& like) {
  if (t.strides() == like.strides()) return t;
  Tensor out = at::empty_like(like, t.options());
  out.copy_(t);
  return out;
}

SeqView view_of(const Tensor& x) {
  SeqView v;
  v.data = x.data_ptr();
  v.dtype = kernel_dtype(x, kOp, "x");
  v.B = x.size(0);
  v.C = x.size(1);
  v.L = x.size(2);
  v.sb = x.stride(0);
  v.sc = x.stride(1);
  v.st = x.stride(2);
  if (v.C == 1) v.sc = v.L;  // one channel: channels first
  if (v.L == 1) v.st = 1;
  return v;
}

void check(const Tensor& x, const Tensor& weight, const OptT& bias, int64_t dilation, int64_t pad) {
  TORCH_CHECK(x.dim() == 3, kOp, ": x must be 3-D [B, C, L], got shape ", x.sizes());
  kernel_dtype(x, kOp, "x");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(1), kOp,
              ": a depthwise weight must be [C, K] with C = ", x.size(1), " (x's channels), got ",
              weight.sizes());
  TORCH_CHECK(weight.size(1) >= 1, kOp, ": the kernel size K must be >= 1, got ", weight.size(1));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), kOp, ": weight is ", weight.scalar_type(),
              " but x is ", x.scalar_type());
  TORCH_CHECK(dilation >= 1, kOp, ": dilation must be >= 1, got ", dilation);
  TORCH_CHECK(pad >= 0 && pad <= dilation * (weight.size(1) - 1), kOp, ": padding must be in [0, ",
              dilation * (weight.size(1) - 1), "], got ", pad);
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == x.size(1) &&
                                    bias->scalar_type() == x.scalar_type()),
              kOp, ": bias must be [", x.size(1), "] of x's dtype");
  TORCH_CHECK(weight.device() == x.device(), kOp, ": weight is on ", weight.device(),
              " but x is on ", x.device());
  TORCH_CHECK(!bias.has_value() || bias->device() == x.device(), kOp, ": bias is on ",
              bias->device(), " but x is on ", x.device());
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), kOp, ": x must be on the CPU or a CUDA device, got ",
              x.device());
#if !defined(FASTLOSS_WITH_CUDA)
  TORCH_CHECK(x.is_cpu(), kOp, ": fastloss was built without CUDA; reinstall it with a CUDA "
              "build of torch and nvcc");
#endif
}

// y = conv(x) with float32 taps `w` [C, K], then the epilogue (ConvTaps: act, mode, other
// laid out as x); `y` has x's layout.
Tensor run_forward(const Tensor& x, const Tensor& w32, const Tensor& bias32, int64_t dilation,
                   int64_t pad, int act = 0, int mode = 0, const Tensor& other = Tensor()) {
  Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const SeqView xv = view_of(x);
  const Tensor taps = xv.channels_last() ? w32.t().contiguous() : w32;  // [K, C] or [C, K]
  ConvTaps p;
  p.w = taps.data_ptr<float>();
  p.bias = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  p.K = w32.size(1);
  p.dilation = dilation;
  p.pad = pad;
  p.act = act;
  p.mode = mode;
  p.other = other.defined() ? other.data_ptr() : nullptr;
  if (x.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(x.device());
    check_cuda_launch(conv_forward_cuda(xv, p, y.data_ptr(), cuda_stream()), kOp);
#endif
    return y;
  }
  advise_huge_pages(y.data_ptr(), y.nbytes());
  const int64_t per_item = xv.channels_last() ? xv.C : xv.L;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(per_item, 1));
  void* out = y.data_ptr();
  at::parallel_for(0, conv_work_items(xv), grain,
                   [&](int64_t r0, int64_t r1) { conv_forward_cpu(xv, p, out, r0, r1); });
  return y;
}

Tensor dilated_conv1d_forward(const Tensor& x_in, const Tensor& weight, const OptT& bias,
                              int64_t dilation, int64_t pad) {
  check(x_in, weight, bias, dilation, pad);
  const Tensor x = canonical(x_in);
  const Tensor w32 = weight.to(at::kFloat).contiguous();
  const Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : Tensor();
  return run_forward(x, w32, b32, dilation, pad);
}

// grad_w, grad_b (float32 [C, K], [C]) of a convolution of x whose output gradient is g.
std::tuple<Tensor, Tensor> weight_grads(const Tensor& x, const Tensor& g, int64_t K,
                                        int64_t dilation, int64_t pad, bool want_bias) {
  const int64_t C = x.size(1);
  Tensor gw32 = at::empty({C, K}, x.options().dtype(at::kFloat));
  Tensor gb32 = at::empty({C}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {gw32.zero_(), gb32.zero_()};
  const SeqView xv = view_of(x), gv = view_of(g);
  ConvTaps p;
  p.K = K;
  p.dilation = dilation;
  p.pad = pad;
  float* gwp = gw32.data_ptr<float>();
  float* gbp = want_bias ? gb32.data_ptr<float>() : nullptr;
  if (x.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(x.device());
    Tensor scratch = at::empty({conv_weight_grad_cuda_scratch(xv, p)}, gw32.options());
    check_cuda_launch(conv_weight_grad_cuda(xv, gv, p, gwp, gbp, scratch.data_ptr<float>(),
                                            cuda_stream()), kOp);
#endif
    return {gw32, gb32};
  }
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(x.size(0) * x.size(2), 1));
  at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
    conv_weight_grad_cpu(xv, gv, p, gwp, gbp, c0, c1);
  });
  return {gw32, gb32};
}

// -> (grad_x, grad_weight, grad_bias), empty where grad_mask says no.
std::tuple<Tensor, Tensor, Tensor> dilated_conv1d_backward(const Tensor& grad_y,
                                                           const Tensor& x_in,
                                                           const Tensor& weight, int64_t dilation,
                                                           int64_t pad,
                                                           std::array<bool, 3> grad_mask) {
  check(x_in, weight, std::nullopt, dilation, pad);
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), kOp, ": grad_y must have x's shape ", x_in.sizes(),
              ", got ", grad_y.sizes());
  const Tensor x = canonical(x_in);
  const Tensor g = same_layout(grad_y.to(x.scalar_type()), x);
  const Tensor w32 = weight.to(at::kFloat).contiguous();
  const int64_t K = weight.size(1);
  Tensor gx = at::empty({0}, x.options()), gw = at::empty({0}, weight.options()),
         gb = at::empty({0}, weight.options());
  if (grad_mask[0])  // the convolution of grad_y with the taps reversed
    gx = run_forward(g, w32.flip({1}).contiguous(), Tensor(), dilation, dilation * (K - 1) - pad);
  if (grad_mask[1] || grad_mask[2]) {
    auto [gw32, gb32] = weight_grads(x, g, K, dilation, pad, grad_mask[2]);
    if (grad_mask[1]) gw = gw32.to(weight.scalar_type());
    if (grad_mask[2]) gb = gb32.to(weight.scalar_type());
  }
  return {gx, gw, gb};
}

// ---- the fused TCN level: y = x + act(conv(x) + bias) --------------------------------------------

void check_act(int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 3, kOp, ": activation code must be 0 (none), 1 (relu), 2 (silu) "
              "or 3 (gelu), got ", act);
}

Tensor tcn_level_forward(const Tensor& x_in, const Tensor& weight, const OptT& bias,
                         int64_t dilation, int64_t pad, int64_t act) {
  check(x_in, weight, bias, dilation, pad);
  check_act(act);
  const Tensor x = canonical(x_in);
  const Tensor w32 = weight.to(at::kFloat).contiguous();
  const Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : Tensor();
  return run_forward(x, w32, b32, dilation, pad, int(act), 0, x);
}

// Recomputes h = conv(x) + bias (memory-bound, cheaper than keeping it), then
// g_h = grad_y * act'(h), grad_x = grad_y + conv^T(g_h), and the taps' gradients from g_h.
std::tuple<Tensor, Tensor, Tensor> tcn_level_backward(const Tensor& grad_y, const Tensor& x_in,
                                                      const Tensor& weight, const OptT& bias,
                                                      int64_t dilation, int64_t pad, int64_t act,
                                                      std::array<bool, 3> grad_mask) {
  check(x_in, weight, bias, dilation, pad);
  check_act(act);
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), kOp, ": grad_y must have x's shape ", x_in.sizes(),
              ", got ", grad_y.sizes());
  const Tensor x = canonical(x_in);
  const Tensor g = same_layout(grad_y.to(x.scalar_type()), x);
  const Tensor w32 = weight.to(at::kFloat).contiguous();
  const Tensor b32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : Tensor();
  const int64_t K = weight.size(1);
  const Tensor g_h = run_forward(x, w32, b32, dilation, pad, int(act), 1, g);
  Tensor gx = at::empty({0}, x.options()), gw = at::empty({0}, weight.options()),
         gb = at::empty({0}, weight.options());
  if (grad_mask[0])
    gx = run_forward(g_h, w32.flip({1}).contiguous(), Tensor(), dilation, dilation * (K - 1) - pad,
                     0, 0, g);
  if (grad_mask[1] || grad_mask[2]) {
    auto [gw32, gb32] = weight_grads(x, g_h, K, dilation, pad, grad_mask[2]);
    if (grad_mask[1]) gw = gw32.to(weight.scalar_type());
    if (grad_mask[2]) gb = gb32.to(weight.scalar_type());
  }
  return {gx, gw, gb};
}

}  // namespace
}  // namespace fastloss

namespace fastloss {
namespace {
void register_impls(torch::Library& m) {
  m.impl("dilated_conv1d_forward", &dilated_conv1d_forward);
  m.impl("dilated_conv1d_backward", &dilated_conv1d_backward);
  m.impl("tcn_level_forward", &tcn_level_forward);
  m.impl("tcn_level_backward", &tcn_level_backward);
}
}  // namespace
}  // namespace fastloss

TORCH_LIBRARY_IMPL(fastloss, CPU, m) { fastloss::register_impls(m); }
#if defined(FASTLOSS_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastloss, CUDA, m) { fastloss::register_impls(m); }
#endif
