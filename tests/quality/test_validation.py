"""Data tests: the GE manifest suite catches each kind of bad manifest and names the rows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from components.core.config import ValidateConfig
from components.core.errors import DataError
from components.data.manifest import MANIFEST_COLUMNS, read_manifest, write_manifest
from components.quality.validation import (
    ExpectationOutcome,
    ValidationReport,
    validate_manifest,
    write_validation_report,
)

CLASSES = ("Trouser", "Dress", "Sneaker")
SPLIT_NAMES = ("train", "val", "test")
CFG = ValidateConfig(min_per_class=4)


def _row(split: str, label: str, i: int) -> dict:
    image_id = hashlib.sha256(f"{split}/{label}/{i}".encode()).hexdigest()
    return {
        "image_id": image_id,
        "path": f"store/{image_id[:2]}/{image_id}.png",
        "label": label,
        "labels": [label],
        "width": 28,
        "height": 28,
        "mode": "L",
        "bytes": 350 + i,
        "split": split,
        "source": "fashion-mnist",
        "source_path": f"idx:{split}:{i}",
        "decode_ok": True,
        "aspect": 1.0,
        "channels": 1,
        "bit_depth": 8,
        "brightness": 0.25 + 0.01 * i,
        "contrast": 0.3,
        "blur": 5000.0 + i,
        "phash": _far_hash(f"{split}/{label}/{i}"),
    }


def _far_hash(key: str) -> str:
    """A random-looking 64-bit hash: two of these are near-duplicates with negligible probability."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def make_manifest() -> pd.DataFrame:
    """3 classes x 3 splits x 4 rows, the values ingestion writes for Fashion-MNIST."""
    rows = [_row(s, c, i) for s in SPLIT_NAMES for c in CLASSES for i in range(4)]
    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    return df.astype(
        {"width": "int32", "height": "int32", "bytes": "int64", "channels": "int32", "bit_depth": "int32"}
    )


def outcome(report: ValidationReport, name: str) -> ExpectationOutcome:
    matches = [o for o in report.outcomes if o.name == name]
    assert len(matches) == 1, f"{name} not in {[o.name for o in report.outcomes]}"
    return matches[0]


def failed_names(report: ValidationReport) -> set[str]:
    return {o.name for o in report.failed()}


@pytest.fixture(scope="module")
def good_report() -> ValidationReport:
    return validate_manifest(make_manifest(), classes=CLASSES, cfg=CFG)


def test_good_manifest_passes(good_report: ValidationReport) -> None:
    assert good_report.success, good_report.summary_text()
    assert good_report.failed() == []
    assert all(o.success and o.unexpected_count == 0 for o in good_report.outcomes)
    assert good_report.n_rows == 36
    names = {o.name for o in good_report.outcomes}
    assert {
        "columns_present",
        "label_not_null",
        "label_in_class_set",
        "width_in_range",
        "height_in_range",
        "mode_allowed",
        "split_known",
        "class_present_in_train",
        "class_present_in_val",
        "class_present_in_test",
        "image_id_unique",
    } <= names
    assert good_report.ge_result["success"] is True
    assert "PASSED" in good_report.summary_text()


def test_good_manifest_read_back_from_parquet_passes(tmp_path: Path) -> None:
    # The dtypes read_manifest gives (pandas str, list column as arrays) must validate too.
    write_manifest(make_manifest(), tmp_path / "manifest.parquet")
    report = validate_manifest(read_manifest(tmp_path / "manifest.parquet"), classes=CLASSES, cfg=CFG)
    assert report.success, report.summary_text()


def test_unknown_label_fails_and_names_the_row() -> None:
    df = make_manifest()
    df.loc[5, "label"] = "Handbag"
    report = validate_manifest(df, classes=CLASSES, cfg=CFG)
    assert not report.success
    assert failed_names(report) == {"label_in_class_set"}
    o = outcome(report, "label_in_class_set")
    assert o.expectation == "expect_column_values_to_be_in_set"
    assert o.unexpected_count == 1
    assert o.examples == (
        {"image_id": df.loc[5, "image_id"], "path": df.loc[5, "path"], "split": "train", "value": "Handbag"},
    )
    text = report.summary_text()
    assert "FAILED" in text and "label_in_class_set" in text and df.loc[5, "image_id"] in text


def test_class_missing_from_val_fails_and_names_the_class() -> None:
    df = make_manifest()
    df = df[~((df["split"] == "val") & (df["label"] == "Dress"))]
    report = validate_manifest(df, classes=CLASSES, cfg=CFG)
    assert failed_names(report) == {"class_present_in_val", "min_per_class_per_split"}
    o = outcome(report, "class_present_in_val")
    assert o.unexpected_count == 1
    assert o.examples == ({"split": "val", "missing_class": "Dress"},)
    per_split = outcome(report, "min_per_class_per_split")
    assert per_split.unexpected_count == 1
    assert per_split.examples == ({"split": "val", "label": "Dress", "count": 0, "imbalance": None},)
    assert outcome(report, "class_present_in_train").success


def test_only_required_splits_need_every_class() -> None:
    df = make_manifest()
    df = df[~((df["split"] == "test") & (df["label"] == "Sneaker"))]
    cfg = ValidateConfig(required_splits=("train", "val"), min_per_class=4)
    report = validate_manifest(df, classes=CLASSES, cfg=cfg)
    assert report.success, report.summary_text()
    assert not any(o.name == "class_present_in_test" for o in report.outcomes)


def test_image_in_train_and_test_fails_and_names_it() -> None:
    df = make_manifest()
    shared = df.loc[0, "image_id"]
    test_row = df.index[df["split"] == "test"][0]
    df.loc[test_row, "image_id"] = shared
    report = validate_manifest(df, classes=CLASSES, cfg=CFG)
    assert failed_names(report) == {"image_id_unique"}
    o = outcome(report, "image_id_unique")
    assert o.unexpected_count == 2  # both rows
    assert len(o.examples) == 1
    assert o.examples[0]["image_id"] == shared
    assert o.examples[0]["splits"] == ["test", "train"]
    assert o.examples[0]["count"] == 2
    assert shared in report.summary_text()


def test_width_out_of_bounds_fails() -> None:
    df = make_manifest()
    df.loc[7, "width"] = 4  # below min_width=8
    report = validate_manifest(df, classes=CLASSES, cfg=CFG)
    assert failed_names(report) == {"width_in_range"}
    o = outcome(report, "width_in_range")
    assert o.unexpected_count == 1
    assert o.examples[0]["image_id"] == df.loc[7, "image_id"]
    assert o.examples[0]["value"] == 4
    # The bounds come from the config: a narrower range fails rows that the default accepts.
    tight = validate_manifest(
        make_manifest(), classes=CLASSES, cfg=ValidateConfig(max_height=27, min_per_class=4)
    )
    assert failed_names(tight) == {"height_in_range"}
    assert outcome(tight, "height_in_range").unexpected_count == 36


def test_null_label_fails() -> None:
    df = make_manifest()
    df.loc[3, "label"] = None
    report = validate_manifest(df, classes=CLASSES, cfg=CFG)
    assert "label_not_null" in failed_names(report)
    o = outcome(report, "label_not_null")
    assert o.unexpected_count == 1
    assert o.examples[0]["image_id"] == df.loc[3, "image_id"]
    assert o.examples[0]["value"] is None


def test_disallowed_mode_fails() -> None:
    df = make_manifest()
    df.loc[[2, 20], "mode"] = "CMYK"
    report = validate_manifest(df, classes=CLASSES, cfg=CFG)
    assert failed_names(report) == {"mode_allowed"}
    o = outcome(report, "mode_allowed")
    assert o.unexpected_count == 2
    assert {e["image_id"] for e in o.examples} == {df.loc[2, "image_id"], df.loc[20, "image_id"]}
    assert {e["value"] for e in o.examples} == {"CMYK"}
    allowed = validate_manifest(
        df, classes=CLASSES, cfg=ValidateConfig(allowed_modes=("L", "CMYK"), min_per_class=4)
    )
    assert allowed.success


def test_unknown_split_fails() -> None:
    df = make_manifest()
    df.loc[0, "split"] = "holdout"
    report = validate_manifest(df, classes=CLASSES, cfg=CFG)
    assert "split_known" in failed_names(report)
    assert outcome(report, "split_known").examples[0]["value"] == "holdout"


def test_empty_manifest_fails_cleanly() -> None:
    empty = make_manifest().iloc[:0]
    report = validate_manifest(empty, classes=CLASSES, cfg=CFG)
    assert not report.success
    assert report.n_rows == 0
    assert {"manifest_not_empty", "class_present_in_train"} <= failed_names(report)
    assert {e["missing_class"] for e in outcome(report, "class_present_in_val").examples} == set(CLASSES)
    assert "FAILED" in report.summary_text()


def test_missing_column_fails_without_crashing() -> None:
    df = make_manifest().drop(columns=["mode"])
    report = validate_manifest(df, classes=CLASSES, cfg=CFG)
    assert outcome(report, "columns_present").examples == ({"missing_column": "mode"},)
    mode_allowed = outcome(report, "mode_allowed")
    assert not mode_allowed.success
    assert "mode" in mode_allowed.examples[0]["error"]
    assert outcome(report, "label_in_class_set").success


def test_no_classes_is_a_user_error() -> None:
    with pytest.raises(DataError, match="no classes"):
        validate_manifest(make_manifest(), classes=[], cfg=CFG)


def test_report_files_round_trip_and_escape(tmp_path: Path) -> None:
    df = make_manifest()
    df.loc[9, "label"] = "<b>Handbag</b>"
    report = validate_manifest(df, classes=CLASSES, cfg=CFG)
    json_path, html_path = write_validation_report(report, tmp_path / "validation")
    assert json_path == tmp_path / "validation" / "report.json"
    assert html_path == tmp_path / "validation" / "report.html"

    raw = json.loads(json_path.read_text())
    assert raw == report.to_dict()
    assert raw["success"] is False
    assert raw["ge_result"]["statistics"]["unsuccessful_expectations"] == 1
    assert ValidationReport.from_dict(raw) == report

    page = html_path.read_text()
    assert "FAILED" in page
    assert "label_in_class_set" in page
    assert df.loc[9, "image_id"] in page
    assert "&lt;b&gt;Handbag&lt;/b&gt;" in page
    assert "<b>Handbag</b>" not in page


def test_passing_report_html_says_passed(tmp_path: Path, good_report: ValidationReport) -> None:
    _, html_path = write_validation_report(good_report, tmp_path)
    page = html_path.read_text()
    assert "PASSED" in page and "FAILED" not in page


def test_ge_writes_nothing_and_draws_no_progress_bars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    validate_manifest(make_manifest(), classes=CLASSES, cfg=CFG)
    assert list(tmp_path.iterdir()) == []  # no gx/ or great_expectations/ folder
    err = capfd.readouterr().err
    assert "Calculating Metrics" not in err


# ---------------------------------------------------------------------------------------------
# Image-property, balance and leakage checks; error vs warn


def _flip_bits(hex_hash: str, n: int) -> str:
    return f"{int(hex_hash, 16) ^ ((1 << n) - 1):016x}"


def test_quality_fractions_name_the_rows_and_follow_severity() -> None:
    df = make_manifest()
    df.loc[[0, 1], "brightness"] = 0.01  # 2 of 36 = 5.6% dark > 1%
    df.loc[2, "blur"] = 3.0  # 1 of 36 = 2.8% blurry <= 5%: passes
    df.loc[3, "aspect"] = 7.5
    report = validate_manifest(df, classes=CLASSES, cfg=CFG)
    assert failed_names(report) == {"too_dark_fraction", "aspect_in_range"}
    dark = outcome(report, "too_dark_fraction")
    assert dark.check == "too_dark" and dark.severity == "error" and dark.unexpected_count == 2
    assert {e["image_id"] for e in dark.examples} == set(df.loc[[0, 1], "image_id"])
    assert {e["value"] for e in dark.examples} == {0.01}
    assert outcome(report, "blurry_fraction").success
    assert outcome(report, "aspect_in_range").examples[0]["value"] == 7.5
    assert not report.success
    # the same problems as warnings: reported, but the report passes
    cfg = ValidateConfig(min_per_class=4, severity={"too_dark": "warn", "aspect": "warn"})
    warned = validate_manifest(df, classes=CLASSES, cfg=cfg)
    assert warned.success and {o.name for o in warned.warnings()} == {"too_dark_fraction", "aspect_in_range"}
    assert (
        "PASSED with 2 warning(s)" in warned.summary_text()
        and "WARNING too_dark_fraction" in warned.summary_text()
    )
    # stricter thresholds from params catch the blurry image
    strict = validate_manifest(
        df, classes=CLASSES, cfg=ValidateConfig(min_per_class=4, max_blurry_fraction=0.0)
    )
    assert "blurry_fraction" in failed_names(strict)


def test_class_balance_checks() -> None:
    df = make_manifest()
    # Sneaker: 12 -> 2 images (1 train, 1 test): under min_per_class, missing from val, 6x imbalance
    drop = df.index[(df["label"] == "Sneaker")][1:11]
    df = df.drop(drop)
    cfg = ValidateConfig(min_per_class=4, max_imbalance_ratio=5)
    report = validate_manifest(df, classes=CLASSES, cfg=cfg)
    assert {"min_per_class", "class_imbalance", "min_per_class_per_split"} <= failed_names(report)
    assert outcome(report, "min_per_class").examples == (
        {"split": "all", "label": "Sneaker", "count": 2, "imbalance": 6.0},
    )
    assert outcome(report, "class_imbalance").examples[0]["label"] == "Sneaker"
    assert validate_manifest(df, classes=CLASSES, cfg=ValidateConfig(min_per_class=2, max_imbalance_ratio=6,
        required_splits=("train", "test"))).success  # fmt: skip


def test_single_class_dataset_fails_enough_classes() -> None:
    df = make_manifest()
    df = df[df["label"] == "Dress"]
    report = validate_manifest(df, classes=("Dress",), cfg=CFG)
    assert failed_names(report) == {"enough_classes"}
    assert outcome(report, "enough_classes").examples == ({"observed": 1},)


def test_near_duplicates_across_splits_are_found_within_a_split_are_not() -> None:
    df = make_manifest()
    train_row, test_row = df.index[df["split"] == "train"][0], df.index[df["split"] == "test"][5]
    df.loc[test_row, "phash"] = _flip_bits(df.loc[train_row, "phash"], 2)  # distance 2: a near-dup
    other = df.index[df["split"] == "train"][1]
    df.loc[other, "phash"] = _flip_bits(df.loc[train_row, "phash"], 1)  # same split: not leakage
    report = validate_manifest(df, classes=CLASSES, cfg=CFG)
    assert report.success  # near_dup_leakage warns by default
    o = outcome(report, "no_near_duplicate_across_splits")
    assert not o.success and o.severity == "warn" and o.unexpected_count == 3
    by_id = {e["image_id"]: e["value"] for e in o.examples}
    # each flagged row names its closest partner in another split (other is 1 bit from test_row)
    assert by_id == {
        df.loc[train_row, "image_id"]: df.loc[test_row, "image_id"],
        df.loc[test_row, "image_id"]: df.loc[other, "image_id"],
        df.loc[other, "image_id"]: df.loc[test_row, "image_id"],
    }
    strict = validate_manifest(df, classes=CLASSES, cfg=ValidateConfig(min_per_class=4,
        near_dup_distance=1, severity={"near_dup_leakage": "error"}))  # fmt: skip
    assert "no_near_duplicate_across_splits" in failed_names(strict) and not strict.success
    assert (
        outcome(strict, "no_near_duplicate_across_splits").unexpected_count == 2
    )  # other<->test: distance 1


def test_unknown_severity_check_is_a_config_error() -> None:
    from components.core.config import params_from_dict
    from components.core.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown check"):
        params_from_dict({"validate": {"severity": {"blury": "warn"}}})
    with pytest.raises(ConfigError, match="severity"):
        params_from_dict({"validate": {"severity": {"blurry": "ignore"}}})
