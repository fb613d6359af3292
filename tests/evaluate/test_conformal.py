"""Split-conformal APS/RAPS sets: scores and quantiles by hand, coverage on synthetic calibrated
probabilities and on the tiny real model, the gate, multi-label skipped with a reason."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from components.core.config import ConformalConfig
from components.evaluate.conformal import (
    calibrate,
    conformal_evidence,
    conformal_quantile,
    coverage_gate,
    measure_sets,
)
from components.model.uncertainty import ConformalSets, aps_scores, image_uniforms, load_conformal

CLASSES = [f"c{i}" for i in range(10)]


def test_aps_and_raps_scores_by_hand() -> None:
    probs = np.array([[0.2, 0.5, 0.3]])
    # ranked 0.5 (b), 0.3 (c), 0.2 (a): mass up to and including each class
    assert aps_scores(probs, randomized=False)[0].tolist() == pytest.approx([1.0, 0.5, 0.8])
    u = image_uniforms(probs)[0]
    assert 0 <= u < 1 and image_uniforms(probs)[0] == u  # a function of the image: one set per image
    assert aps_scores(probs)[0].tolist() == pytest.approx([0.8 + 0.2 * u, 0.5 * u, 0.5 + 0.3 * u])
    # RAPS: + lam * max(0, rank - k_reg); ranks a=3, b=1, c=2
    raps = aps_scores(probs, lam=0.1, k_reg=1, randomized=False)[0]
    assert raps.tolist() == pytest.approx([1.0 + 0.2, 0.5, 0.8 + 0.1])


def test_quantile_by_hand() -> None:
    scores = np.arange(1.0, 10.0)  # n = 9
    assert conformal_quantile(scores, 0.9) == 9.0  # ceil(10 * 0.9) = 9th smallest
    assert conformal_quantile(scores, 0.5) == 5.0
    assert conformal_quantile(scores[:5], 0.9) == math.inf  # ceil(6 * 0.9) = 6 > 5: every class


def test_sets_follow_the_quantile_and_round_trip(tmp_path: Path) -> None:
    rule = ConformalSets("aps", 0.9, (0.85,), randomized=False)
    probs = np.array([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]])
    # scores [1.0, 0.5, 0.8] and [0.9, 0.95, 1.0]: {b, c} and the empty set (0.9 > 0.85)
    assert rule.label_sets(probs, ["a", "b", "c"]) == [["b", "c"], []]
    rule.save(tmp_path)
    assert load_conformal(tmp_path) == rule
    wide = ConformalSets("aps", 0.9, (math.inf,))
    wide.save(tmp_path)
    assert load_conformal(tmp_path) == wide  # an infinite quantile is stored as null, read back as inf


def _calibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of a perfectly calibrated 10-class model: labels drawn from them."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(10, 0.3), size=n)
    labels = np.array([rng.choice(10, p=p) for p in probs])
    return probs, labels


@pytest.mark.parametrize(
    "cfg",
    [ConformalConfig(), ConformalConfig(method="raps"), ConformalConfig(class_conditional=True)],
    ids=["aps", "raps", "class-conditional"],
)
def test_coverage_on_synthetic_probabilities(cfg: ConformalConfig) -> None:
    cal, test = _calibrated(4000, 0), _calibrated(10000, 1)
    rule = calibrate(cfg, *cal)
    report = measure_sets(rule, *test, CLASSES)
    assert report["coverage"] == pytest.approx(0.9, abs=0.015)
    assert 1.0 < report["mean_set_size"] < 10.0
    assert sum(report["size_histogram"]) == 10000
    if cfg.class_conditional:  # each class covered, not only on average
        assert len(rule.qhat) == 10
        assert all(r["coverage"] == pytest.approx(0.9, abs=0.05) for r in report["per_class"])
    gates = coverage_gate(report, 0.015, confidence=0.95, level="error")
    assert gates[0].passed


def test_coverage_on_the_tiny_real_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    from components.model.checkpoint import Predictor
    from tests.conftest import fmnist_arrays, png_bytes

    predictor = Predictor.from_dir(tiny_model_dir)
    x, y = fmnist_arrays("t10k", 1500)
    probs = predictor.predict_proba([png_bytes(a) for a in x])
    report = conformal_evidence(ConformalConfig(), single_class=True, val=(probs[:500], y[:500].astype(int)),
                                test=(probs[500:], y[500:].astype(int)), classes=CLASSES, out_dir=tmp_path)  # fmt: skip
    assert report["status"] == "ok" and (tmp_path / "conformal.json").exists()
    # 1,000 test images: the interval allows ~2 points of sampling noise on top of the band
    assert report["coverage"] == pytest.approx(0.9, abs=0.04)
    assert coverage_gate(report, 0.015, confidence=0.95, level="error")[0].passed


def test_gate_fails_far_from_the_target_and_multilabel_is_skipped(tmp_path: Path) -> None:
    report = {"status": "ok", "target": 0.9, "coverage": 0.8, "n": 5000, "method": "aps", "n_calibration": 5000,
              "mean_set_size": 1.1}  # fmt: skip
    gate = coverage_gate(report, 0.015, confidence=0.95, level="error")[0]
    # band 0.015 + 1.96 sqrt(0.09 / 5002) = 0.0233; Wilson upper bound of 4000/5000 = 0.8109:
    # the interval misses the band [0.8767, 0.9233] by 0.8767 - 0.8109
    assert not gate.passed and gate.value == pytest.approx(0.0658, abs=5e-4)
    skipped = conformal_evidence(ConformalConfig(), single_class=False, val=None, test=(np.zeros((1, 2)), np.zeros(1)),
                                 classes=["a", "b"], out_dir=tmp_path)  # fmt: skip
    assert skipped["status"] == "skipped" and "multi-label" in skipped["reason"]
    assert not (tmp_path / "conformal.json").exists()
    assert coverage_gate(skipped, 0.015, confidence=0.95, level="error") == []
