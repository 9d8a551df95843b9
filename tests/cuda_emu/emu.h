// A small CUDA emulator for the tests of a machine without a GPU: a .cu file's kernels compile
// as plain C++ (g++) against the stub CUDA headers of include/, and each block runs on the CPU
// with one fiber (ucontext) per thread. Blocks run one after another; inside a block the fibers
// run until they reach __syncthreads or a warp shuffle, which the scheduler resolves once every
// thread concerned has arrived. It checks what a GPU would not report clearly: a barrier or a
// full-mask shuffle that not every thread reaches (divergence), an invalid launch shape.
//
// Between barriers the threads run one after another, in an order set by emu_set_schedule:
// thread order, reversed, or a seeded shuffle per phase; a warp whose lanes have all reached a
// shuffle runs on at once (as a GPU warp may run ahead of the others until a barrier). A kernel whose result changes with
// the order reads what another thread writes without a barrier between them (a race on a GPU);
// the tests run kernels under several orders and compare the outputs bit for bit.
// What it cannot see: races the orders do not expose, timing, and the GPU's exact float
// rounding of intrinsics such as __expf.
// It is test code only; nothing of it ships in fastloss.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
constexpr int warpSize = 32;

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 719 };

namespace emu {

inline int64_t grid_cap = 0;    // > 0: blocks_for() grids of at most this many blocks
inline int schedule = 0;        // 0: thread order, 1: reversed, 2: shuffled (seeded)
inline uint64_t schedule_seed = 1;
inline cudaError_t last_error = cudaSuccess;
inline std::string last_message;
inline std::string fault_message;  // set by a thread that did what a GPU would trap on

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int lane_id = 0, warp_id = 0;
  enum State { run, barrier, shuffle, done } state = run;
  // a pending shuffle: the value offered, how the source lane is chosen, the result
  uint64_t value = 0, result = 0;
  int op = 0;  // 0: idx, 1: down, 2: up, 3: xor
  int arg = 0, width = 32;
  unsigned mask = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  const std::function<void()>* body = nullptr;
};
inline Block* block = nullptr;
inline std::vector<char> stacks;  // one per thread of a block, reused by every block
constexpr size_t kStack = 128 * 1024;

inline void fiber_entry() {
  (*block->body)();
  Fiber& f = block->fibers[block->current];
  f.state = Fiber::done;
  swapcontext(&f.ctx, &block->scheduler);
}

inline Fiber& self() { return block->fibers[block->current]; }

// Ends the calling thread and the launch with `what` (a GPU would trap).
inline void fault(const std::string& what) {
  fault_message = what + " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
                  ", thread " + std::to_string(threadIdx.x) + "," + std::to_string(threadIdx.y) + ")";
  Fiber& f = self();
  f.state = Fiber::done;
  swapcontext(&f.ctx, &block->scheduler);
}
inline void yield_to_scheduler() {
  Fiber& f = self();
  swapcontext(&f.ctx, &block->scheduler);
  threadIdx = block->fibers[block->current].tid;
}

inline void run_block(const std::function<void()>& body, dim3 bdim) {
  const int n = int(bdim.x * bdim.y * bdim.z);
  Block b;
  b.body = &body;
  b.fibers.resize(size_t(n));
  if (stacks.size() < size_t(n) * kStack) stacks.resize(size_t(n) * kStack);
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[size_t(i)];
    f.tid = {unsigned(i) % bdim.x, (unsigned(i) / bdim.x) % bdim.y, unsigned(i) / (bdim.x * bdim.y)};
    f.lane_id = i % 32;
    f.warp_id = i / 32;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks.data() + size_t(i) * kStack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  block = &b;
  const int warps = (n + 31) / 32;
  auto fail = [&](const std::string& m) {
    block = nullptr;
    throw std::runtime_error(m);
  };
  // Warp w's lanes all wait at a shuffle: give each its result and let them run again.
  // A warp with some lanes at a shuffle and the others finished or at a barrier is divergent.
  auto resolve = [&](int w, bool final_check) {
    const int lo = w * 32, hi = std::min(n, lo + 32);
    int waiting = 0;
    for (int i = lo; i < hi; ++i) waiting += b.fibers[size_t(i)].state == Fiber::shuffle;
    if (waiting == 0) return false;
    if (waiting != hi - lo) {
      if (!final_check) return false;  // the others may still arrive in this phase
      fail("divergent warp shuffle: warp " + std::to_string(w) + " has " + std::to_string(waiting) +
           " of " + std::to_string(hi - lo) + " lanes at the shuffle");
    }
    for (int i = lo; i < hi; ++i) {
      Fiber& f = b.fibers[size_t(i)];
      const int lane = i - lo, base = lane - lane % f.width;
      int src = lane;
      if (f.op == 0) src = base + f.arg % f.width;
      if (f.op == 1) src = lane % f.width + f.arg < f.width ? lane + f.arg : lane;
      if (f.op == 2) src = lane % f.width - f.arg >= 0 ? lane - f.arg : lane;
      if (f.op == 3) src = ((lane % f.width) ^ f.arg) < f.width ? base + ((lane % f.width) ^ f.arg) : lane;
      f.result = src < hi - lo ? b.fibers[size_t(lo + src)].value : f.value;
    }
    for (int i = lo; i < hi; ++i) b.fibers[size_t(i)].state = Fiber::run;
    return true;
  };
  // Runs fiber i until it blocks; a warp completed at a shuffle runs on at once (depth first),
  // as a GPU warp may run ahead of the others until a __syncthreads.
  std::vector<int> ready;
  auto drive = [&](int first) {
    ready.assign(1, first);
    while (!ready.empty()) {
      const int i = ready.back();
      ready.pop_back();
      if (b.fibers[size_t(i)].state != Fiber::run) continue;
      b.current = i;
      threadIdx = b.fibers[size_t(i)].tid;
      swapcontext(&b.scheduler, &b.fibers[size_t(i)].ctx);
      if (!fault_message.empty()) {
        const std::string m = fault_message;
        fault_message.clear();
        fail(m);
      }
      const int w = i / 32;
      if (b.fibers[size_t(i)].state == Fiber::shuffle && resolve(w, false)) {
        const int lo = w * 32, hi = std::min(n, lo + 32);
        for (int j = hi - 1; j >= lo; --j) ready.push_back(j);  // lane order: lo runs first
      }
    }
  };
  std::vector<int> order(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) order[size_t(i)] = schedule == 1 ? n - 1 - i : i;
  for (;;) {
    if (schedule == 2)  // a fresh permutation for each phase (xorshift, Fisher-Yates)
      for (int i = n - 1; i > 0; --i) {
        schedule_seed ^= schedule_seed << 13, schedule_seed ^= schedule_seed >> 7, schedule_seed ^= schedule_seed << 17;
        std::swap(order[size_t(i)], order[size_t(schedule_seed % uint64_t(i + 1))]);
      }
    for (int i : order) drive(i);
    int done = 0, at_barrier = 0;
    bool progressed = false;
    for (const Fiber& f : b.fibers) {
      done += f.state == Fiber::done;
      at_barrier += f.state == Fiber::barrier;
    }
    if (done == n) break;
    for (int w = 0; w < warps; ++w) progressed = resolve(w, true) || progressed;
    if (progressed) continue;
    if (at_barrier == n) {  // (__syncthreads_count: every thread gets the count of its votes)
      uint64_t votes = 0;
      for (const Fiber& f : b.fibers) votes += f.value;
      for (Fiber& f : b.fibers) f.state = Fiber::run, f.result = votes;
      continue;
    }
    fail("divergent __syncthreads: " + std::to_string(at_barrier) + " of " + std::to_string(n) +
         " threads at the barrier, " + std::to_string(done) + " finished");
  }
  block = nullptr;
}

struct Config {
  dim3 grid, block;
  size_t smem = 0;
  cudaStream_t stream = nullptr;
};

// kernel<<<grid, block, smem, stream>>>(args...) is rewritten as launch(kernel, {...}, args...)
// by the test's build step.
template <class Kernel, class... Args>
void launch(Kernel kernel, Config c, Args... args) {
  const unsigned long long threads = 1ull * c.block.x * c.block.y * c.block.z;
  if (threads == 0 || threads > 1024 || c.block.z > 64 || c.grid.x == 0 || c.grid.y == 0 ||
      c.grid.z == 0 || c.grid.x > 0x7fffffffu || c.grid.y > 65535 || c.grid.z > 65535 ||
      c.smem > 48 * 1024) {
    last_error = cudaErrorInvalidConfiguration;
    last_message = "invalid launch: grid (" + std::to_string(c.grid.x) + ", " +
                   std::to_string(c.grid.y) + ", " + std::to_string(c.grid.z) + "), block (" +
                   std::to_string(c.block.x) + ", " + std::to_string(c.block.y) + ", " +
                   std::to_string(c.block.z) + ")";
    return;
  }
  const std::function<void()> body = [&] { kernel(args...); };
  gridDim = c.grid;
  blockDim = c.block;
  try {
    for (unsigned z = 0; z < c.grid.z; ++z)
      for (unsigned y = 0; y < c.grid.y; ++y)
        for (unsigned x = 0; x < c.grid.x; ++x) {
          blockIdx = {x, y, z};
          run_block(body, c.block);
        }
  } catch (const std::exception& e) {
    last_error = cudaErrorLaunchFailure;
    last_message = e.what();
  }
}

template <class T>
T shuffle(unsigned mask, T v, int op, int arg, int width) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  Fiber& f = self();
  f.value = 0;
  std::memcpy(&f.value, &v, sizeof(T));
  f.op = op;
  f.arg = arg;
  f.width = width;
  f.mask = mask;
  f.state = Fiber::shuffle;
  yield_to_scheduler();
  T r;
  std::memcpy(&r, &self().result, sizeof(T));
  return r;
}

}  // namespace emu

// For the tests (each harness library is one translation unit that includes this header).
// For the tests: grids sized by blocks_for() hold at most `cap` blocks (0: no cap), so that
// each block walks several rows / items, as on a GPU past 2^20 of them.
extern "C" void emu_set_grid_cap(long long cap) { emu::grid_cap = cap; }

extern "C" void emu_set_schedule(int mode, unsigned long long seed) {
  emu::schedule = mode;
  emu::schedule_seed = seed ? seed : 1;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                      cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                                   cudaStream_t = nullptr) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(dst, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
// One device with 3 multiprocessors (few enough that a grid capped at their count still makes
// blocks walk several rows).
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? 3 : 0;
  return cudaSuccess;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : emu::last_message.c_str();
}

inline void __syncthreads() {
  emu::self().value = 0;
  emu::self().state = emu::Fiber::barrier;
  emu::yield_to_scheduler();
}
inline int __syncthreads_count(int predicate) {
  emu::self().value = predicate != 0;
  emu::self().state = emu::Fiber::barrier;
  emu::yield_to_scheduler();
  return int(emu::self().result);
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) { return emu::shuffle(mask, v, 0, src, width); }
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) { return emu::shuffle(mask, v, 1, int(d), width); }
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) { return emu::shuffle(mask, v, 2, int(d), width); }
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) { return emu::shuffle(mask, v, 3, m, width); }

inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::shuffle(mask, 0, 0, 0, 32); }

// A vote as the lanes in `mask` exchanging their bits (distinct bits: the sum is the OR); the
// lane of each thread is its index in the warp, as the kernels compute it.
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const unsigned lane = (threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y) % 32;
  unsigned v = predicate ? (1u << lane) : 0u;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(mask, v, off);
  return v & mask;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// A GPU load of T needs an address aligned to sizeof(T) (a misaligned one traps).
// Blocks run one at a time and a block's threads never interleave between barriers: a plain
// add is what an atomic one is here.
template <class T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

template <class T>
T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) emu::fault("misaligned load");
  return *p;
}
// Byte i of the result is byte (s >> 4 i) & 7 of the 8 bytes {y, x} (x the low word).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = uint64_t(y) << 32 | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned((v >> (8 * ((s >> (4 * i)) & 7))) & 0xffu) << (8 * i);
  return r;
}
// A store with a cache hint (the kernels use the default policy, write-back): the address must
// be aligned to sizeof(T), as for any GPU store (a misaligned one traps).
template <class T>
void __stwb(T* p, T v) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) emu::fault("misaligned store");
  *p = v;
}
inline float __expf(float x) { return std::exp(x); }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline long long __double_as_longlong(double d) {
  long long v;
  std::memcpy(&v, &d, sizeof v);
  return v;
}
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, sizeof d);
  return d;
}
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
