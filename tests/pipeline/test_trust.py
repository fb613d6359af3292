"""Drift between data versions in the retrain check and the validation report (a real sqlite MLflow
registry, a real trained model as champion), and the `imgflow drift` / `imgflow explain` commands,
unreadable files included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from components.core.config import Params, load_params
from components.core.errors import ValidationFailedError
from components.data.manifest import DatasetInfo, data_version
from components.pipeline.stages import run_check_freshness, run_validate
from components.pipeline.trust import list_sources, warm_reference
from components.registry import tracking
from tests.conftest import FMNIST_CLASSES, fmnist_arrays, png_bytes, run_cli, write_small_params
from tests.model.test_embedding_store import write_data_dir

N = 150


def brighter(images: np.ndarray, shift: int = 30) -> np.ndarray:
    return np.clip(images.astype(np.int16) + shift, 0, 255).astype(np.uint8)


def _data(params: Params, images: np.ndarray, labels: np.ndarray) -> str:
    """Ingest-like: the data dir holds these images (all train but a few val/test); its version."""
    root = params.project.data_dir
    shutil.rmtree(root / "store", ignore_errors=True)
    splits = ["train"] * (len(images) - 20) + ["val"] * 10 + ["test"] * 10
    paths = write_data_dir(root, images, labels, splits)
    DatasetInfo(classes=FMNIST_CLASSES).save(paths.dataset)
    return data_version(paths.manifest)


def _register_champion(params: Params, model_dir: Path, trained_on: str) -> None:
    """The tiny model as version 1 and champion of ``register.model_name``, trained on ``trained_on``."""
    uri = tracking.configure(params.register_.tracking_uri, state_dir=params.project.state_dir)
    exp = tracking.ensure_experiment("e", artifact_root=params.project.state_dir / "art")
    run = tracking.start_run(
        exp, run_name="t", params={}, tags={"data_version": trained_on}, tracking_uri=uri
    )
    source = shutil.copytree(model_dir, params.project.state_dir / "art" / "model")
    client = mlflow.MlflowClient()
    client.create_registered_model(params.register_.model_name)
    mv = client.create_model_version(
        params.register_.model_name, source=Path(source).as_uri(), run_id=run.run_id
    )
    client.set_registered_model_alias(params.register_.model_name, tracking.CHAMPION, mv.version)


@pytest.fixture()
def params(tmp_path: Path) -> Params:
    file = write_small_params(tmp_path)
    return load_params(file, [f"project.data_dir={tmp_path / 'data'}", f"project.output_dir={tmp_path / 'outputs'}",
                              f"project.state_dir={tmp_path / '.imgflow'}",
                              f"register.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])  # fmt: skip


def test_new_data_versions_are_tested_for_drift_against_the_champions_training_data(
    params: Params, tiny_model_dir: Path
) -> None:
    x, y = fmnist_arrays("train", 2 * N)
    v1 = _data(params, x[:N], y[:N])
    _register_champion(params, tiny_model_dir, v1)
    warm_reference(params, tiny_model_dir)  # what register does for a model that passed its gates

    _data(params, brighter(x[:N]), y[:N])  # the same images, brighter
    shifted = run_check_freshness(params)
    assert shifted.retrain and shifted.reason.startswith("data drifted: retrain")
    assert shifted.drift is not None and shifted.drift["drifted"] and shifted.drift["p_value"] < 0.05
    assert v1 in shifted.drift["reference"]
    logged = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`imgflow.kind` = 'drift'")
    assert len(logged) == 1 and logged["metrics.drifted"].iloc[0] == 1.0

    with pytest.raises(ValidationFailedError):  # 150 images fail the size checks; the report is written
        run_validate(params)
    report = json.loads((params.project.output_dir / "validate" / "report.json").read_text())
    assert report["drift"]["status"] == "measured" and report["drift"]["drifted"]
    html = (params.project.output_dir / "validate" / "report.html").read_text()
    assert "Data drift vs the champion&#x27;s training data" in html and "drifted" in html

    _data(params, x[N:], y[N:])  # other images of the same distribution
    resampled = run_check_freshness(params)
    assert resampled.retrain and "data version" in resampled.reason  # a new version still retrains...
    assert resampled.drift is not None and not resampled.drift["drifted"]  # ...but it has not drifted
    assert "no drift detected" in resampled.reason


def test_a_champion_without_embedded_training_data_is_said_so(params: Params, tiny_model_dir: Path) -> None:
    x, y = fmnist_arrays("train", N)
    _register_champion(params, tiny_model_dir, "0123abcd")  # trained on data no longer here
    _data(params, x, y)
    verdict = run_check_freshness(params)
    assert verdict.retrain and verdict.drift == {"status": "not measured", "reason": verdict.drift["reason"]}
    assert "not in the embedding store" in verdict.reason


def test_predictions_parquet_lists_its_paths(tmp_path: Path) -> None:
    pd.DataFrame({"path": ["a.png", "b.png"], "label": ["x", None]}).to_parquet(tmp_path / "p.parquet")
    assert list_sources(tmp_path / "p.parquet") == [Path("a.png"), Path("b.png")]


def test_drift_and_explain_commands_report_unreadable_files_and_go_on(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    write_small_params(tmp_path)
    x, y = fmnist_arrays("train", N)
    write_data_dir(tmp_path / "data", x, y, ["train"] * N)
    batch = tmp_path / "batch"
    batch.mkdir()
    test, _ = fmnist_arrays("t10k", 60)
    for i, img in enumerate(brighter(test)):
        (batch / f"{i:02d}.png").write_bytes(png_bytes(img))
    (batch / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")

    proc = run_cli("drift", str(batch), "--model", str(tiny_model_dir), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["drifted"] and out["images"] == 60 and out["listed"] == 61
    assert [u["path"] for u in out["unreadable"]] == [str(batch / "broken.png")]
    assert "not a decodable image" in out["unreadable"][0]["error"]
    assert out["run_id"] and (tmp_path / "outputs" / "drift" / "report.json").is_file()

    images = [batch / "00.png", batch / "broken.png", batch / "01.png"]
    proc = run_cli("explain", *map(str, images), "--model", str(tiny_model_dir), "--out", "cams", "--json",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert [Path(w["overlay"]).name for w in out["written"]] == ["00.gradcam.png", "01.gradcam.png"]
    assert all((tmp_path / w["overlay"]).is_file() for w in out["written"])
    assert [u["path"] for u in out["unreadable"]] == [str(batch / "broken.png")]
