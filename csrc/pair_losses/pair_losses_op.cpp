// The torch-aware side of the pair-based losses: argument checks, allocation, and the CPU
// kernels (auc_cpu_impl.h, similarity_rows_cpu_impl.h) or the CUDA kernels (auc_cuda.cu).
// Schemas in registration.cpp; fake kernels and autograd in python/fastloss/ops/pair_losses.py
// (the similarity-block ops' fakes in ops/metric.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_unique2.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/full.h>
#include <ATen/ops/logaddexp.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/scatter.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/zeros.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#if defined(FASTLOSS_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif

#include "../losses/losses_op.h"  // call_below_autograd, Reduction
#include "../op_helpers.h"
#include "auc_kernels.h"
#include "icnn_score.h"
#include "proto_triplet.h"
#include "similarity_rows_kernels.h"

namespace fastloss {
namespace {

using at::Tensor;
constexpr const char* kOp = "mw_auc_loss";
// the CPU's scratch for the items' negative-score gradients (see mw_auc_forward)
constexpr int64_t kAucScratchBytes = int64_t(1) << 20;

// *dst_row(r) += src[r] for the rows r of src [rows, n] in row order, the n columns split
// among the threads: partial sums merged with the same bits for any thread count.
template <class DstRow>
void add_rows_in_order(const float* src, int64_t rows, int64_t n, DstRow dst_row) {
  at::parallel_for(0, n, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t r = 0; r < rows; ++r) {
      float* d = dst_row(r);
      const float* a = src + r * n;
      for (int64_t j = j0; j < j1; ++j) d[j] += a[j];
    }
  });
}

// -> (loss of each query [B] float32, d loss_b / d pos [B, P] float32, d loss_b / d neg [B, N]
// float32); the gradients are empty unless compute_grad.
std::tuple<Tensor, Tensor, Tensor> mw_auc_forward(const Tensor& pos_in, const Tensor& neg_in,
                                                  bool compute_grad) {
  TORCH_CHECK(pos_in.dim() == 2 && neg_in.dim() == 2 && pos_in.size(0) == neg_in.size(0), kOp,
              ": scores_pos and scores_neg must be [B, P] and [B, N] (one row per query), got ",
              pos_in.sizes(), " and ", neg_in.sizes());
  TORCH_CHECK(pos_in.size(1) >= 1 && neg_in.size(1) >= 1, kOp,
              ": every query needs at least one positive and one negative score, got P = ",
              pos_in.size(1), " and N = ", neg_in.size(1));
  TORCH_CHECK(pos_in.scalar_type() == neg_in.scalar_type(), kOp, ": scores_pos is ",
              pos_in.scalar_type(), " but scores_neg is ", neg_in.scalar_type());
  TORCH_CHECK(pos_in.device() == neg_in.device(), kOp, ": scores_pos is on ", pos_in.device(),
              " but scores_neg is on ", neg_in.device());
#if defined(FASTLOSS_WITH_CUDA)
  TORCH_CHECK(pos_in.is_cpu() || pos_in.is_cuda(), kOp, ": the fastloss kernels run on the CPU "
              "or a CUDA device, got ", pos_in.device());
#else
  TORCH_CHECK(pos_in.is_cpu(), kOp, ": the fastloss kernel runs on the CPU (this build has no "
              "CUDA kernels), got ", pos_in.device());
#endif
  const Tensor pos = pos_in.stride(1) == 1 ? pos_in : pos_in.contiguous();
  const Tensor neg = neg_in.stride(1) == 1 ? neg_in : neg_in.contiguous();
  AucProblem q;
  q.pos = pos.data_ptr();
  q.neg = neg.data_ptr();
  q.dtype = kernel_dtype(pos, kOp, "scores");
  q.B = pos.size(0);
  q.P = pos.size(1);
  q.N = neg.size(1);
  q.pos_stride = q.B > 1 ? pos.stride(0) : q.P;
  q.neg_stride = q.B > 1 ? neg.stride(0) : q.N;
  const auto f32 = pos.options().dtype(at::kFloat);
  if (pos.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(pos.device());
    Tensor loss = at::empty({q.B}, f32);
    Tensor grad_pos = compute_grad ? at::empty({q.B, q.P}, f32) : at::empty({0}, f32);
    Tensor grad_neg = compute_grad ? at::empty({q.B, q.N}, f32) : at::empty({0}, f32);
    const AucCudaScratch sizes = auc_cuda_scratch(q);
    Tensor loss_scratch = at::empty({sizes.doubles}, pos.options().dtype(at::kDouble));
    Tensor grad_scratch = at::empty({sizes.floats}, f32);
    check_cuda_launch(auc_cuda(q, loss.data_ptr<float>(),
                               compute_grad ? grad_pos.data_ptr<float>() : nullptr,
                               compute_grad ? grad_neg.data_ptr<float>() : nullptr,
                               loss_scratch.data_ptr<double>(), grad_scratch.data_ptr<float>(),
                               cuda_stream()), kOp);
    return {loss, grad_pos, grad_neg};
#endif
  }
  const int64_t items = auc_items(q), blocks = items / std::max<int64_t>(q.B, 1);
  Tensor loss_part = at::empty({items}, pos.options().dtype(at::kDouble));
  Tensor grad_pos = compute_grad ? at::empty({q.B, q.P}, f32) : at::empty({0}, f32);
  Tensor grad_neg = compute_grad ? at::zeros({q.B, q.N}, f32) : at::empty({0}, f32);
  double* lp = loss_part.data_ptr<double>();
  float* gp = compute_grad ? grad_pos.data_ptr<float>() : nullptr;
  // Each item's negative-score gradient goes to a scratch row, then is added to its query's
  // row of grad_neg in item order (the same bits for any chunking or thread count). The items
  // go in chunks of kAucScratchBytes of rows, or two items per thread where that is more:
  // scratch max(1 MiB, 8 threads N bytes), whatever P ([items, N] at once had been 16 GiB at
  // P = N = 1M).
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = compute_grad ? std::min(items, std::max<int64_t>(kAucScratchBytes / (4 * q.N), 2 * threads))
                                     : items;
  Tensor neg_part = compute_grad ? at::empty({std::min(chunk, items), q.N}, f32) : Tensor();
  float* np = compute_grad ? neg_part.data_ptr<float>() : nullptr;
  for (int64_t c0 = 0; c0 < items; c0 += chunk) {
    const int64_t c1 = std::min(items, c0 + chunk);
    at::parallel_for(c0, c1, 1, [&](int64_t r0, int64_t r1) { auc_cpu(q, lp, gp, np, c0, r0, r1); });
    if (!compute_grad) continue;
    float* gn = grad_neg.data_ptr<float>();
    add_rows_in_order(np, c1 - c0, q.N, [&](int64_t r) { return gn + ((c0 + r) / blocks) * q.N; });
  }
  const double scale = 1.0 / (double(q.P) * double(q.N));
  const Tensor loss = loss_part.view({q.B, blocks}).sum(1).mul(scale).to(at::kFloat);
  return {loss, grad_pos, grad_neg};
}

// mw_auc_loss's eager path: mw_auc_forward makes both gradients with the losses when asked, so
// the backward only scales their rows (Python autograd on the forward op cost ~100 us of host
// time per call, all of a small call on a GPU). The forward op is called through the
// dispatcher, below autograd, so torch.compile traces its fake kernel.
struct AucLossFunction : public torch::autograd::Function<AucLossFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& pos, const Tensor& neg,
                        int64_t reduction, bool want, bool round_loss) {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastloss::mw_auc_forward", "");
    auto out = call_below_autograd(op, {pos, neg, want});
    const Tensor rows = out[0].toTensor();
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["want"] = want;
    ctx->saved_data["dtypes"] = std::vector<int64_t>{int64_t(pos.scalar_type()), int64_t(neg.scalar_type())};
    ctx->save_for_backward({out[1].toTensor(), out[2].toTensor()});
    return loss_in(reduce_loss_rows(rows, reduction), round_loss, pos);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    Tensor gp, gn;
    if ((ctx->needs_input_grad(0) || ctx->needs_input_grad(1)) && grads[0].defined()) {
      TORCH_CHECK(ctx->saved_data["want"].toBool(), kOp, ": the gradients were not made in the "
                  "forward (no score required grad then)");
      const auto saved = ctx->get_saved_variables();
      const int64_t reduction = ctx->saved_data["reduction"].toInt();
      const Tensor g = row_upstream(grads[0], reduction, saved[0].sym_size(0)).unsqueeze(1);  // per query
      const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
      if (ctx->needs_input_grad(0)) gp = saved[0].mul(g).to(at::ScalarType(dtypes[0]));
      if (ctx->needs_input_grad(1)) gn = saved[1].mul(g).to(at::ScalarType(dtypes[1]));
    }
    return once_differentiable(grads, {gp, gn, Tensor(), Tensor(), Tensor()}, kOp);
  }
};

template <bool Grad>
Tensor mw_auc_loss(const Tensor& pos, const Tensor& neg, int64_t reduction, bool round_loss) {
  TORCH_CHECK(reduction >= kNone && reduction <= kSum, kOp,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  if constexpr (Grad) {
    const bool want = at::GradMode::is_enabled() && (pos.requires_grad() || neg.requires_grad());
    return AucLossFunction::apply(pos, neg, reduction, want, round_loss);
  }
  const Tensor rows = std::get<0>(mw_auc_forward(pos, neg, false));
  return loss_in(reduce_loss_rows(rows, reduction), round_loss, pos);
}


// ---- similarity blocks of the embedding losses (similarity_rows_kernels.h) ------------------
// Called by python/fastloss/ops/metric.py, contrastive.py and few_shot.py on each block
// S = E_rows @ E^T. CPU kernels for all; CUDA kernels (similarity_rows_cuda.cu) for ms_rows_,
// tcm_rows (without pair lists), tcm_rows_grad_, clip_rows and clip_rows_grad_.

// Rows per parallel task: about 32k similarities.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

// self_pairs: row i's column row0 + i is its self pair, so the rows must be columns too;
// cuda: the op has CUDA kernels (in a CUDA build)
void check_block(const Tensor& s, int64_t row0, const char* op, bool self_pairs, bool cuda) {
  bool on_device = s.is_cpu();
#if defined(FASTLOSS_WITH_CUDA)
  on_device = on_device || (cuda && s.is_cuda());
#endif
  TORCH_CHECK(on_device, op, ": s must be on the CPU", cuda ? " or a CUDA device (CUDA builds)" : "",
              ", got ", s.device());
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2 && s.is_contiguous(),
              op, ": s must be a contiguous float32 [rows, n] block, got ", s.scalar_type(),
              " ", s.sizes());
  TORCH_CHECK(!self_pairs || (row0 >= 0 && row0 + s.size(0) <= s.size(1)), op, ": rows [", row0,
              ", ", row0 + s.size(0), ") of the block must be columns of it (n = ", s.size(1), ")");
}

// t: a contiguous [n] tensor of dtype on `device` (the CPU unless given)
void check_vector(const Tensor& t, int64_t n, at::ScalarType dtype, const char* op,
                  const char* what, c10::Device device = c10::Device(c10::kCPU)) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == n &&
                  t.is_contiguous(),
              op, ": ", what, " must be a contiguous ", dtype, " [", n, "] tensor on ", device,
              ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

SimBlock sim_block(Tensor& s, const Tensor* keys, int64_t row0, const char* op,
                   bool self_pairs = true, bool cuda = false) {
  check_block(s, row0, op, self_pairs, cuda);
  SimBlock q;
  q.s = s.data_ptr<float>();
  q.rows = s.size(0);
  q.n = s.size(1);
  q.row0 = row0;
  if (keys) {
    check_vector(*keys, q.n, at::kFloat, op, "keys", s.device());
    q.keys = keys->data_ptr<float>();
  }
  return q;
}

// The rank of each label among the distinct labels (0 for the smallest) as float32, on the
// labels' device without waiting for it: a sort, a flag where the sorted value changes, a
// running count (exact in float32 below 2^24 labels), scattered back.
Tensor dense_label_ranks(const Tensor& labels) {
  const int64_t n = labels.numel();
  const auto [sorted, order] = at::sort(labels);
  Tensor fresh = at::ones({n}, labels.options().dtype(at::kFloat));
  if (n > 1) fresh.slice(0, 1).copy_(sorted.slice(0, 1).ne(sorted.slice(0, 0, n - 1)));
  const Tensor ranks = fresh.cumsum(0).sub_(1.0);
  return at::empty_like(ranks).scatter_(0, order, ranks);
}

// Float keys of integer class labels for the kernels' vector compares (only equality matters).
// CPU: the labels themselves when all are within +-2^24 (exact in float32), else their dense
// ranks. CUDA: always the dense ranks, so that no call waits for the GPU (reading the labels'
// range back did: two host synchronisations in every Multi-Similarity / TCM call).
Tensor pair_label_keys(const Tensor& labels) {
  constexpr const char* op = "pair_label_keys";
  TORCH_CHECK(labels.dim() == 1 && at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
              op, ": labels must be an integer [B] tensor, got ", labels.scalar_type(), " ",
              labels.sizes());
  TORCH_CHECK(labels.numel() < (int64_t(1) << 24), op, ": at most 2^24 - 1 labels, got ",
              labels.numel());
  if (labels.numel() == 0) return at::empty({0}, labels.options().dtype(at::kFloat));
  if (!labels.is_cpu()) return dense_label_ranks(labels);
  const auto [lo, hi] = at::aminmax(labels);
  constexpr int64_t kExact = int64_t(1) << 24;
  if (lo.item<int64_t>() >= -kExact && hi.item<int64_t>() <= kExact)
    return labels.to(at::kFloat).contiguous();
  return dense_label_ranks(labels);
}

// -> [2, rows]: log(1 + sum) of the kept positives' and negatives' exponentials; with
// write_grad, s becomes d loss_i / d S.
Tensor ms_rows_(Tensor& s, const Tensor& keys, int64_t row0, double alpha, double beta,
                double base, std::optional<double> epsilon, bool write_grad) {
  const SimBlock q = sim_block(s, &keys, row0, "ms_rows_", true, true);
  MsParams p;
  p.alpha = float(alpha);
  p.beta = float(beta);
  p.base = float(base);
  p.mine = epsilon.has_value();
  p.epsilon = p.mine ? float(*epsilon) : 0.f;
  Tensor out = at::empty({2, q.rows}, s.options());
  float* lp = out.data_ptr<float>();
  if (s.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(s.device());
    check_cuda_launch(ms_rows_cuda(q, p, lp, lp + q.rows, write_grad, cuda_stream()), "ms_rows_");
    return out;
#endif
  }
  at::parallel_for(0, q.rows, row_grain(q.n), [&](int64_t r0, int64_t r1) {
    ms_rows(q, p, lp, lp + q.rows, write_grad, r0, r1);
  });
  return out;
}

// -> (totals [4] float64: sum of m_pos - S and count over hard positives, the same over hard
// negatives; hard pairs per row [rows] int64; with collect, their columns [sum] int32, row by
// row, else [0]). s's self pairs are overwritten.
std::tuple<Tensor, Tensor, Tensor> tcm_rows_op(Tensor& s, const Tensor& keys, int64_t row0,
                                                double m_pos, double m_neg, bool collect) {
  const SimBlock q = sim_block(s, &keys, row0, "tcm_rows", true, true);
  const TcmParams p{float(m_pos), float(m_neg)};
  const auto f64 = s.options().dtype(at::kDouble), i64 = s.options().dtype(at::kLong);
  Tensor row_stats = at::empty({q.rows, 4}, f64);
  double* st = row_stats.data_ptr<double>();
  if (s.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    TORCH_CHECK(!collect, "tcm_rows: the hard pairs' lists are CPU-only (collect=False on CUDA)");
    const c10::cuda::CUDAGuard guard(s.device());
    check_cuda_launch(tcm_rows_cuda(q, p, st, cuda_stream()), "tcm_rows");
    return {row_stats.sum(0), at::add(row_stats.select(1, 1), row_stats.select(1, 3)).to(at::kLong),
            at::empty({0}, s.options().dtype(at::kInt))};
#endif
  }
  at::parallel_for(0, q.rows, row_grain(q.n), [&](int64_t r0, int64_t r1) {
    tcm_rows(q, p, st, r0, r1);
  });
  Tensor totals = at::zeros({4}, f64), row_nnz = at::empty({q.rows}, i64);
  double* tot = totals.data_ptr<double>();
  int64_t* nnz = row_nnz.data_ptr<int64_t>();
  Tensor offsets = at::empty({q.rows}, i64);
  int64_t* off = offsets.data_ptr<int64_t>();
  int64_t all = 0;
  for (int64_t i = 0; i < q.rows; ++i) {  // in row order: the same totals for any thread count
    for (int k = 0; k < 4; ++k) tot[k] += st[4 * i + k];
    nnz[i] = int64_t(st[4 * i + 1] + st[4 * i + 3]);
    off[i] = all;
    all += nnz[i];
  }
  // (2^24: the kernels count a row's hard pairs in float32, exact up to 2^24; past it the count
  // that sizes the lists could fall short of the pairs written into them)
  TORCH_CHECK(!collect || q.n <= (int64_t(1) << 24), "tcm_rows: the pair lists are sized by float32 "
              "counts: at most 2^24 columns when collecting, got ", q.n);
  Tensor cols = at::empty({collect ? all : 0}, s.options().dtype(at::kInt));
  if (collect && all > 0) {
    int32_t* c = cols.data_ptr<int32_t>();
    at::parallel_for(0, q.rows, row_grain(q.n), [&](int64_t r0, int64_t r1) {
      tcm_pairs(q, p, off, c, r0, r1);
    });
  }
  return {totals, row_nnz, cols};
}

// Entries grouped by a key in [0, m) (a stable counting sort): visit(f) calls f(key, value) for
// every entry, the same order both times it is called; -> ptr [m + 1] (group j at
// out[ptr[j] : ptr[j + 1]]) and the values, in visiting order within a group. The sparse
// backwards transpose their pair lists with it, so each side's sums are row-parallel.
template <class T, class Visit>
void group_by_key(int64_t m, int64_t entries, Visit&& visit, std::vector<int64_t>& ptr,
                  std::vector<T>& out) {
  ptr.assign(m + 1, 0);
  visit([&](int64_t key, T) { ++ptr[key + 1]; });
  for (int64_t j = 0; j < m; ++j) ptr[j + 1] += ptr[j];
  out.resize(entries);
  std::vector<int64_t> fill(ptr.begin(), ptr.end() - 1);
  visit([&](int64_t key, T value) { out[fill[key]++] = value; });
}

// A [2] float64 tensor of two coefficients.
std::pair<float, float> coef_pair(const Tensor& coef, const char* op) {
  check_vector(coef, 2, at::kDouble, op, "coef");
  const double* c = coef.data_ptr<double>();
  return {float(c[0]), float(c[1])};
}

// s becomes -coef[0] on hard positives, +coef[1] on hard negatives, 0 elsewhere.
void tcm_rows_grad_(Tensor& s, const Tensor& keys, int64_t row0, double m_pos, double m_neg,
                    const Tensor& coef) {
  const SimBlock q = sim_block(s, &keys, row0, "tcm_rows_grad_", true, true);
  const TcmParams p{float(m_pos), float(m_neg)};
  if (s.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    check_vector(coef, 2, at::kDouble, "tcm_rows_grad_", "coef", s.device());
    const c10::cuda::CUDAGuard guard(s.device());
    check_cuda_launch(tcm_rows_grad_cuda(q, p, coef.data_ptr<double>(), cuda_stream()),
                      "tcm_rows_grad_");
    return;
#endif
  }
  const auto [d_pos, d_neg] = coef_pair(coef, "tcm_rows_grad_");
  at::parallel_for(0, q.rows, row_grain(q.n), [&](int64_t r0, int64_t r1) {
    tcm_rows_grad(q, p, d_pos, d_neg, r0, r1);
  });
}

// The gradient of a sum over a sparse set of ordered pairs (i, j) (row i's columns at
// cols[row_ptr[i] : row_ptr[i + 1]]) of c(i, j) <e_i, e_j>: grad_i += c e_j and grad_j += c e_i,
// c = coef[0] for pairs of the same key, coef[1] for the others. The second half goes through
// the transposed list (a counting sort), so both halves are row-parallel without atomics.
Tensor pair_grad(const Tensor& e, const Tensor& keys, const Tensor& row_ptr, const Tensor& cols,
                 const Tensor& coef) {
  constexpr const char* op = "pair_grad";
  const auto [c_same, c_diff] = coef_pair(coef, op);
  TORCH_CHECK(e.is_cpu() && e.scalar_type() == at::kFloat && e.dim() == 2 && e.is_contiguous(),
              op, ": e must be a contiguous float32 CPU [B, D] tensor, got ", e.scalar_type(),
              " ", e.sizes());
  const int64_t n = e.size(0), d = e.size(1);
  TORCH_CHECK(n < (int64_t(1) << 31), op, ": at most 2^31 - 1 rows, got ", n);
  check_vector(keys, n, at::kFloat, op, "keys");
  check_vector(row_ptr, n + 1, at::kLong, op, "row_ptr");
  const int64_t nnz = cols.numel();
  check_vector(cols, nnz, at::kInt, op, "cols");
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* c = cols.data_ptr<int32_t>();
  TORCH_CHECK(rp[0] == 0 && rp[n] == nnz, op, ": row_ptr must run from 0 to the ", nnz, " pairs");
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(rp[i] <= rp[i + 1], op, ": row_ptr must not decrease (row ", i, ")");
    for (int64_t k = rp[i]; k < rp[i + 1]; ++k)
      TORCH_CHECK(c[k] >= 0 && c[k] < n, op, ": column ", c[k], " of row ", i, " is not in [0, ",
                  n, ")");
  }
  std::vector<int64_t> tptr;
  std::vector<int32_t> tcols;  // transposed row j: the rows i that list j, ascending
  group_by_key(n, nnz, [&](auto&& f) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = rp[i]; k < rp[i + 1]; ++k) f(c[k], int32_t(i));
  }, tptr, tcols);
  Tensor grad = at::zeros({n, d}, e.options());
  const float* ep = e.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  float* gp = grad.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1));
  for (const auto& [ptr, idx] : {std::pair{rp, c}, std::pair{(const int64_t*)tptr.data(),
                                                             (const int32_t*)tcols.data()}})
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
      pair_rows_grad(ep, d, kp, ptr, idx, c_same, c_diff, gp, r0, r1);
    });
  return grad;
}

// -> (logsumexp of each row of X = scale S [rows], X's diagonal [rows], when symmetric the
// block's column logsumexps [n] else [0])
std::tuple<Tensor, Tensor, Tensor> clip_rows_op(const Tensor& s_in, int64_t row0, double scale,
                                                bool symmetric) {
  Tensor s = s_in;
  const SimBlock q = sim_block(s, nullptr, row0, "clip_rows", true, true);
  Tensor lse_row = at::empty({q.rows}, s.options()), diag = at::empty({q.rows}, s.options());
  Tensor lse_col = at::empty({symmetric ? q.n : 0}, s.options());
  float *lr = lse_row.data_ptr<float>(), *dg = diag.data_ptr<float>();
  if (s.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(s.device());
    const int64_t parts = symmetric ? clip_cuda_parts(q) : 0;
    Tensor col_max = at::empty({parts, q.n}, s.options()), col_sum = at::empty({parts, q.n}, s.options());
    check_cuda_launch(clip_rows_cuda(q, float(scale), lr, dg, col_max.data_ptr<float>(),
                                     col_sum.data_ptr<float>(),
                                     symmetric ? lse_col.data_ptr<float>() : nullptr, cuda_stream()),
                      "clip_rows");
    if (symmetric && q.rows == 0) lse_col.fill_(-std::numeric_limits<float>::infinity());  // empty sums
    return {lse_row, diag, lse_col};
#endif
  }
  if (!symmetric) {
    at::parallel_for(0, q.rows, row_grain(q.n), [&](int64_t r0, int64_t r1) {
      clip_rows(q, float(scale), lr, dg, nullptr, nullptr, r0, r1);
    });
    return {lse_row, diag, lse_col};
  }
  // the columns' statistics: one part per row range, merged in part order (deterministic)
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), q.rows));
  Tensor col_max = at::empty({parts, q.n}, s.options()), col_sum = at::empty({parts, q.n}, s.options());
  float *cm = col_max.data_ptr<float>(), *cs = col_sum.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t k = p0; k < p1; ++k)
      clip_rows(q, float(scale), lr, dg, cm + k * q.n, cs + k * q.n, q.rows * k / parts,
                q.rows * (k + 1) / parts);
  });
  clip_merge_cols(cm, cs, parts, q.n, lse_col.data_ptr<float>());
  return {lse_row, diag, lse_col};
}

void clip_rows_grad_(Tensor& s, int64_t row0, double scale, const Tensor& lse_row,
                     const std::optional<Tensor>& lse_col, const Tensor& g) {
  constexpr const char* op = "clip_rows_grad_";
  const SimBlock q = sim_block(s, nullptr, row0, op, true, true);
  check_vector(lse_row, q.rows, at::kFloat, op, "lse_row", s.device());
  check_vector(g, q.n, at::kFloat, op, "g", s.device());
  if (lse_col) check_vector(*lse_col, q.n, at::kFloat, op, "lse_col", s.device());
  const float* lc = lse_col ? lse_col->data_ptr<float>() : nullptr;
  if (s.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(s.device());
    check_cuda_launch(clip_rows_grad_cuda(q, float(scale), lse_row.data_ptr<float>(), lc,
                                          g.data_ptr<float>(), cuda_stream()), op);
    return;
#endif
  }
  at::parallel_for(0, q.rows, row_grain(q.n), [&](int64_t r0, int64_t r1) {
    clip_rows_grad(q, float(scale), lse_row.data_ptr<float>(), lc, g.data_ptr<float>(), r0, r1);
  });
}

// The contrastive loss's block loops (python/fastloss/ops/contrastive.py) in C++: the same
// GEMMs and clip_rows / clip_rows_grad_ calls without Python's per-call overhead, which at
// B = 256 is as large as the work. keep: when the whole S fits in one block, return it
// (s_kept) so that the backward need not form it again (3 GEMMs in all, as eager, instead of 4).
// -> (each row's term [B] (averaged with its column's when symmetric), lse_row [B], lse_col
// [B] or [0], s_kept [B, B] or [0, 0]), float32
std::tuple<Tensor, Tensor, Tensor, Tensor> contrastive_forward(const Tensor& a, const Tensor& b,
                                                               double inv_t, bool symmetric,
                                                               int64_t block_rows, bool keep) {
  constexpr const char* op = "contrastive_loss";
  TORCH_CHECK(a.dim() == 2 && b.sizes() == a.sizes(), op, ": a and b must be [B, D] of the same shape");
  TORCH_CHECK(block_rows >= 1, op, ": block_rows must be >= 1, got ", block_rows);
  const Tensor af = a.to(at::kFloat).contiguous(), bf = b.to(at::kFloat).contiguous();
  const int64_t n = af.size(0);
  const auto f32 = af.options();
  Tensor s_kept = at::empty({0, 0}, f32);
  // one reused block: fresh ones interleaved with the small tensors kept across blocks fragment
  // the heap (metric.py's _block_products)
  Tensor buf = at::empty({std::min(block_rows, n), n}, f32);
  Tensor lse_row, diag, lse_col;
  if (n <= block_rows) {  // one block (the common case at CLIP's batch sizes): its results as they are
    at::mm_out(buf, af, bf.t());
    std::tie(lse_row, diag, lse_col) = clip_rows_op(buf, 0, inv_t, symmetric);
    if (keep) s_kept = buf;
  } else {
    lse_row = at::empty({n}, f32);
    diag = at::empty({n}, f32);
    lse_col = symmetric ? at::full({n}, -std::numeric_limits<float>::infinity(), f32) : at::empty({0}, f32);
    for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
      const int64_t r1 = std::min(n, r0 + block_rows);
      Tensor s = buf.slice(0, 0, r1 - r0);
      at::mm_out(s, af.slice(0, r0, r1), bf.t());
      auto [lr, dg, part] = clip_rows_op(s, r0, inv_t, symmetric);
      lse_row.slice(0, r0, r1).copy_(lr);
      diag.slice(0, r0, r1).copy_(dg);
      if (symmetric) lse_col = at::logaddexp(lse_col, part);
    }
  }
  Tensor rows = at::sub(lse_row, diag);
  if (symmetric) rows.add_(lse_col).sub_(diag).mul_(0.5);  // column i's target: the same diagonal
  return {rows, lse_row, lse_col, s_kept};
}

// -> (grad_a [B, D] or [0], grad_b [B, D] or [0]) float32 for the upstream gradient of each
// row's term; s_kept (consumed: its storage becomes the gradient block) or the blocks again.
std::tuple<Tensor, Tensor> contrastive_backward(const Tensor& grad_rows, const Tensor& a,
                                                const Tensor& b, const Tensor& lse_row,
                                                const Tensor& lse_col, const Tensor& s_kept,
                                                double inv_t, bool symmetric, int64_t block_rows,
                                                std::array<bool, 2> mask) {
  constexpr const char* op = "contrastive_backward";
  TORCH_CHECK(a.dim() == 2 && b.sizes() == a.sizes(), op, ": a and b must be [B, D] of the same shape");
  TORCH_CHECK(block_rows >= 1, op, ": block_rows must be >= 1, got ", block_rows);
  const int64_t n = a.size(0);
  for (const auto& [what, t, want] : {std::tuple{"grad_rows", &grad_rows, n},
                                      std::tuple{"lse_row", &lse_row, n},
                                      std::tuple{"lse_col", &lse_col, symmetric ? n : int64_t(0)}})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == want, op, ": ", what, " must be [", want, "], got ",
                t->sizes());
  const Tensor af = a.to(at::kFloat).contiguous(), bf = b.to(at::kFloat).contiguous();
  const Tensor g = grad_rows.to(at::kFloat).mul(symmetric ? 0.5 : 1.0).contiguous();
  Tensor grad_a = mask[0] ? at::empty_like(af) : at::empty({0}, af.options());
  Tensor grad_b = mask[1] ? at::empty_like(bf) : at::empty({0}, af.options());  // (the first block writes it)
  const std::optional<Tensor> col = symmetric ? std::optional<Tensor>(lse_col) : std::nullopt;
  const bool kept = s_kept.numel() == n * n && n <= block_rows;
  Tensor buf = kept ? s_kept : at::empty({std::min(block_rows, n), n}, af.options());
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t r1 = std::min(n, r0 + block_rows);
    Tensor s = buf.slice(0, 0, r1 - r0);
    if (!kept) at::mm_out(s, af.slice(0, r0, r1), bf.t());
    clip_rows_grad_(s, r0, inv_t, lse_row.slice(0, r0, r1), col, g);  // 1-D slice: contiguous
    if (mask[0]) {
      Tensor out = grad_a.slice(0, r0, r1);
      at::mm_out(out, s, bf);
    }
    if (mask[1] && r0 == 0)
      at::mm_out(grad_b, s.t(), af.slice(0, r0, r1));
    else if (mask[1])
      grad_b.addmm_(s.t(), af.slice(0, r0, r1));
  }
  return {grad_a, grad_b};
}

// contrastive_loss's eager path without class weights: forward, reduction and a C++ autograd
// formula in one op (the Python autograd.Function and its small torch calls were about a third
// of a B = 256 call: 0.55 ms, of which the three GEMMs 0.24; torch profiler, session 15). When
// S is one block the forward hands it to the backward, which consumes it (its storage becomes
// the gradient block); a second backward through a retained graph forms S again.
struct ContrastiveLossFunction : public torch::autograd::Function<ContrastiveLossFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& a, const Tensor& b,
                        double inv_t, bool symmetric, const c10::SymInt& block_rows, int64_t reduction, bool want,
                        bool round_loss) {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastloss::contrastive_forward", "");
    auto out = call_below_autograd(op, {a, b, inv_t, symmetric, block_rows, want});
    ctx->save_for_backward({a, b, out[1].toTensor(), out[2].toTensor()});
    ctx->saved_data["s_kept"] = out[3].toTensor();
    ctx->saved_data["inv_t"] = inv_t;
    ctx->saved_data["symmetric"] = symmetric;
    ctx->saved_data["block_rows"] = block_rows;
    ctx->saved_data["reduction"] = reduction;
    return loss_in(reduce_loss_rows(out[0].toTensor(), reduction), round_loss, a);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    Tensor ga, gb;
    const std::array<bool, 2> need{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    if ((need[0] || need[1]) && grads[0].defined()) {
      static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastloss::contrastive_backward", "");
      const auto saved = ctx->get_saved_variables();
      const Tensor& a = saved[0];
      Tensor s_kept = take_kept_gradient(ctx->saved_data["s_kept"]);  // (consumed by the backward)
      if (!s_kept.defined()) s_kept = at::empty({0, 0}, a.options().dtype(at::kFloat));
      const Tensor g = row_upstream(grads[0], ctx->saved_data["reduction"].toInt(), a.sym_size(0));
      c10::List<bool> mask({need[0], need[1]});
      auto out = call_below_autograd(op, {g, a, saved[1], saved[2], saved[3], s_kept,
                                          ctx->saved_data["inv_t"], ctx->saved_data["symmetric"],
                                          ctx->saved_data["block_rows"], mask});
      if (need[0]) ga = out[0].toTensor().to(a.scalar_type());
      if (need[1]) gb = out[1].toTensor().to(saved[1].scalar_type());
    }
    return once_differentiable(grads, {ga, gb, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()},
                               "contrastive_loss");
  }
};

template <bool Grad>
Tensor contrastive_loss(const Tensor& a, const Tensor& b, double inv_t, bool symmetric,
                        c10::SymInt block_rows, int64_t reduction, bool round_loss) {
  TORCH_CHECK(reduction >= kNone && reduction <= kSum, "contrastive_loss: reduction must be 0 "
              "(none), 1 (mean) or 2 (sum), got ", reduction);
  if constexpr (Grad) {
    const bool want = at::GradMode::is_enabled() && (a.requires_grad() || b.requires_grad());
    return ContrastiveLossFunction::apply(a, b, inv_t, symmetric, block_rows, reduction, want, round_loss);
  }
  const Tensor rows = std::get<0>(
      contrastive_forward(a, b, inv_t, symmetric, block_rows.guard_int(__FILE__, __LINE__), false));
  return loss_in(reduce_loss_rows(rows, reduction), round_loss, a);
}

// grad [B, D] += the gradient for E of sum_ij dS_ij S_ij, S = E E^T, from the block
// s = dS[r0 : r1] (float32): both factors get it. One block (all rows): grad = (dS + dS^T) E,
// written, not added, by one GEMM instead of two (B = 256: the GEMMs are most of a call's time);
// s is overwritten then.
void add_block_pair_grad(Tensor& grad, Tensor& s, const Tensor& ef, int64_t r0, int64_t r1) {
  const int64_t n = ef.size(0);
  if (r1 - r0 < n) {
    Tensor rows = grad.slice(0, r0, r1);
    rows.addmm_(s, ef);
    grad.addmm_(s.t(), ef.slice(0, r0, r1));
    return;
  }
  if (s.is_cpu()) {
    const int64_t tiles = (n + kSymTile - 1) / kSymTile;
    float* sp = s.data_ptr<float>();
    // tile row I holds tiles - I tiles: rows I and tiles - 1 - I together are tiles + 1,
    // so the threads get equal shares of such pairs (parallel_for cuts contiguous ranges)
    at::parallel_for(0, (tiles + 1) / 2, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        symmetrize_add(sp, n, p, p + 1);
        if (tiles - 1 - p != p) symmetrize_add(sp, n, tiles - 1 - p, tiles - p);
      }
    });
  } else {
    s.add_(s.t().clone());
  }
  at::mm_out(grad, s, ef);
}

// f(s, r0, r1) for each block of anchor rows [r0, r1) of S = E E^T (ef: float32 [B, D]), each
// formed into one reused buffer (f may overwrite it); -> the buffer (with one block, S as f
// left it).
template <class F>
Tensor over_similarity_blocks(const Tensor& ef, int64_t block_rows, F&& f) {
  const int64_t n = ef.size(0);
  Tensor buf = at::empty({std::min(block_rows, n), n}, ef.options());
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t r1 = std::min(n, r0 + block_rows);
    Tensor s = buf.slice(0, 0, r1 - r0);
    at::mm_out(s, ef.slice(0, r0, r1), ef.t());
    f(s, r0, r1);
  }
  return buf;
}

// Multi-Similarity's block loops (python/fastloss/ops/metric.py) in C++, as the contrastive
// loss's: blocks of S = E E^T into one reused buffer, ms_rows_ on each. With grad_rows empty
// (the forward): -> (stats [2, B], and with early the gradient for an upstream gradient of 1
// per row, formed from the blocks in hand, else [0]); with grad_rows [B] (the backward): the
// blocks again, each row's d loss / d S scaled by its upstream gradient -> ([0], gradient).
std::tuple<Tensor, Tensor> ms_blocks(const Tensor& e, const Tensor& keys, double alpha,
                                     double beta, double base, std::optional<double> epsilon,
                                     int64_t block_rows, bool early,
                                     const std::optional<Tensor>& grad_rows) {
  TORCH_CHECK(e.dim() == 2 && block_rows >= 1, "multi_similarity_loss: e must be [B, D] and "
              "block_rows >= 1, got ", e.sizes(), " and ", block_rows);
  const Tensor ef = e.to(at::kFloat).contiguous();
  const int64_t n = ef.size(0);
  const bool backward = grad_rows.has_value();
  const bool grads = early || backward;
  Tensor stats = at::empty({backward ? 0 : 2, n}, ef.options());
  Tensor grad = grads ? at::zeros_like(ef) : at::empty({0}, ef.options());
  const Tensor g = backward ? grad_rows->to(at::kFloat).contiguous() : Tensor();
  over_similarity_blocks(ef, block_rows, [&](Tensor& s, int64_t r0, int64_t r1) {
    const Tensor st = ms_rows_(s, keys, r0, alpha, beta, base, epsilon, grads);
    if (!backward) stats.slice(1, r0, r1).copy_(st);
    if (!grads) return;
    if (backward) s.mul_(g.slice(0, r0, r1).unsqueeze(1));
    add_block_pair_grad(grad, s, ef, r0, r1);
  });
  return {stats, grad};
}

// TCM's block loops (python/fastloss/ops/metric.py) in C++, as ms_blocks: blocks of S = E E^T
// into one reused buffer, tcm_rows on each. -> (totals [4] float64 (tcm_rows'), the gradient
// for an upstream gradient of 1 when early and one block holds every row, else [0]; otherwise
// row_ptr [B + 1] and the columns of the hard pairs when they were collected (max_pairs >= 0,
// the CPU) and are at most max_pairs, else [0] and [0]). With one block the gradient is
// formed in the forward: from the block in hand, or from the pair list when the pairs are few
// (B = 1024: 2.6 against 6.9 ms for the dense gradient).
std::tuple<Tensor, Tensor, Tensor, Tensor> tcm_blocks(const Tensor& e, const Tensor& keys,
                                                      double m_pos, double m_neg, double w_pos,
                                                      double w_neg, int64_t block_rows, bool early,
                                                      int64_t max_pairs) {
  TORCH_CHECK(e.dim() == 2 && block_rows >= 1, "tcm_loss: e must be [B, D] and block_rows >= 1, "
              "got ", e.sizes(), " and ", block_rows);
  const Tensor ef = e.to(at::kFloat).contiguous();
  const int64_t n = ef.size(0);
  const auto f64 = ef.options().dtype(at::kDouble);
  const bool one_block = n > 0 && n <= block_rows;
  early = early && one_block;
  bool collect = max_pairs >= 0 && ef.is_cpu();
  Tensor totals = at::zeros({4}, f64);
  std::vector<Tensor> row_nnz, cols;
  int64_t kept = 0;
  Tensor buf = over_similarity_blocks(ef, block_rows, [&](Tensor& s, int64_t r0, int64_t) {
    auto [part, nnz, c] = tcm_rows_op(s, keys, r0, m_pos, m_neg, collect);
    if (ef.is_cpu()) {  // (four host adds, not an op per block)
      double* t = totals.data_ptr<double>();
      const double* p = part.data_ptr<double>();
      for (int k = 0; k < 4; ++k) t[k] += p[k];
    } else {
      totals.add_(part);
    }
    if (!collect) return;
    kept += c.numel();
    collect = kept <= max_pairs;
    if (collect) {
      row_nnz.push_back(nnz);
      cols.push_back(c);
    } else {
      row_nnz.clear();
      cols.clear();
    }
  });
  const Tensor none = at::empty({0}, ef.options());
  Tensor row_ptr = at::empty({0}, f64.dtype(at::kLong)), pairs = at::empty({0}, f64.dtype(at::kInt));
  if (collect) {  // every block's pairs were kept
    row_ptr = at::zeros({n + 1}, row_ptr.options());
    Tensor ends = row_ptr.slice(0, 1);
    if (n) at::cumsum_out(ends, at::cat(row_nnz), 0);
    if (!cols.empty()) pairs = at::cat(cols);
  }
  if (!early) return {totals, none, row_ptr, pairs};
  // d loss / d S for an upstream 1: -w_pos / (hard positives) on them, w_neg / (hard negatives)
  Tensor coef;
  if (ef.is_cpu()) {
    const double* t = totals.data_ptr<double>();
    coef = at::empty({2}, f64);
    coef.data_ptr<double>()[0] = w_pos / std::max(t[1], 1.0);
    coef.data_ptr<double>()[1] = w_neg / std::max(t[3], 1.0);
  } else {  // (on the device: no wait for the totals)
    coef = totals.slice(0, 1, 4, 2).clamp_min(1.0).reciprocal_();
    coef.select(0, 0).mul_(w_pos);
    coef.select(0, 1).mul_(w_neg);
  }
  Tensor grad;
  if (collect) {
    coef.select(0, 0).neg_();  // pair_grad's signed coefficients
    grad = pair_grad(ef, keys, row_ptr, pairs, coef);
  } else {
    tcm_rows_grad_(buf, keys, 0, m_pos, m_neg, coef);
    grad = at::empty_like(ef);
    add_block_pair_grad(grad, buf, ef, 0, n);
  }
  return {totals, grad, at::empty({0}, row_ptr.options()), at::empty({0}, pairs.options())};
}

// TCM's backward over blocks formed again: d S = -coef[0] on hard positives, +coef[1] on hard
// negatives (coef: float64 [2] on e's device) -> the gradient for E.
Tensor tcm_blocks_backward(const Tensor& e, const Tensor& keys, double m_pos, double m_neg,
                           int64_t block_rows, const Tensor& coef) {
  TORCH_CHECK(e.dim() == 2 && block_rows >= 1, "tcm_loss: e must be [B, D] and block_rows >= 1, "
              "got ", e.sizes(), " and ", block_rows);
  const Tensor ef = e.to(at::kFloat).contiguous();
  Tensor grad = at::zeros_like(ef);
  over_similarity_blocks(ef, block_rows, [&](Tensor& s, int64_t r0, int64_t r1) {
    tcm_rows_grad_(s, keys, r0, m_pos, m_neg, coef);
    add_block_pair_grad(grad, s, ef, r0, r1);
  });
  return grad;
}

// float32 CPU [B, D] x -> (x's rows at unit length as F.normalize makes them, their norms [B])
std::tuple<Tensor, Tensor> unit_rows_op(const Tensor& x_in) {
  TORCH_CHECK(x_in.is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2, "unit_rows: x "
              "must be a float32 CPU [B, D] tensor, got ", x_in.scalar_type(), " ", x_in.sizes(),
              " on ", x_in.device());
  // rows at any stride are read in place (a column stride other than 1 is copied first)
  const Tensor x = x_in.size(1) <= 1 || x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1), ld = x.stride(0);
  Tensor e = at::empty({n, d}, x.options()), norms = at::empty({n}, x.options());
  const float* xp = x.data_ptr<float>();
  float* ep = e.data_ptr<float>();
  float* np = norms.data_ptr<float>();
  // one thread up to ~64k elements: waking the second costs more than the rows take
  at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(d, 1)),
                   [&](int64_t r0, int64_t r1) { unit_rows(xp, ld, d, ep, np, r0, r1); });
  return {e, norms};
}

// -> the gradient for x of sum(grad_e * e), (e, norms) = unit_rows(x)
Tensor unit_rows_grad_op(const Tensor& grad_e, const Tensor& e_in, const Tensor& norms) {
  constexpr const char* op = "unit_rows_grad";
  TORCH_CHECK(e_in.is_cpu() && e_in.scalar_type() == at::kFloat && e_in.dim() == 2, op, ": e must "
              "be a float32 CPU [B, D] tensor, got ", e_in.scalar_type(), " ", e_in.sizes(), " on ",
              e_in.device());
  TORCH_CHECK(grad_e.is_cpu() && grad_e.scalar_type() == at::kFloat && grad_e.sizes() == e_in.sizes(),
              op, ": grad_e must be a float32 CPU tensor of e's shape ", e_in.sizes(), ", got ",
              grad_e.scalar_type(), " ", grad_e.sizes(), " on ", grad_e.device());
  const int64_t n = e_in.size(0), d = e_in.size(1);
  check_vector(norms, n, at::kFloat, op, "norms");
  const Tensor e = e_in.contiguous(), g = grad_e.contiguous();
  Tensor out = at::empty_like(e);
  const float* gp = g.data_ptr<float>();
  const float* ep = e.data_ptr<float>();
  const float* np = norms.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 65536 / std::max<int64_t>(d, 1)),
                   [&](int64_t r0, int64_t r1) { unit_rows_grad(gp, ep, np, d, op_, r0, r1); });
  return out;
}

// -> [rows, k] int64: each row's k nearest columns by squared distance (knn_rows)
Tensor knn_rows_op(const Tensor& s_in, const Tensor& row_sq, const Tensor& col_sq, int64_t row0,
                   bool exclude_self, int64_t k) {
  constexpr const char* op = "knn_rows";
  Tensor s = s_in;
  const SimBlock q = sim_block(s, nullptr, row0, op, exclude_self, /*cuda=*/true);
  check_vector(row_sq, q.rows, at::kFloat, op, "row_sq", s.device());
  check_vector(col_sq, q.n, at::kFloat, op, "col_sq", s.device());
  TORCH_CHECK(k >= 1 && k <= kKnnMax && k <= q.n - (exclude_self ? 1 : 0), op, ": k must be in [1, ",
              std::min<int64_t>(kKnnMax, q.n - (exclude_self ? 1 : 0)), "], got ", k);
  // (the CUDA selection packs a column into the low 32 bits of its key)
  TORCH_CHECK(q.n < (int64_t(1) << 31), op, ": at most 2^31 - 1 columns, got ", q.n);
  Tensor idx = at::empty({q.rows, k}, s.options().dtype(at::kLong));
  int64_t* out = idx.data_ptr<int64_t>();
  if (s.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(s.device());
    check_cuda_launch(knn_rows_cuda(q, row_sq.data_ptr<float>(), col_sq.data_ptr<float>(), exclude_self, k,
                                    out, cuda_stream()), op);
#endif
    return idx;
  }
  at::parallel_for(0, q.rows, row_grain(q.n), [&](int64_t r0, int64_t r1) {
    knn_rows(q, row_sq.data_ptr<float>(), col_sq.data_ptr<float>(), exclude_self, k, out, r0, r1);
  });
  return idx;
}

// x [N, d], t [M, d] float32 contiguous, idx [N, n_nb] int64 with values in [0, M), all on one
// device (the CPU, or CUDA in a CUDA build). The values of idx are checked on the CPU; on
// CUDA (where that would wait for the device) an index out of range gives NaN distances.
void check_neighbours(const Tensor& x, const Tensor& t, const Tensor& idx, const char* op) {
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), op, ": x must be on the CPU or a CUDA device, got ",
              x.device());
  for (const auto& [what, a] : {std::pair{"x", &x}, std::pair{"t", &t}})
    TORCH_CHECK(a->scalar_type() == at::kFloat && a->dim() == 2 && a->is_contiguous() &&
                    a->device() == x.device(),
                op, ": ", what, " must be a contiguous float32 [rows, d] tensor on ", x.device(),
                ", got ", a->scalar_type(), " ", a->sizes(), " on ", a->device());
  TORCH_CHECK(t.size(1) == x.size(1), op, ": t has ", t.size(1), " features but x has ", x.size(1));
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.size(0) == x.size(0) &&
                  idx.is_contiguous() && idx.device() == x.device(),
              op, ": idx must be a contiguous int64 [", x.size(0), ", n] tensor on ", x.device(),
              ", got ", idx.scalar_type(), " ", idx.sizes(), " on ", idx.device());
  if (!idx.is_cpu()) return;
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t k = 0; k < idx.numel(); ++k)
    TORCH_CHECK(ip[k] >= 0 && ip[k] < t.size(0), op, ": idx holds ", ip[k], ", not a row of t [0, ",
                t.size(0), ")");
}

int64_t feature_grain(int64_t d, int64_t per_row) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(d * per_row, 1));
}

// -> [N, n]: sqrt(||x_i - t_idx[i,c]||^2 + eps)
Tensor neighbour_dist_op(const Tensor& x, const Tensor& t, const Tensor& idx, double eps) {
  check_neighbours(x, t, idx, "neighbour_dist");
  const int64_t n = x.size(0), d = x.size(1), nb = idx.size(1);
  Tensor dist = at::empty({n, nb}, x.options());
  if (x.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(x.device());
    check_cuda_launch(neighbour_dist_cuda(x.data_ptr<float>(), t.data_ptr<float>(), d,
                                          idx.data_ptr<int64_t>(), n, nb, t.size(0), float(eps),
                                          dist.data_ptr<float>(), cuda_stream()),
                      "neighbour_dist");
#endif
    return dist;
  }
  at::parallel_for(0, n, feature_grain(d, nb), [&](int64_t r0, int64_t r1) {
    neighbour_dist(x.data_ptr<float>(), t.data_ptr<float>(), d, idx.data_ptr<int64_t>(), nb,
                   float(eps), dist.data_ptr<float>(), r0, r1);
  });
  return dist;
}

// -> (grad_x [N, d] or [0], grad_t [M, d] or [0]) of sum grad_dist * dist
std::tuple<Tensor, Tensor> neighbour_dist_backward(const Tensor& grad_dist, const Tensor& x,
                                                   const Tensor& t, const Tensor& idx,
                                                   const Tensor& dist,
                                                   std::array<bool, 2> mask) {
  constexpr const char* op = "neighbour_dist_backward";
  check_neighbours(x, t, idx, op);
  TORCH_CHECK(grad_dist.sizes() == idx.sizes() && dist.sizes() == idx.sizes(), op,
              ": grad_dist and dist must be ", idx.sizes(), ", got ", grad_dist.sizes(), " and ",
              dist.sizes());
  const int64_t n = x.size(0), m = t.size(0), d = x.size(1), nb = idx.size(1);
  const Tensor w = at::div(grad_dist.to(at::kFloat), dist.to(at::kFloat)).contiguous();
  const float *xp = x.data_ptr<float>(), *tp = t.data_ptr<float>(), *wp = w.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  Tensor grad_x = at::empty({mask[0] ? n : 0, d}, x.options());
  Tensor grad_t = at::empty({mask[1] ? m : 0, d}, x.options());
  if (x.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(x.device());
    if (mask[0])
      check_cuda_launch(neighbour_dist_grad_x_cuda(xp, tp, d, ip, n, nb, m, wp, grad_x.data_ptr<float>(),
                                                   cuda_stream()), op);
    if (mask[1] && m > 0 && m * n <= (int64_t(1) << 24)) {
      // few targets (Proto-Triplet's prototypes): each target's pair list is long, and the
      // kernel below walks a list per thread; as a dense [n, m] weight matrix the sum is a
      // GEMM: grad_t[j] = (sum_p w_p) t_j - sum_p w_p x_{i(p)}. Indices outside [0, m) add 0
      // (exact in any order: the result does not depend on scatter_add's order). Unlike the
      // kernel, a non-finite row of x reaches every target through the GEMM (0 x inf), and
      // cuBLAS follows torch's TF32 setting for it. Both sets shifted by the targets' mean
      // first (the same gradient): the two terms cancel for embeddings far from the origin
      // (offset 10, spread 0.01: 5e-5 off in float32, 25% with TF32 inputs, emulated).
      const Tensor valid = idx.ge(0).logical_and(idx.lt(m));
      const Tensor wm = at::zeros({n, m}, w.options())
                            .scatter_add_(1, idx.clamp(0, m - 1), at::where(valid, w, 0.0));
      const Tensor mu = t.mean(0, /*keepdim=*/true);
      grad_t.copy_(at::sub(t, mu).mul_(wm.sum(0).unsqueeze(1)).sub_(at::mm(wm.t(), at::sub(x, mu))));
    } else if (mask[1]) {  // the pairs by target (a stable sort on the device), as the CPU's lists
      const Tensor flat = idx.flatten();
      const Tensor pairs = at::argsort(flat, /*stable=*/true);
      const Tensor t_ptr = at::searchsorted(flat.index_select(0, pairs),
                                            at::arange(m + 1, idx.options()));
      check_cuda_launch(neighbour_dist_grad_t_cuda(xp, tp, d, t_ptr.data_ptr<int64_t>(),
                                                   pairs.data_ptr<int64_t>(), m, nb, wp,
                                                   grad_t.data_ptr<float>(), cuda_stream()), op);
    }
#endif
    return {grad_x, grad_t};
  }
  if (mask[0])
    at::parallel_for(0, n, feature_grain(d, nb), [&](int64_t r0, int64_t r1) {
      neighbour_dist_grad_x(xp, tp, d, ip, nb, wp, grad_x.data_ptr<float>(), r0, r1);
    });
  if (mask[1]) {  // the pairs by target row (a counting sort), then row-parallel: no atomics
    std::vector<int64_t> t_ptr, pairs;
    group_by_key(m, n * nb, [&](auto&& f) {
      for (int64_t p = 0; p < n * nb; ++p) f(ip[p], p);
    }, t_ptr, pairs);
    at::parallel_for(0, m, feature_grain(d, std::max<int64_t>(1, n * nb / std::max<int64_t>(m, 1))),
                     [&](int64_t r0, int64_t r1) {
      neighbour_dist_grad_t(xp, tp, d, t_ptr.data(), pairs.data(), nb, wp,
                            grad_t.data_ptr<float>(), r0, r1);
    });
  }
  return {grad_x, grad_t};
}

// -> (loss [] float32, grad_d [N, n] float32): icnn_score.h
std::tuple<Tensor, Tensor> icnn_score_op(const Tensor& d, const Tensor& same, int64_t k,
                                         bool clipped) {
  constexpr const char* op = "icnn_score";
  TORCH_CHECK(d.is_cpu() || d.is_cuda(), op, ": d must be on the CPU or a CUDA device, got ",
              d.device());
  TORCH_CHECK(d.scalar_type() == at::kFloat && d.dim() == 2 && d.is_contiguous(), op,
              ": d must be a contiguous float32 [N, n] tensor, got ", d.scalar_type(), " ", d.sizes());
  TORCH_CHECK(same.scalar_type() == at::kBool && same.sizes() == d.sizes() && same.is_contiguous() &&
                  same.device() == d.device(),
              op, ": same must be a contiguous bool tensor of d's shape ", d.sizes(), " on ", d.device());
  TORCH_CHECK(d.size(0) >= 1 && k >= 1 && k <= d.size(1), op, ": need N >= 1 and k in [1, n = ",
              d.size(1), "], got N = ", d.size(0), ", k = ", k);
  Tensor grad = at::empty(d.sizes(), d.options());
  if (d.is_cuda()) {
#if defined(FASTLOSS_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(d.device());
    Tensor loss = at::empty({}, d.options());
    const Tensor scratch = at::empty({icnn_score_cuda_scratch(d.size(0))}, d.options().dtype(at::kDouble));
    check_cuda_launch(icnn_score_cuda(d.data_ptr<float>(), same.data_ptr<bool>(), d.size(0), d.size(1), k,
                                      clipped, grad.data_ptr<float>(), loss.data_ptr<float>(),
                                      scratch.data_ptr<double>(), cuda_stream()), op);
    return {loss, grad};
#endif
  }
  const double loss = icnn_score(d.data_ptr<float>(), same.data_ptr<bool>(), d.size(0), d.size(1),
                                 k, clipped, grad.data_ptr<float>());
  return {at::full({}, loss, d.options()), grad};
}

// ||c||^2 - 2 <q, c> for every query and prototype (the squared distance less ||q||^2: the
// nearest prototype by one GEMM), both shifted by the prototypes' mean first (distances do not
// change): embeddings sharing an offset far larger than their spread (offset 10, spread 0.01)
// had lost the spread to rounding and 27 of 64 negatives were wrong.
Tensor negative_scores(const Tensor& qf, const Tensor& protos) {
  const Tensor mu = protos.mean(0, /*keepdim=*/true);
  const Tensor pc = at::sub(protos, mu);
  return at::addmm(pc.square().sum(1).unsqueeze(0), at::sub(qf, mu), pc.t(), 1, -2);
}

// proto_triplet_forward's CPU path when the support's labels span a small range (else
// nullopt): classes, prototypes, negatives and the hinge in loops, the scores one GEMM.
std::optional<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>> proto_triplet_forward_cpu(
    const Tensor& qf, const Tensor& query_labels, const Tensor& sf, const Tensor& support_labels,
    double margin, const char* op) {
  const int64_t Q = qf.size(0), S = sf.size(0), D = qf.size(1);
  TORCH_CHECK(query_labels.dim() == 1 && query_labels.size(0) == Q && query_labels.is_cpu() &&
                  support_labels.dim() == 1 && support_labels.size(0) == S && support_labels.is_cpu() &&
                  sf.size(1) == D,
              op, ": query_labels must be [", Q, "] and support_labels [", S, "] CPU tensors and "
              "support [S, ", D, "], got ", query_labels.sizes(), ", ", support_labels.sizes(), ", ",
              sf.sizes());
  const Tensor sl = support_labels.to(at::kLong).contiguous(), ql = query_labels.to(at::kLong).contiguous();
  std::vector<int64_t> classes;
  std::vector<float> counts_v;
  Tensor inverse = at::empty({S}, sl.options());
  if (!proto_classes(sl.data_ptr<int64_t>(), S, classes, inverse.data_ptr<int64_t>(), counts_v))
    return std::nullopt;
  const int64_t K = int64_t(classes.size());
  TORCH_CHECK(K >= 2, op, ": the support needs at least two classes, got ", K);
  Tensor pos = at::empty({Q}, sl.options());
  const int64_t* qp = ql.data_ptr<int64_t>();
  int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < Q; ++i) {
    const auto it = std::lower_bound(classes.begin(), classes.end(), qp[i]);
    TORCH_CHECK(it != classes.end() && *it == qp[i], op, ": every query label must be a class of the support");
    pp[i] = int64_t(it - classes.begin());
  }
  Tensor counts = at::empty({K}, qf.options());
  std::copy(counts_v.begin(), counts_v.end(), counts.data_ptr<float>());
  Tensor protos = at::empty({K, D}, qf.options());
  // features split among the threads (a row's 64-feature pieces: whole cache lines)
  at::parallel_for(0, (D + 63) / 64, std::max<int64_t>(1, 65536 / std::max<int64_t>(64 * S, 1)),
                   [&](int64_t p0, int64_t p1) {
                     proto_means(sf.data_ptr<float>(), inverse.data_ptr<int64_t>(), counts_v.data(), S, K, D,
                                 p0 * 64, std::min(D, p1 * 64), protos.data_ptr<float>());
                   });
  const Tensor score = negative_scores(qf, protos);
  Tensor idx = at::empty({Q, 2}, sl.options());
  proto_negatives(score.data_ptr<float>(), pp, Q, K, idx.data_ptr<int64_t>());
  const Tensor dist = neighbour_dist_op(qf, protos, idx, 1e-6);
  const Tensor loss = at::full({}, proto_hinge_mean(dist.data_ptr<float>(), Q, margin), qf.options());
  return std::make_tuple(loss, protos, idx, dist, inverse, counts);
}

// Proto-Triplet (python/fastloss/ops/few_shot.py) on the CPU as one op, its ~20 small steps
// called from C++ (at B = 1024 the same steps from Python cost more than their work): classes
// of the support, prototypes, each query's nearest other prototype by one GEMM on
// ||c||^2 - 2 <q, c>, the two chosen distances (neighbour_dist), the mean hinge.
// -> (loss [] float32, protos [K, D] float32, idx [Q, 2] int64 (positive, negative prototype),
// dist [Q, 2] float32, inverse [S] int64 (each support row's class), counts [K] float32)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> proto_triplet_forward(
    const Tensor& query, const Tensor& query_labels, const Tensor& support,
    const Tensor& support_labels, double margin) {
  constexpr const char* op = "proto_triplet_loss";
  TORCH_CHECK(query.device() == support.device(), op, ": query is on ", query.device(),
              " but support is on ", support.device());
  const Tensor qf = query.to(at::kFloat).contiguous(), sf = support.to(at::kFloat).contiguous();
  if (qf.is_cpu()) {  // labels of a small range: the bookkeeping in loops (proto_triplet.h)
    auto out = proto_triplet_forward_cpu(qf, query_labels, sf, support_labels, margin, op);
    if (out.has_value()) return *out;
  }
  const auto [classes_in, inverse, counts_i] = at::_unique2(support_labels, true, true, true);
  const int64_t k = classes_in.numel();
  TORCH_CHECK(k >= 2, op, ": the support needs at least two classes, got ", k);
  // int64 for both: narrowing the query labels to a smaller support dtype could wrap an
  // invalid label onto a class
  const Tensor classes = classes_in.to(at::kLong), ql = query_labels.to(at::kLong).contiguous();
  const Tensor pos = at::searchsorted(classes, ql).clamp_max(k - 1);
  TORCH_CHECK(at::equal(classes.index_select(0, pos), ql), op,
              ": every query label must be a class of the support");
  const Tensor counts = counts_i.to(at::kFloat);
  const Tensor protos =
      at::zeros({k, qf.size(1)}, qf.options()).index_add_(0, inverse, sf).div_(counts.unsqueeze(1));
  Tensor score = negative_scores(qf, protos);
  score.scatter_(1, pos.unsqueeze(1), std::numeric_limits<float>::infinity());
  const Tensor idx = at::stack({pos, score.argmin(1)}, 1).contiguous();
  const Tensor dist = neighbour_dist_op(qf, protos, idx, 1e-6);
  const Tensor loss = at::sub(dist.select(1, 0), dist.select(1, 1)).add_(margin).clamp_min_(0).mean();
  return {loss, protos, idx, dist, inverse, counts};
}

// d (g * mean hinge) / d query and / d support on the CPU (proto_triplet.h's loops): the
// queries in T contiguous parts, each part's prototype terms in its own [K, D] buffer, summed
// in part order (the same bits for any thread count that gives the same T), then handed to the
// support rows. `own`: the support is the query set, its gradient added to grad_query's rows.
std::tuple<Tensor, Tensor> proto_triplet_grads_cpu(const Tensor& qf, const Tensor& protos, const Tensor& idx,
                                                   const Tensor& dist, const Tensor& inverse,
                                                   const Tensor& counts, double margin, float g, bool own) {
  const int64_t Q = qf.size(0), D = qf.size(1), K = protos.size(0), S = inverse.numel();
  // parts of about 64 queries or more, at most one per thread, their buffers within 64 MiB
  const int64_t by_budget = std::max<int64_t>(1, (int64_t(64) << 20) / std::max<int64_t>(4 * K * D, 1));
  const int64_t T = std::clamp<int64_t>(std::min<int64_t>(at::get_num_threads(), (Q + 63) / 64), 1, by_budget);
  Tensor grad_q = at::empty({Q, D}, qf.options());
  Tensor grad_s = own ? at::empty({0, D}, qf.options()) : at::empty({S, D}, qf.options());
  Tensor parts = at::zeros({T, K, D}, qf.options());
  float* pp = parts.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      proto_query_grads(qf.data_ptr<float>(), protos.data_ptr<float>(), idx.data_ptr<int64_t>(),
                        dist.data_ptr<float>(), Q, D, margin, g, Q * t / T, Q * (t + 1) / T,
                        grad_q.data_ptr<float>(), pp + t * K * D);
  });
  add_rows_in_order(pp + K * D, T - 1, K * D, [&](int64_t) { return pp; });  // into part 0
  float* out = own ? grad_q.data_ptr<float>() : grad_s.data_ptr<float>();
  at::parallel_for(0, S, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t j0, int64_t j1) {
    proto_support_grads(pp, inverse.data_ptr<int64_t>(), counts.data_ptr<float>(), D, j0, j1, own, out);
  });
  return {grad_q, grad_s};
}

// -> (grad_query [Q, D], grad_support [S, D]) float32 of the mean hinge: each active query's
// w = grad / Q on its positive's distance and -w on its negative's, through neighbour_dist's
// backward, the prototypes' part divided by their counts and handed to their support rows.
// own: the query set was its own support; grad_query then holds both parts (its rows are the
// support's) and grad_support is [0, D].
std::tuple<Tensor, Tensor> proto_triplet_backward(const Tensor& grad, const Tensor& query,
                                                  const Tensor& protos, const Tensor& idx,
                                                  const Tensor& dist, const Tensor& inverse,
                                                  const Tensor& counts, double margin, bool own) {
  const Tensor qf = query.to(at::kFloat).contiguous();
  TORCH_CHECK(!own || inverse.numel() == qf.size(0), "proto_triplet_backward: own needs the support to be "
              "the query set (", qf.size(0), " rows), got ", inverse.numel(), " support rows");
  if (qf.is_cpu()) {  // the loops of proto_triplet.h, on the forward's outputs (checked: the op is public)
    constexpr const char* op = "proto_triplet_backward";
    const int64_t Q = qf.size(0), D = qf.size(1), K = protos.size(0);
    TORCH_CHECK(grad.numel() == 1 && protos.dim() == 2 && protos.size(1) == D &&
                    protos.scalar_type() == at::kFloat && idx.sizes() == at::IntArrayRef({Q, 2}) &&
                    idx.scalar_type() == at::kLong && dist.sizes() == idx.sizes() &&
                    dist.scalar_type() == at::kFloat && inverse.dim() == 1 &&
                    inverse.scalar_type() == at::kLong && counts.sizes() == at::IntArrayRef({K}) &&
                    counts.scalar_type() == at::kFloat && protos.is_cpu() && idx.is_cpu() &&
                    dist.is_cpu() && inverse.is_cpu() && counts.is_cpu(),
                op, ": the arguments must be proto_triplet_forward's outputs for this query");
    const Tensor pc = protos.contiguous(), ic = idx.contiguous(), dc = dist.contiguous(),
                 vc = inverse.contiguous(), cc = counts.contiguous();
    for (const Tensor* t : {&ic, &vc}) {
      const int64_t* v = t->data_ptr<int64_t>();
      for (int64_t e = 0; e < t->numel(); ++e)
        TORCH_CHECK(v[e] >= 0 && v[e] < K, op, ": a class index outside [0, ", K, ")");
    }
    return proto_triplet_grads_cpu(qf, pc, ic, dc, vc, cc, margin, grad.to(at::kFloat).item<float>(), own);
  }
  const Tensor hinge = at::sub(dist.select(1, 0), dist.select(1, 1)).add_(margin);
  const Tensor w = hinge.gt(0).to(at::kFloat).mul_(grad.to(at::kFloat).div(std::max<int64_t>(1, qf.size(0))));
  const Tensor grad_dist = at::stack({w, w.neg()}, 1).contiguous();
  auto [grad_q, grad_c] = neighbour_dist_backward(grad_dist, qf, protos, idx, dist, {true, true});
  Tensor grad_s = grad_c.div_(counts.unsqueeze(1)).index_select(0, inverse);
  if (!own) return {grad_q, grad_s};
  return {grad_q.add_(grad_s), at::empty({0, qf.size(1)}, qf.options())};
}

}  // namespace
}  // namespace fastloss

namespace fastloss {
namespace {
// The ops with CPU and CUDA kernels, then those with CPU kernels only.
void register_impls(torch::Library& m) {
  m.impl("mw_auc_forward", &mw_auc_forward);
  m.impl("mw_auc_loss", &mw_auc_loss<false>);
  m.impl("pair_label_keys", &pair_label_keys);
  m.impl("ms_rows_", &ms_rows_);
  m.impl("tcm_rows", &tcm_rows_op);
  m.impl("tcm_rows_grad_", &tcm_rows_grad_);
  m.impl("clip_rows", &clip_rows_op);
  m.impl("clip_rows_grad_", &clip_rows_grad_);
  m.impl("contrastive_forward", &contrastive_forward);
  m.impl("contrastive_backward", &contrastive_backward);
  m.impl("contrastive_loss", &contrastive_loss<false>);
  m.impl("ms_blocks", &ms_blocks);
  m.impl("tcm_blocks", &tcm_blocks);
  m.impl("tcm_blocks_backward", &tcm_blocks_backward);
  m.impl("knn_rows", &knn_rows_op);
  m.impl("neighbour_dist", &neighbour_dist_op);
  m.impl("neighbour_dist_backward", &neighbour_dist_backward);
  m.impl("icnn_score", &icnn_score_op);
  m.impl("proto_triplet_forward", &proto_triplet_forward);
  m.impl("proto_triplet_backward", &proto_triplet_backward);
}
void register_cpu_only(torch::Library& m) {
  m.impl("pair_grad", &pair_grad);
  m.impl("unit_rows", &unit_rows_op);
  m.impl("unit_rows_grad", &unit_rows_grad_op);
}
}  // namespace
}  // namespace fastloss

TORCH_LIBRARY_IMPL(fastloss, Autograd, m) {
  m.impl("mw_auc_loss", &fastloss::mw_auc_loss<true>);
  m.impl("contrastive_loss", &fastloss::contrastive_loss<true>);
}

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  fastloss::register_impls(m);
  fastloss::register_cpu_only(m);
}
#if defined(FASTLOSS_WITH_CUDA)
TORCH_LIBRARY_IMPL(fastloss, CUDA, m) { fastloss::register_impls(m); }
#endif
