// One warp-wide tensor-core multiply-accumulate, D += A B, for m16n8k16 tiles of float16 or
// bfloat16 with float32 accumulation (PTX mma.sync.aligned.m16n8k16.row.col, sm_80 and later).
// Torch-free; included only by .cu files (and by the test emulator, which supplies its own).
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 g + t (g = lane / 4,
// t = lane % 4); each 32-bit register holds two consecutive elements, the lower index in the
// low 16 bits:
//   a[0]: A[g][2t, 2t+1]      a[1]: A[g+8][2t, 2t+1]   a[2]: A[g][2t+8, +9]   a[3]: A[g+8][2t+8, +9]
//   b[0]: B[2t, 2t+1][g]      b[1]: B[2t+8, +9][g]     (B is K x N: b holds two k of column g)
//   d[0], d[1]: D[g][2t, 2t+1]                         d[2], d[3]: D[g+8][2t, 2t+1]
// Every lane of the warp must call it (it is a warp-wide instruction).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cuda_helpers.cuh"
#include "macros.h"

#if !defined(__CUDACC__)
#include "mma_emu.h"  // the test emulator's warp-level model of the instruction (tests/cuda_emu)
#endif

namespace fastloss {
namespace FL_ISA {

// Whether a kernel can use mma_m16n8k16 on the current device: the code the device will run
// was compiled for sm_80 or later, both as PTX (__CUDA_ARCH__, which picks the branch below)
// and as the loaded binary (a JIT from compute_75 PTX on an sm_80 GPU reports binaryVersion 80
// but holds the __trap branch). `Kernel` is any __global__ function of the same file. Asked
// once per device (cudaFuncGetAttributes costs microseconds, a batch-1 GEMV some tens of them);
// devices past the first 64 ask each time.
template <auto Kernel>
inline bool mma_available() {
  auto ask = [] {
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(Kernel)) != cudaSuccess) {
      cudaGetLastError();  // clear it: not being able to ask means not using the kernel
      return false;
    }
    return attr.ptxVersion >= 80 && attr.binaryVersion >= 80;
  };
  static std::atomic<signed char> known[64] = {};
  return once_per_device(known, ask);
}

// The A fragment of rows r0 .. r0 + 15, columns k0 .. k0 + 15 of a row-major shared tile of
// 16-bit values (Ld per row), and the B fragment of columns n0 .. n0 + 7 of B = tile^T, i.e.
// of a tile stored [n][k] (each lane's pairs are two consecutive k of one row).
template <int Ld>
__device__ __forceinline__ uint32_t shared_pair(const uint16_t (*tile)[Ld], int r, int c) {
  return *reinterpret_cast<const uint32_t*>(&tile[r][c]);
}
template <int Ld>
__device__ __forceinline__ void load_a_fragment(uint32_t (&a)[4], const uint16_t (*tile)[Ld], int r0,
                                                int k0, int lane) {
  const int r = r0 + lane / 4, c = k0 + 2 * (lane % 4);
  a[0] = shared_pair(tile, r, c);
  a[1] = shared_pair(tile, r + 8, c);
  a[2] = shared_pair(tile, r, c + 8);
  a[3] = shared_pair(tile, r + 8, c + 8);
}
template <int Ld>
__device__ __forceinline__ void load_b_fragment(uint32_t (&b)[2], const uint16_t (*tile)[Ld], int n0,
                                                int k0, int lane) {
  const int r = n0 + lane / 4, c = k0 + 2 * (lane % 4);
  b[0] = shared_pair(tile, r, c);
  b[1] = shared_pair(tile, r, c + 8);
}

template <class T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched: mma_available() is false for these binaries
#elif !defined(__CUDACC__)
  emu::mma_m16n8k16(d, a, b, std::is_same_v<T, __nv_bfloat16>);
#endif
}

}  // namespace FL_ISA
}  // namespace fastloss
