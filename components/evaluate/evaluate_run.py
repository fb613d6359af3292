"""The evaluate stage's work: predict the test (and val) split, gather every piece of evidence,
decide the gates, write the gate report and log it to MLflow.

:func:`evaluate_trained` evaluates the train stage's ``outputs/train/model`` into its training
run and ``outputs/evaluate/``; :func:`evaluate_registered` evaluates any registered model
(``models:/<name>@<alias>``, ``models:/<name>/<n>``, ``runs:/<id>/model``) in a new MLflow run and
a folder of its own under ``outputs/evaluate/models/``, so it never overwrites the pipeline's
report. The evidence (:func:`gather_evidence`): test metrics with one-vs-rest ROC/PR curves,
calibration (temperature fitted on val), the corruption sweep, slices, the champion re-evaluated on
the same test images, and the CLIP baselines of ``outputs/baseline`` when that stage ran.

A multi-label model (``spec.task == "multilabel"``) gets the same evidence in multi-label terms: one
sigmoid temperature fitted on val by BCE, per-label decision thresholds tuned on val
(``evaluate.threshold_rule``/``threshold_target``) on the scaled probabilities, mAP and per-label
metrics at those thresholds, corrupted mAP, slice subset accuracy, and mAP / per-label AP against a
multi-label champion. The thresholds go into ``gates.json`` for register.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from components.core.config import Params
from components.core.errors import DataError
from components.data.manifest import DataPaths, data_version, read_manifest

logger = logging.getLogger(__name__)

REGISTERED_DIR = "models"
"""Reports of ``evaluate --model`` go to ``<evaluate out>/models/<slug of the URI>/``."""


@dataclass
class SplitOutput:
    """One model's pass over one split.

    logits: (N, K) float; targets: (N,) int class indices, or (N, K) int8 0/1 for a multi-label
    model; properties: per-image ``brightness``/``contrast`` (N,); kept: the images picked for the
    corruption sweep, (M, C, H, W) uint8 at the model's input size (un-normalised), with their
    kept_targets (M,) or (M, K).
    """

    logits: np.ndarray
    targets: np.ndarray
    properties: dict[str, np.ndarray]
    kept: torch.Tensor | None = None
    kept_targets: torch.Tensor | None = None


def predict_split(
    params: Params, model_dir: Path, split: str, *, keep: np.ndarray | None = None
) -> tuple[SplitOutput, Any]:
    """Predict ``split`` with the model in ``model_dir``; keep the images at indices ``keep``.

    Returns the output and ``(model, spec)``. Images are decoded and transformed once; the kept
    ones are stored as uint8 (the sweep corrupts 8-bit images, like the files on disk).
    """
    from torch.utils.data import DataLoader

    from components.data.datasets import dataset_for_split
    from components.evaluate.robustness import prepare_for_inference
    from components.evaluate.slices import image_properties
    from components.model.checkpoint import load_classifier
    from components.model.models import create_image_transform, image_mode

    model, spec = load_classifier(model_dir)
    fast = prepare_for_inference(model)
    ds = dataset_for_split(
        read_manifest(DataPaths(params.project.data_dir).manifest),
        split,
        data_dir=params.project.data_dir,
        classes=spec.classes,
        transform=create_image_transform(spec.data_config, is_training=False),
        mode=image_mode(spec.in_chans),
        task=spec.task,
    )
    mean = torch.tensor(spec.data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(spec.data_config["std"]).view(1, -1, 1, 1)
    keep_mask = np.zeros(len(ds), dtype=bool)
    if keep is not None:
        keep_mask[keep] = True
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
                kept.append(((x01[sel] * 255).round_().to(torch.uint8), y[sel]))
            start += len(y)
    out = SplitOutput(
        logits=np.concatenate(logits),
        targets=np.concatenate(targets).astype(np.int8 if spec.multilabel else np.int64),
        properties={k: np.concatenate([p[k] for p in props]) for k in props[0]},
        kept=torch.cat([k[0] for k in kept]) if kept else None,
        kept_targets=torch.cat([k[1] for k in kept]) if kept else None,
    )
    return out, (model, spec)


def sweep_sample(targets: np.ndarray, max_images: int | None, seed: int) -> np.ndarray:
    """Class-stratified fixed-seed sample of test indices for the corruption sweep (sorted).

    targets: (N,) class indices, or (N, K) 0/1 rows (multi-label: stratified by each image's first label).
    """
    from components.task.multilabel import first_label

    targets = np.asarray(targets)
    if targets.ndim == 2:
        targets = first_label(targets)
    n = len(targets)
    if max_images is None or max_images >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picked = [
        rng.choice(idx, size=max(1, round(max_images * len(idx) / n)), replace=False)
        for idx in (np.flatnonzero(targets == c) for c in np.unique(targets))
    ]
    return np.sort(np.concatenate(picked))


def has_split(params: Params, split: str) -> bool:
    return bool((read_manifest(DataPaths(params.project.data_dir).manifest)["split"] == split).any())


# --------------------------------------------------------------------------- evidence


def champion_evidence(
    params: Params,
    test: SplitOutput,
    classes: tuple[str, ...],
    tmp: Path,
    *,
    own_version: str | None,
    task: str = "singlelabel",
) -> dict[str, Any]:
    """Re-evaluate the registry's champion on the same test split and compare (non-inferiority).

    A champion of the other task (single- vs multi-label) cannot be compared: status ``not applicable``
    (its gate then fails as not applicable rather than passing silently).
    """
    from components.evaluate.champion import compare, compare_multilabel
    from components.model.checkpoint import load_spec
    from components.registry import tracking

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
    champ_task = load_spec(champ_dir).task
    if champ_task != task:
        return {
            "status": "not applicable", "version": version, "uri": uri,
            "reason": f"champion version {version} is a {champ_task} model and this one is {task}: "
            "their metrics cannot be compared",
        }  # fmt: skip
    champ, (_, spec) = predict_split(params, champ_dir, "test")
    if tuple(spec.classes) != tuple(classes) or len(champ.targets) != len(test.targets):
        return {
            "status": "skipped",
            "reason": f"champion version {version} has another class set or test split",
        }
    gates, n_boot, seed = params.gates, params.evaluate.bootstrap, params.project.seed
    if task == "multilabel":
        comparison = compare_multilabel(
            test.targets, test.logits, champ.logits, classes, margin=gates.max_map_drop,
            label_margin=gates.max_label_ap_drop, n_boot=n_boot, confidence=gates.confidence, seed=seed,
        )  # fmt: skip
    else:
        comparison = compare(
            test.targets, test.logits.argmax(1), champ.logits.argmax(1), classes, margin=gates.max_accuracy_drop,
            class_margin=gates.max_class_recall_drop, n_boot=n_boot, confidence=gates.confidence, seed=seed,
        )  # fmt: skip
    return {"status": "compared", "version": version, "uri": uri, "comparison": comparison}


def gather_evidence(
    params: Params, model_dir: Path, tmp: Path, *, own_version: str | None = None, baseline: Any = None
) -> Any:
    """Run every measurement of the evaluate stage on the model in ``model_dir``.

    baseline: the baseline stage's ``baseline.json`` record (or None when it has not run).
    """
    from components.data.datasets import encode_targets, split_rows
    from components.evaluate.gate_report import Evidence
    from components.evaluate.slices import slice_table
    from components.model.checkpoint import load_spec

    ev_cfg, rob = params.evaluate, params.evaluate.robustness
    spec = load_spec(model_dir)
    rows = split_rows(read_manifest(DataPaths(params.project.data_dir).manifest), "test")
    targets = np.asarray(encode_targets(rows, spec.classes, spec.task))
    keep = sweep_sample(targets, rob.max_images, params.project.seed) if rob.enabled else None
    test, (model, spec) = predict_split(params, model_dir, "test", keep=keep)
    # Multi-label thresholds are always tuned on val; single-label needs val only to fit T.
    want_val = spec.multilabel or ev_cfg.temperature_scaling
    val = predict_split(params, model_dir, "val")[0] if want_val and has_split(params, "val") else None
    measured = (_multilabel_measures if spec.multilabel else _singlelabel_measures)(params, spec, test, val)
    robustness = _robustness(params, model, spec, test) if rob.enabled else None
    rows = rows.assign(
        pixels=rows["width"] * rows["height"], **{k: pd.Series(v) for k, v in test.properties.items()}
    )
    slices = slice_table(rows, measured.correct, ev_cfg.slices, confidence=params.gates.confidence)
    champion = (
        champion_evidence(params, test, spec.classes, tmp, own_version=own_version, task=spec.task)
        if ev_cfg.compare_champion
        else {"status": "skipped", "reason": "evaluate.compare_champion is false"}
    )
    return Evidence(metrics=measured.metrics, calibration=measured.calibration, robustness=robustness,
                    slices=slices, champion=champion, baseline=baseline, curves=measured.curves)  # fmt: skip


@dataclass
class _Measured:
    """Test metrics, calibration, ROC/PR curves and which test images are right (N,) bool (top-1, or
    the whole label set for multi-label: what the slices count)."""

    metrics: dict[str, Any]
    calibration: Any
    curves: dict[str, Any]
    correct: np.ndarray


def _singlelabel_measures(params: Params, spec: Any, test: SplitOutput, val: SplitOutput | None) -> _Measured:
    from components.evaluate.calibration import calibrate, softmax_t
    from components.task.metrics import compute_metrics, one_vs_rest_curves

    ev_cfg = params.evaluate
    fit = ev_cfg.temperature_scaling and val is not None
    fit_on = val if fit and val is not None else test
    cal = calibrate(fit_on.logits, fit_on.targets, test.logits, test.targets, n_bins=ev_cfg.calibration_bins,
                    fit=fit)  # fmt: skip
    probs = softmax_t(test.logits, cal.temperature)
    metrics = compute_metrics(
        test.targets, probs, spec.classes, top_k=ev_cfg.top_k, confidence=params.gates.confidence
    )
    onehot = np.eye(len(spec.classes), dtype=np.int8)[test.targets]
    curves = one_vs_rest_curves(onehot, probs, spec.classes)
    return _Measured(metrics, cal, curves, probs.argmax(1) == test.targets)


def _multilabel_measures(params: Params, spec: Any, test: SplitOutput, val: SplitOutput | None) -> _Measured:
    """T fitted on val (BCE), then thresholds tuned on val's scaled probabilities, then test metrics."""
    from components.evaluate.calibration import calibrate_multilabel, sigmoid_t
    from components.task.metrics import one_vs_rest_curves
    from components.task.multilabel import multilabel_metrics, predict_sets, tune_thresholds

    ev_cfg = params.evaluate
    fit = ev_cfg.temperature_scaling and val is not None
    fit_on = val if fit and val is not None else test
    cal = calibrate_multilabel(fit_on.logits, fit_on.targets, test.logits, test.targets, spec.classes,
                               n_bins=ev_cfg.calibration_bins, fit=fit)  # fmt: skip
    tuning: dict[str, Any] = {"rule": ev_cfg.threshold_rule, "target": ev_cfg.threshold_target,
                              "fitted_on": "none", "n_fit": 0, "per_label": []}  # fmt: skip
    thresholds = [0.5] * len(spec.classes)
    if val is None:
        logger.warning("no val split: multi-label decision thresholds stay at 0.5 (nothing to tune them on)")
    else:
        tuned = tune_thresholds(val.targets, sigmoid_t(val.logits, cal.temperature), spec.classes,
                                rule=ev_cfg.threshold_rule, target=ev_cfg.threshold_target)  # fmt: skip
        thresholds = [t.threshold for t in tuned]
        positives = val.targets.sum(axis=0)
        tuning |= {"fitted_on": "val", "n_fit": len(val.targets),
                   "per_label": [{**asdict(t), "val_support": int(k)} for t, k in zip(tuned, positives, strict=True)]}  # fmt: skip
    probs = sigmoid_t(test.logits, cal.temperature)
    metrics = multilabel_metrics(
        test.targets, probs, thresholds, spec.classes, confidence=params.gates.confidence
    )
    metrics["threshold_tuning"] = tuning
    correct = (predict_sets(probs, thresholds) == test.targets).all(axis=1)
    return _Measured(metrics, cal, one_vs_rest_curves(test.targets, probs, spec.classes), correct)


def _robustness(params: Params, model: Any, spec: Any, test: SplitOutput) -> Any:
    from components.evaluate.robustness import corruption_sweep, resolve_families
    from components.task.multilabel import mean_average_precision

    assert test.kept is not None and test.kept_targets is not None
    size = params.evaluate.robustness.batch_size

    def mean_ap(logits: np.ndarray, y: np.ndarray) -> float:
        # AP depends only on the order of the scores: logits need no temperature nor threshold.
        return mean_average_precision(y, logits)

    return corruption_sweep(
        model,
        zip(test.kept.split(size), test.kept_targets.split(size), strict=True),
        mean=spec.data_config["mean"],
        std=spec.data_config["std"],
        families=resolve_families(params.evaluate.robustness.families),
        seed=params.project.seed,
        score=mean_ap if spec.multilabel else None,
        metric="mAP" if spec.multilabel else "accuracy",
    )


# --------------------------------------------------------------------------- the stage


def model_slug(model_uri: str) -> str:
    """Folder name of a model URI: ``models:/imgflow@champion`` -> ``imgflow@champion``."""
    rest = re.sub(r"^[a-z]+:/+", "", model_uri)
    return re.sub(r"[^A-Za-z0-9@._-]+", "_", rest).strip("_") or "model"


def evaluate_trained(params: Params, *, run: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Evaluate ``outputs/train/model`` into its training run (``run``: ``outputs/train/run.json``)."""
    model_dir = params.project.output_dir / "train" / "model"
    if not (model_dir / "model.json").exists():
        raise DataError(f"no trained model in {model_dir}: run `imgflow train` first")
    context = {
        "model": str(model_dir),
        "training run": run["run_id"],
        "data version": run.get("data_version"),
    }
    with tempfile.TemporaryDirectory(prefix="imgflow-eval-") as tmp:
        return _evaluate(params, model_dir, Path(tmp), run_id=run["run_id"], context=context, out_dir=out_dir)


def evaluate_registered(params: Params, model_uri: str, *, out_root: Path) -> dict[str, Any]:
    """Evaluate a registered model in a new MLflow run; the report goes to ``out_root/models/<slug>``."""
    from components.registry import tracking

    paths = DataPaths(params.project.data_dir)
    with tempfile.TemporaryDirectory(prefix="imgflow-eval-") as tmp:
        model_dir = tracking.download_model_dir(model_uri, Path(tmp) / "evaluated")
        exp_id = tracking.ensure_experiment(
            params.register_.experiment, artifact_root=params.project.state_dir / "mlartifacts"
        )
        run_id = tracking.start_run(exp_id, run_name=f"evaluate {model_uri}", params=params.to_dict(),
                                    tags={"evaluated_model": model_uri}).run_id  # fmt: skip
        context = {"model": model_uri, "evaluation run": run_id, "data version": data_version(paths.manifest)}
        try:
            result = _evaluate(
                params, model_dir, Path(tmp), run_id=run_id, context=context,
                out_dir=out_root / REGISTERED_DIR / model_slug(model_uri),
                own_version=own_version(params, model_uri),
            )  # fmt: skip
        except BaseException:
            tracking.end_run(run_id, status="FAILED")
            raise
    tracking.end_run(run_id)
    return result


def _evaluate(
    params: Params,
    model_dir: Path,
    tmp: Path,
    *,
    run_id: str,
    context: dict[str, Any],
    out_dir: Path,
    own_version: str | None = None,
) -> dict[str, Any]:
    from components.baseline.clip_baseline import read_baseline
    from components.evaluate.gate_report import all_scalars, build_gates, write_report
    from components.registry import tracking

    t0 = time.perf_counter()
    baseline = read_baseline(params.project.output_dir / "baseline")
    evidence = gather_evidence(params, model_dir, tmp, own_version=own_version, baseline=baseline)
    gates = build_gates(params.gates, evidence, baseline=params.baseline)
    seconds = time.perf_counter() - t0
    files = write_report(evidence, gates, out_dir, context={**context, "seconds": round(seconds, 1)})
    tracking.log_metrics(run_id, {**all_scalars(evidence), "evaluate_seconds": seconds}, prefix="test_")
    tracking.log_metrics(run_id, baseline_scalars(baseline))
    tracking.log_artifacts(run_id, list(files.values()), artifact_path="evaluate")
    task = "multilabel" if evidence.multilabel else "singlelabel"
    tracking.set_tags(run_id, {"gates_passed": str(gates.passed).lower(), "task": task,
                               "baseline_status": str((baseline or {}).get("status", "not run"))})  # fmt: skip
    headline, value = evidence.headline
    return {
        "task": task,
        "accuracy": evidence.metrics.get("accuracy"),
        headline: value,
        "gates_passed": gates.passed,
        "verdict": gates.verdict(),
        "gates": gates.to_dict(),
        "temperature": evidence.calibration.temperature if evidence.calibration else 1.0,
        "thresholds": evidence.thresholds,
        "report_html": str(files["report_html"]),
        "report_json": str(files["report_json"]),
        "out_dir": str(out_dir),
        "run_id": run_id,
        "seconds": seconds,
    }


def baseline_scalars(baseline: dict[str, Any] | None) -> dict[str, float]:
    """Headline metrics of the CLIP baselines, named to sit next to the trained model's ``test_*``
    in the same MLflow run: ``baseline_zeroshot_test_accuracy``, ``baseline_linearprobe_test_macro_f1``."""
    out: dict[str, float] = {}
    multilabel = (baseline or {}).get("task") == "multilabel"
    keys = ("mAP", "micro_f1", "macro_f1") if multilabel else ("accuracy", "macro_f1", "balanced_accuracy")
    for kind, name in (("zero_shot", "zeroshot"), ("linear_probe", "linearprobe")):
        m = (baseline or {}).get(kind)
        if m:
            out |= {f"baseline_{name}_test_{k}": float(m[k]) for k in keys if m.get(k) is not None}
    return out


def own_version(params: Params, model_uri: str) -> str | None:
    """The registry version a ``models:/<name>@<alias>`` or ``models:/<name>/<n>`` URI names, if any."""
    from components.registry import tracking

    rest = model_uri.removeprefix("models:/")
    if rest == model_uri or not rest.startswith(params.register_.model_name):
        return None
    tail = rest[len(params.register_.model_name) :]
    if tail.startswith("@"):
        return tracking.alias_version(params.register_.model_name, tail[1:])
    return tail.lstrip("/") or None
