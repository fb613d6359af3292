"""Multi-label data quality on real images: Fashion-MNIST composites (one or two items per canvas,
labelled with all of them). The GE suite counts label occurrences and checks label sets and their
cardinality per split; the label audit (cleanlab's multi-label filter) finds deliberately corrupted
label sets and names the suspected labels; the ledger and ``audit.action: exclude`` keep working."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from components.core.config import AuditConfig, ValidateConfig, params_from_dict
from components.data.composites import make_composites
from components.data.ingest import ingest
from components.data.manifest import DataPaths, DatasetInfo, read_manifest
from components.quality.label_quality import ISSUE_COLUMNS, audit, write_exclusions
from components.quality.ledger import read_ledger, update_ledger
from components.quality.validation import (
    ExpectationOutcome,
    ValidationReport,
    class_count_table,
    render_html,
    validate_manifest,
)
from tests.conftest import FMNIST_DIR, REPO

CFG = ValidateConfig(min_per_class=4, max_dark_fraction=0.1)
"""A single item on a black composite canvas is dark by construction: a share of the composites falls
below the default brightness bound, which is about photos, not canvases (``make-composites`` writes
``validate.dark_below=0.01`` into its params for the same reason)."""


@pytest.fixture(scope="module")
def composites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, DatasetInfo]:
    """800 composites (640 from Fashion-MNIST's train images, 160 from its test images), ingested."""
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is not installed: run `make data` (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("composites")
    csv_path = make_composites(
        root / "src", fashion_mnist_dir=FMNIST_DIR, per_split={"train": 640, "test": 160}
    )
    ingest(f"csv:{csv_path}", data_dir=root / "data", download=False)
    paths = DataPaths(root / "data")
    return root / "data", read_manifest(paths.manifest), DatasetInfo.load(paths.dataset)


def _sets(df: pd.DataFrame) -> pd.DataFrame:
    """A copy whose ``labels`` cells are plain lists (parquet gives numpy arrays), safe to edit."""
    out = df.copy()
    out["labels"] = [list(v) for v in df["labels"]]
    return out


def outcome(report: ValidationReport, name: str) -> ExpectationOutcome:
    (match,) = [o for o in report.outcomes if o.name == name]
    return match


# --------------------------------------------------------------------------- validation


def test_composites_pass_with_occurrence_counts_and_cardinality(
    composites: tuple[Path, pd.DataFrame, DatasetInfo],
) -> None:
    _, df, info = composites
    assert info.task == "multilabel"
    report = validate_manifest(df, classes=info.classes, cfg=CFG, task=info.task)
    assert report.success, report.summary_text()
    names = {o.name for o in report.outcomes}
    assert {"labels_in_class_set", "labels_not_empty", "label_cardinality_across_splits"} <= names
    # an image with two labels counts for both: the per-split counts are ingest's occurrence counts
    assert report.summary["label_counts"] == info.counts
    table = class_count_table(df, info.classes, CFG, task="multilabel")
    train = table[(table["scope"] == "split") & (table["split"] == "train")]
    n_train = int((df["split"] == "train").sum())
    assert train["count"].sum() == sum(len(v) for v in df.loc[df["split"] == "train", "labels"]) > n_train
    single = class_count_table(df, info.classes, CFG)  # the primary label only
    assert single.query("scope == 'split' and split == 'train'")["count"].sum() == n_train
    # cardinality: ~1.7 labels per canvas (70% hold two items) in every split, reported per split
    card = report.summary["label_cardinality"]
    assert set(card) == {"train", "val", "test", "all"} and all(1.5 < v < 1.9 for v in card.values())
    shown = outcome(report, "label_cardinality_across_splits").examples
    assert [e["split"] for e in shown] == ["train", "val", "test"]
    assert "Label cardinality" in report.summary_text() and "Labels (multi-label)" in render_html(report)
    assert ValidationReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_label_missing_from_val_fails_and_second_labels_count(
    composites: tuple[Path, pd.DataFrame, DatasetInfo],
) -> None:
    _, df, info = composites
    df = _sets(df)
    val = df["split"] == "val"
    gone, second_only = "Trouser", "Bag"
    # "Trouser" leaves val entirely: images with it alone go, it is dropped from two-item sets
    drop = val & df["labels"].map(lambda s: s == [gone])
    df = df[~drop].copy()
    df["labels"] = [
        [x for x in s if x != gone] if sp == "val" else s
        for s, sp in zip(df["labels"], df["split"], strict=True)
    ]
    # "Bag" stays in val only as a second label
    val = df["split"] == "val"
    df = df[~(val & (df["labels"].map(lambda s: s[0]) == second_only))].copy()
    df["label"] = df["labels"].map(lambda s: s[0])
    val = df["split"] == "val"
    assert df.loc[val, "labels"].map(lambda s: second_only in s).any()
    assert second_only not in set(df.loc[val, "label"])

    report = validate_manifest(df, classes=info.classes, cfg=CFG, task="multilabel")
    assert not report.success
    assert {"class_present_in_val", "min_per_class_per_split"} <= {o.name for o in report.errors()}
    assert outcome(report, "class_present_in_val").examples == ({"split": "val", "missing_class": gone},)
    assert {"split": "val", "label": gone, "count": 0, "imbalance": None} in outcome(
        report, "min_per_class_per_split"
    ).examples
    # a single-label view (primary labels only) would call "Bag" missing too; the label sets do not
    single = validate_manifest(df, classes=info.classes, cfg=CFG)
    missing = {e["missing_class"] for e in outcome(single, "class_present_in_val").examples}
    assert missing == {gone, second_only}


def test_empty_sets_unknown_labels_and_a_cardinality_shift_fail(
    composites: tuple[Path, pd.DataFrame, DatasetInfo],
) -> None:
    _, df, info = composites
    broken = _sets(df)
    empty_id, odd_id = broken.loc[3, "image_id"], broken.loc[4, "image_id"]
    broken.at[3, "labels"] = []
    broken.at[4, "labels"] = [broken.loc[4, "labels"][0], "Hat"]
    report = validate_manifest(broken, classes=info.classes, cfg=CFG, task="multilabel")
    empty = outcome(report, "labels_not_empty")
    assert not empty.success and empty.check == "label_cardinality" and empty.unexpected_count == 1
    assert empty.examples[0]["image_id"] == empty_id and empty.examples[0]["value"] == 0
    unknown = outcome(report, "labels_in_class_set")
    assert not unknown.success and unknown.examples[0]["image_id"] == odd_id
    assert unknown.examples[0]["value"] == "Hat"

    # val keeps one label per canvas while train and test keep ~1.7: a shift of the label process
    shifted = _sets(df)
    val = shifted["split"] == "val"
    shifted.loc[val, "labels"] = shifted.loc[val, "labels"].map(lambda s: s[:1])
    report = validate_manifest(shifted, classes=info.classes, cfg=CFG, task="multilabel")
    card = outcome(report, "label_cardinality_across_splits")
    assert not card.success and card.unexpected_count == 1 and card.check == "cardinality_shift"
    assert card.examples[0]["split"] == "val" and card.examples[0]["ratio_to_train"] > 1.5
    warn = ValidateConfig(min_per_class=4, max_dark_fraction=0.1, severity={"cardinality_shift": "warn"})
    assert validate_manifest(shifted, classes=info.classes, cfg=warn, task="multilabel").success


# --------------------------------------------------------------------------- the audit


def swap_one_label(
    df: pd.DataFrame, classes: tuple[str, ...], fraction: float, rng: np.random.Generator
) -> tuple[pd.DataFrame, dict[str, tuple[str, str]]]:
    """Replace one label of ``fraction`` of the images with a class the image does not carry.
    Returns the noisy frame and image_id -> (removed label, added label)."""
    noisy = _sets(df)
    changed = {}
    for r in rng.choice(len(noisy), int(fraction * len(noisy)), replace=False):
        labels = noisy.at[r, "labels"]
        k = int(rng.integers(len(labels)))
        added = str(rng.choice([c for c in classes if c not in labels]))
        changed[noisy.at[r, "image_id"]] = (labels[k], added)
        noisy.at[r, "labels"] = labels[:k] + [added] + labels[k + 1 :]
    noisy["label"] = noisy["labels"].map(lambda s: s[0])
    return noisy, changed


def test_audit_flags_corrupted_label_sets_and_names_the_labels(
    composites: tuple[Path, pd.DataFrame, DatasetInfo], tmp_path: Path
) -> None:
    data_dir, df, info = composites
    noisy, changed = swap_one_label(df, info.classes, 0.1, np.random.default_rng(3))
    result = audit(noisy, data_dir=data_dir, classes=info.classes, cfg=AuditConfig(), task="multilabel")
    assert list(result.issues.columns) == list(ISSUE_COLUMNS)
    summary = result.summary
    assert summary["task"] == "multilabel" and summary["features"] == "patches128"
    assert summary["oof_map"] > 0.5 and summary["oof_accuracy"] is None
    errors = result.issues[result.issues["issue"] == "label_error"]
    flagged = set(errors["image_id"])
    rate = len(changed) / len(noisy)
    precision = len(flagged & set(changed)) / len(flagged)
    recall = len(flagged & set(changed)) / len(changed)
    top = len(set(errors.head(len(changed))["image_id"]) & set(changed)) / len(changed)
    assert precision > 1.5 * rate and recall > 0.6, (precision, recall, rate)
    assert top > 3.5 * rate, top  # cleanlab's ranking puts the corrupted sets first
    # the rows name the suspected labels: the added one as extra, the removed one as missing
    hits = errors[errors["image_id"].isin(list(changed))]
    extra = np.mean([changed[r.image_id][1] in r.extra_labels.split("|") for r in hits.itertuples()])
    missing = np.mean([changed[r.image_id][0] in r.missing_labels.split("|") for r in hits.itertuples()])
    assert extra > 0.5 and missing > 0.2, (extra, missing)
    given = noisy.set_index("image_id")["labels"]
    for r in hits.head(20).itertuples():  # label / suggested_label are the given / suggested sets
        assert set(r.label.split("|")) == set(given[r.image_id])
        suggested = set(r.suggested_label.split("|")) - {""}
        assert suggested == (set(given[r.image_id]) - set(r.extra_labels.split("|"))) | (
            set(r.missing_labels.split("|")) - {""}
        )
    # the cheap square PCA features cannot follow items that move around the canvas
    pca = audit(
        noisy, data_dir=data_dir, classes=info.classes, cfg=AuditConfig(features="pca"), task="multilabel"
    )
    assert pca.summary["oof_map"] < summary["oof_map"] - 0.1

    # the ledger across data versions: once the corrupted sets are fixed (v2: the audit no longer
    # flags them) their issues are resolved as "fixed", with the labels that were suspected
    ledger_dir = tmp_path / "ledger"
    ids = set(df["image_id"])
    update_ledger(result.issues, data_version="v1", current_ids=ids, folder=ledger_dir,
                  recorded_at="2026-01-01T00:00:00.000001")  # fmt: skip
    v2 = result.issues[~result.issues["image_id"].isin(list(changed))]
    diff = update_ledger(v2, data_version="v2", current_ids=ids, folder=ledger_dir,
                         recorded_at="2026-01-02T00:00:00.000001")  # fmt: skip
    assert diff.counts["label_error"] == {"new": 0, "persisting": len(v2[v2["issue"] == "label_error"]),
                                          "resolved": len(hits)}  # fmt: skip
    rows = (
        read_ledger(ledger_dir).query("data_version == 'v2' and status == 'resolved'").set_index("image_id")
    )
    assert set(rows["resolution"]) == {"fixed"}
    first = hits.iloc[0]
    assert rows.loc[first["image_id"], "extra_labels"] == first["extra_labels"]
    queue = pd.read_csv(ledger_dir / "relabel_queue.csv", keep_default_na=False)
    assert {"missing_labels", "extra_labels"} <= set(queue.columns) and (queue["extra_labels"] != "").any()

    # audit.action: exclude leaves out the worst suspects of the train split, at most the cap
    cfg = AuditConfig(action="exclude", max_issue_rate=0.05)
    n = write_exclusions(result.issues, noisy, cfg, tmp_path / "excluded.csv")
    excluded = pd.read_csv(tmp_path / "excluded.csv")
    assert 0 < n == len(excluded) <= 0.05 * (noisy["split"] == "train").sum()
    assert set(excluded["image_id"]) <= set(noisy.loc[noisy["split"] == "train", "image_id"])
    assert len(set(excluded["image_id"]) & set(changed)) > 3 * rate * n


def test_stages_pass_the_task_through(
    composites: tuple[Path, pd.DataFrame, DatasetInfo], tmp_path: Path
) -> None:
    """``imgflow validate`` / ``imgflow audit`` on an ingested multi-label dataset: the stages read the
    task from dataset.json (no parameter needed) and report multi-label numbers."""
    from components.pipeline.stages import run_audit, run_validate

    data_dir, _, _ = composites
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["project"].update(data_dir=str(data_dir), output_dir=str(tmp_path / "outputs"),
                          state_dir=str(tmp_path / ".imgflow"))  # fmt: skip
    raw["validate"].update(min_per_class=4, max_dark_fraction=0.1)
    raw["audit"].update(action="exclude", splits=["train"])
    params = params_from_dict(raw)
    validated = run_validate(params).to_dict()
    assert validated["success"] and 1.5 < validated["label_cardinality"]["all"] < 1.9
    audited = run_audit(params, progress=False).to_dict()
    assert audited["task"] == "multilabel" and audited["features"] == "patches128"
    assert audited["oof_map"] > 0.5 and "label_error" in audited["ledger"]["counts"]
    excluded = pd.read_csv(tmp_path / "outputs" / "audit" / "excluded.csv")
    assert len(excluded) == audited["excluded"] > 0
    report = (tmp_path / "outputs" / "audit" / "report.html").read_text()
    assert "labels_not_empty" in report  # the validation outcomes, multi-label checks included
