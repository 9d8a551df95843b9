// The CUDA kernels of csrc/distill/kd_cuda.cu under the emulator (emu.h), behind a C interface
// for ctypes (tests/test_cuda_emulation.py). Each function returns null or the error text.
#include "kernels.inc"

namespace {

// shape: N, C, student row stride, teacher row stride
fastloss::KdProblem problem(const void* s, const void* t, int dtype, const int64_t* shape,
                            int kind, float temperature, float beta) {
  fastloss::KdProblem q;
  q.student = s;
  q.teacher = t;
  q.dtype = fastloss::ScalarType(dtype);
  q.N = shape[0];
  q.C = shape[1];
  q.s_stride = shape[2];
  q.t_stride = shape[3];
  q.kind = fastloss::KdKind(kind);
  q.temperature = temperature;
  q.beta = beta;
  return q;
}

}  // namespace

extern "C" {

const char* emu_kd_forward(const void* s, const void* t, int dtype, const int64_t* shape, int kind,
                           float temperature, float beta, float* loss, float* stats) {
  return fastloss::kd_forward_cuda(problem(s, t, dtype, shape, kind, temperature, beta), loss,
                                   stats, nullptr);
}

const char* emu_kd_backward(const void* s, const void* t, int dtype, const int64_t* shape,
                            int kind, float temperature, float beta, const float* grad_loss,
                            const float* stats, void* grad) {
  return fastloss::kd_backward_cuda(problem(s, t, dtype, shape, kind, temperature, beta),
                                    grad_loss, stats, grad, nullptr);
}

// shape: N, C, student row stride, teacher row stride, k, renormalize
const char* emu_topk_kl(const void* s, const void* t, int dtype, const int64_t* shape,
                        float temperature, float* loss, void* grad) {
  fastloss::TopkKlProblem q;
  q.student = s;
  q.teacher = t;
  q.dtype = fastloss::ScalarType(dtype);
  q.N = shape[0];
  q.C = shape[1];
  q.s_stride = shape[2];
  q.t_stride = shape[3];
  q.k = shape[4];
  q.renormalize = shape[5] != 0;
  q.temperature = temperature;
  return fastloss::topk_kl_cuda(q, loss, grad, nullptr);
}

// shape: N, C, student row stride, teacher row stride, ignore_index
const char* emu_pld(const void* s, const void* t, const int64_t* target, int dtype, const int64_t* shape,
                    float temperature, const int64_t* order, const void* sorted_t, const void* sorted_s,
                    float* scratch, float* loss, void* grad) {
  fastloss::PldProblem q;
  q.student = s;
  q.teacher = t;
  q.target = target;
  q.dtype = fastloss::ScalarType(dtype);
  q.N = shape[0];
  q.C = shape[1];
  q.s_stride = shape[2];
  q.t_stride = shape[3];
  q.ignore_index = shape[4];
  q.temperature = temperature;
  return fastloss::pld_cuda(q, order, sorted_t, sorted_s, scratch, loss, grad, nullptr);
}

}  // extern "C"
