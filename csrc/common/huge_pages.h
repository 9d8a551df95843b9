// Transparent-huge-page advice for a fresh CPU output buffer (torch-free).
//
// A fresh output is written once, and on Linux the first touch of each 4 KiB page costs a
// fault and a zeroing: measured here, allocating and filling 512 MB took longer than the
// losses' backward kernel itself, and first-touching a 268 MB convolution output took 75-90 ms
// against 11 ms for writing it again. Advising transparent huge pages for the untouched buffer
// (as torch does for every allocation under THP_MEM_ALLOC_ENABLE=1) cuts the faults 512-fold.
// Advice only: where THP is off it changes nothing; FASTLOSS_NO_THP=1 turns it off.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastloss {

inline void advise_huge_pages(void* data, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool off = std::getenv("FASTLOSS_NO_THP") != nullptr;
  if (off) return;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + nbytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

}  // namespace fastloss
