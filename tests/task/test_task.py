"""The Task objects: encoding, probabilities, decisions, and the options each task refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.core.config import TrainConfig
from components.core.errors import ConfigError, DataError
from components.task import MULTILABEL, SINGLELABEL, get_task

CLASSES = ("cat", "dog", "fox")


def test_get_task_names_and_unknown():
    assert get_task(None).name == SINGLELABEL
    assert get_task(MULTILABEL).headline == "mAP"
    assert get_task(get_task(SINGLELABEL)) is get_task(SINGLELABEL)
    with pytest.raises(DataError, match="unknown task"):
        get_task("multiclass")


def test_encode_targets_and_unknown_labels():
    single, multi = get_task(SINGLELABEL), get_task(MULTILABEL)
    assert single.encode([["dog"], ["cat"]], CLASSES).tolist() == [1, 0]
    assert multi.encode([["dog", "fox"], []], CLASSES).tolist() == [[0, 1, 1], [0, 0, 0]]
    with pytest.raises(DataError, match="wolf"):
        multi.encode([["wolf"]], CLASSES)
    with pytest.raises(DataError, match="exactly one label"):
        single.encode([["cat", "dog"]], CLASSES)
    assert single.one_hot(np.array([2, 0]), 3).tolist() == [[0, 0, 1], [1, 0, 0]]


def test_probabilities_agree_between_numpy_and_torch():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    for name in (SINGLELABEL, MULTILABEL):
        task = get_task(name)
        p = task.probabilities(logits, temperature=2.0)
        t = task.torch_probabilities(torch.tensor(logits), temperature=2.0).numpy()
        np.testing.assert_allclose(p, t, rtol=1e-5)
    assert np.allclose(get_task(SINGLELABEL).probabilities(logits).sum(axis=1), 1.0)
    assert not np.allclose(get_task(MULTILABEL).probabilities(logits).sum(axis=1), 1.0)


def test_decisions_label_sets_and_correctness():
    probs = np.array([[0.7, 0.6, 0.1], [0.2, 0.3, 0.5]])
    single, multi = get_task(SINGLELABEL), get_task(MULTILABEL)
    assert single.label_sets(probs, CLASSES) == [["cat"], ["fox"]]
    assert multi.label_sets(probs, CLASSES, thresholds=[0.5, 0.5, 0.6]) == [["cat", "dog"], []]
    assert single.correct(probs, np.array([0, 1])).tolist() == [True, False]
    assert multi.correct(probs, np.array([[1, 1, 0], [0, 0, 1]])).tolist() == [True, True]
    with pytest.raises(ValueError, match="thresholds"):
        multi.decide(probs, thresholds=[0.5])


def test_training_options_each_task_refuses():
    with pytest.raises(ConfigError, match="multi-label"):
        get_task(SINGLELABEL).check_train_options(TrainConfig(loss="asymmetric"))
    with pytest.raises(ConfigError, match="sampler=balanced"):
        get_task(MULTILABEL).check_train_options(TrainConfig(sampler="balanced"))
    get_task(MULTILABEL).check_train_options(TrainConfig(loss="asymmetric"))
    assert type(get_task(MULTILABEL).eval_loss()).__name__ == "BCEWithLogitsLoss"
