"""Batch prediction into Parquet (streaming, bad files as rows) and ONNX export with parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from components.core.config import load_params
from components.core.errors import DataError
from components.model.checkpoint import Predictor
from components.pipeline.models import run_export
from components.pipeline.stages import serving_pip_requirements
from components.registry import tracking
from components.serve.predict import list_inputs
from tests.conftest import FMNIST_CLASSES, fmnist_arrays, png_bytes, run_cli


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("to-predict")
    x, _ = fmnist_arrays("t10k", 40)
    for i, a in enumerate(x):
        sub = root / ("a" if i % 2 else "b sub ü")  # nested, spaces and unicode
        sub.mkdir(exist_ok=True)
        (sub / f"img{i:03d}.png").write_bytes(png_bytes(a))
    (root / "broken.png").write_bytes(b"\x89PNG truncated")
    return root


def test_predict_cli_streams_a_folder_into_parquet(
    image_folder: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "preds.parquet"
    proc = run_cli("predict", str(image_folder), "--model", str(tiny_model_dir), "--out", str(out), "--json",
                   "--set", "predict.batch_size=16", "--set", "predict.workers=1", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["images"] == 41 and summary["failed"] == 1
    assert pq.ParquetFile(out).num_row_groups == 3  # written batch by batch, not at the end
    table = pd.read_parquet(out)
    broken = table[table["path"].str.endswith("broken.png")].iloc[0]
    assert "not a decodable image" in broken["error"] and pd.isna(broken["label"])
    good = table[table["error"].isna()]
    predictor = Predictor.from_dir(tiny_model_dir)
    expected = predictor.predict_proba([Path(p).read_bytes() for p in good["path"]])
    np.testing.assert_allclose(np.stack(good["probabilities"].to_numpy()), expected, atol=1e-5)
    assert list(good["label"]) == [FMNIST_CLASSES[i] for i in expected.argmax(1)]
    assert all(len(k) == 3 for k in good["top_k_labels"])


def test_csv_source_and_bad_sources(image_folder: Path, tmp_path: Path) -> None:
    files = list_inputs(image_folder)
    csv = image_folder / "list.csv"
    pd.DataFrame({"path": [str(p.relative_to(image_folder)) for p in files[:5]]}).to_csv(csv, index=False)
    assert list_inputs(csv) == files[:5]
    pd.DataFrame({"file": ["x.png"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="'path' column"):
        list_inputs(tmp_path / "bad.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        list_inputs(tmp_path / "empty")


def test_onnx_export_matches_pytorch_and_is_attached(
    image_folder: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    uri = tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}", state_dir=tmp_path)
    exp = tracking.ensure_experiment("export", artifact_root=tmp_path / "artifacts")
    run = tracking.start_run(exp, run_name="tiny", params={}, tags={}, tracking_uri=uri)
    model_uri = tracking.log_pyfunc_model(run.run_id, model_dir=tiny_model_dir,
                                          example_image=png_bytes(fmnist_arrays("t10k", 1)[0][0]),
                                          pip_requirements=serving_pip_requirements())  # fmt: skip
    tracking.register(model_uri, name="export-test", run_id=run.run_id, tags={}, aliases=["champion"])
    params = load_params(
        "params.yaml", [f"register.tracking_uri={uri}", f"project.output_dir={tmp_path / 'out'}"]
    )
    result = run_export(params, model="models:/export-test@champion", images=image_folder).to_dict()
    parity = result["parity"]
    assert parity["images"] == 40 and parity["max_abs_diff"] <= 1e-4 and parity["labels_agree"] == 1.0
    assert result["attached_to"]["version"] == "1"
    version = MlflowClient().get_model_version("export-test", "1")
    assert version.tags["onnx_model"] == f"runs:/{run.run_id}/onnx/model.onnx"
    names = [f.path for f in MlflowClient().list_artifacts(run.run_id, "onnx")]
    assert "onnx/model.onnx" in names and "onnx/model.parity.json" in names


def test_flip_tta_averages_the_mirror_image_everywhere_and_exports_to_onnx(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import shutil
    from dataclasses import replace

    import torch

    from components.model.checkpoint import FlipTTA, load_classifier, load_spec
    from components.model.export import check_parity, export_onnx

    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "tta"))
    spec = replace(load_spec(model_dir), tta="hflip")
    (model_dir / "model.json").write_text(json.dumps(spec.to_dict()))
    plain, _ = load_classifier(tiny_model_dir)
    tta, loaded = load_classifier(model_dir)
    assert isinstance(tta, FlipTTA) and loaded.tta == "hflip"
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        want = (plain(x) + plain(x.flip(3))) / 2
        assert torch.allclose(tta(x), want, atol=1e-5)
        assert torch.allclose(tta(x.flip(3)), tta(x), atol=1e-5)  # mirror-invariant predictions
    predictor = Predictor.from_dir(model_dir)
    images = [png_bytes(a) for a in fmnist_arrays("t10k", 16)[0]]
    parity = check_parity(predictor, export_onnx(predictor, tmp_path / "tta.onnx"), images)
    assert parity.passed and parity.labels_agree == 1.0
