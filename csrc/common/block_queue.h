// Blocks of work shared by a team of threads, balanced by stealing (torch-free).
//
// A memory-bound kernel split into equal static halves still finishes unevenly: on the 2-vCPU
// dev VM the two threads of a batch-1 4096 x 4096 4-bit GEMV (~0.5 ms) ended a median 95-105 us
// apart from call to call, one thread then streaming alone at about half the bandwidth the
// pair has. Here each thread first takes the blocks of its own contiguous range front to back
// (the order its prefetches expect), then, when its range is empty, the last blocks of the
// range with the most left, back to front, one at a time, until no block is left anywhere.
// Every block is taken exactly once, by exactly one thread, whatever the timing; which thread
// takes it does not change what is computed.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>

namespace fastloss {

class BlockQueue {
 public:
  // blocks [0, count) for `threads` threads (count < 2^32)
  BlockQueue(int64_t count, int threads)
      : threads_(threads < 1 ? 1 : threads), ranges_(new Range[threads_]) {
    for (int t = 0; t < threads_; ++t) {
      const uint64_t front = uint64_t(count * t / threads_), back = uint64_t(count * (t + 1) / threads_);
      ranges_[t].span.store(front | back << 32, std::memory_order_relaxed);
    }
  }

  int threads() const { return threads_; }

  // The next block for thread t (t < threads()), or -1 when every block is taken. *forward:
  // whether it came from the front of t's own range (the block after it is then likely t's
  // next) or was taken from the back of another's (the block before it is).
  int64_t next(int t, bool* forward) {
    uint64_t span = ranges_[t].span.load(std::memory_order_relaxed);
    while (front_of(span) < back_of(span)) {
      if (ranges_[t].span.compare_exchange_weak(span, span + 1, std::memory_order_relaxed)) {
        *forward = true;
        return int64_t(front_of(span));
      }
    }
    *forward = false;
    for (;;) {
      int victim = -1;
      uint64_t most = 0;
      for (int v = 0; v < threads_; ++v) {
        const uint64_t s = ranges_[v].span.load(std::memory_order_relaxed);
        if (front_of(s) < back_of(s) && back_of(s) - front_of(s) > most) victim = v, most = back_of(s) - front_of(s);
      }
      if (victim < 0) return -1;
      uint64_t s = ranges_[victim].span.load(std::memory_order_relaxed);
      while (front_of(s) < back_of(s)) {
        const uint64_t back = back_of(s) - 1;
        if (ranges_[victim].span.compare_exchange_weak(s, front_of(s) | back << 32, std::memory_order_relaxed))
          return int64_t(back);
      }
    }
  }

 private:
  // [front, back) of a range in one word, so that its owner (front) and a thief (back) never
  // both take its last block; a cache line each (the owner's claims stay in its own core)
  struct alignas(64) Range {
    std::atomic<uint64_t> span;
  };
  static uint64_t front_of(uint64_t span) { return span & 0xffffffffu; }
  static uint64_t back_of(uint64_t span) { return span >> 32; }

  int threads_;
  std::unique_ptr<Range[]> ranges_;
};

}  // namespace fastloss
