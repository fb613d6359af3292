"""MLflow adapter: every MLflow call in imgflow lives here.

Runs, metrics and artifacts; the registered pyfunc model (raw image bytes in, labels and
probabilities out); registry versions, tags and aliases.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from components.core.errors import DataError, TrackingError

logger = logging.getLogger(__name__)

T = TypeVar("T")
CANDIDATE, CHALLENGER, CHAMPION = "candidate", "challenger", "champion"
IMAGE_COLUMN = "image"


# --------------------------------------------------------------------------- connection


def resolve_tracking_uri(tracking_uri: str | None, *, state_dir: Path) -> str:
    """Explicit URI, else ``$MLFLOW_TRACKING_URI``, else a sqlite store under ``state_dir``."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    state_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(state_dir / 'mlflow.db').resolve()}"


def configure(tracking_uri: str | None, *, state_dir: Path) -> str:
    """Point MLflow (tracking and registry) at the store; returns the URI in use."""
    uri = resolve_tracking_uri(tracking_uri, state_dir=state_dir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 3, backoff_s: float = 1.0) -> T:
    """Call ``fn``; on connection-type failures retry with exponential backoff, then TrackingError."""
    last: Exception | None = None
    for i in range(attempts):
        try:
            return fn()
        except (MlflowException, OSError, ConnectionError) as e:
            last = e
            if isinstance(e, MlflowException) and e.get_http_status_code() in (400, 404, 409):
                break  # a real refusal, not a transient failure
            if i < attempts - 1:
                time.sleep(backoff_s * 2**i)
    raise TrackingError(
        f"MLflow call failed ({what}): {last}. Is the tracking server at the configured URI up?"
    )


def ensure_experiment(name: str, *, artifact_root: Path | None = None) -> str:
    """The experiment's id, created on first use (artifacts under ``artifact_root`` for local stores)."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None
    return str(mlflow.create_experiment(name, artifact_location=location))


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunRef:
    run_id: str
    experiment_id: str
    tracking_uri: str

    def to_dict(self) -> dict[str, str]:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.tracking_uri}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def start_run(
    experiment_id: str,
    *,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    tracking_uri: str | None = None,
) -> RunRef:
    """Create a run with the fully resolved params (flattened ``section.key``) and provenance tags."""
    client = MlflowClient()
    run = with_retries(
        lambda: client.create_run(experiment_id, run_name=run_name, tags=tags), what="create run"
    )
    flat = {k: str(v)[:6000] for k, v in _flatten(params).items()}
    items = [Param(k, v) for k, v in sorted(flat.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return RunRef(run.info.run_id, experiment_id, tracking_uri or mlflow.get_tracking_uri())


def log_metrics(run_id: str, metrics: dict[str, float], *, step: int | None = None, prefix: str = "") -> None:
    now = int(time.time() * 1000)
    items = [Metric(f"{prefix}{k}", float(v), now, step or 0) for k, v in metrics.items() if _is_number(v)]
    for i in range(0, len(items), 500):
        MlflowClient().log_batch(run_id, metrics=items[i : i + 500])


def log_history(run_id: str, history: Iterable[dict[str, Any]]) -> None:
    """Per-epoch metrics, ``step`` = epoch, so the MLflow UI draws curves."""
    for row in history:
        log_metrics(run_id, {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def log_artifacts(run_id: str, paths: Iterable[Path], *, artifact_path: str | None = None) -> None:
    client = MlflowClient()
    for p in paths:
        if p.is_dir():
            client.log_artifacts(run_id, str(p), artifact_path=artifact_path)
        elif p.exists():
            client.log_artifact(run_id, str(p), artifact_path=artifact_path)


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v))


def end_run(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status=status)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# --------------------------------------------------------------------------- the served model


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


class ImageClassifierModel(PythonModel):
    """MLflow pyfunc: ``DataFrame{image: bytes|base64}`` -> ``DataFrame{labels, label, score, probabilities}``.

    ``labels``: the predicted label set (multi-label: every label at or above its tuned threshold,
    possibly none; single-label: the top class). Probabilities are in the spec's class order,
    temperature-scaled (softmax, or a sigmoid per label for multi-label models).
    """

    def load_context(self, context: Any) -> None:
        from components.model.checkpoint import Predictor

        self.predictor = Predictor.from_dir(Path(context.artifacts["model_dir"]))

    # No type hints: MLflow would derive a (wrong) schema from them.
    def predict(self, context, model_input, params=None):
        if isinstance(model_input, pd.DataFrame):
            if IMAGE_COLUMN not in model_input.columns:
                raise DataError(f"input needs an {IMAGE_COLUMN!r} column of image bytes (or base64)")
            cells = model_input[IMAGE_COLUMN].tolist()
        else:
            cells = list(model_input)
        probs = self.predictor.predict_proba([_as_bytes(c) for c in cells])
        classes = self.predictor.spec.classes
        top = probs.argmax(axis=1)
        return pd.DataFrame(
            {
                "labels": self.predictor.label_sets(probs),
                "label": [classes[i] for i in top],
                "score": probs[range(len(top)), top].astype(float),
                "probabilities": [row.astype(float).tolist() for row in probs],
            }
        )


def log_pyfunc_model(
    run_id: str, *, model_dir: Path, example_image: bytes, pip_requirements: list[str]
) -> str:
    """Log the pyfunc into ``run_id``; returns its model URI (for registration)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    components_dir = Path(__file__).resolve().parent
    signature = ModelSignature(inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ImageClassifierModel(),
            artifacts={"model_dir": str(model_dir)},
            code_paths=[str(components_dir)],
            signature=signature,
            input_example=pd.DataFrame({IMAGE_COLUMN: [example_image]}),
            pip_requirements=pip_requirements,
        )
    return str(info.model_uri)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    aliases: tuple[str, ...]
    model_uri: str
    run_id: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "aliases": list(self.aliases),
            "model_uri": self.model_uri,
            "run_id": self.run_id,
            "champion_uri": f"models:/{self.name}@{CHAMPION}",
        }


def register(
    model_uri: str,
    *,
    name: str,
    run_id: str,
    tags: dict[str, str],
    aliases: Iterable[str],
    attempts: int = 3,
    backoff_s: float = 1.0,
) -> Registration:
    """Register a new version with ``tags`` and point ``aliases`` at it (promotion goes through
    :mod:`components.registry.registry`, which moves aliases under its lock; pass ``aliases=()`` there)."""
    client = MlflowClient()
    retry = partial(with_retries, attempts=attempts, backoff_s=backoff_s)
    mv = retry(lambda: mlflow.register_model(model_uri, name, tags=tags), what="register model")
    aliases = tuple(aliases)
    for alias in aliases:
        retry(partial(client.set_registered_model_alias, name, alias, mv.version), what=f"set alias {alias}")
    return Registration(
        name=name, version=str(mv.version), aliases=aliases, model_uri=model_uri, run_id=run_id
    )


def list_versions(name: str) -> list[dict[str, Any]]:
    """Registered versions, newest first, with aliases, tags and the run's test metrics."""
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.get_http_status_code() == 404 or "RESOURCE_DOES_NOT_EXIST" in str(e):
            return []
        raise TrackingError(f"cannot read the registry: {e}") from e
    alias_of: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        alias_of.setdefault(str(version), []).append(alias)
    out = []
    for mv in client.search_model_versions(f"name='{name}'"):
        metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
        out.append(
            {
                "name": name,
                "version": str(mv.version),
                "aliases": sorted(alias_of.get(str(mv.version), [])),
                "run_id": mv.run_id,
                "created": mv.creation_timestamp,
                "tags": dict(mv.tags or {}),
                "metrics": {k: v for k, v in sorted(metrics.items()) if k.startswith("test_")},
                "gates_passed": (mv.tags or {}).get("gates_passed") == "true",
            }
        )
    return sorted(out, key=lambda r: int(r["version"]), reverse=True)


def load_pyfunc(model_uri: str) -> Any:
    return mlflow.pyfunc.load_model(model_uri)


# --------------------------------------------------------------------------- models for evaluation


def alias_version(name: str, alias: str) -> str | None:
    """The version number ``alias`` points at, or None when the model or the alias does not exist."""
    try:
        mv = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if (
            e.get_http_status_code() == 404
            or "RESOURCE_DOES_NOT_EXIST" in str(e)
            or "INVALID_PARAMETER" in str(e)
            # the local (sqlite) store puts the code only in error_code: "alias champion not found"
            or e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
        ):
            return None
        raise TrackingError(f"cannot read alias {alias!r} of {name!r}: {e}") from e
    return str(mv.version)


def alias_provenance(name: str, alias: str) -> dict[str, str] | None:
    """What the version ``alias`` points at was trained from: its version tags overlaid with its
    training run's tags (``data_version``, ``params_hash``, ...) plus ``version`` and ``run_id``.
    None when the model or the alias does not exist."""
    version = alias_version(name, alias)
    if version is None:
        return None
    client = MlflowClient()
    mv = with_retries(lambda: client.get_model_version(name, version), what=f"read {name} v{version}")
    run_id = str(mv.run_id or "")
    return {**dict(mv.tags or {}), **_run_tags(client, run_id), "version": str(version), "run_id": run_id}


def _run_tags(client: MlflowClient, run_id: str) -> dict[str, str]:
    """A run's tags; ``{"training_run_missing": "true"}`` when the run was deleted (or garbage-
    collected): its provenance cannot be proven, so the retrain check treats the champion as stale."""
    if not run_id:
        return {"training_run_missing": "true"}
    try:
        run = client.get_run(run_id)
        return (
            {"training_run_missing": "true"} if run.info.lifecycle_stage == "deleted" else dict(run.data.tags)
        )
    except MlflowException as e:
        if e.get_http_status_code() == 404 or e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {"training_run_missing": "true"}
    return dict(with_retries(lambda: client.get_run(run_id), what=f"read run {run_id}").data.tags)


def download_model_dir(model_uri: str, dst: Path) -> Path:
    """Download a logged imgflow pyfunc (``models:/name@alias``, ``models:/name/3``, ``runs:/id/model``)
    and return its weights+spec folder (the one holding ``model.json``) under ``dst``.

    The files are read, not imported: loading the pyfunc would put the model's own copy of
    ``components`` on ``sys.path`` of this process.
    """
    from mlflow.artifacts import download_artifacts

    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except MlflowException as e:
        raise DataError(f"cannot load model {model_uri!r} from the registry: {e}") from e
    specs = sorted(local.rglob("model.json"))
    if not specs:
        raise DataError(f"{model_uri} is not an imgflow model: no model.json among its files")
    return specs[0].parent


# --------------------------------------------------------------------------- result-only runs (baselines)


def log_result_run(
    experiment_id: str,
    *,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    tracking_uri: str,
    metrics: dict[str, float] | None = None,
    metric_prefix: str = "",
    artifacts: Iterable[Path] = (),
    artifact_path: str | None = None,
    note: str | None = None,
) -> RunRef:
    """A whole, finished run in one call: params, tags, metrics, artifacts (e.g. a CLIP baseline).

    ``note`` becomes the run's description in the MLflow UI (e.g. why a baseline was skipped).
    """
    run = start_run(experiment_id, run_name=run_name, params=params, tags=tags, tracking_uri=tracking_uri)
    if note:
        set_tags(run.run_id, {"mlflow.note.content": note})
    log_metrics(run.run_id, metrics or {}, prefix=metric_prefix)
    log_artifacts(run.run_id, artifacts, artifact_path=artifact_path)
    end_run(run.run_id)
    return run


def resolve_model_version(model_uri: str) -> tuple[str, str, str] | None:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> (name, version, run id);
    None for other URIs (runs:/, local folders)."""
    rest = model_uri.removeprefix("models:/")
    if rest == model_uri:
        return None
    client = MlflowClient()
    if "@" in rest:
        name, alias = rest.split("@", 1)
        mv = with_retries(lambda: client.get_model_version_by_alias(name, alias), what=f"read {model_uri}")
    else:
        name, _, version = rest.rpartition("/")
        mv = with_retries(lambda: client.get_model_version(name, version), what=f"read {model_uri}")
    return name, str(mv.version), str(mv.run_id or "")


def attach_to_version(name: str, version: str, run_id: str, files: list[Path], *, artifact_path: str,
                      tags: dict[str, str]) -> None:  # fmt: skip
    """Log ``files`` into the version's run under ``artifact_path`` and tag the version."""
    client = MlflowClient()
    for f in files:
        with_retries(partial(client.log_artifact, run_id, str(f), artifact_path), what=f"log {f.name}")
    for k, v in tags.items():
        with_retries(
            partial(client.set_model_version_tag, name, version, k, v), what=f"tag version {version}"
        )
