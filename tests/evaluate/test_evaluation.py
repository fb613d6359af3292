"""Unit tests of components.task.metrics, components.evaluate.gates, .writers and .plots on hand-computed
fixtures."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.core.errors import ConfigError
from components.evaluate.gates import GateReport, GateResult, check_gates, make_gate
from components.evaluate.plots import plot_confusion_matrix, plot_training_curves
from components.evaluate.writers import write_evaluation
from components.task import get_task
from components.task.metrics import compute_metrics, slug, wilson_interval

SINGLE = get_task("singlelabel")

CLASSES = ["cat", "dog", "bird"]

# 3 classes, 6 samples, 2 per class.            argmax  top-2 (best first)  p(true)
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],  # true cat   -> cat   ok   {cat, dog}   ok          0.7
        [0.2, 0.5, 0.3],  # true cat   -> dog   X    {dog, bird}  X           0.2
        [0.1, 0.8, 0.1],  # true dog   -> dog   ok   {dog, ...}   ok          0.8
        [0.4, 0.5, 0.1],  # true dog   -> dog   ok   {dog, cat}   ok          0.5
        [0.3, 0.1, 0.6],  # true bird  -> bird  ok   {bird, cat}  ok          0.6
        [0.5, 0.1, 0.4],  # true bird  -> cat   X    {cat, bird}  ok          0.4
    ]
)
# Confusion matrix (rows true, cols predicted):
#   cat:  cat 1, dog 1, bird 0
#   dog:  cat 0, dog 2, bird 0
#   bird: cat 1, dog 0, bird 1
EXPECTED_CM = [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
# precision = diagonal / column sum: cat 1/2, dog 2/3, bird 1/1
# recall    = diagonal / row sum:    cat 1/2, dog 2/2, bird 1/2
# f1 = 2PR/(P+R): cat 0.5, dog 2*(2/3)*1/(5/3) = 4/5, bird 2*1*(1/2)/(3/2) = 2/3
EXPECTED_PER_CLASS = {
    "cat": (1 / 2, 1 / 2, 1 / 2),
    "dog": (2 / 3, 1.0, 4 / 5),
    "bird": (1.0, 1 / 2, 2 / 3),
}


@pytest.fixture(scope="module")
def metrics() -> dict:
    return compute_metrics(Y_TRUE, PROBS, CLASSES, top_k=2)


def test_accuracy_and_top_k(metrics: dict) -> None:
    assert metrics["n"] == 6
    assert metrics["accuracy"] == pytest.approx(4 / 6)  # samples 1 and 5 wrong
    assert metrics["top2_accuracy"] == pytest.approx(5 / 6)  # only sample 1 misses its top 2
    assert "top5_accuracy" not in metrics


def test_per_class_and_confusion_matrix(metrics: dict) -> None:
    assert metrics["confusion_matrix"] == EXPECTED_CM
    assert [row["class"] for row in metrics["per_class"]] == CLASSES
    assert [row["index"] for row in metrics["per_class"]] == [0, 1, 2]
    for row in metrics["per_class"]:
        precision, recall, f1 = EXPECTED_PER_CLASS[row["class"]]
        assert row["precision"] == pytest.approx(precision), row["class"]
        assert row["recall"] == pytest.approx(recall), row["class"]
        assert row["f1"] == pytest.approx(f1), row["class"]
        assert row["support"] == 2


def test_averages(metrics: dict) -> None:
    # macro precision = (1/2 + 2/3 + 1)/3 = 13/18; macro recall = (1/2 + 1 + 1/2)/3 = 2/3
    # macro f1 = (1/2 + 4/5 + 2/3)/3 = 59/90; equal supports make weighted == macro.
    assert metrics["macro_precision"] == pytest.approx(13 / 18)
    assert metrics["macro_recall"] == pytest.approx(2 / 3)
    assert metrics["macro_f1"] == pytest.approx(59 / 90)
    assert metrics["weighted_precision"] == pytest.approx(13 / 18)
    assert metrics["weighted_recall"] == pytest.approx(2 / 3)
    assert metrics["weighted_f1"] == pytest.approx(59 / 90)
    assert metrics["balanced_accuracy"] == pytest.approx(2 / 3)


def test_nll_and_brier(metrics: dict) -> None:
    # NLL = -mean(log p(true)) = -log(0.7 * 0.2 * 0.8 * 0.5 * 0.6 * 0.4) / 6 = -log(0.01344) / 6
    assert metrics["nll"] == pytest.approx(-math.log(0.01344) / 6)
    # Brier per sample, sum_k (p_k - onehot_k)^2:
    #   0.3²+0.2²+0.1² = 0.14;  0.8²+0.5²+0.3² = 0.98;  0.1²+0.2²+0.1² = 0.06
    #   0.4²+0.5²+0.1² = 0.42;  0.3²+0.1²+0.4² = 0.26;  0.5²+0.1²+0.6² = 0.62   -> 2.48 / 6
    assert metrics["brier"] == pytest.approx(2.48 / 6)


def test_metrics_are_json_serialisable(metrics: dict) -> None:
    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics


def test_weighted_differs_from_macro_with_unequal_support() -> None:
    # y = [0, 0, 0, 1], predictions [0, 0, 1, 1]: recall 2/3 and 1, precision 1 and 1/2.
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    m = compute_metrics(np.array([0, 0, 0, 1]), probs, ["a", "b"])
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["top2_accuracy"] == 1.0  # k=5 clipped to K=2
    assert m["macro_recall"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["weighted_recall"] == pytest.approx((3 * 2 / 3 + 1 * 1) / 4)
    assert m["weighted_precision"] == pytest.approx((3 * 1 + 1 * 1 / 2) / 4)
    assert m["confusion_matrix"] == [[2, 1], [0, 1]]


def test_class_absent_from_test_set_does_not_crash() -> None:
    # "c" never occurs in y_true but is predicted once: cm [[2,0,1],[0,1,0],[0,0,0]].
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.2, 0.2], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]])
    m = compute_metrics(np.array([0, 0, 0, 1]), probs, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 0, 1], [0, 1, 0], [0, 0, 0]]
    c = m["per_class"][2]
    assert (c["support"], c["recall"], c["precision"], c["f1"]) == (0, 0.0, 0.0, 0.0)
    assert m["per_class"][0]["recall"] == pytest.approx(2 / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["nll"] == pytest.approx(-math.log(0.8 * 0.6 * 0.2 * 0.8) / 4)

    # Threshold 0: every measured class passes, the unmeasured one still fails (no evidence).
    report = check_gates(m, min_accuracy=0.5, min_class_recall=0.0)
    assert not report.passed
    assert [g.name for g in report.failed()] == ["min_class_recall[c]"]
    assert "no test images" in report.failed()[0].message
    assert "'c'" in report.failed()[0].message


def test_class_never_seen_nor_predicted_keeps_its_row_and_column() -> None:
    # "d" is neither in y_true nor ever the argmax: it must still get a row, a column and a gate.
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]])
    m = compute_metrics(np.array([0, 1, 2]), probs, ["a", "b", "c", "d"])
    assert m["confusion_matrix"] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert [row["support"] for row in m["per_class"]] == [1, 1, 1, 0]
    assert m["accuracy"] == 1.0
    assert m["macro_recall"] == pytest.approx(3 / 4)  # the empty class counts as recall 0
    report = check_gates(m, min_accuracy=0.9, min_class_recall=0.0)
    assert [g.name for g in report.failed()] == ["min_class_recall[d]"]


def test_input_errors_are_explicit() -> None:
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(Y_TRUE, PROBS[:, :2], CLASSES)
    with pytest.raises(ValueError, match="sum to 1"):
        compute_metrics(Y_TRUE, PROBS * 3, CLASSES)  # logits-like input
    with pytest.raises(ValueError, match="outside"):
        compute_metrics(np.array([0, 0, 1, 1, 2, 3]), PROBS, CLASSES)


def _metrics_with_recalls(correct_per_class: list[int], *, per_class: int = 10) -> dict:
    """K classes with ``per_class`` images each; the first ``correct`` of class i are right,
    the others are predicted as the next class."""
    n_classes = len(correct_per_class)
    y, probs = [], []
    for i, correct in enumerate(correct_per_class):
        for j in range(per_class):
            row = np.full(n_classes, 0.1 / (n_classes - 1))
            row[i if j < correct else (i + 1) % n_classes] = 0.9
            y.append(i)
            probs.append(row)
    return compute_metrics(np.array(y), np.array(probs), CLASSES[:n_classes])


def test_wilson_interval_by_hand() -> None:
    # 8 of 10, z = 1.959964: centre 0.8 + z²/20 = 0.992073, half z*sqrt(0.016 + z²/400) = 0.313617,
    # denominator 1 + z²/10 = 1.384146 -> (0.490162, 0.943318).
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.490162, abs=1e-6)
    assert hi == pytest.approx(0.943318, abs=1e-6)
    # 12 of 12: the point estimate is 1.0 but the lower bound is 1 / (1 + z²/12) = 0.757506.
    assert wilson_interval(12, 12)[0] == pytest.approx(0.757506, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(500, 1000, confidence=0.99)[0] < wilson_interval(500, 1000)[0]
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_recall_bounds_are_in_per_class_rows(metrics: dict) -> None:
    cat = metrics["per_class"][0]  # 1 of 2 right
    assert (cat["recall_lower"], cat["recall_upper"]) == pytest.approx(wilson_interval(1, 2))
    assert metrics["confusion_matrix_normalized"][2] == pytest.approx([0.5, 0.0, 0.5])


def test_gates_fail_exactly_the_weak_class() -> None:
    # 40 images per class; bird only 20 right: recall 0.5, Wilson lower bound 0.352.
    m = _metrics_with_recalls([40, 40, 20], per_class=40)
    report = check_gates(m, min_accuracy=0.8, min_class_recall=0.6)
    assert report.passed is False
    assert [g.name for g in report.gates] == [
        "min_accuracy",
        "min_class_recall[cat]",
        "min_class_recall[dog]",
        "min_class_recall[bird]",
    ]
    assert [g.name for g in report.failed()] == ["min_class_recall[bird]"]
    bird = report.failed()[0]
    assert (bird.value, bird.threshold) == (0.5, 0.6)
    assert bird.bound == pytest.approx(wilson_interval(20, 40)[0])
    assert bird.message == "recall of 'bird' 0.5000, 95% lower bound 0.35 < 0.60"
    assert "20 of 40 'bird' test images" in bird.explanation and "is NOT" in bird.explanation
    assert report.gates[0].message == "accuracy 0.83 >= 0.80"
    lines = report.summary_text().splitlines()
    assert lines[0].startswith("FAILED: 1 of 4 gates failed (min_class_recall[bird])")
    assert [line.startswith("FAIL") for line in lines[1:]] == [False, False, False, True]


def test_small_class_cannot_pass_by_luck() -> None:
    # 12 of 12 right passes a 0.6 bar (bound 0.76); 9 of 12 (point 0.75 >= 0.6) does not (bound 0.47).
    lucky = check_gates(
        _metrics_with_recalls([12, 12, 9], per_class=12), min_accuracy=0.0, min_class_recall=0.6
    )
    assert [g.name for g in lucky.failed()] == ["min_class_recall[bird]"]
    assert lucky.failed()[0].value == 0.75


def test_gates_pass_for_a_good_model_and_at_the_threshold() -> None:
    m = _metrics_with_recalls([1000, 950, 900], per_class=1000)
    report = check_gates(m, min_accuracy=0.95, min_class_recall=0.8)
    assert report.passed is True
    assert report.failed() == []
    assert report.verdict().startswith("PASSED")

    strict = check_gates(m, min_accuracy=0.96, min_class_recall=0.8)
    assert [g.name for g in strict.failed()] == ["min_accuracy"]


def test_warn_level_reports_without_blocking_and_off_drops_the_gate() -> None:
    m = _metrics_with_recalls([40, 40, 20], per_class=40)
    report = check_gates(m, min_accuracy=0.8, min_class_recall=0.6, levels={"min_class_recall": "warn"})
    assert report.passed is True
    assert report.failed() == []
    assert [g.name for g in report.warnings()] == ["min_class_recall[bird]"]
    assert report.warnings()[0].status == "warn"
    assert "1 warning" in report.verdict()
    off = check_gates(m, min_accuracy=0.8, min_class_recall=0.6, levels={"min_class_recall": "off"})
    assert [g.name for g in off.gates] == ["min_accuracy"]


def test_gate_message_never_shows_a_failure_as_equal() -> None:
    gate = make_gate("g", "accuracy", 0.598, 0.6)
    assert gate.message == "accuracy 0.598 < 0.600"
    upper = make_gate("max_ece", "ECE", 0.0301, 0.03, comparison="<=")
    assert not upper.passed and upper.message == "ECE 0.0301 > 0.0300"


def test_gate_thresholds_are_validated() -> None:
    m = _metrics_with_recalls([10, 10, 10])
    with pytest.raises(ConfigError, match="min_class_recall"):
        check_gates(m, min_accuracy=0.5, min_class_recall=60)
    with pytest.raises(ConfigError, match="levels"):
        check_gates(m, min_accuracy=0.5, min_class_recall=0.5, levels={"min_accuracy": "maybe"})


def test_gate_report_round_trip() -> None:
    report = check_gates(
        _metrics_with_recalls([40, 40, 20], per_class=40), min_accuracy=0.8, min_class_recall=0.6,
        levels={"min_accuracy": "warn"},
    )  # fmt: skip
    d = json.loads(json.dumps(report.to_dict()))
    assert d["failed"] == ["min_class_recall[bird]"]
    assert d["verdict"] == report.verdict()
    assert GateReport.from_dict(d) == report


def test_gate_report_cannot_pass_without_gates_or_with_a_failed_gate() -> None:
    with pytest.raises(ValueError):
        GateReport(passed=True, gates=())
    failed = GateResult(name="min_accuracy", passed=False, value=0.1, threshold=0.9, message="m")
    with pytest.raises(ValueError):
        GateReport(passed=True, gates=(failed,))
    warned = GateResult(name="max_ece", passed=False, value=0.1, threshold=0.03, message="m", level="warn")
    assert GateReport.of([warned]).passed is True


def test_flat_metrics_are_scalars_with_class_slugs() -> None:
    m = compute_metrics(Y_TRUE, PROBS, ["T-shirt/top", "Ankle boot", "Ankle-boot"], top_k=2)
    flat = SINGLE.flat_metrics(m)
    assert all(type(v) is float for v in flat.values())
    assert flat["accuracy"] == pytest.approx(4 / 6)
    assert flat["top2_accuracy"] == pytest.approx(5 / 6)
    assert flat["recall_t_shirt_top"] == pytest.approx(1 / 2)
    assert flat["f1_ankle_boot"] == pytest.approx(4 / 5)
    assert flat["recall_ankle_boot_2"] == pytest.approx(1 / 2)  # slug collision disambiguated
    for key in ("balanced_accuracy", "macro_f1", "weighted_f1", "nll", "brier", "n"):
        assert key in flat
    assert slug("Sandal") == "sandal"


def _assert_png(path: Path, *, min_side: int = 200) -> None:
    assert path.is_file()
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert min(im.size) >= min_side
        # Not a blank canvas: a real plot has many distinct colours.
        assert len(im.convert("RGB").getcolors(maxcolors=1_000_000) or []) > 20


def test_write_evaluation_writes_all_files(tmp_path: Path, metrics: dict) -> None:
    report = check_gates(metrics, min_accuracy=0.6, min_class_recall=0.6)
    out = tmp_path / "eval" / "nested"
    paths = write_evaluation(metrics, report, out)

    assert set(paths) == {"metrics", "evaluation", "per_class", "gates", "confusion_matrix",
                          "confusion_matrix_normalized"}  # fmt: skip
    assert {p.name for p in paths.values()} == {
        "metrics.json",
        "evaluation.json",
        "per_class.csv",
        "gates.json",
        "confusion_matrix.png",
        "confusion_matrix_normalized.png",
    }
    assert all(p.parent == out for p in paths.values())

    flat = json.loads(paths["metrics"].read_text())
    assert flat == SINGLE.flat_metrics(metrics)
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat.values())

    assert json.loads(paths["evaluation"].read_text()) == metrics
    assert GateReport.from_dict(json.loads(paths["gates"].read_text())) == report

    with paths["per_class"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == CLASSES
    assert list(rows[0]) == ["class", "precision", "recall", "recall_lower", "recall_upper", "f1", "support",
                             "roc_auc", "pr_auc"]  # fmt: skip
    assert float(rows[0]["roc_auc"]) == pytest.approx(5 / 8) and float(rows[0]["pr_auc"]) == pytest.approx(
        0.7
    )
    assert float(rows[1]["precision"]) == pytest.approx(2 / 3)
    assert int(rows[2]["support"]) == 2

    _assert_png(paths["confusion_matrix"])
    _assert_png(paths["confusion_matrix_normalized"])
    assert paths["confusion_matrix"].read_bytes() != paths["confusion_matrix_normalized"].read_bytes()


def test_most_confused_pairs_from_the_hand_computed_matrix(metrics: dict) -> None:
    # off-diagonal cells of EXPECTED_CM: cat->dog 1 (of 2 cats), bird->cat 1 (of 2 birds); ties keep
    # row-major order; empty cells are never listed
    assert SINGLE.most_confused(metrics) == [
        {"true": "cat", "predicted": "dog", "count": 1, "share": 0.5},
        {"true": "bird", "predicted": "cat", "count": 1, "share": 0.5},
    ]
    top = SINGLE.most_confused(metrics, k=1)
    assert top == [{"true": "cat", "predicted": "dog", "count": 1, "share": 0.5}]
    perfect = compute_metrics(Y_TRUE, np.eye(3)[Y_TRUE], CLASSES)
    assert SINGLE.most_confused(perfect) == []


def test_plot_confusion_matrix_handles_empty_rows_and_rejects_bad_shape(tmp_path: Path) -> None:
    cm = np.array([[2, 0, 1], [0, 1, 0], [0, 0, 0]])  # last class absent: row of zeros
    path = plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm.png")
    _assert_png(path)
    raw = plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "raw.png", normalize=False)
    _assert_png(raw)
    with pytest.raises(ValueError, match="shape"):
        plot_confusion_matrix(cm, ["a", "b"], tmp_path / "bad.png")


def test_plot_training_curves_writes_png(tmp_path: Path) -> None:
    history = [
        {"epoch": 1, "train_loss": 1.2, "val_loss": 1.0, "val_accuracy": 0.6, "lr": 0.1},
        {"epoch": 2, "train_loss": 0.8, "val_loss": 0.7, "val_accuracy": 0.75},
        {"epoch": 3, "train_loss": 0.5, "val_loss": None, "val_accuracy": 0.8},
    ]
    path = plot_training_curves(history, tmp_path / "plots" / "curves.png")
    assert path == tmp_path / "plots" / "curves.png"
    _assert_png(path)
    with Image.open(path) as im:
        width, height = im.size
    assert width > height  # two panels side by side
    with pytest.raises(ValueError, match="empty"):
        plot_training_curves([], tmp_path / "none.png")


def test_one_vs_rest_auc_by_hand_and_against_sklearn(metrics: dict) -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    # cat vs rest: positives score 0.7, 0.2; negatives 0.1, 0.4, 0.3, 0.5. ROC-AUC: 0.7 beats all
    # four, 0.2 beats one -> 5/8. AP: ranked 0.7 (pos), 0.5, 0.4, 0.3, 0.2 (pos) -> (1 + 2/5) / 2.
    cat = metrics["per_class"][0]
    assert cat["roc_auc"] == pytest.approx(5 / 8) and cat["pr_auc"] == pytest.approx(0.7)
    onehot = np.eye(3)[Y_TRUE]
    for i, row in enumerate(metrics["per_class"]):
        assert row["roc_auc"] == pytest.approx(roc_auc_score(onehot[:, i], PROBS[:, i]))
        assert row["pr_auc"] == pytest.approx(average_precision_score(onehot[:, i], PROBS[:, i]))
    assert metrics["macro_roc_auc"] == pytest.approx(np.mean([r["roc_auc"] for r in metrics["per_class"]]))
    flat = SINGLE.flat_metrics(metrics)
    assert flat["roc_auc_cat"] == pytest.approx(5 / 8) and "macro_pr_auc" in flat
    # a class absent from the test set has no AUC (not a made-up 0 or 0.5)
    absent = compute_metrics(np.array([0, 1, 0, 1]), np.full((4, 3), 1 / 3), CLASSES)
    assert absent["per_class"][2]["roc_auc"] is None and absent["per_class"][2]["pr_auc"] is None
    assert "roc_auc_bird" not in SINGLE.flat_metrics(absent)


def test_roc_and_pr_curves_files_agree_with_the_areas(tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    from components.evaluate.writers import write_curves
    from components.task.metrics import one_vs_rest_curves

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 3000)
    logits = np.eye(3)[y] * 1.5 + rng.normal(0, 1, (3000, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    curves = one_vs_rest_curves(np.eye(3)[y], probs, CLASSES)
    for c in curves["roc"]:
        i = CLASSES.index(c["class"])
        assert c["auc"] == pytest.approx(roc_auc_score(y == i, probs[:, i]))
        assert len(c["fpr"]) <= 200 and (c["fpr"][0], c["tpr"][-1]) == (0.0, 1.0)  # thinned, ends kept
        assert np.trapezoid(c["tpr"], c["fpr"]) == pytest.approx(c["auc"], abs=0.01)
    paths = write_curves(curves, tmp_path)
    for kind, header in (("roc", "class,fpr,tpr"), ("pr", "class,recall,precision")):
        lines = paths[f"{kind}_curves_csv"].read_text().splitlines()
        assert lines[0] == header and {line.split(",")[0] for line in lines[1:]} == set(CLASSES)
        assert len(lines) - 1 <= 3 * 200
        _assert_png(paths[f"{kind}_curves"])
    assert {p.name for p in paths.values()} == {
        "roc_curves.csv",
        "roc_curves.png",
        "pr_curves.csv",
        "pr_curves.png",
    }
