"""One task per pipeline stage, plus the retrain check and the webhook.

Policy: DVC owns caching of stage outputs, so no Prefect result caching (``NO_CACHE``); retries
only where the failure is I/O against something outside the process (downloading the source
data, the MLflow registry, the webhook) — Ray Train recovers from worker failures itself.
Task run names say what each run does (``<task> [<what>]``), and the retrain check, the gate
verdict and the registration leave Prefect artifacts, so the Prefect UI tells the story of a run.
"""

from __future__ import annotations

import json
import os
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from components.core.config import Params
from components.core.errors import DataUnavailableError, ImgflowError, TrackingError
from components.pipeline import notify as notify_lib
from components.pipeline import stages

WEBHOOK_ENV = "IMGFLOW_WEBHOOK_URL"
TRANSIENT = (TrackingError, DataUnavailableError, notify_lib.NotifyError)
"""Project errors that are I/O (a server or the network), worth a retry; any other ImgflowError is
the user's input (bad path, bad params, failed validation) and a retry cannot fix it."""


def retry_on_io(_task: Any, _task_run: Any, state: Any) -> bool:
    """``retry_condition_fn`` of the I/O tasks: retry unless the failure is the user's input."""
    exc = state.data
    return isinstance(exc, TRANSIENT) or not isinstance(exc, ImgflowError)


@task(
    name="ingest-images",
    task_run_name="ingest-images [{params.ingest.source}]",
    cache_policy=NO_CACHE,
    retries=2,
    retry_condition_fn=retry_on_io,
    retry_delay_seconds=10,
)
def ingest(params: Params) -> dict[str, Any]:
    summary = stages.run_ingest(params, progress=False)
    get_run_logger().info(
        "ingested %s images (%s quarantined) from %s; data version %s",
        summary["ingested"], summary["quarantined"], summary["source"], summary["data_version"],
    )  # fmt: skip
    return summary


@task(
    name="check-retrain-needed",
    task_run_name="check-retrain-needed [{params.register_.model_name}@champion vs data and params]",
    cache_policy=NO_CACHE,
    retries=2,
    retry_condition_fn=retry_on_io,
    retry_delay_seconds=5,
)
def check_freshness(params: Params, force: bool = False) -> dict[str, Any]:
    """Is the champion already trained on this data version with these training params?"""
    result = stages.run_check_freshness(params, force=force)
    create_markdown_artifact(
        notify_lib.freshness_markdown(result), key="retrain-check", description=result["status"]
    )
    get_run_logger().info("%s: %s", result["status"], result["reason"])
    return result


@task(name="validate-manifest", task_run_name="validate-manifest [Great Expectations]", cache_policy=NO_CACHE)
def validate(params: Params) -> dict[str, Any]:
    result = stages.run_validate(params)
    get_run_logger().info("data validation passed; report %s", result["report_html"])
    return result


@task(
    name="audit-labels", task_run_name="audit-labels [cleanlab, {params.audit.action}]", cache_policy=NO_CACHE
)
def audit(params: Params) -> dict[str, Any]:
    result = stages.run_audit(params, progress=False)
    get_run_logger().info(
        "label audit of %s images: %s; vs previous data version: %s",
        result["audited"], result["issues"], result["ledger"]["totals"],
    )  # fmt: skip
    return result


@task(name="clip-baseline", task_run_name="clip-baseline [{params.baseline.model}]", cache_policy=NO_CACHE)
def baseline(params: Params) -> dict[str, Any]:
    """Zero-shot + linear-probe CLIP baselines; without weights it is skipped, not failed."""
    result = stages.run_baseline(params)
    log = get_run_logger()
    from components.baseline.clip_baseline import summary_line

    (log.info if result["status"] == "ok" else log.warning)("CLIP baseline %s", summary_line(result))
    return result


@task(
    name="train-model-on-ray",
    task_run_name="train-model-on-ray [{params.train.model}, {params.train.epochs} epochs]",
    cache_policy=NO_CACHE,
)
def train(params: Params) -> dict[str, Any]:
    from components.train.ray_adapter import RayOptions

    result = stages.run_train(params, progress=True, ray_options=RayOptions.from_env(os.environ))
    get_run_logger().info(
        "trained: val_accuracy %.4f (MLflow run %s)", result["val_accuracy"], result["run_id"]
    )
    return result


def _run_ref(params: Params, run_id: str) -> str:
    """Markdown pointing at the training run (experiment id and URI come from ``run.json``)."""
    run = json.loads(stages.StagePaths(params).run_file.read_text())
    return notify_lib.mlflow_run_ref(run["tracking_uri"], run.get("experiment_id"), run_id)


@task(
    name="evaluate-and-gate",
    task_run_name="evaluate-and-gate [test split, champion comparison]",
    cache_policy=NO_CACHE,
)
def evaluate(params: Params) -> dict[str, Any]:
    result = stages.run_evaluate(params)
    create_markdown_artifact(
        notify_lib.gate_markdown(result, run_ref=_run_ref(params, result["run_id"])),
        key="gate-verdict",
        description=result["verdict"],
    )
    create_table_artifact(notify_lib.gate_rows(result["gates"]), key="gate-table", description="every gate")
    get_run_logger().info("%s; gates passed: %s", notify_lib.headline_text(result), result["gates_passed"])
    return result


@task(
    name="register-model",
    task_run_name="register-model [{params.register_.model_name}]",
    cache_policy=NO_CACHE,
    # No task-level retries: every registry call already retries with backoff
    # (register.retries / retry_backoff_s); re-running the whole task after a partial success
    # would register a second version of the same run.
)
def register(params: Params) -> dict[str, Any]:
    result = stages.run_register(params, raise_on_gate_failure=False)
    create_markdown_artifact(
        notify_lib.registration_markdown(result, run_ref=_run_ref(params, result["run_id"])),
        key="registration",
    )
    log = get_run_logger()
    if result["gates_passed"]:
        log.info("registered %s v%s as %s", result["name"], result["version"], ", ".join(result["aliases"]))
    else:
        log.warning(stages.gate_failure_message(result))
    return result


def webhook_url(params: Params) -> str | None:
    """``notify.webhook_url``, else ``$IMGFLOW_WEBHOOK_URL`` (read here: components never read env)."""
    return params.notify.webhook_url or os.environ.get(WEBHOOK_ENV) or None


@task(
    name="notify-webhook",
    task_run_name="notify-webhook [{event}]",
    cache_policy=NO_CACHE,
    retries=2,
    retry_condition_fn=retry_on_io,
    retry_delay_seconds=5,
)
def notify(params: Params, event: str, summary: str, details: dict[str, Any]) -> int | None:
    """POST the event to the webhook when one is configured and ``notify.events`` lists it."""
    url = webhook_url(params)
    if url is None or event not in params.notify.events:
        return None
    payload = notify_lib.build_payload(event, summary=summary, **details)
    return notify_lib.post_webhook(url, payload, timeout_s=params.notify.timeout_s)
