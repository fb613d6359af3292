"""Multi-label data and training pieces: ingestion (task detection, CSV split column), iterative
stratification, multi-hot targets, the multi-label losses, served label sets."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.core.config import TrainConfig
from components.core.errors import ConfigError, DataError
from components.data.composites import make_composites
from components.data.datasets import InMemoryDataset
from components.data.ingest import ingest
from components.data.manifest import DataPaths, DatasetInfo, read_manifest
from components.model.checkpoint import ModelSpec, Predictor, probabilities
from components.task import get_task
from components.task.splits import assign_multilabel_splits
from components.train.engine import count_correct
from components.train.imbalance import create_multilabel_loss
from tests.conftest import FMNIST_DIR, fmnist_arrays, png_bytes


@pytest.fixture(scope="module")
def composites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("composites")
    return make_composites(out, fashion_mnist_dir=FMNIST_DIR, per_split={"train": 300, "test": 100}, seed=1)


def test_composites_ingest_as_multilabel_with_official_test_split_and_stratified_val(
    composites: Path, tmp_path: Path
) -> None:
    summary = ingest(f"csv:{composites}", data_dir=tmp_path / "data")
    assert summary.task == "multilabel" and summary.task_detected
    assert summary.images["test"] == 100 and abs(summary.images["val"] - 30) <= 2
    assert summary.images["train"] + summary.images["val"] == 300
    manifest = read_manifest(DataPaths(tmp_path / "data").manifest)
    assert DatasetInfo.load(DataPaths(tmp_path / "data").dataset).task == "multilabel"
    test_rows = manifest[manifest["split"] == "test"]
    assert all("/test/" in p for p in test_rows["source_path"])  # the CSV's own test split is kept
    assert (manifest["labels"].map(len) == 2).sum() > 150  # label sets survive the round trip
    # every label reaches val, in proportion to its train count (iterative stratification)
    val = Counter(lab for labels in manifest[manifest["split"] == "val"]["labels"] for lab in labels)
    train = Counter(lab for labels in manifest[manifest["split"] == "train"]["labels"] for lab in labels)
    for label, n in train.items():
        assert abs(val[label] - n / 9) <= 2, (label, val[label], n)


def test_single_label_task_quarantines_label_sets_and_bad_splits_are_refused(tmp_path: Path) -> None:
    x, _ = fmnist_arrays(n=4)
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(x[i]))
    rows = [
        ("0.png", "Bag|Coat", ""),
        ("1.png", "Bag", "train"),
        ("2.png", "Coat", "tst"),
        ("3.png", "Coat", ""),
    ]
    with (tmp_path / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("path", "labels", "split"), *rows])
    summary = ingest(f"csv:{tmp_path / 'labels.csv'}", data_dir=tmp_path / "data", task="singlelabel")
    assert summary.task == "singlelabel" and not summary.task_detected
    assert summary.reasons == {"bad_split": 1, "multiple_labels": 1}
    quarantine = (tmp_path / "data" / "quarantine.csv").read_text()
    assert "set ingest.task: multilabel" in quarantine and "'tst'" in quarantine


def test_iterative_stratification_is_order_independent_and_balanced_per_label() -> None:
    rng = np.random.default_rng(0)
    classes = list("abcdefgh")
    ids = [f"img{i}" for i in range(800)]
    sets = [list(rng.choice(classes, size=rng.integers(1, 3), replace=False)) for _ in ids]
    got = assign_multilabel_splits(ids, sets, val_fraction=0.1, test_fraction=0.2, seed=3)
    perm = rng.permutation(len(ids))
    again = assign_multilabel_splits([ids[i] for i in perm], [sets[i] for i in perm],
                                     val_fraction=0.1, test_fraction=0.2, seed=3)  # fmt: skip
    assert [again[k] for k in np.argsort(perm)] == got
    for label in classes:
        per_split = Counter(s for s, labels in zip(got, sets, strict=True) if label in labels)
        total = sum(per_split.values())
        assert abs(per_split["test"] - 0.2 * total) <= 2 and abs(per_split["val"] - 0.1 * total) <= 2
    with pytest.raises(ValueError, match="unique"):
        assign_multilabel_splits(["a", "a"], [["x"], ["y"]], val_fraction=0.1, test_fraction=0.1, seed=0)


def test_multi_hot_targets_flow_through_the_in_memory_dataset() -> None:
    y = get_task("multilabel").encode([["b"], ["a", "c"], []], ["a", "b", "c"])
    assert y.tolist() == [[0, 1, 0], [1, 0, 1], [0, 0, 0]]
    with pytest.raises(DataError, match="not in the class list"):
        get_task("multilabel").encode([["z"]], ["a"])
    ds = InMemoryDataset(np.zeros((3, 1, 4, 4), np.uint8), y, mean=[0.5], std=[0.5])
    _, targets = ds.__getitems__([1, 2])
    assert targets.dtype == torch.float32 and targets.tolist() == [[1, 0, 1], [0, 0, 0]]


def test_multilabel_losses_are_bce_focal_and_asl_with_positive_weights() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), (torch.rand(16, 5) > 0.7).float()
    positives, total = y.sum(0).tolist(), 16
    assert torch.allclose(
        create_multilabel_loss("ce", positives, total)(x, y), F.binary_cross_entropy_with_logits(x, y)
    )
    pw = (total - y.sum(0).clamp(min=1)).clamp(min=1) / y.sum(0).clamp(min=1)
    weighted = create_multilabel_loss("ce", positives, total, weight_scheme="inverse")(x, y)
    assert torch.allclose(weighted, F.binary_cross_entropy_with_logits(x, y, pos_weight=pw))
    # focusing down-weights easy examples: focal and ASL are below plain BCE
    bce = float(F.binary_cross_entropy_with_logits(x, y))
    assert float(create_multilabel_loss("focal", positives, total)(x, y)) < bce
    assert float(create_multilabel_loss("asymmetric", positives, total)(x, y)) < bce
    with pytest.raises(ValueError, match="not for multi-label"):
        create_multilabel_loss("logit_adjusted", positives, total)


def test_single_label_only_options_are_refused_for_multilabel_data_and_vice_versa() -> None:
    get_task("multilabel").check_train_options(TrainConfig(loss="asymmetric", class_weights="inverse"))
    for bad in ({"loss": "logit_adjusted"}, {"sampler": "balanced"}, {"mixup": 0.2}):
        with pytest.raises(ConfigError, match="single-label only"):
            get_task("multilabel").check_train_options(TrainConfig(**bad))
    with pytest.raises(ConfigError, match="for multi-label datasets"):
        get_task("singlelabel").check_train_options(TrainConfig(loss="asymmetric"))


def test_subset_accuracy_counts_whole_label_sets() -> None:
    logits = torch.tensor([[2.0, -1.0, 3.0], [2.0, 1.0, -3.0]])
    y = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert count_correct(logits, y) == 1  # the second row predicts an extra label
    assert count_correct(logits, torch.tensor([2, 0])) == 2


def test_predictor_returns_label_sets_at_the_tuned_thresholds() -> None:
    spec = ModelSpec("imgflow_cnn", ("a", "b", "c"), 1, {"input_size": (1, 28, 28)}, task="multilabel",
                     thresholds=(0.5, 0.9, 0.2))  # fmt: skip
    probs = probabilities(torch.tensor([[0.1, 2.0, -1.0], [3.0, 2.5, -3.0]]), spec).numpy()
    assert np.allclose(probs, torch.sigmoid(torch.tensor([[0.1, 2.0, -1.0], [3.0, 2.5, -3.0]])).numpy())
    predictor = Predictor.__new__(Predictor)
    predictor.spec = spec
    # row 0: a 0.52 >= 0.5, b 0.88 < 0.9, c 0.27 >= 0.2 -> {a, c}, ordered by probability
    assert predictor.label_sets(probs) == [["a", "c"], ["a", "b"]]
    single = ModelSpec("imgflow_cnn", ("a", "b"), 1, {"input_size": (1, 28, 28)}, temperature=2.0)
    p = probabilities(torch.tensor([[0.0, 2.0]]), single)
    assert torch.allclose(p, torch.softmax(torch.tensor([[0.0, 1.0]]), dim=1))
