// The CUDA kernels of csrc/sinkhorn/sinkhorn_cuda.cu under the emulator (emu.h), behind a C
// interface for ctypes (tests/test_cuda_emulation.py). Each function returns null or the error.
#include "kernels.inc"

namespace {

// shape: B, n, m, max_iter
fastloss::OtBatch batch(const void* cost, const void* a, const void* b, int is_double,
                        const int64_t* shape, double eps, double tol) {
  fastloss::OtBatch q;
  q.cost = cost;
  q.a = a;
  q.b = b;
  q.is_double = is_double != 0;
  q.B = shape[0];
  q.n = shape[1];
  q.m = shape[2];
  q.max_iter = shape[3];
  q.eps = eps;
  q.tol = tol;
  return q;
}

// outs: value, f, g, n_iter, error, transport
fastloss::OtBatchOut outputs(void** outs) {
  fastloss::OtBatchOut out;
  out.value = outs[0];
  out.f = outs[1];
  out.g = outs[2];
  out.n_iter = static_cast<int64_t*>(outs[3]);
  out.error = outs[4];
  out.transport = outs[5];
  return out;
}

}  // namespace

extern "C" {

int64_t emu_sinkhorn_workspace(int is_double, const int64_t* shape) {
  return int64_t(fastloss::sinkhorn_cuda_workspace_bytes(batch(nullptr, nullptr, nullptr, is_double, shape, 1.0, 0.0)));
}

// outs: value, f, g, n_iter, error, transport
const char* emu_sinkhorn_solve(const void* cost, const void* a, const void* b, int is_double,
                               const int64_t* shape, double eps, double tol, void** outs,
                               void* workspace, int* host_active) {
  return fastloss::sinkhorn_solve_cuda(batch(cost, a, b, is_double, shape, eps, tol), outputs(outs),
                                       workspace, host_active, nullptr);
}

// SNS: keep entries per row on average, warm-up iterations, CG iterations per Newton step.
int64_t emu_sns_workspace(int is_double, const int64_t* shape, int64_t keep) {
  fastloss::OtBatch q = batch(nullptr, nullptr, nullptr, is_double, shape, 1.0, 0.0);
  q.keep = keep;
  return int64_t(fastloss::sinkhorn_cuda_workspace_bytes(q));
}

const char* emu_sns_solve(const void* cost, const void* a, const void* b, int is_double,
                          const int64_t* shape, double eps, double tol, int64_t keep,
                          int64_t warmup_iters, int64_t cg_iters, void** outs, void* workspace,
                          int* host_active) {
  fastloss::OtBatch q = batch(cost, a, b, is_double, shape, eps, tol);
  q.keep = keep, q.warmup_iters = warmup_iters, q.cg_iters = cg_iters;
  return fastloss::sinkhorn_solve_cuda(q, outputs(outs), workspace, host_active, nullptr);
}

const char* emu_sinkhorn_plan(const void* cost, const void* a, const void* b, int is_double,
                              const int64_t* shape, double eps, const void* f, const void* g,
                              const double* scale, void* out) {
  return fastloss::sinkhorn_plan_cuda(batch(cost, a, b, is_double, shape, eps, 0.0), f, g, scale,
                                      out, nullptr);
}

}  // extern "C"
