// Gradient filtering's test on the CPU (linear_ce_tiles_op.cpp, kept_runs): one pass over a
// float32 tile, torch-free, one thread (a ~2 MiB tile: a few percent of its GEMMs' time). The
// inner loop is a compare per element, which the compiler vectorises; a chunk found kept is
// not read again.
#include <cmath>
#include <cstdint>

#include "linear_ce_kernels.h"

namespace fastloss {

void linear_ce_chunks_kept(const float* g, int64_t rows, int64_t n, int64_t ld, const float* threshold,
                           int64_t chunk, uint8_t* keep) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  for (int64_t c = 0; c < chunks; ++c) keep[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = g + r * ld;
    const float t = threshold[r];
    for (int64_t c = 0; c < chunks; ++c) {
      if (keep[c]) continue;
      const int64_t k0 = c * chunk, k1 = k0 + chunk < n ? k0 + chunk : n;
      int above = 0;  // (a count, not a flag with an early exit: the loop vectorises)
      for (int64_t k = k0; k < k1; ++k) above += !(std::fabs(row[k]) <= t);  // (NaN: above)
      keep[c] = above > 0;
    }
  }
}

}  // namespace fastloss
