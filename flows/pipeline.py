"""The pipeline flow: ingest -> retrain check -> validate -> train (with the label audit and the CLIP
baseline beside it) -> evaluate -> register; a failed gate or a failed run is announced on the webhook."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from prefect import flow

from components.core.config import Params, load_params
from components.core.lock import project_lock
from components.pipeline import stages as pipeline_stages
from components.pipeline.notify import headline
from components.pipeline.records import UP_TO_DATE, Evaluation, PipelineResult
from flows.environment import behind_proxy, ray_options, webhook_url, with_environment
from tasks import stages

if TYPE_CHECKING:
    from components.data.ingest import IngestSummary
    from components.pipeline.records import AuditSummary, BaselineResult, TrainedRun
    from components.registry.registry import Registration


def _announce_failure(_flow: Any, flow_run: Any, state: Any) -> None:
    """on_failure hook: post ``run_failed`` (the params are re-read from the run's parameters)."""
    from components.pipeline import notify as notify_lib

    log = logging.getLogger("imgflow.pipeline")
    try:
        p = flow_run.parameters
        params = load_params(p.get("params_path", "params.yaml"), p.get("overrides") or [])
        url = webhook_url(params)
        if url is None or "run_failed" not in params.notify.events:
            return
        payload = notify_lib.build_payload(
            "run_failed",
            summary=f"pipeline run {flow_run.name} failed: {state.message}",
            flow_run_id=str(flow_run.id),
            flow_run_name=flow_run.name,
            message=str(state.message),
        )
        notify_lib.post_webhook(url, payload, timeout_s=params.notify.timeout_s)
    except Exception as e:  # a broken notification must not hide the run's own failure
        log.warning("could not announce the failed run: %s", e)


@flow(name="imgflow-pipeline", on_failure=[_announce_failure])
def pipeline(
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    force: bool = False,
    progress: bool = True,
    verbose: bool = False,
) -> PipelineResult:
    """Raw images to a registered (and, if the gates pass, champion) model.

    Stops after ingest with ``status: up to date`` when the champion was already trained on this
    data version with these training params; ``force`` retrains anyway. ``progress``: progress bars
    for the long steps; ``verbose``: Ray's own lines on the console too.
    """
    params = with_environment(load_params(params_path, overrides or []))
    # One writer per project for the whole run (the CLI may hold it already: re-entrant).
    with project_lock(params.project.state_dir, command="pipeline", complete=[params.project.data_dir]):
        return _stages(params, force=force, progress=progress, verbose=verbose)


def _stages(params: Params, *, force: bool, progress: bool, verbose: bool) -> PipelineResult:
    """The flow's body: each stage in order, stopping after the retrain check when up to date."""
    url = webhook_url(params)
    ingested = stages.ingest(params, progress)
    fresh = stages.check_freshness(params, force)
    if not fresh.retrain:
        _tell(
            params, url, "up_to_date", f"{fresh.model_name} is {UP_TO_DATE}: {fresh.reason}", fresh.to_dict()
        )
        return PipelineResult(status=UP_TO_DATE, ingest=ingested, freshness=fresh)
    stages.validate(params)
    audited, baseline, trained = _audit_baseline_train(params, ingested, progress=progress, verbose=verbose)
    evaluated = stages.evaluate(params, progress)
    registered = stages.register(params)
    _tell_verdict(params, url, registered, evaluated)
    return PipelineResult(
        status="trained", ingest=ingested, freshness=fresh, audit=audited, baseline=baseline,
        train=trained, evaluate=evaluated, register=registered,
    )  # fmt: skip


def _audit_baseline_train(
    params: Params, ingested: IngestSummary, *, progress: bool, verbose: bool
) -> tuple[AuditSummary | None, BaselineResult, TrainedRun]:
    """The label audit, the CLIP baseline and training.

    Training reads neither the baseline nor, with ``audit.action: report``, the audit: those then run
    beside it, as task runs in threads of this process, on the CPU that Ray's start and the workers'
    imports leave idle, and the flow waits for them before evaluate. An audit that excludes or fails
    on suspects runs first; a baseline that would use Ray or a GPU (both of which training holds) runs
    before training. The audit beside training draws no progress bars (training draws its own); a
    failure of either fails the run once training is done. Ray's runtime starts before anything runs
    beside training (:func:`components.pipeline.stages.runtime_for_training_and_side_stages`: why).
    """
    beside_audit = params.audit.enabled and params.audit.action == "report"
    audited = stages.audit(params, progress) if params.audit.enabled and not beside_audit else None
    beside_baseline = pipeline_stages.baseline_beside_training(params, images=ingested.ingested)
    # never fails for want of weights: then "skipped"
    baseline = None if beside_baseline else stages.baseline(params, behind_proxy())
    options = ray_options(verbose=verbose)
    with pipeline_stages.runtime_for_training_and_side_stages(options):
        audit_run = stages.audit.submit(params, False) if beside_audit else None
        baseline_run = stages.baseline.submit(params, behind_proxy()) if beside_baseline else None
        trained = stages.train(params, progress, options)
        audited = audit_run.result() if audit_run is not None else audited
        baseline = baseline_run.result() if baseline_run is not None else baseline
    if baseline is None:  # unreachable: the baseline ran before training or beside it
        raise RuntimeError("the CLIP baseline stage did not run")
    return audited, baseline, trained


def _tell(params: Params, url: str | None, event: str, summary: str, details: dict[str, Any]) -> None:
    """Post to the webhook at ``url``; a webhook that stays down is logged, it does not fail the run."""
    state = stages.notify(params, url, event, summary, details, return_state=True)
    if state.is_failed():
        stages.report(
            "notify", f"webhook notification {event} failed: {state.message}", level=logging.WARNING
        )


def _tell_verdict(params: Params, url: str | None, registered: Registration, evaluated: Evaluation) -> None:
    name, version = registered.name, registered.version
    metric, value = headline(evaluated)
    details = {
        "model": name,
        "version": version,
        "aliases": list(registered.aliases),
        "mlflow_run_id": registered.run_id,
        f"test_{metric}": value,
        "verdict": evaluated.verdict,
        "failed_gates": list(registered.failed_gates),
        "report_html": str(evaluated.report_html),
    }
    if registered.gates_passed:
        _tell(params, url, "promoted", f"{name} v{version} passed its gates and is champion", details)
    else:
        _tell(params, url, "gate_failed", f"{name} v{version} FAILED its gates: {evaluated.verdict}", details)
