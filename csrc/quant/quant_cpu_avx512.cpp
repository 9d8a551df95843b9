// The AVX-512 dequant-GEMM kernels: quant_cpu_impl.h on Vec16, with Vec8 for planes shorter
// than sixteen bytes (compiled with -mavx512f -mavx2 and FL_ISA=avx512; entered only after the
// run-time CPU check).
#include "../common/vec_avx2.h"
#include "../common/vec_avx512.h"
#define FL_ISA_VEC Vec16
#define FL_ISA_NARROW Vec8
#include "quant_cpu_impl.h"
