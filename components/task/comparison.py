"""The champion comparison statistics: is a challenger at most ``margin`` worse than the champion
on the same test images (*non-inferiority*)?

Single-label models are compared on per-image correctness (:func:`compare_predictions`): only
images where exactly one model is right move the difference, so resampling the four (right/wrong
x right/wrong) counts with a multinomial is the exact paired bootstrap, in microseconds.

Multi-label models are compared on mAP and on each label's AP (:func:`compare_average_precision`):
AP is not a mean over images, so each resample (a multinomial count per image) is scored for both
models with :func:`components.task.multilabel.weighted_average_precision`.

Callers ask the task (:meth:`components.task.Task.compare`), which picks its statistic; the
evaluate stage re-runs the champion and gates on the result (:mod:`components.evaluate.champion`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from components.task.multilabel import weighted_average_precision


@dataclass(frozen=True)
class NonInferiority:
    """Challenger minus champion on one metric (accuracy or a class's recall)."""

    what: str
    n: int
    challenger: float
    champion: float
    difference: float
    lower: float
    """One-sided lower confidence bound of the difference (paired bootstrap)."""
    margin: float
    passed: bool
    """``lower >= -margin``: the challenger is not worse by more than the margin."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(
    challenger_correct: np.ndarray,
    champion_correct: np.ndarray,
    *,
    margin: float,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    what: str = "accuracy",
) -> NonInferiority:
    """Non-inferiority of the challenger's hit rate. *_correct: (N,) bool, same images."""
    a = np.asarray(challenger_correct, dtype=bool)
    b = np.asarray(champion_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two (N,) arrays over the same images, got {a.shape} and {b.shape}")
    n = int(a.size)
    if n == 0:
        return NonInferiority(what, 0, 0.0, 0.0, 0.0, -1.0, margin, False)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [only_a / n, only_b / n, 1 - (only_a + only_b) / n], size=n_boot)
    diffs = (draws[:, 0] - draws[:, 1]) / n
    lower = float(np.quantile(diffs, 1 - confidence))
    return NonInferiority(
        what=what,
        n=n,
        challenger=float(a.mean()),
        champion=float(b.mean()),
        difference=(only_a - only_b) / n,
        lower=lower,
        margin=margin,
        passed=lower >= -margin - 1e-12,
    )


def compare_predictions(
    y_true: np.ndarray,
    challenger_pred: np.ndarray,
    champion_pred: np.ndarray,
    classes: Sequence[str],
    *,
    margin: float,
    class_margin: float,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy and per-class recall non-inferiority; *_pred: (N,) predicted class indices."""
    y = np.asarray(y_true)
    a, b = np.asarray(challenger_pred) == y, np.asarray(champion_pred) == y
    overall = paired_bootstrap(a, b, margin=margin, n_boot=n_boot, confidence=confidence, seed=seed)
    per_class = [
        paired_bootstrap(
            a[y == i], b[y == i], margin=class_margin, n_boot=n_boot, confidence=confidence,
            seed=seed + 1 + i, what=f"recall of '{name}'",
        ).to_dict() | {"class": str(name)}
        for i, name in enumerate(classes)
        if (y == i).any()
    ]  # fmt: skip
    return {"accuracy": overall.to_dict(), "per_class": per_class, "confidence": confidence, "n_boot": n_boot}


def compare_average_precision(
    y_true: np.ndarray,
    challenger_scores: np.ndarray,
    champion_scores: np.ndarray,
    classes: Sequence[str],
    *,
    margin: float,
    label_margin: float,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """mAP and per-label AP non-inferiority of two multi-label models on the same images.

    y_true: (N, C) 0/1; *_scores: (N, C) probabilities or logits (AP depends only on the order).
    Both models are scored on the same resamples. Returns ``{"mAP": ..., "per_label": [...],
    "confidence", "n_boot", "metric": "mAP"}`` with :class:`NonInferiority` dicts (plus ``label``);
    labels without a positive test image are left out.
    """
    y = np.asarray(y_true)
    n, n_labels = y.shape
    present = [j for j in range(n_labels) if y[:, j].any()]
    if n == 0 or not present:
        return {"mAP": NonInferiority("mAP", n, 0.0, 0.0, 0.0, -1.0, margin, False).to_dict(), "per_label": [],
                "confidence": confidence, "n_boot": n_boot, "metric": "mAP"}  # fmt: skip
    ap: dict[str, list[np.ndarray]] = {"challenger": [], "champion": []}
    for weights in _weight_chunks(n, n_boot, seed=seed):
        for who, scores in (("challenger", challenger_scores), ("champion", champion_scores)):
            ap[who].append(np.stack([weighted_average_precision(y[:, j], scores[:, j], weights)
                                     for j in present], axis=1))  # fmt: skip
    stacked = {who: np.concatenate(parts) for who, parts in ap.items()}  # (1 + n_boot, labels)
    diff = stacked["challenger"] - stacked["champion"]
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample may miss a rare label entirely
        map_diff = np.nanmean(diff, axis=1)
    overall = _non_inferiority("mAP", n, stacked["challenger"][0].mean(), stacked["champion"][0].mean(), map_diff,
                               margin, confidence)  # fmt: skip
    per_label = [
        _non_inferiority(f"AP of '{classes[j]}'", int(y[:, j].sum()), stacked["challenger"][0, k],
                         stacked["champion"][0, k], diff[:, k], label_margin, confidence).to_dict()
        | {"label": str(classes[j])}
        for k, j in enumerate(present)
    ]  # fmt: skip
    return {"mAP": overall.to_dict(), "per_label": per_label, "confidence": confidence, "n_boot": n_boot,
            "metric": "mAP"}  # fmt: skip


def _non_inferiority(
    what: str, n: int, challenger: float, champion: float, diffs: np.ndarray, margin: float, confidence: float
) -> NonInferiority:
    """diffs: (1 + B,) challenger - champion, row 0 on the data itself, then B resamples (NaN: undefined)."""
    boot = diffs[1:][~np.isnan(diffs[1:])]
    lower = float(np.quantile(boot, 1 - confidence)) if boot.size else -1.0
    return NonInferiority(what=what, n=n, challenger=float(challenger), champion=float(champion),
                          difference=float(diffs[0]), lower=lower, margin=margin,
                          passed=lower >= -margin - 1e-12)  # fmt: skip


# Resamples scored at once: bounds the (rows, images) weight matrix to ~2M cells (16 MB).
_CHUNK_CELLS = 2_000_000


def _weight_chunks(n: int, n_boot: int, *, seed: int) -> Any:
    """Row blocks of the (1 + n_boot, n) weights: row 0 all ones (the data itself), then bootstrap
    counts (how often each image is drawn in a resample of size n), drawn chunk by chunk."""
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_CELLS // max(n, 1))
    yield np.ones((1, n), dtype=np.int64)
    for start in range(0, n_boot, rows):
        b = min(rows, n_boot - start)
        draws = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        yield np.bincount(draws.ravel(), minlength=b * n).reshape(b, n)
