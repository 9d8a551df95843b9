"""The README's ```python examples run as written (on the CPU), so that a renamed argument or a
changed signature cannot leave the documentation wrong without a failing test. Each block is
executed in a namespace holding small tensors for the names it uses but does not define (its
prose says what they stand for); the first block's own 4096 x 32000 logits are used as given."""
import re
from pathlib import Path

import pytest
import torch

import fastloss

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _fixtures(block: str) -> dict:
    """Inputs for the names the examples take as given (shapes from their comments)."""
    g = torch.Generator().manual_seed(len(block))
    rand = lambda *s, **kw: torch.randn(*s, generator=g, **kw)
    B, D, V, C = 8, 16, 50, 10
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(D, V, bias=False)
    ns = dict(
        torch=torch, fastloss=fastloss,
        # fused linear losses (hidden [N, D], weight [V, D])
        hidden=rand(B, D, requires_grad=True), w=rand(V, D, requires_grad=True),
        b=rand(V, requires_grad=True), cw=torch.rand(V, generator=g) + 0.5,
        target=torch.randint(0, V, (B,), generator=g),
        lm_head=torch.nn.Linear(D, V, bias=False), model=model,
        # dilated convolution ([B, C, L], weight [C, K]); the TCN's 256 channels
        x=rand(2, 256, 40), weight=rand(256, 2), bias=rand(256), batch=2, x_t=rand(2, 256),
        # pair and metric losses
        scores_pos=rand(7), scores_neg=rand(9), img_emb=rand(B, D, requires_grad=True),
        txt_emb=rand(B, D, requires_grad=True), w_pairs=torch.rand(B, B, generator=g),
        emb=rand(B, D, requires_grad=True), labels=torch.randint(0, 3, (B,), generator=g),
        query=rand(B, D, requires_grad=True), query_labels=torch.randint(0, 3, (B,), generator=g),
        support=rand(12, D), support_labels=torch.arange(12) % 3,
        logits=rand(B, C, requires_grad=True),
        student_logits=rand(B, 2000, requires_grad=True), teacher_logits=rand(B, 2000),
    )
    return ns


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    block = BLOCKS[index]
    ns = _fixtures(block)
    g = torch.Generator().manual_seed(index)
    # Names that mean different things in different blocks (`x`, `y`, `w`, `target`, `logits`,
    # ...) get the block's own meaning here.
    if "dice_loss" in block:
        ns["logits"], ns["target"] = torch.randn(8, 10, requires_grad=True), torch.randint(0, 10, (8,))
    if "anyloss" in block:
        ns["logits"], ns["target"] = torch.randn(8, requires_grad=True), torch.randint(0, 2, (8,)).float()
    if "pld_loss" in block:
        ns["target"] = torch.randint(0, 2000, (8,))
    if "contrastive_loss" in block:
        ns["w"] = ns["w_pairs"]
    if "dequant_gemm" in block:  # layers of 256 inputs: groups of 128 and 64 divide them
        ns["linear"], ns["x"] = torch.nn.Linear(256, 24), torch.randn(3, 256)
        ns["model"] = torch.nn.Sequential(torch.nn.Linear(256, 128), torch.nn.ReLU())
        ns["model"].add_module("lm_head", torch.nn.Linear(128, 50))
        ns["q"] = torch.randint(0, 16, (24, 256), dtype=torch.int32)
        ns["scales"], ns["zeros"] = torch.rand(24, 2) + 0.1, torch.full((24, 2), 8.0)
    if "sinkhorn" in block:
        # costs of order 1, as the eps values of the examples assume (a 6 x 7 problem at eps =
        # 0.002, or Gaussian clouds' squared distances of ~20 at eps = 0.05, need more than the
        # default 1000 iterations and warn)
        ns["cost"] = torch.rand(200, 300, generator=g)
        ns["a"], ns["b"] = torch.full((200,), 1 / 200), torch.full((300,), 1 / 300)
        ns["x"], ns["y"] = torch.rand(6, 3, generator=g), torch.rand(7, 3, generator=g)
    if "vocab_parallel" in block:  # one process holding the whole vocabulary (a group of one)
        import torch.distributed as dist
        if not dist.is_available():
            pytest.skip("torch.distributed is not available in this build")
        store = dist.FileStore(str(tmp_path / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            ns.update(weight_shard=torch.randn(50, 16, requires_grad=True), bias_shard=torch.randn(50),
                      tp_group=dist.group.WORLD)
            exec(compile(block, f"README block {index}", "exec"), ns)
        finally:
            dist.destroy_process_group()
        assert torch.isfinite(ns["loss"]).all()
        return
    exec(compile(block, f"README block {index}", "exec"), ns)
    for name in ("loss", "y", "res"):
        v = ns.get(name)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            assert torch.isfinite(v).all(), f"README block {index}: {name} is not finite"
