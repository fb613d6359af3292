"""Metrics of a classifier's test-set predictions, on plain arrays (scikit-learn underneath).

Everything here works on true class indices and predicted probabilities, so it does not care which
model, framework or device produced them. :func:`compute_metrics` fixes the label set
(``labels=range(K)``) so that a class missing from the test set is reported as such instead of
silently shifting columns or crashing. The multi-label counterpart is
:func:`components.task.multilabel.multilabel_metrics`; :func:`flat_metrics` flattens either dict to
the scalars MLflow and ``dvc metrics show`` read.

This module sits in the task layer (below data, quality, baselines and evaluation) so that every
stage can measure a model the same way; the gates built on these numbers live in
:mod:`components.evaluate.gates`.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import log_softmax
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

logger = logging.getLogger(__name__)

# Rows of ``probs`` may come from float32 softmax; anything further from 1 is not a distribution.
_ROW_SUM_ATOL = 1e-3
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


# --------------------------------------------------------------------------- scalars and losses


def slug(name: str) -> str:
    """Metric-name-safe form of a class name: lower-case, every non-[a-z0-9] char -> ``_``."""
    return re.sub(r"[^a-z0-9]", "_", name.lower())


def flat_singlelabel(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Scalars of a :func:`compute_metrics` dict, for MLflow and DVC: overall metrics plus
    ``recall_<slug>``/``f1_<slug>``.

    Class names that slug to the same string (``"a b"``, ``"a-b"``) get ``_<index>`` appended
    so no metric silently overwrites another. Also ``macro_roc_auc``/``macro_pr_auc`` and per class
    ``roc_auc_<slug>``/``pr_auc_<slug>`` where defined.
    """
    flat = {key: float(metrics[key]) for key in _SCALAR_KEYS}
    flat.update({key: float(v) for key, v in metrics.items() if re.fullmatch(r"top\d+_accuracy", key)})
    flat.update(
        {k: float(metrics[k]) for k in ("macro_roc_auc", "macro_pr_auc") if metrics.get(k) is not None}
    )
    flat["n"] = float(metrics["n"])
    for s, row in slugged(metrics["per_class"], "class"):
        flat[f"recall_{s}"] = float(row["recall"])
        flat[f"f1_{s}"] = float(row["f1"])
        flat.update({f"{k}_{s}": float(row[k]) for k in ("roc_auc", "pr_auc") if row.get(k) is not None})
    return flat


def slugged(rows: Sequence[Mapping[str, Any]], key: str) -> list[tuple[str, Mapping[str, Any]]]:
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


def nll_of_logits(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T). logits: (N, K); y_true: (N,)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(y_true, dtype=np.int64)
    return float(-log_softmax(z, axis=1)[np.arange(y.size), y].mean())
