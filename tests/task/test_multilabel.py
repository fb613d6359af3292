"""components.task.multilabel: multi-label metrics and thresholds against hand-computed fixtures."""

from __future__ import annotations

import numpy as np
import pytest

from components.task.multilabel import label_matrix, multilabel_metrics, predict_sets, tune_thresholds

CLASSES = ["cat", "dog", "car"]


def test_label_matrix_and_unknown_label() -> None:
    y = label_matrix([["cat"], ["dog", "car"], []], CLASSES)
    assert y.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="'bird'"):
        label_matrix([["bird"]], CLASSES)


def test_metrics_hand_computed() -> None:
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    probs = np.array([[0.9, 0.2, 0.6], [0.1, 0.8, 0.4], [0.4, 0.7, 0.1], [0.3, 0.1, 0.7]])
    m = multilabel_metrics(y, probs, [0.5, 0.5, 0.5], CLASSES)
    # predictions: [1,0,1] [0,1,0] [0,1,0] [0,0,1] -> only row 3 wrong (missed cat)
    assert m["subset_accuracy"] == pytest.approx(3 / 4)
    assert m["hamming_loss"] == pytest.approx(1 / 12)
    cat = m["per_label"][0]
    assert (cat["precision"], cat["recall"], cat["support"]) == (1.0, 0.5, 2)
    # micro: TP 5, FP 0, FN 1
    assert m["micro_precision"] == 1.0 and m["micro_recall"] == pytest.approx(5 / 6)
    assert m["micro_f1"] == pytest.approx(2 * 5 / (2 * 5 + 1))
    # AP of each label: positives ranked first everywhere -> 1.0
    assert m["mAP"] == pytest.approx(1.0)
    assert m["label_cardinality"] == pytest.approx(6 / 4)


def test_thresholds_maximise_f1_and_reach_targets() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((400, 1)) < 0.3).astype(int)
    probs = np.clip(0.35 * y + rng.random((400, 1)) * 0.65, 0, 1)
    (best,) = tune_thresholds(y, probs, ["x"])
    grid = np.linspace(0.01, 0.99, 99)
    f1s = []
    for t in grid:
        pred = predict_sets(probs, [t])[:, 0]
        tp = int(((pred == 1) & (y[:, 0] == 1)).sum())
        f1s.append(2 * tp / max(1, pred.sum() + y.sum()))
    assert best.f1 >= max(f1s) - 1e-9
    (prec,) = tune_thresholds(y, probs, ["x"], rule="precision", target=0.95)
    pred = predict_sets(probs, [prec.threshold])[:, 0]
    assert prec.reached and (y[pred == 1, 0]).mean() >= 0.95
    (rec,) = tune_thresholds(y, probs, ["x"], rule="recall", target=0.99)
    pred = predict_sets(probs, [rec.threshold])[:, 0]
    assert rec.reached and pred[y[:, 0] == 1].mean() >= 0.99
    assert prec.threshold >= rec.threshold  # more precision asks a higher bar than more recall


def test_label_without_positives_keeps_default() -> None:
    y = np.array([[1, 0], [0, 0]])
    (a, b) = tune_thresholds(y, np.array([[0.8, 0.3], [0.2, 0.6]]), ["a", "b"], default=0.5)
    assert b.threshold == 0.5 and not b.reached
    with pytest.raises(ValueError, match="target"):
        tune_thresholds(y, y.astype(float), ["a", "b"], rule="precision")


def test_fast_average_precision_matches_sklearn_with_ties_and_bootstrap_weights() -> None:
    from sklearn.metrics import average_precision_score

    from components.task.multilabel import average_precision, weighted_average_precision

    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(5, 80))
        y = (rng.random(n) < 0.4).astype(int)
        scores = np.round(rng.random(n), 1)  # many ties
        if not y.any():
            assert average_precision(y, scores) is None
            continue
        assert average_precision(y, scores) == pytest.approx(average_precision_score(y, scores), abs=1e-12)
        idx = rng.integers(0, n, n)  # a bootstrap resample = each image weighted by its draw count
        weights = np.bincount(idx, minlength=n)[None, :]
        (got,) = weighted_average_precision(y, scores, weights)
        if y[idx].any():
            assert got == pytest.approx(average_precision_score(y[idx], scores[idx]), abs=1e-12)
        else:
            assert np.isnan(got)
