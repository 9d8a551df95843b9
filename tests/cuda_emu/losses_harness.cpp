// The CUDA kernels of csrc/losses/losses_cuda.cu under the emulator (emu.h), behind a C
// interface for ctypes (tests/test_cuda_emulation.py). Returns null or the error text.
#include "kernels.inc"

extern "C" {

// shape: rows, cols, row stride, ignore_index, kind, adaptive (0/1)
// f: label_smoothing, lse_square_scale, softcap, tau, lam, margin, alpha, a, b, eps
// out: loss, stat0, stat1 [rows]; then the backward from grad_loss into grad (row stride cols);
// fused: both from the one-pass forward_backward kernel instead; 2: that kernel writing the
// gradient over the logits themselves (grad unused; the logits' row stride)
const char* emu_losses(const void* logits, int dtype, const int64_t* target, const float* weight,
                       const float* weight_sum, const int64_t* shape, const float* f, float* loss,
                       float* stat0, float* stat1, const float* grad_loss, void* grad, int fused) {
  fastloss::LogitsView lv;
  lv.data = logits;
  lv.dtype = fastloss::ScalarType(dtype);
  lv.rows = shape[0];
  lv.cols = shape[1];
  lv.row_stride = shape[2];
  fastloss::RowTargets rt;
  rt.target = target;
  rt.weight = weight;
  fastloss::LossParams p;
  p.ignore_index = shape[3];
  p.kind = fastloss::LossKind(shape[4]);
  p.adaptive = shape[5] != 0;
  p.label_smoothing = f[0];
  p.lse_square_scale = f[1];
  p.softcap = f[2];
  p.tau = f[3];
  p.lam = f[4];
  p.margin = f[5];
  p.alpha = f[6];
  p.a = f[7];
  p.b = f[8];
  p.eps = f[9];
  p.weight_sum = weight_sum;
  const fastloss::RowStats out{loss, stat0, stat1};
  fastloss::RowGrad g;
  g.grad_loss = grad_loss;
  g.stat0 = stat0;
  g.stat1 = stat1;
  g.grad_logits = fused == 2 ? const_cast<void*>(logits) : grad;
  g.grad_row_stride = fused == 2 ? shape[2] : shape[1];
  if (fused) return fastloss::losses_forward_backward_cuda(lv, rt, p, out, g, nullptr);
  if (const char* e = fastloss::losses_forward_cuda(lv, rt, p, out, nullptr)) return e;
  return fastloss::losses_backward_cuda(lv, rt, p, g, nullptr);
}

// The device's opt-in shared memory per block (forward_backward_kernel keeps that much of a
// row, less a margin, on chip); returns the previous value.
int64_t emu_set_shared_optin(int64_t bytes) {
  const int64_t before = int64_t(emu::shared_optin);
  emu::shared_optin = size_t(bytes);
  return before;
}

// data [rows, cols] *= factor[per_row ? r : 0] unless that factor is exactly 1
const char* emu_scale_rows_unless_one(void* data, int dtype, int64_t rows, int64_t cols, const float* factor,
                                      int per_row) {
  return fastloss::scale_rows_unless_one_cuda(data, fastloss::ScalarType(dtype), rows, cols, factor, per_row != 0,
                                              nullptr);
}

// loss[0] (and denom[0] for the mean) of rows [N]: reduce_rows_cuda
const char* emu_reduce_rows(const float* rows, const int64_t* target, const float* weight, int64_t N, int64_t C,
                            int64_t ignore_index, int mean, float* loss, float* denom) {
  return fastloss::reduce_rows_cuda(rows, target, weight, N, C, ignore_index, mean != 0, loss, denom, nullptr);
}

// out[r] = 1 / the kept rows' total weight: mean_factor_rows_cuda
const char* emu_mean_factor_rows(const int64_t* target, const float* weight, int64_t N, int64_t C,
                                 int64_t ignore_index, float* out) {
  return fastloss::mean_factor_rows_cuda(target, weight, N, C, ignore_index, out, nullptr);
}

// out[r] = grad[0] / (denom ? denom[0] : divisor): upstream_rows_cuda
const char* emu_upstream_rows(const void* grad, int dtype, const float* denom, double divisor, int64_t n,
                              float* out) {
  return fastloss::upstream_rows_cuda(grad, fastloss::ScalarType(dtype), denom, divisor, n, out, nullptr);
}

}  // extern "C"
