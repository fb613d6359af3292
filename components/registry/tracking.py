"""MLflow adapter: runs, metrics, artifacts, the logged pyfunc and registry versions.

Every MLflow call of imgflow lives in this package (``components.registry``): this module holds
runs, metrics and artifacts, the registered pyfunc model (raw image bytes in, labels and
probabilities out; logged as *models from code*, see :mod:`components.registry.pyfunc_model`) and
registry versions, tags, aliases and descriptions; :mod:`components.registry.registry` the
promotion rules and :mod:`components.registry.promotion_log` the promotion log.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from components.core.errors import ConfigError, DataError, TrackingError
from components.registry.store_schema import seed_store

logger = logging.getLogger(__name__)

T = TypeVar("T")
CANDIDATE, CHALLENGER, CHAMPION = "candidate", "challenger", "champion"
IMAGE_COLUMN = "image"


# --------------------------------------------------------------------------- connection


def resolve_tracking_uri(tracking_uri: str | None, *, state_dir: Path) -> str:
    """``tracking_uri`` (``register.tracking_uri``; entry points fill it from ``$MLFLOW_TRACKING_URI``
    when unset), else a sqlite store under ``state_dir``."""
    if tracking_uri:
        return tracking_uri
    state_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(state_dir / 'mlflow.db').resolve()}"


def configure(tracking_uri: str | None, *, state_dir: Path) -> str:
    """Point MLflow (tracking and registry) at the store; returns the URI in use."""
    uri = resolve_tracking_uri(tracking_uri, state_dir=state_dir)
    seed_store(uri)  # a new SQLite store: made from MLflow's shipped schema, not migrated
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 3, backoff_s: float = 1.0) -> T:
    """Call ``fn``; on connection-type failures retry with exponential backoff, then TrackingError
    naming the tracking URI.

    Each attempt already carries the MLflow client's own HTTP retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
    default 7, backoff factor ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``: about 4 minutes of a server that
    refuses connections); these attempts add what that layer does not retry: a connection dropped
    while the answer was being read (a server killed mid-request) or an error the server sent back.
    """
    last: Exception | None = None
    for i in range(attempts):
        try:
            return fn()
        except (MlflowException, OSError, ConnectionError) as e:
            last = e
            if isinstance(e, MlflowException) and e.get_http_status_code() in (400, 404, 409):
                break  # a real refusal, not a transient failure
            if i < attempts - 1:
                logger.warning("MLflow call failed (%s), retrying: %s", what, e)
                time.sleep(backoff_s * 2**i)
    uri = shown_uri(mlflow.get_tracking_uri())
    raise TrackingError(
        f"MLflow call failed ({what}) at {uri}: {last}. Is the tracking server at {uri} up? "
        "Files already written locally are kept: run the command again once it answers."
    )


def shown_uri(uri: str) -> str:
    """``uri`` without a password (``http://user:secret@host`` -> ``http://user:***@host``), for messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class Retry:
    """How registry calls retry when the tracking server does not answer."""

    attempts: int = 3
    backoff_s: float = 1.0

    def call(self, fn: Callable[[], T], what: str) -> T:
        return with_retries(fn, what=what, attempts=self.attempts, backoff_s=self.backoff_s)


def ensure_experiment(name: str, *, artifact_root: Path | None = None) -> str:
    """The experiment's id, created on first use (artifacts under ``artifact_root`` for local stores)."""
    exp = with_retries(lambda: mlflow.get_experiment_by_name(name), what=f"read experiment {name}")
    if exp is not None:
        return str(exp.experiment_id)
    location = artifact_root.resolve().as_uri() if artifact_root is not None else None

    def create() -> str:
        try:
            return str(mlflow.create_experiment(name, artifact_location=location))
        except MlflowException as e:  # created by an attempt whose answer was lost, or by another run
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
            exp = mlflow.get_experiment_by_name(name)
            if exp is None:
                raise
            return str(exp.experiment_id)

    return with_retries(create, what=f"create experiment {name}")


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
        batch = items[i : i + 100]
        with_retries(partial(client.log_batch, run.info.run_id, params=batch), what="log params")
    return RunRef(run.info.run_id, experiment_id, tracking_uri or mlflow.get_tracking_uri())


def log_metrics(run_id: str, metrics: dict[str, float], *, step: int | None = None, prefix: str = "") -> None:
    """Log ``metrics`` (numbers only) at ``step``; a retried batch logs the same rows again, which the
    stores keep once (same key, value, timestamp and step)."""
    now = int(time.time() * 1000)
    items = [Metric(f"{prefix}{k}", float(v), now, step or 0) for k, v in metrics.items() if _is_number(v)]
    client = MlflowClient()
    for i in range(0, len(items), 500):
        batch = items[i : i + 500]
        with_retries(partial(client.log_batch, run_id, metrics=batch), what="log metrics")


def log_history(run_id: str, history: Iterable[dict[str, Any]]) -> None:
    """Per-epoch metrics, ``step`` = epoch, so the MLflow UI draws curves."""
    for row in history:
        log_metrics(run_id, {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def log_artifacts(run_id: str, paths: Iterable[Path], *, artifact_path: str | None = None) -> None:
    client = MlflowClient()
    for p in paths:
        if p.is_dir():
            log = partial(client.log_artifacts, run_id, str(p), artifact_path=artifact_path)
        elif p.exists():
            log = partial(client.log_artifact, run_id, str(p), artifact_path=artifact_path)
        else:
            continue
        with_retries(log, what=f"log {p.name}")  # an upload is a PUT per file: safe to repeat


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for k, v in tags.items():
        with_retries(partial(client.set_tag, run_id, k, str(v)), what=f"tag run {run_id}")


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client = MlflowClient()
    with_retries(partial(client.set_terminated, run_id, status=status), what=f"end run {run_id}")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# --------------------------------------------------------------------------- the served model


PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
"""The models-from-code file MLflow runs to build the served model (see that module)."""


def log_pyfunc_model(
    run_id: str, *, model_dir: Path, example_image: bytes, pip_requirements: list[str]
) -> str:
    """Log the pyfunc into ``run_id`` as *models from code*; returns its model URI (for registration).

    The model is :data:`PYFUNC_MODEL_FILE` (run, not unpickled, on load), ``model_dir`` (weights +
    ``model.json``) its artifact and the ``components`` package its code.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    components_dir = Path(__file__).resolve().parents[1]
    signature = ModelSignature(inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]))
    # Object-dtype column labels: MLflow compares them with a range when it saves the example,
    # which pandas 3 deprecates (a warning) for its default string labels.
    example = pd.DataFrame({IMAGE_COLUMN: [example_image]}, columns=pd.Index([IMAGE_COLUMN], dtype=object))

    def log() -> str:
        # An active run (not Model.log(run_id=...)): the logged model then lands in the run's experiment
        # and under its artifact root, not in the Default experiment.
        with mlflow.start_run(run_id=run_id), _without_info("mlflow.pyfunc", "Validating input example"):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_MODEL_FILE),
                artifacts={"model_dir": str(model_dir)},
                code_paths=[str(components_dir)],
                signature=signature,
                input_example=example,
                pip_requirements=pip_requirements,
            )
        return str(info.model_uri)

    # A retry logs a fresh logged model; one an interrupted attempt left stays unregistered.
    return with_retries(log, what="log the model")


class _DropInfo(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and record.getMessage().startswith(self.prefix))


@contextmanager
def _without_info(logger_name: str, prefix: str) -> Iterator[None]:
    """Drop one INFO message of an MLflow logger while the block runs: with a signature and an
    input example (both needed: without the example MLflow warns) MLflow announces that it checks
    the one against the other on every registration -- a line of console noise, not a warning."""
    target, drop = logging.getLogger(logger_name), _DropInfo(prefix)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class RegisteredVersion:
    """One model version as :func:`register` created it (promotion: :mod:`components.registry.registry`)."""

    name: str
    version: str
    aliases: tuple[str, ...]
    model_uri: str
    run_id: str


def register(
    model_uri: str,
    *,
    name: str,
    run_id: str,
    tags: dict[str, str],
    aliases: Iterable[str],
    description: str | None = None,
    attempts: int = 3,
    backoff_s: float = 1.0,
) -> RegisteredVersion:
    """Register a new version with ``tags`` (and a Markdown ``description``) and point ``aliases``
    at it (promotion goes through :func:`components.registry.registry.register_version`, which
    moves aliases under its lock and passes ``aliases=()`` here).

    The client calls ``mlflow.register_model`` makes, without its two progress lines on stderr.
    """
    client = MlflowClient()
    retry = partial(with_retries, attempts=attempts, backoff_s=backoff_s)
    retry(lambda: _ensure_registered_model(client, name), what=f"create registered model {name}")
    model_id = _logged_model_id(model_uri)
    # await_creation_for=0: the waiting call logs "Waiting up to 300 seconds" even for a version
    # that is ready at once (open-source MLflow); _ready waits only for one that is not.
    mv = retry(
        lambda: client.create_model_version(name, model_uri, run_id=run_id, tags=tags,
                                            description=description, model_id=model_id, await_creation_for=0),
        what="register model",
    )  # fmt: skip
    mv = _ready(client, mv, retry=retry)
    if model_id is not None:
        _link_logged_model(client, model_id, name, str(mv.version))
    aliases = tuple(aliases)
    for alias in aliases:
        retry(partial(client.set_registered_model_alias, name, alias, mv.version), what=f"set alias {alias}")
    return RegisteredVersion(
        name=name, version=str(mv.version), aliases=aliases, model_uri=model_uri, run_id=run_id
    )


def _ready(client: MlflowClient, mv: ModelVersion, *, retry: Callable[..., ModelVersion],
           timeout_s: float = 300.0) -> ModelVersion:  # fmt: skip
    """``mv`` once its status is READY (a registry that copies files asynchronously starts at
    PENDING_REGISTRATION); TrackingError when it fails or stays pending."""
    deadline = time.monotonic() + timeout_s
    while mv.status == "PENDING_REGISTRATION" and time.monotonic() < deadline:
        time.sleep(1.0)
        mv = retry(partial(client.get_model_version, mv.name, mv.version), what=f"read version {mv.version}")
    if mv.status != "READY":
        raise TrackingError(
            f"{mv.name} version {mv.version} is {mv.status}: {mv.status_message or 'no reason given'}"
        )
    return mv


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _logged_model_id(model_uri: str) -> str | None:
    """``models:/m-<id>`` (what ``log_model`` returns in MLflow 3) -> ``m-<id>``; else None."""
    rest = model_uri.removeprefix("models:/")
    return rest if rest != model_uri and rest.startswith("m-") and "/" not in rest else None


def _link_logged_model(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """Record the version on its logged model (the ``mlflow.modelVersions`` tag the UI reads to show
    "registered versions" on the logged model's page), as ``mlflow.register_model`` does; a tracking
    server records it itself, a local store does not."""
    try:
        tags = client.get_logged_model(model_id).tags or {}
        versions = json.loads(tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
        if any(v.get("name") == name and str(v.get("version")) == version for v in versions):
            return
        versions.append({"name": name, "version": version})
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})
    except MlflowException as e:  # a link for the UI only: the version itself is registered
        logger.warning("could not link logged model %s to %s version %s: %s", model_id, name, version, e)


def set_descriptions(name: str, *, model: str | None = None, version: tuple[str, str] | None = None,
                     retry: Retry | None = None) -> None:  # fmt: skip
    """Write the registered model's Markdown description and/or one version's (``(version, text)``)."""
    client, retry = MlflowClient(), retry or Retry()
    if model is not None:
        retry.call(lambda: client.update_registered_model(name, description=model), f"describe {name}")
    if version is not None:
        number, text = version
        retry.call(
            lambda: client.update_model_version(name, number, description=text), f"describe {name} v{number}"
        )


def run_experiment_id(run_id: str, *, retry: Retry | None = None) -> str:
    """The experiment a run belongs to (links into the MLflow UI need it)."""
    client, retry = MlflowClient(), retry or Retry()
    return str(retry.call(lambda: client.get_run(run_id), f"read run {run_id}").info.experiment_id)


def list_versions(name: str) -> list[dict[str, Any]]:
    """Registered versions, newest first, with aliases, tags and the run's test metrics."""
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.get_http_status_code() == 404 or "RESOURCE_DOES_NOT_EXIST" in str(e):
            return []
        raise TrackingError(f"cannot read the registry at {shown_uri(mlflow.get_tracking_uri())}: {e}") from e
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
        uri = shown_uri(mlflow.get_tracking_uri())
        raise TrackingError(f"cannot read alias {alias!r} of {name!r} at {uri}: {e}") from e
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


def download_run_artifacts(run_id: str, artifact_path: str, dst: Path) -> tuple[Path, dict[str, str]]:
    """Download ``artifact_path`` of run ``run_id`` into ``dst``; returns the local path and the run's
    tags. An unknown (or deleted) run, or a run without that artifact, is a ConfigError naming it."""
    from mlflow.artifacts import download_artifacts

    tags = _run_tags(MlflowClient(), run_id)
    if tags.get("training_run_missing") == "true":
        raise ConfigError(f"no MLflow run {run_id!r} in {shown_uri(mlflow.get_tracking_uri())}")
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst))
    except (MlflowException, OSError) as e:
        raise ConfigError(f"MLflow run {run_id} has no {artifact_path!r} artifact: {e}") from e
    return Path(local), tags


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
