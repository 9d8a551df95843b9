#include "block_queue.h"

namespace fastloss {

BlockQueue::BlockQueue(int64_t count, int threads)
    : threads_(threads < 1 ? 1 : threads), ranges_(new Range[threads_]) {
  for (int t = 0; t < threads_; ++t) {
    const uint64_t front = uint64_t(count * t / threads_), back = uint64_t(count * (t + 1) / threads_);
    ranges_[t].span.store(front | back << 32, std::memory_order_relaxed);
  }
}

int64_t BlockQueue::next(int t, bool* forward) {
  uint64_t span = ranges_[t].span.load(std::memory_order_relaxed);
  while (front_of(span) < back_of(span)) {
    if (ranges_[t].span.compare_exchange_weak(span, span + 1, std::memory_order_relaxed)) {
      *forward = true;
      return int64_t(front_of(span));
    }
  }
  *forward = false;
  for (;;) {
    // the range with the most blocks left
    int victim = -1;
    uint64_t most = 0;
    for (int v = 0; v < threads_; ++v) {
      const uint64_t s = ranges_[v].span.load(std::memory_order_relaxed);
      if (front_of(s) < back_of(s) && back_of(s) - front_of(s) > most) victim = v, most = back_of(s) - front_of(s);
    }
    if (victim < 0) return -1;  // (ranges only shrink: one scan that finds all empty is final)
    uint64_t s = ranges_[victim].span.load(std::memory_order_relaxed);
    while (front_of(s) < back_of(s)) {
      const uint64_t back = back_of(s) - 1;
      if (ranges_[victim].span.compare_exchange_weak(s, front_of(s) | back << 32, std::memory_order_relaxed))
        return int64_t(back);
    }
  }
}

}  // namespace fastloss
