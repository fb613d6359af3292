"""One task per pipeline stage.

Policy: DVC owns caching of stage outputs, so no Prefect result caching (``NO_CACHE``); retries
only where the failure is I/O against something outside the process (downloading the source
data, the MLflow registry) — Ray Train recovers from worker failures itself.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components import stages
from components.config import Params


@task(name="ingest-images", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def ingest(params: Params) -> dict[str, Any]:
    summary = stages.run_ingest(params, progress=False)
    get_run_logger().info(
        "ingested %s images (%s quarantined) from %s; data version %s",
        summary["ingested"], summary["quarantined"], summary["source"], summary["data_version"],
    )  # fmt: skip
    return summary


@task(name="validate-manifest", cache_policy=NO_CACHE)
def validate(params: Params) -> dict[str, Any]:
    result = stages.run_validate(params)
    get_run_logger().info("data validation passed; report %s", result["report_html"])
    return result


@task(name="audit-labels", cache_policy=NO_CACHE)
def audit(params: Params) -> dict[str, Any]:
    result = stages.run_audit(params, progress=False)
    get_run_logger().info(
        "label audit of %s images: %s; vs previous data version: %s",
        result["audited"], result["issues"], result["ledger"]["totals"],
    )  # fmt: skip
    return result


@task(name="clip-baseline", cache_policy=NO_CACHE)
def baseline(params: Params) -> dict[str, Any]:
    """Zero-shot + linear-probe CLIP baselines; without weights it is skipped, not failed."""
    result = stages.run_baseline(params)
    log = get_run_logger()
    if result["status"] == "ok":
        log.info(
            "CLIP baseline %s/%s: zero-shot accuracy %.4f, linear probe %s",
            result["model"], result["pretrained"], result["zero_shot_accuracy"], result["linear_probe_accuracy"],
        )  # fmt: skip
    else:
        log.warning("CLIP baseline %s", result["reason"])
    return result


@task(name="train-model-on-ray", cache_policy=NO_CACHE)
def train(params: Params) -> dict[str, Any]:
    result = stages.run_train(params, progress=True)
    get_run_logger().info(
        "trained: val_accuracy %.4f (MLflow run %s)", result["val_accuracy"], result["run_id"]
    )
    return result


@task(name="evaluate-and-gate", cache_policy=NO_CACHE)
def evaluate(params: Params) -> dict[str, Any]:
    result = stages.run_evaluate(params)
    get_run_logger().info("test accuracy %.4f; gates passed: %s", result["accuracy"], result["gates_passed"])
    return result


@task(name="register-model", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def register(params: Params) -> dict[str, Any]:
    result = stages.run_register(params, raise_on_gate_failure=False)
    log = get_run_logger()
    if result["gates_passed"]:
        log.info("registered %s v%s as %s", result["name"], result["version"], ", ".join(result["aliases"]))
    else:
        log.warning(stages.gate_failure_message(result))
    return result
