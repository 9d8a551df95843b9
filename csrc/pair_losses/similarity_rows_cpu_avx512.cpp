// The AVX-512 similarity-block kernels: similarity_rows_cpu_impl.h on Vec16 (compiled with
// -mavx512f and FL_ISA=avx512; entered only after the run-time CPU check).
#include "../common/vec_avx512.h"
#define FL_ISA_VEC Vec16
#include "similarity_rows_cpu_impl.h"
