"""The label-efficiency report on tiny real data: every (method, fraction, subset) row, seeded subsets,
the MLflow run, and the gate-report section."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from components.core.config import load_params
from components.core.errors import ConfigError
from components.core.jsonio import write_json
from components.evaluate.label_efficiency import (
    METHODS,
    PROBE_CLASSIFIERS,
    EvalSettings,
    _cv_choice,
    auto_layers,
    choose_probe_C,
    grid_features,
    labelled_subset,
    probe_columns,
    probe_features,
    probe_fit,
    report_section,
)
from components.model.features import readable_stages
from components.model.models import create_classifier
from components.pipeline.pretraining import run_label_efficiency
from components.pipeline.stages import run_ingest
from components.train.ssl import SimCLRNetwork, SSLRecipe, save_backbone
from components.train.ssl_augment import ViewAugment
from tests.conftest import write_small_params


def test_subsets_are_stratified_seeded_and_distinct() -> None:
    labels = np.repeat(np.arange(10), 50)
    a = labelled_subset(labels, 0.1, seed=0, subset=0)
    assert np.array_equal(a, labelled_subset(labels, 0.1, seed=0, subset=0))
    assert not np.array_equal(a, labelled_subset(labels, 0.1, seed=0, subset=1))
    assert np.bincount(labels[a]).tolist() == [5] * 10
    assert len(labelled_subset(labels, 0.001, seed=0, subset=0)) == 10  # at least one per class
    assert np.array_equal(labelled_subset(labels, 1.0, seed=0, subset=2), np.arange(500))


def _fake_pretraining(root: Path, images_file: Path) -> None:
    """A backbone folder as `imgflow pretrain` leaves it (random weights: the report's plumbing is under
    test here, not SimCLR) and its pretrain.json."""
    net = SimCLRNetwork(create_classifier("imgflow_cnn", 0, in_chans=1), hidden=8, out=4)
    aug = ViewAugment((0.35, 1.0), 0.5, 0.4, 0.4, 0.05, 0.0, (0.5,), (0.5,))
    recipe = SSLRecipe(
        "simclr", "imgflow_cnn", 1, images_file, "0" * 16, 1, 8, 1e-3, 0.0, 0, 0.2, 8, 4, aug, False, 0
    )
    folder = save_backbone(net, recipe, root / "outputs" / "pretrain" / "backbone", history=[])
    write_json(
        root / "outputs" / "pretrain" / "pretrain.json", {"backbone_dir": str(folder), "run_id": "local"}
    )


def test_report_on_tiny_data_has_every_row(tmp_path: Path) -> None:
    overrides = [
        f"project.data_dir={tmp_path / 'data'}", f"project.output_dir={tmp_path / 'outputs'}",
        f"project.state_dir={tmp_path / '.imgflow'}", "train.recipe=manual", "train.model=imgflow_cnn",
        "train.batch_size=16",
    ]  # fmt: skip
    params = load_params(write_small_params(tmp_path, max_per_class=6), overrides)
    run_ingest(params, progress=False)
    images_file = tmp_path / "images.npy"
    np.save(images_file, np.zeros((4, 1, 28, 28), dtype=np.uint8))
    _fake_pretraining(tmp_path, images_file)
    settings = EvalSettings(subsets=2, scratch_steps=2, scratch_max_epochs=1, probe_max_iter=100)
    record = run_label_efficiency(params, settings=settings)

    report = json.loads(record.json_path.read_text())
    keys = {(r["method"], r["fraction"], r["subset"]) for r in report["rows"]}
    expected = {(m, f, s) for m in METHODS for f in (0.01, 0.1) for s in (0, 1)} | {
        (m, 1.0, 0) for m in METHODS
    }
    assert keys == expected and len(report["rows"]) == len(expected)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in report["rows"])
    assert min(r["labels"] for r in report["rows"]) >= 10  # one image per class at least
    assert report["settings"]["scratch_steps"] == 2 and report["settings"]["grid"] == 3
    assert report["settings"]["probe_layers"] == "auto" and report["settings"]["probe_C"] is None
    assert report["settings"]["probe_classifier"] == "auto"
    backbones = {r["probe_layers"] for r in report["rows"] if r["method"] in ("ssl_probe", "random_init")}
    assert backbones <= {"last+prev", "last3"} and backbones  # each fit's choice is in its row
    assert {r["probe_layers"] for r in report["rows"] if r["method"] not in ("ssl_probe", "random_init")} == {
        None
    }
    assert report["settings"]["mirror"] is True  # None resolved from the recipe (train.hflip 0.5)
    grid = set(settings.probe_C_grid) | {settings.probe_C_fallback}
    trained = ("scratch", "ssl_finetune")  # the recipe's runs: no probe
    probes = [r for r in report["rows"] if r["method"] not in trained]
    assert all(
        r["probe_C"] is None and r["probe_classifier"] is None for r in report["rows"] if r not in probes
    )
    assert {r["probe_classifier"] for r in probes} <= set(PROBE_CLASSIFIERS)  # auto's choice, in each row
    assert all((r["probe_C"] is None) == (r["probe_classifier"] == "lda") for r in probes)
    assert {r["probe_C"] for r in probes} - {None} <= grid
    assert set(report["summary"]) == set(METHODS) and "ssl_vs_scratch_1%_pt" in report["gains"]
    assert "ssl_finetune_vs_scratch_1%_pt" in report["gains"]
    assert record.gate_report is None  # no `imgflow evaluate` report to add a section to
    assert "| ssl_probe |" in record.markdown_path.read_text()
    section = report_section(report)
    assert section is not None

    from mlflow import MlflowClient

    run = MlflowClient().get_run(record.run_id)
    assert run.data.tags["imgflow.kind"] == "label-efficiency"
    assert run.data.params["eval.probe_C"] == str(settings.probe_C)
    assert "ssl_probe_1pct_accuracy" in run.data.metrics


def test_report_section_absent_without_data() -> None:
    assert report_section(None) is None


@pytest.mark.parametrize("fraction", [0.01, 0.1])
def test_subset_sizes_follow_the_fraction(fraction: float) -> None:
    labels = np.repeat(np.arange(10), 1000)
    assert len(labelled_subset(labels, fraction, seed=1, subset=0)) == round(10000 * fraction)


def test_probe_reads_the_last_stage_then_the_one_before() -> None:
    """``last+prev``: the last stage's 3x3-pooled map (the ``last`` columns, unchanged) followed by the
    previous stage's, on imgflow_cnn (64 + 32 channels x 9 cells); an unknown choice is a ConfigError."""
    net = create_classifier("imgflow_cnn", 0, in_chans=1)
    images = np.random.default_rng(0).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    kw = {"mean": (0.5,), "std": (0.5,), "grid": 3, "batch_size": 2}
    last = grid_features(net, images, layers="last", **kw)
    both = grid_features(net, images, layers="last+prev", **kw)
    assert last.shape == (5, 64 * 9) and both.shape == (5, (64 + 32) * 9)
    np.testing.assert_allclose(both[:, : 64 * 9], last, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="probe_layers"):
        grid_features(net, images, layers="prev", **kw)


def test_last3_adds_the_stage_before_and_auto_chooses_columns_by_cv() -> None:
    """``last3``: ``last+prev``'s columns (unchanged), then the stage before them (imgflow_cnn's first:
    16 channels x 9 cells), from one pass. ``auto`` reads the ``last3`` columns of each view and names
    ``last+prev``'s inside them; the CV then picks a choice, and fitting on it is fitting on those
    columns alone."""
    net = create_classifier("imgflow_cnn", 0, in_chans=1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 1, 28, 28), dtype=np.uint8)
    kw = {"mean": (0.5,), "std": (0.5,), "grid": 3, "batch_size": 16}
    two = grid_features(net, images, layers="last+prev", **kw)
    three = grid_features(net, images, layers="last3", **kw)
    assert three.shape == (40, (64 + 32 + 16) * 9)
    np.testing.assert_allclose(three[:, : two.shape[1]], two, rtol=1e-5, atol=1e-6)

    auto = EvalSettings(probe_layers="auto", mirror=True, probe_cv_folds=2, probe_max_iter=50)
    feats = probe_features(net, images, settings=auto, mean=(0.5,), std=(0.5,))
    columns = probe_columns(net, images[:1], settings=auto, mean=(0.5,), std=(0.5,))
    assert columns is not None and set(columns) == {"last+prev", "last3"}
    width = three.shape[1]
    assert feats.shape == (40, 2 * width) and len(columns["last3"]) == 2 * width
    mirror_two = grid_features(net, images[..., ::-1].copy(), layers="last+prev", **kw)
    np.testing.assert_allclose(
        feats[:, columns["last+prev"]], np.hstack([two, mirror_two]), rtol=1e-5, atol=1e-6
    )
    assert probe_columns(None, images[:1], settings=auto, mean=(0.5,), std=(0.5,)) is None
    fixed = EvalSettings(probe_layers="last+prev", mirror=True)
    assert probe_columns(net, images[:1], settings=fixed, mean=(0.5,), std=(0.5,)) is None

    labels = np.repeat(np.arange(2), 20)
    fit = probe_fit(feats, labels, feats, labels, settings=auto, columns=columns)
    assert fit.layers in columns
    alone = probe_fit(feats[:, columns[fit.layers]], labels, feats[:, columns[fit.layers]], labels,
                      settings=dataclasses.replace(auto, probe_C=fit.C, probe_classifier=fit.classifier))  # fmt: skip
    assert alone.layers is None and alone.accuracy == fit.accuracy


class _OneMap(nn.Module):
    """A backbone with one feature map and no stages to read before it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _TwoStages(nn.Module):
    """A backbone with two stages: ``last+prev`` is the most it can read."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, stride=2, padding=1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)


def test_auto_layers_fit_the_stages_a_backbone_has() -> None:
    """``probe_layers: auto`` on any backbone: the choices it has the stages for (imgflow's nets and timm's
    both; two stages: ``last+prev``; one map: ``last``), each fit naming the one it read. A fixed choice
    the backbone cannot give stays a ConfigError."""
    import timm

    assert auto_layers(create_classifier("imgflow_cnn", 0, in_chans=1)) == ("last+prev", "last3")
    assert readable_stages(timm.create_model("resnet10t", pretrained=False, num_classes=0)) >= 3
    assert auto_layers(_TwoStages()) == ("last+prev",) and auto_layers(_OneMap()) == ("last",)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 1, 12, 12), dtype=np.uint8)
    labels = np.repeat(np.arange(2), 12)
    auto = EvalSettings(probe_layers="auto", mirror=True, probe_cv_folds=2, probe_max_iter=50)
    kw = {"settings": auto, "mean": (0.5,), "std": (0.5,)}
    for net, read, width in ((_TwoStages(), "last+prev", (8 + 4) * 9), (_OneMap(), "last", 8 * 9)):
        feats = probe_features(net, images, **kw)
        columns = probe_columns(net, images[:1], **kw)
        assert feats.shape == (24, 2 * width) and columns is not None and list(columns) == [read]
        assert probe_fit(feats, labels, feats, labels, settings=auto, columns=columns).layers == read
    with pytest.raises(ConfigError, match="no forward_intermediates"):
        grid_features(_OneMap(), images, mean=(0.5,), std=(0.5,), grid=3, batch_size=8, layers="last+prev")


def test_mirror_probe_reads_the_image_then_its_mirror() -> None:
    """``mirror``: the plain features, then the mirror images' (for pixels: the flipped pixels); off: the
    plain features alone."""
    net = create_classifier("imgflow_cnn", 0, in_chans=1)
    images = np.random.default_rng(0).integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    kw = {"mean": (0.5,), "std": (0.5,)}
    on, off = (
        EvalSettings(mirror=True, feature_batch_size=3),
        EvalSettings(mirror=False, feature_batch_size=3),
    )
    plain = probe_features(net, images, settings=off, **kw)
    both = probe_features(net, images, settings=on, **kw)
    mirrored = probe_features(net, images[..., ::-1].copy(), settings=off, **kw)
    assert both.shape == (4, 2 * plain.shape[1])
    np.testing.assert_allclose(both, np.concatenate([plain, mirrored], axis=1), rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain, mirrored)  # the mirror's features are new columns, not a copy
    pixels = probe_features(None, images, settings=on, **kw)
    assert np.array_equal(
        pixels, np.concatenate([images.reshape(4, -1), images[..., ::-1].reshape(4, -1)], 1)
    )


def test_probe_C_is_chosen_inside_the_labelled_rows() -> None:
    """C by k-fold CV over the grid (deterministic, a grid value); a fixed probe_C is used as given;
    a class with one image cannot be cross-validated: the fallback."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = rng.normal(size=(60, 8)) + y[:, None] * 0.5
    settings = EvalSettings(probe_C_grid=(0.01, 0.1, 1.0), probe_max_iter=100)
    chosen = choose_probe_C(x, y, settings=settings)
    assert chosen in settings.probe_C_grid and chosen == choose_probe_C(x, y, settings=settings)
    assert choose_probe_C(x, y, settings=EvalSettings(probe_C=2.0)) == 2.0
    assert choose_probe_C(x[[0, 20, 40]], y[[0, 20, 40]], settings=settings) == settings.probe_C_fallback


def test_probe_classifier_auto_is_the_best_cv_score_of_the_fixed_ones() -> None:
    """``auto`` scores logistic (over the C grid), shrinkage LDA and their average on the same folds and
    takes the best (ties: that order); LDA's score is sklearn's own cross-validation on those folds;
    fitting the fixed choice gives auto's accuracy; a fixed classifier is used as given; an unknown one
    is a ConfigError."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 15)
    mix = rng.normal(size=(30, 30))  # correlated features shared by the classes: LDA's own model
    x = (rng.normal(size=(60, 30)) + 0.6 * rng.normal(size=(4, 30))[y]) @ mix
    auto = EvalSettings(probe_C_grid=(0.01, 0.1, 1.0), probe_max_iter=200)
    choices = {
        k: _cv_choice(x, y, dataclasses.replace(auto, probe_classifier=k), score=True)
        for k in PROBE_CLASSIFIERS
    }
    chosen = _cv_choice(x, y, auto)
    assert chosen.score == max(c.score for c in choices.values())
    first_best = next(k for k in PROBE_CLASSIFIERS if choices[k].score == chosen.score)
    assert (chosen.classifier, chosen.C) == (first_best, choices[first_best].C)
    folds = StratifiedKFold(auto.probe_cv_folds, shuffle=True, random_state=auto.seed)
    lda = cross_val_score(LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"), x, y, cv=folds)
    assert choices["lda"].score == pytest.approx(lda.mean()) and choices["lda"].C is None
    assert all(choices[k].C in auto.probe_C_grid for k in ("logistic", "logistic+lda"))

    fit = probe_fit(x[::2], y[::2], x[1::2], y[1::2], settings=auto)
    fixed = dataclasses.replace(auto, probe_classifier=fit.classifier, probe_C=fit.C)
    assert fit.classifier in PROBE_CLASSIFIERS
    assert probe_fit(x[::2], y[::2], x[1::2], y[1::2], settings=fixed).accuracy == fit.accuracy
    lda_fit = probe_fit(x[::2], y[::2], x[1::2], y[1::2], settings=EvalSettings(probe_classifier="lda"))
    assert (lda_fit.classifier, lda_fit.C) == ("lda", None)
    with pytest.raises(ConfigError, match="probe_classifier"):
        probe_fit(x, y, x, y, settings=EvalSettings(probe_classifier="svm"))


def test_scratch_arm_trains_with_the_recipes_augmentation_and_progressive_resizing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``scratch`` is imgflow's recipe itself: ``train.augment`` is attached to its split and the
    epochs follow ``train.progressive_resize`` (the model sees half-size batches first, full size last)."""
    import torch

    from components.core.config import TrainConfig
    from components.data.manifest import DataPaths
    from components.evaluate.label_efficiency import Split, recipe_scratch_trainer
    from components.train import augment
    from components.train.recipe import build_recipe
    from tests.conftest import fmnist_arrays

    params = load_params(
        write_small_params(tmp_path, max_per_class=3), [f"project.data_dir={tmp_path / 'data'}"]
    )
    run_ingest(params, progress=False)
    cfg = TrainConfig(recipe="manual", model="imgflow_cnn", batch_size=16, augment="trivialaugment",
                      progressive_resize=0.5, progressive_until=0.5)  # fmt: skip
    recipe = build_recipe(cfg, DataPaths(tmp_path / "data"), seed=0, weights_dir=tmp_path / "weights")
    attached: list[str] = []
    real_attach = augment.attach
    monkeypatch.setattr(
        augment, "attach", lambda ds, kind, **kw: attached.append(kind) or real_attach(ds, kind, **kw)
    )
    sides: list[int] = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: (
            sides.append(args[0].shape[-1]) if type(m).__name__ == "SmallCNN" and m.training else None
        )
    )
    try:
        x, y = fmnist_arrays("train", 32)
        xt, yt = fmnist_arrays("t10k", 20)
        split = Split(x[:, None], y.astype(np.int64))
        accuracy = recipe_scratch_trainer(recipe)(split, Split(xt[:, None], yt.astype(np.int64)), 4)
    finally:
        hook.remove()
    assert 0.0 <= accuracy <= 1.0 and attached == ["trivialaugment"]
    assert sides[0] == 14 and sides[-1] == 28 and sides == sorted(sides)  # 2 batches per epoch, 4 epochs
