"""Benchmark of the pair-based losses: Mann-Whitney (AUC), contrastive (CLIP), Multi-Similarity.

Variants, same inputs, same run: ``fastloss`` (``fastloss.ops.mw_auc_loss``, the pairs never
stored) and ``eager_reference`` (``fastloss.reference.pair_losses.mw_auc_loss`` in the input
dtype: the ``[B, P, N]`` pair matrix built by broadcasting, as one would write it in PyTorch).
One call = loss (reduction mean) + ``torch.autograd.grad(loss, (pos, neg))``. The work is
``B P N`` pairs (one exp, one log and one division each); the rate is reported as pairs/s.

The contrastive loss (``fastloss.ops.contrastive_loss``, blocks of rows, T = 0.07) is compared
with ``fastloss.reference.contrastive.contrastive_loss`` in float32 (the whole ``B x B``
matrix); its rows are labelled ``clip BxD`` (shape ``[B, B, D]``).

The Multi-Similarity loss with its miner (``fastloss.ops.multi_similarity_loss``, rows ``ms BxD``)
is compared with pytorch-metric-learning's ``MultiSimilarityLoss()`` + ``MultiSimilarityMiner(0.1)``
and with ``fastloss.reference.metric.multi_similarity_loss`` in float32.

The contrastive, Multi-Similarity, TCM, Proto-Triplet and ICNN losses run the
similarity-block kernels (csrc/pair_losses/similarity_rows_*) on GEMM blocks on the CPU; on
CUDA the first three run their CUDA kernels, Proto-Triplet and ICNN torch operations. The same
run times ``tcm_loss`` (rows ``tcm BxD``) against pytorch-metric-learning's
``ThresholdConsistentMarginLoss()`` and the eager formula (the whole similarity matrix and its
upper triangle), ``proto_triplet_loss`` (prototypes from the batch,
rows ``proto BxD``) against an eager form with the one-hot class matrix and ``torch.cdist``,
and ``icnn_loss`` (k = 4, rows ``icnn BxD``) against an eager form with the whole ``B x B``
distance matrix and ``topk``, both written below as the authors' code computes them.

Each ``clip`` and embedding-loss shape also has a ``one_gemm`` row: one ``[B, D] x [D, B]``
float32 matrix product (no gradient) in the same run, the unit of the floor: the contrastive
loss does 4 of them (eager 3), Multi-Similarity 3 (eager 3), TCM and ICNN 1 plus element-wise
and sparse work (eager 3).

Usage: python bench/bench_pair_losses.py [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import fastloss  # noqa: E402
from fastloss.reference import pair_losses as R  # noqa: E402

SHAPES = [(1, 1024, 1024), (1, 4096, 4096), (1, 16384, 16384), (256, 256, 256), (1024, 64, 512)]
QUICK = [(1, 512, 512), (16, 64, 128)]
# contrastive: (B, D), B x B similarities
CONTRASTIVE = [(256, 128), (4096, 128), (4096, 512), (4096, 1024), (16384, 128)]
CONTRASTIVE_QUICK = [(256, 32)]
# multi-similarity: (B, D), about 40 samples per class
METRIC = [(256, 128), (1024, 128), (4096, 128), (4096, 512), (4096, 1024), (16384, 128)]
METRIC_QUICK = [(128, 16)]
ICNN_EPS = 1e-7
PML_TCM_MAX_B = 1024
PML_MS_MAX_B = 4096  # pml's Multi-Similarity took 1.26 GB at 4096 (x B^2: about 20 GB at 16384)


def proto_triplet_eager(emb, labels, margin=0.5):
    """Prototype triplet loss from the batch: one-hot class means, all query-prototype distances."""
    classes, inverse = torch.unique(labels, return_inverse=True)
    onehot = torch.nn.functional.one_hot(inverse, classes.numel()).to(emb.dtype)
    protos = (onehot.t() @ emb) / onehot.sum(0)[:, None]
    d = torch.cdist(emb, protos)
    d_pos = (d * onehot).sum(1)
    d_neg = torch.where(onehot.bool(), float("inf"), d).amin(1)
    return torch.relu(d_pos - d_neg + margin).mean()


def icnn_eager(emb, labels, k=4):
    """ICNN loss with the whole distance matrix (self-matches excluded), its k + 1 nearest
    neighbours by topk, and the score of fastloss.ops.icnn_loss's docstring."""
    n = emb.shape[0]
    d_all = torch.cdist(emb, emb) + torch.diag(torch.full((n,), float("inf"), device=emb.device))
    d, idx = d_all.topk(k + 1, 1, largest=False)
    same = labels[idx] == labels[:, None]
    delta = torch.where(same, float("inf"), d).amin(1, keepdim=True)
    u = d[:, :k] / (delta + ICNN_EPS)
    u = u / u.amax(1, keepdim=True).clamp(min=1.0)
    same_k = same[:, :k]
    n_same, n_other = same_k.sum(1), (~same_k).sum(1)
    lambda_sc = 1 - (torch.where(same_k, u, 0.0).sum(1) / (n_same + ICNN_EPS)).sum() / ((n_same > 0).sum() + ICNN_EPS)
    dc = torch.where(~same_k, d[:, :k], 0.0)
    dc = dc / (dc.amax() + ICNN_EPS)
    lambda_dc = (dc.sum(1) / (n_other + ICNN_EPS)).sum() / ((n_other > 0).sum() + ICNN_EPS)
    gamma = (n_same.float() / k).mean()
    return -torch.log(((lambda_sc + lambda_dc) / 2 + gamma) / 2)


MEASURE_KW = dict(warmup=2, target_s=1.0, min_repeats=3, max_repeats=20, max_measure_s=20.0)


def measure_embedding_loss(res, fn, emb, device, cols, base):
    """One row: fn() (a loss of the embeddings) + its gradient, or the reason it was not run."""
    if isinstance(fn, str):
        harness.skipped_row(res, fn, base, cols)
        return

    def call(_inp):
        loss = fn()
        torch.autograd.grad(loss, emb)
        return loss.detach()
    harness.measure_row(res, call, device, base, cols, MEASURE_KW)


def measure_one_gemm(res, x, y, device, cols, base):
    """The floor unit of a [B, D] embedding loss: one x @ y.T in float32, no gradient."""
    def call(_inp):
        with torch.no_grad():
            return x.float() @ y.float().t()
    harness.measure_row(res, call, device, dict(base, variant="one_gemm", dtype=torch.float32),
                        cols, MEASURE_KW)


def main(argv=None):
    ap = harness.base_parser(__doc__)
    args = ap.parse_args(argv)
    device = args.device
    name = f"pair_losses_{device}" + ("_quick" if args.quick else "")
    t_start = time.perf_counter()
    res = harness.Results(name, device, args.out, notes=[
        "time = mw_auc_loss(pos, neg) (reduction mean) + torch.autograd.grad(loss, (pos, neg)); median",
        "Gpairs_per_s = B*P*N / median time",
        "CPU: every loss runs fastloss kernels (similarity-block kernels on GEMM blocks for the "
        "embedding losses); CUDA: mw_auc_loss, the contrastive, Multi-Similarity and TCM losses run "
        "fastloss's CUDA kernels, Proto-Triplet and ICNN torch operations"])
    res.title = "fastloss mw_auc_loss, forward + backward"
    cols = [("case", lambda r: r["label"]), ("variant", lambda r: r["variant"]),
            ("median ms", lambda r: harness._f(r.get("median_ms"), ".2f")),
            ("n", lambda r: str(r.get("samples", "-"))),
            ("Gpairs/s", lambda r: harness._f(r.get("Gpairs_per_s"), ".3f")),
            ("peak mem", lambda r: harness.fmt_bytes(r.get("peak_extra_mem_bytes"))),
            ("vs eager", lambda r: harness._f(r.get("speedup_vs", {}).get("eager_reference"), ".2f", "x")),
            ("status", lambda r: r["status"] if r["status"] == "ok" else r.get("reason", "")[:60])]
    print(f"# {name}: {res.env['device_name']}, {res.env['threads']} threads, torch "
          f"{res.env['torch']}, commit {res.env['git_commit']}")
    print(" | ".join(c for c, _ in cols), flush=True)
    variants = {"fastloss": fastloss.ops.mw_auc_loss,
                "eager_reference": lambda p, n: R.mw_auc_loss(p, n, compute_dtype=None)}
    for (b, p, n) in QUICK if args.quick else SHAPES:
        gen = torch.Generator(device=device).manual_seed(b + p + n)
        pos = torch.randn(b, p, device=device, generator=gen).requires_grad_(True)
        neg = torch.randn(b, n, device=device, generator=gen).requires_grad_(True)
        for variant, fn in variants.items():
            def call(_inp, fn=fn):
                loss = fn(pos, neg)
                torch.autograd.grad(loss, (pos, neg))
                return loss.detach()
            base = dict(op="mw_auc_loss", variant=variant, group=f"auc|{b}x{p}x{n}",
                        label=f"{b}x{p}x{n}", shape=[b, p, n], dtype=torch.float32)
            harness.measure_row(res, call, device, base, cols, MEASURE_KW, derived=lambda tm, w=b * p * n: {
                "Gpairs_per_s": w / (tm["median_ms"] / 1e3) / 1e9})
    # the contrastive (CLIP) loss: blocks of rows vs the eager B x B formula
    from fastloss.reference import contrastive as RC
    for (b, d) in CONTRASTIVE_QUICK if args.quick else CONTRASTIVE:
        gen = torch.Generator(device=device).manual_seed(b + d)
        x = torch.nn.functional.normalize(torch.randn(b, d, device=device, generator=gen), dim=1)
        y = torch.nn.functional.normalize(torch.randn(b, d, device=device, generator=gen), dim=1)
        x.requires_grad_(True)
        y.requires_grad_(True)
        for variant, fn in {"fastloss": lambda: fastloss.ops.contrastive_loss(x, y, 0.07),
                            "eager_reference": lambda: RC.contrastive_loss(x, y, 0.07, compute_dtype=None)}.items():
            def call(_inp, fn=fn):
                loss = fn()
                torch.autograd.grad(loss, (x, y))
                return loss.detach()
            base = dict(op="contrastive_loss", variant=variant, group=f"clip|{b}x{d}",
                        label=f"clip {b}x{d}", shape=[b, b, d], dtype=torch.float32)
            harness.measure_row(res, call, device, base, cols, MEASURE_KW)
        measure_one_gemm(res, x, y, device, cols, dict(op="contrastive_loss", group=f"clip|{b}x{d}",
                                                       label=f"clip {b}x{d}", shape=[b, b, d]))
    # the Multi-Similarity loss with its miner: blocks of anchors vs pytorch-metric-learning
    # (MultiSimilarityLoss + MultiSimilarityMiner) and the eager formula
    from fastloss.reference import metric as RM
    try:
        from pytorch_metric_learning import losses as pml_losses, miners as pml_miners
        pml_loss, pml_miner = pml_losses.MultiSimilarityLoss(), pml_miners.MultiSimilarityMiner(0.1)
        pml_reason = None
    except Exception as e:  # not installed
        pml_reason = f"missing: pytorch_metric_learning not importable ({type(e).__name__}: {e})"
    for (b, d) in METRIC_QUICK if args.quick else METRIC:
        gen = torch.Generator(device=device).manual_seed(b * 3 + d)
        labels = torch.randint(0, max(2, b // 40), (b,), device=device, generator=gen)
        emb = torch.randn(b, d, device=device, generator=gen).requires_grad_(True)
        pml_ms_reason = pml_reason or (None if b <= PML_MS_MAX_B else
                                       f"skipped: pytorch-metric-learning's Multi-Similarity needs about "
                                       f"{1.26 * (b / 4096) ** 2:.0f} GB at B = {b} (1.26 GB at 4096, x B^2)")
        variants = {"fastloss": lambda: fastloss.ops.multi_similarity_loss(emb, labels),
                    "pytorch_metric_learning": (lambda: pml_loss(emb, labels, pml_miner(emb, labels)))
                    if pml_ms_reason is None else pml_ms_reason,
                    "eager_reference": lambda: RM.multi_similarity_loss(emb, labels, compute_dtype=None)}
        for variant, fn in variants.items():
            measure_embedding_loss(res, fn, emb, device, cols, dict(
                op="multi_similarity_loss", variant=variant, group=f"ms|{b}x{d}",
                label=f"ms {b}x{d}", shape=[b, b, d], dtype=torch.float32))
        measure_one_gemm(res, emb, emb, device, cols, dict(op="multi_similarity_loss", group=f"ms|{b}x{d}",
                                                           label=f"ms {b}x{d}", shape=[b, b, d]))
    # the torch-operation ops: TCM, proto-triplet and ICNN, same embeddings and labels
    for (b, d) in METRIC_QUICK if args.quick else METRIC:
        gen = torch.Generator(device=device).manual_seed(b * 5 + d)
        labels = torch.randint(0, max(2, b // 40), (b,), device=device, generator=gen)
        emb = torch.randn(b, d, device=device, generator=gen).requires_grad_(True)
        # pml's TCM takes 2.7 GB at B = 1024 (measured) and grows as B^2: past this machine
        pml_tcm_reason = pml_reason or (None if b <= PML_TCM_MAX_B else
                                        f"skipped: pytorch-metric-learning's TCM needs about "
                                        f"{2.7 * (b / 1024) ** 2:.0f} GB at B = {b} (2.7 GB at 1024, x B^2)")
        cases = {
            "tcm": {"fastloss": lambda: fastloss.ops.tcm_loss(emb, labels),
                    "pytorch_metric_learning": (lambda: pml_tcm(emb, labels)) if pml_tcm_reason is None
                    else pml_tcm_reason,
                    "eager_reference": lambda: RM.tcm_loss(emb, labels, compute_dtype=None)},
            "proto": {"fastloss": lambda: fastloss.ops.proto_triplet_loss(emb, labels),
                      "eager_reference": lambda: proto_triplet_eager(emb, labels)},
            "icnn": {"fastloss": lambda: fastloss.ops.icnn_loss(emb, labels),
                     "eager_reference": lambda: icnn_eager(emb, labels)},
        }
        if pml_reason is None:
            pml_tcm = pml_losses.ThresholdConsistentMarginLoss()
        for op, variants in cases.items():
            for variant, fn in variants.items():
                measure_embedding_loss(res, fn, emb, device, cols, dict(
                    op=f"{op}_loss", variant=variant, group=f"{op}|{b}x{d}",
                    label=f"{op} {b}x{d}", shape=[b, b, d], dtype=torch.float32))
    harness.finish_run(res, cols, t_start=t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
