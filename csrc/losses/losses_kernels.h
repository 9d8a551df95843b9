// Entry points of the row-loss kernels, callable without torch or CUDA headers.
#pragma once
#include <cstdint>

#include "loss_params.h"

namespace fastloss {

// CPU: rows [r0, r1). The forward returns -1, or the first row in the range whose target is
// neither a class index nor ignore_index (that row and the rest of the range are not written).
int64_t losses_forward_cpu(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                           const RowStats& out, int64_t r0, int64_t r1);
void losses_backward_cpu(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                         const RowGrad& g, int64_t r0, int64_t r1);
// Forward then backward of each row, back to back (the second read of a row comes from cache):
// g.grad_loss is d(total)/d(row loss), known in advance; g.stat0/1 must be out.stat0/1.
// Returns as losses_forward_cpu.
int64_t losses_forward_backward_cpu(const LogitsView& lv, const RowTargets& rt,
                                    const LossParams& p, const RowStats& out, const RowGrad& g,
                                    int64_t r0, int64_t r1);
// The active CPU path's float -> storage conversion, for tests (module.cpp exposes it).
void store_floats_cpu(const float* in, void* out, int64_t n, ScalarType t);

// CUDA: all rows, on `stream` (a cudaStream_t). A target out of range gives that row a NaN
// loss and NaN gradient (checking on the host would need a device synchronisation).
// Return nullptr, or the CUDA error message of the launch.
const char* losses_forward_cuda(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                                const RowStats& out, void* stream);
const char* losses_backward_cuda(const LogitsView& lv, const RowTargets& rt, const LossParams& p,
                                 const RowGrad& g, void* stream);
const char* losses_forward_backward_cuda(const LogitsView& lv, const RowTargets& rt,
                                         const LossParams& p, const RowStats& out,
                                         const RowGrad& g, void* stream);
// data [rows, cols] (contiguous, dtype) *= factor[per_row ? r : 0] for each row r, in place,
// except rows whose factor is exactly 1, which are neither read nor written: grad_in_forward's
// backward scales the gradient made in the forward by the incoming gradient without the host
// reading it (that would wait for the GPU), and moves no bytes for the common 1.
const char* scale_rows_unless_one_cuda(void* data, ScalarType dtype, int64_t rows, int64_t cols,
                                       const float* factor, bool per_row, void* stream);
// The reductions around the row kernels in one launch each, on real (untraced) CUDA tensors:
// each is what a few small ATen calls did, and on a GPU a small call costs its launches.
// reduce_rows_cuda: loss[0] = the sum of rows [N] (float32), divided for the mean by the
// kept rows' total weight (weight [C] float32 or null: one per row whose target is not
// ignore_index), which denom[0] receives (mean only). One block, a fixed order: deterministic.
const char* reduce_rows_cuda(const float* rows, const int64_t* target, const float* weight, int64_t N,
                             int64_t C, int64_t ignore_index, bool mean, float* loss, float* denom,
                             void* stream);
// mean_factor_rows_cuda: out[r] = 1 / (the kept rows' total weight, as reduce_rows_cuda's
// mean divides by) for r < N: grad_in_forward's per-row factor of a mean, made before its
// kernel (one block, the same fixed-order sum).
const char* mean_factor_rows_cuda(const int64_t* target, const float* weight, int64_t N, int64_t C,
                                  int64_t ignore_index, float* out, void* stream);
// upstream_rows_cuda: out[r] = grad[0] / (denom ? denom[0] : divisor) for r < n: the incoming
// gradient of a sum or mean (grad of dtype, one value) as each row's float32 factor.
const char* upstream_rows_cuda(const void* grad, ScalarType dtype, const float* denom, double divisor,
                               int64_t n, float* out, void* stream);

}  // namespace fastloss
