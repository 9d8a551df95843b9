// Torch-aware helpers the linear-loss ops share (linear_losses_op.cpp, linear_ce_tiles_op.cpp).
#pragma once
#include <ATen/core/Tensor.h>

namespace fastloss {

// acc += a @ b (acc = a @ b when !add) for 16-bit a, b into a float32 acc by one CUDA GEMM
// with a float32 epilogue; false where torch cannot (the CPU, or a torch without addmm's
// out_dtype overload): the caller then forms the product otherwise. See linear_losses_op.cpp.
bool add_product_in_float32(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b, bool add);

}  // namespace fastloss
