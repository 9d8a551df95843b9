// The test emulator's model of the warp-wide mma.sync m16n8k16 (float16 / bfloat16 inputs,
// float32 accumulation), written from the PTX ISA's fragment layout (csrc/common/mma.cuh
// repeats it): every lane leaves its fragments in the warp's scratch, the warp meets, each lane
// computes its four outputs from the whole A and B, and the warp meets again before the
// scratch can be overwritten. A lane that skips the instruction is a divergent warp here.
#pragma once
#include "common/half_convert.h"
#include "../emu.h"

struct cudaFuncAttributes {
  int binaryVersion = 90, ptxVersion = 90;  // the emulator runs every kernel as an sm_90 one
};
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void*) {
  *attr = cudaFuncAttributes{};
  return cudaSuccess;
}

namespace emu {

struct WarpFragments {
  uint32_t a[32][4], b[32][2];
};
inline WarpFragments mma_scratch[32];  // per warp of the block

inline float mma_element(uint32_t reg, int high, bool bf16) {
  const uint16_t h = uint16_t(high ? reg >> 16 : reg & 0xffffu);
  return bf16 ? fastloss::FL_ISA::bf16_to_float(h) : fastloss::FL_ISA::half_to_float(h);
}

// The warp meets as at a collective of its own kind (a lane at a shuffle instead is an error);
// `site` is the call in csrc/common/mma.cuh.
inline constexpr char kMmaF16[] = "mma.sync.m16n8k16.f16", kMmaBf16[] = "mma.sync.m16n8k16.bf16";
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16,
                         std::source_location site = std::source_location::current()) {
  const char* kind = bf16 ? kMmaBf16 : kMmaF16;
  const Fiber& f = self();
  WarpFragments& s = mma_scratch[f.warp_id];
  const int lane = f.lane_id;
  for (int r = 0; r < 4; ++r) s.a[lane][r] = a[r];
  for (int r = 0; r < 2; ++r) s.b[lane][r] = b[r];
  shuffle(~0u, 0, 5, 0, 32, kind, site);  // all 32 lanes: mma.sync is .aligned
  // A[i][k]: lane 4 (i % 8) + (k % 8) / 2, register (i / 8) + 2 (k / 8), half k % 2
  auto A = [&](int i, int k) { return mma_element(s.a[4 * (i % 8) + (k % 8) / 2][i / 8 + 2 * (k / 8)], k % 2, bf16); };
  // B[k][j]: lane 4 j + (k % 8) / 2, register k / 8, half k % 2
  auto B = [&](int k, int j) { return mma_element(s.b[4 * j + (k % 8) / 2][k / 8], k % 2, bf16); };
  const int g = lane / 4, t = lane % 4;
  for (int r = 0; r < 4; ++r) {
    const int i = g + 8 * (r / 2), j = 2 * t + r % 2;
    double acc = d[r];
    for (int k = 0; k < 16; ++k) acc += double(A(i, k)) * double(B(k, j));
    d[r] = float(acc);
  }
  shuffle(~0u, 0, 5, 0, 32, kind, site);  // before the scratch is overwritten
}

}  // namespace emu
