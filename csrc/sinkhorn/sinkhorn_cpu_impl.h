// The CPU entropic-OT solver (sinkhorn_kernels.h), instantiated once per instruction set
// (sinkhorn_cpu.cpp: float, sinkhorn_cpu_avx2.cpp: Vec8, sinkhorn_cpu_avx512.cpp: Vec16).
// float32 problems run on the ISA's float vectors (FL_ISA_VEC); float64 problems on its double
// vectors (FL_ISA_DVEC: Vec4d with AVX2 and AVX-512, one-lane doubles in the generic build).
//
// Costs per iteration, for an n x m problem: a Sinkhorn iteration is two passes over C with one
// exponential per entry (the row pass also yields the row-marginal error and <P, C> of the
// current potentials, so convergence is checked every iteration for free). A Newton step forms
// P once (one exponential per entry, kept in a buffer), selects its largest entries under one
// threshold, runs conjugate gradient on the sparse Hessian (O(kept + n + m) per product, the
// rows and the columns as gathers over the kept entries and their transpose, in runs of equal
// kept entries on all threads past 16k kept entries), and evaluates each line-search trial
// as u^T P v with u_i = exp(t df_i / eps), v_j = exp(t dg_j / eps): a pass of
// multiply-adds over the stored P, no exponential per entry.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "../common/storage.h"
#include "../common/vec_scalar.h"
#include "sinkhorn_kernels.h"

namespace fastloss {
namespace FL_ISA {

#ifndef FL_ISA_DVEC
#define FL_ISA_DVEC double
#endif

// The one-lane double "vector" of float64 problems in the generic build (only the sinkhorn
// files need it).
inline double vexp(double x) { return std::exp(x); }
inline double vmax(double a, double b) { return a > b ? a : b; }
inline double vfma(double a, double b, double c) { return a * b + c; }
inline double hsum(double a) { return a; }
inline double hmax(double a) { return a; }
template <>
struct VecTraits<double> {
  static constexpr int width = 1;
};
template <>
struct VecIo<double> {
  static double load(const double* p) { return *p; }
  static void store(double* p, double v) { *p = v; }
};

// Shifted sums inside this range are trusted; outside it the row or block is redone exactly.
template <class T>
struct SafeSum;
template <>
struct SafeSum<float> {
  static bool ok(double s) { return s > 1e-30 && s < 1e30; }
};
template <>
struct SafeSum<double> {
  static bool ok(double s) { return s > 1e-280 && s < 1e280; }
};

// e_j = exp(shift + h_j - x C_j) over one row of m entries (stored to out when not null);
// returns sum_j e_j and sum_j e_j C_j. Every pass that exponentiates a row of the plan uses it.
template <class V, class T>
inline void exp_row(const T* c, const T* h, T shift, T x, int64_t m, T* out, double& sum, double& cost) {
  constexpr int kW = VecTraits<V>::width;
  const T nx = -x;
  V acc(T(0)), tacc(T(0));
  int64_t j = 0;
  for (; j + kW <= m; j += kW) {
    const V cj = VecIo<V>::load(c + j);
    const V e = vexp(vfma(V(nx), cj, V(shift) + VecIo<V>::load(h + j)));
    if (out) VecIo<V>::store(out + j, e);
    acc += e;
    tacc = vfma(e, cj, tacc);
  }
  sum = hsum(acc), cost = hsum(tacc);
  for (; j < m; ++j) {
    const T e = vexp(vfma(nx, c[j], shift + h[j]));
    if (out) out[j] = e;
    sum += e, cost += double(e) * c[j];
  }
}

template <class V, class T>
class OtSolver {
  static constexpr int kW = VecTraits<V>::width;
  static constexpr int64_t kColBlock = 256;  // columns per task of a column pass (multiple of kW)
  static constexpr int64_t kRowsPerFlush = 128;  // rows summed in T before adding to the total

 public:
  OtSolver(const OtProblem& q, const ParallelFor& parallel)
      : q_(q), par_(parallel), c_(static_cast<const T*>(q.cost)), n_(q.n), m_(q.m),
        eps_(q.eps), x_(1.0 / q.eps), a_(n_), b_(m_), la_(n_), lb_(m_), f_(n_, 0.0), g_(m_, 0.0),
        fnext_(n_), rowsum_(n_), rowcost_(n_), srow_(n_), scol_(m_) {
    const T* a = static_cast<const T*>(q.a);
    const T* b = static_cast<const T*>(q.b);
    for (int64_t i = 0; i < n_; ++i) a_[i] = a[i], la_[i] = std::log(a_[i]);
    for (int64_t j = 0; j < m_; ++j) b_[j] = b[j], lb_[j] = std::log(b_[j]);
  }

  OtResult solve(T* f_out, T* g_out) {
    OtResult res;
    if (q_.keep <= 0) {
      sinkhorn(q_.max_iter, res);
    } else {
      const int64_t warm = std::max<int64_t>(1, std::min(q_.warmup_iters, q_.max_iter));
      if (!sinkhorn(warm, res)) newton(res);
    }
    for (int64_t i = 0; i < n_; ++i) f_out[i] = T(f_[i]), res.value += a_[i] * f_[i];
    for (int64_t j = 0; j < m_; ++j) g_out[j] = T(g_[j]), res.value += b_[j] * g_[j];
    return res;
  }

 private:
  // ---- Sinkhorn ------------------------------------------------------------------------------

  // Iterates from (f, g) until the row error is under tol (true) or res.n_iter reaches `limit`,
  // one iteration at least: the starting f = g = 0 pass any tol once C / eps is small enough
  // (the plan a b^T e^(-C / eps) has a's rows to 1e-6 at C / eps ~ 1e-6), and their value
  // <a, f> + <b, g> = 0 is then off by about <a b^T, C> (eps = 1e6: 0 for 0.52).
  // res.error / res.transport describe the potentials left in f_, g_.
  bool sinkhorn(int64_t limit, OtResult& res) {
    for (;;) {
      row_pass(res);
      if (res.error < q_.tol && res.n_iter > 0) return true;
      if (res.n_iter >= limit) return false;
      f_.swap(fnext_);
      col_pass();
      ++res.n_iter;
    }
  }

  int64_t row_grain() const { return std::max<int64_t>(1, 16384 / std::max<int64_t>(m_, 1)); }

  // fnext_ = the row update of f for the current g; res gets the row error and <P, C> of (f, g).
  void row_pass(OtResult& res) {
    for (int64_t j = 0; j < m_; ++j) scol_[j] = T(g_[j] * x_ + lb_[j]);
    par_(n_, row_grain(), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) row_update(i);
    });
    double err = 0.0, cost = 0.0;
    for (int64_t i = 0; i < n_; ++i) err += std::fabs(rowsum_[i] - a_[i]), cost += rowcost_[i];
    res.error = err;
    res.transport = cost;
  }

  // Row i: S = sum_j exp((f_i + g_j - C_ij) / eps + log b_j) = (P 1)_i / a_i.
  void row_update(int64_t i) {
    const T* c = c_ + i * m_;
    const T* hg = scol_.data();
    double s, tr;
    exp_row<V, T>(c, hg, T(f_[i] * x_), T(x_), m_, nullptr, s, tr);
    if (SafeSum<T>::ok(s)) {
      fnext_[i] = f_[i] - eps_ * std::log(s);
    } else {  // exact: max first, then the sum relative to it
      const T nx = T(-x_);
      V vm(-std::numeric_limits<T>::infinity());
      int64_t j = 0;
      for (; j + kW <= m_; j += kW)
        vm = vmax(vm, vfma(V(nx), VecIo<V>::load(c + j), VecIo<V>::load(hg + j)));
      T mx = hmax(vm);
      for (; j < m_; ++j) mx = std::max(mx, vfma(nx, c[j], hg[j]));
      double s2, tr2;
      exp_row<V, T>(c, hg, -mx, T(x_), m_, nullptr, s2, tr2);
      fnext_[i] = -eps_ * (double(mx) + std::log(s2));
      const double scale = std::exp(f_[i] * x_ + double(mx));
      s = scale * s2, tr = scale * tr2;
    }
    // rows of zero mass carry no plan (and their f is irrelevant but finite)
    rowsum_[i] = a_[i] > 0 ? a_[i] * s : 0.0;
    rowcost_[i] = a_[i] > 0 ? a_[i] * tr : 0.0;
  }

  // g = the column update for the current f.
  void col_pass() {
    for (int64_t i = 0; i < n_; ++i) srow_[i] = T(f_[i] * x_ + la_[i]);
    const int64_t blocks = (m_ + kColBlock - 1) / kColBlock;
    par_(blocks, 1, [&](int64_t k0, int64_t k1) {
      std::vector<T> acc(kColBlock), total(kColBlock);
      for (int64_t k = k0; k < k1; ++k) col_block(k * kColBlock, std::min(m_, (k + 1) * kColBlock), acc, total);
    });
  }

  // Columns [j0, j1): sum_i exp((f_i + g_j - C_ij) / eps + log a_i) = (P^T 1)_j / b_j, summed
  // row by row into per-column accumulators (flushed every kRowsPerFlush rows, for accuracy).
  void col_block(int64_t j0, int64_t j1, std::vector<T>& acc, std::vector<T>& total) {
    const int64_t w = j1 - j0;
    for (int64_t j = 0; j < w; ++j) scol_[j0 + j] = T(g_[j0 + j] * x_);
    std::fill(total.begin(), total.begin() + w, T(0));
    const T nx = T(-x_);
    // sums exp(srow_i + base_j - x C_ij [- shift_j]) over rows into total
    auto sweep = [&](const T* base, const T* shift) {
      std::fill(acc.begin(), acc.begin() + w, T(0));
      for (int64_t i = 0; i < n_; ++i) {
        const T fi = srow_[i];
        if (fi == -std::numeric_limits<T>::infinity()) continue;  // zero-mass row
        const T* c = c_ + i * m_ + j0;
        int64_t j = 0;
        for (; j + kW <= w; j += kW) {
          V z = vfma(V(nx), VecIo<V>::load(c + j), V(fi) + VecIo<V>::load(base + j));
          if (shift) z = z - VecIo<V>::load(shift + j);
          VecIo<V>::store(acc.data() + j, VecIo<V>::load(acc.data() + j) + vexp(z));
        }
        for (; j < w; ++j) acc[j] += vexp(vfma(nx, c[j], fi + base[j]) - (shift ? shift[j] : T(0)));
        if ((i + 1) % kRowsPerFlush == 0)
          for (int64_t k = 0; k < w; ++k) total[k] += acc[k], acc[k] = T(0);
      }
      for (int64_t k = 0; k < w; ++k) total[k] += acc[k];
    };
    sweep(scol_.data() + j0, nullptr);
    bool safe = true;
    for (int64_t j = 0; j < w; ++j) safe = safe && SafeSum<T>::ok(double(total[j]));
    if (safe) {
      for (int64_t j = 0; j < w; ++j) g_[j0 + j] -= eps_ * std::log(double(total[j]));
      return;
    }
    // exact: the column maxima of (f_i / eps + log a_i - C_ij / eps), then the sums under them
    std::vector<T> zero(w, T(0)), mx(w, -std::numeric_limits<T>::infinity());
    for (int64_t i = 0; i < n_; ++i) {
      const T fi = srow_[i];
      if (fi == -std::numeric_limits<T>::infinity()) continue;
      const T* c = c_ + i * m_ + j0;
      for (int64_t j = 0; j < w; ++j) mx[j] = std::max(mx[j], vfma(nx, c[j], fi));
    }
    sweep(zero.data(), mx.data());
    for (int64_t j = 0; j < w; ++j) g_[j0 + j] = -eps_ * (double(mx[j]) + std::log(double(total[j])));
  }

  // ---- Newton ----------------------------------------------------------------------------------

  void newton(OtResult& res) {
    // the Hessian keeps q.keep entries per row on average: one global threshold over P (as in
    // the paper), so that rows with broad plans keep more entries than rows with sharp ones
    int64_t budget = std::min(q_.keep, m_) * n_;
    const int64_t most = std::min(8 * budget, n_ * m_);
    p_.resize(size_t(n_ * m_));
    r_.resize(n_), s_.resize(m_), row_start_.resize(n_ + 1), col_start_.resize(m_ + 1);
    double window_start = INFINITY;  // the error 10 Newton steps ago
    for (int64_t steps = 0;; ++steps) {
      form_plan(res);
      if (res.error < q_.tol || res.n_iter >= q_.max_iter) return;
      // Ten Newton steps (each with its Sinkhorn iteration) that did not halve the error: the
      // kept entries are too few for the Hessian (one per row of a 6 x 9 problem at eps = 0.002:
      // the error fell like 1 / iterations, 2e-5 after 5000; 34-61 iterations with this, seeds 0-5), so keep
      // twice as many, up to 8 times the asked number. (Per step, a tenth off the error was too
      // strict: the benchmark's 64-point problem at eps = 0.002 has steps of 0.85-0.94 before
      // its fast phase, and denser Hessians there only doubled its time. At small eps a float32
      // plan's rounding, not the Hessian, limits the error: no denser Hessian helps there.)
      // Ten steps with the densest Hessian that ended no lower than they started: stalled (a
      // float32 plan at its rounding floor: 4 x 300-point clouds at eps = 0.05 took 1000
      // steps, 59 s, to stay at 2e-6 against tol 1e-6); stop, unconverged, rather than run
      // to max_iter. A problem still converging, however slowly, ends each window lower.
      if (steps % 10 == 0) {
        if (budget == most && res.error >= window_start) return;
        if (res.error > 0.5 * window_start) budget = std::min(2 * budget, most);
        window_start = res.error;
      }
      sparsify(budget);
      newton_step();
      OtResult step;  // then one Sinkhorn iteration
      row_pass(step);
      f_.swap(fnext_);
      col_pass();
      ++res.n_iter;
    }
  }

  // p_ = P, r_ = P 1, s_ = P^T 1, and the histogram of P's binary exponents; res gets the row +
  // column error and <P, C>.
  void form_plan(OtResult& res) {
    for (int64_t j = 0; j < m_; ++j) scol_[j] = T(g_[j] * x_ + lb_[j]);
    for (int64_t i = 0; i < n_; ++i) srow_[i] = T(f_[i] * x_ + la_[i]);
    std::fill(hist_.begin(), hist_.end(), 0);
    // fixed blocks of rows (at most 16, whatever the thread count), each summing the columns of
    // its own rows, added in block order: deterministic, and no thread reads rows of P another
    // wrote (a pass by column blocks did: 1.3-1.8x slower passes over P on this 2-vCPU VM in
    // some runs)
    const int64_t block = std::max(row_grain(), (n_ + 15) / 16), blocks = (n_ + block - 1) / block;
    std::vector<double> cols(size_t(blocks * m_), 0.0);
    std::mutex merge;
    par_(blocks, 1, [&](int64_t k0, int64_t k1) {
      std::vector<int64_t> hist(hist_.size(), 0);
      for (int64_t k = k0; k < k1; ++k) {
        double* c = cols.data() + k * m_;
        for (int64_t i = k * block; i < std::min(n_, (k + 1) * block); ++i) {
          plan_row(i, hist);
          const T* p = p_.data() + i * m_;
          for (int64_t j = 0; j < m_; ++j) c[j] += double(p[j]);
        }
      }
      std::lock_guard<std::mutex> lock(merge);
      for (size_t q = 0; q < hist.size(); ++q) hist_[q] += hist[q];
    });
    std::fill(s_.begin(), s_.end(), 0.0);
    for (int64_t k = 0; k < blocks; ++k)
      for (int64_t j = 0; j < m_; ++j) s_[j] += cols[size_t(k * m_ + j)];
    double err = 0.0, cost = 0.0;
    for (int64_t i = 0; i < n_; ++i) err += std::fabs(r_[i] - a_[i]), cost += rowcost_[i];
    for (int64_t j = 0; j < m_; ++j) err += std::fabs(s_[j] - b_[j]);
    res.error = err;
    res.transport = cost;
  }

  void plan_row(int64_t i, std::vector<int64_t>& hist) {
    T* p = p_.data() + i * m_;
    double s, tr;
    exp_row<V, T>(c_ + i * m_, scol_.data(), srow_[i], T(x_), m_, p, s, tr);
    r_[i] = s;
    rowcost_[i] = tr;
    for (int64_t j = 0; j < m_; ++j)
      if (p[j] > T(0)) ++hist[size_t(PlanBins<T>::bucket(p[j]))];
  }

  // The kept entries, P_ij >= rho (rho: PlanBins, sinkhorn_kernels.h), as CSR (row_start_,
  // col_, val_) and its transpose (CSC: col_start_, row_, valt_). (Selecting rho exactly needed
  // a serial pass collecting the binade's entries: 6% of SNS's time on a 576-point problem.)
  void sparsify(int64_t budget) {
    int64_t positive = 0;
    for (int64_t k = int64_t(hist_.size()) - 1; k >= 0; --k) positive += hist_[k];
    T rho = std::numeric_limits<T>::min();
    if (positive > budget) {
      int64_t above = 0, bucket = int64_t(hist_.size()) - 1;
      for (; bucket > 0 && above + hist_[bucket] < budget; --bucket) above += hist_[bucket];
      std::vector<int64_t> slices(kPlanSlices, 0);
      std::mutex merge;
      par_(n_, row_grain(), [&](int64_t r0, int64_t r1) {
        std::vector<int64_t> local(slices.size(), 0);
        for (const T* p = p_.data() + r0 * m_, *end = p_.data() + r1 * m_; p < end; ++p)
          if (*p > T(0) && PlanBins<T>::bucket(*p) == bucket) ++local[size_t(PlanBins<T>::slice(*p))];
        std::lock_guard<std::mutex> lock(merge);
        for (size_t k = 0; k < slices.size(); ++k) slices[k] += local[k];
      });
      int64_t slice = int64_t(slices.size()) - 1;
      for (; slice > 0 && above + slices[size_t(slice)] < budget; --slice) above += slices[size_t(slice)];
      rho = std::max(PlanBins<T>::edge(bucket, slice), std::numeric_limits<T>::denorm_min());  // never 0
    }
    par_(n_, row_grain(), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const T* p = p_.data() + i * m_;
        int64_t cnt = 0;
        for (int64_t j = 0; j < m_; ++j) cnt += p[j] >= rho;
        row_start_[i + 1] = cnt;
      }
    });
    row_start_[0] = 0;
    for (int64_t i = 0; i < n_; ++i) row_start_[i + 1] += row_start_[i];
    const int64_t nnz = row_start_[n_];
    col_.resize(size_t(nnz)), val_.resize(size_t(nnz));
    par_(n_, row_grain(), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const T* p = p_.data() + i * m_;
        int64_t e = row_start_[i];
        for (int64_t j = 0; j < m_; ++j)
          if (p[j] >= rho) col_[size_t(e)] = int32_t(j), val_[size_t(e)] = p[j], ++e;
      }
    });
    // the transpose, by a counting sort of the columns (rows stay in order within a column)
    std::fill(col_start_.begin(), col_start_.end(), 0);
    for (int64_t e = 0; e < nnz; ++e) ++col_start_[size_t(col_[size_t(e)]) + 1];
    for (int64_t j = 0; j < m_; ++j) col_start_[j + 1] += col_start_[j];
    row_.resize(size_t(nnz)), valt_.resize(size_t(nnz));
    std::vector<int64_t> next(col_start_.begin(), col_start_.end() - 1);
    for (int64_t i = 0; i < n_; ++i)
      for (int64_t e = row_start_[i]; e < row_start_[i + 1]; ++e) {
        const int64_t at = next[size_t(col_[size_t(e)])]++;
        row_[size_t(at)] = int32_t(i), valt_[size_t(at)] = val_[size_t(e)];
      }
    split_lines();
  }

  // sum_e val[e] v[idx[e]] over e in [e0, e1): four partial sums (the gathers are independent)
  static double sparse_dot(const T* val, const int32_t* idx, const double* v, int64_t e0, int64_t e1) {
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    int64_t e = e0;
    for (; e + 4 <= e1; e += 4) {
      s0 += double(val[e]) * v[idx[e]];
      s1 += double(val[e + 1]) * v[idx[e + 1]];
      s2 += double(val[e + 2]) * v[idx[e + 2]];
      s3 += double(val[e + 3]) * v[idx[e + 3]];
    }
    for (; e < e1; ++e) s0 += double(val[e]) * v[idx[e]];
    return (s0 + s1) + (s2 + s3);
  }

  // H [vf; vg] with H = (1/eps) [[diag(r + reg), Ps], [Ps^T, diag(s + reg)]]: the CSR rows
  // give Ps vg, the CSC columns Ps^T vf, both as gathers (a scatter into hg serialised on its
  // stores).
  void hvp(const std::vector<double>& vf, const std::vector<double>& vg, double reg,
           std::vector<double>& hf, std::vector<double>& hg) const {
    auto lines = [&](int64_t k0, int64_t k1) {  // rows k < n, then columns k - n
      for (int64_t k = k0; k < k1; ++k) {
        if (k < n_) {
          hf[k] = x_ * ((r_[k] + reg) * vf[k] + sparse_dot(val_.data(), col_.data(), vg.data(), row_start_[k], row_start_[k + 1]));
        } else {
          const int64_t j = k - n_;
          hg[j] = x_ * ((s_[j] + reg) * vg[j] + sparse_dot(valt_.data(), row_.data(), vf.data(), col_start_[j], col_start_[j + 1]));
        }
      }
    };
    if (units_.size() <= 2) {
      lines(0, n_ + m_);
      return;
    }
    par_(int64_t(units_.size()) - 1, 1, [&](int64_t u0, int64_t u1) { lines(units_[u0], units_[u1]); });
  }

  // The Hessian product's work split: lines (rows, then columns) cut into runs of about equal
  // kept entries, units_[u] .. units_[u + 1]; one run below 16k kept entries (a CG iteration is a
  // few microseconds per 10^4 entries: threads only pay off above a few times that).
  void split_lines() {
    const int64_t nnz = row_start_[n_], runs = nnz < 16384 ? 1 : 8;
    const int64_t target = std::max<int64_t>(1, 2 * nnz / runs);
    units_.assign(1, 0);
    int64_t acc = 0;
    for (int64_t k = 0; k < n_ + m_; ++k) {
      acc += k < n_ ? row_start_[k + 1] - row_start_[k] : col_start_[k - n_ + 1] - col_start_[k - n_];
      if (acc >= target && k + 1 < n_ + m_) units_.push_back(k + 1), acc = 0;
    }
    units_.push_back(n_ + m_);
  }

  // The Newton direction by conjugate gradient, then a backtracking line search on the dual.
  void newton_step() {
    std::vector<double> gf(n_), gg(m_), xf(n_, 0.0), xg(m_, 0.0), rf(n_), rg(m_), pf(n_), pg(m_),
        hf(n_), hg(m_);
    double rmax = 0.0, base = 0.0, gnorm = 0.0;
    for (int64_t i = 0; i < n_; ++i) {
      gf[i] = a_[i] - r_[i], rmax = std::max(rmax, r_[i]);
      base += a_[i] * f_[i] - eps_ * r_[i];
    }
    for (int64_t j = 0; j < m_; ++j) gg[j] = b_[j] - s_[j], base += b_[j] * g_[j];
    const double reg = 1e-10 + 1e-6 * rmax;  // (1, -1) is a null direction of the Hessian
    // Jacobi preconditioner: the Hessian's diagonal eps^-1 (r + reg), eps^-1 (s + reg); the
    // marginals span orders of magnitude on density problems, and plain CG stalls there
    std::vector<double> df(n_), dg(m_), zf(n_), zg(m_);
    for (int64_t i = 0; i < n_; ++i) df[i] = eps_ / (r_[i] + reg);
    for (int64_t j = 0; j < m_; ++j) dg[j] = eps_ / (s_[j] + reg);
    auto dot = [](const std::vector<double>& u, const std::vector<double>& v) {
      double s = 0.0;
      for (size_t k = 0; k < u.size(); ++k) s += u[k] * v[k];
      return s;
    };
    rf = gf, rg = gg;
    for (int64_t i = 0; i < n_; ++i) pf[i] = zf[i] = df[i] * rf[i];
    for (int64_t j = 0; j < m_; ++j) pg[j] = zg[j] = dg[j] * rg[j];
    double rz = dot(rf, zf) + dot(rg, zg);
    gnorm = dot(rf, rf) + dot(rg, rg);
    // inexact Newton: solve to a relative residual eta = min(0.1, sqrt(||grad||)), loose far
    // from the solution and tightening as the marginals converge (superlinear convergence)
    const double eta = std::min(0.1, std::sqrt(std::sqrt(gnorm)));
    for (int64_t it = 0; it < q_.cg_iters; ++it) {
      hvp(pf, pg, reg, hf, hg);
      const double php = dot(pf, hf) + dot(pg, hg);
      if (!(php > 0)) break;
      const double alpha = rz / php;
      for (int64_t i = 0; i < n_; ++i) xf[i] += alpha * pf[i], rf[i] -= alpha * hf[i];
      for (int64_t j = 0; j < m_; ++j) xg[j] += alpha * pg[j], rg[j] -= alpha * hg[j];
      if (dot(rf, rf) + dot(rg, rg) <= eta * eta * gnorm + 1e-300) break;
      for (int64_t i = 0; i < n_; ++i) zf[i] = df[i] * rf[i];
      for (int64_t j = 0; j < m_; ++j) zg[j] = dg[j] * rg[j];
      const double rz_new = dot(rf, zf) + dot(rg, zg);
      const double beta = rz_new / rz;
      for (int64_t i = 0; i < n_; ++i) pf[i] = zf[i] + beta * pf[i];
      for (int64_t j = 0; j < m_; ++j) pg[j] = zg[j] + beta * pg[j];
      rz = rz_new;
    }
    const double slope = dot(gf, xf) + dot(gg, xg);
    double t = 1.0;
    for (int trial = 0; trial < 30; ++trial, t *= 0.5) {
      const double cand = dual_along(xf, xg, t);
      // Armijo, and a strict increase: a step too small to change the dual in floating point
      // counts as a failure (the Sinkhorn iteration after it still makes progress)
      if (cand > base && cand >= base + 1e-4 * t * slope) {
        for (int64_t i = 0; i < n_; ++i) f_[i] += t * xf[i];
        for (int64_t j = 0; j < m_; ++j) g_[j] += t * xg[j];
        return;
      }
    }
  }

  // The dual <a, f + t df> + <b, g + t dg> - eps sum P(t), with P(t)_ij = P_ij u_i v_j,
  // u_i = exp(t df_i / eps), v_j = exp(t dg_j / eps), each shifted by its maximum.
  double dual_along(const std::vector<double>& xf, const std::vector<double>& xg, double t) {
    double lin = 0.0, mu = -INFINITY, mv = -INFINITY;
    for (int64_t i = 0; i < n_; ++i) lin += a_[i] * (f_[i] + t * xf[i]), mu = std::max(mu, t * x_ * xf[i]);
    for (int64_t j = 0; j < m_; ++j) lin += b_[j] * (g_[j] + t * xg[j]), mv = std::max(mv, t * x_ * xg[j]);
    for (int64_t i = 0; i < n_; ++i) srow_[i] = T(std::exp(t * x_ * xf[i] - mu));
    for (int64_t j = 0; j < m_; ++j) scol_[j] = T(std::exp(t * x_ * xg[j] - mv));
    par_(n_, row_grain(), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const T* p = p_.data() + i * m_;
        V acc(T(0));
        int64_t j = 0;
        for (; j + kW <= m_; j += kW) acc = vfma(VecIo<V>::load(p + j), VecIo<V>::load(scol_.data() + j), acc);
        double s = hsum(acc);
        for (; j < m_; ++j) s += double(p[j]) * scol_[j];
        rowsum_[i] = s * srow_[i];
      }
    });
    double total = 0.0;
    for (int64_t i = 0; i < n_; ++i) total += rowsum_[i];
    return lin - eps_ * total * std::exp(mu + mv);
  }

  const OtProblem& q_;
  const ParallelFor& par_;
  const T* c_;
  int64_t n_, m_;
  double eps_, x_;
  std::vector<double> a_, b_, la_, lb_, f_, g_, fnext_, rowsum_, rowcost_;
  std::vector<T> srow_, scol_;  // per-pass row / column terms in the compute type
  // Newton: the plan, its row and column sums, the histogram of its exponents, and the kept
  // entries (CSR: row_start_, col_, val_; CSC: col_start_, row_, valt_)
  std::vector<T> p_, val_, valt_;
  std::vector<double> r_, s_;
  std::vector<int64_t> hist_ = std::vector<int64_t>(PlanBins<T>::kBuckets, 0), row_start_, col_start_;
  std::vector<int32_t> col_, row_;
  std::vector<int64_t> units_;  // split_lines
};

template <class V, class T>
void plan_rows(const OtProblem& q, const T* f, const T* g, double scale, T* out, int64_t r0, int64_t r1) {
  constexpr int kW = VecTraits<V>::width;
  const T* c = static_cast<const T*>(q.cost);
  const T* a = static_cast<const T*>(q.a);
  const T* b = static_cast<const T*>(q.b);
  const double x = 1.0 / q.eps;
  std::vector<T> hg(q.m);
  for (int64_t j = 0; j < q.m; ++j) hg[j] = T(double(g[j]) * x + std::log(double(b[j])));
  const T nx = T(-x), sc = T(scale);
  for (int64_t i = r0; i < r1; ++i) {
    const T fi = T(double(f[i]) * x + std::log(double(a[i])));
    const T* ci = c + i * q.m;
    T* o = out + i * q.m;
    int64_t j = 0;
    for (; j + kW <= q.m; j += kW)
      VecIo<V>::store(o + j, V(sc) * vexp(vfma(V(nx), VecIo<V>::load(ci + j), V(fi) + VecIo<V>::load(hg.data() + j))));
    for (; j < q.m; ++j) o[j] = sc * vexp(vfma(nx, ci[j], fi + hg[j]));
  }
}

#if defined(FL_ISA_VEC)
OtResult sinkhorn_solve(const OtProblem& q, void* f, void* g, const ParallelFor& parallel) {
  if (q.is_double)
    return OtSolver<FL_ISA_DVEC, double>(q, parallel).solve(static_cast<double*>(f), static_cast<double*>(g));
  return OtSolver<FL_ISA_VEC, float>(q, parallel).solve(static_cast<float*>(f), static_cast<float*>(g));
}

void sinkhorn_plan(const OtProblem& q, const void* f, const void* g, double scale, void* out, int64_t r0,
                   int64_t r1) {
  if (q.is_double)
    plan_rows<FL_ISA_DVEC, double>(q, static_cast<const double*>(f), static_cast<const double*>(g), scale,
                                   static_cast<double*>(out), r0, r1);
  else
    plan_rows<FL_ISA_VEC, float>(q, static_cast<const float*>(f), static_cast<const float*>(g), scale,
                                 static_cast<float*>(out), r0, r1);
}
#endif

}  // namespace FL_ISA
}  // namespace fastloss
