"""Calibration: ECE/MCE on hand-computed fixtures, temperature scaling on an over-confident model."""

from __future__ import annotations

import numpy as np
import pytest

from components.evaluate.calibration import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    maximum_calibration_error,
    reliability_bins,
)
from components.task import get_task
from components.task.metrics import nll_of_logits

SINGLE = get_task("singlelabel")

# Six predictions over 2 classes. Samples 0-3 have confidence 0.9 (3 of 4 right),
# samples 4-5 confidence 0.6 (1 of 2 right).
PROBS = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
Y = np.array([0, 1, 0, 1, 0, 0])


def test_equal_width_ece_and_mce_by_hand() -> None:
    # Bin (0.8, 0.9]: conf 0.9, acc 3/4, gap 0.15, weight 4/6; bin (0.5, 0.6]: conf 0.6, acc 1/2,
    # gap 0.10, weight 2/6.  ECE = 4/6 * 0.15 + 2/6 * 0.10 = 0.1333...; MCE = 0.15.
    assert expected_calibration_error(Y, PROBS, n_bins=10) == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.10)
    assert maximum_calibration_error(Y, PROBS, n_bins=10) == pytest.approx(0.15)
    bins = reliability_bins(Y, PROBS, n_bins=10)
    assert [b.count for b in bins] == [0, 0, 0, 0, 0, 2, 0, 0, 4, 0]
    assert bins[8].accuracy == pytest.approx(0.75) and bins[8].confidence == pytest.approx(0.9)


def test_adaptive_ece_by_hand() -> None:
    # Sorted by confidence (stable): samples 4, 5, 0 | 1, 2, 3.
    # Group 1: conf (0.6 + 0.6 + 0.9)/3 = 0.7, right: 4 yes, 5 no, 0 yes -> 2/3, gap 1/30.
    # Group 2: conf 0.9, right: 1 yes, 2 yes, 3 no -> 2/3, gap 0.9 - 2/3 = 7/30.  ECE = (1/30 + 7/30)/2.
    assert expected_calibration_error(Y, PROBS, n_bins=2, adaptive=True) == pytest.approx(8 / 60)
    bins = reliability_bins(Y, PROBS, n_bins=2, adaptive=True)
    assert [b.count for b in bins] == [3, 3]


def test_perfectly_calibrated_bins_have_zero_ece() -> None:
    probs = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(np.array([0, 0, 0, 1]), probs) == pytest.approx(0.0)


def _overconfident(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z): z is perfectly calibrated, 3 z is over-confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, 5))
    p = SINGLE.probabilities(z)
    y = np.array([rng.choice(5, p=row) for row in p])
    return 3.0 * z, y


def test_temperature_scaling_fixes_an_overconfident_model() -> None:
    val_logits, val_y = _overconfident(4000, seed=0)
    test_logits, test_y = _overconfident(4000, seed=1)
    t = fit_temperature(SINGLE, val_logits, val_y)
    assert t == pytest.approx(3.0, rel=0.1)  # the over-confidence factor is recovered
    # It is the NLL minimum.
    assert nll_of_logits(val_logits, val_y, t) < nll_of_logits(val_logits, val_y, t * 0.95)
    assert nll_of_logits(val_logits, val_y, t) < nll_of_logits(val_logits, val_y, t * 1.05)

    report = calibrate(SINGLE, val_logits, val_y, test_logits, test_y, ["a", "b", "c"], n_bins=15)
    assert report.temperature == pytest.approx(t)
    assert report.before["ece"] > 0.1  # badly over-confident
    assert report.after["ece"] < 0.03  # fixed on held-out data
    assert report.after["ece"] < report.before["ece"] / 4
    assert report.after["ece_adaptive"] < report.before["ece_adaptive"]
    assert report.after["nll"] < report.before["nll"]
    # Scaling never changes the predicted class.
    assert (SINGLE.probabilities(test_logits, temperature=t).argmax(1) == test_logits.argmax(1)).all()


def test_no_fit_keeps_temperature_one() -> None:
    logits, y = _overconfident(200, seed=2)
    report = calibrate(SINGLE, logits, y, logits, y, ["a", "b"], fit=False)
    assert report.temperature == 1.0 and report.fitted_on == "none"
    assert report.before == report.after


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError):
        fit_temperature(SINGLE, np.zeros((3, 2)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError):
        reliability_bins(Y, PROBS, n_bins=0)
