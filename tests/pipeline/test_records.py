"""The stage records: frozen, typed, and ``to_dict()`` keeps the keys ``imgflow <stage> --json`` printed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from components.core.jsonio import dumps
from components.evaluate.gates import GateReport, GateResult
from components.pipeline.freshness import decide
from components.pipeline.records import (
    UP_TO_DATE,
    AliasMove,
    Evaluation,
    PipelineResult,
    ValidationResult,
)
from components.registry.registry import Registration


def _evaluate_result(**extra: object) -> dict:
    gates = GateReport.of(
        [GateResult(name="min_accuracy", passed=True, value=0.93, threshold=0.9, message="acc")]
    )
    return {
        "task": "singlelabel", "accuracy": 0.93, "gates_passed": True, "verdict": gates.verdict(),
        "gates": gates.to_dict(), "temperature": 1.3, "thresholds": None, "report_html": "o/e/report.html",
        "report_json": "o/e/report.json", "out_dir": "o/e", "run_id": "r1", "seconds": 2.5,
        "timings": {"predict": 1.2, "robustness": 0.8}, **extra,
    }  # fmt: skip


def test_evaluation_round_trips_what_evaluate_returns() -> None:
    raw = _evaluate_result()
    ev = Evaluation.from_dict(raw)
    assert (ev.headline, ev.value, ev.gates_passed, ev.report_html) == (
        "accuracy",
        0.93,
        True,
        Path("o/e/report.html"),
    )
    assert ev.to_dict() == raw
    multi = _evaluate_result(task="multilabel", accuracy=None, mAP=0.81, thresholds=[0.3, 0.6])
    ml = Evaluation.from_dict(multi)
    assert (ml.headline, ml.value, ml.thresholds) == ("mAP", 0.81, (0.3, 0.6))
    assert ml.to_dict() == multi
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.temperature = 2.0  # type: ignore[misc]


def test_validation_result_names_its_warnings_and_adds_cardinality_only_for_multilabel() -> None:
    single = ValidationResult(
        success=True, report_json=Path("r.json"), report_html=Path("r.html"), warnings=("w",)
    )
    assert single.to_dict() == {
        "success": True,
        "report_json": "r.json",
        "report_html": "r.html",
        "warnings": ["w"],
    }
    multi = dataclasses.replace(single, label_cardinality={"train": 1.7})
    assert multi.to_dict()["label_cardinality"] == {"train": 1.7}


def test_promotion_keys_say_what_happened() -> None:
    def promotion(**kw: object) -> dict[str, object]:
        reg = Registration(name="m", version="2", model_uri="runs:/r/model", run_id="r", aliases=("candidate",),
                           gates_passed=True, **kw)  # fmt: skip
        return reg.to_dict()["promotion"]

    assert promotion() == {"promoted": False}  # gates failed or auto_promote off
    assert promotion(promoted=True, promotion_tried=True, previous=None) == {
        "promoted": True,
        "from": None,
    }
    lost = promotion(promotion_tried=True, conflict="champion moved")
    assert lost == {"promoted": False, "conflict": "champion moved"}


def test_alias_move_keeps_the_log_entry() -> None:
    entry = {"seq": 3, "alias": "champion", "from": "1", "to": "2", "who": "ci", "changed": True}
    move = AliasMove.from_entry(entry)
    assert (move.alias, move.from_version, move.to_version, move.changed) == ("champion", "1", "2", True)
    assert move.to_dict() == entry


def test_an_up_to_date_run_has_only_ingest_and_the_check() -> None:
    from components.data.ingest import IngestSummary

    ingest = IngestSummary(source="s", seen=2, ingested=2, quarantined=0, reasons={}, classes=("a", "b"),
                           counts={}, data_version="d1", manifest="m", quarantine="q")  # fmt: skip
    fresh = decide(data_version="d1", training_params_hash="h", champion=None, model_name="m")
    result = PipelineResult(status=UP_TO_DATE, ingest=ingest, freshness=fresh)
    out = json.loads(dumps(result))
    assert set(out) == {"status", "ingest", "freshness"} and out["freshness"]["model_name"] == "m"
    assert out["freshness"]["status"] == "retrain" and out["ingest"]["classes"] == ["a", "b"]
