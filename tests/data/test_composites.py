"""The multi-label composite dataset is made of real Fashion-MNIST items and ingests as CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from components.data.composites import make_composites
from components.data.sources import csv_items

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def test_composites_hold_real_items_with_all_labels(tmp_path: Path) -> None:
    csv_path = make_composites(
        tmp_path, fashion_mnist_dir=FMNIST, per_split={"train": 20, "test": 10}, seed=3
    )
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 30 and {r["split"] for r in rows} == {"train", "test"}
    sizes = [len(r["labels"].split("|")) for r in rows]
    assert set(sizes) <= {1, 2} and 2 in sizes
    for r in rows:
        labels = r["labels"].split("|")
        assert len(set(labels)) == len(labels)  # two items of a canvas are distinct classes
        img = np.asarray(Image.open(tmp_path / r["path"]))
        assert img.shape == (56, 56) and img.max() > 100  # a real item is on it
        ink = np.flatnonzero(img.sum(axis=0))
        if len(labels) == 2:  # one item per half
            assert img[:, :32].sum() > 0 and img[:, 32:].sum() > 0
        else:  # one 28-px item somewhere on the canvas
            assert ink[-1] - ink[0] < 28
    again = make_composites(
        tmp_path / "b", fashion_mnist_dir=FMNIST, per_split={"train": 20, "test": 10}, seed=3
    )
    assert again.read_text() == csv_path.read_text()  # deterministic
    classes, items = csv_items(csv_path)
    assert len(items) == 30 and all(item.problem is None for item in items)
    assert any(len(item.labels) == 2 for item in items) and set(classes) <= {
        lab for r in rows for lab in r["labels"].split("|")
    }
