"""AnyLoss against its float64 reference (written cell by cell), every metric, binary and
multi-label, logits and probabilities; gradients; bad input."""

import pytest
import torch

from fastloss import ops
from fastloss.reference import metric_losses as ref


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("shape", [(40,), (33, 3)], ids=["binary", "multilabel"])
@pytest.mark.parametrize("metric", ["f1", "fbeta", "accuracy", "balanced_accuracy", "gmean"])
def test_matches_reference(metric, shape, from_logits):
    g = torch.Generator().manual_seed(len(metric) + len(shape))
    scores = torch.randn(*shape, generator=g) * 0.3 if from_logits else torch.rand(*shape, generator=g)
    target = (torch.rand(*shape, generator=g) < 0.3).float()
    target.view(-1)[:2] = torch.tensor([0.0, 1.0])   # both classes in every test
    x = scores.clone().requires_grad_(True)
    out = ops.anyloss(x, target, metric, L=10.0, beta=2.0, from_logits=from_logits)
    out.backward()
    x64 = scores.double().requires_grad_(True)
    exp = ref.anyloss(x64, target, metric, L=10.0, beta=2.0, from_logits=from_logits)
    exp.backward()
    torch.testing.assert_close(out.double(), exp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)


def test_perfect_and_bad_predictions_and_input_checks():
    target = torch.tensor([1.0, 0.0, 1.0, 0.0])
    good = torch.tensor([0.99, 0.01, 0.98, 0.02])
    bad = 1 - good
    assert ops.anyloss(good, target, "f1", from_logits=False) < 0.01
    assert ops.anyloss(bad, target, "f1", from_logits=False) > 0.99
    with pytest.raises(ValueError, match="metric must be one of"):
        ops.anyloss(good, target, "auc")
    with pytest.raises(ValueError, match="target the same shape"):
        ops.anyloss(good, target[:3])
    with pytest.raises(ValueError, match="L must be > 0"):
        ops.anyloss(good, target, L=0.0)
