"""audit.action=exclude: the worst train-split suspects are written out and left out of training."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from components.core.config import AuditConfig, TrainConfig, load_params
from components.data.manifest import DataPaths, read_exclusions, read_manifest
from components.pipeline.stages import run_ingest
from components.quality.label_quality import write_exclusions
from components.train.recipe import build_recipe
from components.train.torch_recipe import build_loaders
from tests.conftest import write_small_params


def _issues() -> pd.DataFrame:
    rows = [
        ("a", "label_error", "train", 0.30), ("b", "label_error", "train", 0.01), ("c", "label_error", "test", 0.0),
        ("d", "label_error", "train", 0.20), ("e", "outlier", "train", 9.0),
    ]  # fmt: skip
    df = pd.DataFrame(rows, columns=["image_id", "issue", "split", "score"])
    return df.assign(label="x", suggested_label="y", path="p", rank=1, group="")


def test_exclusions_are_worst_train_suspects_capped(tmp_path: Path) -> None:
    manifest = pd.DataFrame({"split": ["train"] * 40 + ["test"] * 10})
    n = write_exclusions(
        _issues(), manifest, AuditConfig(action="exclude", max_issue_rate=0.05), tmp_path / "x.csv"
    )
    assert n == 2 and read_exclusions(tmp_path / "x.csv") == {"b", "d"}  # 5% of 40 train rows, lowest quality
    n = write_exclusions(_issues(), manifest, AuditConfig(action="report"), tmp_path / "y.csv")
    assert n == 0 and read_exclusions(tmp_path / "y.csv") == set()


def test_training_loader_leaves_excluded_images_out(tmp_path: Path) -> None:
    write_small_params(tmp_path, max_per_class=5)
    params = load_params(tmp_path / "params.yaml", [f"project.data_dir={tmp_path / 'data'}"])
    run_ingest(params, progress=False)
    data = DataPaths(tmp_path / "data")
    train_ids = read_manifest(data.manifest).query("split == 'train'")["image_id"].tolist()
    pd.DataFrame({"image_id": train_ids[:3]}).to_csv(tmp_path / "excluded.csv", index=False)
    recipe = build_recipe(
        TrainConfig(), data, seed=0, weights_dir=tmp_path, exclude_file=tmp_path / "excluded.csv"
    )
    data_config = {"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,), "crop_pct": 1.0}
    train_loader, val_loader = build_loaders(recipe, data_config)
    assert len(train_loader.dataset) == len(train_ids) - 3
    kept = {p.name.split(".")[0] for p in train_loader.dataset.paths}
    assert kept.isdisjoint(train_ids[:3])
