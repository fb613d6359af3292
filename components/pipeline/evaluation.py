"""The evaluate stage's registry side: which model is evaluated, which champion it is compared
with, and the MLflow run its results go into.

The evaluation itself (:mod:`components.evaluate.stage`) never asks the registry: this module looks
the champion up, downloads model folders, opens and closes MLflow runs, and logs what
:func:`~components.evaluate.stage.evaluate_model` hands back.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from components.core.config import Params
from components.data.manifest import DataPaths, data_version
from components.evaluate.champion import Champion, needs_champion_files
from components.evaluate.stage import (
    REGISTERED_DIR,
    Evaluated,
    evaluate_model,
    model_slug,
    trained_model_dir,
)
from components.pipeline.context import experiment_id
from components.pipeline.records import Evaluation


def evaluate_trained(params: Params, *, run_id: str, data_version: str | None, out_dir: Path) -> Evaluation:
    """Evaluate ``outputs/train/model`` into its training run ``run_id`` (from ``outputs/train/run.json``)."""
    model_dir = trained_model_dir(params)
    context = {"model": str(model_dir), "training run": run_id, "data version": data_version,
               "recipe": _recipe_decisions(model_dir.parent / "recipe.json")}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="imgflow-eval-") as tmp:
        champion = find_champion(params, Path(tmp), own_version=None)
        evaluated = evaluate_model(params, model_dir, out_dir=out_dir, run_id=run_id, context=context,
                                   champion=champion)  # fmt: skip
    log_evaluation(evaluated, run_id)
    return Evaluation.from_dict(evaluated.result)


def _recipe_decisions(path: Path) -> list[dict[str, Any]] | None:
    """The training recipe's decisions (``outputs/train/recipe.json``, train.recipe: auto) for the report."""
    if not path.exists():
        return None
    decisions: list[dict[str, Any]] = json.loads(path.read_text()).get("decisions") or []
    return decisions


def evaluate_registered(params: Params, model_uri: str, *, out_root: Path) -> Evaluation:
    """Evaluate a registered model in a new MLflow run; the report goes to ``out_root/models/<slug>``."""
    from components.registry import tracking

    paths = DataPaths(params.project.data_dir)
    with tempfile.TemporaryDirectory(prefix="imgflow-eval-") as tmp:
        model_dir = tracking.download_model_dir(model_uri, Path(tmp) / "evaluated")
        run_id = tracking.start_run(experiment_id(params), run_name=f"evaluate {model_uri}",
                                    params=params.to_dict(), tags={"evaluated_model": model_uri}).run_id  # fmt: skip
        context = {
            "model": model_uri,
            "evaluation run": run_id,
            "data version": data_version(paths.manifest),
        }
        try:
            own = own_version(params, model_uri)
            evaluated = evaluate_model(
                params, model_dir, out_dir=out_root / REGISTERED_DIR / model_slug(model_uri), run_id=run_id,
                context=context, champion=find_champion(params, Path(tmp), own_version=own), own_version=own,
            )  # fmt: skip
            log_evaluation(evaluated, run_id)
        except BaseException:
            tracking.end_run(run_id, status="FAILED")
            raise
    tracking.end_run(run_id)
    return Evaluation.from_dict(evaluated.result)


def find_champion(params: Params, tmp: Path, *, own_version: str | None) -> Champion | None:
    """The registry's champion of ``register.model_name``, its files downloaded into ``tmp`` when the
    evaluation will re-run it; None when ``evaluate.compare_champion`` is off (the registry is not asked)."""
    from components.registry import tracking
    from components.registry.registry import CHAMPION

    if not params.evaluate.compare_champion:
        return None
    name = params.register_.model_name
    version = tracking.alias_version(name, CHAMPION)
    uri = f"models:/{name}@{CHAMPION}"
    fetch = needs_champion_files(params, version=version, own_version=own_version)
    model_dir = tracking.download_model_dir(uri, tmp / "champion") if fetch else None
    return Champion(alias=CHAMPION, version=version, uri=uri, model_dir=model_dir)


def own_version(params: Params, model_uri: str) -> str | None:
    """The registry version a ``models:/<name>@<alias>`` or ``models:/<name>/<n>`` URI names, if any."""
    from components.registry import tracking

    rest = model_uri.removeprefix("models:/")
    if rest == model_uri or not rest.startswith(params.register_.model_name):
        return None
    tail = rest[len(params.register_.model_name) :]
    if tail.startswith("@"):
        return tracking.alias_version(params.register_.model_name, tail[1:])
    return tail.lstrip("/") or None


def log_evaluation(evaluated: Evaluated, run_id: str) -> None:
    """The evaluation's scalars (``test_*``), the baselines' headline metrics, the report files
    (under ``evaluate/``) and its tags, into MLflow run ``run_id``."""
    from components.registry import tracking

    tracking.log_metrics(run_id, evaluated.scalars, prefix="test_")
    tracking.log_metrics(run_id, evaluated.baseline_scalars)
    tracking.log_artifacts(run_id, list(evaluated.files), artifact_path="evaluate")
    tracking.set_tags(run_id, evaluated.tags)
