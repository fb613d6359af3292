"""Telling people what a pipeline run did: webhook posts and the summaries the Prefect UI shows.

Pure functions build the text (markdown for Prefect artifacts, a JSON payload with a Slack-style
``text`` for webhooks); :func:`post_webhook` is the only I/O. No prefect import: the tasks turn these
strings into artifacts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import httpx

from components.core.errors import ImgflowError

if TYPE_CHECKING:
    from components.pipeline.freshness import Freshness
    from components.pipeline.records import Evaluation
    from components.registry.registry import Registration

logger = logging.getLogger(__name__)

EVENTS = ("gate_failed", "run_failed", "up_to_date", "promoted")


class NotifyError(ImgflowError):
    """The webhook could not be reached or refused the post."""


def mlflow_run_url(tracking_uri: str, experiment_id: str | None, run_id: str) -> str | None:
    """The MLflow UI page of a run when the store is a server (http/https), else None."""
    if not tracking_uri.startswith(("http://", "https://")) or not experiment_id:
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def mlflow_run_ref(tracking_uri: str, experiment_id: str | None, run_id: str) -> str:
    """Markdown pointing at a run: a link for a server, else how to open the local store's UI."""
    url = mlflow_run_url(tracking_uri, experiment_id, run_id)
    if url:
        return f"[MLflow run {run_id}]({url})"
    return (
        f"MLflow run `{run_id}` (experiment {experiment_id}) in `{tracking_uri}`; open it with "
        f"`mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1` (or `make ui`)"
    )


def gate_rows(gates: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per gate of a ``GateReport.to_dict()``: name, status, value, threshold, level."""
    return [
        {
            "gate": g["name"],
            "status": g.get("status", "pass" if g["passed"] else "FAIL"),
            "value": round(float(g["value"]), 4),
            "threshold": g.get("comparison", ">=") + " " + f"{float(g['threshold']):g}",
            "level": g.get("level", "error"),
        }
        for g in gates["gates"]
    ]


def headline(evaluated: Evaluation) -> tuple[str, float | None]:
    """The headline test metric of an evaluate result: ``accuracy``, or ``mAP`` for multi-label models."""
    return evaluated.headline, evaluated.value


def headline_text(evaluated: Evaluation) -> str:
    """``test accuracy 0.9214`` / ``test mAP 0.8123``."""
    name, value = headline(evaluated)
    return f"test {name} {'-' if value is None else f'{value:.4f}'}"


def gate_markdown(evaluated: Evaluation, *, run_ref: str) -> str:
    """The gate verdict of an evaluate result (``run_evaluate``) as a Prefect markdown artifact."""
    head = "PASSED" if evaluated.gates_passed else "FAILED"
    lines = [
        f"# Gate verdict: {head}",
        "",
        f"**{evaluated.verdict}**",
        "",
        f"- {headline_text(evaluated)} (temperature {evaluated.temperature:.3f})",
        f"- {run_ref}",
        f"- gate report: `{evaluated.report_html}`",
        "",
        "| gate | status | value | threshold | level |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['gate']} | {r['status']} | {r['value']} | {r['threshold']} | {r['level']} |"
        for r in gate_rows(evaluated.gates.to_dict())
    ]
    return "\n".join(lines)


def registration_markdown(registered: Registration, *, run_ref: str) -> str:
    aliases = ", ".join(registered.aliases)
    lines = [
        f"# Registered {registered.name} version {registered.version}",
        "",
        f"- aliases: **{aliases}**",
        f"- load: `mlflow.pyfunc.load_model('models:/{registered.name}/{registered.version}')`",
        f"- {run_ref}",
    ]
    if not registered.gates_passed:
        lines += [
            "",
            "Not promoted to champion; failed gates:",
            *[f"- {m}" for m in registered.failed_gates],
        ]
    return "\n".join(lines)


def freshness_markdown(check: Freshness) -> str:
    """The retrain check (``run_check_freshness``) as a Prefect markdown artifact."""
    title = "Up to date: nothing to retrain" if not check.retrain else "Retraining"
    return "\n".join(
        [
            f"# {title}",
            "",
            f"**{check.reason}**",
            "",
            f"- model: `{check.model_name}`, champion version: {check.champion_version or '-'}",
            f"- data version: `{check.data_version}`",
            f"- training params hash: `{check.training_params_hash}`",
            "- rerun with `imgflow pipeline --force` (or the flow parameter `force: true`) to retrain anyway",
        ]
    )


def build_payload(event: str, *, summary: str, **fields: Any) -> dict[str, Any]:
    """The JSON posted to the webhook: ``event``, a one-line ``text`` (Slack/Mattermost incoming
    webhooks show it) and the details."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}; known: {', '.join(EVENTS)}")
    return {"event": event, "text": f"imgflow: {summary}", **fields}


def post_webhook(url: str, payload: dict[str, Any], *, timeout_s: float = 10.0) -> int:
    """POST ``payload`` as JSON; returns the HTTP status. NotifyError when unreachable or not 2xx."""
    try:
        response = httpx.post(url, json=payload, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise NotifyError(f"webhook {url} unreachable: {e}") from e
    if not response.is_success:
        raise NotifyError(f"webhook {url} answered {response.status_code}: {response.text[:200]}")
    logger.info("posted %s to webhook (%s)", payload["event"], response.status_code)
    return response.status_code
