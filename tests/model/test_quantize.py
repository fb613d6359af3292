"""int8 ONNX export: ORT static quantization of the tiny model, its accuracy against fp32 on real images,
what survives (OOD output, metadata), what cannot be quantized, and the registry left unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from components.core.config import load_params
from components.core.errors import GatesFailedError
from components.model.checkpoint import Predictor, load_classifier
from components.model.export import OOD_OUTPUT, OUTPUT_NAME, export_onnx, onnx_metadata, onnx_session
from components.model.quantize import QuantizationError, accuracy_delta, quantize_int8
from tests.conftest import fmnist_arrays, png_bytes


@pytest.fixture(scope="module")
def fp32_onnx(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(Predictor.from_dir(tiny_model_dir), tmp_path_factory.mktemp("fp32") / "model.onnx")


def inputs(predictor: Predictor, split: str, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Real Fashion-MNIST images [start, start + n) of a split, preprocessed as the fp32 path does."""
    x, y = fmnist_arrays(split, start + n)
    return predictor.preprocess([png_bytes(a) for a in x[start:]]).numpy(), y[start:]


def test_int8_is_smaller_and_measured_against_fp32_on_real_images(
    tiny_model_dir: Path, fp32_onnx: Path, tmp_path: Path
) -> None:
    predictor = Predictor.from_dir(tiny_model_dir)
    calibration, _ = inputs(predictor, "train", 2000, 64)  # images the tiny model was not trained on
    q = quantize_int8(fp32_onnx, tmp_path / "model.int8.onnx", calibration)
    assert q.quantized_ops == q.weight_ops == 7  # 6 convolutions and the classifier
    assert q.size_ratio >= 3.0 and q.int8_bytes == q.path.stat().st_size
    x, y = inputs(predictor, "t10k", 0, 300)
    delta = accuracy_delta(fp32_onnx, q.path, x, y, max_drop=1.0)
    want = float(
        np.mean(predictor.predict_proba([png_bytes(a) for a in fmnist_arrays("t10k", 300)[0]]).argmax(1) == y)
    )
    assert delta.images == 300 and delta.fp32_accuracy == pytest.approx(want)  # fp32 ONNX = PyTorch
    assert delta.labels_agree >= 0.95 and abs(delta.drop) <= 0.05 and delta.passed
    strict = accuracy_delta(fp32_onnx, q.path, x, y, max_drop=0.0)
    assert strict.passed == (strict.drop <= 0)
    probs = session_probs(q.path, x[:8])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-3)  # still calibrated probabilities


def session_probs(path: Path, x: np.ndarray) -> np.ndarray:
    return np.asarray(onnx_session(path).run([OUTPUT_NAME], {"image": x})[0])


def test_ood_score_and_metadata_survive_quantization(tiny_model_dir: Path, tmp_path: Path) -> None:
    from components.core.config import OODConfig
    from components.evaluate.ood import fit_detector, logits_and_features
    from components.model.uncertainty import ConformalSets, OODDetector

    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "trusted"))
    model, spec = load_classifier(model_dir)
    x_train, y_train = inputs(Predictor(model, spec), "train", 0, 300)
    feats = logits_and_features(model, torch.from_numpy(x_train), layer="pre_logits")[1]
    det = fit_detector(
        "knn", OODConfig(), temperature=1.0, train=(feats, y_train.astype(int)), num_classes=10
    )
    OODDetector("knn", 0.5, 0.95, layer="pre_logits", k=det.k, tensors=det.tensors).save(model_dir)
    ConformalSets("aps", 0.9, (0.9,)).save(model_dir)
    predictor = Predictor.from_dir(model_dir)
    fp32 = export_onnx(predictor, tmp_path / "m.onnx")
    calibration, _ = inputs(predictor, "train", 2000, 64)
    q = quantize_int8(fp32, tmp_path / "m.int8.onnx", calibration)
    session = onnx_session(q.path)
    assert onnx_metadata(session) == onnx_metadata(onnx_session(fp32))
    x, _ = inputs(predictor, "t10k", 0, 64)
    _, scores = session.run([OUTPUT_NAME, OOD_OUTPUT], {"image": x})
    ref = onnx_session(fp32).run([OOD_OUTPUT], {"image": x})[0]
    assert np.corrcoef(scores, ref)[0, 1] > 0.9  # the fp32 distance, on int8 features


def test_a_model_without_quantizable_ops_is_a_clear_error(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Softmax", ["image"], [OUTPUT_NAME], name="softmax", axis=1)],
                              "elementwise", [x], [y])  # fmt: skip
    path = tmp_path / "softmax.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    calibration = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    with pytest.raises(QuantizationError, match="quantized none of this model's weight ops.*Softmax"):
        quantize_int8(path, tmp_path / "out.onnx", calibration)
    assert not (tmp_path / "out.onnx").exists()
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(QuantizationError, match="not a readable ONNX model"):
        quantize_int8(tmp_path / "junk.onnx", tmp_path / "out.onnx", calibration)
    with pytest.raises(QuantizationError, match="needs validation images"):
        quantize_int8(path, tmp_path / "out.onnx", calibration[:0])


def outlier_model(tiny_model_dir: Path, dst: Path) -> Path:
    """The tiny model with one huge feature channel (+2e3, taken back out by the classifier's bias): the
    same fp32 predictions, but a per-tensor int8 range of ~2e3 wipes out every other channel, the known
    int8 failure mode of activation outliers."""
    from safetensors.torch import load_file, save_file

    model_dir = Path(shutil.copytree(tiny_model_dir, dst))
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["stages.2.1.1.bias"][0] += 2e3  # the last block's BatchNorm shift: after ReLU, feature 0 + 2e3
    weights["head.fc.bias"] -= 2e3 * weights["head.fc.weight"][:, 0]
    save_file(weights, str(model_dir / "model.safetensors"))
    return model_dir


def test_export_int8_attaches_only_within_the_allowed_drop(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Through ``run_export``: a model int8 cannot represent fails the gate and leaves its registered
    version untouched; the tiny model passes and both files are attached and tagged like the fp32 export."""
    from components.pipeline.models import run_export
    from components.registry import tracking
    from tests.model.test_embedding_store import write_data_dir

    x, y = fmnist_arrays("t10k", 160)
    write_data_dir(tmp_path / "data", x, y, ["val"] * 40 + ["test"] * 120)
    uri = tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}", state_dir=tmp_path)
    exp = tracking.ensure_experiment("int8", artifact_root=tmp_path / "artifacts")
    client = MlflowClient()
    runs = {}
    for name, folder in (
        ("outlier", outlier_model(tiny_model_dir, tmp_path / "outlier")),
        ("tiny", tiny_model_dir),
    ):
        runs[name] = tracking.start_run(exp, run_name=name, params={}, tags={}, tracking_uri=uri).run_id
        client.log_artifacts(runs[name], str(folder), "model")
        tracking.register(
            f"runs:/{runs[name]}/model", name=name, run_id=runs[name], tags={}, aliases=["champion"]
        )
    params = load_params("params.yaml", [f"register.tracking_uri={uri}", f"project.output_dir={tmp_path / 'out'}",
                                         f"project.data_dir={tmp_path / 'data'}"])  # fmt: skip
    assert params.gates.max_int8_accuracy_drop == 0.005

    tags_before = dict(client.get_model_version("outlier", "1").tags)
    with pytest.raises(GatesFailedError, match="less accurate than fp32 ONNX.*nothing was attached"):
        run_export(params, model="models:/outlier@champion", quantize="int8")
    assert dict(client.get_model_version("outlier", "1").tags) == tags_before
    assert [f.path for f in client.list_artifacts(runs["outlier"], "onnx")] == []

    lenient = params.model_copy(
        update={"gates": params.gates.model_copy(update={"max_int8_accuracy_drop": 0.05})}
    )
    result = run_export(lenient, model="models:/tiny@champion", quantize="int8")
    assert result.int8 is not None and result.int8["accuracy"]["images"] == 120
    tags = client.get_model_version("tiny", "1").tags
    assert tags["onnx_int8_model"] == f"runs:/{runs['tiny']}/onnx/model.int8.onnx" == result.int8["artifact"]
    assert float(tags["onnx_int8_accuracy_drop"]) == pytest.approx(result.int8["accuracy"]["drop"], abs=1e-4)
    names = {f.path for f in client.list_artifacts(runs["tiny"], "onnx")}
    assert {"onnx/model.onnx", "onnx/model.int8.onnx", "onnx/model.int8.accuracy.json"} <= names
