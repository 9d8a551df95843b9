// The AVX2 similarity-block kernels: similarity_rows_cpu_impl.h on Vec8 (compiled with
// -mavx2 -mfma -mf16c and FL_ISA=avx2; entered only after the run-time CPU check).
#include "../common/vec_avx2.h"
#define FL_ISA_VEC Vec8
#include "similarity_rows_cpu_impl.h"
