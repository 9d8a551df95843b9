// The few-shot losses' CUDA kernels of csrc/pair_losses/neighbours_cuda.cu (the k nearest
// columns, chosen-pair distances and their gradients, ICNN's score) under the emulator (emu.h), behind a C
// interface for ctypes (tests/test_cuda_emulation.py). Each returns null or the error.
#include "kernels.inc"

extern "C" {

// shape: n (rows of x), m (rows of t), d, n_nb
const char* emu_neighbour_dist(const float* x, const float* t, const int64_t* idx, const int64_t* shape,
                               float eps, float* dist) {
  return fastloss::neighbour_dist_cuda(x, t, shape[2], idx, shape[0], shape[3], shape[1], eps, dist,
                                       nullptr);
}

const char* emu_neighbour_grad_x(const float* x, const float* t, const int64_t* idx, const int64_t* shape,
                                 const float* w, float* grad_x) {
  return fastloss::neighbour_dist_grad_x_cuda(x, t, shape[2], idx, shape[0], shape[3], shape[1], w,
                                              grad_x, nullptr);
}

const char* emu_neighbour_grad_t(const float* x, const float* t, const int64_t* t_ptr, const int64_t* pairs,
                                 const int64_t* shape, const float* w, float* grad_t) {
  return fastloss::neighbour_dist_grad_t_cuda(x, t, shape[2], t_ptr, pairs, shape[1], shape[3], w,
                                              grad_t, nullptr);
}

// shape: rows, n, row0
const char* emu_knn_rows(float* s, const int64_t* shape, const float* row_sq, const float* col_sq,
                         int exclude_self, int64_t k, int64_t* idx) {
  fastloss::SimBlock q;
  q.s = s;
  q.rows = shape[0];
  q.n = shape[1];
  q.row0 = shape[2];
  return fastloss::knn_rows_cuda(q, row_sq, col_sq, exclude_self != 0, k, idx, nullptr);
}

int64_t emu_icnn_scratch(int64_t n) { return fastloss::icnn_score_cuda_scratch(n); }

// shape: N, n, k
const char* emu_icnn_score(const float* d, const bool* same, const int64_t* shape, int clipped,
                           float* grad, float* loss, double* scratch) {
  return fastloss::icnn_score_cuda(d, same, shape[0], shape[1], shape[2], clipped != 0, grad, loss,
                                   scratch, nullptr);
}

}  // extern "C"
