"""The issue ledger across data versions: new / persisting / resolved, and its exports."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from components.quality.label_quality import ISSUE_COLUMNS
from components.quality.ledger import read_ledger, update_ledger


def issues(*rows: tuple[str, str, float]) -> pd.DataFrame:
    """(image_id, issue, score) -> an issue frame as the audit returns it."""
    return pd.DataFrame(
        [
            {"image_id": i, "issue": kind, "split": "train", "label": "Bag", "suggested_label": "Shirt" if kind == "label_error" else "",
             "score": s, "rank": n + 1, "group": "", "path": f"store/{i}.png"}
            for n, (i, kind, s) in enumerate(rows)
        ],
        columns=list(ISSUE_COLUMNS),
    )  # fmt: skip


def test_two_versions_give_new_persisting_resolved(tmp_path: Path) -> None:
    v1 = issues(("a", "label_error", 0.01), ("b", "label_error", 0.02), ("c", "label_error", 0.03),
                ("d", "outlier", 9.0), ("e", "near_duplicate", 2.0))  # fmt: skip
    d1 = update_ledger(
        v1,
        data_version="v1",
        current_ids=set("abcdefg"),
        folder=tmp_path,
        recorded_at="2026-01-01T00:00:00.000001",
    )
    assert d1.previous_version is None
    assert d1.totals == {"new": 5, "persisting": 0, "resolved": 0}
    # v2: b's label was fixed, g was removed... c persists, a persists, d is gone with its image, two new images are suspects
    v2 = issues(("a", "label_error", 0.01), ("c", "label_error", 0.05), ("h", "label_error", 0.02),
                ("i", "label_error", 0.04), ("e", "near_duplicate", 2.0))  # fmt: skip
    d2 = update_ledger(
        v2,
        data_version="v2",
        current_ids=set("abcefghi"),
        folder=tmp_path,
        recorded_at="2026-01-02T00:00:00.000001",
    )
    assert d2.previous_version == "v1"
    assert d2.counts["label_error"] == {"new": 2, "persisting": 2, "resolved": 1}
    assert d2.counts["outlier"] == {"new": 0, "persisting": 0, "resolved": 1}
    assert d2.counts["near_duplicate"] == {"new": 0, "persisting": 1, "resolved": 0}
    assert d2.totals == {"new": 2, "persisting": 3, "resolved": 2}
    ledger = read_ledger(tmp_path)
    now = ledger[ledger["data_version"] == "v2"].set_index(["image_id", "issue"])
    assert now.loc[("b", "label_error"), "resolution"] == "fixed"
    assert now.loc[("d", "outlier"), "resolution"] == "removed"
    assert (
        now.loc[("a", "label_error"), "first_seen"] == "v1"
        and now.loc[("h", "label_error"), "first_seen"] == "v2"
    )
    # the relabel queue: open label errors, worst first, resolved ones left out
    queue = pd.read_csv(tmp_path / "relabel_queue.csv")
    assert list(queue["image_id"]) == ["a", "h", "i", "c"]
    assert list(queue.columns[:5]) == ["image_id", "path", "split", "given_label", "suggested_label"]
    assert json.loads((tmp_path / "diff.json").read_text())["totals"] == d2.totals
    # v3 = v2 audited again later (same data version): replaces its own rows, same diff
    d3 = update_ledger(
        v2,
        data_version="v2",
        current_ids=set("abcefghi"),
        folder=tmp_path,
        recorded_at="2026-01-03T00:00:00.000001",
    )
    assert d3.totals == d2.totals and len(read_ledger(tmp_path)) == len(ledger)
    # v4: everything fixed -> all open issues of v2 resolved, and resolved ones are not resolved again
    d4 = update_ledger(
        issues(),
        data_version="v4",
        current_ids=set("abcefghi"),
        folder=tmp_path,
        recorded_at="2026-01-04T00:00:00.000001",
    )
    assert d4.previous_version == "v2" and d4.totals == {"new": 0, "persisting": 0, "resolved": 5}


def test_clip_disagreements_are_a_ledger_signal_that_the_audit_does_not_wipe(tmp_path: Path) -> None:
    from components.quality.label_quality import CLIP_DISAGREEMENT, ISSUE_TYPES, clip_disagreement_issues

    manifest = pd.DataFrame({"image_id": list("abcd"), "path": [f"store/{i}.png" for i in "abcd"]})
    disagreements = pd.DataFrame(
        {"image_id": ["b", "a"], "split": "test", "label": "Bag", "clip_label": ["Shirt", "Coat"],
         "confidence": [0.91, 0.97], "label_probability": [0.05, 0.01]}
    )  # fmt: skip
    clip = clip_disagreement_issues(disagreements, manifest)
    assert list(clip.columns) == list(ISSUE_COLUMNS)
    assert clip[["image_id", "suggested_label", "rank", "path"]].values.tolist() == [
        ["a", "Coat", 1, "store/a.png"], ["b", "Shirt", 2, "store/b.png"]  # most confident first
    ]  # fmt: skip
    assert clip["score"].tolist() == [0.01, 0.05] and set(clip["issue"]) == {CLIP_DISAGREEMENT}

    def record(frame: pd.DataFrame, version: str, types: tuple[str, ...], when: str, export: str) -> object:
        return update_ledger(frame, data_version=version, current_ids=set("abcd"), folder=tmp_path / "l",
                             recorded_at=when, export_dir=tmp_path / export, issue_types=types)  # fmt: skip

    record(issues(("c", "label_error", 0.1)), "v1", ISSUE_TYPES, "2026-01-01T00:00:00.1", "audit")
    d = record(clip, "v1", (CLIP_DISAGREEMENT,), "2026-01-01T00:00:00.2", "clip")
    assert d.counts == {CLIP_DISAGREEMENT: {"new": 2, "persisting": 0, "resolved": 0}}
    # re-auditing v1 replaces the audit's rows only: the CLIP signal stays
    record(issues(("c", "label_error", 0.1)), "v1", ISSUE_TYPES, "2026-01-01T00:00:00.3", "audit")
    v1 = read_ledger(tmp_path / "l")
    assert sorted(v1["issue"]) == [CLIP_DISAGREEMENT, CLIP_DISAGREEMENT, "label_error"]
    # v2: the audit does not resolve CLIP's rows; CLIP's own next run does (a fixed, b persists)
    d_audit = record(issues(("c", "label_error", 0.1)), "v2", ISSUE_TYPES, "2026-01-02T00:00:00.1", "audit")
    assert CLIP_DISAGREEMENT not in d_audit.counts
    d_clip = record(clip.iloc[1:], "v2", (CLIP_DISAGREEMENT,), "2026-01-02T00:00:00.2", "clip")
    assert d_clip.previous_version == "v1"
    assert d_clip.counts[CLIP_DISAGREEMENT] == {"new": 0, "persisting": 1, "resolved": 1}
    v2 = read_ledger(tmp_path / "l").query("data_version == 'v2'").set_index(["image_id", "issue"])
    assert v2.loc[("a", CLIP_DISAGREEMENT), "resolution"] == "fixed"
    assert v2.loc[("c", "label_error"), "status"] == "persisting"
