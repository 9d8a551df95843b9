// Generic CPU depthwise dilated convolution (any CPU), and the run-time choice between it and
// the AVX2 / AVX-512 instantiations.
#include "../common/cpu_features.h"
#define FL_ISA_VEC float  // this file's own entry points: generic::conv_forward, ...
#include "tcn_cpu_impl.h"

namespace fastloss {

// the AVX2 / AVX-512 instantiations, compiled in their own files with those flags
FASTLOSS_DECLARE_ISAS(
    void conv_forward(const SeqView&, const ConvTaps&, void*, int64_t, int64_t);
    void weight_grad(const SeqView&, const SeqView&, const ConvTaps&, float*, float*, int64_t,
        int64_t);)

int64_t conv_work_items(const SeqView& x) { return x.B * (x.channels_last() ? x.L : x.C); }

void conv_forward_cpu(const SeqView& x, const ConvTaps& taps, void* y, int64_t r0, int64_t r1) {
  FASTLOSS_CPU_DISPATCH(conv_forward(x, taps, y, r0, r1));
}

void conv_weight_grad_cpu(const SeqView& x, const SeqView& grad_y, const ConvTaps& taps,
                          float* grad_w, float* grad_b, int64_t c0, int64_t c1) {
  FASTLOSS_CPU_DISPATCH(weight_grad(x, grad_y, taps, grad_w, grad_b, c0, c1));
}

}  // namespace fastloss
