"""Calibration of class probabilities: ECE/MCE, reliability curves, temperature scaling.

A model is calibrated when, among the predictions it makes with confidence ~0.8, about 80 % are
right. The expected calibration error (ECE) is the support-weighted mean gap between accuracy and
confidence over confidence bins; the maximum calibration error (MCE) is the worst bin's gap.

Two binnings: *equal-width* (``[0, 1/B), [1/B, 2/B), ...``, Guo et al. 2017) and *adaptive*
(equal-mass: each bin holds ~N/B predictions, so the crowded high-confidence end is resolved
finely and an almost empty bin cannot dominate).

Temperature scaling divides the logits by one scalar ``T > 0`` fitted on the **validation** split
by minimising the negative log-likelihood; ``argmax`` (and so accuracy) is unchanged. The fitted
``T`` is stored in the model spec (``model.json``) so that the served model is calibrated too.

What a confidence statement is, and the loss ``T`` is fitted by, is the task's
(:class:`components.task.Task`): a single-label model states the top label's probability and is
fitted by the softmax NLL; a multi-label model scores each label with a sigmoid, is fitted by the
mean binary cross-entropy, and is calibrated per label (*class-wise* ECE: the gap between each
label's predicted probability and how often the label is really there, over probability bins),
summarised by the mean over labels. :func:`calibrate` serves both.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from components.task import Task, get_task

logger = logging.getLogger(__name__)

# Search range of log(T): T in [0.05, 20] covers any real network's over/under-confidence.
_LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin: its edges, how many predictions fell in it, their mean confidence and
    accuracy (both 0 for an empty bin, which carries no weight)."""

    lower: float
    upper: float
    count: int
    confidence: float
    accuracy: float

    @property
    def gap(self) -> float:
        return abs(self.accuracy - self.confidence)


def _confidences(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """probs: (N, K) -> confidence (N,) = max probability, correct (N,) bool."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    if p.ndim != 2 or y.shape != (p.shape[0],) or p.shape[0] == 0:
        raise ValueError(f"need probs (N, K) and y_true (N,) with N > 0, got {p.shape} and {y.shape}")
    return p.max(axis=1), p.argmax(axis=1) == y


def reliability_bins(
    y_true: np.ndarray, probs: np.ndarray, *, n_bins: int = 15, adaptive: bool = False
) -> list[ReliabilityBin]:
    """Top-label reliability bins. y_true: (N,) int; probs: (N, K).

    Equal-width bins are ``(lo, hi]`` (the first also holds 0); adaptive bins split the sorted
    confidences into ``n_bins`` groups of (almost) equal size.
    """
    conf, correct = _confidences(y_true, probs)
    return _bins_of(conf, correct, n_bins=n_bins, adaptive=adaptive)


def _bins_of(conf: np.ndarray, correct: np.ndarray, *, n_bins: int, adaptive: bool) -> list[ReliabilityBin]:
    """Reliability bins of predicted probabilities conf (N,) against outcomes correct (N,) 0/1."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if adaptive:
        order = np.argsort(conf, kind="stable")
        groups = [g for g in np.array_split(order, min(n_bins, conf.size)) if g.size]
        return [_bin(conf[g], correct[g], float(conf[g].min()), float(conf[g].max())) for g in groups]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # (lo, hi] bins; index 0 also takes conf == 0 (impossible for softmax, harmless otherwise).
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    return [
        _bin(conf[idx == b], correct[idx == b], float(edges[b]), float(edges[b + 1])) for b in range(n_bins)
    ]


def _bin(conf: np.ndarray, correct: np.ndarray, lower: float, upper: float) -> ReliabilityBin:
    n = int(conf.size)
    return ReliabilityBin(
        lower=lower,
        upper=upper,
        count=n,
        confidence=float(conf.mean()) if n else 0.0,
        accuracy=float(correct.mean()) if n else 0.0,
    )


def expected_calibration_error(
    y_true: np.ndarray, probs: np.ndarray, *, n_bins: int = 15, adaptive: bool = False
) -> float:
    """ECE = sum_b (n_b / N) * |acc_b - conf_b|, in [0, 1]."""
    bins = reliability_bins(y_true, probs, n_bins=n_bins, adaptive=adaptive)
    total = sum(b.count for b in bins)
    return float(sum(b.count * b.gap for b in bins) / total)


def maximum_calibration_error(y_true: np.ndarray, probs: np.ndarray, *, n_bins: int = 15) -> float:
    """MCE = max over non-empty equal-width bins of |acc_b - conf_b|."""
    return float(max(b.gap for b in reliability_bins(y_true, probs, n_bins=n_bins) if b.count))


def calibration_summary(
    task: Task, y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], *, n_bins: int = 15
) -> tuple[dict[str, float], list[dict[str, Any]] | None]:
    """Calibration of one model's probabilities over the task's confidence statements
    (:meth:`~components.task.Task.calibration_groups`): ``ece`` (equal-width) and ``ece_adaptive``
    (equal-mass), averaged over the groups, ``mce`` (the worst group's), then the task's
    :meth:`~components.task.Task.calibration_stats` (``nll``, mean confidence). Also one row per named
    group (multi-label: per label ``label``, ``ece``, ``ece_adaptive``, ``mce``, ``mean_probability``,
    ``positive_rate``), or None. y_true: the task's targets; probs: (N, K).
    """
    names, conf, outcome = task.calibration_groups(probs, y_true, classes)
    groups = [
        {"ece": _ece(_bins_of(c, o, n_bins=n_bins, adaptive=False)),
         "ece_adaptive": _ece(_bins_of(c, o, n_bins=n_bins, adaptive=True)),
         "mce": float(max(b.gap for b in _bins_of(c, o, n_bins=n_bins, adaptive=False) if b.count)),
         "mean_probability": float(c.mean()), "positive_rate": float(o.mean())}
        for c, o in zip(conf.T, outcome.T, strict=True)
    ]  # fmt: skip
    summary = {
        "ece": float(np.mean([g["ece"] for g in groups])),
        "ece_adaptive": float(np.mean([g["ece_adaptive"] for g in groups])),
        "mce": max(float(g["mce"]) for g in groups),
        **task.calibration_stats(probs, y_true),
    }
    rows = None if names is None else [{"label": n, **g} for n, g in zip(names, groups, strict=True)]
    return summary, rows


def _ece(bins: list[ReliabilityBin]) -> float:
    return float(sum(b.count * b.gap for b in bins) / sum(b.count for b in bins))


# --------------------------------------------------------------------------- temperature scaling


def fit_temperature(task: Task | str, logits: np.ndarray, y_true: np.ndarray) -> float:
    """The T > 0 minimising the task's log-loss of its probabilities of ``logits / T`` on (validation)
    data (:meth:`~components.task.Task.log_loss`: the softmax NLL, or the mean BCE per label).

    logits: (N, K) raw model outputs; y_true: the task's targets for the same N images. One T for all
    classes keeps every ranking (argmax, and each label's AP), and a scalar fitted on a small val
    split cannot over-fit. One-dimensional and smooth in log T, so a bounded Brent search is exact to
    ~1e-6 and needs no learning rate or iterations cap.
    """
    task = get_task(task)
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(y_true)
    if z.ndim != 2 or z.shape[0] == 0 or y.shape[0] != z.shape[0]:
        raise ValueError(
            f"need logits (N, K) and targets of the same N > 0 images, got {z.shape} and {y.shape}"
        )

    def loss(log_t: float) -> float:
        return task.log_loss(z, y, temperature=math.exp(log_t))

    res = minimize_scalar(loss, bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    temperature = float(math.exp(res.x))
    logger.info("fitted %s temperature %.4f on %d samples", task.title, temperature, z.shape[0])
    return temperature


@dataclass(frozen=True)
class CalibrationReport:
    """Temperature fitted on val, and test-set calibration before and after scaling.

    Multi-label (``task``): ``before``/``after`` hold the means over labels, ``per_label`` each label's
    ECE and MCE after scaling, and the bins pool every (image, label) probability.
    """

    temperature: float
    fitted_on: str
    n_fit: int
    n_bins: int
    before: dict[str, float]
    after: dict[str, float]
    bins_before: list[ReliabilityBin]
    bins_after: list[ReliabilityBin]
    task: str = "singlelabel"
    per_label: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d


def calibrate(
    task: Task | str,
    val_logits: np.ndarray,
    val_y: np.ndarray,
    test_logits: np.ndarray,
    test_y: np.ndarray,
    classes: Sequence[str],
    *,
    n_bins: int = 15,
    fit: bool = True,
) -> CalibrationReport:
    """Fit T on the validation logits (or keep T = 1 with ``fit=False``); report the test split's
    calibration before and after scaling (:func:`calibration_summary`). *_logits: (N, K); *_y: the
    task's targets. The reliability bins pool every confidence statement (single-label: the top
    label of each image; multi-label: every (image, label) probability)."""
    task = get_task(task)
    temperature = fit_temperature(task, val_logits, val_y) if fit else 1.0
    before = task.probabilities(test_logits)
    after = task.probabilities(test_logits, temperature=temperature)
    summary_before, _ = calibration_summary(task, test_y, before, classes, n_bins=n_bins)
    summary_after, rows = calibration_summary(task, test_y, after, classes, n_bins=n_bins)
    return CalibrationReport(
        temperature=temperature,
        fitted_on="val" if fit else "none",
        n_fit=int(np.asarray(val_y).shape[0]) if fit else 0,
        n_bins=n_bins,
        before=summary_before,
        after=summary_after,
        bins_before=_pooled_bins(task, test_y, before, classes, n_bins=n_bins),
        bins_after=_pooled_bins(task, test_y, after, classes, n_bins=n_bins),
        task=task.name,
        per_label=rows,
    )


def _pooled_bins(
    task: Task, y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], *, n_bins: int
) -> list[ReliabilityBin]:
    """Equal-width reliability bins of every confidence statement together (the reliability diagram)."""
    _, conf, outcome = task.calibration_groups(probs, y_true, classes)
    return _bins_of(conf.ravel(), outcome.ravel(), n_bins=n_bins, adaptive=False)
