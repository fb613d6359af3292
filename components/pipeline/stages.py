"""The pipeline's stages, each a function of the resolved :class:`Params` returning a small record
(:mod:`components.pipeline.records`).

Each stage reads its inputs from files and writes its outputs to files (the paths DVC declares in
``dvc.yaml``), so a stage runs the same from the CLI, from ``dvc repro`` and from the Prefect flow.
This module is glue: the work happens in the stage packages (data, quality, baseline, train,
evaluate, registry), imported inside the stage that needs them so that importing it stays cheap.
The commands around registered models (promote, serve, predict, export) are in
:mod:`components.pipeline.models`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from components.core.config import Params
from components.core.errors import ConfigError, DataError, GatesFailedError, ValidationFailedError
from components.core.jsonio import read_json, remove_stale_temps, write_json, write_text_atomic
from components.core.progress import showing_progress
from components.data.manifest import (
    DatasetInfo,
    data_version,
    read_exclusions,
    read_manifest,
    require_manifest,
)
from components.pipeline.context import (
    StagePaths,
    connect_tracking,
    experiment_id,
    registry_options,
)
from components.pipeline.records import (
    AuditSummary,
    BaselineResult,
    Evaluation,
    TrainedRun,
    ValidationResult,
)

if TYPE_CHECKING:
    import pandas as pd

    from components.data.ingest import IngestSummary
    from components.pipeline.freshness import Freshness
    from components.quality.ledger import LedgerDiff
    from components.registry.registry import Registration
    from components.train.auto_recipe import ResolvedRecipe
    from components.train.ray_adapter import RayOptions

logger = logging.getLogger(__name__)

SERVING_REQUIREMENTS = ("torch", "torchvision", "timm", "safetensors", "pillow", "numpy", "pandas", "mlflow")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


INCOMPLETE_FILE = ".incomplete.json"
"""Left in a stage's output folder while the stage rewrites it (see :func:`_rewriting`)."""


@contextmanager
def _rewriting(folder: Path, stage: str) -> Iterator[None]:
    """Mark ``folder`` as being rewritten by ``stage`` until the block ends without an error.

    Each file is written atomically, but a stage writes several: killed (or failed) half way, the
    folder would hold new files beside old ones. The mark stays then, and the stages reading the
    folder refuse it (:func:`_require_complete`) until ``stage`` has run to its end again."""
    _mark_incomplete(folder, stage)
    yield
    _mark_complete(folder)


def _mark_incomplete(folder: Path, stage: str) -> None:
    write_json(folder / INCOMPLETE_FILE, {"stage": stage, "pid": os.getpid(), "started_at": _now()})
    remove_stale_temps(folder)  # a killed run's temporary files: never read, so tidied away here


def _mark_complete(folder: Path) -> None:
    (folder / INCOMPLETE_FILE).unlink(missing_ok=True)


def _require_complete(folder: Path, stage: str) -> None:
    """A DataError when an interrupted ``stage`` left ``folder`` half rewritten (see :func:`_rewriting`)."""
    marker = folder / INCOMPLETE_FILE
    if marker.exists():
        started = (read_json(marker, hint=f"run `imgflow {stage}` again") or {}).get("started_at", "?")
        raise DataError(
            f"{folder} is incomplete: `imgflow {stage}` (started {started}) stopped before it finished "
            f"writing it; run `imgflow {stage}` again"
        )


# --------------------------------------------------------------------------- 1. ingest


def run_ingest(params: Params, *, progress: bool = True) -> IngestSummary:
    """Read ``ingest.source`` into the content-addressed store, the manifest and the quarantine list."""
    from components.data.ingest import ingest

    cfg, split = params.ingest, params.split
    return ingest(
        cfg.source,
        data_dir=params.project.data_dir,
        classes=cfg.classes,
        val_fraction=split.val_fraction,
        test_fraction=split.test_fraction,
        seed=params.project.seed,
        max_per_class=cfg.max_per_class,
        max_pixels=cfg.max_pixels,
        fashion_mnist_dir=cfg.fashion_mnist_dir,
        download=cfg.download,
        progress=progress,
        allow_outside_root=cfg.allow_outside_root,
        task=cfg.task,
        taxonomy=cfg.taxonomy,
        incremental=cfg.incremental,
    )


# --------------------------------------------------------------------------- 2. validate


def run_validate(params: Params) -> ValidationResult:
    """Run the GE suite; writes the report, then raises ValidationFailedError if it failed.

    Warning-level findings are named in the result; their example rows (image ids, hashes) are in
    the report files only, and in the log at INFO level (``imgflow -v``).

    With ``validate.contract`` set, the version is validated against the data contract; the first
    version that passes writes it (components.quality.contract), for the user to review and commit.
    """
    from components.quality.contract import load_contract
    from components.quality.validation import validate_manifest, write_validation_report

    paths = StagePaths(params)
    manifest = require_manifest(paths.data)
    info = DatasetInfo.load(paths.data.dataset)
    contract_path = params.validate_.contract_path(params.project.data_dir)
    contract = load_contract(contract_path) if contract_path is not None else None
    df = read_manifest(manifest)
    report = validate_manifest(
        df, classes=info.classes, cfg=params.validate_, task=info.task, contract=contract
    )
    drift = _validation_drift(params)
    checked = _contract_record(df, info, contract, contract_path, passed=report.success)
    json_path, html_path = write_validation_report(
        report, paths.out("validate"), extra={"drift": drift, "contract": checked},
        extra_sections=[_drift_section(drift), _contract_section(checked)],
    )  # fmt: skip
    # Deterministic verdict (no timestamps): what the train stage depends on in dvc.yaml.
    write_json(
        paths.out("validate") / "passed.json",
        {"success": report.success, "data_version": data_version(manifest)},
        sort_keys=True,
    )
    if not report.success:
        raise ValidationFailedError(f"data validation failed (report: {html_path}):\n{report.summary_text()}")
    if report.warnings():
        logger.info("data validation warnings:\n%s", report.summary_text())
    if contract_path is not None and contract is None:  # the first accepted version sets the reference
        _write_contract(params, df, info, data_version(manifest))
        logger.info(
            "wrote the data contract %s from this data version: review it and commit it", contract_path
        )
    return ValidationResult(
        success=report.success,
        report_json=json_path,
        report_html=html_path,
        warnings=tuple(o.name for o in report.warnings()),
        label_cardinality=report.summary["label_cardinality"] if report.summary else None,
        contract=_contract_status(contract_path, checked=contract is not None),
    )


def _contract_record(
    df: pd.DataFrame, info: DatasetInfo, contract: Any, path: Path | None, *, passed: bool
) -> dict[str, Any] | None:
    """The report's ``contract`` entry: every property's test and class share, "written" (this version
    passed and is the reference now) or "not written" (no contract yet, and this version failed)."""
    import dataclasses

    from components.quality.contract import compare_to_contract, comparison_record
    from components.quality.validation import label_rows_table
    from components.task import get_task

    if path is None:
        return None
    if contract is None and not passed:
        return {"status": "not written", "path": str(path),
                "reason": "the first data version that passes validation writes it"}  # fmt: skip
    if contract is None:
        return comparison_record(None, None, path)
    comparison = compare_to_contract(df, contract)
    if get_task(info.task).several_labels:  # classes and shares of label occurrences
        labels = compare_to_contract(label_rows_table(df), contract)
        comparison = dataclasses.replace(labels, features=comparison.features)
    return comparison_record(comparison, contract, path)


def _contract_section(entry: dict[str, Any] | None) -> Any:
    from components.quality.contract import contract_section

    return contract_section(entry)


def _contract_status(path: Path | None, *, checked: bool) -> str:
    if path is None:
        return "off (validate.contract: off)"
    return f"checked against {path}" if checked else f"wrote {path} (first accepted data version)"


def _write_contract(params: Params, df: pd.DataFrame, info: DatasetInfo, version: str) -> Path:
    """Infer the data contract of ``df`` and write it to ``validate.contract``, keeping the ``checks:``
    (tolerances) of a valid existing file."""
    from components.quality.contract import infer_contract, load_contract, write_contract
    from components.quality.validation import label_rows_table
    from components.task import get_task

    path = params.validate_.contract_path(params.project.data_dir)
    if path is None:
        raise ConfigError("validate.contract is off: set it to auto (or a file) to keep a data contract")
    previous = load_contract(path) if path.exists() else None
    labels = label_rows_table(df)["label"] if get_task(info.task).several_labels else None
    contract = infer_contract(df, classes=info.classes, data_version=version, labels=labels,
                              checks=previous.checks if previous else None)  # fmt: skip
    return write_contract(path, contract)


def run_contract_accept(params: Params) -> dict[str, Any]:
    """``imgflow contract accept``: re-infer the data contract from the current data version (a new
    class, a new normal) and write it, keeping its checks; the user reviews the diff and commits it."""
    paths = StagePaths(params)
    manifest = require_manifest(paths.data)
    info = DatasetInfo.load(paths.data.dataset)
    df = read_manifest(manifest)
    version = data_version(manifest)
    path = _write_contract(params, df, info, version)
    return {"contract": str(path), "data_version": version, "images": len(df), "classes": list(info.classes)}


def run_contract_show(params: Params) -> dict[str, Any]:
    """``imgflow contract show``: the data contract file, checked (an unknown key or a malformed value is
    a ConfigError naming it); ConfigError when contracts are off or none was written yet."""
    from components.core.errors import ConfigError
    from components.quality.contract import load_contract

    path = params.validate_.contract_path(params.project.data_dir)
    if path is None:
        raise ConfigError("validate.contract is off: no data contract is kept")
    contract = load_contract(path)
    if contract is None:
        raise ConfigError(f"no data contract at {path}: `imgflow validate` writes it from the first "
                          "data version that passes, or run `imgflow contract accept`")  # fmt: skip
    return {"contract": str(path), **contract.model_dump(mode="json")}


def _validation_drift(params: Params) -> dict[str, Any] | None:
    """The validation report's drift entry: this data version against the champion's training data
    (:func:`components.pipeline.trust.version_drift`); None without a champion or a new data version."""
    from components.core.errors import TrackingError
    from components.pipeline.trust import version_drift
    from components.registry import tracking

    local_store = params.project.state_dir / "mlflow.db"
    if not params.drift.enabled or (params.register_.tracking_uri is None and not local_store.exists()):
        return None  # no registry yet, so no champion: nothing to compare with (and no store to create)
    try:
        connect_tracking(params)
        champion = tracking.alias_provenance(params.register_.model_name, tracking.CHAMPION)
        return version_drift(params, champion)
    except (TrackingError, DataError) as e:
        return {"status": "not measured", "reason": str(e)}


def _drift_section(drift: dict[str, Any] | None) -> Any:
    from components.evaluate.drift import drift_section

    return drift_section(drift, title="Data drift vs the champion's training data")


# --------------------------------------------------------------------------- 2a. label-quality audit


def run_audit(params: Params, *, progress: bool = True) -> AuditSummary:
    """Label-quality audit of the manifest; records the issues in the ledger (kept under
    ``project.state_dir``, across data versions) and logs an MLflow run. With ``audit.action: fail``
    raises ValidationFailedError (exit code 4) when the suspected label-error rate is too high,
    after everything is written."""
    from components.pipeline.audit_features import resolve_audit_features
    from components.quality.label_quality import audit

    paths, cfg = StagePaths(params), params.audit
    manifest_path = require_manifest(paths.data)
    manifest = read_manifest(manifest_path)
    version = data_version(manifest_path)
    info = DatasetInfo.load(paths.data.dataset)
    with showing_progress(progress):  # the bars of embedding / reading the images
        encoded, reason = resolve_audit_features(params, manifest, task=info.task)
        result = audit(
            manifest,
            data_dir=paths.data.root,
            classes=info.classes,
            cfg=cfg,
            task=info.task,
            progress=progress,
            encoded=encoded,
            features_reason=reason,
        )
    out = paths.out("audit")
    with _rewriting(out, "audit"):
        summary = _record_audit(params, result, manifest, version, out)
    if cfg.action == "fail" and summary.label_error_rate > cfg.max_issue_rate:
        queue = summary.ledger.files["relabel_queue"]
        raise ValidationFailedError(
            f"label audit: {summary.label_error_rate:.1%} of the images are suspected label errors "
            f"(audit.max_issue_rate {cfg.max_issue_rate:.1%}); relabel queue: {queue}"
        )
    return summary


def _record_audit(
    params: Params, result: Any, manifest: pd.DataFrame, version: str, out: Path
) -> AuditSummary:
    """The audit's ledger update, exclusions, summary, report and MLflow run."""
    from components.quality.encoders import cap_relabel_queue
    from components.quality.label_quality import EXCLUDED_FILE, ISSUE_TYPES, write_exclusions
    from components.quality.ledger import update_ledger

    paths, cfg = StagePaths(params), params.audit
    diff = update_ledger(
        result.issues,
        data_version=version,
        current_ids=set(manifest["image_id"]),
        folder=paths.state / "audit-ledger",
        export_dir=out,
        recorded_at=_now(),
        issue_types=ISSUE_TYPES,  # the baseline's clip_disagreement rows are its own
    )
    # the queue a team works through; every suspect stays in issues.csv
    cap_relabel_queue(Path(diff.files["relabel_queue"]), size=cfg.queue_size)
    excluded = write_exclusions(result.issues, manifest, cfg, out / EXCLUDED_FILE)
    write_json(
        out / "summary.json",
        {**result.summary, "data_version": version, "ledger": diff.to_dict(), "excluded": excluded},
        sort_keys=True,
    )
    report = _write_audit_report(paths, result, diff)
    figures = result.summary
    return AuditSummary(
        data_version=version, audited=int(figures["audited"]), issues=figures["issues"],
        label_error_rate=float(figures["label_error_rate"]), ledger=diff, excluded=excluded,
        run_id=_log_audit_run(params, figures, version, report, diff), report_html=report,
        details={k: v for k, v in figures.items() if k not in ("audited", "issues", "label_error_rate")},
    )  # fmt: skip


def _write_audit_report(paths: StagePaths, result: Any, diff: LedgerDiff) -> Path:
    """The audit's HTML report, with the validation outcomes when the validate stage has run."""
    from components.quality.label_quality import write_audit_report

    validation_json = paths.out("validate") / "report.json"
    outcomes = json.loads(validation_json.read_text()).get("outcomes", []) if validation_json.exists() else []
    return write_audit_report(
        result,
        diff.to_dict(),
        paths.out("audit") / "report.html",
        data_dir=paths.data.root,
        validation=outcomes,
    )


def _log_audit_run(
    params: Params, figures: dict[str, Any], version: str, report: Path, diff: LedgerDiff
) -> str:
    """One finished MLflow run per audit (counts, ledger totals, scalar scores, the report and the
    ledger's files); returns its id. ``figures``: the audit's summary."""
    from components.registry import tracking

    uri = connect_tracking(params)
    run = tracking.start_run(
        experiment_id(params),
        run_name=f"audit-{version[:8]}",
        params={"audit": params.to_dict()["audit"]},
        tags={"data_version": version, "stage": "audit"},
        tracking_uri=uri,
    )
    metrics = {f"issues_{k}": v for k, v in figures["issues"].items()}
    metrics |= {f"ledger_{k}": v for k, v in diff.totals.items()}
    scalars = ("label_error_rate", "oof_accuracy", "oof_map", "label_cardinality", "audited",
               "noise_rate_estimate", "label_issues_estimate", "relabel_queue")  # fmt: skip
    metrics |= {k: figures[k] for k in scalars if figures.get(k) is not None}
    tracking.log_metrics(run.run_id, metrics)
    summary_json = StagePaths(params).out("audit") / "summary.json"
    tracking.log_artifacts(
        run.run_id, [summary_json, report, *map(Path, diff.files.values())], artifact_path="audit"
    )
    tracking.end_run(run.run_id)
    return run.run_id


# --------------------------------------------------------------------------- 2b. CLIP baselines


def run_baseline(
    params: Params, *, behind_proxy: bool = False, ray_options: RayOptions | None = None
) -> BaselineResult:
    """Zero-shot and linear-probe CLIP baselines on the test split, each its own MLflow run.

    With no CLIP weights to be had (offline and nothing cached) the stage does not fail: it writes
    and logs ``skipped: weights unavailable`` and returns ``status: skipped``. ``behind_proxy``: the
    entry point found a proxy configured, so the weights are not judged unreachable by a direct probe.
    The image embeddings run on Ray Data when ``ray_options`` names a cluster or the data holds at
    least ``ray.min_images`` images.
    """
    from components import baseline as cb

    paths = StagePaths(params)
    require_manifest(paths.data)
    record, disagreements = _baseline_record(params, behind_proxy=behind_proxy, ray_options=ray_options)
    files = cb.write_baseline(record, disagreements, paths.out("baseline"))
    if disagreements is not None:
        record["ledger"] = _record_disagreements(params, disagreements)
    record["mlflow_runs"] = _log_baseline_runs(params, record, files)
    write_json(files["baseline"], record, sort_keys=True)  # again, now with the run ids
    return BaselineResult(
        summary=cb.summarize(record),
        mlflow_runs=record["mlflow_runs"],
        ledger=(record.get("ledger") or {}).get("totals"),
        out_dir=paths.out("baseline"),
    )


def _baseline_record(
    params: Params, *, behind_proxy: bool, ray_options: RayOptions | None = None
) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """baseline.json's record and CLIP's confident disagreements (None when the baseline did not run)."""
    from components import baseline as cb
    from components.baseline.embeddings import EmbeddingCache

    paths, cfg = StagePaths(params), params.baseline
    if not cfg.enabled:
        reason = "disabled: baseline.enabled is false"
        return cb.skipped_record(reason, model=cfg.model, pretrained=cfg.pretrained, status="disabled"), None
    try:
        encoder = cb.create_clip(
            cfg.model, cfg.pretrained, cache_dir=cfg.cache_dir, device=cb.resolve_device(cfg.device),
            behind_proxy=behind_proxy,
        )  # fmt: skip
    except cb.WeightsUnavailableError as e:
        # Not a failure: the stage's result says "skipped" and why (the console shows it).
        logger.info("CLIP baseline %s (%s)", cb.WEIGHTS_UNAVAILABLE, e)
        reason = f"{cb.WEIGHTS_UNAVAILABLE}: {e}"
        return cb.skipped_record(reason, model=cfg.model, pretrained=cfg.pretrained), None
    info = DatasetInfo.load(paths.data.dataset)
    manifest = read_manifest(paths.data.manifest)
    with _ray_image_encoder(params, encoder, images=len(manifest), ray_options=ray_options) as encode:
        return cb.run_baselines(
            encoder,
            manifest,
            info.classes,
            data_dir=params.project.data_dir,
            cache=EmbeddingCache(paths.state / "embeddings", encoder.key),
            cfg=cfg,
            task=info.task,
            encode=encode,
        )


def _baseline_on_ray(params: Params, *, images: int, ray_options: RayOptions | None) -> bool:
    """The CLIP baseline embeds on Ray Data when a cluster is named or the data holds at least
    ``ray.min_images`` images."""
    return bool(ray_options and ray_options.address) or images >= params.ray.min_images


def baseline_beside_training(params: Params, *, images: int) -> bool:
    """May the pipeline run the CLIP baseline (as it calls it: no ``ray_options``) beside training?
    Only when it needs neither Ray (the runtime training starts, stops and fills) nor a GPU (which
    training may fill): then it is CPU work in a thread of the flow's process, as the audit is."""
    if not params.baseline.enabled:
        return True
    if _baseline_on_ray(params, images=images, ray_options=None):
        return False
    from components.baseline import resolve_device

    return resolve_device(params.baseline.device) == "cpu"


@contextmanager
def runtime_for_training_and_side_stages(ray_options: RayOptions | None) -> Iterator[None]:
    """Ray's runtime for a train stage with other stages running beside it in threads of this process.

    Nothing may fork this process while another thread is inside OpenBLAS: its fork handler waits for
    its threads, which wait for the caller (seen: Ray's process start hung for good beside the audit's
    PCA). So the runtime starts on entry, before anything runs beside training (which then finds it
    connected), and BLAS keeps to one thread per call until the block ends."""
    from threadpoolctl import threadpool_limits

    from components.train import ray_adapter

    with ray_adapter.runtime(ray_options), threadpool_limits(limits=1, user_api="blas"):
        yield


@contextmanager
def _ray_image_encoder(
    params: Params, encoder: Any, *, images: int, ray_options: RayOptions | None
) -> Iterator[Any]:
    """paths -> CLIP image features on Ray Data (a runtime for the block) when a cluster is named or
    the data holds at least ``ray.min_images`` images; None (the stage's own loader) otherwise."""
    if not _baseline_on_ray(params, images=images, ray_options=ray_options):
        yield None
        return
    from components.serve import ray_batch

    with ray_batch.ray_runtime(ray_options):
        yield lambda paths: ray_batch.encode_images(
            paths,
            encoder.model,
            encoder.preprocess,
            batch_size=params.baseline.batch_size,
            actors=params.ray.actors,
        )


def _record_disagreements(params: Params, disagreements: pd.DataFrame) -> dict[str, Any]:
    """CLIP's confident disagreements with the labels go into the label-quality ledger (issue
    ``clip_disagreement``, this data version), next to the audit's findings; this version's rows
    and the diff against the previous version are exported to ``outputs/baseline/ledger/``.
    Multi-label rows name the labels CLIP finds missing / extra (ledger columns of those names)."""
    from components.quality.label_quality import CLIP_DISAGREEMENT, clip_disagreement_issues
    from components.quality.ledger import update_ledger

    paths = StagePaths(params)
    manifest = read_manifest(paths.data.manifest)
    diff = update_ledger(
        clip_disagreement_issues(disagreements, manifest),
        data_version=data_version(paths.data.manifest),
        current_ids=set(manifest["image_id"]),
        folder=paths.state / "audit-ledger",
        export_dir=paths.out("baseline") / "ledger",
        recorded_at=_now(),
        issue_types=(CLIP_DISAGREEMENT,),
    )
    return diff.to_dict()


def _log_baseline_runs(params: Params, record: dict[str, Any], files: dict[str, Path]) -> dict[str, str]:
    """One finished MLflow run per baseline (metrics named like the trained model's ``test_*``:
    ``test_accuracy``..., or for multi-label data ``test_mAP``, ``test_micro_f1``, ``test_ap_<label>``...),
    or one run saying why the baseline was skipped. Returns kind -> run id."""
    from components.core.provenance import git_commit
    from components.registry import tracking
    from components.task import task_of

    uri = connect_tracking(params)
    exp_id = experiment_id(params)
    tags = {
        "imgflow.kind": "baseline",
        "baseline_status": record["status"],
        "clip_model": str(record["model"]),
        "clip_pretrained": str(record["pretrained"]),
        "data_version": data_version(StagePaths(params).data.manifest),
        "git_commit": git_commit(),
        "params_hash": params.fingerprint(),
        "dataset_source": params.ingest.source,
        "task": str(record.get("task", "singlelabel")),
    }
    common: dict[str, Any] = {"params": params.to_dict(), "tracking_uri": uri, "artifact_path": "baseline"}
    if record["status"] != "ok":
        run = tracking.log_result_run(
            exp_id, run_name=f"baseline-{record['status']}", tags={**tags, "baseline": "none",
            "baseline_reason": record["reason"][:500]}, note=record["reason"], **common,
        )  # fmt: skip
        return {record["status"]: run.run_id}
    runs = {}
    for kind in ("zero_shot", "linear_probe"):
        if record.get(kind):
            run = tracking.log_result_run(
                exp_id, run_name=f"baseline-{kind.replace('_', '-')}", tags={**tags, "baseline": kind},
                metrics=task_of(record[kind]).flat_metrics(record[kind]), metric_prefix="test_",
                artifacts=[files["per_class"], files["metrics"]], **common,
            )  # fmt: skip
            runs[kind] = run.run_id
    tracking.log_artifacts(runs["zero_shot"], [files["disagreements"]], artifact_path="baseline")
    return runs


# --------------------------------------------------------------------------- 3. train


def run_train(
    params: Params, *, progress: bool = True, resume: bool = False, ray_options: RayOptions | None = None
) -> TrainedRun:
    """Train through Ray Train and log the run (params, provenance, per-epoch metrics) to MLflow.

    ``ray_options``: a Ray cluster to use, the local dashboard, verbose Ray lines (entry points read
    them from the environment: ``RayOptions.from_env``); None: a quiet local runtime."""
    from components.pipeline.pretraining import resolve_init
    from components.registry import tracking
    from components.train.training import train

    paths = StagePaths(params)
    out = paths.out("train")
    out.mkdir(parents=True, exist_ok=True)
    require_manifest(paths.data)
    _mark_incomplete(out, "train")  # run.json changes before the model does: see _rewriting
    uri = connect_tracking(params)
    previous = (
        read_json(paths.run_file, hint="run `imgflow train` first")
        if resume and paths.run_file.exists()
        else None
    )
    ray_run = (
        previous["ray_run_name"]
        if previous
        else f"train-{params.fingerprint()}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    exclude = _exclusions(params)
    recipe = _auto_recipe(params, out)
    init_dir = resolve_init(params)  # train.init: ssl:<run>, checked before any run starts
    provenance = {**_provenance(params, exclude), "model": recipe.config.model}
    write_text_atomic(out / "params.yaml", yaml.safe_dump(params.to_dict(), sort_keys=False))
    if previous:
        run = tracking.RunRef(previous["run_id"], previous["experiment_id"], uri)
    else:
        run = tracking.start_run(
            experiment_id(params),
            run_name=ray_run,
            params={**params.to_dict(), **recipe.mlflow_params()},
            tags={**provenance, **recipe.mlflow_tags()},
            tracking_uri=uri,
        )
    write_json(paths.run_file, {**run.to_dict(), "ray_run_name": ray_run, **provenance}, sort_keys=True)
    try:
        result = train(
            recipe.config,
            data=paths.data,
            out_dir=out,
            storage_path=paths.state / "ray_results",
            run_name=ray_run,
            seed=params.project.seed,
            weights_dir=paths.state / "weights",
            exclude_file=exclude,
            show_progress=progress,
            ray_options=ray_options,
            init_dir=init_dir,
        )
    except BaseException:
        tracking.end_run(run.run_id, status="FAILED")
        raise
    trained = TrainedRun(
        run_id=run.run_id, tracking_uri=uri, model_dir=result.model_dir, seconds=result.seconds,
        epochs=len(result.history),
        final={k: v for k, v in result.final.items() if k in ("val_accuracy", "val_loss", "train_loss", "train_accuracy")},
    )  # fmt: skip
    _log_training(paths, trained, result.history, exclude)
    _mark_complete(out)
    return trained


def _exclusions(params: Params) -> Path | None:
    """The audit's ``excluded.csv`` when ``audit.action`` is ``exclude`` (it must exist then)."""
    if params.audit.action != "exclude":
        return None
    exclude = StagePaths(params).out("audit") / "excluded.csv"
    _require_complete(exclude.parent, "audit")
    if not exclude.exists():
        raise DataError(f"audit.action is 'exclude' but {exclude} is missing: run `imgflow audit` first")
    return exclude


def _auto_recipe(params: Params, out: Path) -> ResolvedRecipe:
    """``train.recipe: auto`` resolved on the ingested data: one console line per decision,
    ``<out>/recipe.json`` (decisions, data profile, the train values in force) for the gate report."""
    from components.train.auto_recipe import resolve_for_data, write_decisions

    resolved = resolve_for_data(params.train, StagePaths(params).data)
    console = logging.getLogger("imgflow.console")  # the CLI prints it (flows/cli.py)
    for decision in resolved.decisions:
        (console.info if decision.source == "auto" else logger.info)("%s", decision.line())
    write_decisions(resolved, out / "recipe.json")
    return resolved


def _provenance(params: Params, exclude: Path | None) -> dict[str, str]:
    """The training run's tags: what data, code and params the model comes from."""
    from components.core.provenance import git_commit
    from components.pipeline.freshness import training_fingerprint

    return {
        "data_version": data_version(StagePaths(params).data.manifest),
        "git_commit": git_commit(),
        "params_hash": params.fingerprint(),
        "training_params_hash": training_fingerprint(params),  # what retrain-on-change compares
        "model": params.train.model,
        "dataset_source": params.ingest.source,
        "excluded_images": str(0 if exclude is None else len(read_exclusions(exclude))),
    }


def _log_training(
    paths: StagePaths, trained: TrainedRun, history: list[dict[str, Any]], exclude: Path | None
) -> None:
    """metrics.json and the training curves; per-epoch metrics, files and the checkpoint to MLflow."""
    from components.evaluate.plots import plot_training_curves
    from components.registry import tracking

    out = paths.out("train")
    curves = plot_training_curves(history, out / "training_curves.png")
    write_json(
        out / "metrics.json", {**trained.final, "train_seconds": trained.seconds, "epochs": trained.epochs},
        sort_keys=True,
    )  # fmt: skip
    tracking.log_history(trained.run_id, history)
    tracking.log_metrics(trained.run_id, {"train_seconds": trained.seconds})
    if exclude is not None:
        tracking.log_artifacts(trained.run_id, [exclude], artifact_path="train")
    tracking.log_artifacts(
        trained.run_id, [out / "params.yaml", out / "history.json", curves], artifact_path="train"
    )
    tracking.log_artifacts(trained.run_id, [trained.model_dir], artifact_path="checkpoint")


# --------------------------------------------------------------------------- 4. evaluate


def run_evaluate(params: Params, *, model_uri: str | None = None, progress: bool = False) -> Evaluation:
    """All test-set evidence, gates and the gate report; logged to MLflow.

    Without ``model_uri`` the freshly trained ``outputs/train/model`` is evaluated into
    ``outputs/evaluate`` and its training run; with one (``models:/<name>@<alias>``,
    ``models:/<name>/<version>``, ``runs:/<id>/model``) that registered model is downloaded and
    evaluated in a new MLflow run, its report in ``outputs/evaluate/models/<slug>/`` (the
    pipeline's report is left alone). See :mod:`components.pipeline.evaluation` and
    :mod:`components.evaluate.stage`.
    """
    from components.pipeline.evaluation import evaluate_registered, evaluate_trained

    paths = StagePaths(params)
    connect_tracking(params)
    with showing_progress(progress):  # the corruption sweep's bar
        if model_uri is None:
            _require_complete(paths.out("train"), "train")
            run = read_json(paths.run_file, hint="run `imgflow train` first")
            with _rewriting(paths.out("evaluate"), "evaluate"):  # register reads these files together
                return evaluate_trained(params, run_id=run["run_id"], data_version=run.get("data_version"),
                                        out_dir=paths.out("evaluate"))  # fmt: skip
        return evaluate_registered(params, model_uri, out_root=paths.out("evaluate"))


# --------------------------------------------------------------------------- 5. register


def serving_pip_requirements() -> list[str]:
    """The pinned packages the registered pyfunc needs to serve (``SERVING_REQUIREMENTS`` at their installed
    versions): passed to MLflow, which then skips its own requirements inference."""
    return [f"{name}=={metadata.version(name)}" for name in SERVING_REQUIREMENTS]


def _example_image(params: Params) -> bytes:
    manifest = read_manifest(StagePaths(params).data.manifest)
    row = manifest[manifest["split"] == "test"].iloc[0]
    return (params.project.data_dir / row["path"]).read_bytes()


def run_register(params: Params, *, raise_on_gate_failure: bool = True) -> Registration:
    """Register the model: alias ``candidate`` always, ``challenger`` when the gates passed, and
    ``champion`` when they passed and ``register.auto_promote`` (see :mod:`components.registry.registry`).

    When a gate failed: raises GatesFailedError (exit code 3) after registering, or, with
    ``raise_on_gate_failure=False``, returns the result with ``gates_passed: False``.
    """
    paths = StagePaths(params)
    _require_complete(paths.out("train"), "train")
    _require_complete(paths.out("evaluate"), "evaluate")
    run = read_json(paths.run_file, hint="run `imgflow train` first")
    reg, passed = register_evaluated(
        params, model_src=paths.out("train") / "model", eval_dir=paths.out("evaluate"), run=run,
        expected_from=_evaluated_against(params), hint="run `imgflow evaluate` first",
    )  # fmt: skip
    write_json(paths.out("register") / "registration.json", reg, sort_keys=True)
    if passed:  # a possible champion: embed its training data now, the reference of later drift checks
        from components.pipeline.trust import warm_reference

        warm_reference(params, paths.out("train") / "model")
    if not passed and raise_on_gate_failure:
        raise GatesFailedError(reg.failure_message())
    return reg


def register_evaluated(
    params: Params,
    *,
    model_src: Path,
    eval_dir: Path,
    run: dict[str, Any],
    expected_from: Any,
    extra_tags: dict[str, str] | None = None,
    hint: str,
) -> tuple[Registration, bool]:
    """Log the trained model in ``model_src`` as the pyfunc of ``run`` and register it as a version of
    ``register.model_name`` with what evaluate wrote in ``eval_dir`` (temperature, multi-label thresholds,
    OOD detector and conformal sets, gates, headline metric), the provenance tags of ``run`` plus
    ``extra_tags``, and a model card; ends the run. ``expected_from``: the champion evaluate compared with
    (see ``registry.register_version``). Returns the registration and whether the gates passed. Shared by
    ``imgflow register`` and ``imgflow distill``."""
    import shutil
    import tempfile

    from components.evaluate.gates import GateReport
    from components.evaluate.stage import TRUST_DIR
    from components.model.checkpoint import with_temperature
    from components.model.uncertainty import copy_trust_files
    from components.registry import registry, tracking
    from components.task import get_task

    gates_json = read_json(eval_dir / "gates.json", hint=hint)
    gates = GateReport.from_dict(gates_json)
    evaluation = read_json(eval_dir / "metrics.json", hint=hint)
    connect_tracking(params)
    with tempfile.TemporaryDirectory(prefix="imgflow-register-") as tmp:
        # The served model carries the temperature fitted by evaluate (calibrated probabilities) and,
        # multi-label, the per-label thresholds tuned on val; a copy, because the trained folder is the
        # train stage's DVC output.
        model_dir = Path(shutil.copytree(model_src, Path(tmp) / "model"))
        spec = with_temperature(
            model_dir, float(gates_json.get("temperature", 1.0)), gates_json.get("thresholds")
        )
        if spec.task.fits_decision and spec.thresholds is None:
            raise DataError(
                "a multi-label model needs the thresholds evaluate tunes: re-run `imgflow evaluate`"
            )
        # ... and its OOD detector and conformal sets, fitted by evaluate (absent when it fitted none).
        copy_trust_files(eval_dir / TRUST_DIR, model_dir)
        model_uri = tracking.log_pyfunc_model(
            run["run_id"],
            model_dir=model_dir,
            example_image=_example_image(params),
            pip_requirements=serving_pip_requirements(),
        )
    headline = _headline_tags(evaluation)
    tags = {
        "data_version": run["data_version"],
        "git_commit": run["git_commit"],
        "params_hash": run["params_hash"],
        "training_run_id": run["run_id"],
        "gates_passed": str(gates.passed).lower(),
        "failed_gates": ",".join(g.name for g in gates.failed()),
        **headline,
        "task": spec.task.name,
        "temperature": f"{float(gates_json.get('temperature', 1.0)):.4f}",
        "gate_verdicts": json.dumps({g["name"]: g["status"] for g in gates_json.get("gates", [])})[:4900],
        **(extra_tags or {}),
    }
    card = registry.ModelCard(
        task=get_task(spec.task).title, classes=tuple(spec.classes), data_version=run["data_version"],
        git_commit=run["git_commit"], gate_verdict=gates.verdict(), gates_passed=gates.passed,
        failed_gates=tuple(g.message for g in gates.failed()),
        headline=", ".join(f"{k.removeprefix('test_')} {v}" for k, v in headline.items()),
    )  # fmt: skip
    reg = registry.register_version(model_uri, name=params.register_.model_name, run_id=run["run_id"], tags=tags,
                                    card=card, auto_promote=params.register_.auto_promote,
                                    expected_from=expected_from, **registry_options(params))  # fmt: skip
    tracking.end_run(run["run_id"])
    return reg, gates.passed


def _headline_tags(evaluation: dict[str, Any]) -> dict[str, str]:
    """``test_accuracy`` (single-label) or ``test_mAP`` (multi-label) for the version's tags."""
    if evaluation.get("accuracy") is not None:
        return {"test_accuracy": f"{evaluation['accuracy']:.4f}"}
    return {"test_mAP": f"{evaluation['mAP']:.4f}"} if evaluation.get("mAP") is not None else {}


def _evaluated_against(params: Params) -> Any:
    """The champion version evaluate compared with (None: there was none); ANY when unknown."""
    from components.registry.registry import ANY

    report = StagePaths(params).out("evaluate") / "report.json"
    champion = (json.loads(report.read_text()).get("champion") or {}) if report.exists() else {}
    if champion.get("status") == "compared":
        return str(champion["version"])
    return None if champion.get("status") == "none" else ANY


# --------------------------------------------------------------------------- retrain on change


def run_check_freshness(params: Params, *, force: bool = False) -> Freshness:
    """After ingest: does the champion already come from this data version and these training params?
    ``retrain: False`` means a scheduled run can stop ("up to date"); see ``components.pipeline.freshness``."""
    from components.pipeline.freshness import decide, training_fingerprint
    from components.pipeline.trust import version_drift
    from components.registry import tracking

    manifest = require_manifest(StagePaths(params).data)
    connect_tracking(params)
    name = params.register_.model_name
    champion = tracking.alias_provenance(name, tracking.CHAMPION)
    verdict = decide(
        data_version=data_version(manifest),
        training_params_hash=training_fingerprint(params),
        champion=champion,
        force=force,
        model_name=name,
    )
    # A new data version: has it drifted from what the champion was trained on ("data drifted: retrain")?
    return verdict if force else verdict.with_drift(version_drift(params, champion, log=True))
