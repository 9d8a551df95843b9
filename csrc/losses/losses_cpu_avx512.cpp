// The AVX-512 row-loss kernels: the drivers of losses_cpu_impl.h on Vec16. This
// file alone is compiled with -mavx512f and FL_ISA=avx512; it is only entered after the
// run-time CPU check (common/cpu_features.cpp).
#include "../common/vec_avx512.h"
#define FL_ISA_VEC Vec16
#include "losses_cpu_impl.h"
