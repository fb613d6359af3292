"""The served imgflow model, as an MLflow *models-from-code* file.

:func:`components.registry.tracking.log_pyfunc_model` passes this file's **path** as
``python_model``: MLflow copies the file into the logged model and runs it whenever the model is
loaded, and the last line hands MLflow the model object (``mlflow.models.set_model``). No object is
pickled, so loading a model from a registry unpickles nothing. The weights and the spec travel as
the pyfunc's ``model_dir`` artifact (``model.safetensors`` + ``model.json``); the ``components``
package travels as its ``code_paths``.

Nothing imports this module: MLflow executes it (``set_model`` on import is the protocol).

Input: ``DataFrame{image: bytes | base64 text}``. Output: ``DataFrame{labels, label, score,
probabilities[, ood_score, ood, prediction_set]}`` -- ``labels`` is the predicted label set (multi-label: every label at or above its
tuned threshold, possibly none; single-label: the top class); ``probabilities`` (K,) per row in the
spec's class order, temperature-scaled (softmax, or a sigmoid per label for multi-label models). ``ood_score`` / ``ood``
and ``prediction_set`` come with models whose folder has an OOD detector / conformal sets
(:mod:`components.model.uncertainty`); a model registered before those existed has no such columns.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

from components.core.errors import DataError

IMAGE_COLUMN = "image"


def _as_bytes(value: Any) -> bytes:
    """A cell of the ``image`` column: raw bytes, or base64 text (JSON clients)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise DataError(
                "the image column holds text that is not base64: send file bytes or base64"
            ) from e
    raise DataError(f"the image column holds {type(value).__name__}: send file bytes or base64 text")


def _cells(model_input: Any) -> list[Any]:
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise DataError(f"input needs an {IMAGE_COLUMN!r} column of image bytes (or base64)")
        return list(model_input[IMAGE_COLUMN].tolist())
    return list(model_input)


class ImageClassifierModel(PythonModel):
    """MLflow pyfunc: image bytes in, label set, top label, its score and all probabilities out."""

    def load_context(self, context: PythonModelContext) -> None:
        from components.model.checkpoint import Predictor

        self.predictor = Predictor.from_dir(Path(context.artifacts["model_dir"]))

    # A DataFrame hint is one MLflow derives no schema from (the logged signature says it: one
    # binary ``image`` column) and it stops MLflow's "add type hints to predict" warning.
    def predict(
        self,
        context: PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        scored = self.predictor.predict_scored([_as_bytes(c) for c in _cells(model_input)])
        probs = scored.probs
        classes = self.predictor.spec.classes
        top = probs.argmax(axis=1)
        frame = pd.DataFrame(
            {
                "labels": self.predictor.label_sets(probs),
                "label": [classes[i] for i in top],
                "score": probs[range(len(top)), top].astype(float),
                "probabilities": [row.astype(float).tolist() for row in probs],
            }
        )
        # ood_score / ood / prediction_set: columns only when the model ships its detector / sets;
        # path / parent / parent_probability / parent_probabilities / answer only with a label tree.
        trust = pd.DataFrame(self.predictor.trust_fields(scored), index=frame.index)
        return pd.concat([frame, trust], axis=1) if len(trust.columns) else frame


mlflow.models.set_model(ImageClassifierModel())
