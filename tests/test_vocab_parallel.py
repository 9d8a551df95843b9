"""Vocabulary-parallel linear + cross-entropy over 2 and 4 gloo processes on this machine:
every rank's loss, its shard's weight and bias gradients and the hidden gradient equal the
single-process fastloss.ops.linear_cross_entropy on the whole weight (itself tested against
float64 references in test_linear_losses.py), for every option; plus the layout errors."""

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastloss import ops

# (name, kwargs of both functions, uses class weights)
CASES = [
    ("plain", {}, False),
    ("smoothing_zloss_softcap", {"label_smoothing": 0.2, "lse_square_scale": 1e-3, "softcap": 3.0}, True),
    ("smoothing_weighted", {"label_smoothing": 0.1}, True),
    ("zloss", {"lse_square_scale": 1e-2}, False),
]
N, D = 37, 12


def shard_sizes(v, world):
    """Uneven shards: rank r gets a different share, all non-empty."""
    base = [v // world + (r - world // 2) * 2 for r in range(world)]
    base[-1] += v - sum(base)
    return base


def _inputs(v, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g) * 1.5).to(dtype)
    w = (torch.randn(v, D, generator=g) / D ** 0.5).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype)
    t = torch.randint(0, v, (N,), generator=g)
    t[::5] = -100
    cw = torch.rand(v, generator=g) + 0.5
    return h, w, b, t, cw


def _check_rank(rank, world, v):
    sizes = shard_sizes(v, world)
    first = sum(sizes[:rank])
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
        for case, (name, kw, weighted) in enumerate(CASES):
            for k, reduction in enumerate(("mean", "sum", "none")):
                h, w, b, t, cw = _inputs(v, dtype, seed=10 * case + k)  # the same on every rank
                cw = cw if weighted else None
                up = torch.randn(N, generator=torch.Generator().manual_seed(3)) if reduction == "none" else None
                # the reference: one process, the whole weight
                hr, wr, br = (x.clone().requires_grad_(True) for x in (h, w, b))
                ref = ops.linear_cross_entropy(hr, wr, t, br, class_weight=cw, reduction=reduction, **kw)
                ref.backward(up.to(ref.dtype) if up is not None else None)
                # this rank's part
                hp = h.clone().requires_grad_(True)
                wp = w[first:first + sizes[rank]].clone().requires_grad_(True)
                bp = b[first:first + sizes[rank]].clone().requires_grad_(True)
                out = ops.vocab_parallel_linear_cross_entropy(
                    hp, wp, t, bp, vocab_size=v, class_weight=cw, reduction=reduction,
                    tile_cols=7, **kw)
                out.backward(up.to(out.dtype) if up is not None else None)
                what = f"rank {rank}/{world} {dtype} {name} {reduction}"
                close = lambda a, e, m: torch.testing.assert_close(  # noqa: E731
                    a.float(), e.float(), rtol=tol, atol=tol * max(1.0, e.float().abs().max().item()),
                    msg=lambda s: f"{what} {m}: {s}")
                close(out, ref, "loss")
                close(hp.grad, hr.grad, "grad_hidden")
                close(wp.grad, wr.grad[first:first + sizes[rank]], "grad_weight shard")
                close(bp.grad, br.grad[first:first + sizes[rank]], "grad_bias shard")
    # gradient filtering with a huge filter_eps keeps only the targets' entries of d(loss)/d(z),
    # whatever the tiles: the shards' result equals the one process's (low_memory), whose own
    # filtering is checked against float64 in test_linear_losses.py
    h, w, b, t, cw = _inputs(v, torch.float32, seed=7)
    hr, wr, br = (x.clone().requires_grad_(True) for x in (h, w, b))
    ops.linear_cross_entropy(hr, wr, t, br, class_weight=cw, low_memory=True, filter_eps=1e30).backward()
    hp = h.clone().requires_grad_(True)
    wp = w[first:first + sizes[rank]].clone().requires_grad_(True)
    bp = b[first:first + sizes[rank]].clone().requires_grad_(True)
    ops.vocab_parallel_linear_cross_entropy(hp, wp, t, bp, vocab_size=v, class_weight=cw, tile_cols=7,
                                            filter_eps=1e30).backward()
    for got, exp, m in ((hp.grad, hr.grad, "grad_hidden"), (wp.grad, wr.grad[first:first + sizes[rank]], "grad_weight"),
                        (bp.grad, br.grad[first:first + sizes[rank]], "grad_bias")):
        torch.testing.assert_close(got, exp, rtol=2e-5, atol=2e-5 * max(1.0, exp.abs().max().item()),
                                   msg=lambda s, m=m: f"rank {rank}/{world} filtered {m}: {s}")
    assert not torch.allclose(hr.grad, torch.zeros_like(hr.grad)), "the targets' entries remain"
    # layout errors: the shards must add up to vocab_size
    h, w, b, t, _ = _inputs(v, torch.float32, seed=0)
    try:
        ops.vocab_parallel_linear_cross_entropy(h, w[first:first + sizes[rank]], t, vocab_size=v + 1)
    except ValueError as e:
        assert f"{v} in all, but vocab_size is {v + 1}" in str(e), str(e)
    else:
        raise AssertionError("shards not adding up to vocab_size did not raise")
    try:
        ops.vocab_parallel_linear_cross_entropy(h, w[first:first + sizes[rank]], torch.full((N,), v))
    except ValueError as e:
        assert f"is not a class index in [0, {v})" in str(e), str(e)
    else:
        raise AssertionError("a target past the vocabulary did not raise")
    # under autocast the shard is cast as F.linear casts it (as linear_cross_entropy does): float32
    # master weights with bfloat16 compute had been refused as a dtype mismatch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.vocab_parallel_linear_cross_entropy(h, w[first:first + sizes[rank]], t,
                                                     b[first:first + sizes[rank]])
        want = ops.linear_cross_entropy(h, w, t, b)
    assert got.dtype == want.dtype == torch.float32, (got.dtype, want.dtype)  # (as F.cross_entropy)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    # a rank outside the group it passes (new_group gives it a marker, not a group): named
    outside = dist.new_group([0])   # (every rank takes part in making it)
    if rank != 0:
        try:
            ops.vocab_parallel_linear_cross_entropy(h, w[first:first + sizes[rank]], t, group=outside)
        except ValueError as e:
            assert f"this rank ({rank}) is not a member of group" in str(e), str(e)
        else:
            raise AssertionError("a rank outside the group did not raise")
    # the group passed where bias_shard goes, or a group that is not a ProcessGroup: named
    shard = w[first:first + sizes[rank]]
    for args, kwargs, match in (((h, shard, t, dist.group.WORLD), {}, "bias_shard must be a Tensor or None"),
                                ((h, shard, t), {"group": "tp"}, "group must be a torch.distributed ProcessGroup"),
                                ((h[0, 0], shard[:, :1], t[0]), {}, "hidden must be [..., D]")):
        try:
            ops.vocab_parallel_linear_cross_entropy(*args, **kwargs)
        except (TypeError, ValueError) as e:
            assert match in str(e), str(e)
        else:
            raise AssertionError(f"no error: {match}")


def _worker(rank, world, v, init_file, err_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _check_rank(rank, world, v)
    except BaseException:
        with open(os.path.join(err_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_equals_single_process(world):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_worker, args=(world, 103, os.path.join(tmp, "init"), tmp), nprocs=world)
        except Exception as e:
            logs = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp)) if f.startswith("rank")]
            raise AssertionError("\n".join(logs) or str(e)) from None


def test_needs_an_initialized_process_group():
    h, w, b, t, _ = _inputs(11, torch.float32, seed=1)
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        ops.vocab_parallel_linear_cross_entropy(h, w, t)
