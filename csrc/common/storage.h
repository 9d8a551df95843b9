// Storage types of the CPU kernels and their scalar loads/stores (float32 math inside).
#pragma once
#include <cstdint>

#include "../losses/loss_params.h"  // ScalarType
#include "half_convert.h"
#include "macros.h"

namespace fastloss {
namespace FL_ISA {

// Distinct types for the two 16-bit formats, laid out like at::BFloat16 / at::Half.
struct bf16_t {
  uint16_t bits;
};
struct half_t {
  uint16_t bits;
};

inline float load1(const float* p) { return *p; }
inline float load1(const bf16_t* p) { return bf16_to_float(p->bits); }
inline float load1(const half_t* p) { return half_to_float(p->bits); }
inline void store1(float* p, float v) { *p = v; }
inline void store1(bf16_t* p, float v) { p->bits = float_to_bf16(v); }
inline void store1(half_t* p, float v) { p->bits = float_to_half(v); }

// Calls f.template operator()<T>() with T the storage type of dtype.
template <class F>
auto visit_storage(ScalarType dtype, F&& f) {
  switch (dtype) {
    case ScalarType::f16: return f.template operator()<half_t>();
    case ScalarType::bf16: return f.template operator()<bf16_t>();
    case ScalarType::f32: break;
  }
  return f.template operator()<float>();
}

// The generic path's "vector" is one float.
template <class V>
struct VecIo;
template <>
struct VecIo<float> {
  template <class T>
  static float load(const T* p) {
    return load1(p);
  }
  template <class T>
  static void store(T* p, float v) {
    store1(p, v);
  }
  static void lanes(float v, float* out) { out[0] = v; }
};

}  // namespace FL_ISA
}  // namespace fastloss
