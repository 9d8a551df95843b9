// A small CUDA emulator for the tests of a machine without a GPU: a .cu file's kernels compile
// as plain C++ (g++) against the stub CUDA headers of include/, and each block runs on the CPU
// with one fiber (ucontext) per thread. Blocks run one after another; inside a block the fibers
// run until they reach __syncthreads or a warp shuffle, which the scheduler resolves once every
// thread concerned has arrived. It checks what a GPU would not report clearly: a barrier or a
// full-mask shuffle that not every thread reaches (divergence), an invalid launch shape.
//
// Between barriers the threads run one after another, in an order set by emu_set_schedule:
// thread order, reversed, or a seeded shuffle per phase; a warp whose lanes have all reached a
// shuffle runs on at once (as a GPU warp may run ahead of the others until a barrier), its
// lanes again in the schedule's order. A kernel whose result changes with the order reads what
// another thread writes without a barrier between them (a race on a GPU); the tests run
// kernels under several orders and compare the outputs bit for bit.
// Lanes that meet at a warp collective must be at the same one (kind, call site, mask, width),
// a mask must name the calling lane and only lanes that exist, threads that meet at a barrier
// must be at the same __syncthreads. Shared memory is filled with 0xff bytes (NaN as float)
// at each block's start (build.py registers every __shared__ variable): a read before any
// write gives NaN or garbage, as on a GPU, not 0 or the previous block's value. build.py also
// makes a kernel check its __launch_bounds__ against the block it runs in.
// What it cannot see: races the orders do not expose, timing, and the GPU's exact float
// rounding of intrinsics such as __expf.
// It is test code only; nothing of it ships in fastloss.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <source_location>
#include <stdexcept>
#include <string>
#include <unordered_map>
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
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 719 };

namespace emu {

inline int64_t grid_cap = 0;    // > 0: blocks_for() grids of at most this many blocks
inline int schedule = 0;        // 0: thread order, 1: reversed, 2: shuffled (seeded)
inline uint64_t schedule_seed = 1;
inline cudaError_t last_error = cudaSuccess;
inline std::string last_message;
inline std::string fault_message;  // set by a thread that did what a GPU would trap on

// A cp.async copy (cp_async16, cuda_helpers.cuh) not landed yet.
struct AsyncCopy {
  void* dst;
  const void* src;
  size_t bytes;
};

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int lane_id = 0, warp_id = 0;
  enum State { run, barrier, shuffle, done } state = run;
  // a pending shuffle: the value offered, how the source lane is chosen, the result
  uint64_t value = 0, result = 0;
  int op = 0;  // 0: idx, 1: down, 2: up, 3: xor, 4: ballot (OR of the bits), 5: none
  int arg = 0, width = 32;
  unsigned mask = 0;
  // what it waits at (a collective's or barrier's name) and where: lanes or threads that meet
  // must be at the same one
  const char* kind = "";
  std::source_location site;
  // its cp.async copies: the open group, and the committed groups not waited for (oldest first)
  std::vector<AsyncCopy> open_copies;
  std::vector<std::vector<AsyncCopy>> committed_copies;
};

inline std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}
inline bool same_site(const Fiber& a, const Fiber& b) {
  return a.site.line() == b.site.line() && a.site.column() == b.site.column() &&
         (a.site.file_name() == b.site.file_name() || std::strcmp(a.site.file_name(), b.site.file_name()) == 0);
}
inline std::string where(const Fiber& f) {
  return std::string(f.kind) + " at " + f.site.file_name() + ":" + std::to_string(f.site.line());
}

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  const std::function<void()>* body = nullptr;
};
inline Block* block = nullptr;
inline uint64_t block_serial = 0;  // counts the blocks run, to poison shared memory once per block
inline std::vector<char> stacks;  // one per thread of a block, reused by every block
constexpr size_t kStack = 128 * 1024;

inline void fiber_entry() {
  (*block->body)();
  Fiber& f = block->fibers[block->current];
  f.state = Fiber::done;
  swapcontext(&f.ctx, &block->scheduler);
}

inline Fiber& self() { return block->fibers[block->current]; }

// cp.async: in thread order (schedule 0) a copy lands at the issuing thread's cp_async_wait
// that covers its group, as late as a GPU may land it (a read of the buffer before that wait
// and a barrier sees the shared memory's poison); in the reordered schedules it lands at once,
// as early as a GPU may (a copy issued into a buffer that other threads still read, with no
// barrier between, changes what they read). Copies of a group never waited for are dropped.
inline void cp_async(void* dst, const void* src, size_t bytes) {
  if (schedule != 0) {
    std::memcpy(dst, src, bytes);
    return;
  }
  self().open_copies.push_back({dst, src, bytes});
}
inline void cp_async_commit() {
  Fiber& f = self();
  f.committed_copies.push_back(std::move(f.open_copies));
  f.open_copies.clear();
}
inline void cp_async_wait(int newest_pending) {
  Fiber& f = self();
  while (f.committed_copies.size() > size_t(newest_pending)) {
    for (const AsyncCopy& c : f.committed_copies.front()) std::memcpy(c.dst, c.src, c.bytes);
    f.committed_copies.erase(f.committed_copies.begin());
  }
}

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
  ++block_serial;
  const int warps = (n + 31) / 32;
  auto fail = [&](const std::string& m) {
    block = nullptr;
    throw std::runtime_error(m);
  };
  // A warp's lanes that wait at a collective meet once every lane named in their mask waits
  // too: each gets its result and runs again. Lanes named in a mask but finished or at a barrier
  // at the end of a phase are a divergent warp.
  auto resolve = [&](int w, bool final_check) {
    const int lo = w * 32, hi = std::min(n, lo + 32);
    unsigned waiting = 0;
    for (int l = 0; l < hi - lo; ++l) waiting |= unsigned(b.fibers[size_t(lo + l)].state == Fiber::shuffle) << l;
    bool met = false;
    for (unsigned left = waiting; left; left &= left - 1) {
      const int i = lo + __builtin_ctz(left);
      const Fiber& f = b.fibers[size_t(i)];
      if (f.state != Fiber::shuffle) continue;  // met with an earlier lane's group
      const unsigned m = f.mask;  // within the warp's lanes (checked at the call)
      if (const unsigned unmet = m & ~waiting; unmet != 0) {
        if (!final_check) continue;  // the others may still arrive in this phase
        const int named = __builtin_popcount(m), here = named - __builtin_popcount(unmet);
        std::string missing;
        for (int l = 0; l < hi - lo && missing.empty(); ++l) {
          const Fiber& g = b.fibers[size_t(lo + l)];
          if (m >> l & 1u && g.state != Fiber::shuffle)
            missing = "lane " + std::to_string(l) + (g.state == Fiber::done ? " has finished" : " waits at " + where(g));
        }
        fail("divergent warp shuffle: warp " + std::to_string(w) + " has " + std::to_string(here) + " of " +
             std::to_string(named) + " lanes at the shuffle (" + where(f) + "); " + missing);
      }
      for (int l = 0; l < hi - lo; ++l) {
        const Fiber& g = b.fibers[size_t(lo + l)];
        if (!(m >> l & 1u)) continue;
        if (g.kind != f.kind || g.op != f.op || !same_site(g, f))
          fail("warp " + std::to_string(w) + ": lanes meet at different collectives: lane " +
               std::to_string(i - lo) + " at " + where(f) + ", lane " + std::to_string(l) + " at " + where(g));
        if (g.mask != m || g.width != f.width)
          fail("warp " + std::to_string(w) + ": lanes meet at " + where(f) + " with different masks or widths: lane " +
               std::to_string(i - lo) + " mask " + hex(m) + " width " + std::to_string(f.width) + ", lane " +
               std::to_string(l) + " mask " + hex(g.mask) + " width " + std::to_string(g.width));
      }
      uint64_t votes = 0;
      for (int l = 0; l < hi - lo; ++l)
        if (m >> l & 1u) votes |= b.fibers[size_t(lo + l)].value ? 1ull << l : 0ull;
      for (int lane = 0; lane < hi - lo; ++lane) {
        Fiber& g = b.fibers[size_t(lo + lane)];
        if (!(m >> lane & 1u)) continue;
        const int base = lane - lane % g.width;
        int src = lane;
        if (g.op == 0) src = base + g.arg % g.width;
        if (g.op == 1) src = lane % g.width + g.arg < g.width ? lane + g.arg : lane;
        if (g.op == 2) src = lane % g.width - g.arg >= 0 ? lane - g.arg : lane;
        if (g.op == 3) src = ((lane % g.width) ^ g.arg) < g.width ? base + ((lane % g.width) ^ g.arg) : lane;
        // a lane outside the mask (or the warp) gives an undefined value: all ones, NaN as a float
        g.result = src < hi - lo && (m >> src & 1u) ? b.fibers[size_t(lo + src)].value : ~uint64_t(0);
        if (g.op == 4) g.result = votes;
      }
      for (int l = 0; l < hi - lo; ++l)
        if (m >> l & 1u) b.fibers[size_t(lo + l)].state = Fiber::run;
      waiting &= ~m;
      met = true;
    }
    return met;
  };
  // The lanes lo .. hi - 1 that run on after meeting, in the schedule's order: lane order,
  // reversed, or shuffled, as the phase's threads (pushed on a stack: the last runs first).
  std::vector<int> lanes;
  auto requeue = [&](std::vector<int>& ready, int lo, int hi) {
    lanes.clear();
    for (int j = lo; j < hi; ++j) lanes.push_back(j);
    if (schedule == 1) std::reverse(lanes.begin(), lanes.end());
    if (schedule == 2)
      for (int i = int(lanes.size()) - 1; i > 0; --i) {
        schedule_seed ^= schedule_seed << 13, schedule_seed ^= schedule_seed >> 7, schedule_seed ^= schedule_seed << 17;
        std::swap(lanes[size_t(i)], lanes[size_t(schedule_seed % uint64_t(i + 1))]);
      }
    for (auto j = lanes.rbegin(); j != lanes.rend(); ++j) ready.push_back(*j);
  };
  // Runs fiber i until it blocks; a warp whose lanes met at a collective runs on at once (depth
  // first), as a GPU warp may run ahead of the others until a __syncthreads.
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
      if (b.fibers[size_t(i)].state == Fiber::shuffle && resolve(w, false))
        requeue(ready, w * 32, std::min(n, w * 32 + 32));
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
      for (const Fiber& f : b.fibers)
        if (f.kind != b.fibers[0].kind || !same_site(f, b.fibers[0]))
          fail("divergent __syncthreads: thread " + std::to_string(&f - b.fibers.data()) + " waits at " + where(f) +
               ", thread 0 at " + where(b.fibers[0]));
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

// Dynamic shared memory (FL_DYNAMIC_SHARED in cuda_helpers.cuh): one buffer of the launch's
// `smem` bytes, filled with 0xff bytes (NaN floats) before each block, as the static ones are
// poisoned. A launch may ask for more than 48 KB only up to what cudaFuncSetAttribute allowed
// the kernel, and that only up to shared_optin, the device's opt-in limit (227 KB as on an
// H100 / H200; a test may lower it to make kernels stage less than a whole row).
// kDynamicGuard bytes of 0xa5 after it must survive each block (a write past the end faults).
inline std::vector<unsigned char> dynamic_smem;
inline size_t dynamic_smem_bytes = 0;
constexpr size_t kDynamicGuard = 256;
inline size_t shared_optin = 227 * 1024;
inline std::unordered_map<const void*, size_t> dynamic_smem_allowed;  // kernel -> bytes
inline void* dynamic_shared() { return dynamic_smem.data(); }
inline void fill_dynamic_shared() {
  std::fill(dynamic_smem.begin(), dynamic_smem.begin() + dynamic_smem_bytes, 0xff);
  std::fill(dynamic_smem.begin() + dynamic_smem_bytes, dynamic_smem.end(), 0xa5);
}
inline bool dynamic_guard_intact() {
  return std::all_of(dynamic_smem.begin() + dynamic_smem_bytes, dynamic_smem.end(),
                     [](unsigned char c) { return c == 0xa5; });
}

// kernel<<<grid, block, smem, stream>>>(args...) is rewritten as launch(kernel, {...}, args...)
// by the test's build step.
template <class Kernel, class... Args>
void launch(Kernel kernel, Config c, Args... args) {
  const unsigned long long threads = 1ull * c.block.x * c.block.y * c.block.z;
  const auto allowed = dynamic_smem_allowed.find(reinterpret_cast<const void*>(kernel));
  const size_t smem_max = std::max<size_t>(48 * 1024, allowed == dynamic_smem_allowed.end() ? 0 : allowed->second);
  if (threads == 0 || threads > 1024 || c.block.z > 64 || c.grid.x == 0 || c.grid.y == 0 ||
      c.grid.z == 0 || c.grid.x > 0x7fffffffu || c.grid.y > 65535 || c.grid.z > 65535 ||
      c.smem > smem_max) {
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
  dynamic_smem_bytes = c.smem;
  dynamic_smem.assign(c.smem + kDynamicGuard, 0);
  try {
    for (unsigned z = 0; z < c.grid.z; ++z)
      for (unsigned y = 0; y < c.grid.y; ++y)
        for (unsigned x = 0; x < c.grid.x; ++x) {
          blockIdx = {x, y, z};
          fill_dynamic_shared();
          run_block(body, c.block);
          if (!dynamic_guard_intact())
            throw std::runtime_error("a write past the launch's dynamic shared memory (block " +
                                     std::to_string(x) + ")");
        }
  } catch (const std::exception& e) {
    last_error = cudaErrorLaunchFailure;
    last_message = e.what();
  }
}

// A warp collective: `kind` names it (each name a single string, compared by address) and
// `site` is where the kernel calls it.
template <class T>
T shuffle(unsigned mask, T v, int op, int arg, int width, const char* kind, std::source_location site) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  Fiber& f = self();
  const int lanes = std::min(32, int(block->fibers.size()) - 32 * f.warp_id);
  const unsigned existing = lanes == 32 ? ~0u : (1u << lanes) - 1u;
  f.kind = kind;
  f.site = site;
  if (!(mask >> f.lane_id & 1u))
    fault(where(f) + ": the calling lane " + std::to_string(f.lane_id) + " is not in the mask " + hex(mask));
  if (mask & ~existing)
    fault(where(f) + ": the mask " + hex(mask) + " names lanes that do not exist (the warp has " +
          std::to_string(lanes) + ")");
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
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? 3
           : attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? int(emu::shared_optin) : 0;
  return cudaSuccess;
}
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <class Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || size_t(value) > emu::shared_optin) {
    emu::last_error = cudaErrorInvalidValue;
    emu::last_message = "cudaFuncSetAttribute: " + std::to_string(value) + " bytes of dynamic shared memory, " +
                        "more than the device's " + std::to_string(emu::shared_optin);
    return cudaErrorInvalidValue;
  }
  emu::dynamic_smem_allowed[reinterpret_cast<const void*>(kernel)] = size_t(value);
  return cudaSuccess;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : emu::last_message.c_str();
}

namespace emu {
inline constexpr char kSyncthreads[] = "__syncthreads", kSyncthreadsCount[] = "__syncthreads_count",
                      kShfl[] = "__shfl_sync", kShflDown[] = "__shfl_down_sync", kShflUp[] = "__shfl_up_sync",
                      kShflXor[] = "__shfl_xor_sync", kSyncwarp[] = "__syncwarp", kBallot[] = "__ballot_sync";
inline void barrier(int vote, const char* kind, std::source_location site) {
  Fiber& f = self();
  f.value = uint64_t(vote);
  f.kind = kind;
  f.site = site;
  f.state = Fiber::barrier;
  yield_to_scheduler();
}
// Registers the __shared__ variables of a declaration (build.py adds the call after it): the
// first thread of a block to pass it fills them with 0xff bytes.
inline std::unordered_map<const void*, uint64_t> shared_poisoned;  // variable -> block_serial
template <class... T>
void shared_vars(T&... v) {
  auto poison = [](void* p, size_t bytes) {
    uint64_t& at = shared_poisoned[p];
    if (at != block_serial) std::memset(p, 0xff, bytes), at = block_serial;
  };
  (poison(static_cast<void*>(&v), sizeof v), ...);
}
// __launch_bounds__(max_threads, ...): build.py makes the kernel call it first.
inline void launch_bounds(long long max_threads, long long = 0, long long = 0) {
  const long long threads = 1ll * blockDim.x * blockDim.y * blockDim.z;
  if (threads > max_threads)
    fault("a block of " + std::to_string(threads) + " threads exceeds the kernel's __launch_bounds__(" +
          std::to_string(max_threads) + ")");
}
}  // namespace emu

inline void __syncthreads(std::source_location site = std::source_location::current()) {
  emu::barrier(0, emu::kSyncthreads, site);
}
inline int __syncthreads_count(int predicate, std::source_location site = std::source_location::current()) {
  emu::barrier(predicate != 0, emu::kSyncthreadsCount, site);
  return int(emu::self().result);
}
using emu_site = std::source_location;
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32, emu_site site = emu_site::current()) {
  return emu::shuffle(mask, v, 0, src, width, emu::kShfl, site);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32, emu_site site = emu_site::current()) {
  return emu::shuffle(mask, v, 1, int(d), width, emu::kShflDown, site);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32, emu_site site = emu_site::current()) {
  return emu::shuffle(mask, v, 2, int(d), width, emu::kShflUp, site);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32, emu_site site = emu_site::current()) {
  return emu::shuffle(mask, v, 3, m, width, emu::kShflXor, site);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, emu_site site = emu_site::current()) {
  emu::shuffle(mask, 0, 5, 0, 32, emu::kSyncwarp, site);
}
// Bit l of the result: lane l is in `mask` and its predicate is non-zero.
inline unsigned __ballot_sync(unsigned mask, int predicate, emu_site site = emu_site::current()) {
  return emu::shuffle(mask, unsigned(predicate != 0), 4, 0, 32, emu::kBallot, site);
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
