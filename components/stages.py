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
from typing import Any

import yaml

from components.config import Params
from components.errors import DataError, GatesFailedError, ValidationFailedError
from components.manifest import DataPaths, DatasetInfo, data_version, read_exclusions, read_manifest

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
    from components.ingest import ingest

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
    )
    return summary.to_dict()


# --------------------------------------------------------------------------- 2. validate


def run_validate(params: Params) -> dict[str, Any]:
    """Run the GE suite; writes the report, then raises ValidationFailedError if it failed."""
    from components.validation import validate_manifest, write_validation_report

    paths = StagePaths(params)
    if not paths.data.manifest.exists():
        raise DataError(f"no manifest at {paths.data.manifest}: run `imgflow ingest` first")
    info = DatasetInfo.load(paths.data.dataset)
    report = validate_manifest(read_manifest(paths.data.manifest), classes=info.classes, cfg=params.validate_)
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

    from components.label_quality import EXCLUDED_FILE, audit, write_audit_report, write_exclusions
    from components.ledger import update_ledger

    paths, cfg = StagePaths(params), params.audit
    if not paths.data.manifest.exists():
        raise DataError(f"no manifest at {paths.data.manifest}: run `imgflow ingest` first")
    manifest = read_manifest(paths.data.manifest)
    version = data_version(paths.data.manifest)
    result = audit(
        manifest, data_dir=paths.data.root, classes=DatasetInfo.load(paths.data.dataset).classes, cfg=cfg
    )
    out = paths.out("audit")
    diff = update_ledger(
        result.issues,
        data_version=version,
        current_ids=set(manifest["image_id"]),
        folder=paths.state / "audit-ledger",
        export_dir=out,
        recorded_at=datetime.now(UTC).isoformat(timespec="microseconds"),
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
    metrics |= {k: result.summary[k] for k in ("label_error_rate", "oof_accuracy", "audited")}
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
    from components import clip_baseline as cb
    from components.embeddings import EmbeddingCache

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
            record, disagreements = cb.run_baselines(
                encoder,
                read_manifest(paths.data.manifest),
                DatasetInfo.load(paths.data.dataset).classes,
                data_dir=params.project.data_dir,
                cache=EmbeddingCache(paths.state / "embeddings", encoder.key),
                cfg=cfg,
            )
    files = cb.write_baseline(record, disagreements, paths.out("baseline"))
    record["mlflow_runs"] = _log_baseline_runs(params, record, files)
    _write_json(files["baseline"], record)  # again, now with the run ids
    return {
        **cb.summarize(record),
        "mlflow_runs": record["mlflow_runs"],
        "out_dir": str(paths.out("baseline")),
    }


def _log_baseline_runs(params: Params, record: dict[str, Any], files: dict[str, Path]) -> dict[str, str]:
    """One finished MLflow run per baseline (metrics named like the trained model's ``test_*``), or
    one run saying why the baseline was skipped. Returns kind -> run id."""
    from components.evaluation import flat_metrics
    from components.provenance import git_commit

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
    from components import tracking

    uri = tracking.configure(params.register_.tracking_uri, state_dir=params.project.state_dir)
    return tracking, uri


def run_train(params: Params, *, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Train through Ray Train and log the run (params, provenance, per-epoch metrics) to MLflow."""
    from components.plots import plot_training_curves
    from components.provenance import git_commit
    from components.training import train

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


@dataclass
class _SplitOutput:
    """One model's pass over one split: logits (N, K), targets (N,), per-image brightness and
    contrast (N,), and the kept images (M, C, H, W) in [0, 1] at model input size, for the sweep."""

    logits: Any
    targets: Any
    properties: dict[str, Any]
    kept: Any = None
    kept_targets: Any = None


def _split_pass(params: Params, model_dir: Path, split: str, *, keep: Any = None) -> tuple[_SplitOutput, Any]:
    """Predict ``split`` with the model in ``model_dir``; keep the images at indices ``keep``."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from components.checkpoint import load_classifier
    from components.data import dataset_for_split
    from components.models import create_image_transform, image_mode
    from components.robustness import prepare_for_inference
    from components.slices import image_properties

    model, spec = load_classifier(model_dir)
    fast = prepare_for_inference(model)
    ds = dataset_for_split(
        read_manifest(StagePaths(params).data.manifest),
        split,
        data_dir=params.project.data_dir,
        classes=spec.classes,
        transform=create_image_transform(spec.data_config, is_training=False),
        mode=image_mode(spec.in_chans),
    )
    mean = torch.tensor(spec.data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec.data_config["std"]).view(1, -1, 1, 1)
    keep_mask = np.zeros(len(ds), dtype=bool) if keep is None else np.isin(np.arange(len(ds)), keep)
    logits, targets, props, kept = [], [], [], []
    start = 0
    with torch.inference_mode():
        for x, y in DataLoader(ds, batch_size=params.evaluate.batch_size, shuffle=False):
            logits.append(fast(x.contiguous(memory_format=torch.channels_last)).float().numpy())
            targets.append(y.numpy())
            x01 = (x * std + mean).clamp_(0, 1)
            props.append(image_properties(x01.numpy()))
            sel = torch.from_numpy(keep_mask[start : start + len(y)])
            if sel.any():
                kept.append((x01[sel], y[sel]))
            start += len(y)
    out = _SplitOutput(
        logits=np.concatenate(logits),
        targets=np.concatenate(targets).astype(np.int64),
        properties={k: np.concatenate([p[k] for p in props]) for k in props[0]},
        kept=torch.cat([k[0] for k in kept]) if kept else None,
        kept_targets=torch.cat([k[1] for k in kept]) if kept else None,
    )
    return out, (model, spec)


def _sweep_sample(targets: Any, max_images: int | None, seed: int) -> Any:
    """Class-stratified fixed-seed sample of test indices for the corruption sweep (sorted)."""
    import numpy as np

    n = len(targets)
    if max_images is None or max_images >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picked = [
        rng.choice(idx, size=max(1, round(max_images * len(idx) / n)), replace=False)
        for idx in (np.flatnonzero(targets == c) for c in np.unique(targets))
    ]
    return np.sort(np.concatenate(picked))


def _has_split(params: Params, split: str) -> bool:
    return bool((read_manifest(StagePaths(params).data.manifest)["split"] == split).any())


def _champion_evidence(
    params: Params,
    tracking: Any,
    test: _SplitOutput,
    classes: tuple[str, ...],
    tmp: Path,
    *,
    own_version: str | None,
) -> dict[str, Any]:
    """Re-evaluate the registry's champion on the same test split and compare (non-inferiority)."""
    from components.champion import compare

    name = params.register_.model_name
    version = tracking.alias_version(name, tracking.CHAMPION)
    if version is None:
        return {
            "status": "none",
            "reason": f"no '{tracking.CHAMPION}' alias on {name}: nothing to compare with",
        }
    if version == own_version:
        return {
            "status": "skipped",
            "reason": f"the evaluated model is the champion itself (version {version})",
        }
    uri = f"models:/{name}@{tracking.CHAMPION}"
    champ_dir = tracking.download_model_dir(uri, tmp / "champion")
    champ, (_, spec) = _split_pass(params, champ_dir, "test")
    if tuple(spec.classes) != tuple(classes) or len(champ.targets) != len(test.targets):
        return {
            "status": "skipped",
            "reason": f"champion version {version} has another class set or test split",
        }
    comparison = compare(
        test.targets, test.logits.argmax(1), champ.logits.argmax(1), classes,
        margin=params.gates.max_accuracy_drop, class_margin=params.gates.max_class_recall_drop,
        n_boot=params.evaluate.bootstrap, confidence=params.gates.confidence, seed=params.project.seed,
    )  # fmt: skip
    return {"status": "compared", "version": version, "uri": uri, "comparison": comparison}


def _gather_evidence(
    params: Params, model_dir: Path, tmp: Path, *, tracking: Any, own_version: str | None = None
) -> Any:
    """Run every measurement of the evaluate stage on the model in ``model_dir``."""
    import numpy as np
    import pandas as pd

    from components.calibration import calibrate, softmax_t
    from components.checkpoint import load_spec
    from components.data import encode_labels, split_rows
    from components.evaluation import compute_metrics
    from components.gate_report import Evidence
    from components.robustness import corruption_sweep, resolve_families
    from components.slices import slice_table

    ev_cfg, rob = params.evaluate, params.evaluate.robustness
    seed = params.project.seed
    rows = split_rows(read_manifest(StagePaths(params).data.manifest), "test")
    labels = np.asarray(encode_labels(rows["label"].tolist(), load_spec(model_dir).classes))
    keep = _sweep_sample(labels, rob.max_images, seed) if rob.enabled else None
    test, (model, spec) = _split_pass(params, model_dir, "test", keep=keep)
    fit = ev_cfg.temperature_scaling and _has_split(params, "val")
    val = _split_pass(params, model_dir, "val")[0] if fit else test
    cal = calibrate(
        val.logits, val.targets, test.logits, test.targets, n_bins=ev_cfg.calibration_bins, fit=fit
    )
    probs = softmax_t(test.logits, cal.temperature)
    metrics = compute_metrics(
        test.targets, probs, spec.classes, top_k=ev_cfg.top_k, confidence=params.gates.confidence
    )
    robustness = None
    if rob.enabled:
        batches = zip(
            test.kept.split(ev_cfg.batch_size), test.kept_targets.split(ev_cfg.batch_size), strict=True
        )
        robustness = corruption_sweep(model, batches, mean=spec.data_config["mean"], std=spec.data_config["std"],
                                      families=resolve_families(rob.families), seed=seed)  # fmt: skip
    rows = rows.assign(
        pixels=rows["width"] * rows["height"], **{k: pd.Series(v) for k, v in test.properties.items()}
    )
    slices = slice_table(
        rows, probs.argmax(1) == test.targets, ev_cfg.slices, confidence=params.gates.confidence
    )
    champion = (
        _champion_evidence(params, tracking, test, spec.classes, tmp, own_version=own_version)
        if ev_cfg.compare_champion
        else {"status": "skipped", "reason": "evaluate.compare_champion is false"}
    )
    return Evidence(metrics=metrics, calibration=cal, robustness=robustness, slices=slices, champion=champion)


def run_evaluate(params: Params, *, model_uri: str | None = None) -> dict[str, Any]:
    """All test-set evidence, gates and the gate report; logged to MLflow.

    Without ``model_uri`` the freshly trained ``outputs/train/model`` is evaluated and logged into
    its training run; with one (``models:/<name>@<alias>``, ``models:/<name>/<version>``,
    ``runs:/<id>/model``) that registered model is downloaded and evaluated in a new MLflow run.
    """
    import tempfile

    from components.gate_report import all_scalars, build_gates, write_report

    paths = StagePaths(params)
    tracking, uri = _tracking(params)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imgflow-eval-") as tmp:
        if model_uri is None:
            run = _read_json(paths.run_file, hint="run `imgflow train` first")
            run_id, model_dir, own = run["run_id"], paths.out("train") / "model", None
            context = {
                "model": str(model_dir),
                "training run": run_id,
                "data version": run.get("data_version"),
            }
        else:
            model_dir = tracking.download_model_dir(model_uri, Path(tmp) / "evaluated")
            own = _own_version(tracking, params, model_uri)
            exp_id = tracking.ensure_experiment(
                params.register_.experiment, artifact_root=paths.state / "mlartifacts"
            )
            run_id = tracking.start_run(exp_id, run_name=f"evaluate {model_uri}", params=params.to_dict(),
                                        tags={"evaluated_model": model_uri}, tracking_uri=uri).run_id  # fmt: skip
            context = {"model": model_uri, "evaluation run": run_id,
                       "data version": data_version(paths.data.manifest)}  # fmt: skip
        evidence = _gather_evidence(params, model_dir, Path(tmp), tracking=tracking, own_version=own)
    gates = build_gates(params.gates, evidence)
    seconds = time.perf_counter() - t0
    files = write_report(
        evidence, gates, paths.out("evaluate"), context={**context, "seconds": round(seconds, 1)}
    )
    tracking.log_metrics(run_id, {**all_scalars(evidence), "evaluate_seconds": seconds}, prefix="test_")
    tracking.log_artifacts(run_id, list(files.values()), artifact_path="evaluate")
    tracking.set_tags(run_id, {"gates_passed": str(gates.passed).lower()})
    if model_uri is not None:
        tracking.end_run(run_id)
    return {
        "accuracy": evidence.metrics["accuracy"],
        "gates_passed": gates.passed,
        "verdict": gates.verdict(),
        "gates": gates.to_dict(),
        "temperature": evidence.calibration.temperature if evidence.calibration else 1.0,
        "report_html": str(files["report_html"]),
        "report_json": str(files["report_json"]),
        "run_id": run_id,
        "seconds": seconds,
    }


def _own_version(tracking: Any, params: Params, model_uri: str) -> str | None:
    """The registry version a ``models:/<name>@<alias>`` or ``models:/<name>/<n>`` URI names, if any."""
    rest = model_uri.removeprefix("models:/")
    if rest == model_uri or not rest.startswith(params.register_.model_name):
        return None
    tail = rest[len(params.register_.model_name) :]
    if tail.startswith("@"):
        return tracking.alias_version(params.register_.model_name, tail[1:])
    return tail.lstrip("/") or None


# --------------------------------------------------------------------------- 5. register


def _pip_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in SERVING_REQUIREMENTS]


def _example_image(params: Params) -> bytes:
    manifest = read_manifest(StagePaths(params).data.manifest)
    row = manifest[manifest["split"] == "test"].iloc[0]
    return (params.project.data_dir / row["path"]).read_bytes()


def run_register(params: Params, *, raise_on_gate_failure: bool = True) -> dict[str, Any]:
    """Register the model; alias ``challenger`` always, ``champion`` only when the gates passed.

    When a gate failed: raises GatesFailedError (exit code 3) after registering, or, with
    ``raise_on_gate_failure=False``, returns the result with ``gates_passed: False``.
    """
    import shutil
    import tempfile

    from components.checkpoint import with_temperature
    from components.evaluation import GateReport

    paths = StagePaths(params)
    run = _read_json(paths.run_file, hint="run `imgflow train` first")
    gates_json = _read_json(paths.out("evaluate") / "gates.json", hint="run `imgflow evaluate` first")
    gates = GateReport.from_dict(gates_json)
    evaluation = _read_json(paths.out("evaluate") / "metrics.json", hint="run `imgflow evaluate` first")
    tracking, _ = _tracking(params)
    with tempfile.TemporaryDirectory(prefix="imgflow-register-") as tmp:
        # The served model carries the temperature fitted by evaluate (calibrated probabilities);
        # a copy, because outputs/train/model is the train stage's DVC output.
        model_dir = Path(shutil.copytree(paths.out("train") / "model", Path(tmp) / "model"))
        with_temperature(model_dir, float(gates_json.get("temperature", 1.0)))
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
        "test_accuracy": f"{evaluation['accuracy']:.4f}",
        "temperature": f"{float(gates_json.get('temperature', 1.0)):.4f}",
    }
    aliases = [tracking.CHALLENGER] + ([tracking.CHAMPION] if gates.passed else [])
    reg = tracking.register(
        model_uri, name=params.register_.model_name, run_id=run["run_id"], tags=tags, aliases=aliases
    )
    tracking.end_run(run["run_id"])
    result = {
        **reg.to_dict(),
        "gates_passed": gates.passed,
        "failed_gates": [g.message for g in gates.failed()],
    }
    _write_json(paths.out("register") / "registration.json", result)
    if not gates.passed and raise_on_gate_failure:
        raise GatesFailedError(gate_failure_message(result))
    return result


def gate_failure_message(registration: dict[str, Any]) -> str:
    failed = registration["failed_gates"]
    lines = "\n".join(f"  - {m}" for m in failed)
    return (
        f"model version {registration['version']} registered as 'challenger' but NOT promoted to "
        f"'champion': {len(failed)} gate(s) failed:\n{lines}"
    )


# --------------------------------------------------------------------------- queries


def list_models(params: Params) -> list[dict[str, Any]]:
    tracking, _ = _tracking(params)
    return list(tracking.list_versions(params.register_.model_name))
