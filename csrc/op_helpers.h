// Small torch-aware helpers shared by the families' *_op.cpp files (never by kernel files).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "losses/loss_params.h"  // ScalarType

#if defined(FASTLOSS_WITH_CUDA)
#include <c10/cuda/CUDAStream.h>
#endif

namespace fastloss {

// The kernels' storage type of a float32 / float16 / bfloat16 tensor; anything else is an
// error naming the op and the argument.
inline ScalarType kernel_dtype(const at::Tensor& t, const char* op, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarType::f32;
    case at::kHalf: return ScalarType::f16;
    case at::kBFloat16: return ScalarType::bf16;
    default:
      TORCH_CHECK(false, op, ": ", what, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

#if defined(FASTLOSS_WITH_CUDA)
// The current CUDA stream as the kernel entry points take it (a cudaStream_t as void*).
inline void* cuda_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A CUDA entry point's result: nullptr, or the launch's error, reported for `op`.
inline void check_cuda_launch(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err);
}
#endif

}  // namespace fastloss
