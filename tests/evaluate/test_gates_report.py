"""Gates from all the evidence (calibration, robustness, slices, champion) and the gate report files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.core.config import GatesConfig, SliceSpec
from components.core.errors import ConfigError
from components.evaluate.calibration import calibrate
from components.evaluate.gate_report import Evidence, build_gates, write_report
from components.evaluate.robustness import summarise
from components.evaluate.slices import slice_table
from components.task import get_task
from components.task.comparison import compare_predictions, paired_bootstrap
from components.task.metrics import compute_metrics

CLASSES = ["a", "b", "c"]


def test_paired_bootstrap_non_inferiority() -> None:
    same = np.array([True] * 90 + [False] * 10)
    tie = paired_bootstrap(same, same, margin=0.01)
    assert (tie.difference, tie.lower, tie.passed) == (0.0, 0.0, True)
    # Challenger loses 20 images the champion got right: difference -0.2, far beyond a 0.05 margin.
    worse = same.copy()
    worse[:20] = False
    r = paired_bootstrap(worse, same, margin=0.05, seed=1)
    assert r.difference == pytest.approx(-0.2) and r.lower < -0.2 and not r.passed
    # 1 image worse out of 1000 with a 1 % margin: non-inferior.
    big = np.ones(1000, dtype=bool)
    slightly = big.copy()
    slightly[0] = False
    assert paired_bootstrap(slightly, big, margin=0.01).passed


def test_compare_flags_the_class_that_got_worse() -> None:
    y = np.repeat([0, 1, 2], 100)
    champ = y.copy()
    chal = y.copy()
    chal[100:160] = 2  # class b: 40 of 100 right instead of 100
    comp = compare_predictions(y, chal, champ, CLASSES, margin=0.01, class_margin=0.05)
    assert not comp["accuracy"]["passed"]
    assert [r["class"] for r in comp["per_class"] if not r["passed"]] == ["b"]


def test_slice_table_by_value_and_bins() -> None:
    rows = pd.DataFrame({"source": ["x", "x", "y", "y"], "brightness": [0.1, 0.2, 0.5, 0.9]})
    correct = np.array([True, False, True, True])
    table = slice_table(rows, correct, [SliceSpec(by="source"), SliceSpec(by="brightness", bins=(0, 0.3, 1))])
    assert [(t["slice"], t["n"], t["accuracy"]) for t in table] == [
        ("source = x", 2, 0.5), ("source = y", 2, 1.0),
        ("brightness in [0, 0.3)", 2, 0.5), ("brightness in [0.3, 1]", 2, 1.0),
    ]  # fmt: skip
    assert all(t["accuracy_lower"] < t["accuracy"] for t in table)
    with pytest.raises(ConfigError, match="unknown column"):
        slice_table(rows, correct, [SliceSpec(by="nope")])


@pytest.fixture()
def evidence() -> Evidence:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 200)
    logits = np.eye(3)[y] * 4 + rng.normal(0, 1.5, size=(600, 3))
    cal = calibrate(get_task("singlelabel"), logits[::2], y[::2], logits[1::2], y[1::2], CLASSES)
    probs = np.exp(logits[1::2] / cal.temperature)
    probs /= probs.sum(1, keepdims=True)
    metrics = compute_metrics(y[1::2], probs, CLASSES, top_k=2)
    rob = summarise({"noise": [0.9, 0.8, 0.7, 0.6, 0.5], "blur": [0.9] * 5}, clean_accuracy=0.9, n=300)
    comp = compare_predictions(y, y, y, CLASSES, margin=0.01, class_margin=0.05)
    slices = [
        {
            "slice": "source = x",
            "by": "source",
            "n": 300,
            "correct": 270,
            "accuracy": 0.9,
            "accuracy_lower": 0.86,
        }
    ]
    return Evidence(metrics=metrics, calibration=cal, robustness=rob, slices=slices,
                    champion={"status": "compared", "version": "1", "uri": "models:/m@champion", "comparison": comp})  # fmt: skip


def test_build_gates_covers_every_kind(evidence: Evidence) -> None:
    cfg = GatesConfig(
        min_accuracy=0.5, min_class_recall=0.5, min_relative_robustness=0.8, min_family_robustness=0.5
    )
    report = build_gates(cfg, evidence)
    names = [g.name for g in report.gates]
    for expected in ("min_accuracy", "min_class_recall[a]", "max_ece", "min_relative_robustness",
                     "min_family_robustness", "min_slice_accuracy[source = x]", "max_accuracy_drop",
                     "max_class_recall_drop[c]"):  # fmt: skip
        assert expected in names
    # noise averages 0.7 -> 0.7/0.9 = 0.78 of clean; mean corruption 0.8 -> 0.89 relative.
    assert report.passed and all(g.explanation for g in report.gates)
    strict = build_gates(cfg.model_copy(update={"min_family_robustness": 0.8}), evidence)
    assert [g.name for g in strict.failed()] == ["min_family_robustness"]
    assert "noise" in strict.failed()[0].explanation
    warned = build_gates(
        cfg.model_copy(update={"min_family_robustness": 0.8, "levels": {"min_family_robustness": "warn"}}),
        evidence,
    )
    assert warned.passed and [g.name for g in warned.warnings()] == ["min_family_robustness"]


def test_levels_reject_unknown_gate_names() -> None:
    with pytest.raises(ValueError, match="unknown gate"):
        GatesConfig(levels={"max_eec": "warn"})


def test_write_report_files_and_html(tmp_path: Path, evidence: Evidence) -> None:
    cfg = GatesConfig(min_accuracy=0.99)
    gates = build_gates(cfg, evidence)
    paths = write_report(evidence, gates, tmp_path, context={"model": "m"})
    for key in ("metrics", "gates", "report_json", "report_html", "reliability", "reliability_csv",
                "robustness", "robustness_csv", "slices", "per_class", "confusion_matrix"):  # fmt: skip
        assert paths[key].is_file(), key
    data = json.loads(paths["report_json"].read_text())
    assert list(data)[:2] == ["verdict", "passed"] and data["verdict"].startswith("FAILED")
    gates_json = json.loads(paths["gates"].read_text())
    assert gates_json["temperature"] == pytest.approx(evidence.calibration.temperature)
    flat = json.loads(paths["metrics"].read_text())
    for key in (
        "accuracy",
        "temperature",
        "ece_after_scaling",
        "relative_robustness",
        "accuracy_vs_champion",
    ):
        assert key in flat
    html = paths["report_html"].read_text()
    assert html.index('id="verdict"') < html.index("<h2>Gates</h2>") < html.index("Per class")
    # confusion matrix (counts, shares), reliability diagram, robustness heat map
    assert "min_accuracy" in html and html.count("data:image/png;base64,") == 4
    assert paths["confusion_matrix_normalized"].is_file()
    pairs = data["confused_pairs"]
    assert pairs and pairs == sorted(pairs, key=lambda p: -p["count"]) and "Most confused pairs" in html
    top = pairs[0]
    cm = np.asarray(evidence.metrics["confusion_matrix"])
    off = cm - np.diag(np.diag(cm))
    assert top["count"] == off.max() == cm[CLASSES.index(top["true"]), CLASSES.index(top["predicted"])]
    assert data["baseline"]["status"] == "not run" and "baseline stage has not run" in html
    assert "<script" not in html and "http" not in html.replace("http-equiv", "")  # self-contained


@pytest.mark.slow
def test_report_verdict_is_visible_in_headless_chromium(tmp_path: Path, evidence: Evidence) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "check_report", Path(__file__).parents[2] / "scripts/check_report.py"
    )
    assert spec is not None and spec.loader is not None
    check_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_report)
    chromium = check_report.find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    paths = write_report(
        evidence, build_gates(GatesConfig(min_accuracy=0.99), evidence), tmp_path, context={}
    )
    info = check_report.probe(paths["report_html"], chromium=chromium)
    assert check_report.check(info) == []
    assert info["verdict"]["text"].startswith("FAILED")
    # The checker can fail: a page whose verdict is hidden is caught.
    hidden = tmp_path / "hidden.html"
    hidden.write_text(paths["report_html"].read_text().replace("<style>", "<style>#verdict{display:none}"))
    assert any("not visible" in p for p in check_report.check(check_report.probe(hidden, chromium=chromium)))


def _zero_shot_record(metrics: dict, *, recall_drop: dict[str, float]) -> dict:
    """A baseline.json record whose zero-shot result is ``metrics`` with some classes' recall lowered."""
    per_class = [
        {**r, "recall": r["recall"] - recall_drop.get(r["class"], 0.0)} for r in metrics["per_class"]
    ]
    zero_shot = {**metrics, "accuracy": metrics["accuracy"] - 0.1, "per_class": per_class}
    probe = {**metrics, "accuracy": metrics["accuracy"] - 0.05, "n": 90}
    return {"status": "ok", "reason": "", "model": "tiny", "pretrained": "/ckpt.pt",
            "zero_shot": zero_shot, "linear_probe": probe}  # fmt: skip


def test_baseline_table_and_optional_zero_shot_gate(tmp_path: Path, evidence: Evidence) -> None:
    from dataclasses import replace

    from components.core.config import BaselineConfig

    cfg = GatesConfig(min_accuracy=0.5, min_class_recall=0.5)
    on = BaselineConfig(gate=True, gate_margin=0.05)
    record = _zero_shot_record(evidence.metrics, recall_drop={"a": 0.2, "b": 0.2})  # c ties zero-shot
    ev = replace(evidence, baseline=record)
    assert "beats_zero_shot[accuracy]" not in [g.name for g in build_gates(cfg, ev).gates]  # gate off
    gates = build_gates(cfg, ev, baseline=on)
    zs = {g.name: g for g in gates.gates if g.name.startswith("beats_zero_shot")}
    assert [n for n, g in zs.items() if not g.passed] == ["beats_zero_shot[c]"]  # c: not by the margin
    assert not gates.passed and "does NOT beat" in zs["beats_zero_shot[c]"].explanation

    paths = write_report(ev, gates, tmp_path / "ok", context={})
    data = json.loads(paths["report_json"].read_text())
    overall = data["baseline"]["overall"]
    assert overall["trained"]["accuracy"] == evidence.metrics["accuracy"]
    assert overall["zero_shot"]["accuracy"] == pytest.approx(evidence.metrics["accuracy"] - 0.1)
    assert overall["linear_probe"]["n"] == 90
    a = next(r for r in data["baseline"]["per_class"] if r["class"] == "a")
    trained_a = next(r["recall"] for r in evidence.metrics["per_class"] if r["class"] == "a")
    assert a == {"class": "a", "trained": trained_a, "zero_shot": pytest.approx(trained_a - 0.2),
                 "linear_probe": trained_a}  # fmt: skip
    html = paths["report_html"].read_text()
    assert "CLIP baselines" in html and "CLIP zero-shot" in html and "CLIP linear probe" in html
    assert f"{trained_a - 0.2:.4f}" in html

    # skipped (no weights): the gate is not applicable, blocks at level error, warns when told to
    skipped = {"status": "skipped", "reason": "skipped: weights unavailable: offline", "zero_shot": None,
               "linear_probe": None, "model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}  # fmt: skip
    ev = replace(evidence, baseline=skipped)
    gates = build_gates(cfg, ev, baseline=on)
    (na,) = [g for g in gates.gates if g.name.startswith("beats_zero_shot")]
    assert na.message.startswith("not applicable: baseline skipped: weights unavailable") and not na.passed
    assert (
        gates.failed() == [na] and "was not checked" in na.explanation and "does not pass" in na.explanation
    )
    html = write_report(ev, gates, tmp_path / "skipped", context={})["report_html"].read_text()
    assert (
        "not applicable: baseline skipped" in html
        and "Baseline skipped" in html
        and "FAIL (not applicable)" in html
    )
    warn = build_gates(cfg.model_copy(update={"levels": {"beats_zero_shot": "warn"}}), ev, baseline=on)
    assert warn.passed and [g.name for g in warn.warnings()] == ["beats_zero_shot"]
    # the baseline stage never ran: not applicable too, never passed
    (none,) = [g for g in build_gates(cfg, evidence, baseline=on).gates if g.name == "beats_zero_shot"]
    assert not none.passed and "not run" in none.message


def test_registered_model_reports_get_their_own_folder_and_the_sweep_sample_is_stratified() -> None:
    from components.evaluate.stage import model_slug, sweep_sample

    assert model_slug("models:/imgflow-fashion-mnist@champion") == "imgflow-fashion-mnist@champion"
    assert model_slug("models:/imgflow/3") == "imgflow_3"
    assert model_slug("runs:/0a1b/model") == "0a1b_model"
    targets = np.repeat([0, 1, 2], [100, 50, 10])
    assert np.array_equal(sweep_sample(targets, None, 0), np.arange(160))
    picked = sweep_sample(targets, 32, 0)
    assert np.bincount(targets[picked]).tolist() == [20, 10, 2] and np.all(np.diff(picked) > 0)
    assert np.array_equal(picked, sweep_sample(targets, 32, 0))  # fixed seed


def test_single_label_report_has_curves_no_thresholds_and_lists_multilabel_gates(
    tmp_path: Path, evidence: Evidence
) -> None:
    from dataclasses import replace

    from components.task.metrics import one_vs_rest_curves

    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 50)
    probs = rng.dirichlet(np.ones(3), 150) * 0.5 + np.eye(3)[y] * 0.5
    ev = replace(evidence, curves=one_vs_rest_curves(np.eye(3)[y], probs, CLASSES))
    gates = build_gates(GatesConfig(min_accuracy=0.5, min_class_recall=0.5), ev)
    assert {n for n, _ in gates.not_applicable} == {
        "min_map",
        "min_label_ap",
        "max_map_drop",
        "max_label_ap_drop",
    }
    assert not any(g.name.startswith(("min_map", "min_label_ap")) for g in gates.gates)
    paths = write_report(ev, gates, tmp_path, context={})
    gates_json = json.loads(paths["gates"].read_text())
    assert gates_json["thresholds"] is None and "task" not in json.loads(paths["metrics"].read_text())
    html = paths["report_html"].read_text()
    assert html.count("data:image/png;base64,") == 6  # + ROC and PR curves
    assert (
        html.index("Per class")
        < html.index("ROC and precision-recall curves")
        < html.index("Confusion matrix")
    )
    assert "PR-AUC (AP)" in html and "min_map (multi-label only" in html
    assert paths["roc_curves_csv"].read_text().startswith("class,fpr,tpr\n")
