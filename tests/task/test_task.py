"""The Task objects: encoding, probabilities, decisions, the options each task refuses, and the metric-level
behaviour (metric set, scalars, decision fitting, champion statistic, calibration view, splits) checked
against scikit-learn on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.core.config import GATE_NAMES, GatesConfig, TrainConfig
from components.core.errors import ConfigError, DataError
from components.task import MULTILABEL, SINGLELABEL, Decision, detect_task, get_task, task_of
from components.task.splits import split_quotas

CLASSES = ("cat", "dog", "fox")


def test_get_task_names_and_unknown():
    assert get_task(None).name == SINGLELABEL
    assert get_task(MULTILABEL).headline == "mAP"
    assert get_task(get_task(SINGLELABEL)) is get_task(SINGLELABEL)
    with pytest.raises(DataError, match="unknown task"):
        get_task("multiclass")


def test_manifest_label_sets_and_the_label_words_of_each_task():
    """What the quality checks ask the task: where a row's labels are, how to read them, what to say."""
    import pandas as pd

    single, multi = get_task(SINGLELABEL), get_task(MULTILABEL)
    rows = pd.DataFrame({"label": ["dog", "cat"], "labels": [np.array(["dog", "fox"]), None]})
    assert single.manifest_label_sets(rows) == [["dog"], ["cat"]]
    assert multi.manifest_label_sets(rows) == [["dog", "fox"], []]  # a null cell is an empty set
    assert (single.label_column, multi.label_column) == ("label", "labels")
    assert (single.label_table, multi.label_table) == ("manifest", "label_rows")
    assert (single.audit_features, multi.audit_features) == ("pca", "patches")
    assert single.label_scope == "" and "all labels" in multi.label_scope
    assert single.imbalance_rule(5.0).startswith("the largest class has at most 5x")
    assert multi.imbalance_rule(2.5).startswith("the most frequent label occurs in at most 2.5x")


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


# --------------------------------------------------------------------------- metric-level behaviour

# 6 images, 3 classes. Single-label: argmax right on images 0, 2, 3, 4 (4 of 6).
Y_SINGLE = np.array([0, 0, 1, 1, 2, 2])
P_SINGLE = np.array(
    [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.4, 0.5, 0.1], [0.3, 0.1, 0.6], [0.5, 0.1, 0.4]]
)
# Multi-label: the same images with label sets; fox is ranked imperfectly.
Y_MULTI = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]], dtype=np.int8)
P_MULTI = np.array(
    [[0.9, 0.2, 0.6], [0.1, 0.8, 0.7], [0.6, 0.7, 0.1], [0.3, 0.1, 0.4], [0.8, 0.3, 0.5], [0.2, 0.9, 0.3]]
)


def test_metrics_agree_with_sklearn_for_both_tasks():
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, log_loss

    single, multi = get_task(SINGLELABEL), get_task(MULTILABEL)
    m = single.metrics(Y_SINGLE, P_SINGLE, CLASSES, top_k=2)
    assert m["accuracy"] == pytest.approx(accuracy_score(Y_SINGLE, P_SINGLE.argmax(1)))
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx(f1_score(Y_SINGLE, P_SINGLE.argmax(1), average="macro"))
    assert m["nll"] == pytest.approx(log_loss(Y_SINGLE, P_SINGLE))
    assert single.headline_value(m) == m["accuracy"] and single.thresholds_of(m) is None
    assert single.class_names(m) == list(CLASSES) and [r["support"] for r in single.rows(m)] == [2, 2, 2]

    cut = [0.5, 0.5, 0.5]
    ml = multi.metrics(Y_MULTI, P_MULTI, CLASSES, thresholds=cut)
    expected_map = average_precision_score(Y_MULTI, P_MULTI, average="macro")
    assert ml["mAP"] == pytest.approx(expected_map)
    assert multi.headline_value(ml) == pytest.approx(expected_map)
    assert ml["micro_f1"] == pytest.approx(f1_score(Y_MULTI, (P_MULTI >= 0.5).astype(int), average="micro"))
    assert multi.thresholds_of(ml) == cut and multi.class_names(ml) == list(CLASSES)
    assert multi.metrics(Y_MULTI, P_MULTI, CLASSES)["micro_f1"] == ml["micro_f1"]  # 0.5 by default


def test_flat_metrics_are_each_tasks_scalars():
    single, multi = get_task(SINGLELABEL), get_task(MULTILABEL)
    flat = single.flat_metrics(single.metrics(Y_SINGLE, P_SINGLE, CLASSES, top_k=2))
    assert flat["accuracy"] == pytest.approx(4 / 6) and flat["recall_dog"] == pytest.approx(1.0)
    assert "top2_accuracy" in flat and "mAP" not in flat
    ml = multi.metrics(Y_MULTI, P_MULTI, CLASSES, thresholds=[0.5, 0.5, 0.55])
    flat_ml = multi.flat_metrics(ml)
    assert flat_ml["mAP"] == pytest.approx(ml["mAP"]) and flat_ml["threshold_fox"] == 0.55
    assert "accuracy" not in flat_ml and all(isinstance(v, float) for v in flat_ml.values())


def test_headline_of_raw_scores_needs_no_temperature_or_threshold():
    from sklearn.metrics import average_precision_score

    logits = np.log(P_SINGLE)  # any monotone transform keeps the order
    assert get_task(SINGLELABEL).headline_of_scores(logits, Y_SINGLE) == pytest.approx(4 / 6)
    assert get_task(MULTILABEL).headline_of_scores(P_MULTI * 10 - 3, Y_MULTI) == pytest.approx(
        average_precision_score(Y_MULTI, P_MULTI, average="macro")
    )


def test_fit_decision_tunes_thresholds_only_for_multilabel():
    single, multi = get_task(SINGLELABEL), get_task(MULTILABEL)
    assert single.fit_decision(Y_SINGLE, P_SINGLE, CLASSES) == Decision() and not single.fits_decision
    assert Decision().annotate({"accuracy": 1.0}) == {"accuracy": 1.0}
    fitted = multi.fit_decision(Y_MULTI, P_MULTI, CLASSES, rule="f1")
    assert multi.fits_decision and fitted.thresholds is not None and len(fitted.thresholds) == 3
    # cat: positives 0.9, 0.8, 0.6 all above every negative (<= 0.3): F1 = 1 at the lowest positive
    assert fitted.thresholds[0] == pytest.approx(0.6)
    tuned = multi.metrics(Y_MULTI, P_MULTI, CLASSES, thresholds=fitted.thresholds)["per_label"]
    assert tuned[0]["f1"] == 1.0
    assert fitted.tuning is not None and fitted.tuning["fitted_on"] == "val" and fitted.tuning["n_fit"] == 6
    assert fitted.annotate({})["threshold_tuning"]["per_label"][0]["val_support"] == 3
    untuned = multi.fit_decision(None, None, CLASSES)
    assert untuned.thresholds == (0.5, 0.5, 0.5) and untuned.tuning is not None
    assert untuned.tuning["fitted_on"] == "none"


def test_champion_comparison_statistic_per_task():
    gates = GatesConfig(max_accuracy_drop=0.02, max_class_recall_drop=0.1, max_map_drop=0.03,
                        max_label_ap_drop=0.2)  # fmt: skip
    single, multi = get_task(SINGLELABEL), get_task(MULTILABEL)
    same = single.compare(Y_SINGLE, P_SINGLE, P_SINGLE, CLASSES, gates=gates, n_boot=200)
    assert same["accuracy"]["difference"] == 0.0 and same["accuracy"]["margin"] == 0.02
    assert [r["class"] for r in same[single.rows_key]] == list(CLASSES)
    perfect = np.eye(3)[Y_SINGLE]
    better = single.compare(Y_SINGLE, perfect, P_SINGLE, CLASSES, gates=gates, n_boot=200)
    assert better["accuracy"]["difference"] == pytest.approx(2 / 6) and better["accuracy"]["passed"]
    comp = multi.compare(Y_MULTI, P_MULTI, P_MULTI, CLASSES, gates=gates, n_boot=200)
    assert comp["mAP"]["difference"] == pytest.approx(0.0) and comp["mAP"]["margin"] == 0.03
    assert [r["label"] for r in comp[multi.rows_key]] == list(CLASSES)
    assert comp[multi.headline]["challenger"] == pytest.approx(multi.headline_of_scores(P_MULTI, Y_MULTI))


def test_log_loss_is_what_a_temperature_is_fitted_by():
    from sklearn.metrics import log_loss

    single, multi = get_task(SINGLELABEL), get_task(MULTILABEL)
    z = np.log(P_SINGLE) * 3
    assert single.log_loss(z, Y_SINGLE, temperature=3.0) == pytest.approx(log_loss(Y_SINGLE, P_SINGLE))
    zl = np.log(P_MULTI / (1 - P_MULTI))
    bce = log_loss(Y_MULTI.ravel(), P_MULTI.ravel())  # each (image, label) a binary prediction
    assert multi.log_loss(zl * 2, Y_MULTI, temperature=2.0) == pytest.approx(bce)


def test_calibration_groups_top_label_or_per_label():
    single, multi = get_task(SINGLELABEL), get_task(MULTILABEL)
    names, conf, outcome = single.calibration_groups(P_SINGLE, Y_SINGLE, CLASSES)
    assert names is None and conf.shape == (6, 1) and conf[:, 0].tolist() == P_SINGLE.max(axis=1).tolist()
    assert outcome[:, 0].tolist() == [True, False, True, True, True, False]
    stats = single.calibration_stats(P_SINGLE, Y_SINGLE)
    assert stats["mean_confidence"] == pytest.approx(P_SINGLE.max(axis=1).mean())
    names, conf, outcome = multi.calibration_groups(P_MULTI, Y_MULTI, CLASSES)
    assert names == list(CLASSES) and conf.shape == outcome.shape == (6, 3)
    stats = multi.calibration_stats(P_MULTI, Y_MULTI)
    assert stats["positive_rate"] == pytest.approx(Y_MULTI.mean())
    assert set(stats) == {"nll", "mean_probability", "positive_rate"}
    with pytest.raises(ValueError, match="targets"):
        single.calibration_groups(P_SINGLE, Y_MULTI, CLASSES)


def test_strata_splits_and_what_a_dataset_of_each_task_accepts():
    single, multi = get_task(SINGLELABEL), get_task(MULTILABEL)
    assert single.strata(Y_SINGLE).tolist() == Y_SINGLE.tolist()
    assert multi.strata(np.array([[0, 1, 1], [0, 0, 0]])).tolist() == [1, -1]
    assert single.accepts(["cat"]) and not single.accepts(["cat", "dog"]) and multi.accepts(["cat", "dog"])
    assert detect_task([["cat"], ["dog"]]) is single and detect_task([["cat"], ["cat", "dog"]]) is multi
    ids = [f"img{i}" for i in range(40)]
    sets = [[CLASSES[i % 3]] for i in range(40)]
    splits = single.assign_splits(ids, sets, val_fraction=0.25, test_fraction=0.25, seed=1)
    for k, name in enumerate(CLASSES):  # exact per-class quotas
        mine = [s for s, labels in zip(splits, sets, strict=True) if labels == [name]]
        _, n_val, n_test = split_quotas(len(mine), val_fraction=0.25, test_fraction=0.25)
        assert (mine.count("val"), mine.count("test")) == (n_val, n_test), k
    multi_splits = multi.assign_splits(ids, sets, val_fraction=0.25, test_fraction=0.25, seed=1)
    assert sorted(set(multi_splits)) == ["test", "train", "val"]
    assert multi_splits == multi.assign_splits(ids[::-1], sets[::-1], val_fraction=0.25, test_fraction=0.25,
                                               seed=1)[::-1]  # fmt: skip


def test_stored_records_gates_and_confusions():
    single, multi = get_task(SINGLELABEL), get_task(MULTILABEL)
    assert task_of({"task": "multilabel"}) is multi and task_of({"accuracy": 0.9}) is single
    assert single.tagged({"a": 1}) == {"a": 1} and multi.tagged({"a": 1}) == {"a": 1, "task": "multilabel"}
    assert set(single.gates) <= set(GATE_NAMES) and set(multi.gates) <= set(GATE_NAMES)
    shared = set(single.gates) & set(multi.gates)
    assert {"min_class_recall", "max_ece", "min_slice_accuracy"} <= shared
    assert "min_accuracy" not in multi.gates and "min_map" not in single.gates
    m = single.metrics(Y_SINGLE, P_SINGLE, CLASSES)
    # predictions cat, dog, dog, dog, fox, cat: one cat taken for a dog, one fox for a cat
    assert single.most_confused(m) == [
        {"true": "cat", "predicted": "dog", "count": 1, "share": 0.5},
        {"true": "fox", "predicted": "cat", "count": 1, "share": 0.5},
    ]
    # multi-label: a missed label (row) while another was predicted without being there (column)
    # (at cat's threshold 0.25 image 3 gets cat instead of its fox; fox is on 3 images)
    ml = multi.metrics(Y_MULTI, P_MULTI, CLASSES, thresholds=[0.25, 0.5, 0.5])
    assert multi.most_confused(ml) == [
        {"true": "fox", "predicted": "cat", "count": 1, "share": pytest.approx(1 / 3)}
    ]
