"""``imgflow tune`` as a stage: the sweep of :mod:`components.train.tune`, recorded in MLflow.

The train package knows nothing of MLflow (it sits below the registry): it records trials through
a :class:`~components.train.tune.SweepLog`. This module builds that log over
:mod:`components.registry.tracking`: one parent run ``tune`` with the resolved params and the
provenance, and one nested child run per trial (``mlflow.parentRunId``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.core.config import Params
from components.registry import tracking
from components.train.ray_adapter import RayOptions
from components.train.tune import SweepSpec, prepare_sweep, sweep


class MlflowSweepLog:
    """A :class:`~components.train.tune.SweepLog` writing nested MLflow runs under ``parent_run_id``."""

    def __init__(self, *, experiment_id: str, parent_run_id: str, tracking_uri: str) -> None:
        self.experiment_id, self.parent_run_id, self.tracking_uri = experiment_id, parent_run_id, tracking_uri

    def start_trial_run(self, *, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        run = tracking.start_run(
            self.experiment_id, run_name=run_name, params=params,
            tags={"mlflow.parentRunId": self.parent_run_id, **tags}, tracking_uri=self.tracking_uri,
        )  # fmt: skip
        return run.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], *, step: int | None = None) -> None:
        tracking.log_metrics(run_id, metrics, step=step)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        tracking.set_tags(run_id, tags)

    def log_artifacts(self, run_id: str, paths: Sequence[Path], *, artifact_path: str) -> None:
        tracking.log_artifacts(run_id, paths, artifact_path=artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        tracking.end_run(run_id, status=status)


def _parent_run(params: Params, spec: SweepSpec, uri: str) -> Any:
    """The MLflow run ``tune`` the trials nest under: the resolved params and provenance."""
    from components.core.provenance import git_commit
    from components.data.manifest import DataPaths, data_version

    exp_id = tracking.ensure_experiment(
        params.register_.experiment, artifact_root=params.project.state_dir / "mlartifacts"
    )
    tags = {
        "stage": "tune", "data_version": data_version(DataPaths(params.project.data_dir).manifest),
        "git_commit": git_commit(), "params_hash": params.fingerprint(), "ray_tune_run": spec.name,
        "search_space": json.dumps(spec.space, sort_keys=True),
    }  # fmt: skip
    return tracking.start_run(exp_id, run_name="tune", params=params.to_dict(), tags=tags, tracking_uri=uri)


def run_tune(
    params: Params,
    *,
    num_samples: int | None = None,
    progress: bool = True,
    ray_options: RayOptions | None = None,
) -> dict[str, Any]:
    """Sweep ``tune.search_space`` with Ray Tune (see :func:`components.train.tune.sweep`), every trial
    a nested MLflow run; the parent run is marked FAILED when the sweep fails.

    Returns the best trial, the trial table, the files written and the parent run (``run_id``,
    ``tracking_uri``, ``experiment_id``).
    """
    spec, setup = prepare_sweep(params, num_samples, ray_options=ray_options)
    uri = tracking.configure(params.register_.tracking_uri, state_dir=params.project.state_dir)
    parent = _parent_run(params, spec, uri)
    log = MlflowSweepLog(experiment_id=parent.experiment_id, parent_run_id=parent.run_id, tracking_uri=uri)
    try:
        summary = sweep(params, spec, setup, log, progress=progress, ray_options=ray_options)
    except BaseException:
        tracking.end_run(parent.run_id, status="FAILED")
        raise
    return {**summary, "tracking_uri": parent.tracking_uri, "experiment_id": parent.experiment_id}
