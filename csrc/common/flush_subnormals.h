// Flush-to-zero and denormals-are-zero (MXCSR FTZ | DAZ) for the calling thread while in scope,
// the previous mode restored after. The loss families' CPU kernels run under it
// (FASTLOSS_CPU_DISPATCH_FLUSHED): a subnormal float32 result or operand costs a microcode
// assist of ~100 cycles in every x86 SSE / AVX operation that produces or takes it, and
// softmax-type losses make them wherever logits spread past ~87 (distillation's JSD ran 3.7x
// slower at logits of std 40). What it changes: values below the smallest normal float
// (1.2e-38) count as 0 inside the kernels, which must therefore use no subnormal constant (a
// floor of 1e-38 reads as 0). Each thread has its own MXCSR, so the scope is one kernel call,
// inside the parallel loops.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace fastloss {

class FlushSubnormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtz | kDaz); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFtz = 0x8000, kDaz = 0x0040;
  unsigned saved_;
#else
  FlushSubnormals() = default;  // (other CPUs: the generic kernels, IEEE subnormals)
#endif
 public:
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;
};

}  // namespace fastloss
