// The Newton part of Sinkhorn-Newton-Sparse on CUDA, for a batch of problems (included by
// sinkhorn_cuda.cu inside its anonymous namespace: it reuses Solve<T>, the Sinkhorn passes and
// the workspace carver). The same algorithm as the CPU solver (sinkhorn_cpu_impl.h), step for
// step, each step one launch (or a few) over the whole batch, skipping the problems done:
//   plan        a block of warps per (row tile, problem), a warp per row: P_ij kept in the
//               workspace, row sums and <P, C> in float64, the binade histogram of P in shared
//               memory flushed once per block (integer atomics: exact, order-free);
//   column sums chunks of rows per thread and column, merged in chunk order (deterministic);
//   check       a block per problem: error = ||P 1 - a||_1 + ||P^T 1 - b||_1; stop, or find the
//               threshold's binade;
//   slices      the leading mantissa bits of the entries in that binade, as the plan's
//               histogram; threshold: rho = the slice's lower edge (the CPU's rule);
//   CSR / CSC   row counts by warp-wide votes, column counts per (row chunk, column), an
//               exclusive scan per problem, then the entries in order (rows: a warp per row
//               compacting by votes; columns: each chunk's rows walked from the chunk's offset
//               in its column): deterministic;
//   CG          per iteration a warp per row or column for the Hessian product (gathers over
//               CSR / CSC) and a block per problem for the vector updates and their dot
//               products; the host reads the problems' CG flags every kCgCheckEvery iterations;
//   line search a block per problem prepares u_i = e^(t x df_i - mu), v_j = e^(t x dg_j - mv),
//               a warp per row sums u_i P_ij v_j, a block per problem decides (Armijo and a
//               strict increase) and applies the step or halves t; the host reads the flags
//               after each trial;
//   then one Sinkhorn iteration with the passes of sinkhorn_cuda.cu.
// The plan and both index structures take n m entries per problem (the threshold may keep
// every entry, e.g. a constant plan): (2 sizeof(T) + 8 + sizeof(T)) n m bytes of workspace.

constexpr int kCgCheckEvery = 8;
constexpr int kLineSearchTrials = 30;

// Per-problem scalars of a Newton step, float64.
enum Scalar { kReg, kRz, kGnorm, kEta2, kBase, kSlope, kStep, kMu, kMv, kLin, kScalars };

template <class T>
struct Newton {
  Solve<T> s;
  int64_t budget, most, cap, cg_iters, col_chunks, col_chunk_rows;  // budget: the asked entries
  T* p;                          // [B, n, m] the plan
  double* r;                     // [B, n] P 1
  double* sc;                    // [B, m] P^T 1
  double* row_cost;              // [B, n] sum_j P_ij C_ij
  double* col_part;              // [col_chunks, B, m]
  int64_t* col_count;            // [col_chunks, B, m] kept entries, then their offsets
  unsigned long long* hist;      // [B, kBuckets]
  unsigned long long* slices;    // [B, kPlanSlices]
  int64_t* bucket;               // [B] the threshold's binade (-1: keep every positive entry)
  int64_t* above;                // [B] entries in the binades above it
  T* rho;                        // [B]
  int64_t* row_start;            // [B, n + 1]
  int64_t* col_start;            // [B, m + 1]
  int32_t* csr_col;              // [B, cap]
  T* csr_val;                    // [B, cap]
  int32_t* csc_row;              // [B, cap]
  T* csc_val;                    // [B, cap]
  double *xv, *rv, *pv, *hv, *dv, *gv;  // [B, n + m]: f part then g part
  double* u;                     // [B, n + m] the line search's u then v
  double* ls_row;                // [B, n]
  double* scal;                  // [B, kScalars]
  int* cg_live;                  // [B]
  int* ls_state;                 // [B] 0: searching, 1: accepted, 2: gave up
  int64_t* kept;                 // [B] the Hessian's entry budget now (budget, doubled when stalled)
  double* window;                // [B] the error ten Newton steps ago
  int64_t* steps;                // [B] Newton steps so far
  int* trials;                   // [B]
};

// A warp per row (k, i), blocks over (problems, row tiles): P_ij = e^(x f_i + log a_i + h_j -
// x C_ij), its row sum and <P, C>; the binades of the positive entries counted per block.
template <class T>
__global__ void __launch_bounds__(kThreads) newton_plan_kernel(Newton<T> nw) {
  __shared__ unsigned counts[PlanBins<T>::kBuckets];
  const Solve<T>& s = nw.s;
  const int64_t k = blockIdx.x;
  if (!s.active[k]) return;  // the whole block
  for (int q = threadIdx.x; q < PlanBins<T>::kBuckets; q += kThreads) counts[q] = 0;
  __syncthreads();
  const int lane = threadIdx.x % 32;
  for (int64_t i = int64_t(blockIdx.y) * kWarps + threadIdx.x / 32; i < s.n; i += int64_t(gridDim.y) * kWarps) {
    const int64_t r = k * s.n + i;
    const T base = s.x * s.f[r] + log_t(s.a[r]);
    const T* c = s.cost + r * s.m;
    const T* h = s.h_col + k * s.m;
    T* p = nw.p + r * s.m;
    double sum = 0.0, cost = 0.0;
    for (int64_t j = lane; j < s.m; j += 32) {
      const T e = exp_t(base + h[j] - s.x * c[j]);
      p[j] = e;
      sum += double(e);
      cost += double(e) * double(c[j]);
      if (e > T(0)) atomicAdd(&counts[PlanBins<T>::bucket(e)], 1u);
    }
    sum = warp_sum(sum);
    cost = warp_sum(cost);
    if (lane == 0) nw.r[r] = sum, nw.row_cost[r] = cost;
  }
  __syncthreads();
  for (int q = threadIdx.x; q < PlanBins<T>::kBuckets; q += kThreads)
    if (counts[q]) atomicAdd(&nw.hist[k * PlanBins<T>::kBuckets + q], (unsigned long long)counts[q]);
}

// In the grids (column tiles, row chunks, problems): this thread's column j and its block's
// rows [i0, i1); false past the last column.
template <class T>
__device__ __forceinline__ bool column_chunk(const Newton<T>& nw, int64_t& j, int64_t& i0, int64_t& i1) {
  j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  i0 = int64_t(blockIdx.y) * nw.col_chunk_rows;
  i1 = i0 + nw.col_chunk_rows < nw.s.n ? i0 + nw.col_chunk_rows : nw.s.n;
  return j < nw.s.m;
}

// grid (column tiles, row chunks, problems): the chunk's column sums of P.
template <class T>
__global__ void __launch_bounds__(kThreads) newton_colsum_kernel(Newton<T> nw) {
  const Solve<T>& s = nw.s;
  int64_t j, i0, i1;
  if (!column_chunk(nw, j, i0, i1)) return;
  for (int64_t k = blockIdx.z; k < s.B; k += gridDim.z) {
    if (!s.active[k]) continue;
    const T* p = nw.p + k * s.n * s.m + j;
    double acc = 0.0;
    for (int64_t i = i0; i < i1; ++i) acc += double(p[i * s.m]);
    nw.col_part[(int64_t(blockIdx.y) * s.B + k) * s.m + j] = acc;
  }
}

// A block per problem: the column sums (chunks in order), the error and <P, C>; stop (the
// iterations are spent or the error is under tol), or find the threshold's binade.
template <class T>
__global__ void __launch_bounds__(kThreads) newton_check_kernel(Newton<T> nw) {
  __shared__ double partial[kWarps];
  const Solve<T>& s = nw.s;
  const int64_t k = blockIdx.x;
  if (!s.active[k]) return;
  double err = 0.0, tr = 0.0;
  for (int64_t i = threadIdx.x; i < s.n; i += kThreads) {
    err += fabs(nw.r[k * s.n + i] - double(s.a[k * s.n + i]));
    tr += nw.row_cost[k * s.n + i];
  }
  for (int64_t j = threadIdx.x; j < s.m; j += kThreads) {
    double acc = 0.0;
    for (int64_t q = 0; q < nw.col_chunks; ++q) acc += nw.col_part[(q * s.B + k) * s.m + j];
    nw.sc[k * s.m + j] = acc;
    err += fabs(acc - double(s.b[k * s.m + j]));
  }
  err = block_sum(err, partial);
  tr = block_sum(tr, partial);
  if (threadIdx.x != 0) return;
  s.error[k] = T(err);
  s.transport[k] = T(tr);
  if (err < s.tol || s.n_iter[k] >= s.max_iter) {
    s.active[k] = 0;
    return;
  }
  // Ten Newton steps that did not halve the error: twice the kept entries, up to 8x the asked
  // number; ten with the most that ended no lower than they started: stalled, stop (the CPU's
  // rules and reasons: sinkhorn_cpu_impl.h, newton())
  if (nw.steps[k] % 10 == 0) {
    if (nw.kept[k] == nw.most && err >= nw.window[k]) {
      s.active[k] = 0;
      return;
    }
    if (err > 0.5 * nw.window[k]) nw.kept[k] = 2 * nw.kept[k] < nw.most ? 2 * nw.kept[k] : nw.most;
    nw.window[k] = err;
  }
  ++nw.steps[k];
  const unsigned long long budget = (unsigned long long)nw.kept[k];
  const unsigned long long* hist = nw.hist + k * PlanBins<T>::kBuckets;
  unsigned long long positive = 0;
  for (int q = 0; q < PlanBins<T>::kBuckets; ++q) positive += hist[q];
  int64_t bucket = -1;
  unsigned long long above = 0;
  if (positive > budget) {
    bucket = PlanBins<T>::kBuckets - 1;
    for (; bucket > 0 && above + hist[bucket] < budget; --bucket) above += hist[bucket];
  }
  nw.bucket[k] = bucket;
  nw.above[k] = int64_t(above);
}

// As the plan kernel: the leading mantissa bits of the entries in the threshold's binade.
template <class T>
__global__ void __launch_bounds__(kThreads) newton_slices_kernel(Newton<T> nw) {
  __shared__ unsigned counts[kPlanSlices];
  const Solve<T>& s = nw.s;
  const int64_t k = blockIdx.x;
  if (!s.active[k] || nw.bucket[k] < 0) return;
  const int64_t bucket = nw.bucket[k];
  for (int q = threadIdx.x; q < kPlanSlices; q += kThreads) counts[q] = 0;
  __syncthreads();
  const int lane = threadIdx.x % 32;
  for (int64_t i = int64_t(blockIdx.y) * kWarps + threadIdx.x / 32; i < s.n; i += int64_t(gridDim.y) * kWarps) {
    const T* p = nw.p + (k * s.n + i) * s.m;
    for (int64_t j = lane; j < s.m; j += 32) {
      const T e = p[j];
      if (e > T(0) && PlanBins<T>::bucket(e) == bucket) atomicAdd(&counts[PlanBins<T>::slice(e)], 1u);
    }
  }
  __syncthreads();
  for (int q = threadIdx.x; q < kPlanSlices; q += kThreads)
    if (counts[q]) atomicAdd(&nw.slices[k * kPlanSlices + q], (unsigned long long)counts[q]);
}

// A thread per problem (grid-stride: blocks_for caps the grid at 2^20 blocks): rho = the lower
// edge of the slice where the budget is reached.
template <class T>
__global__ void newton_threshold_kernel(Newton<T> nw) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < nw.s.B;
       k += int64_t(gridDim.x) * blockDim.x) {
    if (!nw.s.active[k]) continue;
    if (nw.bucket[k] < 0) {
      nw.rho[k] = std::numeric_limits<T>::min();
      continue;
    }
    const unsigned long long* sl = nw.slices + k * kPlanSlices;
    unsigned long long above = (unsigned long long)nw.above[k];
    int64_t q = kPlanSlices - 1;
    for (; q > 0 && above + sl[q] < (unsigned long long)nw.kept[k]; --q) above += sl[q];
    const T e = PlanBins<T>::edge(nw.bucket[k], q);
    nw.rho[k] = e > std::numeric_limits<T>::denorm_min() ? e : std::numeric_limits<T>::denorm_min();
  }
}

// The exclusive scan of len counts at v[1..len] (v[0] = 0), by one block: each thread sums a
// contiguous segment, the segment totals are scanned by thread 0, then each segment is written.
__device__ void block_exclusive_scan(int64_t* v, int64_t len, int64_t* totals) {
  const int64_t seg = (len + kThreads - 1) / kThreads;
  const int64_t lo = threadIdx.x * seg, hi = lo + seg < len ? lo + seg : len;
  int64_t sum = 0;
  for (int64_t q = lo; q < hi; ++q) sum += v[q + 1];
  totals[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t run = 0;
    for (int t = 0; t < kThreads; ++t) {
      const int64_t x = totals[t];
      totals[t] = run;
      run += x;
    }
  }
  __syncthreads();
  int64_t run = totals[threadIdx.x];
  for (int64_t q = lo; q < hi; ++q) {
    run += v[q + 1];
    v[q + 1] = run;
  }
  if (threadIdx.x == 0) v[0] = 0;
  __syncthreads();
}

// A block per problem: row starts; column starts, and each (row chunk, column)'s offset inside
// its column (the chunks' counts scanned in chunk order).
template <class T>
__global__ void __launch_bounds__(kThreads) newton_scan_kernel(Newton<T> nw) {
  __shared__ int64_t totals[kThreads];
  const Solve<T>& s = nw.s;
  const int64_t k = blockIdx.x;
  if (!s.active[k]) return;
  block_exclusive_scan(nw.row_start + k * (s.n + 1), s.n, totals);
  for (int64_t j = threadIdx.x; j < s.m; j += kThreads) {
    int64_t run = 0;
    for (int64_t q = 0; q < nw.col_chunks; ++q) {
      int64_t& c = nw.col_count[(q * s.B + k) * s.m + j];
      const int64_t here = c;
      c = run;
      run += here;
    }
    nw.col_start[k * (s.m + 1) + j + 1] = run;
  }
  __syncthreads();
  block_exclusive_scan(nw.col_start + k * (s.m + 1), s.m, totals);
}

// The kept entries P_ij >= rho as CSR: a warp per row (k, i), the lanes' votes giving each kept
// entry its slot, in column order. kFill = false only counts them (written at i + 1 for the
// scan); kFill = true writes them from the scanned row starts.
template <class T, bool kFill>
__global__ void __launch_bounds__(kThreads) newton_rows_kernel(Newton<T> nw) {
  const Solve<T>& s = nw.s;
  const int lane = threadIdx.x % 32;
  const int64_t rows = s.B * s.n;
  for (int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; r < rows; r += int64_t(gridDim.x) * kWarps) {
    const int64_t k = r / s.n, i = r % s.n;
    if (!s.active[k]) continue;
    const T* p = nw.p + r * s.m;
    const T rho = nw.rho[k];
    int64_t at = kFill ? k * nw.cap + nw.row_start[k * (s.n + 1) + i] : 0;
    for (int64_t j0 = 0; j0 < s.m; j0 += 32) {
      const int64_t j = j0 + lane;
      const bool keep = j < s.m && p[j] >= rho;
      const unsigned votes = __ballot_sync(0xffffffffu, keep);
      if (kFill && keep) {
        const int64_t e = at + __popc(votes & ((1u << lane) - 1u));
        nw.csr_col[e] = int32_t(j);
        nw.csr_val[e] = p[j];
      }
      at += __popc(votes);
    }
    if (!kFill && lane == 0) nw.row_start[k * (s.n + 1) + i + 1] = at;
  }
}

// The same as CSC, grid (column tiles, row chunks, problems) as the column sums: each chunk's
// kept entries of a column in row order. kFill = false counts them per (chunk, column);
// kFill = true writes them from the chunk's offset in its column (newton_scan_kernel).
template <class T, bool kFill>
__global__ void __launch_bounds__(kThreads) newton_cols_kernel(Newton<T> nw) {
  const Solve<T>& s = nw.s;
  int64_t j, i0, i1;
  if (!column_chunk(nw, j, i0, i1)) return;
  for (int64_t k = blockIdx.z; k < s.B; k += gridDim.z) {
    if (!s.active[k]) continue;
    const T* p = nw.p + k * s.n * s.m + j;
    const T rho = nw.rho[k];
    int64_t& chunk = nw.col_count[(int64_t(blockIdx.y) * s.B + k) * s.m + j];
    int64_t at = kFill ? k * nw.cap + nw.col_start[k * (s.m + 1) + j] + chunk : 0;
    for (int64_t i = i0; i < i1; ++i) {
      const T v = p[i * s.m];
      if (v < rho) continue;
      if (kFill) nw.csc_row[at] = int32_t(i), nw.csc_val[at] = v;
      ++at;
    }
    if (!kFill) chunk = at;
  }
}

// The maximum of v over the block, every thread's copy (`shared`: kWarps doubles).
__device__ __forceinline__ double block_max_d(double v, double* shared) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  double top = -INFINITY;
  for (int w = 0; w < kWarps; ++w) top = fmax(top, shared[w]);
  __syncthreads();
  return top;
}

// A block per problem: the gradient (a - P 1, b - P^T 1), the regularisation, the Jacobi
// preconditioner, CG's start (x = 0, r = grad, p = D r), the dual at the current potentials.
template <class T>
__global__ void __launch_bounds__(kThreads) newton_cg_init_kernel(Newton<T> nw) {
  __shared__ double partial[kWarps];
  const Solve<T>& s = nw.s;
  const int64_t k = blockIdx.x;
  if (!s.active[k]) {  // the host's CG and line-search loops look at every problem's flags
    if (threadIdx.x == 0) nw.cg_live[k] = 0, nw.ls_state[k] = 1;
    return;
  }
  const int64_t len = s.n + s.m, o = k * len;
  double rmax = 0.0;
  for (int64_t i = threadIdx.x; i < s.n; i += kThreads) rmax = fmax(rmax, nw.r[k * s.n + i]);
  const double reg = 1e-10 + 1e-6 * block_max_d(rmax, partial);
  const double eps = double(s.eps);
  double rz = 0.0, gn = 0.0, base = 0.0;
  for (int64_t t = threadIdx.x; t < len; t += kThreads) {
    double grad, diag;
    if (t < s.n) {
      const int64_t q = k * s.n + t;
      grad = double(s.a[q]) - nw.r[q];
      diag = nw.r[q];
      base += double(s.a[q]) * double(s.f[q]) - eps * nw.r[q];
    } else {
      const int64_t q = k * s.m + (t - s.n);
      grad = double(s.b[q]) - nw.sc[q];
      diag = nw.sc[q];
      base += double(s.b[q]) * double(s.g[q]);
    }
    const double d = eps / (diag + reg), z = d * grad;
    nw.gv[o + t] = grad, nw.rv[o + t] = grad, nw.dv[o + t] = d, nw.pv[o + t] = z, nw.xv[o + t] = 0.0;
    rz += grad * z, gn += grad * grad;
  }
  rz = block_sum(rz, partial);
  gn = block_sum(gn, partial);
  base = block_sum(base, partial);
  if (threadIdx.x == 0) {
    double* sc = nw.scal + k * kScalars;
    const double eta = fmin(0.1, sqrt(sqrt(gn)));
    sc[kReg] = reg, sc[kRz] = rz, sc[kGnorm] = gn, sc[kEta2] = eta * eta, sc[kBase] = base;
    nw.cg_live[k] = 1;
  }
}

// A warp per line of the batch (row i < n, or column n + j): (H p)_line, H = (1/eps)
// [[diag(r + reg), Ps], [Ps^T, diag(s + reg)]].
template <class T>
__global__ void __launch_bounds__(kThreads) newton_hvp_kernel(Newton<T> nw) {
  const Solve<T>& s = nw.s;
  const int lane = threadIdx.x % 32;
  const int64_t len = s.n + s.m, lines = s.B * len;
  for (int64_t w = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; w < lines; w += int64_t(gridDim.x) * kWarps) {
    const int64_t k = w / len, t = w % len;
    if (!s.active[k] || !nw.cg_live[k]) continue;
    const double* pv = nw.pv + k * len;
    double acc = 0.0, diag;
    if (t < s.n) {
      const int64_t* rs = nw.row_start + k * (s.n + 1);
      for (int64_t e = rs[t] + lane; e < rs[t + 1]; e += 32)
        acc += double(nw.csr_val[k * nw.cap + e]) * pv[s.n + nw.csr_col[k * nw.cap + e]];
      diag = nw.r[k * s.n + t];
    } else {
      const int64_t j = t - s.n;
      const int64_t* cs = nw.col_start + k * (s.m + 1);
      for (int64_t e = cs[j] + lane; e < cs[j + 1]; e += 32)
        acc += double(nw.csc_val[k * nw.cap + e]) * pv[nw.csc_row[k * nw.cap + e]];
      diag = nw.sc[k * s.m + j];
    }
    acc = warp_sum(acc);
    if (lane == 0) nw.hv[k * len + t] = double(s.x) * ((diag + nw.scal[k * kScalars + kReg]) * pv[t] + acc);
  }
}

// A block per problem: one CG iteration after the product (the CPU's loop body).
template <class T>
__global__ void __launch_bounds__(kThreads) newton_cg_step_kernel(Newton<T> nw) {
  __shared__ double partial[kWarps];
  const Solve<T>& s = nw.s;
  const int64_t k = blockIdx.x;
  if (!s.active[k] || !nw.cg_live[k]) return;
  const int64_t len = s.n + s.m, o = k * len;
  double* sc = nw.scal + k * kScalars;
  double php = 0.0;
  for (int64_t t = threadIdx.x; t < len; t += kThreads) php += nw.pv[o + t] * nw.hv[o + t];
  php = block_sum(php, partial);
  if (!(php > 0)) {
    if (threadIdx.x == 0) nw.cg_live[k] = 0;
    return;  // every thread: php is the block's
  }
  const double alpha = sc[kRz] / php;
  double rr = 0.0;
  for (int64_t t = threadIdx.x; t < len; t += kThreads) {
    nw.xv[o + t] += alpha * nw.pv[o + t];
    const double rt = nw.rv[o + t] - alpha * nw.hv[o + t];
    nw.rv[o + t] = rt;
    rr += rt * rt;
  }
  rr = block_sum(rr, partial);
  if (rr <= sc[kEta2] * sc[kGnorm] + 1e-300) {
    if (threadIdx.x == 0) nw.cg_live[k] = 0;
    return;
  }
  double rz = 0.0;
  for (int64_t t = threadIdx.x; t < len; t += kThreads) rz += nw.rv[o + t] * nw.dv[o + t] * nw.rv[o + t];
  rz = block_sum(rz, partial);
  const double beta = rz / sc[kRz];
  for (int64_t t = threadIdx.x; t < len; t += kThreads)
    nw.pv[o + t] = nw.dv[o + t] * nw.rv[o + t] + beta * nw.pv[o + t];
  __syncthreads();  // every thread has read sc[kRz]
  if (threadIdx.x == 0) sc[kRz] = rz;
}

// A block per problem: the line search's start (slope = grad . dx, t = 1).
template <class T>
__global__ void __launch_bounds__(kThreads) newton_ls_init_kernel(Newton<T> nw) {
  __shared__ double partial[kWarps];
  const Solve<T>& s = nw.s;
  const int64_t k = blockIdx.x;
  if (!s.active[k]) return;
  const int64_t len = s.n + s.m, o = k * len;
  double slope = 0.0;
  for (int64_t t = threadIdx.x; t < len; t += kThreads) slope += nw.gv[o + t] * nw.xv[o + t];
  slope = block_sum(slope, partial);
  if (threadIdx.x == 0) {
    nw.scal[k * kScalars + kSlope] = slope;
    nw.scal[k * kScalars + kStep] = 1.0;
    nw.ls_state[k] = 0;
    nw.trials[k] = 0;
  }
}


// A block per problem still searching: the linear part of the dual at step t, the shifts and
// u_i = e^(t x df_i - mu), v_j = e^(t x dg_j - mv).
template <class T>
__global__ void __launch_bounds__(kThreads) newton_ls_prep_kernel(Newton<T> nw) {
  __shared__ double partial[kWarps];
  const Solve<T>& s = nw.s;
  const int64_t k = blockIdx.x;
  if (!s.active[k] || nw.ls_state[k] != 0) return;
  const int64_t len = s.n + s.m, o = k * len;
  const double t = nw.scal[k * kScalars + kStep], x = double(s.x);
  double lin = 0.0, mu = -INFINITY, mv = -INFINITY;
  for (int64_t q = threadIdx.x; q < len; q += kThreads) {
    const double d = nw.xv[o + q];
    if (q < s.n) {
      lin += double(s.a[k * s.n + q]) * (double(s.f[k * s.n + q]) + t * d);
      mu = fmax(mu, t * x * d);
    } else {
      lin += double(s.b[k * s.m + q - s.n]) * (double(s.g[k * s.m + q - s.n]) + t * d);
      mv = fmax(mv, t * x * d);
    }
  }
  lin = block_sum(lin, partial);
  mu = block_max_d(mu, partial);
  mv = block_max_d(mv, partial);
  for (int64_t q = threadIdx.x; q < len; q += kThreads)
    nw.u[o + q] = exp(t * x * nw.xv[o + q] - (q < s.n ? mu : mv));
  if (threadIdx.x == 0) {
    double* sc = nw.scal + k * kScalars;
    sc[kLin] = lin, sc[kMu] = mu, sc[kMv] = mv;
  }
}

// A warp per row of the problems still searching: u_i sum_j P_ij v_j.
template <class T>
__global__ void __launch_bounds__(kThreads) newton_ls_rows_kernel(Newton<T> nw) {
  const Solve<T>& s = nw.s;
  const int lane = threadIdx.x % 32;
  const int64_t rows = s.B * s.n, len = s.n + s.m;
  for (int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; r < rows; r += int64_t(gridDim.x) * kWarps) {
    const int64_t k = r / s.n, i = r % s.n;
    if (!s.active[k] || nw.ls_state[k] != 0) continue;
    const T* p = nw.p + r * s.m;
    const double* v = nw.u + k * len + s.n;
    double acc = 0.0;
    for (int64_t j = lane; j < s.m; j += 32) acc += double(p[j]) * v[j];
    acc = warp_sum(acc);
    if (lane == 0) nw.ls_row[r] = acc * nw.u[k * len + i];
  }
}

// A block per problem still searching: the dual at step t; accept (apply the step) when it
// rises by Armijo's rule and strictly, else halve t; give up after kLineSearchTrials.
template <class T>
__global__ void __launch_bounds__(kThreads) newton_ls_decide_kernel(Newton<T> nw) {
  __shared__ double partial[kWarps];
  __shared__ int accept;
  const Solve<T>& s = nw.s;
  const int64_t k = blockIdx.x;
  if (!s.active[k] || nw.ls_state[k] != 0) return;
  double total = 0.0;
  for (int64_t i = threadIdx.x; i < s.n; i += kThreads) total += nw.ls_row[k * s.n + i];
  total = block_sum(total, partial);
  double* sc = nw.scal + k * kScalars;
  const double t = sc[kStep];
  if (threadIdx.x == 0) {
    const double cand = sc[kLin] - double(s.eps) * total * exp(sc[kMu] + sc[kMv]);
    accept = cand > sc[kBase] && cand >= sc[kBase] + 1e-4 * t * sc[kSlope];
  }
  __syncthreads();
  if (accept) {
    const int64_t len = s.n + s.m, o = k * len;
    for (int64_t q = threadIdx.x; q < len; q += kThreads) {
      if (q < s.n) s.f[k * s.n + q] = T(double(s.f[k * s.n + q]) + t * nw.xv[o + q]);
      else s.g[k * s.m + q - s.n] = T(double(s.g[k * s.m + q - s.n]) + t * nw.xv[o + q]);
    }
  }
  if (threadIdx.x == 0) {
    if (accept) {
      nw.ls_state[k] = 1;
    } else {
      sc[kStep] = 0.5 * t;
      if (++nw.trials[k] >= kLineSearchTrials) nw.ls_state[k] = 2;
    }
  }
}

// Thread per (problem, line): after the Newton update, h_col = x g + log b for the row pass.
template <class T>
__global__ void __launch_bounds__(kThreads) newton_refresh_kernel(Solve<T> s) {
  const int64_t cols = s.B * s.m;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < cols; e += int64_t(gridDim.x) * blockDim.x)
    if (s.active[e / s.m]) s.h_col[e] = s.x * s.g[e] + log_t(s.b[e]);
}

// Thread per (problem, row): f = f' of the row pass (and h_row for the column pass); the
// iteration counts once per problem.
template <class T>
__global__ void __launch_bounds__(kThreads) newton_take_f_kernel(Solve<T> s) {
  const int64_t rows = s.B * s.n;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < rows; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = e / s.n;
    if (!s.active[k]) continue;
    const T fi = s.f_next[e];
    s.f[e] = fi;
    s.h_row[e] = s.x * fi + log_t(s.a[e]);
    if (e % s.n == 0) ++s.n_iter[k];
  }
}

// Thread per problem, after the warm-up: the problems that stopped on the warm-up's iteration
// budget (not on tol, judged on the unrounded error) go on to the plan and its check, which
// stops them at max_iter with the rows' and columns' error, as the CPU does; each problem's
// Hessian budget and stall window start afresh.
template <class T>
__global__ void newton_resume_kernel(Newton<T> nw) {
  const Solve<T>& s = nw.s;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < s.B; k += int64_t(gridDim.x) * blockDim.x) {
    s.active[k] = !(s.error64[k] < s.tol);
    nw.kept[k] = nw.budget;
    nw.window[k] = INFINITY;
    nw.steps[k] = 0;
  }
}

int64_t newton_chunk_rows(const OtBatch& q) { return chunk_rows_of(q); }

// The Newton buffers after the Sinkhorn ones (null workspace: only `cv.used` counts).
template <class T>
Newton<T> carve_newton(const OtBatch& q, const Solve<T>& s, Carver& cv) {
  Newton<T> nw;
  nw.s = s;
  nw.budget = (q.keep < q.m ? q.keep : q.m) * q.n;
  nw.cap = q.n * q.m;
  nw.most = 8 * nw.budget < nw.cap ? 8 * nw.budget : nw.cap;
  nw.cg_iters = q.cg_iters;
  nw.col_chunk_rows = newton_chunk_rows(q);
  nw.col_chunks = (q.n + nw.col_chunk_rows - 1) / nw.col_chunk_rows;
  const int64_t B = q.B, n = q.n, m = q.m, len = n + m;
  nw.p = cv.take<T>(B * n * m);
  nw.r = cv.take<double>(B * n);
  nw.sc = cv.take<double>(B * m);
  nw.row_cost = cv.take<double>(B * n);
  nw.col_part = cv.take<double>(nw.col_chunks * B * m);
  nw.col_count = cv.take<int64_t>(nw.col_chunks * B * m);
  nw.hist = cv.take<unsigned long long>(B * PlanBins<T>::kBuckets);
  nw.slices = cv.take<unsigned long long>(B * kPlanSlices);
  nw.bucket = cv.take<int64_t>(B);
  nw.above = cv.take<int64_t>(B);
  nw.rho = cv.take<T>(B);
  nw.row_start = cv.take<int64_t>(B * (n + 1));
  nw.col_start = cv.take<int64_t>(B * (m + 1));
  nw.csr_col = cv.take<int32_t>(B * nw.cap);
  nw.csr_val = cv.take<T>(B * nw.cap);
  nw.csc_row = cv.take<int32_t>(B * nw.cap);
  nw.csc_val = cv.take<T>(B * nw.cap);
  nw.xv = cv.take<double>(B * len);
  nw.rv = cv.take<double>(B * len);
  nw.pv = cv.take<double>(B * len);
  nw.hv = cv.take<double>(B * len);
  nw.dv = cv.take<double>(B * len);
  nw.gv = cv.take<double>(B * len);
  nw.u = cv.take<double>(B * len);
  nw.ls_row = cv.take<double>(B * n);
  nw.scal = cv.take<double>(B * kScalars);
  nw.cg_live = cv.take<int>(B);
  nw.ls_state = cv.take<int>(B);
  nw.trials = cv.take<int>(B);
  nw.kept = cv.take<int64_t>(B);
  nw.window = cv.take<double>(B);
  nw.steps = cv.take<int64_t>(B);
  return nw;
}

// True when any of the B device flags is non-zero (copies them to host_flags, synchronizing).
inline bool any_flag(const int* flags, int64_t B, int* host_flags, cudaStream_t st, const char** error) {
  if (cudaMemcpyAsync(host_flags, flags, size_t(B) * sizeof(int), cudaMemcpyDeviceToHost, st) != cudaSuccess ||
      cudaStreamSynchronize(st) != cudaSuccess) {
    *error = launch_status();
    return false;
  }
  for (int64_t k = 0; k < B; ++k)
    if (host_flags[k]) return true;
  return false;
}

// Newton steps from the warm-up's potentials until every problem is done. host_flags: B ints.
template <class T>
const char* newton(const OtBatch& q, const Solve<T>& s, const Newton<T>& nw, cudaStream_t st,
                   int* host_flags) {
  const char* error = nullptr;
  newton_resume_kernel<T><<<blocks_for(q.B, kThreads), kThreads, 0, st>>>(nw);
  const unsigned row_tiles = blocks_for(q.n, kWarps) < 1024 ? blocks_for(q.n, kWarps) : 1024;
  const dim3 per_problem(unsigned(q.B), row_tiles);  // problems on x: no 65535 limit
  const dim3 col_grid(unsigned((q.m + kThreads - 1) / kThreads), unsigned(nw.col_chunks),
                      unsigned(q.B < kMaxGridY ? q.B : kMaxGridY));
  const unsigned rows_grid = blocks_for(q.B * q.n, kWarps), lines_grid = blocks_for(q.B * (q.n + q.m), kWarps);
  const dim3 sinkhorn_cols(unsigned((q.m + kThreads - 1) / kThreads), unsigned(s.chunks),
                           unsigned(q.B < kMaxGridY ? q.B : kMaxGridY));
  for (;;) {
    if (cudaMemsetAsync(nw.hist, 0, size_t(q.B) * PlanBins<T>::kBuckets * sizeof(unsigned long long), st) != cudaSuccess ||
        cudaMemsetAsync(nw.slices, 0, size_t(q.B) * kPlanSlices * sizeof(unsigned long long), st) != cudaSuccess)
      return launch_status();
    newton_plan_kernel<T><<<per_problem, kThreads, 0, st>>>(nw);
    newton_colsum_kernel<T><<<col_grid, kThreads, 0, st>>>(nw);
    newton_check_kernel<T><<<unsigned(q.B), kThreads, 0, st>>>(nw);
    if (const char* e = launch_status()) return e;
    if (!any_flag(s.active, q.B, host_flags, st, &error)) return error;
    newton_slices_kernel<T><<<per_problem, kThreads, 0, st>>>(nw);
    newton_threshold_kernel<T><<<blocks_for(q.B, kThreads), kThreads, 0, st>>>(nw);
    newton_rows_kernel<T, false><<<rows_grid, kThreads, 0, st>>>(nw);
    newton_cols_kernel<T, false><<<col_grid, kThreads, 0, st>>>(nw);
    newton_scan_kernel<T><<<unsigned(q.B), kThreads, 0, st>>>(nw);
    newton_rows_kernel<T, true><<<rows_grid, kThreads, 0, st>>>(nw);
    newton_cols_kernel<T, true><<<col_grid, kThreads, 0, st>>>(nw);
    newton_cg_init_kernel<T><<<unsigned(q.B), kThreads, 0, st>>>(nw);
    if (const char* e = launch_status()) return e;
    for (int64_t it = 0; it < nw.cg_iters; ++it) {
      newton_hvp_kernel<T><<<lines_grid, kThreads, 0, st>>>(nw);
      newton_cg_step_kernel<T><<<unsigned(q.B), kThreads, 0, st>>>(nw);
      if ((it + 1) % kCgCheckEvery == 0) {
        if (const char* e = launch_status()) return e;
        if (!any_flag(nw.cg_live, q.B, host_flags, st, &error)) {
          if (error) return error;
          break;
        }
      }
    }
    newton_ls_init_kernel<T><<<unsigned(q.B), kThreads, 0, st>>>(nw);
    for (int trial = 0; trial < kLineSearchTrials; ++trial) {
      newton_ls_prep_kernel<T><<<unsigned(q.B), kThreads, 0, st>>>(nw);
      newton_ls_rows_kernel<T><<<rows_grid, kThreads, 0, st>>>(nw);
      newton_ls_decide_kernel<T><<<unsigned(q.B), kThreads, 0, st>>>(nw);
      if (const char* e = launch_status()) return e;
      // searching problems have ls_state 0: stop when none is left
      if (cudaMemcpyAsync(host_flags, nw.ls_state, size_t(q.B) * sizeof(int), cudaMemcpyDeviceToHost, st) !=
              cudaSuccess ||
          cudaStreamSynchronize(st) != cudaSuccess)
        return launch_status();
      bool searching = false;
      for (int64_t k = 0; k < q.B; ++k) searching = searching || host_flags[k] == 0;
      if (!searching) break;
    }
    // then one Sinkhorn iteration
    newton_refresh_kernel<T><<<blocks_for(q.B * q.m, kThreads), kThreads, 0, st>>>(s);
    row_pass_kernel<T><<<rows_grid, kThreads, 0, st>>>(s);
    newton_take_f_kernel<T><<<blocks_for(q.B * q.n, kThreads), kThreads, 0, st>>>(s);
    col_pass_kernel<T><<<sinkhorn_cols, kThreads, 0, st>>>(s);
    col_merge_kernel<T><<<blocks_for(q.B * q.m, kThreads), kThreads, 0, st>>>(s);
    if (const char* e = launch_status()) return e;
  }
}
