"""Images whose label CLIP confidently contradicts (``disagreements.csv``; a label-quality signal
that the pipeline records in the label-quality ledger).

How CLIP contradicts a label follows the task's output activation (:attr:`Task.activation`):

* ``softmax`` (single-label): CLIP's most probable class is not the label, with probability >=
  ``min_confidence`` (:func:`find_disagreements`; :data:`DISAGREEMENT_COLUMNS`).
* ``sigmoid`` (multi-label): a given label scored absent (``extra_labels``) or a label not given
  scored present (``missing_labels``), confidently (:func:`find_label_disagreements`;
  :data:`LABEL_DISAGREEMENT_COLUMNS`, ``label`` / ``clip_label`` as ``|``-joined sets). Confidence
  is a calibrated probability of presence: Platt scaling of the zero-shot logits fitted on val
  (:func:`components.baseline.zero_shot.fit_label_calibration`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from components.baseline.zero_shot import LabelCalibration, fit_label_calibration
from components.task import Task

DISAGREEMENT_COLUMNS = ("image_id", "split", "label", "clip_label", "confidence", "label_probability")
LABEL_DISAGREEMENT_COLUMNS = (*DISAGREEMENT_COLUMNS, "missing_labels", "extra_labels")


def find_disagreements(
    rows: pd.DataFrame, probs: np.ndarray, classes: Sequence[str], *, min_confidence: float
) -> pd.DataFrame:
    """Images whose most probable class under CLIP is not their label, with probability >=
    ``min_confidence``; most confident first. rows: manifest rows (image_id, split, label);
    probs: (N, K) in the same order."""
    top = probs.argmax(axis=1)
    conf = probs[np.arange(len(top)), top]
    index = {c: i for i, c in enumerate(classes)}
    label_idx = rows["label"].map(index).to_numpy()
    keep = (top != label_idx) & (conf >= min_confidence)
    out = pd.DataFrame(
        {
            "image_id": rows["image_id"].to_numpy()[keep],
            "split": rows["split"].to_numpy()[keep],
            "label": rows["label"].to_numpy()[keep],
            "clip_label": np.asarray(classes, dtype=object)[top[keep]],
            "confidence": conf[keep],
            "label_probability": probs[np.arange(len(top)), label_idx][keep],
        }
    )
    return out.sort_values(["confidence", "image_id"], ascending=[False, True], ignore_index=True)


def find_label_disagreements(
    rows: pd.DataFrame,
    y: np.ndarray,
    presence: np.ndarray,
    classes: Sequence[str],
    *,
    min_confidence: float,
) -> pd.DataFrame:
    """Images with a label CLIP contradicts with at least ``min_confidence``: a given label whose
    probability of presence is <= 1 - min_confidence (``extra_labels``) or a label not given whose
    probability is >= min_confidence (``missing_labels``). ``label`` is the given set, ``clip_label``
    the set with CLIP's corrections, ``confidence`` the most confident contradiction and
    ``label_probability`` = 1 - confidence (low = likely wrong, like the single-label table); most
    confident first. rows: manifest rows; y (0/1) and presence (calibrated probabilities): (N, K)
    in row order."""
    given = y.astype(bool)
    extra = given & (presence <= 1 - min_confidence)
    missing = ~given & (presence >= min_confidence)
    against = np.where(extra, 1 - presence, 0.0) + np.where(missing, presence, 0.0)
    keep = (extra | missing).any(axis=1)
    names = np.asarray(classes, dtype=object)

    def joined(mask: np.ndarray) -> list[str]:
        return ["|".join(names[m]) for m in mask[keep]]

    confidence = against.max(axis=1)[keep]
    out = pd.DataFrame(
        {
            "image_id": rows["image_id"].to_numpy()[keep],
            "split": rows["split"].to_numpy()[keep],
            "label": joined(given),
            "clip_label": joined((given & ~extra) | missing),
            "confidence": confidence,
            "label_probability": 1 - confidence,
            "missing_labels": joined(missing),
            "extra_labels": joined(extra),
        },
        columns=list(LABEL_DISAGREEMENT_COLUMNS),
    )
    return out.sort_values(["confidence", "image_id"], ascending=[False, True], ignore_index=True)


# --------------------------------------------------------------------------- per activation

_Finder = Callable[..., tuple[pd.DataFrame, dict[str, Any]]]


def _top_class(
    rows: pd.DataFrame,
    y: np.ndarray,
    logits: np.ndarray,
    probs: np.ndarray,
    fit_on: np.ndarray,
    first: np.ndarray,
    classes: Sequence[str],
    min_confidence: float,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Softmax probabilities sum to 1 over the classes and say "confident" as they stand."""
    return find_disagreements(rows[first], probs[first], classes, min_confidence=min_confidence), {}


def _per_label(
    rows: pd.DataFrame,
    y: np.ndarray,
    logits: np.ndarray,
    probs: np.ndarray,
    fit_on: np.ndarray,
    first: np.ndarray,
    classes: Sequence[str],
    min_confidence: float,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-label sigmoids are over-confident: calibrate them on the ``fit_on`` rows first (the raw
    probabilities when there is nothing to fit)."""
    calibration = fit_label_calibration(logits[fit_on], y[fit_on])
    presence = calibration(logits[first]) if calibration is not None else probs[first]
    table = find_label_disagreements(rows[first], y[first], presence, classes, min_confidence=min_confidence)
    return table, {"zero_shot_calibration": _calibration_record(calibration, classes)}


@dataclass(frozen=True)
class _Rule:
    columns: tuple[str, ...]
    find: _Finder


_RULES = {
    "softmax": _Rule(DISAGREEMENT_COLUMNS, _top_class),
    "sigmoid": _Rule(LABEL_DISAGREEMENT_COLUMNS, _per_label),
}


def disagreement_columns(task: Task) -> tuple[str, ...]:
    """The columns of ``task``'s disagreements.csv."""
    return _RULES[task.activation].columns


def clip_disagreements(
    task: Task,
    rows: pd.DataFrame,
    y: np.ndarray,
    logits: np.ndarray,
    *,
    fit_on: np.ndarray,
    classes: Sequence[str],
    min_confidence: float,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(the disagreement table, what to add to baseline.json) of CLIP's zero-shot ``logits`` (N, K)
    against the targets ``y`` (:meth:`Task.encode`'s) of the manifest ``rows``; an image listed
    twice (e.g. eval and val rows) counts once. fit_on: (N,) bool, the rows a calibration may be
    fitted on (val)."""
    first = ~rows.duplicated("image_id").to_numpy()
    return _RULES[task.activation].find(
        rows, y, logits, task.probabilities(logits), np.asarray(fit_on, dtype=bool), first, classes,
        min_confidence,
    )  # fmt: skip


def _calibration_record(cal: LabelCalibration | None, classes: Sequence[str]) -> dict[str, Any] | None:
    if cal is None:
        return None
    return {"slope": cal.slope, "intercepts": dict(zip(classes, cal.intercepts, strict=True))}
