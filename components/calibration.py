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
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

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
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, correct = _confidences(y_true, probs)
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
    """Temperature fitted on val, and test-set calibration before and after scaling."""

    temperature: float
    fitted_on: str
    n_fit: int
    n_bins: int
    before: dict[str, float]
    after: dict[str, float]
    bins_before: list[ReliabilityBin]
    bins_after: list[ReliabilityBin]

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
