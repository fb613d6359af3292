"""int8 ONNX: ONNX Runtime static quantization of the fp32 export, and its accuracy against fp32.

The fp32 graph (:func:`components.model.export.export_onnx`) is quantized with
``onnxruntime.quantization.quantize_static``: QDQ format (QuantizeLinear/DequantizeLinear pairs around
each quantized op, which every ORT execution provider reads), int8 weights per output channel and
int8 activations whose ranges are calibrated (min/max) on validation images preprocessed exactly as the
fp32 path does (:meth:`components.model.checkpoint.Predictor.preprocess`). Weights use 7 of their 8 bits
(``reduce_range``): on x86 CPUs without VNNI (AVX2 or AVX-512 alone) ORT multiplies u8 x s8 with an
instruction whose 16-bit sums saturate (ORT's quantization guide); measured on such a CPU (AMD EPYC, AVX2)
with full 8-bit weights, the tiny test model's int8 labels agreed with fp32 on 94% of the test images and
its int8 OOD score correlated 0.78 with fp32's — both above the test bounds (95%, 0.9) with 7-bit weights.
The file may be served on any CPU, so the range is reduced everywhere. ``torch.ao`` eager/FX
quantization is deprecated upstream, so nothing here builds on it.

Only the nodes that compute the logits are quantized: the temperature-scaled softmax after the classifier
stays fp32 (calibrated probabilities, not steps of 1/255), and so do the OOD score's own nodes (distances
to a feature bank, Mahalanobis products) on top of the int8 features, so the second output and its
``imgflow.*`` metadata survive. Whether int8 is good enough is measured, not assumed:
:func:`accuracy_delta` compares int8 with fp32 ONNX on the same labelled test images.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.core.errors import ImgflowError

logger = logging.getLogger(__name__)

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
"""The op types that hold the weights; a model with none of them quantized gains nothing from int8."""


class QuantizationError(ImgflowError):
    """ONNX Runtime cannot quantize this model (exit code 2: the registry is left unchanged)."""


class _Batches:
    """An ``onnxruntime.quantization.CalibrationDataReader``: preprocessed images in batches.

    (Duck-typed: ORT only calls ``get_next``; subclassing would import onnxruntime at import time.)
    """

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        )
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch.astype(np.float32)}


@dataclass(frozen=True)
class QuantizedModel:
    """The int8 file and what quantizing did: how many weight ops became int8 and the file sizes."""

    path: Path
    calibration_images: int
    quantized_ops: int
    weight_ops: int
    fp32_bytes: int
    int8_bytes: int

    @property
    def size_ratio(self) -> float:
        """How many times smaller than the fp32 file."""
        return self.fp32_bytes / self.int8_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "calibration_images": self.calibration_images,
                "quantized_ops": self.quantized_ops, "weight_ops": self.weight_ops,
                "fp32_bytes": self.fp32_bytes, "int8_bytes": self.int8_bytes,
                "size_ratio": self.size_ratio}  # fmt: skip


def quantize_int8(
    fp32: Path,
    out: Path,
    calibration: np.ndarray,
    *,
    probabilities_output: str = "probabilities",
    batch_size: int = 64,
) -> QuantizedModel:
    """Write ``out``: the int8 (QDQ, per-channel) version of the fp32 ONNX file ``fp32``.

    calibration: (N, C, H, W) float32 validation images, preprocessed like the fp32 path. Only the nodes
    ``probabilities_output`` depends on are quantized. The fp32 file's metadata (``imgflow.ood``,
    ``imgflow.conformal``) is copied over. Raises :class:`QuantizationError` when ORT raises or
    quantizes none of the weight ops (the model's ops have no int8 kernels).
    """
    import onnx

    if len(calibration) == 0:
        raise QuantizationError("int8 calibration needs validation images; none were given")
    try:
        model = onnx.load(str(fp32))
    except Exception as e:  # a protobuf/IO error from deep inside onnx: say what was given
        raise QuantizationError(f"{fp32}: not a readable ONNX model ({e.__class__.__name__}: {e})") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imgflow-int8-") as tmp:
        source = _preprocessed(fp32, Path(tmp) / "prep.onnx")
        prepared = onnx.load(str(source))
        keep = _nodes_for(prepared, probabilities_output)
        _quantize(source, out, calibration, prepared, keep, batch_size=batch_size)
    quantized, weight_ops = _count_quantized(onnx.load(str(out)), model)
    if quantized == 0:
        out.unlink(missing_ok=True)
        ops = sorted({n.op_type for n in model.graph.node})
        raise QuantizationError(
            f"ONNX Runtime quantized none of this model's weight ops ({', '.join(WEIGHT_OPS)}); its ops are "
            f"{', '.join(ops)}. Ship the fp32 ONNX export instead (imgflow export --format onnx)."
        )
    _copy_metadata(model, out)
    return QuantizedModel(path=out, calibration_images=len(calibration), quantized_ops=quantized,
                          weight_ops=weight_ops, fp32_bytes=fp32.stat().st_size,
                          int8_bytes=out.stat().st_size)  # fmt: skip


def _preprocessed(fp32: Path, out: Path) -> Path:
    """ORT's recommended pre-processing (shape inference, graph optimisation: BatchNorm folded into Conv)
    so fewer, larger ops get quantized; the fp32 file itself when it cannot be pre-processed."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)
    except Exception as e:  # optional step: quantizing the plain graph is still correct
        logger.warning("quant_pre_process failed (%s); quantizing the graph as exported", e)
        return fp32
    return out


def _quantize(
    source: Path, out: Path, calibration: np.ndarray, model: Any, keep: set[str], *, batch_size: int
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    input_name = model.graph.input[0].name
    exclude = [n.name for n in model.graph.node if n.name not in keep]
    try:
        quantize_static(
            str(source), str(out), _Batches(input_name, calibration, batch_size),
            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax, reduce_range=True,
            nodes_to_exclude=exclude or None,
            # the classifier's logits stay fp32: 8-bit logits would put the softmax on a 1/255-ish grid
            extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm"]},
        )  # fmt: skip
    except Exception as e:  # ORT's own errors name the op; the user needs to know nothing was registered
        out.unlink(missing_ok=True)
        raise QuantizationError(
            f"ONNX Runtime could not quantize this model ({e.__class__.__name__}: {e}); nothing was registered"
        ) from e


def _nodes_for(model: Any, output: str) -> set[str]:
    """Names of the nodes to quantize: those ``output`` depends on that feed a weight op (or are one).

    What comes after the last weight op (the temperature division, the softmax) stays fp32: quantized,
    the probabilities would move in steps of 1/255 and a wrong class could get exactly 0 (infinite NLL).
    """
    producer = {o: n for n in model.graph.node for o in n.output}

    def upstream(*outputs: str) -> list[Any]:
        seen: dict[int, Any] = {}
        todo = list(outputs)
        while todo:
            node = producer.get(todo.pop())
            if node is None or id(node) in seen:
                continue
            seen[id(node)] = node
            todo.extend(node.input)
        return list(seen.values())

    weight_ops = [n for n in upstream(output) if n.op_type in WEIGHT_OPS]
    return {n.name for n in upstream(*(o for w in weight_ops for o in w.output))}


def _count_quantized(int8: Any, fp32: Any) -> tuple[int, int]:
    """(weight ops whose weights became int8, weight ops in the fp32 graph)."""
    weight_ops = sum(n.op_type in WEIGHT_OPS for n in fp32.graph.node)
    int8_inits = {i.name for i in int8.graph.initializer if i.data_type == 3}  # onnx.TensorProto.INT8
    dequantized = {n.output[0] for n in int8.graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in int8_inits}  # fmt: skip
    quantized = sum(n.op_type in WEIGHT_OPS and any(i in dequantized for i in n.input[1:])
                    for n in int8.graph.node)  # fmt: skip
    return quantized, weight_ops


def _copy_metadata(fp32: Any, out: Path) -> None:
    """The fp32 file's ``imgflow.*`` metadata (OOD threshold, conformal rule) onto the int8 file."""
    import onnx

    props = [(p.key, p.value) for p in fp32.metadata_props if p.key.startswith("imgflow.")]
    if not props:
        return
    model = onnx.load(str(out))
    have = {p.key for p in model.metadata_props}
    for key, value in props:
        if key not in have:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    onnx.save(model, str(out))


# --------------------------------------------------------------------------- accuracy vs fp32


@dataclass(frozen=True)
class AccuracyDelta:
    """int8 vs fp32 ONNX accuracy on the same labelled test images; ``passed`` when the drop is at most
    ``max_drop`` (``gates.max_int8_accuracy_drop``)."""

    images: int
    fp32_accuracy: float
    int8_accuracy: float
    labels_agree: float
    max_drop: float

    @property
    def drop(self) -> float:
        return self.fp32_accuracy - self.int8_accuracy

    @property
    def passed(self) -> bool:
        return self.drop <= self.max_drop + 1e-12

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "fp32_accuracy": self.fp32_accuracy, "int8_accuracy": self.int8_accuracy,
                "drop": self.drop, "labels_agree": self.labels_agree, "max_drop": self.max_drop,
                "passed": self.passed}  # fmt: skip


def accuracy_delta(
    fp32: Path, int8: Path, images: np.ndarray, targets: np.ndarray, *, max_drop: float, batch_size: int = 256
) -> AccuracyDelta:
    """images: (N, C, H, W) float32 preprocessed test images; targets: (N,) class indices."""
    from components.model.export import onnx_probabilities, onnx_session

    if len(images) == 0:
        raise QuantizationError("the int8 accuracy check needs labelled test images; none were given")

    def predicted(path: Path) -> np.ndarray:
        session = onnx_session(path)
        parts = [
            onnx_probabilities(session, images[i : i + batch_size]) for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(parts).argmax(1)

    ref, got = predicted(fp32), predicted(int8)
    targets = np.asarray(targets)
    return AccuracyDelta(images=len(images), fp32_accuracy=float(np.mean(ref == targets)),
                         int8_accuracy=float(np.mean(got == targets)), labels_agree=float(np.mean(ref == got)),
                         max_drop=max_drop)  # fmt: skip
