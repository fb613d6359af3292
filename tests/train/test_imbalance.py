"""Imbalance tools: weights, balanced sampler, focal and logit-adjusted losses (hand-checked)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.train.imbalance import (
    BalancedDistributedSampler,
    FocalLoss,
    LogitAdjustedLoss,
    class_counts,
    class_weights,
)


def test_class_weights_schemes() -> None:
    counts = class_counts([0] * 90 + [1] * 10, 3)
    assert counts.tolist() == [90, 10, 0]
    w = class_weights(counts, "inverse")
    assert w[2] == 0 and w[1] / w[0] == pytest.approx(9.0) and w[:2].mean() == pytest.approx(1.0)
    assert class_weights(counts, "sqrt_inverse")[1] / class_weights(counts, "sqrt_inverse")[
        0
    ] == pytest.approx(3.0)
    eff = class_weights(counts, "effective", beta=0.9)
    ratio = (1 - 0.9**90) / (1 - 0.9**10)
    assert eff[1] / eff[0] == pytest.approx(ratio, rel=1e-5)
    with pytest.raises(ValueError, match="scheme"):
        class_weights(counts, "bogus")  # type: ignore[arg-type]


def test_focal_loss_hand_computed_and_reduces_to_ce() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    target = torch.tensor([0, 0])
    assert FocalLoss(gamma=0.0)(logits, target).item() == pytest.approx(
        F.cross_entropy(logits, target).item()
    )
    p = torch.softmax(logits, -1)[:, 0]
    expected = ((1 - p) ** 2 * -torch.log(p)).mean().item()
    assert FocalLoss(gamma=2.0)(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # easy examples are down-weighted more than hard ones
    assert FocalLoss(gamma=2.0)(logits[:1], target[:1]) / F.cross_entropy(logits[:1], target[:1]) < (
        FocalLoss(gamma=2.0)(logits[1:], target[1:]) / F.cross_entropy(logits[1:], target[1:])
    )
    w = torch.tensor([1.0, 3.0])
    assert FocalLoss(gamma=0.0, weight=w)(logits, torch.tensor([0, 1])).item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([0, 1]), weight=w).item()
    )


def test_logit_adjusted_loss_adds_log_prior() -> None:
    logits = torch.tensor([[1.0, 1.0]])
    loss = LogitAdjustedLoss([0.9, 0.1], tau=1.0)(logits, torch.tensor([1]))
    adjusted = logits + torch.log(torch.tensor([0.9, 0.1]))
    assert loss.item() == pytest.approx(F.cross_entropy(adjusted, torch.tensor([1])).item())
    # the rare class is penalised harder when the logits are tied: the model must push it further
    assert loss.item() > F.cross_entropy(logits, torch.tensor([1])).item() > math.log(2) - 1e-6


def test_balanced_sampler_balances_and_shards() -> None:
    targets = [0] * 950 + [1] * 50
    s = BalancedDistributedSampler(targets, seed=0)
    drawn = np.asarray(targets)[list(s)]
    assert abs(drawn.mean() - 0.5) < 0.06  # ~half minority instead of 5%
    r0 = BalancedDistributedSampler(targets, num_replicas=2, rank=0, seed=1)
    r1 = BalancedDistributedSampler(targets, num_replicas=2, rank=1, seed=1)
    a, b = list(r0), list(r1)
    assert len(a) == len(b) == 500
    both = BalancedDistributedSampler(targets, seed=1)
    assert sorted(a + b) == sorted(both)  # the two ranks split one draw
    r0.set_epoch(1)
    assert list(r0) != a and list(BalancedDistributedSampler(targets, num_replicas=2, rank=0, seed=1)) == a
