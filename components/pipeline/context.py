"""What every stage shares: where its files are, and the MLflow store and registry options it uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.core.config import Params
from components.data.manifest import DataPaths

if TYPE_CHECKING:
    from components.registry.tracking import Retry


@dataclass(frozen=True)
class StagePaths:
    """Every file a stage reads or writes, derived from ``project`` params."""

    params: Params

    @property
    def data(self) -> DataPaths:
        return DataPaths(self.params.project.data_dir)

    @property
    def state(self) -> Path:
        return self.params.project.state_dir

    def out(self, stage: str) -> Path:
        return self.params.project.output_dir / stage

    @property
    def run_file(self) -> Path:
        """``outputs/train/run.json``: the MLflow run the later stages log into."""
        return self.out("train") / "run.json"

    @property
    def decoded_cache(self) -> Path:
        """:func:`components.data.datasets.decoded_cache_dir` of this project."""
        from components.data.datasets import decoded_cache_dir

        return decoded_cache_dir(self.state)

    @property
    def mlartifacts(self) -> Path:
        """Where a local MLflow store keeps the artifacts of imgflow's experiment."""
        return self.state / "mlartifacts"


def connect_tracking(params: Params) -> str:
    """Point MLflow (tracking and registry) at ``register.tracking_uri`` — which the entry points
    fill from ``$MLFLOW_TRACKING_URI`` when unset — else a sqlite store under ``project.state_dir``.
    Returns the URI in use."""
    from components.registry import tracking

    return tracking.configure(params.register_.tracking_uri, state_dir=params.project.state_dir)


def experiment_id(params: Params) -> str:
    """The id of ``register.experiment`` (created on first use) in the connected store."""
    from components.registry import tracking

    return tracking.ensure_experiment(
        params.register_.experiment, artifact_root=StagePaths(params).mlartifacts
    )


def registry_options(params: Params) -> dict[str, Any]:
    """Keyword options of every promotion call: the lock timeout and the retry policy."""
    cfg = params.register_
    return {"lock_timeout_s": cfg.lock_timeout_s, "retry": registry_retry(params)}


def registry_retry(params: Params) -> Retry:
    """How registry calls retry: ``register.retries`` attempts, ``register.retry_backoff_s`` apart."""
    from components.registry.tracking import Retry

    cfg = params.register_
    return Retry(attempts=cfg.retries, backoff_s=cfg.retry_backoff_s)
