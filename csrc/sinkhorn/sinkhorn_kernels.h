// Entry points of the entropic-OT kernels (log-domain Sinkhorn and Sinkhorn-Newton-Sparse),
// callable without torch headers. On the CPU one call solves one problem (the op file runs a
// batch); on CUDA one call solves a whole batch.
//
// For cost C [n, m] (row-major, contiguous), marginals a [n], b [m] and eps > 0, the plan is
//   P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)
// and the solver returns the dual potentials f, g. Each Sinkhorn update is a log-sum-exp that
// uses the current potential as its shift: after a column update every P_ij <= b_j (and after a
// row update <= a_i), so the shifted sums neither overflow nor, once warm, underflow; a row or a
// column block whose sum leaves the safe range is redone exactly (max, then sum).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#include "../common/macros.h"

namespace fastloss {

// SNS's Hessian keeps the plan's entries P_ij >= rho. rho comes from two histograms of P (CPU
// and CUDA alike): binades (a positive value's exponent field, monotone in the value), then the
// leading kPlanSliceBits mantissa bits inside the binade where the budget is reached; rho is
// that slice's smallest value, so the kept entries are the budget plus the few others of the
// slice.
constexpr int kPlanSliceBits = 12;
constexpr int kPlanSlices = 1 << kPlanSliceBits;

template <class T>
struct PlanBins {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  static constexpr int kMantissa = sizeof(T) == 4 ? 23 : 52;
  static constexpr int kBuckets = sizeof(T) == 4 ? 256 : 2048;
  FL_HD static Bits bits(T v) {
    Bits b;
    memcpy(&b, &v, sizeof b);
    return b;
  }
  FL_HD static int64_t bucket(T v) { return int64_t(bits(v) >> kMantissa); }
  FL_HD static int64_t slice(T v) {
    return int64_t((bits(v) >> (kMantissa - kPlanSliceBits)) & Bits(kPlanSlices - 1));
  }
  FL_HD static T edge(int64_t bucket, int64_t slice) {
    const Bits b = (Bits(bucket) << kMantissa) | (Bits(slice) << (kMantissa - kPlanSliceBits));
    T v;
    memcpy(&v, &b, sizeof v);
    return v;
  }
};

// Runs body(begin, end) over sub-ranges of [0, count), each of at least `grain` items (when
// count allows), possibly on several threads. The op file passes at::parallel_for.
using ParallelFor =
    std::function<void(int64_t count, int64_t grain, const std::function<void(int64_t, int64_t)>& body)>;

struct OtProblem {
  const void* cost = nullptr;  // [n, m], contiguous, float or double (is_double)
  const void* a = nullptr;     // [n], non-negative, same dtype
  const void* b = nullptr;     // [m], same total mass as a
  bool is_double = false;
  int64_t n = 0, m = 0;
  double eps = 1.0, tol = 1e-6;
  int64_t max_iter = 1000;     // Sinkhorn iterations or Newton steps, warm-up included
  int64_t keep = 0;            // 0: plain Sinkhorn; else SNS, keeping this many entries per row
  int64_t warmup_iters = 20;   // SNS: Sinkhorn iterations before the first Newton step
  int64_t cg_iters = 50;       // SNS: conjugate-gradient iterations per Newton step, at most
};

struct OtResult {
  int64_t n_iter = 0;
  double value = 0.0;      // <a, f> + <b, g>
  double error = 0.0;      // ||P 1 - a||_1 (Sinkhorn); plus ||P^T 1 - b||_1 (SNS)
  double transport = 0.0;  // <P, C>
};

// Solves `q`; writes the potentials f [n] and g [m] (q's dtype).
OtResult sinkhorn_solve_cpu(const OtProblem& q, void* f, void* g, const ParallelFor& parallel);

// out[i, j] = scale * P_ij for rows [r0, r1) of one problem (q's cost, a, b; f, g its potentials).
void sinkhorn_plan_cpu(const OtProblem& q, const void* f, const void* g, double scale, void* out,
                       int64_t r0, int64_t r1);

// ---- CUDA (sinkhorn_cuda.cu, sinkhorn_newton_cuda.cuh): log-domain Sinkhorn and SNS on a batch of B problems

struct OtBatch {
  const void* cost = nullptr;  // [B, n, m], contiguous, float or double (is_double)
  const void* a = nullptr;     // [B, n], contiguous
  const void* b = nullptr;     // [B, m], contiguous
  bool is_double = false;
  int64_t B = 0, n = 0, m = 0;
  double eps = 1.0, tol = 1e-6;
  int64_t max_iter = 1000;
  // keep = 0: Sinkhorn; keep >= 1: Sinkhorn-Newton-Sparse (as OtProblem: warm-up iterations,
  // entries kept per row on average, conjugate-gradient iterations per Newton step)
  int64_t keep = 0, warmup_iters = 10, cg_iters = 500;
};

// Device outputs, in the cost's dtype except n_iter: value <a, f> + <b, g> [B], f [B, n],
// g [B, m], iterations [B], row-marginal error ||P 1 - a||_1 [B] and <P, C> [B] of the
// returned potentials: the same contract as the CPU solver's Sinkhorn.
struct OtBatchOut {
  void* value = nullptr;
  void* f = nullptr;
  void* g = nullptr;
  int64_t* n_iter = nullptr;
  void* error = nullptr;
  void* transport = nullptr;
};

// Device bytes of the workspace sinkhorn_solve_cuda needs for q.
size_t sinkhorn_cuda_workspace_bytes(const OtBatch& q);
// Solves the batch on `stream` (a cudaStream_t); host_active is B ints of host memory (the
// host reads the problems' done flags there every few iterations, synchronizing the stream).
// With q.keep >= 1 (SNS) the error is the rows' and columns' together once Newton steps ran,
// as on the CPU.
// Returns nullptr or the CUDA error.
const char* sinkhorn_solve_cuda(const OtBatch& q, const OtBatchOut& out, void* workspace,
                                int* host_active, void* stream);
// out[k, i, j] = scale[k] P_ij (scale: B doubles of device memory, or null for 1), [B, n, m].
const char* sinkhorn_plan_cuda(const OtBatch& q, const void* f, const void* g, const double* scale,
                               void* out, void* stream);

}  // namespace fastloss
