"""Label trees end to end at small size: hand-checked per-decoding rows and gates, the soft-label loss,
nested class folders ingested with paths (the tree versioned with the data), bad trees as exit 2, and
a Predictor serving paths, parent probabilities and back-off answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from components.core.errors import ConfigError
from components.data.ingest import ingest
from components.data.manifest import DataPaths, DatasetInfo, data_version, file_md5
from components.evaluate.hierarchy import decoding_row, hierarchy_gates, hierarchy_report, measure_hierarchy
from components.model.checkpoint import Predictor
from components.serve.serving import predictions
from components.task.taxonomy import HIERARCHY_FILE, ShippedTree, Taxonomy, load_hierarchy, load_taxonomy
from components.train.hierarchy_loss import create_soft_label_loss, soft_label_matrix
from tests.conftest import REPO, fmnist_arrays, png_bytes, run_cli

# A = {a1, a2}, B = {b1, b2}
TREE = Taxonomy.from_paths(["A/a1", "A/a2", "B/b1", "B/b2"], ["a1", "a2", "b1", "b2"])
PROBS = np.array([[0.7, 0.1, 0.1, 0.1], [0.4, 0.0, 0.3, 0.3], [0.1, 0.6, 0.2, 0.1]])
LABELS = np.array([0, 2, 0])


def test_decoding_rows_by_hand() -> None:
    # argmax top-2: [a1 a2], [a1 b1], [a2 b1]; CRM (expected distances) top-2: [a1 a2], [b1 b2], [a2 a1].
    flat = decoding_row(PROBS, LABELS, TREE, "argmax", k=2, n_bins=1)
    crm = decoding_row(PROBS, LABELS, TREE, "crm", k=2, n_bins=1)
    assert flat["top1"] == pytest.approx(1 / 3) and crm["top1"] == pytest.approx(2 / 3)
    assert flat["parent_accuracy"] == pytest.approx(2 / 3) and crm["parent_accuracy"] == 1.0
    assert flat["mistake_severity"] == pytest.approx(1.5) and crm["mistake_severity"] == pytest.approx(1.0)
    assert flat["hdist_1"] == pytest.approx(1.0) and crm["hdist_1"] == pytest.approx(1 / 3)
    assert flat["hdist_2"] == pytest.approx(1.0) and crm["hdist_2"] == pytest.approx(0.5)
    # one bin: |accuracy - mean confidence of the answer|
    assert flat["ece"] == pytest.approx(abs(1 / 3 - (0.7 + 0.4 + 0.6) / 3))
    assert crm["ece"] == pytest.approx(abs(2 / 3 - (0.7 + 0.3 + 0.6) / 3))
    report = hierarchy_report(PROBS, LABELS, TREE, k=2, n_bins=1)
    assert report["crm_hdist_ratio"] == pytest.approx(0.5)
    assert report["crm_top1_drop_pt"] == pytest.approx(-100 / 3)


def test_gates_and_shipped_rule(tmp_path: Path) -> None:
    # val: image 2's top leaf (0.6) is wrong but its parent (0.9) right -> tau 0.7 for precision 1
    # (the point value: three images bound nothing; the Wilson rule is tested in tests/task).
    val = (np.array([[0.95, 0.05, 0, 0], [0.6, 0.3, 0.1, 0], [0.7, 0.1, 0.2, 0]]), np.array([0, 1, 0]))
    report = measure_hierarchy(TREE, (PROBS, LABELS), val, backoff="parent", backoff_precision=1.0, k=2,
                               n_bins=1, out_dir=tmp_path, backoff_confidence=None)  # fmt: skip
    back = report["backoff"]
    assert back["threshold"] == 0.7
    # test at 0.7: a1 (leaf 0.7, right); abstains (B only 0.6); A (0.1 + 0.6, right: a1 is under A).
    assert (back["precision"], back["answered"], back["leaf_answered"]) == (1.0, pytest.approx(2 / 3),
                                                                            pytest.approx(1 / 3))  # fmt: skip
    gates = hierarchy_gates(report, max_crm_ratio=1.0, min_precision=None, min_answered=0.6, levels={})
    assert [(g.name, g.passed) for g in gates] == [
        ("max_crm_hdist_ratio", True), ("min_backoff_precision", True), ("min_backoff_answered", True)
    ]  # fmt: skip
    assert hierarchy_gates(report, max_crm_ratio=0.4, min_precision=None, min_answered=None,
                           levels={"min_backoff_precision": "off"})[0].passed is False  # fmt: skip
    shipped = load_hierarchy(tmp_path)
    assert shipped is not None and (shipped.backoff, shipped.threshold) == ("parent", 0.7)
    off = measure_hierarchy(TREE, (PROBS, LABELS), val, backoff="off", backoff_precision=1.0, k=2, n_bins=1,
                            backoff_confidence=None)  # fmt: skip
    assert off["backoff"] is not None  # fitted and reported, but neither served nor gated
    assert [g.name for g in hierarchy_gates(off, max_crm_ratio=1.0, min_precision=None, min_answered=0.5,
                                            levels={})] == ["max_crm_hdist_ratio"]  # fmt: skip


def test_soft_labels_put_more_mass_on_siblings() -> None:
    q = soft_label_matrix(TREE.distance_matrix(), beta=2.0, height=TREE.height())
    e1, e2 = np.exp(-1.0), np.exp(-2.0)  # beta * distance / height for siblings (1) and cousins (2)
    np.testing.assert_allclose(q[0], np.array([1, e1, e2, e2]) / (1 + e1 + 2 * e2))
    loss = create_soft_label_loss(TREE, beta=2.0)
    logits = torch.zeros(2, 4, requires_grad=True)
    value = loss(logits, torch.tensor([0, 3]))
    assert value.item() == pytest.approx(np.log(4))  # uniform logits: cross-entropy of any target is log K
    value.backward()
    assert logits.grad is not None and float(logits.grad[0, 0]) < 0 < float(logits.grad[0, 2])
    sharp = create_soft_label_loss(TREE, beta=60.0)  # large beta -> one-hot cross-entropy
    x = torch.randn(3, 4)
    y = torch.tensor([1, 2, 3])
    assert float(sharp(x, y)) == pytest.approx(float(torch.nn.functional.cross_entropy(x, y)), abs=1e-4)


# ------------------------------------------------------------------------ ingest: nested folders

NESTED = {"footwear/Sneaker": 7, "footwear/Sandal": 5, "tops/Shirt": 6, "Bag": 8}  # ragged: Bag at the top


def make_nested_folder(root: Path, *, per_class: int = 6) -> None:
    """Real Fashion-MNIST images in nested class folders (class index -> its path)."""
    x, y = fmnist_arrays("t10k", 400)
    for path, cls in NESTED.items():
        folder = root / path
        folder.mkdir(parents=True)
        for i, img in enumerate(x[y == cls][:per_class]):
            (folder / f"{i}.png").write_bytes(png_bytes(img))


def test_nested_folders_ingest_with_paths_and_version_the_tree(tmp_path: Path) -> None:
    make_nested_folder(tmp_path / "src")
    summary = ingest(f"imagefolder:{tmp_path / 'src'}", data_dir=tmp_path / "data", taxonomy="paths")
    assert summary.classes == ("Bag", "Sandal", "Shirt", "Sneaker")
    tree = load_taxonomy(tmp_path / "data")
    assert tree is not None and tree.path("Sneaker") == "footwear/Sneaker" and tree.path("Bag") == "Bag"
    assert tree.leaves == DatasetInfo.load(DataPaths(tmp_path / "data").dataset).classes
    manifest = DataPaths(tmp_path / "data").manifest
    assert summary.data_version == data_version(manifest) != file_md5(manifest)  # the tree is in the version
    # Flat ingest of the same folder: top folders are the classes, and the old tree is gone.
    flat = ingest(f"imagefolder:{tmp_path / 'src'}", data_dir=tmp_path / "data")
    assert flat.classes == ("Bag", "footwear", "tops") and load_taxonomy(tmp_path / "data") is None


def test_csv_label_path_column_gives_the_tree(tmp_path: Path) -> None:
    x, y = fmnist_arrays("t10k", 60)
    rows = ["path,label_path"]
    for i, (img, cls) in enumerate(zip(x, y, strict=True)):
        if int(cls) in (5, 7, 8):  # Sandal, Sneaker, Bag
            (tmp_path / f"{i}.png").write_bytes(png_bytes(img))
            rows.append(f"{i}.png," + {5: "footwear/Sandal", 7: "footwear/Sneaker", 8: "Bag"}[int(cls)])
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    summary = ingest(f"csv:{tmp_path / 'labels.csv'}", data_dir=tmp_path / "data", taxonomy="paths")
    tree = load_taxonomy(tmp_path / "data")
    assert summary.classes == ("Bag", "Sandal", "Sneaker")
    assert tree is not None and tree.path("Sandal") == "footwear/Sandal" and tree.parent_of("Bag") == "Bag"


def test_bad_trees_are_config_errors_before_anything_is_written(tmp_path: Path) -> None:
    make_nested_folder(tmp_path / "src", per_class=2)
    (tmp_path / "src" / "summer" / "Sandal").mkdir(parents=True)  # Sandal under two parents
    shutil.copy(
        next((tmp_path / "src" / "footwear" / "Sandal").iterdir()), tmp_path / "src" / "summer" / "Sandal"
    )
    with pytest.raises(ConfigError, match="'Sandal' is under two parents"):
        ingest(f"imagefolder:{tmp_path / 'src'}", data_dir=tmp_path / "data", taxonomy="paths")
    assert not (tmp_path / "data" / "manifest.parquet").exists()


def test_bad_taxonomy_yaml_exits_2_naming_the_node(tmp_path: Path) -> None:
    classes = ["Bag", "Coat", "Trouser"]
    x, _ = fmnist_arrays("t10k", len(classes))
    for img, name in zip(x, classes, strict=True):
        (tmp_path / "src" / name).mkdir(parents=True)
        (tmp_path / "src" / name / "0.png").write_bytes(png_bytes(img))
    (tmp_path / "taxonomy.yaml").write_text("Bag: accessories\nCoat: tops\n")  # Trouser has no place
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"].update(
        source=f"imagefolder:{tmp_path / 'src'}", taxonomy=str(tmp_path / "taxonomy.yaml")
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_cli("ingest", cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "class 'Trouser' is not in the tree" in result.stderr
    assert not (tmp_path / "data" / "manifest.parquet").exists()


# ------------------------------------------------------------------------ serving paths


def test_predictor_serves_paths_parent_probabilities_and_backoff(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    tree = Taxonomy.fashion_mnist()
    ShippedTree(tree, "parent", 0.9).save(model_dir)
    predictor = Predictor.from_dir(model_dir)
    x, _ = fmnist_arrays("t10k", 40)
    scored = predictor.predict_scored([png_bytes(a) for a in x])
    fields = predictor.trust_fields(scored)
    probs = scored.probs
    for rec, p in zip(fields, probs, strict=True):
        leaf = tree.leaves[int(p.argmax())]
        assert rec["path"] == f"{tree.parent_of(leaf)}/{leaf}"
        under = [i for i, c in enumerate(tree.leaves) if tree.parent_of(c) == rec["parent"]]
        assert rec["parent_probability"] == pytest.approx(float(p[under].sum()), abs=1e-6)
        assert sum(rec["parent_probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        if p.max() >= 0.9:
            assert rec["answer"] == leaf
        else:  # a parent summing to >= 0.9, or nothing
            assert rec["answer"] is None or rec["parent_probabilities"][rec["answer"]] >= 0.9
    assert json.loads((model_dir / HIERARCHY_FILE).read_text())["backoff"] == "parent"
    served = predictions(predictor, [png_bytes(a) for a in x[:4]], top_k=3)  # imgflow serve's records
    assert [r["path"] for r in served] == [f["path"] for f in fields[:4]]
    assert all("answer" in r and "parent_probabilities" in r for r in served)


@pytest.mark.slow
def test_nested_folder_dataset_trains_with_soft_labels_and_serves_paths(tmp_path: Path) -> None:
    """The whole path through the real commands: nested folders -> ingest (paths) -> Ray training with
    ``loss: soft_labels`` -> evaluate (label-tree rows, back-off fitted on val, gates) -> the model
    folder plus evaluate's shipped files serves paths and back-off answers."""
    from tests.conftest import write_small_params

    make_nested_folder(tmp_path / "src", per_class=40)
    write_small_params(
        tmp_path, epochs=2, ingest={"source": f"imagefolder:{tmp_path / 'src'}", "taxonomy": "paths",
                                    "max_per_class": None},
        train={"loss": "soft_labels", "workers": 1}, serve={"backoff": "parent", "backoff_precision": 0.9},
        gates={"min_backoff_precision": 0.0, "max_crm_hdist_ratio": 10.0},
    )  # fmt: skip
    for command in ("ingest", "train", "evaluate"):
        result = run_cli(command, cwd=tmp_path, timeout=900)
        assert result.returncode in (0, 3), (
            f"{command}: {result.stderr[-2000:]}"
        )  # 3: a gate of the tiny model
    report = json.loads((tmp_path / "outputs" / "evaluate" / "report.json").read_text())
    tree_report = report["hierarchy"]
    assert [r["decoding"] for r in tree_report["rows"]] == ["argmax", "crm"]
    assert {g["name"] for g in report["gates"]} >= {"max_crm_hdist_ratio", "min_backoff_precision"}
    model_dir = Path(shutil.copytree(tmp_path / "outputs" / "train" / "model", tmp_path / "served"))
    shutil.copy(tmp_path / "outputs" / "evaluate" / "trust" / HIERARCHY_FILE, model_dir)
    predictor = Predictor.from_dir(model_dir)
    x, _ = fmnist_arrays("t10k", 8)
    fields = predictor.trust_fields(predictor.predict_scored([png_bytes(a) for a in x]))
    assert all(f["path"] in {"footwear/Sneaker", "footwear/Sandal", "tops/Shirt", "Bag"} for f in fields)
    assert all("answer" in f for f in fields)
