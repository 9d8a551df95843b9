// Blocks of work shared by a team of threads, balanced by stealing (torch-free).
//
// A memory-bound kernel split into equal static halves still finishes unevenly: on the 2-vCPU
// dev VM the two threads of a batch-1 4096 x 4096 4-bit GEMV (~0.5 ms) ended a median 95-105 us
// apart from call to call, one thread then streaming alone at about half the bandwidth the
// pair has. Here each thread first takes the blocks of its own contiguous range front to back
// (the order its prefetches expect), then, when its range is empty, the last blocks of the
// range with the most left, back to front, one at a time, until no block is left anywhere.
// Every block is taken exactly once, by exactly one thread, whatever the timing; which thread
// takes it does not change what is computed. (Out of line in block_queue.cpp, built for the
// baseline ISA: an inline body would also be compiled into the AVX-512 / AMX kernel files, and
// the linker could keep that copy for every caller.)
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>

namespace fastloss {

class BlockQueue {
 public:
  // blocks [0, count) for `threads` threads (0 <= count < 2^32; threads < 1 counts as 1)
  BlockQueue(int64_t count, int threads);

  int threads() const { return threads_; }

  // The next block for thread t (t < threads()), or -1 when every block is taken. *forward:
  // whether it came from the front of t's own range (the block after it is then likely t's
  // next) or was taken from the back of another's (the block before it is).
  int64_t next(int t, bool* forward);

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
