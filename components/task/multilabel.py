"""Multi-label metrics and decision thresholds (scikit-learn underneath).

A multi-label task scores each label independently (sigmoid probabilities); a label is predicted
when its probability reaches the label's threshold. Thresholds are tuned on the validation split
(maximise F1, or reach a target precision or recall) and travel with the registered model.

Average precision is scikit-learn's (the step-wise area under the precision-recall curve, tied
scores taken together); :func:`weighted_average_precision` computes the same number for many
bootstrap resamples at once (a resample is a weight per image), which the champion comparison
and the corruption sweep need thousands of times.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn.metrics import (
    hamming_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
)

from components.task.metrics import slugged, wilson_interval

ThresholdRule = Literal["f1", "precision", "recall"]


def label_matrix(label_sets: Sequence[Sequence[str]], classes: Sequence[str]) -> np.ndarray:
    """Label sets -> (N, C) 0/1 indicator matrix in ``classes`` order; unknown labels are an error."""
    index = {c: i for i, c in enumerate(classes)}
    y = np.zeros((len(label_sets), len(classes)), dtype=np.int8)
    for row, labels in enumerate(label_sets):
        for lab in labels:
            if lab not in index:
                raise ValueError(f"label {lab!r} is not in the class list")
            y[row, index[lab]] = 1
    return y


@dataclass(frozen=True)
class Threshold:
    label: str
    threshold: float
    rule: str
    precision: float
    recall: float
    f1: float
    reached: bool
    """False when the target (precision/recall) could not be reached on val: the best-F1 point is used."""


def tune_thresholds(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    rule: ThresholdRule = "f1",
    target: float | None = None,
    default: float = 0.5,
) -> list[Threshold]:
    """Per-label thresholds from validation probabilities.

    ``f1``: the threshold that maximises the label's F1. ``precision``: the lowest threshold whose
    precision is >= ``target`` (most recall at that precision). ``recall``: the highest threshold whose
    recall is >= ``target``. A label without positives on val keeps ``default``.
    """
    if rule != "f1" and target is None:
        raise ValueError(f"threshold rule {rule!r} needs a target")
    out = []
    for j, name in enumerate(classes):
        yt, p = y_true[:, j], probs[:, j]
        if yt.sum() == 0:
            out.append(Threshold(name, default, rule, 0.0, 0.0, 0.0, False))
            continue
        precision, recall, thr = precision_recall_curve(yt, p)
        precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        best = int(np.argmax(f1))
        reached = True
        if rule == "precision":
            ok = np.flatnonzero(precision >= float(target))  # type: ignore[arg-type]
            k = int(ok[0]) if ok.size else best
            reached = bool(ok.size)
        elif rule == "recall":
            ok = np.flatnonzero(recall >= float(target))  # type: ignore[arg-type]
            k = int(ok[-1]) if ok.size else best
            reached = bool(ok.size)
        else:
            k = best
        out.append(
            Threshold(name, float(thr[k]), rule, float(precision[k]), float(recall[k]), float(f1[k]), reached)
        )
    return out


def predict_sets(probs: np.ndarray, thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """(N, C) 0/1 predictions: probability >= the label's threshold."""
    return (probs >= np.asarray(thresholds, dtype=probs.dtype)[None, :]).astype(np.int8)


def multilabel_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    thresholds: Sequence[float],
    classes: Sequence[str],
    *,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """All test-set metrics of a multi-label model, as a JSON-able dict.

    y_true: (N, C) 0/1; probs: (N, C) per-label probabilities; thresholds: (C,) decision thresholds.
    Returns ``task: multilabel``, mAP (mean AP over the labels with a positive), micro/macro
    precision/recall/F1, subset accuracy (the whole label set right), Hamming loss, label cardinality
    (true and predicted), n, per_label rows (AP, ROC-AUC, precision, recall with its Wilson interval at
    ``confidence``, F1, support, threshold; AP is None for a label without positives, ROC-AUC also
    for one without negatives) and the label confusion matrix (see :func:`label_confusion`).
    """
    y_true = np.asarray(y_true).astype(np.int8)
    probs = np.asarray(probs, dtype=np.float64)
    if y_true.ndim != 2 or probs.shape != y_true.shape or len(classes) != y_true.shape[1]:
        raise ValueError(
            f"need y_true and probs of shape (N, C) with C = {len(classes)} labels, "
            f"got {y_true.shape} and {probs.shape}"
        )
    y_pred = predict_sets(probs, thresholds)
    ap = [average_precision(y_true[:, j], probs[:, j]) for j in range(len(classes))]
    auc = [_roc_auc(y_true[:, j], probs[:, j]) for j in range(len(classes))]
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    micro = precision_recall_fscore_support(y_true, y_pred, average="micro", zero_division=0)
    macro = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    tp = ((y_pred == 1) & (y_true == 1)).sum(axis=0)
    per_label = []
    for j, c in enumerate(classes):
        lower, upper = wilson_interval(int(tp[j]), int(support[j]), confidence=confidence)
        per_label.append(
            {"label": str(c), "index": j, "ap": ap[j], "roc_auc": auc[j], "precision": float(p[j]),
             "recall": float(r[j]), "recall_lower": lower, "recall_upper": upper, "f1": float(f[j]),
             "support": int(support[j]), "threshold": float(thresholds[j])}
        )  # fmt: skip
    known_ap = [a for a in ap if a is not None]
    known_auc = [a for a in auc if a is not None]
    return {
        "task": "multilabel",
        "mAP": float(np.mean(known_ap)) if known_ap else None,
        "macro_roc_auc": float(np.mean(known_auc)) if known_auc else None,
        "micro_precision": float(micro[0]),
        "micro_recall": float(micro[1]),
        "micro_f1": float(micro[2]),
        "macro_precision": float(macro[0]),
        "macro_recall": float(macro[1]),
        "macro_f1": float(macro[2]),
        "subset_accuracy": float((y_pred == y_true).all(axis=1).mean()),
        "hamming_loss": float(hamming_loss(y_true, y_pred)),
        "label_cardinality": float(y_true.sum(axis=1).mean()),
        "predicted_cardinality": float(y_pred.sum(axis=1).mean()),
        "n": int(len(y_true)),
        "confidence": confidence,
        "per_label": per_label,
        "confusion_matrix": label_confusion(y_true, y_pred).tolist(),
    }


def _roc_auc(y: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC-AUC of one label; None when the label has no positive or no negative."""
    if y.min() == y.max():
        return None
    return float(roc_auc_score(y, scores))


def label_confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """(C, C) counts of which label was taken for which: cell (i, j), i != j, counts the images where
    label i was missed while label j was predicted without being there; the diagonal counts the
    hits (true positives) of each label, so a row divided by the label's support has its recall on
    the diagonal, as in a single-label confusion matrix. y_true, y_pred: (N, C) 0/1."""
    t, p = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    missed, extra = (t & ~p).astype(np.int64), (~t & p).astype(np.int64)
    cm = missed.T @ extra
    np.fill_diagonal(cm, (t & p).sum(axis=0))
    return cm


def first_label(y: np.ndarray) -> np.ndarray:
    """(N, C) 0/1 -> (N,) index of each image's first label, -1 for an empty set (for stratifying)."""
    y = np.asarray(y)
    return np.where(y.any(axis=1), y.argmax(axis=1), -1)


# --------------------------------------------------------------------------- average precision


def average_precision(y: np.ndarray, scores: np.ndarray) -> float | None:
    """scikit-learn's average precision of one label; None when it has no positive. y, scores: (N,)."""
    y = np.asarray(y)
    if not y.any():
        return None
    return float(weighted_average_precision(y, scores, np.ones((1, y.size)))[0])


def weighted_average_precision(y: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision of one label under many weightings of the images at once.

    y: (N,) 0/1; scores: (N,); weights: (B, N) non-negative, e.g. bootstrap counts (how often each
    image was drawn). Returns (B,) float, NaN where a weighting leaves no positive. Tied scores form
    one threshold, exactly as ``sklearn.metrics.average_precision_score`` (which equals row b with
    every image repeated ``weights[b]`` times).
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    s = np.asarray(scores, dtype=np.float64)[order]
    pos = np.asarray(y).astype(bool)[order]
    w = np.asarray(weights)
    # Integer counts (bootstrap draws) sum exactly and move half the memory of float64.
    w = w.astype(np.int32 if np.issubdtype(w.dtype, np.integer) or np.all(w == np.round(w)) else np.float64)
    w = w[:, order]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last index of each group of tied scores
    seen = np.cumsum(w, axis=1)[:, ends].astype(np.float64)
    # positives only: the running count of positives at each group end
    tp_pos = np.cumsum(w[:, pos], axis=1)
    upto = np.searchsorted(np.flatnonzero(pos), ends, side="right")  # positives at or before each end
    tp = np.where(upto > 0, tp_pos[:, np.maximum(upto - 1, 0)], 0).astype(np.float64)
    precision = np.divide(tp, seen, out=np.zeros_like(tp), where=seen > 0)
    gained = np.diff(tp, axis=1, prepend=0.0)
    total = tp[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (gained * precision).sum(axis=1) / total, np.nan)


def mean_average_precision(y: np.ndarray, scores: np.ndarray) -> float:
    """mAP over the labels with a positive. y: (N, C) 0/1; scores: (N, C) (probabilities or logits:
    AP only depends on the order). 0.0 when no label has a positive."""
    aps = [average_precision(y[:, j], scores[:, j]) for j in range(y.shape[1])]
    known = [a for a in aps if a is not None]
    return float(np.mean(known)) if known else 0.0


# --------------------------------------------------------------------------- scalars and losses

_MULTILABEL_SCALARS = (
    "mAP", "macro_roc_auc", "micro_precision", "micro_recall", "micro_f1", "macro_precision", "macro_recall",
    "macro_f1", "subset_accuracy", "hamming_loss", "label_cardinality", "predicted_cardinality", "n",
)  # fmt: skip


def flat_multilabel(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Scalars of a :func:`multilabel_metrics` dict: mAP, micro/macro P/R/F1, subset accuracy, Hamming
    loss, cardinalities, n, and per label ``ap_``/``roc_auc_``/``precision_``/``recall_``/``f1_``/
    ``threshold_<slug>`` (slugs made unique as for single-label metrics)."""
    flat = {k: float(metrics[k]) for k in _MULTILABEL_SCALARS if metrics.get(k) is not None}
    for s, row in slugged(metrics["per_label"], "label"):
        for k in ("ap", "roc_auc", "precision", "recall", "f1", "threshold"):
            if row.get(k) is not None:
                flat[f"{k}_{s}"] = float(row[k])
    return flat


def bce_of_logits(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of sigmoid(logits / T) over every (image, label). logits, y_true: (N, C)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(y_true, dtype=np.float64)
    return float((np.logaddexp(0.0, z) - y * z).mean())
