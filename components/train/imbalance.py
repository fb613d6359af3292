"""Class imbalance: per-class weights, a (distributed) class-balanced sampler and imbalance-aware
losses — focal loss and logit adjustment (Menon et al., 2021, "Long-tail learning via logit
adjustment"). Multi-label tasks use timm's asymmetric loss (``timm.loss.AsymmetricLossMultiLabel``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Sampler

WeightScheme = Literal["inverse", "sqrt_inverse", "effective"]


def class_counts(targets: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes)


def class_weights(
    counts: Sequence[int], scheme: WeightScheme = "inverse", beta: float = 0.999
) -> torch.Tensor:
    """Per-class loss weights, normalised to mean 1 over the classes present.

    ``inverse``: 1/n; ``sqrt_inverse``: 1/sqrt(n); ``effective``: (1 - beta) / (1 - beta^n), the
    effective number of samples (Cui et al., 2019). Absent classes get weight 0.
    """
    n = np.asarray(counts, dtype=np.float64)
    present = n > 0
    w = np.zeros_like(n)
    if scheme == "inverse":
        w[present] = 1.0 / n[present]
    elif scheme == "sqrt_inverse":
        w[present] = 1.0 / np.sqrt(n[present])
    elif scheme == "effective":
        w[present] = (1.0 - beta) / (1.0 - np.power(beta, n[present]))
    else:
        raise ValueError(f"unknown class-weight scheme {scheme!r}")
    w[present] *= present.sum() / w[present].sum()
    return torch.tensor(w, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al., 2017): cross-entropy scaled by (1 - p_t)^gamma, optional
    per-class ``weight`` (alpha). gamma=0 is (weighted) cross-entropy."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.weight: torch.Tensor | None
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)
        ce = F.nll_loss(logp, target, reduction="none")
        if self.label_smoothing:
            ce = (1 - self.label_smoothing) * ce - self.label_smoothing * logp.mean(dim=-1)
        pt = logp.gather(1, target[:, None]).squeeze(1).exp()
        loss = (1 - pt).pow(self.gamma) * ce
        if self.weight is not None:
            w = self.weight[target]
            return (w * loss).sum() / w.sum()
        return loss.mean()


class LogitAdjustedLoss(nn.Module):
    """Cross-entropy on ``logits + tau * log(prior)``: trains a model whose plain argmax is balanced
    (the logit-adjusted loss of Menon et al.). Served logits need no change."""

    def __init__(self, prior: Sequence[float], tau: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        p = torch.as_tensor(np.asarray(prior, dtype=np.float64), dtype=torch.float32).clamp(min=1e-12)
        self.offset: torch.Tensor
        self.register_buffer("offset", tau * torch.log(p / p.sum()))
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.offset, target, label_smoothing=self.label_smoothing)


class BalancedDistributedSampler(Sampler[int]):
    """Class-balanced sampling with replacement (weights 1/n_class), sharded over data-parallel ranks.

    Each epoch draws ``len(dataset)`` indices from one generator seeded by (seed, epoch) — the same on
    every rank — and rank r takes every world-th of them, so ranks see disjoint draws. Call
    ``set_epoch`` each epoch (Ray Train's loop does for any sampler that has it).
    """

    def __init__(
        self, targets: Sequence[int] | np.ndarray, *, num_replicas: int = 1, rank: int = 0, seed: int = 0
    ) -> None:
        t = np.asarray(targets, dtype=np.int64)
        counts = np.bincount(t)
        self.weights = torch.as_tensor(1.0 / counts[t], dtype=torch.double)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.total = len(t) - len(t) % num_replicas if len(t) >= num_replicas else len(t)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        draws = torch.multinomial(self.weights, self.total, replacement=True, generator=g)
        return iter(draws[self.rank :: self.num_replicas].tolist())


def create_multilabel_loss(
    kind: str,
    positives: Sequence[int],
    total: int,
    *,
    weight_scheme: WeightScheme | None = None,
    focal_gamma: float = 2.0,
    asl: tuple[float, float, float] = (4.0, 1.0, 0.05),
    label_smoothing: float = 0.0,
) -> nn.Module:
    """The multi-label training loss (one sigmoid per label), all through timm's asymmetric loss,
    averaged over images and labels: ``ce`` is binary cross-entropy (no focusing, no clipping),
    ``focal`` the sigmoid focal loss (gamma on both terms), ``asymmetric`` ASL with ``asl`` =
    (gamma_neg, gamma_pos, clip). ``weight_scheme`` weights each label's positive term by
    negatives/positives (``inverse``) or its square root (``sqrt_inverse``), from the train split's
    ``positives`` per label out of ``total`` images."""
    from timm.loss import AsymmetricLossMultiLabel

    if kind in ("ce", "bce"):
        gamma_neg, gamma_pos, clip = 0.0, 0.0, 0.0
    elif kind == "focal":
        gamma_neg, gamma_pos, clip = focal_gamma, focal_gamma, 0.0
    elif kind == "asymmetric":
        gamma_neg, gamma_pos, clip = asl
    else:
        raise ValueError(f"loss {kind!r} is not for multi-label tasks: use ce, focal or asymmetric")
    pos_weight = None
    if weight_scheme is not None:
        if weight_scheme not in ("inverse", "sqrt_inverse"):
            raise ValueError(
                f"class_weights={weight_scheme!r} is single-label only: use inverse or sqrt_inverse"
            )
        pos = np.maximum(np.asarray(positives, dtype=np.float64), 1.0)
        ratio = np.maximum(total - pos, 1.0) / pos
        pos_weight = torch.tensor(
            ratio if weight_scheme == "inverse" else np.sqrt(ratio), dtype=torch.float32
        )
    return AsymmetricLossMultiLabel(
        gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, smoothing=label_smoothing,
        reduction="mean", pos_weight=pos_weight, disable_torch_grad_focal_loss=False,
    )  # fmt: skip


def create_loss(
    kind: str,
    counts: Sequence[int],
    *,
    weight_scheme: WeightScheme | None = None,
    focal_gamma: float = 2.0,
    tau: float = 1.0,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """The training loss for ``train.loss`` (ce | focal | logit_adjusted), with optional per-class
    weights from the train split's class ``counts``: (K,) ints."""
    weight = class_weights(counts, weight_scheme) if weight_scheme else None
    if kind == "ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if kind == "focal":
        return FocalLoss(gamma=focal_gamma, weight=weight, label_smoothing=label_smoothing)
    if kind == "logit_adjusted":
        n = np.asarray(counts, dtype=np.float64)
        return LogitAdjustedLoss(n / n.sum(), tau=tau, label_smoothing=label_smoothing)
    raise ValueError(f"unknown loss {kind!r}: use ce, focal or logit_adjusted")


@dataclass(frozen=True)
class LossChoice:
    """``train.loss`` and its knobs (see ``TrainConfig``); one set for both task kinds."""

    kind: str
    class_weights: WeightScheme | None
    focal_gamma: float
    logit_adjust_tau: float
    asl: tuple[float, float, float]
    """(gamma_neg, gamma_pos, clip) of the asymmetric loss."""
    label_smoothing: float


def _softmax_training_loss(
    choice: LossChoice, targets: np.ndarray, num_classes: int, *, soft: bool
) -> nn.Module:
    """One class per image: ``targets`` (N,) class indices give the class counts."""
    if soft:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()  # mixup/cutmix already smoothed the targets
    counts = class_counts(targets.astype(np.int64), num_classes).tolist()
    return create_loss(
        choice.kind, counts, weight_scheme=choice.class_weights, focal_gamma=choice.focal_gamma,
        tau=choice.logit_adjust_tau, label_smoothing=choice.label_smoothing,
    )  # fmt: skip


def _sigmoid_training_loss(
    choice: LossChoice, targets: np.ndarray, num_classes: int, *, soft: bool
) -> nn.Module:
    """One sigmoid per label: ``targets`` (N, K) multi-hot give each label's positives."""
    positives = targets.sum(axis=0).tolist() if targets.size else [0] * num_classes
    return create_multilabel_loss(
        choice.kind, positives, len(targets), weight_scheme=choice.class_weights,
        focal_gamma=choice.focal_gamma, asl=choice.asl, label_smoothing=choice.label_smoothing,
    )  # fmt: skip


_TRAINING_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "softmax": _softmax_training_loss,
    "sigmoid": _sigmoid_training_loss,
}


def create_training_loss(
    activation: str, choice: LossChoice, targets: Sequence[int] | np.ndarray, num_classes: int, *, soft: bool
) -> nn.Module:
    """The training loss for a task's output ``activation`` (``Task.activation``: softmax | sigmoid).

    ``targets``: the train split's class indices (N,) or multi-hot rows (N, K), whose counts class
    weights and logit adjustment need; ``soft``: the batches carry soft targets (mixup/cutmix).
    """
    return _TRAINING_LOSSES[activation](choice, np.asarray(targets), num_classes, soft=soft)
