"""The :class:`Task` objects: single-label (one class per image) and multi-label (a set per image).

Each task owns what differs between the two: the targets' encoding, the probabilities of a
model's logits (softmax / one sigmoid per label), the decision rule (argmax / per-label
thresholds) and how it is fitted, the headline metric, the metric set and its scalars, which gates
apply, the champion comparison statistic, the loss a temperature is fitted by, the calibration
view, the evaluation loss and which training options apply. Later layers add what they need as
methods here, never as ``if task == ...`` branches of their own.

The metric implementations live beside this module (:mod:`components.task.metrics`,
:mod:`components.task.multilabel`, :mod:`components.task.comparison`) and are imported where a
method needs them, so that importing a task (every stage does) does not import scikit-learn.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from scipy.special import expit, log_softmax

from components.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from components.core.config import GatesConfig, TrainConfig
    from components.task.multilabel import ThresholdRule

logger = logging.getLogger(__name__)

SINGLELABEL = "singlelabel"
MULTILABEL = "multilabel"
TASK_NAMES = (SINGLELABEL, MULTILABEL)


@dataclass(frozen=True)
class Decision:
    """A task's decision rule as fitted on val (:meth:`Task.fit_decision`)."""

    thresholds: tuple[float, ...] | None = None
    """Multi-label: each label's decision threshold, in class order (None: argmax, nothing fitted)."""
    tuning: dict[str, Any] | None = None
    """How the thresholds were tuned (rule, target, fitted_on, n_fit, per_label), kept with the metrics."""

    def annotate(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """``metrics`` plus ``threshold_tuning`` when something was tuned."""
        return metrics if self.tuning is None else {**metrics, "threshold_tuning": self.tuning}


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
    rows_key: ClassVar[str]
    """Where a metrics dict keeps its per-class rows: ``per_class`` or ``per_label``."""
    row_name: ClassVar[str]
    """The key naming a row's class in those rows: ``class`` or ``label``."""
    part_metric: ClassVar[str]
    """The per-class number set beside the headline (baselines, reports): ``recall`` or ``ap``."""
    row_columns: ClassVar[tuple[str, ...]]
    """Columns of ``per_class.csv`` (the row's name always in ``class``)."""
    summary_keys: ClassVar[tuple[str, ...]]
    """The few metrics that sum a model up next to others (e.g. the CLIP baselines in MLflow)."""
    gates: ClassVar[tuple[str, ...]]
    """Names of the gates that apply to a model of this task, in report order (``params.yaml`` gates)."""
    fits_decision: ClassVar[bool]
    """True when the decision rule is fitted on val (:meth:`fit_decision`), so val is always predicted."""
    correct_name: ClassVar[str]
    """What :meth:`correct` counts, in words: ``accuracy`` or ``subset accuracy``."""
    correct_phrase: ClassVar[str]
    """Images counted by :meth:`correct` ..., e.g. ``are right``."""
    calibration_name: ClassVar[str]
    """What the calibration error is taken over: ``ECE`` or ``mean per-label ECE``."""
    reliability_axes: ClassVar[tuple[str, str]]
    """(x, y) axis labels of the reliability diagram."""
    confusion_axes: ClassVar[tuple[str, str]]
    """(rows, columns) axis labels of the confusion matrix (see :meth:`metrics`)."""
    several_labels: ClassVar[bool]
    """True when an image carries a set of labels: a class's count is its label occurrences, label
    checks run on one row per (image, label), and the objects may be anywhere in the image."""
    label_column: ClassVar[str]
    """The manifest column holding an image's label(s): ``label`` (one class) or ``labels`` (its set)."""
    label_table: ClassVar[str]
    """The validation frame with one row per label occurrence: ``manifest`` (one label per image) or
    ``label_rows`` (one row per image and label)."""
    label_scope: ClassVar[str]
    """Appended to a rule about an image's label: ``""`` or ``" (among all labels of each image)"``."""
    counted_images: ClassVar[str]
    """What a class's image count counts, in words: ``images`` or ``images carrying it``."""
    audit_features: ClassVar[str]
    """The label audit's features for ``audit.features: auto``: ``pca`` of the whole image, or
    ``patches`` (multi-label: the objects may be anywhere in the image)."""

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def manifest_label_sets(self, rows: Any) -> list[list[str]]:
        """Each manifest row's labels, read from :attr:`label_column` of ``rows`` (a DataFrame)."""
        raise NotImplementedError

    def imbalance_rule(self, ratio: float) -> str:
        """The class-imbalance rule in words, for a largest/smallest count ratio of at most ``ratio``."""
        raise NotImplementedError

    def tagged(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """``record`` with this task's ``task`` key where the stored form carries one: multi-label files
        say ``task: multilabel``; single-label ones (written before tasks existed) say nothing."""
        raise NotImplementedError

    # --- targets ---------------------------------------------------------------------------------
    def encode(self, label_sets: Sequence[Sequence[str]], classes: Sequence[str]) -> np.ndarray:
        """Each image's labels (a one-element list for single-label) -> targets in ``classes``
        order: (N,) int64 class indices, or (N, K) int8 indicators. An unknown name is a DataError."""
        known = set(classes)
        unknown = sorted({lab for labels in label_sets for lab in labels if lab not in known})
        if unknown:
            raise DataError(f"labels not in the class list: {unknown[:10]}; re-run `imgflow ingest`")
        return self._encode(label_sets, classes)

    def _encode(self, label_sets: Sequence[Sequence[str]], classes: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def one_hot(self, targets: np.ndarray, k: int) -> np.ndarray:
        """targets -> (N, K) int8 indicators (what one-vs-rest curves and AP read)."""
        raise NotImplementedError

    def accepts(self, labels: Sequence[str]) -> bool:
        """Whether an image with these labels belongs in a dataset of this task (single-label: not
        several labels; ingest quarantines the others)."""
        raise NotImplementedError

    def assign_splits(
        self,
        image_ids: Sequence[str],
        label_sets: Sequence[Sequence[str]],
        *,
        val_fraction: float,
        test_fraction: float,
        seed: int,
    ) -> list[str]:
        """``train``/``val``/``test`` per image, stratified the task's way
        (:mod:`components.task.splits`): per class with exact quotas, or by iterative stratification
        of the label sets. Deterministic and independent of the input order."""
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

    def strata(self, targets: np.ndarray) -> np.ndarray:
        """targets -> (N,) int stratum of each image for stratified sampling (its class, or its first
        label: -1 for an empty set)."""
        raise NotImplementedError

    def fit_decision(
        self,
        targets: np.ndarray | None,
        probs: np.ndarray | None,
        classes: Sequence[str],
        *,
        rule: ThresholdRule = "f1",
        target: float | None = None,
    ) -> Decision:
        """Fit the decision rule on val's targets and (calibrated) probabilities (None: no val split).
        Single-label: nothing to fit (argmax); multi-label: per-label thresholds by ``rule``
        (``f1``, or reach ``target`` ``precision``/``recall``), 0.5 each without val."""
        raise NotImplementedError

    # --- metrics ----------------------------------------------------------------------------------
    def metrics(
        self,
        targets: np.ndarray,
        probs: np.ndarray,
        classes: Sequence[str],
        *,
        thresholds: Sequence[float] | None = None,
        top_k: int = 5,
        confidence: float = 0.95,
    ) -> dict[str, Any]:
        """The test metrics of one model, JSON-able: :func:`components.task.metrics.compute_metrics`
        (single-label; ``top_k``) or :func:`components.task.multilabel.multilabel_metrics` (at
        ``thresholds``, 0.5 each when None). targets: :meth:`encode`'s; probs: (N, K)."""
        raise NotImplementedError

    def flat_metrics(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """The scalars of a :meth:`metrics` dict (MLflow, ``dvc metrics``): overall numbers plus
        ``<metric>_<class slug>`` per class."""
        raise NotImplementedError

    def headline_value(self, metrics: Mapping[str, Any]) -> float | None:
        """The :attr:`headline` number of a metrics dict (None when undefined, e.g. mAP without positives)."""
        value = metrics.get(self.headline)
        return None if value is None else float(value)

    def headline_of_scores(self, scores: np.ndarray, targets: np.ndarray) -> float:
        """The headline straight from raw scores (N, K): top-1 accuracy or mAP need neither a
        temperature nor thresholds, as they depend only on the order of the scores."""
        raise NotImplementedError

    def rows(self, metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The per-class (per-label) rows of a metrics dict."""
        return list(metrics[self.rows_key])

    def class_names(self, metrics: Mapping[str, Any]) -> list[str]:
        return [str(row[self.row_name]) for row in self.rows(metrics)]

    def thresholds_of(self, metrics: Mapping[str, Any]) -> list[float] | None:
        """The decision thresholds a metrics dict was measured at, in class order (None: argmax)."""
        return None

    def most_confused(self, metrics: Mapping[str, Any], *, k: int = 5) -> list[dict[str, Any]]:
        """The ``k`` largest off-diagonal cells of the confusion matrix, most images first.

        Each: ``true``, ``predicted`` (class names), ``count`` and ``share`` (of the true class's test
        images). Cells with no image are left out, so a perfect model has none. Multi-label: ``true`` is
        a label that was missed while ``predicted`` was predicted without being there (share: of the
        test images showing the missed label).
        """
        cm = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
        classes = self.class_names(metrics)
        off = cm.copy()
        np.fill_diagonal(off, 0)
        order = np.argsort(-off, axis=None, kind="stable")[:k]
        support = np.asarray([int(r["support"]) for r in self.rows(metrics)])
        return [
            {"true": classes[i], "predicted": classes[j], "count": int(off[i, j]),
             "share": float(off[i, j] / support[i]) if support[i] else 0.0}
            for i, j in (np.unravel_index(o, off.shape) for o in order)
            if off[i, j] > 0
        ]  # fmt: skip

    # --- champion comparison ----------------------------------------------------------------------
    def compare(
        self,
        targets: np.ndarray,
        challenger: np.ndarray,
        champion: np.ndarray,
        classes: Sequence[str],
        *,
        gates: GatesConfig,
        n_boot: int = 2000,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Non-inferiority of a challenger against the champion on the same images; challenger,
        champion: (N, K) scores (logits or probabilities). Single-label: per-image correctness
        (accuracy, each class's recall); multi-label: mAP and each label's AP. Margins and
        confidence from ``gates``. Returns ``{<headline>: {...}, <rows_key>: [...], confidence, n_boot}``
        (see :mod:`components.task.comparison`)."""
        raise NotImplementedError

    # --- calibration ------------------------------------------------------------------------------
    def log_loss(self, logits: np.ndarray, targets: np.ndarray, *, temperature: float = 1.0) -> float:
        """The mean log-loss of :meth:`probabilities` of ``logits / temperature`` (what a temperature is
        fitted by): NLL of the softmax per image, or BCE per (image, label)."""
        raise NotImplementedError

    def calibration_groups(
        self, probs: np.ndarray, targets: np.ndarray, classes: Sequence[str]
    ) -> tuple[list[str] | None, np.ndarray, np.ndarray]:
        """The confidence statements whose calibration is measured: (group names, or None for one
        unnamed group; stated probabilities (N, G); outcomes (N, G) 0/1). Single-label: one group,
        the top label's probability and whether it is right; multi-label: one group per label, each
        label's probability and whether the label is there (class-wise calibration)."""
        raise NotImplementedError

    def calibration_stats(self, probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        """Calibration numbers besides ECE/MCE: ``nll`` and the mean stated confidence
        (``mean_confidence``; multi-label: ``mean_probability`` and ``positive_rate``)."""
        raise NotImplementedError

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
    rows_key = "per_class"
    row_name = "class"
    part_metric = "recall"
    row_columns = ("class", "precision", "recall", "recall_lower", "recall_upper", "f1", "support", "roc_auc",
                   "pr_auc")  # fmt: skip
    summary_keys = ("accuracy", "macro_f1", "balanced_accuracy")
    gates = ("min_accuracy", "min_class_recall", "max_ece", "min_relative_robustness", "min_family_robustness",
             "min_slice_accuracy", "max_accuracy_drop", "max_class_recall_drop")  # fmt: skip
    fits_decision = False
    correct_name = "accuracy"
    correct_phrase = "are right"
    calibration_name = "ECE"
    reliability_axes = ("confidence", "accuracy")
    confusion_axes = ("true", "predicted")
    several_labels = False
    label_column = "label"
    label_table = "manifest"
    label_scope = ""
    counted_images = "images"
    audit_features = "pca"

    def tagged(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return dict(record)

    def manifest_label_sets(self, rows: Any) -> list[list[str]]:
        return [[lab] for lab in rows[self.label_column]]

    def imbalance_rule(self, ratio: float) -> str:
        return f"the largest class has at most {ratio:g}x the images of any other class"

    def _encode(self, label_sets: Sequence[Sequence[str]], classes: Sequence[str]) -> np.ndarray:
        if bad := [list(s) for s in label_sets if len(s) != 1][:5]:
            raise DataError(f"a single-label task needs exactly one label per image, got {bad}")
        index = {c: i for i, c in enumerate(classes)}
        return np.asarray([index[s[0]] for s in label_sets], dtype=np.int64)

    def one_hot(self, targets: np.ndarray, k: int) -> np.ndarray:
        return np.eye(k, dtype=np.int8)[np.asarray(targets, dtype=np.int64)]

    def accepts(self, labels: Sequence[str]) -> bool:
        return len(labels) <= 1

    def assign_splits(
        self,
        image_ids: Sequence[str],
        label_sets: Sequence[Sequence[str]],
        *,
        val_fraction: float,
        test_fraction: float,
        seed: int,
    ) -> list[str]:
        from components.task.splits import assign_splits

        return assign_splits(image_ids, [labels[0] for labels in label_sets], val_fraction=val_fraction,
                             test_fraction=test_fraction, seed=seed)  # fmt: skip

    def probabilities(self, logits: np.ndarray, *, temperature: float = 1.0) -> np.ndarray:
        return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))

    def torch_probabilities(self, logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        import torch

        return torch.softmax(logits.float() / temperature, dim=1)

    def decide(self, probs: np.ndarray, *, thresholds: Sequence[float] | None = None) -> np.ndarray:
        return np.asarray(probs).argmax(axis=1)

    def strata(self, targets: np.ndarray) -> np.ndarray:
        return np.asarray(targets)

    def fit_decision(
        self,
        targets: np.ndarray | None,
        probs: np.ndarray | None,
        classes: Sequence[str],
        *,
        rule: ThresholdRule = "f1",
        target: float | None = None,
    ) -> Decision:
        return Decision()

    def metrics(
        self,
        targets: np.ndarray,
        probs: np.ndarray,
        classes: Sequence[str],
        *,
        thresholds: Sequence[float] | None = None,
        top_k: int = 5,
        confidence: float = 0.95,
    ) -> dict[str, Any]:
        from components.task.metrics import compute_metrics

        return compute_metrics(targets, probs, classes, top_k=top_k, confidence=confidence)

    def flat_metrics(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        from components.task.metrics import flat_singlelabel

        return flat_singlelabel(metrics)

    def headline_of_scores(self, scores: np.ndarray, targets: np.ndarray) -> float:
        return float((np.asarray(scores).argmax(axis=1) == np.asarray(targets)).mean())

    def compare(
        self,
        targets: np.ndarray,
        challenger: np.ndarray,
        champion: np.ndarray,
        classes: Sequence[str],
        *,
        gates: GatesConfig,
        n_boot: int = 2000,
        seed: int = 0,
    ) -> dict[str, Any]:
        from components.task.comparison import compare_predictions

        return compare_predictions(
            targets, self.decide(challenger), self.decide(champion), classes, margin=gates.max_accuracy_drop,
            class_margin=gates.max_class_recall_drop, n_boot=n_boot, confidence=gates.confidence, seed=seed,
        )  # fmt: skip

    def log_loss(self, logits: np.ndarray, targets: np.ndarray, *, temperature: float = 1.0) -> float:
        from components.task.metrics import nll_of_logits

        return nll_of_logits(logits, targets, temperature)

    def calibration_groups(
        self, probs: np.ndarray, targets: np.ndarray, classes: Sequence[str]
    ) -> tuple[list[str] | None, np.ndarray, np.ndarray]:
        p, y = np.asarray(probs, dtype=np.float64), np.asarray(targets)
        if p.ndim != 2 or y.shape != (p.shape[0],) or p.shape[0] == 0:
            raise ValueError(f"need probs (N, K) and targets (N,) with N > 0, got {p.shape} and {y.shape}")
        return None, p.max(axis=1)[:, None], (p.argmax(axis=1) == y)[:, None]

    def calibration_stats(self, probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        p = np.asarray(probs, dtype=np.float64)
        # The NLL of the probabilities as given (clipped: a hard 0 would be an infinite loss).
        return {"nll": self.log_loss(np.log(np.clip(p, 1e-12, None)), targets),
                "mean_confidence": float(p.max(axis=1).mean())}  # fmt: skip

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
    rows_key = "per_label"
    row_name = "label"
    part_metric = "ap"
    row_columns = ("class", "ap", "roc_auc", "precision", "recall", "recall_lower", "recall_upper", "f1",
                   "support", "threshold")  # fmt: skip
    summary_keys = ("mAP", "micro_f1", "macro_f1")
    gates = ("min_map", "min_label_ap", "min_class_recall", "max_ece", "min_relative_robustness",
             "min_family_robustness", "min_slice_accuracy", "max_map_drop", "max_label_ap_drop")  # fmt: skip
    fits_decision = True
    correct_name = "subset accuracy"
    correct_phrase = "get their whole label set right"
    calibration_name = "mean per-label ECE"
    reliability_axes = ("predicted probability", "observed frequency")
    confusion_axes = ("missed label", "falsely predicted label (diagonal: hits)")
    several_labels = True
    label_column = "labels"
    label_table = "label_rows"
    label_scope = " (among all labels of each image)"
    counted_images = "images carrying it"
    audit_features = "patches"

    def tagged(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return {**record, "task": self.name}

    def manifest_label_sets(self, rows: Any) -> list[list[str]]:
        return [label_set(v) for v in rows[self.label_column]]

    def imbalance_rule(self, ratio: float) -> str:
        return f"the most frequent label occurs in at most {ratio:g}x the images of any other label"

    def _encode(self, label_sets: Sequence[Sequence[str]], classes: Sequence[str]) -> np.ndarray:
        from components.task.multilabel import label_matrix

        return label_matrix(label_sets, classes)

    def one_hot(self, targets: np.ndarray, k: int) -> np.ndarray:
        return np.asarray(targets, dtype=np.int8)

    def accepts(self, labels: Sequence[str]) -> bool:
        return True

    def assign_splits(
        self,
        image_ids: Sequence[str],
        label_sets: Sequence[Sequence[str]],
        *,
        val_fraction: float,
        test_fraction: float,
        seed: int,
    ) -> list[str]:
        from components.task.splits import assign_multilabel_splits

        return assign_multilabel_splits(image_ids, label_sets, val_fraction=val_fraction,
                                        test_fraction=test_fraction, seed=seed)  # fmt: skip

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
        from components.task.multilabel import predict_sets

        return predict_sets(probs, cut)

    def strata(self, targets: np.ndarray) -> np.ndarray:
        from components.task.multilabel import first_label

        return first_label(targets)

    def fit_decision(
        self,
        targets: np.ndarray | None,
        probs: np.ndarray | None,
        classes: Sequence[str],
        *,
        rule: ThresholdRule = "f1",
        target: float | None = None,
    ) -> Decision:
        from components.task.multilabel import tune_thresholds

        tuning: dict[str, Any] = {
            "rule": rule,
            "target": target,
            "fitted_on": "none",
            "n_fit": 0,
            "per_label": [],
        }
        if targets is None or probs is None:
            logger.warning(
                "no val split: multi-label decision thresholds stay at 0.5 (nothing to tune them on)"
            )
            return Decision((0.5,) * len(classes), tuning)
        tuned = tune_thresholds(targets, probs, classes, rule=rule, target=target)
        positives = np.asarray(targets).sum(axis=0)
        per_label = [{**asdict(t), "val_support": int(k)} for t, k in zip(tuned, positives, strict=True)]
        tuning |= {"fitted_on": "val", "n_fit": len(targets), "per_label": per_label}
        return Decision(tuple(t.threshold for t in tuned), tuning)

    def metrics(
        self,
        targets: np.ndarray,
        probs: np.ndarray,
        classes: Sequence[str],
        *,
        thresholds: Sequence[float] | None = None,
        top_k: int = 5,
        confidence: float = 0.95,
    ) -> dict[str, Any]:
        from components.task.multilabel import multilabel_metrics

        cut = thresholds if thresholds is not None else (0.5,) * len(classes)
        return multilabel_metrics(targets, probs, cut, classes, confidence=confidence)

    def flat_metrics(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        from components.task.multilabel import flat_multilabel

        return flat_multilabel(metrics)

    def headline_of_scores(self, scores: np.ndarray, targets: np.ndarray) -> float:
        from components.task.multilabel import mean_average_precision

        return mean_average_precision(np.asarray(targets), np.asarray(scores))

    def thresholds_of(self, metrics: Mapping[str, Any]) -> list[float] | None:
        return [float(r["threshold"]) for r in metrics["per_label"]]

    def compare(
        self,
        targets: np.ndarray,
        challenger: np.ndarray,
        champion: np.ndarray,
        classes: Sequence[str],
        *,
        gates: GatesConfig,
        n_boot: int = 2000,
        seed: int = 0,
    ) -> dict[str, Any]:
        from components.task.comparison import compare_average_precision

        return compare_average_precision(
            targets, challenger, champion, classes, margin=gates.max_map_drop,
            label_margin=gates.max_label_ap_drop, n_boot=n_boot, confidence=gates.confidence, seed=seed,
        )  # fmt: skip

    def log_loss(self, logits: np.ndarray, targets: np.ndarray, *, temperature: float = 1.0) -> float:
        from components.task.multilabel import bce_of_logits

        return bce_of_logits(logits, targets, temperature)

    def calibration_groups(
        self, probs: np.ndarray, targets: np.ndarray, classes: Sequence[str]
    ) -> tuple[list[str] | None, np.ndarray, np.ndarray]:
        p, y = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=np.float64)
        if p.ndim != 2 or y.shape != p.shape or p.shape[0] == 0:
            raise ValueError(
                f"need probs and targets of the same shape (N, C), N > 0, got {p.shape} and {y.shape}"
            )
        return [str(c) for c in classes], p, y

    def calibration_stats(self, probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        p, y = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=np.float64)
        clipped = np.clip(p, 1e-12, 1 - 1e-12)
        return {"nll": float(-(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)).mean()),
                "mean_probability": float(p.mean()), "positive_rate": float(y.mean())}  # fmt: skip

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


def label_set(value: Any) -> list[str]:
    """A manifest ``labels`` cell (list, numpy array from parquet, or null) as a list of str."""
    import pandas as pd  # only where manifests are read (serving and training need no pandas here)

    if value is None or (not isinstance(value, list | tuple | np.ndarray) and pd.isna(value)):
        return []
    return [str(v) for v in value]


_TASKS: dict[str, Task] = {t.name: t for t in (SingleLabel(), MultiLabel())}


def get_task(name: str | Task | None) -> Task:
    """The task called ``name`` (``None``: single-label, what data written before tasks existed is)."""
    if isinstance(name, Task):
        return name
    try:
        return _TASKS[name or SINGLELABEL]
    except KeyError:
        raise DataError(f"unknown task {name!r}: expected one of {', '.join(TASK_NAMES)}") from None


def detect_task(label_sets: Sequence[Sequence[str]]) -> Task:
    """The task of a dataset read off its label sets: multi-label when any image has several labels."""
    return get_task(MULTILABEL if any(len(labels) > 1 for labels in label_sets) else SINGLELABEL)


def task_of(record: Mapping[str, Any]) -> Task:
    """The task of a stored record (a metrics dict, an evaluate result, baseline.json, model.json):
    its ``task`` key, single-label when there is none (written before tasks existed)."""
    return get_task(record.get("task"))
