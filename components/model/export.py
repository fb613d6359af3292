"""ONNX export of an imgflow model, with a parity check against PyTorch on real images.

The exported graph maps a preprocessed batch (N, C, H, W) to calibrated probabilities (N, K):
``softmax(logits / T)`` with the model's fitted temperature, so ONNX Runtime answers what the
registered pyfunc answers. Preprocessing stays outside the graph (the spec's ``data_config``).
An ensemble (:mod:`components.model.ensemble`) exports as one graph: every member, the mean of their
softmax, then the temperature.

A model that ships an OOD detector (:mod:`components.model.uncertainty`) gets a second output,
``ood_score`` (N,), computed in the graph; its threshold (``ood`` = score > threshold), and the conformal
sets' quantile, are in the ONNX metadata (``imgflow.ood``, ``imgflow.conformal``: JSON).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from components.core.errors import DataError
from components.model.checkpoint import ModelSpec, Predictor, probabilities

logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME, OOD_OUTPUT = "image", "probabilities", "ood_score"


class _Calibrated(nn.Module):
    """The model with its served head: temperature-scaled softmax, or sigmoids for multi-label."""

    def __init__(self, model: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return probabilities(self.model(x), self.spec)


class _CalibratedScored(nn.Module):
    """The served head plus the OOD score: x -> (probabilities (N, K), ood_score (N,))."""

    def __init__(self, scored: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.scored, self.spec = scored, spec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, score = self.scored(x)
        return probabilities(logits, self.spec), score


@dataclass(frozen=True)
class Parity:
    images: int
    max_abs_diff: float
    tolerance: float
    labels_agree: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "labels_agree": self.labels_agree, "passed": self.passed}  # fmt: skip


def export_onnx(predictor: Predictor, out: Path, *, opset: int = 17) -> Path:
    """Write ``out`` (.onnx) with a dynamic batch axis; returns it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    scored = predictor.scored_net
    module: nn.Module = (_Calibrated(predictor.model, predictor.spec) if scored is None
                         else _CalibratedScored(scored, predictor.spec)).eval()  # fmt: skip
    outputs = [OUTPUT_NAME] if scored is None else [OUTPUT_NAME, OOD_OUTPUT]
    example = torch.zeros(1, *predictor.spec.data_config["input_size"], device=predictor.device)
    # The TorchScript-based exporter: no onnxscript dependency, and these models are plain convnets.
    torch.onnx.export(
        module, (example,), str(out), input_names=[INPUT_NAME], output_names=outputs,
        dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)}, opset_version=opset, dynamo=False,
    )  # fmt: skip
    _add_trust_metadata(predictor, out)
    return out


def _add_trust_metadata(predictor: Predictor, path: Path) -> None:
    """The OOD threshold and the conformal rule as JSON metadata of the ONNX file (when the model has them)."""
    import json

    import onnx

    meta = {}
    if predictor.ood is not None:
        meta["imgflow.ood"] = json.dumps({"output": OOD_OUTPUT, **predictor.ood.to_dict()})
    if predictor.conformal is not None:
        meta["imgflow.conformal"] = json.dumps(predictor.conformal.to_dict())
    if not meta:
        return
    graph = onnx.load(str(path))
    for key, value in meta.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(graph, str(path))


def onnx_metadata(session: Any) -> dict[str, Any]:
    """The ``imgflow.*`` metadata of an ONNX Runtime session, parsed (``ood``, ``conformal``)."""
    import json

    custom = session.get_modelmeta().custom_metadata_map
    return {k.removeprefix("imgflow."): json.loads(v) for k, v in custom.items() if k.startswith("imgflow.")}


def onnx_session(path: Path, *, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_probabilities(session: Any, batch: np.ndarray) -> np.ndarray:
    """batch: (N, C, H, W) float32 preprocessed -> (N, K) probabilities."""
    return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: batch.astype(np.float32)})[0])


def check_parity(predictor: Predictor, path: Path, images: list[bytes], *, tolerance: float = 1e-4) -> Parity:
    """ONNX Runtime vs PyTorch probabilities on the same real images (max abs diff)."""
    tensors = []
    for b in images:  # an unreadable file in the folder is not the exporter's problem: skip it
        try:
            tensors.append(predictor.preprocess([b])[0])
        except DataError:
            continue
    if not tensors:
        raise DataError("the parity check needs real images; none of those given could be decoded")
    x = torch.stack(tensors)
    with torch.inference_mode():
        ref = probabilities(predictor.model(x), predictor.spec).numpy()
    got = onnx_probabilities(onnx_session(path), x.numpy())
    diff = float(np.abs(ref - got).max())
    agree = float(np.mean(ref.argmax(1) == got.argmax(1)))
    return Parity(images=len(tensors), max_abs_diff=diff, tolerance=tolerance, labels_agree=agree)
