"""The :class:`Task` objects: single-label (one class per image) and multi-label (a set per image).

Each task owns what differs between the two: the targets' encoding, the probabilities of a
model's logits (softmax / one sigmoid per label), the decision rule (argmax / per-label
thresholds), the headline metric, the evaluation loss and which training options apply. Later
layers add what they need as methods here, never as ``if task == ...`` branches of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from scipy.special import expit, log_softmax

from components.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from components.core.config import TrainConfig

SINGLELABEL = "singlelabel"
MULTILABEL = "multilabel"
TASK_NAMES = (SINGLELABEL, MULTILABEL)


class Task:
    """What a classification task decides; use :func:`get_task` to get one (instances are shared)."""

    name: ClassVar[str]
    """As stored in dataset.json, model.json and MLflow tags: ``singlelabel`` or ``multilabel``."""
    title: ClassVar[str]
    """For people: ``single-label`` or ``multi-label``."""
    headline: ClassVar[str]
    """The one number that sums a model up: ``accuracy`` or ``mAP``."""
    target_dtype: ClassVar[type[np.generic]]
    activation: ClassVar[str]
    """The output activation, ``softmax`` (one class) or ``sigmoid`` (one per label): it picks the
    family of training losses (``components.train.imbalance``)."""

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    # --- targets ---------------------------------------------------------------------------------
    def encode(self, label_sets: Sequence[Sequence[str]], classes: Sequence[str]) -> np.ndarray:
        """Each image's labels (a one-element list for single-label) -> targets in ``classes``
        order: (N,) int64 class indices, or (N, K) int8 indicators. An unknown name is a DataError."""
        known = set(classes)
        unknown = sorted({lab for labels in label_sets for lab in labels if lab not in known})
        if unknown:
            raise DataError(f"labels not in the class list: {unknown[:10]}; re-run `imgflow ingest`")
        return self._encode(label_sets, {c: i for i, c in enumerate(classes)}, len(classes))

    def _encode(self, label_sets: Sequence[Sequence[str]], index: dict[str, int], k: int) -> np.ndarray:
        raise NotImplementedError

    def one_hot(self, targets: np.ndarray, k: int) -> np.ndarray:
        """targets -> (N, K) int8 indicators (what one-vs-rest curves and AP read)."""
        raise NotImplementedError

    # --- probabilities and decisions ---------------------------------------------------------------
    def probabilities(self, logits: np.ndarray, *, temperature: float = 1.0) -> np.ndarray:
        """logits: (N, K) -> float64 probabilities of ``logits / temperature``."""
        raise NotImplementedError

    def torch_probabilities(self, logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        """The same as :meth:`probabilities` on a tensor (float32; what the served model computes)."""
        raise NotImplementedError

    def decide(self, probs: np.ndarray, *, thresholds: Sequence[float] | None = None) -> np.ndarray:
        """probs: (N, K) -> predictions: (N,) class indices, or (N, K) int8 chosen labels."""
        raise NotImplementedError

    def label_sets(
        self, probs: np.ndarray, classes: Sequence[str], *, thresholds: Sequence[float] | None = None
    ) -> list[list[str]]:
        """The predicted labels of each image, most probable first (single-label: one class;
        multi-label: every label at or above its threshold, possibly none)."""
        chosen = np.asarray(self.decide(probs, thresholds=thresholds))
        if chosen.ndim == 1:
            return [[classes[int(i)]] for i in chosen]
        return [
            [classes[int(j)] for j in np.argsort(-row, kind="stable") if hit[j]]
            for row, hit in zip(probs, chosen, strict=True)
        ]

    def correct(
        self, probs: np.ndarray, targets: np.ndarray, *, thresholds: Sequence[float] | None = None
    ) -> np.ndarray:
        """(N,) bool: the image's prediction is right (top-1, or the whole label set)."""
        chosen = self.decide(probs, thresholds=thresholds)
        return chosen == targets if chosen.ndim == 1 else (chosen == targets).all(axis=1)

    # --- training ---------------------------------------------------------------------------------
    def eval_loss(self) -> nn.Module:
        """The plain loss reported on val every epoch (cross-entropy / BCE per label)."""
        raise NotImplementedError

    def check_train_options(self, cfg: TrainConfig) -> None:
        """Options that only the other task supports get a clear ConfigError."""
        raise NotImplementedError


class SingleLabel(Task):
    name = SINGLELABEL
    title = "single-label"
    headline = "accuracy"
    target_dtype = np.int64
    activation = "softmax"

    def _encode(self, label_sets: Sequence[Sequence[str]], index: dict[str, int], k: int) -> np.ndarray:
        if bad := [list(s) for s in label_sets if len(s) != 1][:5]:
            raise DataError(f"a single-label task needs exactly one label per image, got {bad}")
        return np.asarray([index[s[0]] for s in label_sets], dtype=np.int64)

    def one_hot(self, targets: np.ndarray, k: int) -> np.ndarray:
        return np.eye(k, dtype=np.int8)[np.asarray(targets, dtype=np.int64)]

    def probabilities(self, logits: np.ndarray, *, temperature: float = 1.0) -> np.ndarray:
        return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))

    def torch_probabilities(self, logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        import torch

        return torch.softmax(logits.float() / temperature, dim=1)

    def decide(self, probs: np.ndarray, *, thresholds: Sequence[float] | None = None) -> np.ndarray:
        return np.asarray(probs).argmax(axis=1)

    def eval_loss(self) -> nn.Module:
        from torch import nn

        return nn.CrossEntropyLoss()

    def check_train_options(self, cfg: TrainConfig) -> None:
        if cfg.loss == "asymmetric":
            raise ConfigError(
                "train.loss=asymmetric is for multi-label datasets: use ce, focal or logit_adjusted"
            )


class MultiLabel(Task):
    name = MULTILABEL
    title = "multi-label"
    headline = "mAP"
    target_dtype = np.int8
    activation = "sigmoid"

    def _encode(self, label_sets: Sequence[Sequence[str]], index: dict[str, int], k: int) -> np.ndarray:
        y = np.zeros((len(label_sets), k), dtype=np.int8)
        for row, labels in enumerate(label_sets):
            y[row, [index[lab] for lab in labels]] = 1
        return y

    def one_hot(self, targets: np.ndarray, k: int) -> np.ndarray:
        return np.asarray(targets, dtype=np.int8)

    def probabilities(self, logits: np.ndarray, *, temperature: float = 1.0) -> np.ndarray:
        return np.asarray(expit(np.asarray(logits, dtype=np.float64) / temperature))

    def torch_probabilities(self, logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        import torch

        return torch.sigmoid(logits.float() / temperature)

    def decide(self, probs: np.ndarray, *, thresholds: Sequence[float] | None = None) -> np.ndarray:
        probs = np.asarray(probs)
        cut = np.asarray(thresholds if thresholds is not None else (0.5,) * probs.shape[1], dtype=probs.dtype)
        if cut.shape != (probs.shape[1],):
            raise ValueError(f"{cut.size} thresholds for {probs.shape[1]} labels")
        return (probs >= cut[None, :]).astype(np.int8)

    def eval_loss(self) -> nn.Module:
        from torch import nn

        return nn.BCEWithLogitsLoss()

    def check_train_options(self, cfg: TrainConfig) -> None:
        wrong = {
            "loss=logit_adjusted": cfg.loss == "logit_adjusted",
            "sampler=balanced": cfg.sampler == "balanced",
            "mixup/cutmix": cfg.mixup > 0 or cfg.cutmix > 0,
            "class_weights=effective": cfg.class_weights == "effective",
        }
        if bad := [k for k, v in wrong.items() if v]:
            raise ConfigError(
                f"the dataset is multi-label but train.{', train.'.join(bad)} is single-label only: use "
                "loss ce|focal|asymmetric, class_weights null|inverse|sqrt_inverse, sampler random"
            )


_TASKS: dict[str, Task] = {t.name: t for t in (SingleLabel(), MultiLabel())}


def get_task(name: str | Task | None) -> Task:
    """The task called ``name`` (``None``: single-label, what data written before tasks existed is)."""
    if isinstance(name, Task):
        return name
    try:
        return _TASKS[name or SINGLELABEL]
    except KeyError:
        raise DataError(f"unknown task {name!r}: expected one of {', '.join(TASK_NAMES)}") from None
