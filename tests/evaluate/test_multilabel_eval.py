"""The evaluate stage for multi-label models: calibration, gates and report on hand-computed
fixtures, then one real run (Fashion-MNIST composites -> ingest -> a few seconds of BCE training ->
``run_evaluate``) whose gates.json carries the per-label thresholds register needs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components.core.config import GatesConfig, load_params
from components.evaluate.calibration import calibrate, calibration_summary, fit_temperature
from components.evaluate.gate_report import Evidence, build_gates, write_report
from components.evaluate.gates import GateReport
from components.task import get_task
from components.task.comparison import compare_average_precision
from components.task.multilabel import bce_of_logits, label_confusion, multilabel_metrics
from tests.conftest import FMNIST_DIR, write_small_params

LABELS = ["cat", "dog", "car"]
MULTI = get_task("multilabel")
# 6 images; cat and dog are ranked perfectly, car is not (AP hand-computed below).
Y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]])
PROBS = np.array(
    [
        [0.9, 0.1, 0.3],  # car positive scored 0.3
        [0.2, 0.8, 0.7],  # car negative scored 0.7 (the top car score)
        [0.8, 0.6, 0.2],
        [0.1, 0.3, 0.6],  # car positive scored 0.6
        [0.7, 0.2, 0.1],
        [0.3, 0.9, 0.4],  # car positive scored 0.4
    ]
)
# car by score: 0.7 (neg), 0.6 (pos), 0.4 (pos), 0.3 (pos), 0.2, 0.1 -> precision at each positive
# 1/2, 2/3, 3/4 -> AP = (1/2 + 2/3 + 3/4) / 3 = 23/36.
CAR_AP = 23 / 36


def _metrics(thresholds: tuple[float, ...] = (0.5, 0.5, 0.5)) -> dict:
    return multilabel_metrics(Y, PROBS, list(thresholds), LABELS)


def test_per_label_ap_recall_bounds_and_label_confusion_by_hand() -> None:
    m = _metrics()
    ap = {r["label"]: r["ap"] for r in m["per_label"]}
    assert ap["cat"] == ap["dog"] == 1.0 and ap["car"] == pytest.approx(CAR_AP)
    assert m["mAP"] == pytest.approx((2 + CAR_AP) / 3)
    car = m["per_label"][2]
    # at 0.5 car is predicted on images 1 (wrong) and 3 (right): recall 1/3, precision 1/2
    assert (car["recall"], car["precision"], car["support"]) == (pytest.approx(1 / 3), 0.5, 3)
    assert 0 < car["recall_lower"] < 1 / 3 < car["recall_upper"] < 1
    # label confusion: image 0 misses car (0.3) and predicts nothing extra; image 1 predicts car
    # without it and misses nothing; image 5 misses car (0.4) -> no (missed, extra) pair at all.
    # Lower dog's threshold to 0.05: dog is then predicted on image 0, which misses car.
    cm = np.asarray(_metrics((0.5, 0.05, 0.5))["confusion_matrix"])
    assert cm[2, 1] == 1 and cm[2, 2] == 1 and cm.sum() - np.trace(cm) == 1
    assert label_confusion(Y, Y).tolist() == np.diag(Y.sum(axis=0)).tolist()
    assert MULTI.most_confused(_metrics((0.5, 0.05, 0.5))) == [
        {"true": "car", "predicted": "dog", "count": 1, "share": pytest.approx(1 / 3)}
    ]


def test_sigmoid_temperature_fixes_an_overconfident_model_and_ece_is_per_label() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((4000, 3)) < 0.3).astype(np.int8)
    calibrated = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1.5, y.shape)  # a well-spread score
    logits = calibrated * 4.0  # the same ranking, four times over-confident
    t = fit_temperature(MULTI, logits[:2000], y[:2000])
    assert t > 2.0  # scaling the logits down is what lowers the BCE
    assert bce_of_logits(logits[2000:], y[2000:], t) < bce_of_logits(logits[2000:], y[2000:])
    cal = calibrate(MULTI, logits[:2000], y[:2000], logits[2000:], y[2000:], ["a", "b", "c"])
    assert cal.task == "multilabel" and cal.temperature == pytest.approx(t)
    assert cal.after["ece"] < cal.before["ece"] and len(cal.per_label or []) == 3
    assert cal.after["ece"] == pytest.approx(np.mean([r["ece"] for r in cal.per_label or []]))
    # hand-computed per-label ECE: label probabilities 0.8, 0.8 (one positive) and 0.1, 0.1 (none)
    # -> bins (0.7, 0.8]: gap |0.5 - 0.8| = 0.3 and (0.0, 0.1]: gap 0.1, each half the weight.
    summary, rows = calibration_summary(
        MULTI, np.array([[1], [0], [0], [0]]), np.array([[0.8], [0.8], [0.1], [0.1]]), ["x"], n_bins=10
    )
    assert rows is not None and rows[0]["ece"] == pytest.approx(0.5 * 0.3 + 0.5 * 0.1) == summary["ece"]
    assert MULTI.probabilities(np.array([[0.0]]))[0, 0] == 0.5


def test_multilabel_gates_fail_the_weak_label_and_list_single_label_gates_as_not_applicable() -> None:
    cfg = GatesConfig(min_map=0.5, min_label_ap=0.7, min_class_recall=0.0)
    report = build_gates(cfg, Evidence(metrics=_metrics()))
    names = [g.name for g in report.gates]
    assert names[:4] == ["min_map", "min_label_ap[cat]", "min_label_ap[dog]", "min_label_ap[car]"]
    assert "min_accuracy" not in names and "min_class_recall[car]" in names
    assert [g.name for g in report.failed()] == ["min_label_ap[car]"]  # AP 0.64 < 0.70
    assert "does NOT reach" in report.failed()[0].explanation
    assert {n for n, _ in report.not_applicable} == {
        "min_accuracy",
        "max_accuracy_drop",
        "max_class_recall_drop",
    }
    assert build_gates(cfg.model_copy(update={"min_label_ap": CAR_AP}), Evidence(metrics=_metrics())).passed
    # a label with no positive test image cannot pass on no evidence
    no_car = multilabel_metrics(Y * [1, 1, 0], PROBS, [0.5] * 3, LABELS)
    failed = build_gates(cfg.model_copy(update={"min_label_ap": 0.0}), Evidence(metrics=no_car)).failed()
    assert [g.name for g in failed] == ["min_label_ap[car]", "min_class_recall[car]"]
    # round trip through gates.json keeps the not-applicable list
    assert GateReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_report_files_carry_thresholds_and_per_label_rows(tmp_path: Path) -> None:
    from components.task.metrics import one_vs_rest_curves

    metrics = _metrics((0.5, 0.5, 0.35))
    ev = Evidence(metrics=metrics, curves=one_vs_rest_curves(Y, PROBS, LABELS))
    paths = write_report(
        ev, build_gates(GatesConfig(min_map=0.5, min_label_ap=0.7), ev), tmp_path, context={}
    )
    gates = json.loads(paths["gates"].read_text())
    assert (
        gates["thresholds"] == [0.5, 0.5, 0.35]
        and gates["temperature"] == 1.0
        and gates["task"] == "multilabel"
    )
    flat = json.loads(paths["metrics"].read_text())
    assert (
        flat["task"] == "multilabel"
        and flat["ap_car"] == pytest.approx(CAR_AP)
        and flat["threshold_car"] == 0.35
    )
    lines = paths["per_class"].read_text().splitlines()
    assert lines[0] == "class,ap,roc_auc,precision,recall,recall_lower,recall_upper,f1,support,threshold"
    assert lines[3].startswith("car,") and lines[3].endswith(",3,0.35")
    for key in ("roc_curves", "pr_curves", "roc_curves_csv", "pr_curves_csv", "confusion_matrix"):
        assert paths[key].stat().st_size > 0, key
    html = paths["report_html"].read_text()
    assert html.index('id="verdict"') < html.index("FAILED: 4 of") < html.index("Per label")
    assert f"{CAR_AP:.4f}" in html and "0.3500" in html and "min_accuracy (single-label only" in html
    assert (
        json.loads(paths["report_json"].read_text())["baseline"]["status"] == "not run"
    )  # no baseline stage


def test_champion_of_another_task_is_not_applicable_and_does_not_pass() -> None:
    champion = {"status": "not applicable", "version": "3", "uri": "models:/m@champion",
                "reason": "champion version 3 is a singlelabel model and this one is multilabel"}  # fmt: skip
    cfg = GatesConfig(min_map=0.0, min_label_ap=0.0, min_class_recall=0.0)
    report = build_gates(cfg, Evidence(metrics=_metrics(), champion=champion))
    (gate,) = [g for g in report.gates if g.name == "max_map_drop"]
    assert not gate.passed and gate.message.startswith("not applicable") and report.failed() == [gate]
    warned = build_gates(cfg.model_copy(update={"levels": {"max_map_drop": "warn"}}),
                         Evidence(metrics=_metrics(), champion=champion))  # fmt: skip
    assert warned.passed and [g.name for g in warned.warnings()] == ["max_map_drop"]


def test_compare_multilabel_flags_the_label_that_got_worse() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((600, 3)) < 0.3).astype(np.int8)
    champion = y * 2.0 + rng.normal(0, 1.0, y.shape)
    margins = {"margin": 0.01, "label_margin": 0.05, "n_boot": 300}
    same = compare_average_precision(y, champion, champion, LABELS, **margins)
    assert same["mAP"]["difference"] == 0.0 and same["mAP"]["passed"]
    worse = champion.copy()
    worse[:, 1] = rng.normal(0, 1.0, 600)  # dog: random scores, AP falls to the base rate
    comp = compare_average_precision(y, worse, champion, LABELS, **margins)
    assert not comp["mAP"]["passed"] and comp["mAP"]["lower"] < comp["mAP"]["difference"] < -0.1
    assert [r["label"] for r in comp["per_label"] if not r["passed"]] == ["dog"]


# --------------------------------------------------------------------------- a real run


def _train_multilabel_model(params, out: Path, *, epochs: int = 8) -> None:
    """imgflow_cnn trained for seconds with BCE-with-logits on the train split's multi-hot targets."""
    from components.data.datasets import dataset_for_split
    from components.data.manifest import DataPaths, read_manifest
    from components.model.checkpoint import ModelSpec, save_classifier
    from components.model.models import create_classifier, create_image_transform, resolve_data_config

    torch.manual_seed(0)
    classes = tuple(json.loads((params.project.data_dir / "dataset.json").read_text())["classes"])
    model = create_classifier("imgflow_cnn", len(classes), in_chans=1)
    cfg = resolve_data_config(model, input_size=40)  # the 40 px high canvases
    ds = dataset_for_split(read_manifest(DataPaths(params.project.data_dir).manifest), "train",
                           data_dir=params.project.data_dir, classes=classes, mode="L", task="multilabel",
                           transform=create_image_transform(cfg, is_training=False))  # fmt: skip
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.stack([ds[i][1] for i in range(len(ds))])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(ds)).split(32):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx]).backward()
            opt.step()
    save_classifier(
        model.eval().state_dict(), ModelSpec("imgflow_cnn", classes, 1, cfg, task="multilabel"), out
    )


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Composites (300 train / 120 test canvases) ingested, trained, and evaluated once."""
    from components.data.composites import make_composites
    from components.data.ingest import ingest
    from components.pipeline.evaluation import evaluate_trained
    from components.pipeline.stages import StagePaths, run_evaluate
    from tests.evaluate.test_gates_champion import _new_training_run

    root = tmp_path_factory.mktemp("multilabel")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        csv = make_composites(
            root / "composites", fashion_mnist_dir=FMNIST_DIR, per_split={"train": 300, "test": 120}
        )
        write_small_params(
            root, max_per_class=None,
            ingest={"source": f"csv:{csv}"},
            evaluate={"robustness": {"enabled": True, "max_images": 60, "families": ["contrast", "jpeg"]}},
            gates={"min_map": 0.0, "min_label_ap": 0.0},
        )  # fmt: skip
        params = load_params(root / "params.yaml")
        assert ingest(f"csv:{csv}", data_dir=params.project.data_dir).task == "multilabel"
        _train_multilabel_model(params, StagePaths(params).out("train") / "model")
        _new_training_run(params)
        result = run_evaluate(params).to_dict()
        # the same model under a stricter label-AP gate, reported into a folder of its own
        strict = _strict_label_ap(result)
        params_strict = load_params(root / "params.yaml", [f"gates.min_label_ap={strict}"])
        run = json.loads(StagePaths(params).run_file.read_text())
        strict_result = evaluate_trained(
            params_strict, run_id=run["run_id"], data_version=run.get("data_version"), out_dir=root / "strict"
        ).to_dict()
        classes = json.loads((params.project.data_dir / "dataset.json").read_text())["classes"]
    return {
        "root": root,
        "classes": classes,
        "result": result,
        "strict": strict,
        "strict_result": strict_result,
    }


def _strict_label_ap(result: dict) -> float:
    """A min_label_ap between the worst and the best label's AP: some labels must fail, some pass."""
    report = json.loads(Path(result["report_json"]).read_text())
    aps = sorted(r["ap"] for r in report["metrics"]["per_label"])
    return round((aps[0] + aps[-1]) / 2, 4)


@pytest.mark.slow
def test_multilabel_evaluate_writes_thresholds_and_a_per_label_report(multilabel_run: dict) -> None:
    result = multilabel_run["result"]
    out = multilabel_run["root"] / result["out_dir"]  # relative to the project folder
    classes = multilabel_run["classes"]
    assert result["task"] == "multilabel" and result["accuracy"] is None and 0.3 < result["mAP"] <= 1.0
    gates = json.loads((out / "gates.json").read_text())
    assert len(gates["thresholds"]) == len(classes) and all(0 < t < 1 for t in gates["thresholds"])
    assert (
        gates["thresholds"] == result["thresholds"] and gates["temperature"] == result["temperature"] != 1.0
    )
    assert gates["passed"] and result["gates_passed"], result["verdict"]
    assert "min_accuracy" in [n["name"] for n in gates["not_applicable"]]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["mAP"] == pytest.approx(result["mAP"])
    assert "accuracy" not in metrics and {"micro_f1", "macro_f1", "subset_accuracy", "hamming_loss"} <= set(
        metrics
    )
    report = json.loads((out / "report.json").read_text())
    rows = report["metrics"]["per_label"]
    assert [r["label"] for r in rows] == classes and [r["threshold"] for r in rows] == gates["thresholds"]
    assert report["calibration"]["task"] == "multilabel" and len(report["calibration"]["per_label"]) == len(
        classes
    )
    assert report["robustness"]["metric"] == "mAP"
    # The must-show: verdict first, then a per-label table with AP and thresholds.
    html = (out / "report.html").read_text()
    assert html.index('id="verdict"') < html.index("<h2>Gates</h2>") < html.index("Per label")
    table = html[html.index("Per label") :]
    assert "<th>AP</th>" in table and "<th>threshold</th>" in table
    for r in rows:
        assert f"{r['ap']:.4f}" in table and f"{r['threshold']:.4f}" in table
    assert "subset accuracy" in html and "Hamming loss" in html and "ROC and precision-recall curves" in html
    for name in ("roc_curves.png", "pr_curves.png", "roc_curves.csv", "pr_curves.csv", "reliability.png"):
        assert (out / name).stat().st_size > 0, name


@pytest.mark.slow
def test_label_ap_gate_fails_for_the_labels_below_a_stricter_threshold(multilabel_run: dict) -> None:
    strict, result = multilabel_run["strict"], multilabel_run["strict_result"]
    report = json.loads(Path(result["report_json"]).read_text())
    below = {r["label"] for r in report["metrics"]["per_label"] if r["ap"] < strict}
    failed = set(result["gates"]["failed"])
    assert below and failed == {f"min_label_ap[{label}]" for label in below}
    assert not result["gates_passed"] and result["verdict"].startswith("FAILED")


def test_clip_baselines_are_compared_per_label_for_multilabel_models() -> None:
    from components.evaluate.gate_report import baseline_comparison

    def metrics(ap_a: float, ap_b: float) -> dict:
        return {"task": "multilabel", "mAP": (ap_a + ap_b) / 2, "n": 40,
                "per_label": [{"label": "a", "ap": ap_a}, {"label": "b", "ap": ap_b}]}  # fmt: skip

    record = {"status": "ok", "task": "multilabel", "model": "m", "pretrained": "p",
              "zero_shot": metrics(0.5, 0.7), "linear_probe": None}  # fmt: skip
    got = baseline_comparison(metrics(0.9, 0.6), record)
    assert got["metric"] == "mAP" and got["overall"]["zero_shot"]["mAP"] == pytest.approx(0.6)
    assert got["per_class"] == [{"class": "a", "trained": 0.9, "zero_shot": 0.5},
                                {"class": "b", "trained": 0.6, "zero_shot": 0.7}]  # fmt: skip
    single = {**record, "task": None}
    assert baseline_comparison(metrics(0.9, 0.6), single)["status"] == "not applicable"
