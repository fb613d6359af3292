"""imgflow label-next / label-import on real Fashion-MNIST images: the pool, the queue, the ledger, and the
round trip queue -> labelled CSV -> new data version (ids and labels exact, over shuffled CSVs)."""

from __future__ import annotations

import csv
import hashlib
import random
import shutil
from pathlib import Path

import pandas as pd
import pytest

from components.core.config import load_params
from components.core.errors import ConfigError
from components.data.manifest import data_version, read_manifest
from components.data.pool import read_pool
from components.pipeline.labelling import read_label_csv, run_label_import, run_label_next
from components.pipeline.stages import run_ingest
from tests.conftest import fmnist_arrays, png_bytes

CLASSES = {1: "Trouser", 7: "Sneaker", 8: "Bag"}


def _params(root: Path, data: Path | None = None, tracking: str | None = None):
    (root / "params.yaml").write_text("{}\n")
    overrides = [f"register.tracking_uri={tracking}"] if tracking else []
    overrides += [
        f"ingest.source=imagefolder:{root / 'src'}",
        f"project.data_dir={data or root / 'data'}",
        f"project.state_dir={root / 'state'}",
        f"project.output_dir={root / 'outputs'}",
        f"ingest.unlabelled={root / 'pool'}",
    ]
    return load_params(root / "params.yaml", overrides)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, mlflow_server: dict) -> dict:
    """90-odd real images of 3 classes: 60 labelled (an image folder), the rest an unlabelled pool with
    one undecodable file and one byte-identical copy; one label-next (auto) run."""
    root = tmp_path_factory.mktemp("labelling")
    x, y = fmnist_arrays("t10k", 300)
    keep = [i for i in range(len(y)) if int(y[i]) in CLASSES]
    truth: dict[str, str] = {}
    for n, i in enumerate(keep):
        data, label = png_bytes(x[i]), CLASSES[int(y[i])]
        folder = root / "src" / label if n < 60 else root / "pool" / f"batch{n % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(data)
        if n >= 60:
            truth[hashlib.sha256(data).hexdigest()] = label
    (root / "pool" / "broken.png").write_bytes(b"not an image")
    shutil.copy(next((root / "pool" / "batch0").iterdir()), root / "pool" / "copy.png")
    labelled = next((root / "src" / "Bag").iterdir())  # an image the data version already holds
    shutil.copy(labelled, root / "pool" / "labelled.png")
    in_data = hashlib.sha256(labelled.read_bytes()).hexdigest()
    params = _params(root, tracking=mlflow_server["uri"])  # the session's server: no new sqlite store
    run_ingest(params, progress=False)
    audit_queue = root / "outputs" / "audit" / "relabel_queue.csv"  # an audit's queue to append to
    audit_queue.parent.mkdir(parents=True)
    pd.DataFrame({"image_id": ["x" * 64], "path": ["store/xx/x.png"], "split": ["train"], "given_label": ["Bag"],
                  "suggested_label": ["Trouser"], "label_quality": [0.01], "status": ["new"], "first_seen": ["v"],
                  "missing_labels": [""], "extra_labels": [""]}).to_csv(audit_queue, index=False)  # fmt: skip
    result = run_label_next(params, budget=8, strategy="auto")
    return {"root": root, "params": params, "truth": truth, "result": result, "audit_queue": audit_queue,
            "in_data": in_data}  # fmt: skip


def test_pool_is_content_hashed_and_bad_files_quarantined(project: dict) -> None:
    pool = read_pool(project["params"].project.data_dir)
    assert set(pool["image_id"]) == {*project["truth"], project["in_data"]}  # sha256 of the bytes
    quarantine = pd.read_csv(project["params"].project.data_dir / "pool" / "quarantine.csv")
    reasons = dict(zip(quarantine["source_path"], quarantine["reason"], strict=True))
    assert reasons["broken.png"].startswith("not an image")
    assert reasons["copy.png"].startswith("duplicate: byte-identical")
    manifest = read_manifest(project["params"].project.data_dir / "manifest.parquet")
    assert set(manifest["image_id"]) & set(pool["image_id"]) == {project["in_data"]}  # only the copy


def test_label_next_writes_the_queue_ledger_and_says_why(project: dict) -> None:
    r, params = project["result"], project["params"]
    assert r.asked == "auto" and r.picked == 8 and r.candidates == len(project["truth"])
    assert r.features.startswith("downsampled pixels") and "no champion" in r.features
    assert {row["strategy"] for row in r.replay} >= {"margin", "entropy", "bald", "typical", "random"}
    assert r.strategy in {row["strategy"] for row in r.replay} and r.reason
    queue = pd.read_csv(r.files["queue"])
    assert list(queue["rank"]) == list(range(1, 9)) and (queue["strategy"] == r.strategy).all()
    assert set(queue["image_id"]) <= set(project["truth"]) and queue["image_id"].is_unique
    assert set(queue["prediction"]) <= set(CLASSES.values())
    blank = pd.read_csv(r.files["labels_csv"], keep_default_na=False)
    assert list(blank.columns) == ["image_id", "path", "label"] and (blank["label"] == "").all()
    assert all(Path(p).is_file() for p in blank["path"])  # the labeller can open each image
    ledger = pd.read_parquet(params.project.state_dir / "audit-ledger" / "ledger.parquet")
    requests = ledger[ledger["issue"] == "label_request"]
    assert list(requests["image_id"]) == list(queue["image_id"]) and (requests["status"] == "new").all()
    appended = pd.read_csv(project["audit_queue"], keep_default_na=False)
    assert appended["image_id"].iloc[0] == "x" * 64  # the audit's label error stays first
    assert list(appended["image_id"].iloc[1:]) == list(queue["image_id"])
    assert (appended["split"].iloc[1:] == "unlabelled").all()
    from mlflow.tracking import MlflowClient

    from components.pipeline.context import connect_tracking

    connect_tracking(params)
    history = MlflowClient().get_metric_history(r.run_id, "replay_random_accuracy")
    assert [m.step for m in history] == sorted(m.step for m in history) and len(history) == 3


def _answers(project: dict, rows: list[dict[str, str]], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_id", "path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _filled(project: dict) -> list[dict[str, str]]:
    blank = pd.read_csv(project["result"].files["labels_csv"], keep_default_na=False)
    return [
        {"image_id": i, "path": p, "label": project["truth"][i]}
        for i, p in zip(blank["image_id"], blank["path"], strict=True)
    ]


def test_label_csv_ids_round_trip_under_any_row_order(project: dict, tmp_path: Path) -> None:
    """Property over 200 seeded shuffles (plus blank rows): each id gets exactly its own label."""
    pool_ids = set(project["truth"])
    rows = _filled(project)
    for seed in range(200):
        rng = random.Random(seed)
        shuffled = rows[:] + [{"image_id": rng.choice(sorted(pool_ids)), "path": "", "label": ""}]
        rng.shuffle(shuffled)
        labels, blank = read_label_csv(_answers(project, shuffled, tmp_path / "a.csv"), known_ids=pool_ids,
                                       classes=tuple(CLASSES.values()))  # fmt: skip
        assert labels == {r["image_id"]: project["truth"][r["image_id"]] for r in rows} and blank == 1


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


BAD = {
    "unknown id": lambda rows: rows + [{"image_id": "f" * 64, "path": "", "label": "Bag"}],
    "unknown class": lambda rows: [{**rows[0], "label": "Shirt"}] + rows[1:],
    "duplicate": lambda rows: rows + [rows[0]],
    "conflicting": lambda rows: (
        rows + [{**rows[0], "label": "Bag" if rows[0]["label"] != "Bag" else "Trouser"}]
    ),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_label_csv_is_a_clear_error_and_imports_nothing(project: dict, tmp_path: Path, kind: str) -> None:
    data = project["params"].project.data_dir
    before = _tree_digest(data)
    path = _answers(project, BAD[kind](_filled(project)), tmp_path / "bad.csv")
    with pytest.raises(ConfigError, match="nothing was imported") as err:
        run_label_import(project["params"], path)
    expected = {"unknown id": "unknown image_id", "unknown class": "unknown class 'Shirt'",
                "duplicate": "duplicate row", "conflicting": "conflicting labels"}[kind]  # fmt: skip
    assert expected in str(err.value) and "line " in str(err.value)
    assert _tree_digest(data) == before


def test_labelling_an_image_already_in_the_data_version_is_refused(project: dict, tmp_path: Path) -> None:
    """Its second copy would knock the first out of the data version (duplicate / conflicting labels)."""
    data = project["params"].project.data_dir
    before = _tree_digest(data)
    row = {"image_id": project["in_data"], "path": "", "label": "Trouser"}
    with pytest.raises(ConfigError, match="already in the data version"):
        run_label_import(project["params"], _answers(project, [*_filled(project), row], tmp_path / "a.csv"))
    assert _tree_digest(data) == before


def test_missing_column_is_a_clear_error(project: dict, tmp_path: Path) -> None:
    path = tmp_path / "cols.csv"
    path.write_text("image_id,path\nabc,x\n")
    before = _tree_digest(project["params"].project.data_dir)
    with pytest.raises(ConfigError, match="missing column"):
        run_label_import(project["params"], path)
    assert _tree_digest(project["params"].project.data_dir) == before


@pytest.mark.parametrize("seed", [0, 1])
def test_import_makes_a_new_data_version_with_exact_labels(project: dict, tmp_path: Path, seed: int) -> None:
    """The answers, shuffled, become train images of a new data version: ids unchanged, each with its own
    label, the other images' splits untouched. On a copy of the data dir (the module's stays as it was)."""
    root = project["root"]
    data = tmp_path / "data"
    shutil.copytree(project["params"].project.data_dir, data)
    params = _params(root, data)
    old = read_manifest(data / "manifest.parquet")
    rows = _filled(project)
    random.Random(seed).shuffle(rows)
    result = run_label_import(params, _answers(project, rows, tmp_path / "answers.csv"))
    new = read_manifest(data / "manifest.parquet")
    assert result.imported == len(rows) and result.data_version == data_version(data / "manifest.parquet")
    assert result.data_version != result.data_version_before
    added = new[new["image_id"].isin({r["image_id"] for r in rows})]
    assert dict(zip(added["image_id"], added["label"], strict=True)) == {
        r["image_id"]: r["label"] for r in rows
    }
    assert (added["split"] == "train").all()
    kept = new.set_index("image_id").loc[old["image_id"]]
    assert list(kept["split"]) == list(old["split"]) and list(kept["label"]) == list(old["label"])
    with pytest.raises(ConfigError, match="no new label"):  # the same answers again: nothing new
        run_label_import(params, tmp_path / "answers.csv")


def test_label_next_scores_with_a_model_through_the_embedding_store(
    project: dict, tiny_model_dir: Path
) -> None:
    """A model's features: the data version's from the embedding store, the pool's cached beside it.
    (Last in this module: it replaces the module's label-next outputs.)"""
    params = project["params"]
    r = run_label_next(params, budget=4, strategy="bald", model=tiny_model_dir)
    assert r.features == f"model folder {tiny_model_dir}, layer pooled_last (embedding store)"
    assert r.strategy == "bald" and r.replay == [] and r.picked == 4 and r.note == ""  # T = 5 committee
    assert list((params.project.data_dir / "embeddings").iterdir())  # the manifest's entry
    assert len(list((params.project.data_dir / "pool" / "embeddings").glob("*.npy"))) == 1
    again = run_label_next(params, budget=4, strategy="bald", model=tiny_model_dir)
    assert [q["image_id"] for q in again.queue] == [q["image_id"] for q in r.queue]  # cached, same ranking
