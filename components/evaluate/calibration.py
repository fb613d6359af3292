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

Multi-label models score each label with a sigmoid: :func:`calibrate_multilabel` fits one ``T`` for
``sigmoid(logits / T)`` by the mean binary cross-entropy on val, and reports calibration per label
(*class-wise* ECE: the gap between each label's predicted probability and how often the label is
really there, over probability bins) and its mean over labels.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax

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


def calibration_metrics(y_true: np.ndarray, probs: np.ndarray, *, n_bins: int = 15) -> dict[str, float]:
    """``ece`` (equal-width), ``ece_adaptive`` (equal-mass), ``mce``, ``nll``, ``mean_confidence``."""
    conf, _ = _confidences(y_true, probs)
    return {
        "ece": expected_calibration_error(y_true, probs, n_bins=n_bins),
        "ece_adaptive": expected_calibration_error(y_true, probs, n_bins=n_bins, adaptive=True),
        "mce": maximum_calibration_error(y_true, probs, n_bins=n_bins),
        "nll": nll_of_logits(np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)), y_true),
        "mean_confidence": float(conf.mean()),
    }


# --------------------------------------------------------------------------- temperature scaling


def nll_of_logits(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T). logits: (N, K); y_true: (N,)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(y_true, dtype=np.int64)
    return float(-log_softmax(z, axis=1)[np.arange(y.size), y].mean())


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) on (validation) data.

    logits: (N, K) raw model outputs; y_true: (N,) class indices. One-dimensional and smooth in
    log T, so a bounded Brent search is exact to ~1e-6 and needs no learning rate or iterations cap.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    if z.ndim != 2 or y.shape != (z.shape[0],) or z.shape[0] == 0:
        raise ValueError(f"need logits (N, K) and y_true (N,) with N > 0, got {z.shape} and {y.shape}")
    res = minimize_scalar(
        lambda log_t: nll_of_logits(z, y, math.exp(log_t)),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    temperature = float(math.exp(res.x))
    logger.info("fitted temperature %.4f on %d samples", temperature, y.size)
    return temperature


def softmax_t(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """logits: (N, K) -> probabilities (N, K) of softmax(logits / T), float64."""
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))


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
    val_logits: np.ndarray,
    val_y: np.ndarray,
    test_logits: np.ndarray,
    test_y: np.ndarray,
    *,
    n_bins: int = 15,
    fit: bool = True,
) -> CalibrationReport:
    """Fit T on the validation logits (or keep T = 1 with ``fit=False``); report test calibration."""
    temperature = fit_temperature(val_logits, val_y) if fit else 1.0
    before = softmax_t(test_logits)
    after = softmax_t(test_logits, temperature)
    return CalibrationReport(
        temperature=temperature,
        fitted_on="val" if fit else "none",
        n_fit=int(np.asarray(val_y).size) if fit else 0,
        n_bins=n_bins,
        before=calibration_metrics(test_y, before, n_bins=n_bins),
        after=calibration_metrics(test_y, after, n_bins=n_bins),
        bins_before=reliability_bins(test_y, before, n_bins=n_bins),
        bins_after=reliability_bins(test_y, after, n_bins=n_bins),
    )


# --------------------------------------------------------------------------- multi-label (sigmoid)


def sigmoid_t(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """logits: (N, C) -> per-label probabilities sigmoid(logits / T), float64."""
    return np.asarray(expit(np.asarray(logits, dtype=np.float64) / temperature))


def bce_of_logits(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of sigmoid(logits / T) over every (image, label). logits, y_true: (N, C)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(y_true, dtype=np.float64)
    return float((np.logaddexp(0.0, z) - y * z).mean())


def fit_temperature_sigmoid(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The T > 0 minimising the mean BCE of sigmoid(logits / T) on (validation) data; (N, C) each.

    One T for all labels, like softmax temperature scaling: it keeps every label's ranking (and so
    its AP), and a scalar fitted on a small val split cannot over-fit the way per-label ones can.
    """
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(y_true, dtype=np.float64)
    if z.ndim != 2 or y.shape != z.shape or z.shape[0] == 0:
        raise ValueError(
            f"need logits and y_true of the same shape (N, C), N > 0, got {z.shape} and {y.shape}"
        )
    res = minimize_scalar(lambda log_t: bce_of_logits(z, y, math.exp(log_t)), bounds=_LOG_T_BOUNDS,
                          method="bounded", options={"xatol": 1e-6})  # fmt: skip
    temperature = float(math.exp(res.x))
    logger.info("fitted sigmoid temperature %.4f on %d samples", temperature, z.shape[0])
    return temperature


def label_calibration(
    y_true: np.ndarray, probs: np.ndarray, classes: Any, *, n_bins: int = 15
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Calibration of per-label probabilities. y_true, probs: (N, C).

    Returns the means over labels (``ece``, ``ece_adaptive``, ``mce`` = the worst label's MCE, ``nll``
    = mean BCE, ``mean_probability``, ``positive_rate``) and one row per label (``label``, ``ece``,
    ``ece_adaptive``, ``mce``, ``mean_probability``, ``positive_rate``).
    """
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    rows: list[dict[str, Any]] = []
    for j, name in enumerate(classes):
        bins = _bins_of(p[:, j], y[:, j], n_bins=n_bins, adaptive=False)
        adaptive = _bins_of(p[:, j], y[:, j], n_bins=n_bins, adaptive=True)
        rows.append({"label": str(name), "ece": _ece(bins), "ece_adaptive": _ece(adaptive),
                     "mce": float(max(b.gap for b in bins if b.count)),
                     "mean_probability": float(p[:, j].mean()), "positive_rate": float(y[:, j].mean())})  # fmt: skip
    clipped = np.clip(p, 1e-12, 1 - 1e-12)
    summary = {
        "ece": float(np.mean([r["ece"] for r in rows])),
        "ece_adaptive": float(np.mean([r["ece_adaptive"] for r in rows])),
        "mce": max(float(r["mce"]) for r in rows),
        "nll": float(-(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)).mean()),
        "mean_probability": float(p.mean()),
        "positive_rate": float(y.mean()),
    }
    return summary, rows


def _ece(bins: list[ReliabilityBin]) -> float:
    return float(sum(b.count * b.gap for b in bins) / sum(b.count for b in bins))


def calibrate_multilabel(
    val_logits: np.ndarray,
    val_y: np.ndarray,
    test_logits: np.ndarray,
    test_y: np.ndarray,
    classes: Any,
    *,
    n_bins: int = 15,
    fit: bool = True,
) -> CalibrationReport:
    """Fit T for the sigmoid on val by BCE (or keep T = 1 with ``fit=False``); report test calibration
    per label and averaged. *_logits, *_y: (N, C)."""
    temperature = fit_temperature_sigmoid(val_logits, val_y) if fit else 1.0
    y = np.asarray(test_y, dtype=np.float64)
    before, after = sigmoid_t(test_logits), sigmoid_t(test_logits, temperature)
    summary_before, _ = label_calibration(y, before, classes, n_bins=n_bins)
    summary_after, rows = label_calibration(y, after, classes, n_bins=n_bins)
    return CalibrationReport(
        temperature=temperature,
        fitted_on="val" if fit else "none",
        n_fit=int(np.asarray(val_y).shape[0]) if fit else 0,
        n_bins=n_bins,
        before=summary_before,
        after=summary_after,
        bins_before=_bins_of(before.ravel(), y.ravel(), n_bins=n_bins, adaptive=False),
        bins_after=_bins_of(after.ravel(), y.ravel(), n_bins=n_bins, adaptive=False),
        task="multilabel",
        per_label=rows,
    )
