// Generic CPU dequant-GEMM kernels (any CPU), and the run-time choice between them and the
// AVX2 / AVX-512 instantiations.
#include "../common/cpu_features.h"
#define FL_ISA_VEC float
#include "quant_cpu_impl.h"

namespace fastloss {

// the AVX2 / AVX-512 instantiations, compiled in their own files with those flags
FASTLOSS_DECLARE_ISAS(
    void quant_gemv(const QuantWeight&, const float*, const float*, int64_t, const float*,
        float*, int64_t, int64_t);
    void quant_dequant(const QuantWeight&, float*, int64_t, int64_t);)

void quant_gemv_cpu(const QuantWeight& w, const float* x, const float* xsum, int64_t M,
                    const float* bias, float* y, int64_t n0, int64_t n1) {
  FASTLOSS_CPU_DISPATCH(quant_gemv(w, x, xsum, M, bias, y, n0, n1));
}

void quant_dequant_rows_cpu(const QuantWeight& w, float* out, int64_t n0, int64_t n1) {
  FASTLOSS_CPU_DISPATCH(quant_dequant(w, out, n0, n1));
}

#if !defined(FASTLOSS_HAVE_AMX)
// built without the AMX path (a compiler without AMX, or not x86-64): never taken
bool quant_amx_applies(const QuantWeight&) { return false; }
int64_t quant_amx_padded_rows(int64_t M) { return M; }
int64_t quant_amx_packed_words(int64_t, int64_t, int) { return 0; }
void quant_amx_pack_x(const float*, int64_t, int64_t, int, uint32_t*, int64_t, int64_t) {}
int64_t quant_amx_block_rows() { return 1; }
void quant_amx_gemm(const QuantWeight&, const uint32_t*, int, int64_t, const float*, const float*,
                    float*, int64_t, int64_t) {}
int64_t quant_amx_gemv_slots(const QuantWeight&, int64_t) { return 0; }
int64_t quant_amx_gemv_packed_bytes(const QuantWeight&, int64_t, int64_t) { return 0; }
int64_t quant_amx_gemv_block_rows() { return 1; }
bool quant_amx_gemv_exponents(const QuantWeight&, const float*, int64_t, int32_t*) { return false; }
void quant_amx_gemv_pack_x(const QuantWeight&, const float*, const int32_t*, int64_t, int64_t, uint8_t*, float*) {}
void quant_amx_gemv(const QuantWeight&, const uint8_t*, const int32_t*, const float*, int64_t, int64_t,
                    const float*, float*, BlockQueue&, int) {}
#endif

}  // namespace fastloss
