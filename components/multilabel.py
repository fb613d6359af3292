"""Multi-label metrics and decision thresholds (scikit-learn underneath).

A multi-label task scores each label independently (sigmoid probabilities); a label is predicted
when its probability reaches the label's threshold. Thresholds are tuned on the validation split
(maximise F1, or reach a target precision or recall) and travel with the registered model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    hamming_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
)

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


def predict_sets(probs: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """(N, C) 0/1 predictions: probability >= the label's threshold."""
    return (probs >= np.asarray(thresholds, dtype=probs.dtype)[None, :]).astype(np.int8)


def multilabel_metrics(
    y_true: np.ndarray, probs: np.ndarray, thresholds: Sequence[float], classes: Sequence[str]
) -> dict[str, Any]:
    """mAP, per-label AP / precision / recall / F1 / support, micro and macro F1, subset accuracy,
    Hamming loss, label cardinality (true and predicted)."""
    y_pred = predict_sets(probs, thresholds)
    present = y_true.sum(axis=0) > 0
    ap = np.full(len(classes), np.nan)
    for j in np.flatnonzero(present):
        ap[j] = average_precision_score(y_true[:, j], probs[:, j])
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    micro = precision_recall_fscore_support(y_true, y_pred, average="micro", zero_division=0)
    macro = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    per_label = [
        {
            "label": c,
            "ap": None if np.isnan(ap[j]) else float(ap[j]),
            "precision": float(p[j]),
            "recall": float(r[j]),
            "f1": float(f[j]),
            "support": int(support[j]),
            "threshold": float(thresholds[j]),
        }
        for j, c in enumerate(classes)
    ]
    return {
        "mAP": float(np.nanmean(ap)) if present.any() else float("nan"),
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
        "per_label": per_label,
    }
