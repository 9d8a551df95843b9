// The CUDA kernels of csrc/tcn/tcn_cuda.cu under the emulator (emu.h), behind a C interface
// for ctypes (tests/test_cuda_emulation.py). Each function returns null or the error text.
#include "kernels.inc"

namespace {

// dims: B, C, L and the strides of b, c, t, as the torch side fills SeqView.
fastloss::SeqView view(const void* data, int dtype, const int64_t* dims) {
  fastloss::SeqView v;
  v.data = data;
  v.dtype = fastloss::ScalarType(dtype);
  v.B = dims[0];
  v.C = dims[1];
  v.L = dims[2];
  v.sb = dims[3];
  v.sc = dims[4];
  v.st = dims[5];
  return v;
}

fastloss::ConvTaps taps(const float* w, const float* bias, const int64_t* conv, const void* other) {
  fastloss::ConvTaps p;
  p.w = w;
  p.bias = bias;
  p.K = conv[0];
  p.dilation = conv[1];
  p.pad = conv[2];
  p.act = int(conv[3]);
  p.mode = int(conv[4]);
  p.other = other;
  return p;
}

}  // namespace

extern "C" {

// conv: K, dilation, pad, act, mode.
const char* emu_conv_forward(const void* x, int dtype, const int64_t* dims, const float* w,
                             const float* bias, const int64_t* conv, const void* other, void* y) {
  return fastloss::conv_forward_cuda(view(x, dtype, dims), taps(w, bias, conv, other), y, nullptr);
}

int64_t emu_weight_grad_scratch(int dtype, const int64_t* dims, const int64_t* conv) {
  return fastloss::conv_weight_grad_cuda_scratch(view(nullptr, dtype, dims),
                                                 taps(nullptr, nullptr, conv, nullptr));
}

const char* emu_weight_grad(const void* x, const void* g, int dtype, const int64_t* dims,
                            const int64_t* conv, float* gw, float* gb, float* scratch) {
  return fastloss::conv_weight_grad_cuda(view(x, dtype, dims), view(g, dtype, dims),
                                         taps(nullptr, nullptr, conv, nullptr), gw, gb, scratch,
                                         nullptr);
}

}  // extern "C"
