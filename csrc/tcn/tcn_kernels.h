// Entry points of the depthwise dilated convolution kernels, callable without torch headers.
//
// y[b, c, t] = bias[c] + sum_k w[c, k] x[b, c, t - pad + k d], x outside [0, L) being 0:
// pad = d (K - 1) is the causal convolution, pad = d (K - 1) / 2 the centred one. The
// gradient of x is the same convolution of grad_y with the taps reversed and
// pad' = d (K - 1) - pad, so one forward kernel serves both.
#pragma once
#include <cstdint>

#include "../losses/loss_params.h"  // ScalarType

namespace fastloss {

// [B, C, L] with element (b, c, t) at data[b * sb + c * sc + t * st]; either st == 1
// (channels first, "BCL") or sc == 1 (channels last, "BLC").
struct SeqView {
  const void* data = nullptr;
  ScalarType dtype = ScalarType::f32;
  int64_t B = 0, C = 0, L = 0, sb = 0, sc = 0, st = 0;
  bool channels_last() const { return sc == 1 && st != 1; }
};

// The taps, float32: w[c * K + k] (c_major) or w[k * C + c] (channels last), and what is
// done with each output h = bias + sum_k w x (the epilogue):
//   mode 0: y = act(h), plus other[b, c, t] when `other` is given (a residual);
//   mode 1: y = other[b, c, t] * act'(h) (the gradient through the activation).
// `other` has x's dtype and strides. act is an Act (activations.h).
struct ConvTaps {
  const float* w = nullptr;
  const float* bias = nullptr;  // [C] or null
  int64_t K = 0, dilation = 1, pad = 0;
  int act = 0, mode = 0;
  const void* other = nullptr;
};

// Output rows of the forward: channels first, work item r is the row (b, c) = (r / C, r % C);
// channels last, it is the position (b, t) = (r / L, r % L). `y` has x's dtype and strides.
int64_t conv_work_items(const SeqView& x);
void conv_forward_cpu(const SeqView& x, const ConvTaps& taps, void* y, int64_t r0, int64_t r1);

// grad_w[c * K + k] and grad_b[c] (float32; grad_b may be null) for channels [c0, c1): sums
// over b and t.
void conv_weight_grad_cpu(const SeqView& x, const SeqView& grad_y, const ConvTaps& taps,
                          float* grad_w, float* grad_b, int64_t c0, int64_t c1);

// CUDA (tcn_cuda.cu), the whole tensor at once on `stream` (a cudaStream_t); each returns
// nullptr, or the CUDA error of the launch. The taps' gradient needs a float32 scratch of
// conv_weight_grad_cuda_scratch(x, taps) elements (its partial sums; no atomics).
const char* conv_forward_cuda(const SeqView& x, const ConvTaps& taps, void* y, void* stream);
int64_t conv_weight_grad_cuda_scratch(const SeqView& x, const ConvTaps& taps);
const char* conv_weight_grad_cuda(const SeqView& x, const SeqView& grad_y, const ConvTaps& taps,
                                  float* grad_w, float* grad_b, float* scratch, void* stream);

}  // namespace fastloss
