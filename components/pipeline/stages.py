"""The pipeline's stages, each a function of the resolved :class:`Params`.

Each stage reads its inputs from files and writes its outputs to files (the paths DVC declares in
``dvc.yaml``), so a stage runs the same from the CLI, from ``dvc repro`` and from the Prefect flow.
Heavy libraries are imported inside the stage that needs them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from components.core.config import Params
from components.core.errors import DataError, GatesFailedError, ValidationFailedError
from components.data.manifest import DataPaths, DatasetInfo, data_version, read_exclusions, read_manifest

if TYPE_CHECKING:
    from components.train.ray_adapter import RayOptions

logger = logging.getLogger(__name__)

SERVING_REQUIREMENTS = ("torch", "torchvision", "timm", "safetensors", "pillow", "numpy", "pandas", "mlflow")


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


def _write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return path


def _read_json(path: Path, *, hint: str) -> Any:
    if not path.exists():
        raise DataError(f"{path} is missing: {hint}")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- 1. ingest


def run_ingest(params: Params, *, progress: bool = True) -> dict[str, Any]:
    from components.data.ingest import ingest

    cfg, split = params.ingest, params.split
    summary = ingest(
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
    )
    return summary.to_dict()


# --------------------------------------------------------------------------- 2. validate


def run_validate(params: Params) -> dict[str, Any]:
    """Run the GE suite; writes the report, then raises ValidationFailedError if it failed."""
    from components.quality.validation import validate_manifest, write_validation_report

    paths = StagePaths(params)
    if not paths.data.manifest.exists():
        raise DataError(f"no manifest at {paths.data.manifest}: run `imgflow ingest` first")
    info = DatasetInfo.load(paths.data.dataset)
    report = validate_manifest(
        read_manifest(paths.data.manifest), classes=info.classes, cfg=params.validate_, task=info.task
    )
    json_path, html_path = write_validation_report(report, paths.out("validate"))
    # Deterministic verdict (no timestamps): what the train stage depends on in dvc.yaml.
    _write_json(
        paths.out("validate") / "passed.json",
        {"success": report.success, "data_version": data_version(paths.data.manifest)},
    )
    result = {
        "success": report.success,
        "report_json": str(json_path),
        "report_html": str(html_path),
        "warnings": [o.name for o in report.warnings()],
    }
    if report.summary:  # multi-label: mean labels per image of each split
        result["label_cardinality"] = report.summary["label_cardinality"]
    if report.warnings():
        logger.warning("data validation warnings:\n%s", report.summary_text())
    if not report.success:
        raise ValidationFailedError(f"data validation failed (report: {html_path}):\n{report.summary_text()}")
    return result


# --------------------------------------------------------------------------- 2a. label-quality audit


def run_audit(params: Params, *, progress: bool = True) -> dict[str, Any]:
    """Label-quality audit of the manifest; records the issues in the ledger (kept under
    ``project.state_dir``, across data versions) and logs an MLflow run. With ``audit.action: fail``
    raises ValidationFailedError (exit code 4) when the suspected label-error rate is too high,
    after everything is written."""
    from datetime import UTC, datetime

    from components.quality.label_quality import (
        EXCLUDED_FILE,
        ISSUE_TYPES,
        audit,
        write_audit_report,
        write_exclusions,
    )
    from components.quality.ledger import update_ledger

    paths, cfg = StagePaths(params), params.audit
    if not paths.data.manifest.exists():
        raise DataError(f"no manifest at {paths.data.manifest}: run `imgflow ingest` first")
    manifest = read_manifest(paths.data.manifest)
    version = data_version(paths.data.manifest)
    info = DatasetInfo.load(paths.data.dataset)
    result = audit(manifest, data_dir=paths.data.root, classes=info.classes, cfg=cfg, task=info.task)
    out = paths.out("audit")
    diff = update_ledger(
        result.issues,
        data_version=version,
        current_ids=set(manifest["image_id"]),
        folder=paths.state / "audit-ledger",
        export_dir=out,
        recorded_at=datetime.now(UTC).isoformat(timespec="microseconds"),
        issue_types=ISSUE_TYPES,  # the baseline's clip_disagreement rows are its own
    )
    excluded = write_exclusions(result.issues, manifest, cfg, out / EXCLUDED_FILE)
    summary = {**result.summary, "data_version": version, "ledger": diff.to_dict(), "excluded": excluded}
    _write_json(out / "summary.json", summary)
    validation_json = paths.out("validate") / "report.json"
    outcomes = json.loads(validation_json.read_text()).get("outcomes", []) if validation_json.exists() else []
    report = write_audit_report(
        result, diff.to_dict(), out / "report.html", data_dir=paths.data.root, validation=outcomes
    )
    tracking, uri = _tracking(params)
    exp_id = tracking.ensure_experiment(
        params.register_.experiment, artifact_root=paths.state / "mlartifacts"
    )
    run = tracking.start_run(
        exp_id,
        run_name=f"audit-{version[:8]}",
        params={"audit": params.to_dict()["audit"]},
        tags={"data_version": version, "stage": "audit"},
        tracking_uri=uri,
    )
    metrics = {f"issues_{k}": v for k, v in result.summary["issues"].items()}
    metrics |= {f"ledger_{k}": v for k, v in diff.totals.items()}
    scalars = ("label_error_rate", "oof_accuracy", "oof_map", "label_cardinality", "audited")
    metrics |= {k: result.summary[k] for k in scalars if result.summary.get(k) is not None}
    tracking.log_metrics(run.run_id, metrics)
    tracking.log_artifacts(
        run.run_id, [out / "summary.json", report, *map(Path, diff.files.values())], artifact_path="audit"
    )
    tracking.end_run(run.run_id)
    summary |= {"run_id": run.run_id, "report_html": str(report)}
    if cfg.action == "fail" and result.summary["label_error_rate"] > cfg.max_issue_rate:
        raise ValidationFailedError(
            f"label audit: {result.summary['label_error_rate']:.1%} of the images are suspected label errors "
            f"(audit.max_issue_rate {cfg.max_issue_rate:.1%}); relabel queue: {diff.files['relabel_queue']}"
        )
    return summary


# --------------------------------------------------------------------------- 2b. CLIP baselines


def run_baseline(params: Params) -> dict[str, Any]:
    """Zero-shot and linear-probe CLIP baselines on the test split, each its own MLflow run.

    With no CLIP weights to be had (offline and nothing cached) the stage does not fail: it writes
    and logs ``skipped: weights unavailable`` and returns ``status: skipped``.
    """
    from components.baseline import clip_baseline as cb
    from components.baseline.embeddings import EmbeddingCache

    paths, cfg = StagePaths(params), params.baseline
    if not paths.data.manifest.exists():
        raise DataError(f"no manifest at {paths.data.manifest}: run `imgflow ingest` first")
    record: dict[str, Any]
    disagreements = None
    if not cfg.enabled:
        reason = "disabled: baseline.enabled is false"
        record = cb.skipped_record(reason, model=cfg.model, pretrained=cfg.pretrained, status="disabled")
    else:
        try:
            encoder = cb.create_clip(
                cfg.model, cfg.pretrained, cache_dir=cfg.cache_dir, device=cb.resolve_device(cfg.device)
            )
        except cb.WeightsUnavailableError as e:
            logger.warning("CLIP baseline %s (%s)", cb.WEIGHTS_UNAVAILABLE, e)
            record = cb.skipped_record(
                f"{cb.WEIGHTS_UNAVAILABLE}: {e}", model=cfg.model, pretrained=cfg.pretrained
            )
        else:
            info = DatasetInfo.load(paths.data.dataset)
            record, disagreements = cb.run_baselines(
                encoder,
                read_manifest(paths.data.manifest),
                info.classes,
                data_dir=params.project.data_dir,
                cache=EmbeddingCache(paths.state / "embeddings", encoder.key),
                cfg=cfg,
                task=info.task,
            )
    files = cb.write_baseline(record, disagreements, paths.out("baseline"))
    if disagreements is not None:
        record["ledger"] = _record_disagreements(params, disagreements)
    record["mlflow_runs"] = _log_baseline_runs(params, record, files)
    _write_json(files["baseline"], record)  # again, now with the run ids
    return {
        **cb.summarize(record),
        "mlflow_runs": record["mlflow_runs"],
        "ledger": (record.get("ledger") or {}).get("totals"),
        "out_dir": str(paths.out("baseline")),
    }


def _record_disagreements(params: Params, disagreements: Any) -> dict[str, Any]:
    """CLIP's confident disagreements with the labels go into the label-quality ledger (issue
    ``clip_disagreement``, this data version), next to the audit's findings; this version's rows
    and the diff against the previous version are exported to ``outputs/baseline/ledger/``.
    Multi-label rows name the labels CLIP finds missing / extra (ledger columns of those names)."""
    from datetime import UTC, datetime

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
        recorded_at=datetime.now(UTC).isoformat(timespec="microseconds"),
        issue_types=(CLIP_DISAGREEMENT,),
    )
    return diff.to_dict()


def _log_baseline_runs(params: Params, record: dict[str, Any], files: dict[str, Path]) -> dict[str, str]:
    """One finished MLflow run per baseline (metrics named like the trained model's ``test_*``:
    ``test_accuracy``..., or for multi-label data ``test_mAP``, ``test_micro_f1``, ``test_ap_<label>``...),
    or one run saying why the baseline was skipped. Returns kind -> run id."""
    from components.core.provenance import git_commit
    from components.task.metrics import flat_metrics

    tracking, uri = _tracking(params)
    exp_id = tracking.ensure_experiment(
        params.register_.experiment, artifact_root=params.project.state_dir / "mlartifacts"
    )
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
    common = {"params": params.to_dict(), "tracking_uri": uri, "artifact_path": "baseline"}
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
                metrics=flat_metrics(record[kind]), metric_prefix="test_",
                artifacts=[files["per_class"], files["metrics"]], **common,
            )  # fmt: skip
            runs[kind] = run.run_id
    tracking.log_artifacts(runs["zero_shot"], [files["disagreements"]], artifact_path="baseline")
    return runs


# --------------------------------------------------------------------------- 3. train


def _tracking(params: Params) -> tuple[Any, str]:
    from components.registry import tracking

    uri = tracking.configure(params.register_.tracking_uri, state_dir=params.project.state_dir)
    return tracking, uri


def run_train(
    params: Params, *, progress: bool = True, resume: bool = False, ray_options: RayOptions | None = None
) -> dict[str, Any]:
    """Train through Ray Train and log the run (params, provenance, per-epoch metrics) to MLflow.

    ``ray_options``: a Ray cluster to use, the local dashboard, verbose Ray lines (entry points read
    them from the environment: ``RayOptions.from_env``); None: a quiet local runtime."""
    from components.core.provenance import git_commit
    from components.evaluate.plots import plot_training_curves
    from components.pipeline.freshness import training_fingerprint
    from components.train.training import train

    paths = StagePaths(params)
    out = paths.out("train")
    out.mkdir(parents=True, exist_ok=True)
    if not paths.data.manifest.exists():
        raise DataError(f"no manifest at {paths.data.manifest}: run `imgflow ingest` first")
    tracking, uri = _tracking(params)
    previous = json.loads(paths.run_file.read_text()) if resume and paths.run_file.exists() else None
    ray_run = (
        previous["ray_run_name"]
        if previous
        else f"train-{params.fingerprint()}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    exclude = paths.out("audit") / "excluded.csv" if params.audit.action == "exclude" else None
    if exclude is not None and not exclude.exists():
        raise DataError(f"audit.action is 'exclude' but {exclude} is missing: run `imgflow audit` first")
    provenance = {
        "data_version": data_version(paths.data.manifest),
        "git_commit": git_commit(),
        "params_hash": params.fingerprint(),
        "training_params_hash": training_fingerprint(params),  # what retrain-on-change compares
        "model": params.train.model,
        "dataset_source": params.ingest.source,
        "excluded_images": str(0 if exclude is None else len(read_exclusions(exclude))),
    }
    (out / "params.yaml").write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    exp_id = tracking.ensure_experiment(
        params.register_.experiment, artifact_root=paths.state / "mlartifacts"
    )
    if previous:
        run = tracking.RunRef(previous["run_id"], previous["experiment_id"], uri)
    else:
        run = tracking.start_run(
            exp_id, run_name=ray_run, params=params.to_dict(), tags=provenance, tracking_uri=uri
        )
    _write_json(paths.run_file, {**run.to_dict(), "ray_run_name": ray_run, **provenance})
    try:
        result = train(
            params.train,
            data=paths.data,
            out_dir=out,
            storage_path=paths.state / "ray_results",
            run_name=ray_run,
            seed=params.project.seed,
            weights_dir=paths.state / "weights",
            exclude_file=exclude,
            show_progress=progress,
            ray_options=ray_options,
        )
    except BaseException:
        tracking.end_run(run.run_id, status="FAILED")
        raise
    curves = plot_training_curves(result.history, out / "training_curves.png")
    final = {
        k: v
        for k, v in result.final.items()
        if k in ("val_accuracy", "val_loss", "train_loss", "train_accuracy")
    }
    _write_json(
        out / "metrics.json", {**final, "train_seconds": result.seconds, "epochs": len(result.history)}
    )
    tracking.log_history(run.run_id, result.history)
    tracking.log_metrics(run.run_id, {"train_seconds": result.seconds})
    if exclude is not None:
        tracking.log_artifacts(run.run_id, [exclude], artifact_path="train")
    tracking.log_artifacts(
        run.run_id, [out / "params.yaml", out / "history.json", curves], artifact_path="train"
    )
    tracking.log_artifacts(run.run_id, [result.model_dir], artifact_path="checkpoint")
    return {"run_id": run.run_id, "tracking_uri": uri, "model_dir": str(result.model_dir), **final}


# --------------------------------------------------------------------------- 4. evaluate


def run_evaluate(params: Params, *, model_uri: str | None = None) -> dict[str, Any]:
    """All test-set evidence, gates and the gate report; logged to MLflow.

    Without ``model_uri`` the freshly trained ``outputs/train/model`` is evaluated into
    ``outputs/evaluate`` and its training run; with one (``models:/<name>@<alias>``,
    ``models:/<name>/<version>``, ``runs:/<id>/model``) that registered model is downloaded and
    evaluated in a new MLflow run, its report in ``outputs/evaluate/models/<slug>/`` (the
    pipeline's report is left alone). See :mod:`components.evaluate.evaluate_run`.
    """
    from components.evaluate.evaluate_run import evaluate_registered, evaluate_trained

    paths = StagePaths(params)
    _tracking(params)
    if model_uri is None:
        run = _read_json(paths.run_file, hint="run `imgflow train` first")
        return evaluate_trained(params, run=run, out_dir=paths.out("evaluate"))
    return evaluate_registered(params, model_uri, out_root=paths.out("evaluate"))


# --------------------------------------------------------------------------- 5. register


def _pip_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in SERVING_REQUIREMENTS]


def _example_image(params: Params) -> bytes:
    manifest = read_manifest(StagePaths(params).data.manifest)
    row = manifest[manifest["split"] == "test"].iloc[0]
    return (params.project.data_dir / row["path"]).read_bytes()


def run_register(params: Params, *, raise_on_gate_failure: bool = True) -> dict[str, Any]:
    """Register the model: alias ``candidate`` always, ``challenger`` when the gates passed, and
    ``champion`` when they passed and ``register.auto_promote`` (see :mod:`components.registry.registry`).

    When a gate failed: raises GatesFailedError (exit code 3) after registering, or, with
    ``raise_on_gate_failure=False``, returns the result with ``gates_passed: False``.
    """
    import shutil
    import tempfile

    from components.evaluate.gates import GateReport
    from components.model.checkpoint import with_temperature

    paths = StagePaths(params)
    run = _read_json(paths.run_file, hint="run `imgflow train` first")
    gates_json = _read_json(paths.out("evaluate") / "gates.json", hint="run `imgflow evaluate` first")
    gates = GateReport.from_dict(gates_json)
    evaluation = _read_json(paths.out("evaluate") / "metrics.json", hint="run `imgflow evaluate` first")
    tracking, _ = _tracking(params)
    with tempfile.TemporaryDirectory(prefix="imgflow-register-") as tmp:
        # The served model carries the temperature fitted by evaluate (calibrated probabilities) and,
        # multi-label, the per-label thresholds tuned on val; a copy, because outputs/train/model is
        # the train stage's DVC output.
        model_dir = Path(shutil.copytree(paths.out("train") / "model", Path(tmp) / "model"))
        spec = with_temperature(
            model_dir, float(gates_json.get("temperature", 1.0)), gates_json.get("thresholds")
        )
        if spec.multilabel and spec.thresholds is None:
            raise DataError(
                "a multi-label model needs the thresholds evaluate tunes: re-run `imgflow evaluate`"
            )
        model_uri = tracking.log_pyfunc_model(
            run["run_id"],
            model_dir=model_dir,
            example_image=_example_image(params),
            pip_requirements=_pip_requirements(),
        )
    tags = {
        "data_version": run["data_version"],
        "git_commit": run["git_commit"],
        "params_hash": run["params_hash"],
        "training_run_id": run["run_id"],
        "gates_passed": str(gates.passed).lower(),
        "failed_gates": ",".join(g.name for g in gates.failed()),
        **_headline_tags(evaluation),
        "task": spec.task,
        "temperature": f"{float(gates_json.get('temperature', 1.0)):.4f}",
        "gate_verdicts": json.dumps({g["name"]: g["status"] for g in gates_json.get("gates", [])})[:4900],
    }
    cfg = params.register_
    reg = tracking.register(model_uri, name=cfg.model_name, run_id=run["run_id"], tags=tags, aliases=(),
                            attempts=cfg.retries, backoff_s=cfg.retry_backoff_s)  # fmt: skip
    promotion = _record_and_promote(params, reg.version, gates_passed=gates.passed)
    tracking.end_run(run["run_id"])
    result = {
        **reg.to_dict(),
        "aliases": promotion.pop("aliases"),
        "promotion": promotion,
        "gates_passed": gates.passed,
        "failed_gates": [g.message for g in gates.failed()],
    }
    _write_json(paths.out("register") / "registration.json", result)
    if not gates.passed and raise_on_gate_failure:
        raise GatesFailedError(gate_failure_message(result))
    return result


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


def _record_and_promote(params: Params, version: str, *, gates_passed: bool) -> dict[str, Any]:
    """Move candidate/challenger to the new version; promote it when allowed. Returns what happened."""
    from components.registry import registry

    cfg = params.register_
    opts = _registry_opts(params)
    registry.record_registration(cfg.model_name, version, gates_passed=gates_passed, **opts)
    out: dict[str, Any] = {"promoted": False}
    if gates_passed and cfg.auto_promote:
        try:
            entry = registry.promote(cfg.model_name, version, reason="gates passed at registration",
                                     expected_from=_evaluated_against(params), **opts)  # fmt: skip
            out = {"promoted": bool(entry["changed"]), "from": entry["from"]}
        except registry.PromotionConflictError as e:
            logger.warning("version %s stays challenger: %s", version, e)
            out = {"promoted": False, "conflict": str(e)}
    now = registry.aliases(cfg.model_name, retry=opts["retry"])
    return {**out, "aliases": sorted(a for a, v in now.items() if v == version)}


def gate_failure_message(registration: dict[str, Any]) -> str:
    failed = registration["failed_gates"]
    lines = "\n".join(f"  - {m}" for m in failed)
    return (
        f"model version {registration['version']} registered as 'candidate' but NOT promoted to "
        f"'champion': {len(failed)} gate(s) failed:\n{lines}"
    )


# --------------------------------------------------------------------------- promotion


def _registry_opts(params: Params) -> dict[str, Any]:
    from components.registry import registry

    cfg = params.register_
    retry = registry.Retry(attempts=cfg.retries, backoff_s=cfg.retry_backoff_s)
    return {"lock_timeout_s": cfg.lock_timeout_s, "retry": retry}


def run_promote(
    params: Params, version: str, *, to: str = "champion", force: bool = False, reason: str | None = None
) -> dict[str, Any]:
    """``imgflow promote``: point ``to`` at ``version`` (gates must have passed unless forced)."""
    from components.registry import registry

    _tracking(params)
    return registry.promote(params.register_.model_name, version, to=to, force=force, reason=reason,
                            **_registry_opts(params))  # fmt: skip


def run_rollback(params: Params, *, reason: str | None = None) -> dict[str, Any]:
    """``imgflow rollback``: the previous champion becomes champion again."""
    from components.registry import registry

    _tracking(params)
    return registry.rollback(params.register_.model_name, reason=reason, **_registry_opts(params))


def promotion_history(params: Params) -> list[dict[str, Any]]:
    """The append-only promotion log, oldest first."""
    from components.registry import registry

    _tracking(params)
    return registry.read_log(params.register_.model_name, retry=_registry_opts(params)["retry"])


# --------------------------------------------------------------------------- retrain on change


def run_check_freshness(params: Params, *, force: bool = False) -> dict[str, Any]:
    """After ingest: does the champion already come from this data version and these training params?
    ``retrain: False`` means a scheduled run can stop ("up to date"); see ``components.pipeline.freshness``."""
    from components.pipeline.freshness import decide, training_fingerprint

    manifest = StagePaths(params).data.manifest
    if not manifest.exists():
        raise DataError(f"no manifest at {manifest}: run `imgflow ingest` first")
    tracking, _ = _tracking(params)
    verdict = decide(
        data_version=data_version(manifest),
        training_params_hash=training_fingerprint(params),
        champion=tracking.alias_provenance(params.register_.model_name, tracking.CHAMPION),
        force=force,
    )
    return {**verdict.to_dict(), "model_name": params.register_.model_name}


# --------------------------------------------------------------------------- queries


def list_models(params: Params) -> list[dict[str, Any]]:
    tracking, _ = _tracking(params)
    return list(tracking.list_versions(params.register_.model_name))


# --------------------------------------------------------------------------- serving, batch prediction


def resolve_model_uri(params: Params, model: str | None) -> str:
    """``--model`` if given (a registry URI or a local model folder), else the champion."""
    return model or params.serve.model or f"models:/{params.register_.model_name}@champion"


def load_predictor(params: Params, model: str | None, tmp: Path, **kwargs: Any) -> tuple[Any, str]:
    """A Predictor for ``model`` (registry/run URI, or a folder holding model.json) and its URI."""
    from components.model.checkpoint import SPEC_FILE, Predictor

    uri = resolve_model_uri(params, model)
    if (Path(uri) / SPEC_FILE).exists():
        return Predictor.from_dir(Path(uri), **kwargs), uri
    tracking, _ = _tracking(params)
    return Predictor.from_dir(tracking.download_model_dir(uri, tmp / "served"), **kwargs), uri


def run_serve(
    params: Params, *, model: str | None = None, host: str | None = None, port: int | None = None
) -> None:
    """``imgflow serve``: the HTTP scoring server (blocks until interrupted)."""
    import tempfile

    from components.serve import serving

    cfg = params.serve
    with tempfile.TemporaryDirectory(prefix="imgflow-serve-") as tmp:
        predictor, uri = load_predictor(params, model, Path(tmp))
        limits = serving.ServeLimits(
            top_k=cfg.top_k, max_image_bytes=cfg.max_image_bytes, max_batch=cfg.max_batch
        )
        app = serving.create_app(predictor, model_uri=uri, limits=limits)
        serving.serve(app, host=host or cfg.host, port=port or cfg.port)


def run_predict(
    params: Params, source: Path, *, out: Path, model: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """``imgflow predict``: batch inference over a folder or CSV into a Parquet file, streaming."""
    import tempfile

    from tqdm import tqdm

    from components.serve.predict import list_inputs, predict_to_parquet

    cfg = params.predict
    paths = list_inputs(source)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imgflow-predict-") as tmp:
        predictor, uri = load_predictor(params, model, Path(tmp))
        with tqdm(total=len(paths), unit="img", disable=not progress, desc="predict") as bar:
            result = predict_to_parquet(predictor, paths, out, batch_size=cfg.batch_size, workers=cfg.workers,
                                        top_k=cfg.top_k, on_batch=bar.update)  # fmt: skip
    seconds = time.perf_counter() - t0
    return {**result, "model": uri, "seconds": seconds, "images_per_s": result["images"] / max(seconds, 1e-9)}


def _parity_images(params: Params, images: Path | None, limit: int = 256) -> list[bytes]:
    """Real images for the export parity check: ``images`` (folder/CSV), else the test split."""
    from components.serve.predict import list_inputs

    if images is not None:
        return [p.read_bytes() for p in list_inputs(images)[:limit]]
    manifest_path = StagePaths(params).data.manifest
    if not manifest_path.exists():
        raise DataError("no images for the parity check: pass --images <folder|csv> or run `imgflow ingest`")
    test = read_manifest(manifest_path).query("split == 'test'").head(limit)
    return [(params.project.data_dir / p).read_bytes() for p in test["path"]]


def run_export(
    params: Params, *, model: str | None = None, out: Path | None = None, images: Path | None = None
) -> dict[str, Any]:
    """``imgflow export --format onnx``: ONNX file + parity check; attached to the registered version."""
    import tempfile

    from components.model.export import check_parity, export_onnx

    out = out or params.project.output_dir / "export" / "model.onnx"
    with tempfile.TemporaryDirectory(prefix="imgflow-export-") as tmp:
        predictor, uri = load_predictor(params, model, Path(tmp))
        export_onnx(predictor, out)
        parity = check_parity(predictor, out, _parity_images(params, images))
    result = {"model": uri, "onnx": str(out), "parity": parity.to_dict()}
    report = _write_json(out.with_suffix(".parity.json"), result)
    if not parity.passed:
        raise DataError(
            f"ONNX parity check failed: max abs probability difference {parity.max_abs_diff:.2e} > "
            f"{parity.tolerance:.0e} on {parity.images} images; the file was not attached ({out})"
        )
    tracking, _ = _tracking(params)
    version = tracking.resolve_model_version(uri)
    if version is not None:
        name, number, run_id = version
        tracking.attach_to_version(name, number, run_id, [out, report], artifact_path="onnx",
                                   tags={"onnx_model": f"runs:/{run_id}/onnx/{out.name}",
                                         "onnx_parity_max_abs_diff": f"{parity.max_abs_diff:.3e}"})  # fmt: skip
        result["attached_to"] = {
            "name": name,
            "version": number,
            "artifact": f"runs:/{run_id}/onnx/{out.name}",
        }
    return result
