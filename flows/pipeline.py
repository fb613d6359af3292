"""The pipeline flow: ingest -> validate -> audit -> CLIP baseline -> train -> evaluate -> register."""

from __future__ import annotations

from typing import Any

from prefect import flow

from components.config import load_params
from tasks import stages


@flow(name="imgflow-pipeline")
def pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """Raw images to a registered (and, if the gates pass, champion) model."""
    params = load_params(params_path, overrides or [])
    ingested = stages.ingest(params)
    stages.validate(params)
    audited = stages.audit(params) if params.audit.enabled else None
    baseline = stages.baseline(params)  # never fails for want of weights: then it is "skipped"
    trained = stages.train(params)
    evaluated = stages.evaluate(params)
    registered = stages.register(params)
    return {
        "ingest": ingested,
        "audit": audited,
        "baseline": baseline,
        "train": trained,
        "evaluate": evaluated,
        "register": registered,
    }
