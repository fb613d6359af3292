"""Linear probes: C picked on val by the task's headline metric; a multinomial probe over the
classes (single-label) and one regression per label (multi-label)."""

from __future__ import annotations

import numpy as np
import pytest

from components.baseline.probes import PROBE_C_GRID, LinearProbe, OneVsRestProbe, fit_linear_probe, probe_gap
from components.core.errors import DataError
from components.task import MULTILABEL, SINGLELABEL, get_task

SINGLE, MULTI = get_task(SINGLELABEL), get_task(MULTILABEL)


def test_linear_probe_picks_c_on_val_and_covers_unseen_classes() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 3
    y = np.repeat([0, 1], 30)  # class 2 never appears in training
    x = centres[y] + rng.normal(size=(60, 8))
    probe = fit_linear_probe(SINGLE, x[::2], y[::2], 3, x_val=x[1::2], y_val=y[1::2])
    assert isinstance(probe, LinearProbe)
    assert probe.C in PROBE_C_GRID and probe.val_score is not None and probe.val_score > 0.9  # val accuracy
    probs = probe.predict_proba(x)
    assert probs.shape == (60, 3) and np.allclose(probs.sum(axis=1), 1) and np.all(probs[:, 2] == 0)
    assert fit_linear_probe(SINGLE, x, y, 3, C=0.5).C == 0.5  # no val images: the given C, no sweep


def test_multilabel_probe_is_one_regression_per_label_scored_by_val_map() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((120, 3)) < 0.4).astype(np.int8)
    y[:, 2] = 0  # a label never present in training: its probability is the constant 0
    x = y @ rng.normal(size=(3, 8)) * 3 + rng.normal(size=(120, 8))
    probe = fit_linear_probe(MULTI, x[::2], y[::2], 3, x_val=x[1::2], y_val=y[1::2])
    assert isinstance(probe, OneVsRestProbe) and probe.C in PROBE_C_GRID
    assert probe.val_score is not None and probe.val_score > 0.9  # val mAP (the absent label has no AP)
    probs = probe.predict_proba(x)
    assert probs.shape == (120, 3) and np.all(probs[:, 2] == 0)
    assert not np.allclose(probs[:, :2].sum(axis=1), 1)  # independent labels, not a softmax
    no_val = fit_linear_probe(MULTI, x, y, 3, x_val=x[:5], y_val=np.zeros_like(y[:5]))  # no val positives
    assert no_val.C == 1.0 and no_val.val_score is None


def test_a_probe_needs_both_sides_of_something_to_learn() -> None:
    assert probe_gap(SINGLE, np.array([1, 1, 1])) == "fewer than 2 classes in the train split"
    assert probe_gap(SINGLE, np.array([0, 1])) is None
    always = np.ones((4, 2), dtype=np.int8)
    assert probe_gap(MULTI, always) == "no label both present and absent in the train split"
    assert probe_gap(MULTI, np.array([[1, 0], [0, 0]], dtype=np.int8)) is None
    with pytest.raises(DataError, match="fewer than 2 classes"):
        fit_linear_probe(SINGLE, np.zeros((3, 4)), np.array([1, 1, 1]), 2)
