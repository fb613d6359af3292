"""Deployment variants of the Fashion-MNIST model: fp32 PyTorch, fp32 ONNX, int8 ONNX, flip-TTA (issue 19).

Runs ``imgflow variants``'s own code (:func:`components.pipeline.models.run_variants`) on the
project's data version (``params.yaml``: the ingested manifest) and

- the demo champion's weights, ``outputs/train/model``, when they are there (the JSON says which), else
- an ``imgflow_cnn_avgmax`` (the default recipe's model, 73k parameters) trained here on the train split
  (20,000 images, 3 epochs; ``--quick``: 4,000 images, 1 epoch) with the product's preprocessing.

Figures: int8 vs fp32 ONNX test accuracy (target: at most 0.5 points lower, ``gates.max_int8_accuracy_drop``),
fp32/int8 ONNX file size (target >= 3x), and int8 latency as a ratio of fp32 ONNX Runtime and of PyTorch
for 1 image and a batch of 64, all measured in the same run (no target: int8 is not always faster; the
CPU's VNNI/AMX flags are in the JSON). Latency runs on one thread for every runtime: this machine's 2
cores are shared, and a multi-threaded PyTorch spins against other processes (measured: 2.6 ms per image
on 1 thread, 350 ms on 2 under a load of 20).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from components.core.config import load_params
from components.evaluate.variants import format_table, labelled_split
from components.model.checkpoint import ModelSpec, Predictor, save_classifier
from components.pipeline.models import run_variants

ACCURACY_DROP, SIZE_RATIO = 0.005, 3.0


def _train(params: Any, out_dir: Path, *, n: int, epochs: int) -> Path:
    """An imgflow_cnn_avgmax trained on ``n`` train-split images (Adam, batch 64), saved as a model folder."""
    import torch

    from components.model.models import create_classifier, resolve_data_config

    torch.manual_seed(params.project.seed)
    model = create_classifier("imgflow_cnn_avgmax", 10, in_chans=1)
    classes = tuple(sorted(_classes(params)))
    spec = ModelSpec("imgflow_cnn_avgmax", classes, 1, resolve_data_config(model))
    images, targets = labelled_split(params.project.data_dir, "train", classes, task=spec.task, limit=n,
                                     seed=params.project.seed)  # fmt: skip
    x = Predictor(model, spec).preprocess(images)
    y = torch.as_tensor(targets, dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=0.003)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return save_classifier(model.eval().state_dict(), spec, out_dir)


def _classes(params: Any) -> set[str]:
    from components.data.manifest import DataPaths, read_manifest, require_manifest

    return set(read_manifest(require_manifest(DataPaths(params.project.data_dir)))["label"])


def run(*, quick: bool = False) -> dict[str, Any]:
    champion = load_params("params.yaml").project.output_dir / "train" / "model"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imgflow-bench-variants-") as tmp:
        # the table goes to the bench's JSON, not into outputs/ (whose gate report is another model's)
        params = load_params("params.yaml", [f"project.output_dir={tmp}"])
        if (champion / "model.safetensors").exists():
            model_dir, source = champion, f"demo champion ({champion})"
        else:
            n, epochs = (4000, 1) if quick else (20000, 3)
            model_dir = _train(params, Path(tmp) / "model", n=n, epochs=epochs)
            source = f"imgflow_cnn_avgmax trained in the bench ({n} train images, {epochs} epochs)"
        train_s = time.perf_counter() - t0
        table = run_variants(params, model=str(model_dir), max_images=2000 if quick else None,
                             repeats=10 if quick else 30, threads=1)  # fmt: skip
    rows = {r["name"]: r for r in table["rows"]}
    fp32, onnx, int8 = rows["fp32"], rows["fp32 ONNX"], rows["int8 ONNX"]
    drop = onnx["accuracy"] - int8["accuracy"]
    size = onnx["size_bytes"] / int8["size_bytes"]

    def ratio(a: dict[str, Any], b: dict[str, Any], n: str) -> float:
        return float(a["latency_ms"][n]["p50"] / b["latency_ms"][n]["p50"])

    figures = [
        {"name": "int8 accuracy drop vs fp32 ONNX", "value": drop, "unit": "", "target": f"<= {ACCURACY_DROP}",
         "passed": bool(drop <= ACCURACY_DROP)},
        {"name": "fp32 / int8 ONNX size", "value": size, "unit": "x", "target": f">= {SIZE_RATIO}",
         "passed": bool(size >= SIZE_RATIO)},
        {"name": "int8 / fp32 ONNX p50, 1 image", "value": ratio(int8, onnx, "1"), "unit": "x"},
        {"name": "int8 / fp32 ONNX p50, 64 images", "value": ratio(int8, onnx, "64"), "unit": "x"},
        {"name": "int8 ONNX / PyTorch p50, 1 image", "value": ratio(int8, fp32, "1"), "unit": "x"},
        {"name": "int8 ONNX / PyTorch p50, 64 images", "value": ratio(int8, fp32, "64"), "unit": "x"},
        {"name": "int8 test accuracy", "value": int8["accuracy"], "unit": ""},
        {"name": "fp32 test accuracy", "value": onnx["accuracy"], "unit": ""},
    ]  # fmt: skip
    text = format_table(table)
    print(f"model: {source}\n{text}", flush=True)
    return {"model": source, "train_s": train_s, "figures": figures, "table": table, "table_text": text,
            "accuracy_drop_points": float(np.round(drop * 100, 3))}  # fmt: skip
