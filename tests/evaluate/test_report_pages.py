"""The three HTML reports (validation, label audit, gate report) are drawn with one report kit:
the same stylesheet, no other, and each renders and reads in headless Chromium."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.core import report as kit
from components.core.config import GatesConfig
from components.evaluate.gate_report import Evidence, build_gates, write_report
from components.quality.label_quality import ISSUE_COLUMNS, AuditResult, write_audit_report
from components.quality.validation import validate_manifest, write_validation_report
from components.task.metrics import compute_metrics
from tests.quality.test_validation import CFG, CLASSES, make_manifest

REPO = Path(__file__).parents[2]


def _gate_report(out: Path) -> Path:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 40)
    logits = np.eye(3)[y] * 3 + rng.normal(0, 1.5, size=(120, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ev = Evidence(metrics=compute_metrics(y, probs, ["a", "b", "c"]))
    return write_report(ev, build_gates(GatesConfig(min_accuracy=0.99), ev), out, context={"model": "m"})[
        "report_html"
    ]


def _validation_report(out: Path) -> Path:
    df = make_manifest()
    df.loc[9, "label"] = "<b>Handbag</b>"  # one failed expectation, with an example row
    return write_validation_report(validate_manifest(df, classes=CLASSES, cfg=CFG), out)[1]


def _audit_report(out: Path) -> Path:
    data_dir = out / "data"
    (data_dir / "store").mkdir(parents=True)
    rows = []
    for i, (issue, label, suggested) in enumerate(
        [
            ("label_error", "a", "b"),
            ("label_error", "b", "a"),
            ("near_duplicate", "a", ""),
            ("near_duplicate", "a", ""),
        ]
    ):
        path = f"store/{i}.png"
        Image.new("L", (28, 28), 40 * i).save(data_dir / path)
        rows.append({"image_id": f"{i:064x}", "issue": issue, "split": "train", "label": label,
                     "suggested_label": suggested, "score": 0.1 * i, "rank": 1 if issue == "near_duplicate" else i + 1,
                     "group": "", "path": path, "missing_labels": "", "extra_labels": ""})  # fmt: skip
    summary = {"audited": 4, "splits": ["train"], "issues": {"label_error": 2, "near_duplicate": 2},
               "class_counts": {"a": 3, "b": 1}, "task": "singlelabel", "oof_accuracy": 0.75}  # fmt: skip
    result = AuditResult(issues=pd.DataFrame(rows, columns=list(ISSUE_COLUMNS)), summary=summary)
    validation = [
        {"name": "too_dark_fraction", "success": False, "unexpected_count": 1, "description": "dark"}
    ]
    ledger = {"data_version": "v2", "previous_version": "v1",
              "counts": {"label_error": {"new": 1, "persisting": 1, "resolved": 0}}}  # fmt: skip
    return write_audit_report(result, ledger, out / "report.html", data_dir=data_dir, validation=validation)


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("reports")
    return {
        "gate": _gate_report(out / "evaluate"),
        "validation": _validation_report(out / "validate"),
        "audit": _audit_report(out / "audit"),
    }


def test_the_three_reports_share_the_kits_stylesheet_and_no_other(pages: dict[str, Path]) -> None:
    hashes = set()
    for name, path in pages.items():
        page = path.read_text()
        blocks = re.findall(r"<style\b[^>]*>(.*?)</style>", page, flags=re.S)
        assert blocks == [kit.STYLESHEET], name  # one block, the kit's, nothing of its own
        assert page.count("<style") == 1 and 'rel="stylesheet"' not in page, name
        hashes.add(hashlib.sha256(blocks[0].encode()).hexdigest())
        assert f"stylesheet sha256 {kit.STYLESHEET_SHA256}" in page, name
        assert "<script" not in page, name
    assert hashes == {kit.STYLESHEET_SHA256}


def test_each_report_keeps_its_sections(pages: dict[str, Path]) -> None:
    gate, validation, audit = (pages[k].read_text() for k in ("gate", "validation", "audit"))
    assert gate.index('id="verdict"') < gate.index("<h2>Gates</h2>") < gate.index("<h3>Per class</h3>")
    assert '<span class="badge fail">FAIL</span>' in gate and '<tr class="fail">' in gate
    assert '<div id="verdict" class="verdict fail">FAILED</div>' in validation
    assert "<h2>Expectations</h2>" in validation and '<span class="badge fail">FAILED</span>' in validation
    assert "&lt;b&gt;Handbag&lt;/b&gt;" in validation and "<b>Handbag</b>" not in validation
    for title in ("Data validation", "Since the previous data version", "Class balance",
                  "Top suspected label errors", "Largest near-duplicate sets"):  # fmt: skip
        assert f"<h2>{title}</h2>" in audit, title
    assert "out-of-fold accuracy of the audit model 0.750" in audit and audit.count("<img") == 4


def _check_report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_report", REPO / "scripts/check_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_three_reports_render_and_read_in_headless_chromium(
    pages: dict[str, Path], tmp_path: Path
) -> None:
    check_report = _check_report()
    chromium = check_report.find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    for name, path in pages.items():
        info = check_report.probe(path, chromium=chromium)
        assert check_report.check(info, verdict=name != "audit") == [], name
        assert info["layout"] == "grid" and info["style_blocks"] == 1, name
    assert check_report.probe(pages["audit"], chromium=chromium)["images"] == 4
    # The checker can fail: a picture that does not load and a table wider than the window are caught.
    broken = tmp_path / "broken.html"
    wide = '<img src="missing.png" alt=""><div style="width:3000px">wide</div>'
    broken.write_text(pages["audit"].read_text().replace("</main>", wide + "</main>"))
    problems = check_report.check(check_report.probe(broken, chromium=chromium), verdict=False)
    assert any("do not show" in p for p in problems) and any("wider than the window" in p for p in problems)
