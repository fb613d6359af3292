"""The label-quality audit on real Fashion-MNIST images: flipped labels are found, the ledger
tracks two data versions, and ``imgflow audit`` writes its files and an MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.core.config import AuditConfig
from components.data.ingest import ingest
from components.data.manifest import DataPaths, DatasetInfo, read_manifest
from components.quality.label_quality import (
    ISSUE_COLUMNS,
    audit,
    decode_workers,
    knn,
    load_grey,
    write_audit_report,
)
from components.quality.ledger import read_ledger, update_ledger
from tests.conftest import fmnist_arrays, run_cli, write_small_params

CFG = AuditConfig()


@pytest.fixture(scope="module")
def fm_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, tuple[str, ...]]:
    """3,000 real Fashion-MNIST images (150 per class from each official split), ingested."""
    data_dir = tmp_path_factory.mktemp("fm") / "data"
    ingest("fashion-mnist", data_dir=data_dir, max_per_class=150, download=False)
    paths = DataPaths(data_dir)
    return data_dir, read_manifest(paths.manifest), DatasetInfo.load(paths.dataset).classes


def flip(
    df: pd.DataFrame, rows: np.ndarray, classes: tuple[str, ...], rng: np.random.Generator
) -> pd.DataFrame:
    """Give each of ``rows`` a different, random class."""
    out = df.copy()
    for r in rows:
        out.loc[r, "label"] = rng.choice([c for c in classes if c != df.loc[r, "label"]])
    return out


def test_flipped_labels_rank_at_the_top(fm_data: tuple[Path, pd.DataFrame, tuple[str, ...]]) -> None:
    data_dir, df, classes = fm_data
    rng = np.random.default_rng(7)
    flipped = rng.choice(len(df), 300, replace=False)  # 10% of the labels made wrong
    noisy = flip(df, flipped, classes, rng)
    result = audit(noisy, data_dir=data_dir, classes=classes, cfg=CFG)
    errors = result.issues[result.issues["issue"] == "label_error"]
    assert list(result.issues.columns) == list(ISSUE_COLUMNS)
    top_k = set(errors.head(len(flipped))["image_id"])
    found = len(top_k & set(df.loc[flipped, "image_id"]))
    assert found >= 0.8 * len(flipped), f"only {found} of {len(flipped)} flips in the top {len(flipped)}"
    # the suggested label is mostly the true one, and scores rise with rank
    truth = df.set_index("image_id")["label"]
    top = errors.head(len(flipped))
    hits = top[top["image_id"].isin(df.loc[flipped, "image_id"])]
    assert (hits["suggested_label"].to_numpy() == truth[hits["image_id"]].to_numpy()).mean() > 0.7
    assert top["score"].is_monotonic_increasing and list(top["rank"]) == list(range(1, len(top) + 1))
    assert result.summary["issues"]["label_error"] == len(errors)
    # the clean data has far fewer suspects
    clean = audit(df, data_dir=data_dir, classes=classes, cfg=CFG)
    assert clean.summary["issues"]["label_error"] < len(errors) - 200


def test_near_duplicates_and_outliers(
    fm_data: tuple[Path, pd.DataFrame, tuple[str, ...]], tmp_path: Path
) -> None:
    data_dir, df, classes = fm_data
    df = df.iloc[:800].copy()
    # an inverted image is far from every Fashion-MNIST image: an outlier
    from PIL import Image, ImageOps

    src = data_dir / df.iloc[5]["path"]
    inverted = tmp_path / "inverted.png"
    ImageOps.invert(Image.open(src).convert("L")).save(inverted)
    extra = df.iloc[[5]].assign(image_id="f" * 64, path=str(inverted), split="test")
    rows = pd.concat([df, extra], ignore_index=True)
    # give one image the pHash of another in a different split: a near-duplicate set
    rows.loc[10, "phash"] = rows.loc[400, "phash"]
    result = audit(rows, data_dir=data_dir, classes=classes, cfg=AuditConfig(outlier_quantile=0.995))
    outliers = result.issues[result.issues["issue"] == "outlier"]
    assert outliers.iloc[0]["image_id"] == "f" * 64  # the most outlying
    dups = result.issues[result.issues["issue"] == "near_duplicate"]
    group = dups.loc[dups["image_id"] == rows.loc[10, "image_id"], "group"]
    assert len(group) == 1
    assert rows.loc[400, "image_id"] in set(dups.loc[dups["group"] == group.item(), "image_id"])


def test_audit_report_shows_validation_results_and_suspects(
    fm_data: tuple[Path, pd.DataFrame, tuple[str, ...]], tmp_path: Path
) -> None:
    data_dir, df, classes = fm_data
    rows = flip(
        df.iloc[:600].reset_index(drop=True), np.arange(0, 600, 20), classes, np.random.default_rng(1)
    )
    result = audit(rows, data_dir=data_dir, classes=classes, cfg=CFG)
    validation = [
        {"name": "label_in_class_set", "success": True, "unexpected_count": 0, "description": "labels known"},
        {
            "name": "too_dark_fraction",
            "success": False,
            "unexpected_count": 7,
            "description": "few dark images",
        },
    ]
    page = write_audit_report(
        result, {"counts": {}}, tmp_path / "r.html", data_dir=data_dir, validation=validation
    )
    text = page.read_text()
    assert "Data validation" in text and "too_dark_fraction" in text and "FAILED" in text
    assert text.index("too_dark_fraction") < text.index("label_in_class_set")  # failures first
    assert text.count("<img") >= 10 and "suggested" in text  # the suspects' gallery
    missing = write_audit_report(result, {"counts": {}}, tmp_path / "m.html", data_dir=data_dir).read_text()
    assert "No validation report found" in missing


def test_knn_excludes_self_and_matches_exact_search() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 8)).astype(np.float32)
    dist, idx = knn(x, k=5)
    assert (idx != np.arange(3000)[:, None]).all()
    exact = np.sqrt(((x[:200, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(exact[:, :200], np.inf)
    nearest = np.sort(exact, axis=1)[:, :5]
    # the IVF index is approximate: most true nearest neighbours are found
    assert np.mean(np.isclose(dist[:200, 0], nearest[:, 0], rtol=1e-3)) > 0.9


def test_ledger_over_two_real_data_versions(
    fm_data: tuple[Path, pd.DataFrame, tuple[str, ...]], tmp_path: Path
) -> None:
    data_dir, df, classes = fm_data
    rng = np.random.default_rng(3)
    order = rng.permutation(len(df))
    base, added = order[:2400], order[2400:]
    flips_v1 = base[:200]
    v1 = flip(df.loc[base].reset_index(drop=True).set_axis(base), flips_v1, classes, rng)
    # v2: 600 images added (60 of them mislabelled) and 100 of v1's flips fixed
    fixed, kept_wrong = flips_v1[:100], flips_v1[100:]
    v2 = pd.concat([v1, flip(df.loc[added], added[:60], classes, rng)])
    v2.loc[fixed, "label"] = df.loc[fixed, "label"]
    ledger_dir = tmp_path / "ledger"

    def run(rows: pd.DataFrame, version: str, when: str) -> tuple[set[str], dict]:
        issues = audit(rows.reset_index(drop=True), data_dir=data_dir, classes=classes, cfg=CFG).issues
        diff = update_ledger(
            issues,
            data_version=version,
            current_ids=set(rows["image_id"]),
            folder=ledger_dir,
            recorded_at=when,
        )
        return set(issues.loc[issues["issue"] == "label_error", "image_id"]), diff.to_dict()

    s1, _ = run(v1, "v1", "2026-01-01T00:00:00")
    s2, diff = run(v2, "v2", "2026-01-02T00:00:00")
    assert diff["counts"]["label_error"] == {
        "new": len(s2 - s1),
        "persisting": len(s2 & s1),
        "resolved": len(s1 - s2),
    }
    ids = df["image_id"]
    fixed_ids, wrong_ids, added_wrong = set(ids[fixed]), set(ids[kept_wrong]), set(ids[added[:60]])
    assert len(fixed_ids & s1) >= 80 and len(wrong_ids & s1) >= 80  # v1 found most flips
    assert len(fixed_ids & s2) <= 15  # fixed labels are rarely still suspected (~ the clean base rate)...
    now = (
        read_ledger(ledger_dir).query("data_version == 'v2' and issue == 'label_error'").set_index("image_id")
    )
    resolved = now[now["status"] == "resolved"]
    assert len(fixed_ids & set(resolved.index)) >= 70  # ...but resolved
    assert set(resolved["resolution"]) == {"fixed"}  # no image was removed
    assert len(wrong_ids & set(now.index[now["status"] == "persisting"])) >= 70  # still wrong: persisting
    assert len(added_wrong & set(now.index[now["status"] == "new"])) >= 45  # added mislabels: new
    queue = pd.read_csv(ledger_dir / "relabel_queue.csv")
    assert set(queue["image_id"]) == s2 and queue["label_quality"].is_monotonic_increasing


@pytest.mark.slow  # three CLI processes (~60 s on 2 busy cores); the e2e pipeline runs the audit task too
def test_imgflow_audit_cli_writes_files_ledger_and_mlflow_run(tmp_path: Path) -> None:
    write_small_params(tmp_path, max_per_class=30)
    assert run_cli("ingest", cwd=tmp_path).returncode == 0
    proc = run_cli(
        "audit", "--json", "--set", "audit.action=fail", "--set", "audit.max_issue_rate=1.0", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    out = tmp_path / "outputs" / "audit"
    for name in ("summary.json", "issues.csv", "relabel_queue.csv", "diff.json", "report.html"):
        assert (out / name).is_file(), name
    assert result["audited"] == 600 and result["ledger"]["previous_version"] is None
    assert result["ledger"]["totals"]["new"] == sum(result["issues"].values())
    assert "Top suspected label errors" in (out / "report.html").read_text()
    from components.registry import tracking

    tracking.configure(None, state_dir=tmp_path / ".imgflow")
    from mlflow import MlflowClient

    run = MlflowClient().get_run(result["run_id"])
    assert run.data.tags["data_version"] == result["data_version"]
    assert run.data.metrics["issues_label_error"] == result["issues"]["label_error"]
    # a threshold the data exceeds fails the stage with exit code 4, after writing the files
    failing = run_cli(
        "audit", "--set", "audit.action=fail", "--set", "audit.max_issue_rate=0.0", cwd=tmp_path
    )
    assert failing.returncode == 4 and "suspected label errors" in failing.stderr
    assert json.loads((out / "diff.json").read_text())["previous_version"] is None  # same version: replaced


def test_small_images_are_decoded_in_the_calling_thread_with_the_same_pixels(
    fm_data: tuple[Path, pd.DataFrame, tuple[str, ...]],
) -> None:
    """28 px images: one thread (threads only contend for the GIL there); large ones or rows without
    sizes: four. Either way the pixels are the same."""
    data_dir, df, _ = fm_data
    assert decode_workers(df) == 1
    assert decode_workers(df.assign(width=256, height=256)) == 4
    assert decode_workers(df.drop(columns=["width"])) == 4
    paths = [data_dir / p for p in df["path"][:1100]]  # three of load_grey's chunks
    np.testing.assert_array_equal(load_grey(paths, side=20, workers=1), load_grey(paths, side=20, workers=4))


def test_out_of_fold_folds_side_by_side_give_the_sequential_probabilities() -> None:
    """The folds run in threads: every row's probabilities are those of a plain sequential loop of
    scikit-learn fits that never saw the row (single-label and multi-label)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, StratifiedKFold

    from components.quality.label_quality import out_of_fold_probs, out_of_fold_probs_multilabel

    pixels, labels = fmnist_arrays("t10k", 1500)
    x = pixels[:1500].reshape(1500, -1).astype(np.float64) / 255.0
    x = (x - x.mean(0)) @ np.random.default_rng(0).standard_normal((x.shape[1], 24)) / 20.0
    y = labels[:1500].astype(np.int64)
    cfg = AuditConfig(folds=4, max_iter=100, seed=3)
    expected = np.zeros((len(y), 10))
    for tr, held in StratifiedKFold(4, shuffle=True, random_state=3).split(x, y):
        expected[held] = LogisticRegression(max_iter=100, C=1.0).fit(x[tr], y[tr]).predict_proba(x[held])
    expected = np.clip(expected, 1e-6, None)
    np.testing.assert_allclose(out_of_fold_probs(x, y, cfg=cfg), expected / expected.sum(1, keepdims=True))
    multi = np.stack([y % 2 == 0, y < 5, y == 9], axis=1).astype(np.int64)
    want = np.zeros(multi.shape)
    for tr, held in KFold(4, shuffle=True, random_state=3).split(x):
        for k in range(3):
            fit = LogisticRegression(max_iter=100, C=1.0).fit(x[tr], multi[tr, k])
            want[held, k] = fit.predict_proba(x[held])[:, 1]
    got = out_of_fold_probs_multilabel(x, multi, cfg=cfg)
    np.testing.assert_allclose(got, np.clip(want, 1e-6, 1 - 1e-6))
