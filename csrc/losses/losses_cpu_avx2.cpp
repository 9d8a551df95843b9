// The AVX2 row-loss kernels: the drivers of losses_cpu_impl.h on Vec8. This file alone is
// compiled with -mavx2 -mfma -mf16c and FL_ISA=avx2; it is only entered after the run-time
// CPU check (common/cpu_features.cpp).
#include "../common/vec_avx2.h"
#define FL_ISA_VEC Vec8
#include "losses_cpu_impl.h"
