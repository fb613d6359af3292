"""Ensembles as one model folder: loaded by ``Predictor.from_dir``, probabilities averaged exactly,
one ONNX graph with parity, served through the MLflow pyfunc; ``train.ensemble`` validation."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from components.core.config import TrainConfig, load_params
from components.core.errors import ConfigError, DataError
from components.core.jsonio import write_json
from components.model.checkpoint import Predictor, load_classifier, load_spec, with_temperature
from components.model.ensemble import Ensemble, ensemble_summary, is_ensemble_dir, save_ensemble
from components.model.features import base_model
from tests.conftest import fmnist_arrays, png_bytes, train_tiny_model


@pytest.fixture(scope="module")
def members(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real members: the session's tiny model and one more, cheaper (another seed and subset)."""
    second = train_tiny_model(tmp_path_factory.mktemp("member") / "model", n=600, epochs=1, seed=1)
    return [tiny_model_dir, second]


@pytest.fixture(scope="module")
def ensemble_dir(members: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ensemble") / "model"
    return save_ensemble(members, out, labels=["seed 0", "seed 1"], infos=[{"seed": 0}, {"seed": 1}])


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    x, _ = fmnist_arrays("t10k", 24)
    return [png_bytes(a) for a in x]


def test_ensemble_dir_loads_and_averages_member_probabilities_exactly(
    members: list[Path], ensemble_dir: Path, images: list[bytes]
) -> None:
    assert is_ensemble_dir(ensemble_dir) and not is_ensemble_dir(members[0])
    predictor = Predictor.from_dir(ensemble_dir)
    assert isinstance(predictor.model, Ensemble) and len(predictor.model.members) == 2
    each = [Predictor.from_dir(m).predict_proba(images) for m in members]
    got = predictor.predict_proba(images)
    np.testing.assert_allclose(got, np.mean(each, axis=0), atol=1e-6)
    assert not np.allclose(each[0], each[1], atol=1e-3)  # two different members, not one twice
    spec = load_spec(ensemble_dir)
    assert spec.model == "ensemble[2x imgflow_cnn]" and spec.temperature == 1.0
    assert [m["label"] for m in ensemble_summary(ensemble_dir)["members"]] == ["seed 0", "seed 1"]


def test_temperature_applies_after_combining(ensemble_dir: Path, images: list[bytes], tmp_path: Path) -> None:
    hot = Path(shutil.copytree(ensemble_dir, tmp_path / "hot"))
    with_temperature(hot, 2.0)
    mean = Predictor.from_dir(ensemble_dir).predict_proba(images)
    scaled = np.log(mean) / 2.0
    expected = np.exp(scaled - scaled.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(Predictor.from_dir(hot).predict_proba(images), expected, atol=1e-5)


def test_feature_readers_use_the_first_member(ensemble_dir: Path, members: list[Path]) -> None:
    ensemble, _ = load_classifier(ensemble_dir)
    first, _ = load_classifier(members[0])
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(base_model(ensemble).forward_features(x), first.forward_features(x))


def test_incompatible_members_are_rejected(members: list[Path], tmp_path: Path) -> None:
    other = Path(shutil.copytree(members[1], tmp_path / "other"))
    spec = load_spec(other)
    write_json(other / "model.json", replace(spec, classes=tuple(reversed(spec.classes))).to_dict())
    with pytest.raises(DataError, match="other classes"):
        save_ensemble([members[0], other], tmp_path / "bad")
    with pytest.raises(DataError, match="at least 2 members"):
        save_ensemble([members[0]], tmp_path / "one")


def test_ensemble_exports_one_onnx_graph_with_parity(
    ensemble_dir: Path, images: list[bytes], tmp_path: Path
) -> None:
    from components.model.export import check_parity, export_onnx, onnx_probabilities, onnx_session

    predictor = Predictor.from_dir(ensemble_dir)
    path = export_onnx(predictor, tmp_path / "ensemble.onnx")
    parity = check_parity(predictor, path, images)
    assert parity.passed and parity.labels_agree == 1.0 and parity.images == len(images)
    got = onnx_probabilities(onnx_session(path), predictor.preprocess(images).numpy())
    np.testing.assert_allclose(got, predictor.predict_proba(images), atol=1e-5)


def test_ensemble_serves_through_the_pyfunc(ensemble_dir: Path, images: list[bytes], tmp_path: Path) -> None:
    import mlflow
    import pandas as pd

    from components.pipeline.stages import serving_pip_requirements
    from components.registry import tracking

    uri = tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}", state_dir=tmp_path)
    exp = tracking.ensure_experiment("ensemble", artifact_root=tmp_path / "artifacts")
    run = tracking.start_run(exp, run_name="ensemble", params={}, tags={}, tracking_uri=uri)
    model_uri = tracking.log_pyfunc_model(
        run.run_id,
        model_dir=ensemble_dir,
        example_image=images[0],
        pip_requirements=serving_pip_requirements(),
    )
    out = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": images[:8]}))
    expected = Predictor.from_dir(ensemble_dir).predict_proba(images[:8])
    np.testing.assert_allclose(np.stack(out["probabilities"].to_numpy()), expected, atol=1e-6)


def test_train_ensemble_config_validation() -> None:
    assert TrainConfig().ensemble is None
    cfg = TrainConfig(ensemble={"models": ["imgflow_cnn_avgmax", "resnet10t"], "seeds": [0]})
    assert cfg.ensemble is not None and cfg.ensemble.models == ["imgflow_cnn_avgmax", "resnet10t"]
    assert TrainConfig(epochs=6, ensemble={"snapshots": 3}).ensemble.snapshots == 3
    bad = [
        ({"seeds": [0]}, "at least 2 members"),
        ({"seeds": [0, 0]}, "without repeats"),
        ({"snapshots": 3, "seeds": [0, 1]}, "leave seeds and models null"),
        ({"snapshots": 1}, "greater than or equal to 2"),
        ({"members": 3}, "members"),
    ]
    for value, message in bad:
        with pytest.raises(ValueError, match=message):
            TrainConfig(ensemble=value)
    with pytest.raises(ValueError, match="must be a multiple of 4"):
        TrainConfig(epochs=6, ensemble={"snapshots": 4})
    with pytest.raises(ValueError, match="early_stopping_patience"):
        TrainConfig(epochs=6, early_stopping_patience=2, ensemble={"snapshots": 3})
    with pytest.raises(ConfigError, match="ensemble"):
        load_params("params.yaml", ["train.ensemble={seeds: [1]}"])
    params = load_params("params.yaml", ["train.ensemble={seeds: [0, 1, 2]}"])
    assert params.train.ensemble is not None and params.train.ensemble.seeds == [0, 1, 2]


@pytest.mark.slow
def test_real_ray_training_of_a_two_member_ensemble(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two seeds, each a real Ray Train run (side by side: one worker each fits the 2-CPU runtime), then
    one ensemble folder that predicts the mean of its members."""
    import logging

    from components.data.ingest import ingest
    from components.data.manifest import DataPaths
    from components.train.training import train

    data = DataPaths(tmp_path / "data")
    ingest("fashion-mnist", data_dir=data.root, max_per_class=20, progress=False,
           fashion_mnist_dir=Path("/usr/share/datasets/fashion-mnist"))  # fmt: skip
    cfg = TrainConfig(epochs=1, batch_size=32, workers=1, max_failures=0, ensemble={"seeds": [0, 1]})
    with caplog.at_level(logging.INFO, logger="components.train.ensemble_train"):
        result = train(cfg, data=data, out_dir=tmp_path / "train", storage_path=tmp_path / "ray", run_name="ens",
                       seed=0, weights_dir=tmp_path / "weights", show_progress=False)  # fmt: skip
    # a 2-CPU local runtime holds both members' single workers at once
    assert ("2 side by side" if (os.cpu_count() or 1) >= 2 else "one after the other") in caplog.text
    assert is_ensemble_dir(result.model_dir) and result.model_dir == tmp_path / "train" / "model"
    summary = ensemble_summary(result.model_dir)
    assert [m["seed"] for m in summary["members"]] == [0, 1]
    assert 0.0 <= result.final["val_accuracy"] <= 1.0 and "member1_val_accuracy" in result.history[-1]
    x, _ = fmnist_arrays("t10k", 8)
    images = [png_bytes(a) for a in x]
    each = [Predictor.from_dir(tmp_path / "train" / "members" / str(i) / "model").predict_proba(images)
            for i in range(2)]  # fmt: skip
    np.testing.assert_allclose(
        Predictor.from_dir(result.model_dir).predict_proba(images), np.mean(each, 0), atol=1e-6
    )


def test_members_versus_ensemble_comparison_and_report_section(members: list[Path]) -> None:
    from components.evaluate.ensemble_eval import compare_members, ensemble_scalars, ensemble_section

    x, y = fmnist_arrays("t10k", 160)
    images = [png_bytes(a) for a in x]
    probs = np.stack([Predictor.from_dir(m).predict_proba(images) for m in members])
    val, test, y_val, y_test = probs[:, :60], probs[:, 60:], y[:60], y[60:]
    out = compare_members(test, y_test, val, y_val, ["a", "b"], n_boot=500)
    assert out["ensemble"]["accuracy"] == pytest.approx(float((test.mean(0).argmax(1) == y_test).mean()))
    best = max(out["members"], key=lambda r: r["accuracy"])
    versus = out["versus_best"]
    assert versus["member"] == best["name"] and versus["images"] == 100
    assert versus["accuracy_gain"] == pytest.approx(out["ensemble"]["accuracy"] - best["accuracy"])
    assert versus["accuracy_gain_lower"] <= versus["accuracy_gain"] <= 1
    assert versus["nll_difference_upper"] >= versus["nll_difference"]
    assert 0 <= out["ensemble"]["ece"] <= 1 and out["ensemble"]["temperature"] > 0
    same = compare_members(test[[0, 0]], y_test, val[[0, 0]], y_val, ["a", "a2"], n_boot=200)
    assert same["versus_best"]["accuracy_gain"] == 0 and not same["versus_best"]["beats_best"]
    report = {"status": "compared", "members": [{"label": "a"}, {"label": "b"}], **out}
    section = ensemble_section(report)
    assert section.title == "Ensemble" and "lower bound" in section.body and "a" in section.body
    assert ensemble_scalars(report)["ensemble_members"] == 2.0
    assert ensemble_section(None) is None and ensemble_scalars(None) == {}


def test_snapshot_schedule_restarts_the_cosine_and_keeps_each_cycle_end() -> None:
    from types import SimpleNamespace

    from components.train.snapshots import is_snapshot_epoch
    from components.train.torch_recipe import build_optimizer

    recipe = SimpleNamespace(
        optimizer="adamw", lr=0.01, weight_decay=0.0, epochs=6, snapshots=3, warmup_epochs=0, init_dir=None
    )
    optimizer, scheduler = build_optimizer(torch.nn.Linear(2, 2), recipe, 10)
    lrs = []
    for step in range(60):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == lrs[20] == lrs[40] == pytest.approx(0.01)  # a warm restart every 2 epochs
    assert max(lrs[19], lrs[39], lrs[59]) < 0.0015  # each cycle ends near lr/100
    assert [e for e in range(6) if is_snapshot_epoch(recipe, e)] == [1, 3]  # epoch 5: the final model
    assert not is_snapshot_epoch(SimpleNamespace(snapshots=None, epochs=6), 1)


@pytest.mark.slow
def test_real_ray_snapshot_ensemble_from_one_run(tmp_path: Path) -> None:
    """One Ray Train run with 2 cycles: the cycle-1 snapshot and the final model, one ensemble folder."""
    from components.data.ingest import ingest
    from components.data.manifest import DataPaths
    from components.train.training import train

    data = DataPaths(tmp_path / "data")
    ingest("fashion-mnist", data_dir=data.root, max_per_class=20, progress=False,
           fashion_mnist_dir=Path("/usr/share/datasets/fashion-mnist"))  # fmt: skip
    cfg = TrainConfig(epochs=2, batch_size=32, workers=1, max_failures=0, ensemble={"snapshots": 2})
    result = train(cfg, data=data, out_dir=tmp_path / "train", storage_path=tmp_path / "ray", run_name="snap",
                   seed=0, weights_dir=tmp_path / "weights", show_progress=False)  # fmt: skip
    summary = ensemble_summary(result.model_dir)
    assert [m["epoch"] for m in summary["members"]] == [0, 1] and len(result.history) == 2
    x, _ = fmnist_arrays("t10k", 8)
    images = [png_bytes(a) for a in x]
    snaps = tmp_path / "train" / "snapshots"
    each = [Predictor.from_dir(d).predict_proba(images) for d in (snaps / "0000", snaps / "final")]
    np.testing.assert_allclose(
        Predictor.from_dir(result.model_dir).predict_proba(images), np.mean(each, 0), atol=1e-6
    )


def test_evaluate_compares_an_ensemble_folder_with_its_members(
    ensemble_dir: Path, members: list[Path], tmp_path: Path
) -> None:
    """What evaluate puts in the gate report for an ensemble folder, on a small real ingested dataset."""
    from components.evaluate.ensemble_eval import ensemble_evidence
    from components.pipeline.stages import run_ingest
    from tests.conftest import write_small_params

    write_small_params(tmp_path, max_per_class=5)
    params = load_params(
        tmp_path / "params.yaml", [f"project.data_dir={tmp_path / 'data'}", "evaluate.bootstrap=200"]
    )
    run_ingest(params, progress=False)
    out = ensemble_evidence(params, ensemble_dir)
    assert out is not None and out["status"] == "compared" and out["versus_best"]["images"] == 50
    assert [m["name"] for m in out["members"]] == ["seed 0", "seed 1"] and out["ensemble"][
        "name"
    ] == "ensemble"
    assert ensemble_evidence(params, members[0]) is None  # a single model: no section
