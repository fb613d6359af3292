"""An audit a team can act on (issue 17, item 5): on planted flips the top of the capped relabel
queue is precise, cleanlab's noise-rate estimate rises with the planted noise, the encoder is chosen
in order (trained model, pretrained backbone where it fits, cheap features) and says why.

Small and real: 2,000 Fashion-MNIST images with 5% of the labels flipped (seeded). The full-size
figure (5% of the 60,000 train images, top 200 of the queue >= 90%) is ``python -m bench audit``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.core.config import AuditConfig, load_params
from components.core.errors import ConfigError, DataError
from components.data.ingest import ingest
from components.data.manifest import DataPaths, DatasetInfo, read_manifest
from components.quality.encoders import (
    AuditFeatures,
    cap_relabel_queue,
    choose_source,
    pretrained_fit,
)
from components.quality.label_quality import audit, write_audit_report

CFG = AuditConfig(queue_size=50)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """2,000 real images (100 per class from each official split), ingested; 5% of labels flipped."""
    data_dir = tmp_path_factory.mktemp("queue") / "data"
    ingest("fashion-mnist", data_dir=data_dir, max_per_class=100, download=False)
    paths = DataPaths(data_dir)
    df, classes = read_manifest(paths.manifest), DatasetInfo.load(paths.dataset).classes
    rng = np.random.default_rng(17)
    flipped = rng.choice(len(df), len(df) // 20, replace=False)
    noisy = df.copy()
    for r in flipped:
        noisy.loc[r, "label"] = rng.choice([c for c in classes if c != df.loc[r, "label"]])
    return {"dir": data_dir, "clean": df, "noisy": noisy, "classes": classes,
            "flipped": set(df.loc[flipped, "image_id"])}  # fmt: skip


def test_top_of_the_relabel_queue_is_mostly_planted_flips(planted: dict, tmp_path: Path) -> None:
    result = audit(planted["noisy"], data_dir=planted["dir"], classes=planted["classes"], cfg=CFG)
    s = result.summary
    errors = result.issues[result.issues["issue"] == "label_error"]
    assert s["relabel_queue"] == 50 and s["suspected"] == len(errors) > 50 and s["queue_size"] == 50
    top = errors[errors["rank"] <= s["relabel_queue"]]
    precision = top["image_id"].isin(planted["flipped"]).mean()
    assert precision >= 0.8, f"top-50 precision {precision:.2f} on 5% planted flips"
    assert s["features"] == "pca32" and "PCA" in s["features_from"] and s["features_reason"] == "asked for"
    # cleanlab's noise estimate sees the planted 5% (on top of Fashion-MNIST's own ambiguity)
    clean = audit(planted["clean"], data_dir=planted["dir"], classes=planted["classes"], cfg=CFG)
    rise = s["noise_rate_estimate"] - clean.summary["noise_rate_estimate"]
    assert 0.02 <= rise <= 0.10, (s["noise_rate_estimate"], clean.summary["noise_rate_estimate"])
    assert s["label_issues_estimate"] > clean.summary["label_issues_estimate"]
    # the report says what the audit stands on and how much the queue shows
    report = write_audit_report(result, {"data_version": "v"}, tmp_path / "r.html", data_dir=planted["dir"])
    text = report.read_text()
    assert "cleanlab estimates" in text and f"worst 50 of {len(errors)}" in text and "Features: PCA" in text


def test_given_features_replace_the_cheap_ones(planted: dict) -> None:
    """Features handed in by the pipeline (a trained model's, a pretrained backbone's) are used,
    aligned by image_id, and recorded with their reason."""
    clean = planted["clean"]
    rng = np.random.default_rng(0)
    # a stand-in encoder that knows the true class (plus noise): flips then stand out completely
    centres = rng.normal(size=(len(planted["classes"]), 16))
    truth = clean["label"].map({c: i for i, c in enumerate(planted["classes"])}).to_numpy()
    vectors = centres[truth] + 0.3 * rng.normal(size=(len(clean), 16))
    order = rng.permutation(len(clean))  # the store's row order need not be the manifest's
    given = AuditFeatures(vectors[order], tuple(clean["image_id"].iloc[order]), "model", "champion v1", "why")
    result = audit(
        planted["noisy"], data_dir=planted["dir"], classes=planted["classes"], cfg=CFG, encoded=given
    )
    s = result.summary
    assert (s["features"], s["features_from"], s["features_reason"]) == ("model", "champion v1", "why")
    # a model that learnt these labels is no cheap baseline for gates.min_accuracy: auto
    assert s["oof_accuracy"] is None and s["oof_accuracy_on_model_features"] > 0.9
    errors = result.issues[result.issues["issue"] == "label_error"]
    assert errors.head(50)["image_id"].isin(planted["flipped"]).mean() >= 0.95
    partial = AuditFeatures(vectors[:10], tuple(clean["image_id"][:10]), "model", "champion v1", "why")
    with pytest.raises(DataError, match="have no model features"):
        audit(planted["noisy"], data_dir=planted["dir"], classes=planted["classes"], cfg=CFG, encoded=partial)


def _rows(side: int, channels: int, n: int = 10) -> pd.DataFrame:
    return pd.DataFrame({"width": [side] * n, "height": [side] * n, "channels": [channels] * n})


def test_auto_walks_model_then_pretrained_then_cheap_and_says_why() -> None:
    fits = pretrained_fit(_rows(300, 1), min_side=64, max_images=100, available=True)
    small_grey = pretrained_fit(_rows(28, 1), min_side=64, max_images=100, available=True)
    assert fits is None and pretrained_fit(_rows(28, 3), min_side=64, max_images=100, available=True) is None
    assert small_grey is not None and "median side 28 px" in small_grey
    assert "more than audit.pretrained_max_images=5" in str(
        pretrained_fit(_rows(300, 1), min_side=64, max_images=5, available=True)
    )
    assert "not installed" in str(pretrained_fit(_rows(300, 1), min_side=64, max_images=100, available=False))

    auto = {"fallback": "pca"}
    assert choose_source("auto", model_missing=None, pretrained_unfit=None, **auto).source == "model"
    second = choose_source("auto", model_missing="no champion yet", pretrained_unfit=fits, **auto)
    assert second.source == "pretrained" and second.reason.startswith("no champion yet")
    third = choose_source("auto", model_missing="no champion yet", pretrained_unfit=small_grey, **auto)
    assert third.source == "pca" and "no champion yet" in third.reason and "median side 28" in third.reason
    assert (
        choose_source("auto", model_missing="x", pretrained_unfit="y", fallback="patches").source == "patches"
    )
    assert choose_source("pixels", model_missing=None, pretrained_unfit=None, **auto).source == "pixels"
    with pytest.raises(ConfigError, match="audit.features=model: no champion yet"):
        choose_source("model", model_missing="no champion yet", pretrained_unfit=None, **auto)


def test_pipeline_resolves_the_encoder_and_caps_the_queue(
    planted: dict, tmp_path: Path, tiny_model_dir: Path
) -> None:
    from components.pipeline.audit_features import resolve_audit_features

    overrides = [f"project.data_dir={planted['dir']}", f"project.state_dir={tmp_path / 'state'}"]
    (tmp_path / "params.yaml").write_text("{}\n")  # all defaults
    params = load_params(tmp_path / "params.yaml", overrides)
    encoded, reason = resolve_audit_features(params, planted["clean"], task=None)
    assert encoded is None and reason.startswith("no champion yet") and "median side 28 px" in reason
    assert not (tmp_path / "state").exists()  # looking for a champion created no registry

    # a named model folder: its layer, through the embedding store (every manifest image, by image_id)
    named = load_params(tmp_path / "params.yaml", [*overrides, f"audit.model={tiny_model_dir}"])
    encoded, reason = resolve_audit_features(named, planted["clean"], task=None)
    assert encoded is not None and encoded.source == "model" and reason.startswith("a trained model")
    assert encoded.name == f"model folder {tiny_model_dir}, pooled_last"
    assert encoded.for_rows(planted["clean"]["image_id"].tolist()).shape[0] == len(planted["clean"])

    queue = tmp_path / "relabel_queue.csv"
    pd.DataFrame({"image_id": list("abcde"), "score": [0.1, 0.2, 0.3, 0.4, 0.5], "note": ""}).to_csv(
        queue, index=False
    )
    assert cap_relabel_queue(queue, size=3) == 3
    kept = pd.read_csv(queue, keep_default_na=False)
    assert list(kept["image_id"]) == ["a", "b", "c"] and list(kept["note"]) == ["", "", ""]
    assert cap_relabel_queue(queue, size=10) == 3  # already short enough: untouched
