"""One task per pipeline stage, plus the retrain check and the webhook.

Policy: DVC owns caching of stage outputs, so no Prefect result caching (``NO_CACHE``); retries
only where the failure is I/O against something outside the process (downloading the source
data, the MLflow registry, the webhook) — Ray Train recovers from worker failures itself.
Task run names say what each run does (``<task> [<what>]``), and the retrain check, the gate
verdict and the registration leave Prefect artifacts, so the Prefect UI tells the story of a run.

Each task reports its result in one line: to Prefect's run logger (the UI) and to the
``imgflow.console`` logger, which the CLI prints as the one line per stage a person sees.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from components.core.config import Params
from components.core.errors import DataUnavailableError, ImgflowError, TrackingError
from components.pipeline import notify as notify_lib
from components.pipeline import stages
from components.pipeline.context import StagePaths

if TYPE_CHECKING:
    from components.data.ingest import IngestSummary
    from components.pipeline.freshness import Freshness
    from components.pipeline.records import (
        AuditSummary,
        BaselineResult,
        Evaluation,
        TrainedRun,
        ValidationResult,
    )
    from components.registry.registry import Registration
    from components.train.ray_adapter import RayOptions

TRANSIENT = (TrackingError, DataUnavailableError, notify_lib.NotifyError)
"""Project errors that are I/O (a server or the network), worth a retry; any other ImgflowError is
the user's input (bad path, bad params, failed validation) and a retry cannot fix it."""

CONSOLE = logging.getLogger("imgflow.console")
"""One line per stage for the person at the terminal; the CLI gives it a handler (elsewhere, e.g.
under a Prefect worker, it has none and the run logger's copy of the line is what is kept)."""


def retry_on_io(_task: Any, _task_run: Any, state: Any) -> bool:
    """``retry_condition_fn`` of the I/O tasks: retry unless the failure is the user's input."""
    exc = state.data
    return isinstance(exc, TRANSIENT) or not isinstance(exc, ImgflowError)


def report(stage: str, line: str, *, level: int = logging.INFO) -> None:
    """A stage's result in one line: to the Prefect run (its UI) and to the console."""
    get_run_logger().log(level, line)
    CONSOLE.log(level, "%-9s %s", stage, line)


@task(
    name="ingest-images",
    task_run_name="ingest-images [{params.ingest.source}]",
    cache_policy=NO_CACHE,
    retries=2,
    retry_condition_fn=retry_on_io,
    retry_delay_seconds=10,
)
def ingest(params: Params, progress: bool = False) -> IngestSummary:
    summary = stages.run_ingest(params, progress=progress)
    report(
        "ingest",
        f"{summary.ingested} images ({summary.quarantined} quarantined) from {summary.source}; "
        f"data version {summary.data_version}",
    )
    return summary


@task(
    name="check-retrain-needed",
    task_run_name="check-retrain-needed [{params.register_.model_name}@champion vs data and params]",
    cache_policy=NO_CACHE,
    retries=2,
    retry_condition_fn=retry_on_io,
    retry_delay_seconds=5,
)
def check_freshness(params: Params, force: bool = False) -> Freshness:
    """Is the champion already trained on this data version with these training params?"""
    result = stages.run_check_freshness(params, force=force)
    create_markdown_artifact(
        notify_lib.freshness_markdown(result), key="retrain-check", description=result.status
    )
    report("check", f"{result.status}: {result.reason}")
    return result


@task(name="validate-manifest", task_run_name="validate-manifest [Great Expectations]", cache_policy=NO_CACHE)
def validate(params: Params) -> ValidationResult:
    result = stages.run_validate(params)
    warned = (
        f" with {len(result.warnings)} warning(s): {', '.join(result.warnings)}" if result.warnings else ""
    )
    report("validate", f"passed{warned}; report {result.report_html}")
    return result


@task(
    name="audit-labels", task_run_name="audit-labels [cleanlab, {params.audit.action}]", cache_policy=NO_CACHE
)
def audit(params: Params, progress: bool = False) -> AuditSummary:
    result = stages.run_audit(params, progress=progress)
    issues = ", ".join(f"{k} {v}" for k, v in result.issues.items())
    ledger = ", ".join(f"{k} {v}" for k, v in result.ledger.totals.items())
    report("audit", f"{result.audited} images: {issues}; vs previous data version: {ledger}")
    return result


@task(name="clip-baseline", task_run_name="clip-baseline [{params.baseline.model}]", cache_policy=NO_CACHE)
def baseline(params: Params, behind_proxy: bool = False) -> BaselineResult:
    """Zero-shot + linear-probe CLIP baselines; without weights it is skipped, not failed."""
    from components.baseline.records import summary_line

    result = stages.run_baseline(params, behind_proxy=behind_proxy)
    report(
        "baseline",
        summary_line(result.summary),
        level=logging.INFO if result.status == "ok" else logging.WARNING,
    )
    return result


def _train_run_name() -> str:
    """``train-model-on-ray [<model>, <epochs> epochs]``, ``auto`` for a key the auto recipe will choose
    (the params' literal defaults would name a model that may not be trained)."""
    from prefect.runtime import task_run

    cfg = task_run.parameters["params"].train
    auto = cfg.recipe == "auto"

    def shown(key: str) -> str:
        return str(getattr(cfg, key)) if not auto or key in cfg.model_fields_set else "auto"

    return f"train-model-on-ray [{shown('model')}, {shown('epochs')} epochs]"


@task(name="train-model-on-ray", task_run_name=_train_run_name, cache_policy=NO_CACHE)
def train(params: Params, progress: bool = True, ray_options: RayOptions | None = None) -> TrainedRun:
    result = stages.run_train(params, progress=progress, ray_options=ray_options)
    acc = "-" if result.val_accuracy is None else f"{result.val_accuracy:.4f}"
    report(
        "train",
        f"val_accuracy {acc} after {result.epochs} epochs in {result.seconds:.0f}s (MLflow run {result.run_id})",
    )
    return result


def _run_ref(params: Params, run_id: str) -> str:
    """Markdown pointing at the training run (experiment id and URI come from ``run.json``)."""
    run = json.loads(StagePaths(params).run_file.read_text())
    return notify_lib.mlflow_run_ref(run["tracking_uri"], run.get("experiment_id"), run_id)


@task(
    name="evaluate-and-gate",
    task_run_name="evaluate-and-gate [test split, champion comparison]",
    cache_policy=NO_CACHE,
)
def evaluate(params: Params, progress: bool = False) -> Evaluation:
    result = stages.run_evaluate(params, progress=progress)
    create_markdown_artifact(
        notify_lib.gate_markdown(result, run_ref=_run_ref(params, result.run_id)),
        key="gate-verdict",
        description=result.verdict,
    )
    create_table_artifact(
        notify_lib.gate_rows(result.gates.to_dict()), key="gate-table", description="every gate"
    )
    gates = "passed" if result.gates_passed else f"FAILED ({result.verdict})"
    report("evaluate", f"{notify_lib.headline_text(result)}; gates {gates}; report {result.report_html}")
    return result


@task(
    name="register-model",
    task_run_name="register-model [{params.register_.model_name}]",
    cache_policy=NO_CACHE,
    # No task-level retries: every registry call already retries with backoff
    # (register.retries / retry_backoff_s); re-running the whole task after a partial success
    # would register a second version of the same run.
)
def register(params: Params) -> Registration:
    result = stages.run_register(params, raise_on_gate_failure=False)
    create_markdown_artifact(
        notify_lib.registration_markdown(result, run_ref=_run_ref(params, result.run_id)),
        key="registration",
    )
    if result.gates_passed:
        report("register", f"{result.name} version {result.version} as {', '.join(result.aliases)}")
    else:
        report("register", result.failure_message(), level=logging.WARNING)
    return result


@task(
    name="notify-webhook",
    task_run_name="notify-webhook [{event}]",
    cache_policy=NO_CACHE,
    retries=2,
    retry_condition_fn=retry_on_io,
    retry_delay_seconds=5,
)
def notify(params: Params, url: str | None, event: str, summary: str, details: dict[str, Any]) -> int | None:
    """POST the event to ``url`` (the entry point's ``flows.environment.webhook_url``) when there is
    one and ``notify.events`` lists the event."""
    if url is None or event not in params.notify.events:
        return None
    payload = notify_lib.build_payload(event, summary=summary, **details)
    return notify_lib.post_webhook(url, payload, timeout_s=params.notify.timeout_s)
