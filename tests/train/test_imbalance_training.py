"""Imbalance options wired into training: the balanced sampler, class-weighted / focal / logit-adjusted
losses, and the config rules that combine them (real Fashion-MNIST images, no Ray)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from components.core.config import TrainConfig, load_params
from components.data.datasets import batch_collate
from components.data.manifest import DataPaths, read_manifest, write_manifest
from components.model.checkpoint import load_classifier
from components.pipeline.stages import run_ingest
from components.train.engine import StepOptions, predict_logits
from components.train.imbalance import BalancedDistributedSampler, FocalLoss, LogitAdjustedLoss
from components.train.ray_adapter import init_ray, shutdown_ray
from components.train.recipe import TrainRecipe, build_recipe
from components.train.torch_recipe import build_loaders, build_train_loss, split_dataset, train_targets
from components.train.training import fit
from tests.conftest import write_small_params

DATA_CONFIG = {"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,), "crop_pct": 1.0}
MINORITY = "Shirt"


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> DataPaths:
    """20 train images per class, except the minority class: 2 (an artificially imbalanced subset)."""
    root = tmp_path_factory.mktemp("imbalanced")
    write_small_params(root, max_per_class=22)
    run_ingest(load_params(root / "params.yaml", [f"project.data_dir={root / 'data'}"]), progress=False)
    data = DataPaths(root / "data")
    m = read_manifest(data.manifest)
    minority_train = m.index[(m["split"] == "train") & (m["label"] == MINORITY)]
    write_manifest(m.drop(minority_train[2:]), data.manifest)
    return data


def _loaders(data: DataPaths, tmp_path: Path, **train: object):
    recipe = build_recipe(TrainConfig(**train), data, seed=0, weights_dir=tmp_path)
    return recipe, *build_loaders(recipe, DATA_CONFIG)


def test_balanced_sampler_draws_the_minority_as_often_as_the_others(
    imbalanced: DataPaths, tmp_path: Path
) -> None:
    recipe, plain, _ = _loaders(imbalanced, tmp_path)
    recipe, balanced, _ = _loaders(imbalanced, tmp_path, sampler="balanced")
    assert isinstance(balanced.sampler, BalancedDistributedSampler)
    classes = recipe.classes
    targets = train_targets(balanced.dataset)
    k = len(classes)
    minority = classes.index(MINORITY)
    assert Counter(targets)[minority] == 2 and len(targets) > 20 * (k - 1)
    draws = Counter(targets[i] for epoch in range(5) for i in _epoch(balanced.sampler, epoch))
    share = draws[minority] / sum(draws.values())
    assert 0.5 / k < share < 1.5 / k  # ~1/k instead of 2/len
    plain_draws = Counter(int(y) for _, yb in plain for y in yb)
    assert plain_draws[minority] == 2  # the default sampler: one pass over the data


def _epoch(sampler: BalancedDistributedSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_loss_options_get_the_train_split_class_counts(imbalanced: DataPaths, tmp_path: Path) -> None:
    opts = StepOptions()
    recipe, train, _ = _loaders(imbalanced, tmp_path, class_weights="inverse")
    targets = train_targets(train.dataset)
    minority = recipe.classes.index(MINORITY)
    loss = build_train_loss(recipe, opts, targets)
    assert isinstance(loss, torch.nn.CrossEntropyLoss) and loss.weight is not None
    assert loss.weight[minority] == loss.weight.max() and loss.weight[minority] > 5 * loss.weight.min()
    recipe, *_ = _loaders(imbalanced, tmp_path, loss="focal", focal_gamma=1.5)
    focal = build_train_loss(recipe, opts, targets)
    assert isinstance(focal, FocalLoss) and focal.gamma == 1.5
    recipe, *_ = _loaders(imbalanced, tmp_path, loss="logit_adjusted")
    adjusted = build_train_loss(recipe, opts, targets)
    assert isinstance(adjusted, LogitAdjustedLoss)
    assert adjusted.offset.argmin() == minority  # the rarest class gets the most negative log-prior
    plain = build_train_loss(_loaders(imbalanced, tmp_path)[0], opts, targets)
    assert isinstance(plain, torch.nn.CrossEntropyLoss) and plain.weight is None


@pytest.mark.parametrize(
    "train",
    [{"loss": "logit_adjusted", "class_weights": "inverse"}, {"loss": "logit_adjusted", "sampler": "balanced"},
     {"mixup": 0.2, "loss": "focal"}, {"cutmix": 1.0, "class_weights": "sqrt_inverse"}],
)  # fmt: skip
def test_imbalance_options_that_double_correct_are_refused(train: dict) -> None:
    with pytest.raises(ValueError, match="train"):
        TrainConfig(**train)


def _test_recalls(model_dir: Path, recipe: TrainRecipe, data: DataPaths) -> np.ndarray:
    """Per-class recall of a trained model on the (balanced) test split."""
    model, spec = load_classifier(model_dir)
    test = split_dataset(read_manifest(data.manifest), "test", recipe, spec.data_config, train=False)
    loader = DataLoader(test, batch_size=256, collate_fn=batch_collate)
    with torch.inference_mode():
        logits, y = predict_logits(model, loader, device=torch.device("cpu"))
    pred = logits.argmax(1)
    return np.array([(pred[y == k] == k).mean() for k in range(len(recipe.classes))])


@pytest.mark.slow
def test_balanced_sampler_improves_minority_recall_in_real_training(tmp_path: Path) -> None:
    """The must-show: one class at 5% of its share in train; the balanced sampler raises its test
    recall. Both runs go through Ray Train on the same data, seed and steps per epoch."""
    write_small_params(tmp_path, max_per_class=160)
    run_ingest(
        load_params(tmp_path / "params.yaml", [f"project.data_dir={tmp_path / 'data'}"]), progress=False
    )
    data = DataPaths(tmp_path / "data")
    m = read_manifest(data.manifest)
    minority_train = m.index[(m["split"] == "train") & (m["label"] == MINORITY)]
    keep = max(2, round(0.05 * len(minority_train)))
    write_manifest(m.drop(minority_train[keep:]), data.manifest)
    started = init_ray(num_cpus=2)
    recalls = {}
    try:
        for sampler in ("random", "balanced"):
            cfg = TrainConfig(epochs=6, batch_size=64, workers=1, cpus_per_worker=2, sampler=sampler)
            recipe = build_recipe(cfg, data, seed=0, weights_dir=tmp_path / "weights")
            fit(recipe, workers=1, cpus_per_worker=2, use_gpu=False, storage_path=tmp_path / "ray",
                run_name=f"imb-{sampler}", out_dir=tmp_path / sampler, show_progress=False)  # fmt: skip
            recalls[sampler] = _test_recalls(tmp_path / sampler, recipe, data)
    finally:
        if started:
            shutdown_ray()
    k = recipe.classes.index(MINORITY)
    print({s: {"minority_recall": r[k], "balanced_accuracy": r.mean()} for s, r in recalls.items()})
    assert recalls["balanced"][k] > recalls["random"][k] + 0.1
    assert 0.1 < recalls["random"].mean() < 1 and 0.1 < recalls["balanced"].mean() < 1  # both really trained
