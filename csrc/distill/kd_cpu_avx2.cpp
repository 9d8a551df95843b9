// The AVX2 distillation kernels: kd_cpu_impl.h and kd_rank_impl.h on Vec8 (compiled with
// -mavx2 -mfma -mf16c and FL_ISA=avx2; entered only after the run-time CPU check).
#include "../common/vec_avx2.h"
#define FL_ISA_VEC Vec8
#include "kd_cpu_impl.h"
#include "kd_rank_impl.h"
