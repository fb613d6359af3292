"""The CLIP gate: a trained model must beat CLIP zero-shot overall and per class (label); a gate
that cannot be checked is *not applicable* and never passes."""

from __future__ import annotations

import numpy as np

from components.evaluate.baseline_gate import check_beats_baseline, is_not_applicable
from components.task.metrics import compute_metrics


def test_gate_trained_must_beat_zero_shot_overall_and_per_class() -> None:
    classes = ["a", "b", "c"]
    y = np.array([0, 0, 1, 1, 2, 2])
    onehot = np.eye(3)[y] * 0.8 + 0.2 / 3
    trained = compute_metrics(y, onehot, classes)  # perfect
    weak = onehot.copy()
    weak[[0, 1]] = [0.1, 0.8, 0.1]  # zero-shot misses both "a" images
    zero_shot = compute_metrics(y, weak, classes)
    gates = check_beats_baseline(trained, zero_shot, margin=0.1)
    assert [g.name for g in gates] == [
        "beats_zero_shot[accuracy]", "beats_zero_shot[a]", "beats_zero_shot[b]", "beats_zero_shot[c]",
    ]  # fmt: skip
    # recall of b and c: 1.0 vs 1.0 + 0.1 -> fail; a: 1.0 vs 0.0 + 0.1 -> pass; accuracy 1.0 vs 0.667 + 0.1
    assert [g.passed for g in gates] == [True, True, False, False]
    assert all(g.passed for g in check_beats_baseline(trained, zero_shot, margin=0.0))
    (na,) = check_beats_baseline(trained, None, margin=0.0)
    assert not na.passed and is_not_applicable(na)


def _multilabel(aps: dict[str, float | None]) -> dict:
    known = [ap for ap in aps.values() if ap is not None]
    return {"task": "multilabel", "mAP": sum(known) / len(known),
            "per_label": [{"label": k, "ap": ap} for k, ap in aps.items()]}  # fmt: skip


def test_multilabel_gate_compares_map_and_each_label_ap() -> None:
    trained = _multilabel({"a": 0.9, "b": 0.6, "c": None})  # no test positive of "c": no AP
    zero_shot = _multilabel({"a": 0.5, "b": 0.7, "c": 0.4})
    gates = {g.name: g for g in check_beats_baseline(trained, {"status": "ok", "zero_shot": zero_shot})}
    assert list(gates) == [
        "beats_zero_shot[mAP]",
        "beats_zero_shot[a]",
        "beats_zero_shot[b]",
        "beats_zero_shot[c]",
    ]
    assert gates["beats_zero_shot[mAP]"].passed and gates["beats_zero_shot[a]"].passed
    assert (
        not gates["beats_zero_shot[b]"].passed
        and "AP of 'b' 0.6000 < zero-shot 0.7000" in gates["beats_zero_shot[b]"].message
    )
    assert not gates["beats_zero_shot[c]"].passed and is_not_applicable(gates["beats_zero_shot[c]"])
    assert "label 'c' has no AP on one side" in gates["beats_zero_shot[c]"].message
    # a single-label zero-shot result cannot judge a multi-label model (and the other way round)
    single = compute_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"])
    for model, baseline in ((trained, single), (single, zero_shot)):
        (na,) = check_beats_baseline(model, baseline)
        assert not na.passed and is_not_applicable(na) and "another task" in na.message
