"""Evaluation of a classifier's test-set predictions: metrics, quality gates, report files.

Everything here works on plain arrays (true class indices and predicted probabilities), so it
does not care which model, framework or device produced them. The metrics come from
scikit-learn; this module fixes the label set (``labels=range(K)``) so that a class missing
from the test set is reported as such instead of silently shifting columns or crashing.

Files written by :func:`write_evaluation` (the ``evaluate`` stage's outputs):

===============================  ============================================================
metrics.json                     :func:`flat_metrics`: scalars only (what ``dvc metrics show`` reads)
evaluation.json                  the full :func:`compute_metrics` dict (per class, confusion matrix)
per_class.csv                    class, precision, recall (+ Wilson bounds), f1, support, roc_auc, pr_auc
gates.json                       :meth:`GateReport.to_dict`
confusion_matrix.png             counts (rows: true class, columns: predicted)
confusion_matrix_normalized.png  each true class's row as shares (recall on the diagonal)
===============================  ============================================================

:func:`write_curves` adds the one-vs-rest curves of :func:`one_vs_rest_curves`: ``roc_curves.csv``
(class, fpr, tpr), ``pr_curves.csv`` (class, recall, precision), at most ~200 points per class, and
``roc_curves.png`` / ``pr_curves.png`` (all classes in one figure each).

A multi-label evaluation (:func:`components.evaluate.multilabel.multilabel_metrics`, ``task: multilabel``)
writes the same files: per_class.csv holds one row per label (AP, ROC-AUC, precision, recall,
F1, support, threshold) and the confusion matrix is :func:`components.evaluate.multilabel.label_confusion`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.stats import norm
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    log_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
    top_k_accuracy_score,
)

from components.core.errors import ConfigError

logger = logging.getLogger(__name__)

# Rows of ``probs`` may come from float32 softmax; anything further from 1 is not a distribution.
_ROW_SUM_ATOL = 1e-3
# Gates compare ``value >= threshold``; this absorbs float noise such as 0.1 * 3 != 0.3.
_GATE_EPS = 1e-12

ACCURACY_GATE = "min_accuracy"
CLASS_RECALL_GATE = "min_class_recall"
MAP_GATE = "min_map"
LABEL_AP_GATE = "min_label_ap"
# Curve points kept per class in roc_curves.csv / pr_curves.csv (dvc plots, the PNGs).
CURVE_POINTS = 200

_SCALAR_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "weighted_precision",
    "weighted_recall",
    "weighted_f1",
    "nll",
    "brier",
)


# --------------------------------------------------------------------------- metrics


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    top_k: int = 5,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """All test-set metrics of one model, as a JSON-able dict.

    y_true: (N,) int class indices in ``[0, K)``; probs: (N, K) float, rows sum to 1;
    classes: the K class names, in index order. The prediction is ``argmax(probs)``.

    Returns accuracy, ``top{k}_accuracy`` (k clipped to K), balanced_accuracy, macro_* and
    weighted_* precision/recall/F1, nll (log loss), brier (mean over samples of
    ``sum_k (p_k - onehot_k)^2``, range [0, 2]), n, per_class (list of dicts in class order)
    and confusion_matrix ((K, K) counts, rows = true, columns = predicted) with
    confusion_matrix_normalized (each row divided by its count: recall on the diagonal).
    Each per-class row carries ``recall_lower``/``recall_upper``, the Wilson interval of its
    recall at ``confidence``, and the one-vs-rest ``roc_auc`` and ``pr_auc`` (average precision) of
    its probability column; their means over the classes where they are defined are
    ``macro_roc_auc`` and ``macro_pr_auc``. A class absent from ``y_true`` gets recall 0, support 0
    and no AUCs (None).
    """
    y, p = _check_inputs(y_true, probs, classes, top_k=top_k)
    n_classes = len(classes)
    labels = list(range(n_classes))
    y_pred = p.argmax(axis=1)
    k = min(top_k, n_classes)

    prec, rec, f1, support = precision_recall_fscore_support(
        y, y_pred, labels=labels, average=None, zero_division=0
    )
    cm = confusion_matrix(y, y_pred, labels=labels).astype(np.int64)
    onehot = np.eye(n_classes, dtype=np.int8)[y]
    per_class = []
    for i, name in enumerate(classes):
        lower, upper = wilson_interval(int(cm[i, i]), int(support[i]), confidence=confidence)
        roc_auc, pr_auc = one_vs_rest_auc(onehot[:, i], p[:, i])
        per_class.append(
            {
                "class": str(name),
                "index": i,
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "recall_lower": lower,
                "recall_upper": upper,
                "f1": float(f1[i]),
                "support": int(support[i]),
                "roc_auc": roc_auc,
                "pr_auc": pr_auc,
            }
        )
    metrics: dict[str, Any] = {
        "accuracy": float(accuracy_score(y, y_pred)),
        f"top{k}_accuracy": _top_k_accuracy(y, p, k=k),
        "balanced_accuracy": _balanced_accuracy(y, y_pred),
        **_averaged(y, y_pred, labels, "macro"),
        **_averaged(y, y_pred, labels, "weighted"),
        "nll": float(log_loss(y, p, labels=labels)),
        "brier": float(brier_score_loss(y, p, labels=labels, scale_by_half=False)),
        "macro_roc_auc": _mean_known(row["roc_auc"] for row in per_class),
        "macro_pr_auc": _mean_known(row["pr_auc"] for row in per_class),
        "n": int(y.shape[0]),
        "confidence": confidence,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": _row_fractions(cm).tolist(),
    }
    logger.info(
        "evaluated %d samples over %d classes: accuracy %.4f", y.shape[0], n_classes, metrics["accuracy"]
    )
    return metrics


def one_vs_rest_auc(y: np.ndarray, scores: np.ndarray) -> tuple[float | None, float | None]:
    """ROC-AUC and PR-AUC (average precision) of one class against the rest. y: (N,) 0/1, scores: (N,).

    ROC-AUC needs positives and negatives, PR-AUC positives; an undefined one is None.
    """
    if not y.any():
        return None, None
    pr_auc = float(average_precision_score(y, scores))
    return (float(roc_auc_score(y, scores)) if not y.all() else None), pr_auc


def _mean_known(values: Any) -> float | None:
    known = [float(v) for v in values if v is not None]
    return float(np.mean(known)) if known else None


def one_vs_rest_curves(
    y_true: np.ndarray, scores: np.ndarray, classes: Sequence[str], *, max_points: int = CURVE_POINTS
) -> dict[str, list[dict[str, Any]]]:
    """One-vs-rest ROC and precision-recall curves of every class (or label).

    y_true: (N, K) 0/1 (one-hot of the true class, or the multi-label indicator matrix); scores:
    (N, K) probabilities. Returns ``{"roc": [{"class", "auc", "fpr", "tpr"}], "pr": [{"class", "ap",
    "recall", "precision"}]}``, each curve thinned to at most ``max_points`` points (both ends kept).
    A class without positives has no curve; one without negatives has no ROC curve.
    """
    y, p = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    roc: list[dict[str, Any]] = []
    pr: list[dict[str, Any]] = []
    for i, name in enumerate(classes):
        if not y[:, i].any():
            continue
        precision, recall, _ = precision_recall_curve(y[:, i], p[:, i])
        recall, precision = _thin(recall[::-1], precision[::-1], max_points=max_points)
        ap = float(average_precision_score(y[:, i], p[:, i]))
        pr.append({"class": str(name), "ap": ap, "recall": recall, "precision": precision})
        if y[:, i].all():
            continue
        fpr, tpr, _ = roc_curve(y[:, i], p[:, i])
        fpr, tpr = _thin(fpr, tpr, max_points=max_points)
        roc.append(
            {"class": str(name), "auc": float(roc_auc_score(y[:, i], p[:, i])), "fpr": fpr, "tpr": tpr}
        )
    return {"roc": roc, "pr": pr}


def _thin(x: np.ndarray, y: np.ndarray, *, max_points: int) -> tuple[list[float], list[float]]:
    """Evenly spaced points of a curve (at most ``max_points``, first and last kept), as lists."""
    if len(x) > max_points:
        idx = np.unique(np.round(np.linspace(0, len(x) - 1, max_points)).astype(np.int64))
        x, y = x[idx], y[idx]
    return [float(v) for v in x], [float(v) for v in y]


def write_curves(curves: Mapping[str, list[dict[str, Any]]], out_dir: Path) -> dict[str, Path]:
    """``roc_curves.csv`` (class, fpr, tpr), ``pr_curves.csv`` (class, recall, precision) and their
    PNGs (``roc_curves.png``, ``pr_curves.png``: all classes in one figure each) into ``out_dir``."""
    from components.evaluate.plots import plot_curves

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, x, y in (("roc", "fpr", "tpr"), ("pr", "recall", "precision")):
        path = out_dir / f"{kind}_curves.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["class", x, y])
            for c in curves[kind]:
                writer.writerows((c["class"], a, b) for a, b in zip(c[x], c[y], strict=True))
        paths[f"{kind}_curves_csv"] = path
        paths[f"{kind}_curves"] = plot_curves(curves[kind], out_dir / f"{kind}_curves.png", kind=kind)
    return paths


def _row_fractions(cm: np.ndarray) -> np.ndarray:
    """(K, K) counts -> each row divided by its sum; an empty row stays 0."""
    rows = cm.sum(axis=1, keepdims=True).astype(np.float64)
    return np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)


def _check_inputs(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], *, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and ranges; return (y: (N,) int64, probs: (N, K) float64 renormalised)."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes to evaluate a classifier, got {list(classes)}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if y.ndim != 1 or y.shape[0] == 0:
        raise ValueError(f"y_true must be a non-empty (N,) array of class indices, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    if p.shape != (y.shape[0], n_classes):
        raise ValueError(
            f"probs must have shape (N, K) = ({y.shape[0]}, {n_classes}) to match y_true and "
            f"{n_classes} classes, got {p.shape}"
        )
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y_true holds indices outside [0, {n_classes}): min {y.min()}, max {y.max()}")
    if not np.all(np.isfinite(p)) or p.min() < 0:
        raise ValueError("probs must be finite and non-negative (pass softmax outputs, not logits)")
    row_sums = p.sum(axis=1)
    worst = int(np.abs(row_sums - 1).argmax())
    if abs(row_sums[worst] - 1) > _ROW_SUM_ATOL:
        raise ValueError(
            f"probs rows must sum to 1 (row {worst} sums to {row_sums[worst]:.6f}); "
            "pass softmax outputs, not logits"
        )
    # Renormalise away float32 rounding so sklearn sees exact distributions.
    return y.astype(np.int64), p / row_sums[:, None]


def _top_k_accuracy(y: np.ndarray, p: np.ndarray, *, k: int) -> float:
    """Fraction of samples whose true class is among the k most probable; y: (N,), p: (N, K)."""
    n_classes = p.shape[1]
    # sklearn wants the positive-class column alone for two classes.
    score = p[:, 1] if n_classes == 2 else p
    with warnings.catch_warnings():
        # k clipped to K gives a trivially perfect score; that is expected for small K.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return float(top_k_accuracy_score(y, score, k=k, labels=list(range(n_classes))))


def _balanced_accuracy(y: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y``."""
    with warnings.catch_warnings():
        # Predictions of classes absent from the test set are normal for a weak model.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y, y_pred))


def _averaged(y: np.ndarray, y_pred: np.ndarray, labels: list[int], average: str) -> dict[str, float]:
    """``{average}_precision``, ``{average}_recall``, ``{average}_f1`` over all K labels."""
    prec, rec, f1, _ = precision_recall_fscore_support(
        y, y_pred, labels=labels, average=average, zero_division=0
    )
    return {
        f"{average}_precision": float(prec),
        f"{average}_recall": float(rec),
        f"{average}_f1": float(f1),
    }


# --------------------------------------------------------------------------- confidence bounds


def wilson_interval(successes: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n``.

    Unlike the normal approximation it stays inside [0, 1] and is honest for small ``n``: 12 of 12
    right gives a 95 % lower bound of 0.76, not 1.0. ``n == 0`` gives (0, 1): nothing is known.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / denom), min(1.0, (centre + half) / denom)


# --------------------------------------------------------------------------- gates

GateLevel = Literal["error", "warn"]


@dataclass(frozen=True)
class GateResult:
    """One quality gate and its outcome.

    ``value`` is the point estimate, ``bound`` the statistic actually compared with ``threshold``
    when it is a confidence bound (None: the value itself is compared). A failed ``warn`` gate is
    reported but does not block promotion; a failed ``error`` gate does.
    """

    name: str
    """e.g. ``min_accuracy``, ``min_class_recall[Shirt]``, ``max_ece``."""
    passed: bool
    value: float
    threshold: float
    message: str
    """What was measured against what, e.g. ``recall of 'Shirt' 0.58 < 0.60``."""
    level: GateLevel = "error"
    bound: float | None = None
    comparison: Literal[">=", "<="] = ">="
    explanation: str = ""
    """The result in plain words: what the gate protects against and what this result means."""

    @property
    def blocking(self) -> bool:
        """Failed and at level ``error``: the model must not be promoted."""
        return not self.passed and self.level == "error"

    @property
    def status(self) -> str:
        return "pass" if self.passed else ("FAIL" if self.level == "error" else "warn")


@dataclass(frozen=True)
class GateReport:
    """All gates of one evaluation; ``passed`` only if there is at least one gate and no failed
    ``error`` gate (failed ``warn`` gates are reported, not blocking).

    ``not_applicable``: (gate name, why) of the configured gates that do not apply to this model at
    all (a single-label gate on a multi-label model and vice versa); listed, neither passed nor failed.
    """

    passed: bool
    gates: tuple[GateResult, ...]
    not_applicable: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        expected = bool(self.gates) and not any(g.blocking for g in self.gates)
        if self.passed != expected:
            raise ValueError(
                f"GateReport.passed={self.passed} contradicts its gates (expected {expected}: "
                "a report passes only with at least one gate and no failed error gate)"
            )

    @classmethod
    def of(cls, gates: Sequence[GateResult], *, not_applicable: Sequence[tuple[str, str]] = ()) -> GateReport:
        gates = tuple(gates)
        return cls(passed=bool(gates) and not any(g.blocking for g in gates), gates=gates,
                   not_applicable=tuple((str(n), str(r)) for n, r in not_applicable))  # fmt: skip

    def failed(self) -> list[GateResult]:
        """The gates that block promotion (failed, level ``error``), in report order."""
        return [g for g in self.gates if g.blocking]

    def warnings(self) -> list[GateResult]:
        """The ``warn`` gates that did not pass."""
        return [g for g in self.gates if not g.passed and g.level == "warn"]

    def verdict(self) -> str:
        """One sentence: the decision first, then why."""
        n = len(self.gates)
        if not self.gates:
            return "NOT PROMOTABLE: no gate was checked, so nothing shows the model is good enough."
        warn = f"; {len(self.warnings())} warning(s)" if self.warnings() else ""
        if self.passed:
            return f"PASSED: all {n} blocking gates hold{warn}. The model may be promoted to champion."
        names = ", ".join(g.name for g in self.failed())
        return f"FAILED: {len(self.failed())} of {n} gates failed ({names}){warn}. The model must not be promoted."

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``gates.json``); :meth:`from_dict` reads it back."""
        return {
            "passed": self.passed,
            "verdict": self.verdict(),
            "failed": [g.name for g in self.failed()],
            "warnings": [g.name for g in self.warnings()],
            "gates": [{**asdict(g), "status": g.status} for g in self.gates],
            "not_applicable": [{"name": n, "reason": r} for n, r in self.not_applicable],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateReport:
        """Inverse of :meth:`to_dict` (derived keys are not read)."""
        gates = tuple(
            GateResult(
                name=str(g["name"]),
                passed=bool(g["passed"]),
                value=float(g["value"]),
                threshold=float(g["threshold"]),
                message=str(g["message"]),
                level=g.get("level", "error"),
                bound=None if g.get("bound") is None else float(g["bound"]),
                comparison=g.get("comparison", ">="),
                explanation=str(g.get("explanation", "")),
            )
            for g in d["gates"]
        )
        not_applicable = tuple((str(n["name"]), str(n["reason"])) for n in d.get("not_applicable", []))
        return cls(passed=bool(d["passed"]), gates=gates, not_applicable=not_applicable)

    def summary_text(self) -> str:
        """The verdict, then one line per gate (``ok``/``FAIL``/``warn``), e.g. for logs and the CLI."""
        lines = [self.verdict()]
        lines += [f"{'ok  ' if g.passed else g.status:4}  {g.name}: {g.message}" for g in self.gates]
        return "\n".join(lines)


def make_gate(
    name: str,
    what: str,
    value: float,
    threshold: float,
    *,
    level: GateLevel = "error",
    bound: float | None = None,
    bound_name: str = "",
    comparison: Literal[">=", "<="] = ">=",
    explanation: str = "",
) -> GateResult:
    """Compare ``bound`` (or ``value`` when there is no bound) with ``threshold``.

    The message shows both numbers with enough decimals that a failure never reads as equal.
    """
    compared = value if bound is None else bound
    if comparison == ">=":
        passed = compared >= threshold - _GATE_EPS
        op = ">=" if passed else "<"
    else:
        passed = compared <= threshold + _GATE_EPS
        op = "<=" if passed else ">"
    v, t = _format_pair(compared, threshold)
    if bound is None:
        message = f"{what} {v} {op} {t}"
    else:
        message = f"{what} {value:.4f}, {bound_name or 'bound'} {v} {op} {t}"
    return GateResult(
        name=name,
        passed=passed,
        value=float(value),
        threshold=float(threshold),
        message=message,
        level=level,
        bound=None if bound is None else float(bound),
        comparison=comparison,
        explanation=explanation,
    )


def _check_threshold(name: str, threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"gates.{name} must be within [0, 1], got {threshold}; fix params.yaml")


def check_gates(
    metrics: dict[str, Any],
    *,
    min_accuracy: float,
    min_class_recall: float,
    confidence: float = 0.95,
    levels: Mapping[str, str] | None = None,
) -> GateReport:
    """Gate a model on overall accuracy and on every class's recall (metrics-only gates).

    metrics: a :func:`compute_metrics` dict. The class-recall gate compares the **Wilson lower
    bound** of each class's recall (at ``confidence``) with the threshold, so a class with few
    test images cannot pass by luck; a class with no test images fails its gate.
    levels: gate name -> ``error`` | ``warn`` | ``off`` (default ``error``).
    """
    return GateReport.of(
        metric_gates(
            metrics,
            min_accuracy=min_accuracy,
            min_class_recall=min_class_recall,
            confidence=confidence,
            levels=levels or {},
        )
    )


def metric_gates(
    metrics: dict[str, Any],
    *,
    min_accuracy: float,
    min_class_recall: float,
    confidence: float,
    levels: Mapping[str, str],
) -> list[GateResult]:
    """The accuracy gate and one recall gate per class (see :func:`check_gates`)."""
    _check_threshold(ACCURACY_GATE, min_accuracy)
    _check_threshold(CLASS_RECALL_GATE, min_class_recall)
    gates: list[GateResult] = []
    if levels.get(ACCURACY_GATE, "error") != "off":
        acc = float(metrics["accuracy"])
        gates.append(
            make_gate(
                ACCURACY_GATE,
                "accuracy",
                acc,
                min_accuracy,
                level=_level(levels, ACCURACY_GATE),
                explanation=(
                    f"The model labels {acc:.1%} of the {metrics['n']} test images correctly; "
                    f"at least {min_accuracy:.1%} is required."
                ),
            )
        )
    if levels.get(CLASS_RECALL_GATE, "error") != "off":
        level = _level(levels, CLASS_RECALL_GATE)
        gates += [
            _class_recall_gate(row, min_class_recall, confidence, level) for row in metrics["per_class"]
        ]
    return gates


def _level(levels: Mapping[str, str], name: str) -> GateLevel:
    level = levels.get(name, "error")
    if level not in ("error", "warn"):
        raise ConfigError(f"gates.levels.{name} must be error, warn or off, got {level!r}")
    return "warn" if level == "warn" else "error"


def _class_recall_gate(
    row: dict[str, Any], threshold: float, confidence: float, level: GateLevel
) -> GateResult:
    """Recall gate of one class on its Wilson lower bound; row: one ``per_class`` entry."""
    cls = str(row["class"])
    name = f"{CLASS_RECALL_GATE}[{cls}]"
    support = int(row["support"])
    if support == 0:
        message = (
            f"no test images for class '{cls}': its recall cannot be checked against "
            f"{threshold:.2f}; add test images of this class or drop it from the label set"
        )
        return GateResult(
            name=name, passed=False, value=0.0, threshold=threshold, message=message, level=level, bound=0.0,
            explanation=f"Nothing was measured for '{cls}', and a gate never passes on no evidence.",
        )  # fmt: skip
    hits = int(round(float(row["recall"]) * support))
    lower, _ = wilson_interval(hits, support, confidence=confidence)
    gate = make_gate(
        name,
        f"recall of '{cls}'",
        float(row["recall"]),
        threshold,
        level=level,
        bound=lower,
        bound_name=f"{confidence:.0%} lower bound",
    )
    verdict = "is" if gate.passed else "is NOT"
    explanation = (
        f"{hits} of {support} '{cls}' test images are recognised ({float(row['recall']):.1%}). "
        f"With {confidence:.0%} confidence the true recall is at least {lower:.1%}, which {verdict} "
        f"above the required {threshold:.1%}."
    )
    return replace(gate, explanation=explanation)


def is_multilabel(metrics: Mapping[str, Any]) -> bool:
    """True for a :func:`components.evaluate.multilabel.multilabel_metrics` dict."""
    return metrics.get("task") == "multilabel"


def multilabel_metric_gates(
    metrics: dict[str, Any],
    *,
    min_map: float,
    min_label_ap: float,
    min_class_recall: float,
    confidence: float,
    levels: Mapping[str, str],
) -> list[GateResult]:
    """Gates of a multi-label model's test metrics: mAP, each label's AP, and each label's recall
    over its positives at the tuned threshold (Wilson lower bound, as ``min_class_recall``)."""
    for name, value in (
        (MAP_GATE, min_map),
        (LABEL_AP_GATE, min_label_ap),
        (CLASS_RECALL_GATE, min_class_recall),
    ):
        _check_threshold(name, value)
    rows = metrics["per_label"]
    gates: list[GateResult] = []
    if levels.get(MAP_GATE, "error") != "off":
        gates.append(_map_gate(metrics, min_map, _level(levels, MAP_GATE)))
    if levels.get(LABEL_AP_GATE, "error") != "off":
        gates += [_label_ap_gate(row, min_label_ap, _level(levels, LABEL_AP_GATE)) for row in rows]
    if levels.get(CLASS_RECALL_GATE, "error") != "off":
        level = _level(levels, CLASS_RECALL_GATE)
        gates += [_label_recall_gate(row, min_class_recall, confidence, level) for row in rows]
    return gates


def _map_gate(metrics: Mapping[str, Any], threshold: float, level: GateLevel) -> GateResult:
    value = metrics["mAP"]
    if value is None:
        return GateResult(MAP_GATE, False, 0.0, threshold, "no label has a positive test image: mAP "
                          "cannot be checked; add test images", level=level,
                          explanation="Nothing was measured, and a gate never passes on no evidence.")  # fmt: skip
    n_labels = sum(r["ap"] is not None for r in metrics["per_label"])
    gate = make_gate(MAP_GATE, "mAP", value, threshold, level=level)
    return replace(gate, explanation=(
        f"Averaged over the {n_labels} labels present in the {metrics['n']} test images, the model ranks "
        f"images showing a label above those without it with an average precision of {value:.1%}; "
        f"at least {threshold:.1%} is required."
    ))  # fmt: skip


def _label_ap_gate(row: Mapping[str, Any], threshold: float, level: GateLevel) -> GateResult:
    label = str(row["label"])
    name = f"{LABEL_AP_GATE}[{label}]"
    if row["ap"] is None:
        return GateResult(name, False, 0.0, threshold, f"no test image shows '{label}': its AP cannot be "
                          f"checked against {threshold:.2f}; add test images with this label", level=level,
                          explanation=f"Nothing was measured for '{label}', and a gate never passes on no evidence.")  # fmt: skip
    gate = make_gate(name, f"AP of '{label}'", row["ap"], threshold, level=level)
    verdict = "reaches" if gate.passed else "does NOT reach"
    return replace(gate, explanation=(
        f"Over the {row['support']} test images showing '{label}' the average precision is {row['ap']:.1%}, "
        f"which {verdict} the required {threshold:.1%}."
    ))  # fmt: skip


def _label_recall_gate(
    row: Mapping[str, Any], threshold: float, confidence: float, level: GateLevel
) -> GateResult:
    gate = _class_recall_gate({"class": row["label"], "recall": row["recall"], "support": row["support"]},
                              threshold, confidence, level)  # fmt: skip
    if row["support"] == 0:
        return gate
    label, hits = row["label"], int(round(float(row["recall"]) * row["support"]))
    verdict = "is" if gate.passed else "is NOT"
    return replace(gate, explanation=(
        f"At its threshold {row['threshold']:.3f}, '{label}' is predicted on {hits} of the {row['support']} "
        f"test images that show it ({row['recall']:.1%}). With {confidence:.0%} confidence the true recall "
        f"is at least {gate.bound:.1%}, which {verdict} above the required {threshold:.1%}."
    ))  # fmt: skip


def _format_pair(value: float, threshold: float) -> tuple[str, str]:
    """Both with the same decimals: at least 2, enough to show the threshold exactly (up to 6), and
    more where fewer would print a failing 0.598 as '0.60 < 0.60'."""
    start = next((d for d in range(2, 7) if float(f"{threshold:.{d}f}") == threshold), 6)
    for digits in range(start, 7):
        v, t = f"{value:.{digits}f}", f"{threshold:.{digits}f}"
        if v != t or math.isclose(value, threshold, abs_tol=_GATE_EPS):
            return v, t
    return f"{value:.6g}", f"{threshold:.6g}"


# --------------------------------------------------------------------------- outputs


def most_confused(metrics: dict[str, Any], *, k: int = 5) -> list[dict[str, Any]]:
    """The ``k`` largest off-diagonal cells of the confusion matrix, most images first.

    Each: ``true``, ``predicted`` (class names), ``count`` and ``share`` (of the true class's test
    images). Cells with no image are left out, so a perfect model has none. Multi-label: ``true`` is
    a label that was missed while ``predicted`` was predicted without being there (share: of the
    test images showing the missed label).
    """
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    classes = class_names(metrics)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    rows = np.asarray([int(r["support"]) for r in class_rows(metrics)])
    return [
        {"true": classes[i], "predicted": classes[j], "count": int(off[i, j]),
         "share": float(off[i, j] / rows[i]) if rows[i] else 0.0}
        for i, j in (np.unravel_index(o, off.shape) for o in order)
        if off[i, j] > 0
    ]  # fmt: skip


def class_rows(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-class rows (single-label) or per-label rows (multi-label) of a metrics dict."""
    return list(metrics["per_label"] if is_multilabel(metrics) else metrics["per_class"])


def class_names(metrics: Mapping[str, Any]) -> list[str]:
    key = "label" if is_multilabel(metrics) else "class"
    return [str(row[key]) for row in class_rows(metrics)]


def slug(name: str) -> str:
    """Metric-name-safe form of a class name: lower-case, every non-[a-z0-9] char -> ``_``."""
    return re.sub(r"[^a-z0-9]", "_", name.lower())


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalars only, for MLflow and DVC: overall metrics plus ``recall_<slug>``/``f1_<slug>``.

    Class names that slug to the same string (``"a b"``, ``"a-b"``) get ``_<index>`` appended
    so no metric silently overwrites another. Also ``macro_roc_auc``/``macro_pr_auc`` and per class
    ``roc_auc_<slug>``/``pr_auc_<slug>`` where defined. Multi-label: see :func:`_flat_multilabel`.
    """
    if is_multilabel(metrics):
        return _flat_multilabel(metrics)
    flat = {key: float(metrics[key]) for key in _SCALAR_KEYS}
    flat.update({key: float(v) for key, v in metrics.items() if re.fullmatch(r"top\d+_accuracy", key)})
    flat.update(
        {k: float(metrics[k]) for k in ("macro_roc_auc", "macro_pr_auc") if metrics.get(k) is not None}
    )
    flat["n"] = float(metrics["n"])
    for s, row in _slugged(metrics["per_class"], "class"):
        flat[f"recall_{s}"] = float(row["recall"])
        flat[f"f1_{s}"] = float(row["f1"])
        flat.update({f"{k}_{s}": float(row[k]) for k in ("roc_auc", "pr_auc") if row.get(k) is not None})
    return flat


_MULTILABEL_SCALARS = (
    "mAP", "macro_roc_auc", "micro_precision", "micro_recall", "micro_f1", "macro_precision", "macro_recall",
    "macro_f1", "subset_accuracy", "hamming_loss", "label_cardinality", "predicted_cardinality", "n",
)  # fmt: skip


def _flat_multilabel(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Multi-label scalars: mAP, micro/macro P/R/F1, subset accuracy, Hamming loss, cardinalities, n,
    and per label ``ap_``/``roc_auc_``/``precision_``/``recall_``/``f1_``/``threshold_<slug>``."""
    flat = {k: float(metrics[k]) for k in _MULTILABEL_SCALARS if metrics.get(k) is not None}
    for s, row in _slugged(metrics["per_label"], "label"):
        for k in ("ap", "roc_auc", "precision", "recall", "f1", "threshold"):
            if row.get(k) is not None:
                flat[f"{k}_{s}"] = float(row[k])
    return flat


def _slugged(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[str, dict[str, Any]]]:
    """(unique slug, row) per row; a slug already taken gets ``_<index>`` appended."""
    seen: set[str] = set()
    out = []
    for row in rows:
        s = slug(str(row[key])) or "class"
        if s in seen:
            s = f"{s}_{row['index']}"
        seen.add(s)
        out.append((s, row))
    return out


def write_evaluation(metrics: dict[str, Any], gates: GateReport, out_dir: Path) -> dict[str, Path]:
    """Write the evaluation's five files into ``out_dir`` (created); return their paths by kind.

    Keys: ``metrics``, ``evaluation``, ``per_class``, ``gates``, ``confusion_matrix`` (counts) and
    ``confusion_matrix_normalized`` (each true class's row as shares).
    """
    from components.evaluate.plots import plot_confusion_matrix  # matplotlib only when plotting

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = class_names(metrics)
    multilabel = is_multilabel(metrics)
    # Multi-label: shares of each label's positives (a missed label may be taken for several others).
    totals = np.asarray([r["support"] for r in metrics["per_label"]]) if multilabel else None
    labels = (
        ("missed label", "falsely predicted label (diagonal: hits)") if multilabel else ("true", "predicted")
    )
    paths = {
        "metrics": _write_json(flat_metrics(metrics), out_dir / "metrics.json"),
        "evaluation": _write_json(metrics, out_dir / "evaluation.json"),
        "per_class": _write_per_class_csv(metrics, out_dir / "per_class.csv"),
        "gates": _write_json(gates.to_dict(), out_dir / "gates.json"),
        "confusion_matrix": plot_confusion_matrix(
            np.asarray(metrics["confusion_matrix"]),
            classes,
            out_dir / "confusion_matrix.png",
            normalize=False,
            axis_labels=labels,
        ),
        "confusion_matrix_normalized": plot_confusion_matrix(
            np.asarray(metrics["confusion_matrix"]),
            classes,
            out_dir / "confusion_matrix_normalized.png",
            normalize=True,
            totals=totals,
            axis_labels=labels,
        ),
    }
    logger.info("wrote evaluation to %s (gates %s)", out_dir, "passed" if gates.passed else "FAILED")
    return paths


def _write_json(obj: Any, path: Path) -> Path:
    # allow_nan=False: NaN/Infinity are not JSON and would break `dvc metrics show`.
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


_PER_CLASS_COLUMNS = ("class", "precision", "recall", "recall_lower", "recall_upper", "f1", "support",
                      "roc_auc", "pr_auc")  # fmt: skip
_PER_LABEL_COLUMNS = ("class", "ap", "roc_auc", "precision", "recall", "recall_lower", "recall_upper", "f1",
                      "support", "threshold")  # fmt: skip


def _write_per_class_csv(metrics: Mapping[str, Any], path: Path) -> Path:
    """One row per class (multi-label: per label, its name in the ``class`` column too)."""
    columns: Sequence[str] = _PER_CLASS_COLUMNS
    rows = list(metrics["per_class"] if not is_multilabel(metrics) else [])
    if is_multilabel(metrics):
        columns, rows = _PER_LABEL_COLUMNS, [{"class": r["label"], **r} for r in metrics["per_label"]]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
