// Every op's schema, in one place. Kernels are registered per device next to each family's
// op file (losses/losses_op.cpp); autograd and fake kernels in python/fastloss/ops/.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace {

// Autocast (torch.autocast) stops at each fastloss op: the op runs with autocast off for all
// that it calls. Without this, the GEMMs inside an op (at::mm of its float32 work tensors,
// cuBLAS through addmm) were recast to the autocast dtype, which either failed ("expected
// scalar type Float", proto_triplet_loss) or silently dropped the op's float32 arithmetic to
// 8 significant bits. What an op takes and returns under autocast is decided at its Python
// entry (python/fastloss/ops/_dtypes.py), as torch decides it per op.
void run_without_autocast(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

void register_autocast_stops(torch::Library& m) {
  for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name.rfind("fastloss::", 0) != 0) continue;
    for (auto key : {c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA})
      m.impl(name.name.c_str(),
             torch::dispatch(key, torch::CppFunction::makeFromBoxedFunction<&run_without_autocast>()));
  }
}

}  // namespace

TORCH_LIBRARY(fastloss, m) {
  // Row losses over logits [N, C] with targets [N]. The forward returns the weighted loss of
  // each row (float32 [N], 0 for ignored rows) and two float32 [N] statistics its backward
  // reuses; the backward takes d(total)/d(row loss) and returns d(total)/d(logits).
  // inplace_backward only tells the autograd formula (python/fastloss/ops/losses.py) to use
  // the *_backward_ op, which writes the gradient over the logits.
  m.def("cross_entropy_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
        "float label_smoothing, float lse_square_scale, float softcap, "
        "bool inplace_backward=False) -> (Tensor, Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
        "Tensor stat0, Tensor stat1, int ignore_index, float label_smoothing, "
        "float lse_square_scale, float softcap) -> Tensor");
  m.def("comp_sum_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
        "float tau, bool inplace_backward=False) -> (Tensor, Tensor, Tensor)");
  m.def("comp_sum_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
        "Tensor stat0, Tensor stat1, int ignore_index, float tau) -> Tensor");
  m.def("ldr_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float lam, "
        "float margin, bool adaptive, float alpha, bool inplace_backward=False) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("ldr_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
        "Tensor stat0, Tensor stat1, int ignore_index, float lam, float margin, bool adaptive, "
        "float alpha) -> Tensor");
  m.def("spherical_z_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
        "float a, float b, float eps, bool inplace_backward=False) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("spherical_z_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
        "Tensor stat0, Tensor stat1, int ignore_index, float a, float b, float eps) -> Tensor");
  m.def("stablemax_forward(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
        "bool inplace_backward=False) -> (Tensor, Tensor, Tensor)");
  m.def("stablemax_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
        "Tensor stat0, Tensor stat1, int ignore_index) -> Tensor");
  // The Python autograd formulas' refusal of a second differentiation (losses_op.cpp,
  // once_differentiable; fastloss/ops/_autograd.py): the gradients again, marked to raise
  // "<op>: double backward ... is not supported" when differentiated, while grad mode is on.
  m.def("_refuse_second_order(Tensor[] grads, Tensor[] incoming, str op) -> Tensor[]");
  // The eager path of the public functions: forward, reduction (0 none, 1 mean, 2 sum) and a
  // C++ autograd formula in one op (losses_op.cpp). The loss is float32, or in the logits'
  // dtype with round_loss (what the Python functions ask for outside autocast: _dtypes.py).
  m.def("cross_entropy_loss(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
        "int reduction, float label_smoothing, float lse_square_scale, float softcap, "
        "bool inplace_backward=False, bool grad_in_forward=False, *, bool round_loss=False) -> Tensor");
  m.def("comp_sum_loss(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
        "int reduction, float tau, bool inplace_backward=False, bool grad_in_forward=False, *, "
        "bool round_loss=False) -> Tensor");
  m.def("ldr_loss(Tensor logits, Tensor target, Tensor? weight, int ignore_index, int reduction, "
        "float lam, float margin, bool adaptive, float alpha, bool inplace_backward=False, "
        "bool grad_in_forward=False, *, bool round_loss=False) -> Tensor");
  m.def("spherical_z_loss(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
        "int reduction, float a, float b, float eps, bool inplace_backward=False, "
        "bool grad_in_forward=False, *, bool round_loss=False) -> Tensor");
  m.def("stablemax_loss(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
        "int reduction, bool inplace_backward=False, bool grad_in_forward=False, *, "
        "bool round_loss=False) -> Tensor");
  // Forward and gradient in one pass over the logits (grad_in_forward=True): grad_loss is
  // d(total)/d(row loss), known before the call. Returns (row loss, stat0, stat1, gradient).
  m.def("cross_entropy_forward_grad(Tensor grad_loss, Tensor logits, Tensor target, "
        "Tensor? weight, int ignore_index, float label_smoothing, float lse_square_scale, "
        "float softcap) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("comp_sum_forward_grad(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
        "int ignore_index, float tau) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("ldr_forward_grad(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
        "int ignore_index, float lam, float margin, bool adaptive, float alpha) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("spherical_z_forward_grad(Tensor grad_loss, Tensor logits, Tensor target, "
        "Tensor? weight, int ignore_index, float a, float b, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("stablemax_forward_grad(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, "
        "int ignore_index) -> (Tensor, Tensor, Tensor, Tensor)");
  // The same writing the gradient over the logits (grad_in_forward=True with
  // inplace_backward=True): no [N, C] allocation at all. Returns (row loss, stat0, stat1).
  m.def("cross_entropy_forward_grad_(Tensor grad_loss, Tensor(a!) logits, Tensor target, "
        "Tensor? weight, int ignore_index, float label_smoothing, float lse_square_scale, "
        "float softcap) -> (Tensor, Tensor, Tensor)");
  m.def("comp_sum_forward_grad_(Tensor grad_loss, Tensor(a!) logits, Tensor target, "
        "Tensor? weight, int ignore_index, float tau) -> (Tensor, Tensor, Tensor)");
  m.def("ldr_forward_grad_(Tensor grad_loss, Tensor(a!) logits, Tensor target, Tensor? weight, "
        "int ignore_index, float lam, float margin, bool adaptive, float alpha) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("spherical_z_forward_grad_(Tensor grad_loss, Tensor(a!) logits, Tensor target, "
        "Tensor? weight, int ignore_index, float a, float b, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("stablemax_forward_grad_(Tensor grad_loss, Tensor(a!) logits, Tensor target, "
        "Tensor? weight, int ignore_index) -> (Tensor, Tensor, Tensor)");
  // The same backwards writing the gradient over the logits (opt-in, inplace_backward=True):
  // no [N, C] allocation, at the price of destroying the logits.
  m.def("cross_entropy_backward_(Tensor grad_loss, Tensor(a!) logits, Tensor target, "
        "Tensor? weight, "
        "Tensor stat0, Tensor stat1, int ignore_index, float label_smoothing, "
        "float lse_square_scale, float softcap) -> ()");
  m.def("comp_sum_backward_(Tensor grad_loss, Tensor(a!) logits, Tensor target, Tensor? weight, "
        "Tensor stat0, Tensor stat1, int ignore_index, float tau) -> ()");
  m.def("ldr_backward_(Tensor grad_loss, Tensor(a!) logits, Tensor target, Tensor? weight, "
        "Tensor stat0, Tensor stat1, int ignore_index, float lam, float margin, bool adaptive, "
        "float alpha) -> ()");
  m.def("spherical_z_backward_(Tensor grad_loss, Tensor(a!) logits, Tensor target, "
        "Tensor? weight, "
        "Tensor stat0, Tensor stat1, int ignore_index, float a, float b, float eps) -> ()");
  m.def("stablemax_backward_(Tensor grad_loss, Tensor(a!) logits, Tensor target, Tensor? weight, "
        "Tensor stat0, Tensor stat1, int ignore_index) -> ()");

  // Linear layer + row loss (linear_losses/linear_losses_op.cpp): the loss of
  // `<kind>(hidden @ weight.T + bias, target)` computed block by block, never forming [N, V].
  // kind: 0 cross_entropy, 1 comp_sum, 2 ldr, 3 spherical_z, 4 stablemax; `scalars` are that
  // loss's op scalars after ignore_index (bools as 0/1). grad_mask: (hidden, weight, bias).
  // The forward also returns the gradients of sum(row loss) where grad_mask asks (grad_weight
  // and grad_bias in float32), so that a mean/sum loss needs no second pass.
  m.def("linear_loss_forward(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, "
        "Tensor? class_weight, int kind, float[] scalars, int ignore_index, bool[3] grad_mask, "
        "int block_rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("linear_loss_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor target, "
        "Tensor? bias, Tensor? class_weight, Tensor stat0, Tensor stat1, int kind, "
        "float[] scalars, int ignore_index, bool[3] grad_mask, int block_rows) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("linear_loss(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, "
        "Tensor? class_weight, int kind, float[] scalars, int ignore_index, int reduction, "
        "int block_rows, *, bool round_loss=False) -> Tensor");
  // Linear + cross-entropy by tiles of the vocabulary (linear_losses/linear_ce_tiles_op.cpp):
  // per-row statistics [N, 3] (log-sum-exp, target logit, class-weighted logit sum) of this
  // weight's classes, and the gradients for per-row coefficients coef [N, 3] (a, hit, smooth)
  // of d(loss)/d(z_k) = a softmax_k - hit [k = y] - smooth w_k. The caller (ops/vocab_parallel.py)
  // merges statistics across slices or ranks. tile_cols / tile_rows: the tile's shape (0: by a
  // memory budget); filter_eps > 0: gradient filtering (linear_ce_tiles_op.cpp, kept_runs).
  m.def("linear_ce_tile_stats(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
        "Tensor? class_weight, int class_offset, float softcap, bool weighted_sum, "
        "int tile_cols, int tile_rows=0) -> Tensor");
  m.def("linear_ce_tile_grads(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
        "Tensor? class_weight, int class_offset, float softcap, Tensor lse, Tensor coef, "
        "bool smoothing, bool[3] grad_mask, int tile_cols, int tile_rows=0, float filter_eps=0.0) "
        "-> (Tensor, Tensor, Tensor)");
  // Depthwise dilated 1-D convolution (tcn/tcn_op.cpp): x [B, C, L] (channels-first or
  // channels-last memory), weight [C, K], y[b, c, t] = bias[c] + sum_k w[c, k] x[b, c, t - pad + k d].
  m.def("dilated_conv1d_forward(Tensor x, Tensor weight, Tensor? bias, int dilation, int pad) "
        "-> Tensor");
  m.def("dilated_conv1d_backward(Tensor grad_y, Tensor x, Tensor weight, int dilation, int pad, "
        "bool[3] grad_mask) -> (Tensor, Tensor, Tensor)");
  // One TCN level fused: y = x + act(dilated_conv1d(x) + bias), act 0 none, 1 relu, 2 silu,
  // 3 gelu (erf form). The backward recomputes the convolution instead of saving it.
  m.def("tcn_level_forward(Tensor x, Tensor weight, Tensor? bias, int dilation, int pad, "
        "int act) -> Tensor");
  m.def("tcn_level_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, int dilation, "
        "int pad, int act, bool[3] grad_mask) -> (Tensor, Tensor, Tensor)");
  // Mann-Whitney (AUC) loss (pair_losses/pair_losses_op.cpp): per query, the mean over the
  // P x N pairs of softplus(neg_j - pos_i), and (compute_grad) its gradients, without storing
  // the pairs. -> (loss [B] float32, grad_pos [B, P] float32, grad_neg [B, N] float32)
  // mw_auc_loss's eager path (pair_losses_op.cpp): forward (with the gradients when wanted),
  // reduction over the queries (0 none, 1 mean, 2 sum) and a C++ autograd formula in one op
  m.def("mw_auc_loss(Tensor scores_pos, Tensor scores_neg, int reduction, *, bool round_loss=False) -> Tensor");
  m.def("mw_auc_forward(Tensor scores_pos, Tensor scores_neg, bool compute_grad) "
        "-> (Tensor, Tensor, Tensor)");
  // Similarity blocks of the embedding losses (pair_losses/pair_losses_op.cpp, CPU): a block
  // s = E[row0 : row0 + rows] @ E^T (float32) in, its statistics out, and in the *_ ops its
  // gradient d loss / d s written over it (similarity_rows_kernels.h has the math).
  m.def("pair_label_keys(Tensor labels) -> Tensor");
  m.def("ms_rows_(Tensor(a!) s, Tensor keys, int row0, float alpha, float beta, float base, "
        "float? epsilon, bool write_grad) -> Tensor");
  m.def("tcm_rows(Tensor(a!) s, Tensor keys, int row0, float m_pos, float m_neg, bool collect) "
        "-> (Tensor, Tensor, Tensor)");
  // coef: float64 [2] CPU tensors (values computed from the forward's totals, not host scalars)
  m.def("tcm_rows_grad_(Tensor(a!) s, Tensor keys, int row0, float m_pos, float m_neg, "
        "Tensor coef) -> ()");
  m.def("pair_grad(Tensor e, Tensor keys, Tensor row_ptr, Tensor cols, Tensor coef) -> Tensor");
  m.def("clip_rows(Tensor s, int row0, float scale, bool symmetric) -> (Tensor, Tensor, Tensor)");
  m.def("clip_rows_grad_(Tensor(a!) s, int row0, float scale, Tensor lse_row, Tensor? lse_col, "
        "Tensor g) -> ()");
  // The contrastive loss's block loops (pair_losses_op.cpp; CPU and CUDA builds' CUDA):
  // -> (rows, lse_row, lse_col, s_kept); the backward consumes s_kept when it is the whole S
  // (block_rows: SymInt in these schemas, as the Python caller derives it from the batch size:
  // an int would fix that size into a torch.compile graph; the kernels take it as int64_t)
  m.def("contrastive_forward(Tensor a, Tensor b, float inv_t, bool symmetric, SymInt block_rows, "
        "bool keep) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("contrastive_backward(Tensor grad_rows, Tensor a, Tensor b, Tensor lse_row, Tensor lse_col, "
        "Tensor(a!) s_kept, float inv_t, bool symmetric, SymInt block_rows, bool[2] grad_mask) "
        "-> (Tensor, Tensor)");
  // Its eager path without weights (as kd_loss's): forward, reduction (0 none, 1 mean, 2 sum)
  // and a C++ autograd formula in one op
  m.def("contrastive_loss(Tensor a, Tensor b, float inv_t, bool symmetric, SymInt block_rows, "
        "int reduction, *, bool round_loss=False) -> Tensor");
  // Multi-Similarity's block loops: -> (stats [2, B] or [0], gradient or [0]); see the op file
  m.def("ms_blocks(Tensor e, Tensor keys, float alpha, float beta, float base, float? epsilon, "
        "SymInt block_rows, bool early, Tensor? grad_rows) -> (Tensor, Tensor)");
  // TCM's block loops: -> (totals [4] float64, gradient or [0], row_ptr, hard pairs' columns);
  // the backward over blocks formed again; and the CPU row normalisation of the embedding losses
  // (unit rows, norms) with its backward. See the op file.
  m.def("tcm_blocks(Tensor e, Tensor keys, float m_pos, float m_neg, float w_pos, float w_neg, "
        "SymInt block_rows, bool early, int max_pairs) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("tcm_blocks_backward(Tensor e, Tensor keys, float m_pos, float m_neg, SymInt block_rows, "
        "Tensor coef) -> Tensor");
  m.def("unit_rows(Tensor x) -> (Tensor, Tensor)");
  m.def("unit_rows_grad(Tensor grad_e, Tensor e, Tensor norms) -> Tensor");
  m.def("knn_rows(Tensor s, Tensor row_sq, Tensor col_sq, int row0, bool exclude_self, int k) "
        "-> Tensor");
  // Distances of chosen pairs, x_i to t_idx[i, c] (ICNN's neighbours, Proto-Triplet's prototypes)
  m.def("neighbour_dist(Tensor x, Tensor t, Tensor idx, float eps) -> Tensor");
  m.def("neighbour_dist_backward(Tensor grad_dist, Tensor x, Tensor t, Tensor idx, Tensor dist, "
        "bool[2] grad_mask) -> (Tensor, Tensor)");
  // ICNN's score from the neighbours' distances d [N, n] and same-class flags, in one pass:
  // -> (loss [] float32, d loss / d d [N, n] float32)
  m.def("icnn_score(Tensor d, Tensor same, int k, bool clipped) -> (Tensor, Tensor)");
  // Proto-Triplet on the CPU in one op (pair_losses_op.cpp): -> (loss, protos [K, D],
  // idx [Q, 2], dist [Q, 2], inverse [S], counts [K]); its backward -> (grad_query, grad_support);
  // own (the query set as its support): grad_query holds both gradients, grad_support is [0, D]
  m.def("proto_triplet_forward(Tensor query, Tensor query_labels, Tensor support, "
        "Tensor support_labels, float margin) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("proto_triplet_backward(Tensor grad, Tensor query, Tensor protos, Tensor idx, Tensor dist, "
        "Tensor inverse, Tensor counts, float margin, bool own=False) -> (Tensor, Tensor)");
  // Logit distillation (distill/kd_op.cpp): kind 0 forward KL, 1 reverse KL, 2 JSD(beta);
  // -> (T^2-scaled loss of each row [N] float32, statistics [N, 3] for the backward).
  // kd_loss's eager path (kd_op.cpp): forward, reduction (0 none, 1 mean, 2 sum) and a C++
  // autograd formula in one op, as the row losses' *_loss ops
  m.def("kd_loss(Tensor student, Tensor teacher, int kind, float temperature, float beta, "
        "int reduction, *, bool round_loss=False) -> Tensor");
  m.def("kd_forward(Tensor student, Tensor teacher, int kind, float temperature, float beta) "
        "-> (Tensor, Tensor)");
  m.def("kd_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor stats, int kind, "
        "float temperature, float beta) -> Tensor");
  // Both at once (CPU): -> (the rows as kd_forward's, grad_scale * d row / d student [N, C] in
  // the student's dtype); kd_loss's autograd path when the student needs its gradient.
  m.def("kd_forward_grad(Tensor student, Tensor teacher, int kind, float temperature, float beta, "
        "float grad_scale) -> (Tensor, Tensor)");
  // Order-based distillation (distill/kd_op.cpp): top-k KL over the teacher's k largest
  // classes, and Plackett-Luce distillation; -> (loss of each row [N] float32, and when
  // compute_grad its gradient w.r.t. the student [N, C] in the student's dtype, else empty).
  // grad_scale multiplies the gradient made (the eager paths fold the mean's divisor in).
  m.def("topk_kl_forward(Tensor student, Tensor teacher, int k, float temperature, "
        "bool renormalize, bool compute_grad, float grad_scale=1.0) -> (Tensor, Tensor)");
  m.def("pld_forward(Tensor student, Tensor teacher, Tensor target, float temperature, "
        "int ignore_index, bool compute_grad, float grad_scale=1.0) -> (Tensor, Tensor)");
  // Their backward (CPU): grad [N, C] * scale[N] per row, in a fresh huge-page tensor.
  m.def("scale_rows(Tensor grad, Tensor scale) -> Tensor");
  // Their eager paths (kd_op.cpp), as kd_loss: forward (with the gradient when the student
  // needs it), reduction (0 none, 1 mean, 2 sum; PLD's mean over the rows kept) and a C++
  // autograd formula in one op.
  m.def("topk_kl_loss(Tensor student, Tensor teacher, int k, float temperature, bool renormalize, "
        "int reduction, *, bool round_loss=False) -> Tensor");
  m.def("pld_loss(Tensor student, Tensor teacher, Tensor target, float temperature, "
        "int ignore_index, int reduction, *, bool round_loss=False) -> Tensor");
  // Self-adjusting Dice loss (metric_losses/metric_losses_op.cpp): the loss of each row [N]
  // float32 (sum over its classes of 1 - DSC); sigmoid form: target float32 of logits' shape
  // [N, K]; softmax form: logits [N, C], integer target [N] (ignore_index rows: 0). The
  // backward recomputes the row statistics and returns d(sum_r grad_rows[r] rows[r]) / d logits.
  m.def("dice_sigmoid_forward(Tensor logits, Tensor target, float alpha, float gamma, "
        "float smooth) -> Tensor");
  m.def("dice_sigmoid_backward(Tensor grad_rows, Tensor logits, Tensor target, float alpha, "
        "float gamma, float smooth) -> Tensor");
  m.def("dice_softmax_forward(Tensor logits, Tensor target, float alpha, float gamma, "
        "float smooth, int ignore_index) -> Tensor");
  m.def("dice_softmax_backward(Tensor grad_rows, Tensor logits, Tensor target, float alpha, "
        "float gamma, float smooth, int ignore_index) -> Tensor");
  // AnyLoss's differentiable confusion matrix (metric_losses/metric_losses_op.cpp): scores and
  // float32 targets [N, K] -> sums [4, K] float32 (rows TP, FN, FP, TN of each column).
  m.def("confusion_sums(Tensor scores, Tensor target, float L, bool from_logits) -> Tensor");
  // Their eager paths (metric_losses_op.cpp): forward, reduction (0 none, 1 mean, 2 sum; the
  // softmax Dice's mean over the rows kept) and a C++ autograd formula in one op. dice_loss:
  // the prepared inputs of one form (softmax: integer target [N]); anyloss: metric 0 f1,
  // 1 fbeta, 2 accuracy, 3 balanced_accuracy, 4 gmean, the mean of 1 - metric over columns.
  m.def("dice_loss(Tensor logits, Tensor target, bool softmax, float alpha, float gamma, "
        "float smooth, int ignore_index, int reduction, *, bool round_loss=False) -> Tensor");
  m.def("anyloss(Tensor scores, Tensor target, int metric, float L, float beta, "
        "bool from_logits, *, bool round_loss=False) -> Tensor");
  m.def("confusion_sums_backward(Tensor grad_sums, Tensor scores, Tensor target, float L, "
        "bool from_logits) -> Tensor");
  // Entropic optimal transport (sinkhorn/sinkhorn_op.cpp): cost [B, n, m], marginals a [B, n],
  // b [B, m]; keep = 0 runs log-domain Sinkhorn, keep >= 1 Sinkhorn-Newton-Sparse keeping that
  // many plan entries per Hessian row. -> (<a, f> + <b, g> [B], f [B, n], g [B, m], iterations
  // [B] int64, marginal error [B], transport cost <P, C> [B]); sinkhorn_plan -> scale[k] * P_k.
  m.def("sinkhorn_solve(Tensor cost, Tensor a, Tensor b, float eps, int max_iter, float tol, "
        "int warmup_iters, int keep, int cg_iters) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("sinkhorn_plan(Tensor cost, Tensor a, Tensor b, Tensor f, Tensor g, float eps, "
        "Tensor? scale) -> Tensor");
  // Low-bit dequant GEMM (quant/quant_op.cpp): weight [N, K] packed as qweight uint8
  // [N, K * bits / 8] with float32 scales and (optional) zero points [N, K / group_size], and an
  // optional float32 codebook [1 or N, 2^bits] (layout in quant/quant_kernels.h).
  // y = x @ W^T (+ bias) without a float copy of W.
  m.def("dequant_gemm(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? codebook, "
        "int bits, int group_size, Tensor? bias) -> Tensor");
  m.def("dequant_gemm_grad_input(Tensor grad_y, Tensor qweight, Tensor scales, Tensor? zeros, "
        "Tensor? codebook, int bits, int group_size) -> Tensor");
  m.def("dequantize_weight(Tensor qweight, Tensor scales, Tensor? zeros, Tensor? codebook, "
        "int bits, int group_size) -> Tensor");
  register_autocast_stops(m);  // (last: every op above is defined)
}
