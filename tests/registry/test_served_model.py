"""The served pyfunc is logged as MLflow *models from code*: nothing is pickled when it is logged,
nothing is unpickled when it is loaded (pickle made to fail), MLflow prints no warning on either,
and the loaded model answers exactly like the imgflow Predictor (label sets for multi-label too)."""

from __future__ import annotations

import json
import logging
import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cloudpickle
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

from components.model.checkpoint import ModelSpec, Predictor, save_classifier
from components.model.models import create_classifier, resolve_data_config
from components.pipeline.stages import serving_pip_requirements
from components.registry import tracking
from tests.conftest import fmnist_arrays, png_bytes


@contextmanager
def _noise() -> Iterator[list[str]]:
    """Collect every Python warning and every WARNING+ record of MLflow's loggers in the block."""
    heard: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            heard.append(f"{record.name}: {record.getMessage()}")

    handler, mlflow_logger = Catch(logging.WARNING), logging.getLogger("mlflow")
    mlflow_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield heard
        heard += [f"{w.category.__name__}: {w.message}" for w in caught]
    finally:
        mlflow_logger.removeHandler(handler)


def _log_and_register(model_dir: Path, root: Path, name: str, image: bytes) -> str:
    uri = tracking.configure(f"sqlite:///{root / 'mlflow.db'}", state_dir=root)
    exp = tracking.ensure_experiment("served", artifact_root=root / "artifacts")
    run = tracking.start_run(exp, run_name=name, params={}, tags={}, tracking_uri=uri)
    model_uri = tracking.log_pyfunc_model(
        run.run_id, model_dir=model_dir, example_image=image, pip_requirements=serving_pip_requirements()
    )
    version = tracking.register(
        model_uri, name=name, run_id=run.run_id, tags={}, aliases=["champion"]
    ).version
    logged = MlflowClient().get_logged_model(
        model_uri.removeprefix("models:/")
    )  # linked as register_model does
    assert {"name": name, "version": version} in json.loads(logged.tags["mlflow.modelVersions"])
    assert logged.experiment_id == exp and logged.source_run_id == run.run_id  # not the Default experiment
    return f"models:/{name}@champion"


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("the served model must load without unpickling anything")


def test_logged_as_code_and_loaded_without_unpickling(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    x, _ = fmnist_arrays("t10k", 12)
    images = [png_bytes(a) for a in x]
    with _noise() as heard:
        uri = _log_and_register(tiny_model_dir, tmp_path, "served-code", images[0])
    assert heard == []
    assert "cloudpickle" not in capfd.readouterr().err.lower()

    local = Path(tracking.download_model_dir(uri, tmp_path / "dl")).parents[1]  # .../artifacts/model
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert (local / "pyfunc_model.py").is_file() and not list(local.rglob("*.pkl"))
    assert (local / "code" / "components" / "model" / "checkpoint.py").is_file()  # the whole package ships

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # MLflow's own switch
    for module in (pickle, cloudpickle):
        monkeypatch.setattr(module, "load", _refuse)
        monkeypatch.setattr(module, "loads", _refuse)
    with _noise() as heard:
        out = tracking.load_pyfunc(uri).predict(pd.DataFrame({"image": images}))
    assert heard == []

    predictor = Predictor.from_dir(tiny_model_dir)
    probs = predictor.predict_proba(images)
    assert list(out.columns) == ["labels", "label", "score", "probabilities"]
    assert out["labels"].tolist() == predictor.label_sets(probs)
    assert out["label"].tolist() == [predictor.spec.classes[i] for i in probs.argmax(axis=1)]
    np.testing.assert_allclose(np.stack(out["probabilities"].to_numpy()), probs, atol=1e-6)


def test_multilabel_pyfunc_answers_label_sets(tmp_path: Path) -> None:
    """A multi-label model: every label at or above its threshold, possibly none, most probable first."""
    torch.manual_seed(0)
    classes = ("a", "b", "c", "d")
    model = create_classifier("imgflow_cnn", len(classes), in_chans=1)
    # "a" and "b" always chosen, "d" never (a sigmoid stays below 1): every answer is a real set
    spec = ModelSpec("imgflow_cnn", classes, 1, resolve_data_config(model), task="multilabel",
                     thresholds=(0.0, 0.0, 0.5, 1.0))  # fmt: skip
    model_dir = save_classifier(model.eval().state_dict(), spec, tmp_path / "model")
    x, _ = fmnist_arrays("t10k", 16)
    images = [png_bytes(a) for a in x]
    uri = _log_and_register(model_dir, tmp_path, "served-multilabel", images[0])

    out = tracking.load_pyfunc(uri).predict(pd.DataFrame({"image": images}))
    predictor = Predictor.from_dir(model_dir)
    probs = predictor.predict_proba(images)
    expected = [[classes[j] for j in np.argsort(-p) if p[j] >= spec.thresholds[j]] for p in probs]
    assert out["labels"].tolist() == expected == predictor.label_sets(probs)
    assert all({"a", "b"} <= set(s) and "d" not in s for s in expected)
    np.testing.assert_allclose(np.stack(out["probabilities"].to_numpy()), probs, atol=1e-6)
