// The CUDA kernels of csrc/pair_losses/similarity_rows_cuda.cu under the emulator (emu.h),
// behind a C interface for ctypes (tests/test_cuda_emulation.py). Each returns null or the error.
#include "kernels.inc"

namespace {

// shape: rows, n, row0
fastloss::SimBlock block(float* s, const float* keys, const int64_t* shape) {
  fastloss::SimBlock q;
  q.s = s;
  q.rows = shape[0];
  q.n = shape[1];
  q.row0 = shape[2];
  q.keys = keys;
  return q;
}

}  // namespace

extern "C" {

// params: alpha, beta, base, epsilon (NaN: no mining)
const char* emu_ms_rows(float* s, const float* keys, const int64_t* shape, const float* params,
                        float* lse_pos, float* lse_neg, int write_grad) {
  fastloss::MsParams p;
  p.alpha = params[0];
  p.beta = params[1];
  p.base = params[2];
  p.mine = params[3] == params[3];
  p.epsilon = p.mine ? params[3] : 0.f;
  return fastloss::ms_rows_cuda(block(s, keys, shape), p, lse_pos, lse_neg, write_grad != 0, nullptr);
}

const char* emu_tcm_rows(float* s, const float* keys, const int64_t* shape, float m_pos, float m_neg,
                         double* row_stats) {
  return fastloss::tcm_rows_cuda(block(s, keys, shape), {m_pos, m_neg}, row_stats, nullptr);
}

const char* emu_tcm_rows_grad(float* s, const float* keys, const int64_t* shape, float m_pos,
                              float m_neg, const double* coef) {
  return fastloss::tcm_rows_grad_cuda(block(s, keys, shape), {m_pos, m_neg}, coef, nullptr);
}

int64_t emu_clip_parts(const int64_t* shape) {
  return fastloss::clip_cuda_parts(block(nullptr, nullptr, shape));
}

// lse_col null: rows only
const char* emu_clip_rows(float* s, const int64_t* shape, float scale, float* lse_row, float* diag,
                          float* col_max, float* col_sum, float* lse_col) {
  return fastloss::clip_rows_cuda(block(s, nullptr, shape), scale, lse_row, diag, col_max, col_sum,
                                  lse_col, nullptr);
}

const char* emu_clip_rows_grad(float* s, const int64_t* shape, float scale, const float* lse_row,
                               const float* lse_col, const float* g) {
  return fastloss::clip_rows_grad_cuda(block(s, nullptr, shape), scale, lse_row, lse_col, g, nullptr);
}

}  // extern "C"
