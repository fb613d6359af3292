"""``train.loss: soft_labels``: the hierarchy-aware soft labels of Bertinetto et al. ("Making Better
Mistakes", CVPR 2020).

Each true class ``c`` becomes the target distribution ``q_k ∝ exp(-beta * d(k, c) / H)`` over the
classes, ``d`` the tree distance (height of the lowest common ancestor) and ``H`` the tree's height:
siblings of the truth get more mass than cousins, so a mistake the model makes tends to stay inside
the right parent. Large ``beta`` tends to plain one-hot cross-entropy. Reported, not gated: the
evaluation's per-decoding rows show what it did.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from components.task.taxonomy import Taxonomy


def soft_label_matrix(distance: np.ndarray, *, beta: float, height: float) -> np.ndarray:
    """(K, K) row c = the soft target of true class c. distance: (K, K) tree distances."""
    if beta <= 0:
        raise ValueError(f"soft-label beta must be > 0, got {beta}")
    logits = -beta * np.asarray(distance, dtype=np.float64) / max(height, 1.0)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


class SoftLabelLoss(nn.Module):
    """Cross-entropy against the tree's soft target of each image's class.

    Takes the same (logits (B, K), class indices (B,)) as ``nn.CrossEntropyLoss``; soft (B, K) targets
    (mixup/cutmix) are mixed through the matrix too: ``targets @ Q``.
    """

    def __init__(self, targets: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("soft", torch.as_tensor(targets, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        soft: torch.Tensor = self.soft  # type: ignore[assignment]  # a registered buffer
        q = soft[target] if target.dim() == 1 else target.float() @ soft
        return -(q * torch.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def create_soft_label_loss(tree: Taxonomy, *, beta: float) -> SoftLabelLoss:
    """The soft-label loss over ``tree``'s leaves (in the model's class order)."""
    return SoftLabelLoss(soft_label_matrix(tree.distance_matrix(), beta=beta, height=tree.height()))
