"""Batch prediction throughput: the registered MLflow pyfunc vs a bare torch eval loop vs ONNX Runtime.

All three get the same model (imgflow_cnn, temperature-scaled) and the same batches of real
Fashion-MNIST PNG bytes, and each does the whole job: decode, preprocess, forward, softmax. The
pyfunc is the registered model loaded through ``mlflow.pyfunc.load_model`` from a sqlite store;
the bare loop is ``Predictor``'s preprocessing + ``model(x)`` with no MLflow or pandas around it;
ONNX Runtime runs the exported graph on the same preprocessed tensors. Target: pyfunc >= 0.8x bare.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.data.sources import encode_png, fashion_mnist_paths, load_fashion_mnist
from components.model.checkpoint import ModelSpec, Predictor, save_classifier
from components.model.export import export_onnx, onnx_probabilities, onnx_session
from components.model.models import create_classifier, resolve_data_config
from components.pipeline.stages import _pip_requirements
from components.registry import tracking

CLASSES = tuple(f"c{i}" for i in range(10))


def _images(n: int) -> list[bytes]:
    arrays = load_fashion_mnist(
        fashion_mnist_paths(Path("/usr/share/datasets/fashion-mnist"), download=False)
    )
    return [encode_png(a) for a in arrays["test"][0][:n]]


def _timed(fns: list[Any], batches: list[list[bytes]]) -> list[float]:
    """Seconds per function over all batches, interleaved batch by batch (on a shared machine a
    load spike then hits every contender alike, not whichever happened to run during it)."""
    for fn in fns:
        fn(batches[0])  # warm-up
    totals = [0.0] * len(fns)
    for i, b in enumerate(batches):
        for j in [(i + k) % len(fns) for k in range(len(fns))]:  # rotate who goes first
            t0 = time.perf_counter()
            fns[j](b)
            totals[j] += time.perf_counter() - t0
    return totals


def run(*, quick: bool = False) -> dict[str, Any]:
    import pandas as pd

    n, batch = (1024, 128) if quick else (8192, 256)
    images = _images(n)
    batches = [images[i : i + batch] for i in range(0, n, batch)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = create_classifier("imgflow_cnn", len(CLASSES), in_chans=1)
        spec = ModelSpec("imgflow_cnn", CLASSES, 1, resolve_data_config(model), temperature=1.3)
        model_dir = save_classifier(model.state_dict(), spec, root / "model")
        uri = tracking.configure(f"sqlite:///{root / 'mlflow.db'}", state_dir=root)
        exp = tracking.ensure_experiment("bench", artifact_root=root / "artifacts")
        run_ = tracking.start_run(exp, run_name="bench", params={}, tags={}, tracking_uri=uri)
        model_uri = tracking.log_pyfunc_model(
            run_.run_id, model_dir=model_dir, example_image=images[0], pip_requirements=_pip_requirements()
        )
        pyfunc = tracking.load_pyfunc(model_uri)  # models from code: nothing unpickled
        predictor = Predictor.from_dir(model_dir, batch_size=batch)
        session = onnx_session(export_onnx(predictor, root / "model.onnx"))

        def bare(b: list[bytes]) -> np.ndarray:
            with torch.inference_mode():
                x = predictor.preprocess(b)
                return torch.softmax(predictor.model(x) / spec.temperature, dim=1).numpy()

        def via_pyfunc(b: list[bytes]) -> Any:
            return pyfunc.predict(pd.DataFrame({"image": b}))

        def via_onnx(b: list[bytes]) -> np.ndarray:
            return onnx_probabilities(session, predictor.preprocess(b).numpy())

        bare_s, pyfunc_s, onnx_s = _timed([bare, via_pyfunc, via_onnx], batches)
    ratio = bare_s / pyfunc_s
    return {
        "figures": [
            {"name": "images", "value": n},
            {"name": "batch_size", "value": batch},
            {"name": "torch_threads", "value": torch.get_num_threads()},
            {"name": "bare_torch_img_per_s", "value": n / bare_s, "unit": "img/s"},
            {"name": "pyfunc_img_per_s", "value": n / pyfunc_s, "unit": "img/s"},
            {"name": "onnxruntime_img_per_s", "value": n / onnx_s, "unit": "img/s"},
            {
                "name": "pyfunc_vs_bare",
                "value": ratio,
                "unit": "x",
                "target": ">= 0.8",
                "passed": ratio >= 0.8,
            },
            {"name": "onnxruntime_vs_bare", "value": bare_s / onnx_s, "unit": "x"},
        ],
        "baseline": "bare torch loop: Predictor.preprocess + model(x) + softmax(./T), same batches",
    }
