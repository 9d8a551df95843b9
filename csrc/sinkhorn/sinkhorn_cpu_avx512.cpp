// The AVX-512 entropic-OT solver: sinkhorn_cpu_impl.h on Vec16 (compiled with -mavx512f and
// FL_ISA=avx512; entered only after the run-time CPU check).
#include "../common/vec_avx512.h"
#include "../common/vec4d_avx2.h"
#define FL_ISA_DVEC Vec4d
#define FL_ISA_VEC Vec16
#include "sinkhorn_cpu_impl.h"
