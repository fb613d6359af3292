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
from components.manifest import DataPaths, DatasetInfo, data_version, read_manifest

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
    result = {"success": report.success, "report_json": str(json_path), "report_html": str(html_path)}
    if not report.success:
        raise ValidationFailedError(f"data validation failed (report: {html_path}):\n{report.summary_text()}")
    return result


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
    provenance = {
        "data_version": data_version(paths.data.manifest),
        "git_commit": git_commit(),
        "params_hash": params.fingerprint(),
        "model": params.train.model,
        "dataset_source": params.ingest.source,
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
    tracking.log_artifacts(
        run.run_id, [out / "params.yaml", out / "history.json", curves], artifact_path="train"
    )
    tracking.log_artifacts(run.run_id, [result.model_dir], artifact_path="checkpoint")
    return {"run_id": run.run_id, "tracking_uri": uri, "model_dir": str(result.model_dir), **final}


# --------------------------------------------------------------------------- 4. evaluate


def _test_predictions(params: Params, model_dir: Path) -> tuple[Any, Any, tuple[str, ...]]:
    """Class probabilities (N, K) and true indices (N,) on the test split."""
    import torch
    from torch.utils.data import DataLoader

    from components.checkpoint import load_classifier
    from components.data import dataset_for_split
    from components.engine import predict_logits, softmax
    from components.models import create_image_transform, image_mode

    model, spec = load_classifier(model_dir)
    ds = dataset_for_split(
        read_manifest(StagePaths(params).data.manifest),
        "test",
        data_dir=params.project.data_dir,
        classes=spec.classes,
        transform=create_image_transform(spec.data_config, is_training=False),
        mode=image_mode(spec.in_chans),
    )
    loader = DataLoader(ds, batch_size=params.evaluate.batch_size, shuffle=False)
    logits, targets = predict_logits(model, loader, device=torch.device("cpu"))
    return softmax(logits, spec.temperature), targets, spec.classes


def run_evaluate(params: Params) -> dict[str, Any]:
    """Test-set metrics, confusion matrix and gates; logged into the training run."""
    from components.evaluation import check_gates, compute_metrics, flat_metrics, write_evaluation

    paths = StagePaths(params)
    run = _read_json(paths.run_file, hint="run `imgflow train` first")
    probs, targets, classes = _test_predictions(params, paths.out("train") / "model")
    metrics = compute_metrics(targets, probs, classes)
    gates = check_gates(
        metrics, min_accuracy=params.gates.min_accuracy, min_class_recall=params.gates.min_class_recall
    )
    files = write_evaluation(metrics, gates, paths.out("evaluate"))
    tracking, _ = _tracking(params)
    tracking.log_metrics(run["run_id"], flat_metrics(metrics), prefix="test_")
    tracking.log_artifacts(run["run_id"], list(files.values()), artifact_path="evaluate")
    tracking.set_tags(run["run_id"], {"gates_passed": str(gates.passed).lower()})
    return {
        "accuracy": metrics["accuracy"],
        "gates_passed": gates.passed,
        "gates": gates.to_dict(),
        "run_id": run["run_id"],
    }


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
    from components.evaluation import GateReport

    paths = StagePaths(params)
    run = _read_json(paths.run_file, hint="run `imgflow train` first")
    gates = GateReport.from_dict(
        _read_json(paths.out("evaluate") / "gates.json", hint="run `imgflow evaluate` first")
    )
    evaluation = _read_json(paths.out("evaluate") / "metrics.json", hint="run `imgflow evaluate` first")
    tracking, _ = _tracking(params)
    model_uri = tracking.log_pyfunc_model(
        run["run_id"],
        model_dir=paths.out("train") / "model",
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
