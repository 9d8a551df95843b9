// The CUDA kernels of csrc/pair_losses/auc_cuda.cu under the emulator (emu.h), behind a C
// interface for ctypes (tests/test_cuda_emulation.py). Returns null or the error text.
#include "kernels.inc"

extern "C" {

// sizes: the float64 and float32 scratch elements
void emu_auc_scratch(int64_t B, int64_t P, int64_t N, int64_t* sizes) {
  fastloss::AucProblem q;
  q.B = B;
  q.P = P;
  q.N = N;
  const fastloss::AucCudaScratch s = fastloss::auc_cuda_scratch(q);
  sizes[0] = s.doubles;
  sizes[1] = s.floats;
}

// shape: B, P, N, pos row stride, neg row stride
const char* emu_auc(const void* pos, const void* neg, int dtype, const int64_t* shape, float* loss,
                    float* grad_pos, float* grad_neg, double* loss_scratch, float* grad_scratch) {
  fastloss::AucProblem q;
  q.pos = pos;
  q.neg = neg;
  q.dtype = fastloss::ScalarType(dtype);
  q.B = shape[0];
  q.P = shape[1];
  q.N = shape[2];
  q.pos_stride = shape[3];
  q.neg_stride = shape[4];
  return fastloss::auc_cuda(q, loss, grad_pos, grad_neg, loss_scratch, grad_scratch, nullptr);
}

}  // extern "C"
