"""The evaluate stage's work on one local model: predict the test (and val) split, gather every piece
of evidence, decide the gates and write the gate report.

:func:`evaluate_model` evaluates the model in ``model_dir`` into ``out_dir`` and returns an
:class:`Evaluated`: the stage's result (headline, verdict, temperature, thresholds, report paths)
and what the caller logs to MLflow (scalars, files, tags). The registry and MLflow are the
pipeline's business (:mod:`components.pipeline.evaluation`): it downloads a registered model or the
champion and passes their folders and versions in (:class:`~components.evaluate.champion.Champion`).

The evidence (:func:`gather_evidence`): test metrics with one-vs-rest ROC/PR curves, calibration
(temperature fitted on val), the corruption sweep, slices, the champion re-evaluated on the same test
images, and the CLIP baselines of ``outputs/baseline`` when that stage ran. What differs between
single- and multi-label models is the task's (:class:`components.task.Task`): a multi-label model
gets one sigmoid temperature fitted on val by BCE, per-label decision thresholds tuned on val
(``evaluate.threshold_rule``/``threshold_target``) on the scaled probabilities, mAP and per-label
metrics at those thresholds, corrupted mAP, slice subset accuracy, and mAP / per-label AP against a
multi-label champion. The thresholds go into ``gates.json`` for register.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from components.core.config import Params
from components.core.errors import ConfigError, DataError
from components.data.manifest import DataPaths, read_manifest
from components.evaluate.champion import Champion, champion_evidence
from components.evaluate.predictions import SplitOutput, has_split, predict_split
from components.task import Task, task_of

if TYPE_CHECKING:
    from components.evaluate.calibration import CalibrationReport
    from components.evaluate.gate_report import Evidence

logger = logging.getLogger(__name__)

REGISTERED_DIR = "models"
"""Reports of ``evaluate --model`` go to ``<evaluate out>/models/<slug of the URI>/``."""
TRUST_DIR = "trust"
"""``<evaluate out>/trust/``: the OOD detector and conformal sets fitted for the model (register
ships them)."""


def sweep_sample(strata: np.ndarray, max_images: int | None, seed: int) -> np.ndarray:
    """Stratified fixed-seed sample of test indices for the corruption sweep (sorted).

    strata: (N,) int, each image's stratum (:meth:`components.task.Task.strata`: its class, or its
    first label for a multi-label model).
    """
    strata = np.asarray(strata)
    n = len(strata)
    if max_images is None or max_images >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picked = [
        rng.choice(idx, size=max(1, round(max_images * len(idx) / n)), replace=False)
        for idx in (np.flatnonzero(strata == c) for c in np.unique(strata))
    ]
    return np.sort(np.concatenate(picked))


# --------------------------------------------------------------------------- evidence


def gather_evidence(
    params: Params,
    model_dir: Path,
    *,
    champion: Champion | None = None,
    own_version: str | None = None,
    baseline: Any = None,
    trust_dir: Path | None = None,
    audit: dict[str, Any] | None = None,
) -> Evidence:
    """Run every measurement of the evaluate stage on the model in ``model_dir``.

    champion: the registry's champion (None: nothing to compare with); own_version: the registry
    version of the evaluated model, if it is one; baseline: the baseline stage's ``baseline.json``
    record (or None when it has not run); trust_dir: where the fitted OOD detector and conformal sets
    are saved (None: neither is fitted); audit: the audit's summary of this data version (its
    out-of-fold accuracy is a reference of ``gates.min_accuracy: auto``), or None.
    """
    from components.data.datasets import encode_targets, split_rows
    from components.evaluate.ensemble_eval import ensemble_evidence
    from components.evaluate.gate_report import Evidence
    from components.evaluate.slices import slice_table
    from components.model.checkpoint import load_spec

    ev_cfg, rob, adv = params.evaluate, params.evaluate.robustness, params.evaluate.adversarial
    spec = load_spec(model_dir)
    task = spec.task
    rows = split_rows(read_manifest(DataPaths(params.project.data_dir).manifest), "test")
    targets = np.asarray(encode_targets(rows, spec.classes, task))
    timings: dict[str, float] = {}
    timed = _stopwatch(timings)
    # The corruption sweep's sample; the adversarial check draws its own smaller one from it.
    size = rob.max_images if rob.enabled else adv.max_images
    sampled = rob.enabled or adv.enabled
    keep = sweep_sample(task.strata(targets), size, params.project.seed) if sampled else None
    with timed("predict"):
        test, (model, spec) = predict_split(params, model_dir, "test", keep=keep)
        # A fitted decision rule (multi-label thresholds) always needs val; else val only fits T.
        trusted = params.ood.enabled or params.conformal.enabled  # both fit on val
        want_val = task.fits_decision or ev_cfg.temperature_scaling or trusted
        val = predict_split(params, model_dir, "val")[0] if want_val and has_split(params, "val") else None
    with timed("metrics"):
        measured = measure(params, task, spec.classes, test, val)
    with timed("robustness"):
        robustness = _robustness(params, model, spec, test) if rob.enabled else None
    with timed("adversarial"):
        adversarial = _adversarial(params, model, spec, test) if adv.enabled else None
    with timed("explanations"):
        explanations = _explanations(params, model, spec, test, measured)
    with timed("ood_conformal"):
        ood, conformal = (
            _trust(params, model_dir, model, spec, test, val, measured, trust_dir)
            if trust_dir
            else (None, None)
        )
        hierarchy = _hierarchy(params, spec, test, val, measured, trust_dir)
    with timed("slices"):
        rows = rows.assign(
            pixels=rows["width"] * rows["height"], **{k: pd.Series(v) for k, v in test.properties.items()}
        )
        slices = slice_table(rows, measured.correct, ev_cfg.slices, confidence=params.gates.confidence)
    with timed("champion"):
        compared = (
            champion_evidence(params, test, spec.classes, task, champion, own_version=own_version)
            if ev_cfg.compare_champion
            else {"status": "skipped", "reason": "evaluate.compare_champion is false"}
        )
    with timed("ensemble"):
        ensemble = ensemble_evidence(params, model_dir)
    logger.info("evaluate: %s", ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return Evidence(metrics=measured.metrics, calibration=measured.calibration, robustness=robustness,
                    slices=slices, champion=compared, baseline=baseline, curves=measured.curves,
                    adversarial=adversarial, explanations=explanations, ood=ood,
                    conformal=conformal, hierarchy=hierarchy, audit=audit,
                    ensemble=ensemble, timings=timings)  # fmt: skip


def _stopwatch(into: dict[str, float]) -> Callable[[str], AbstractContextManager[None]]:
    """``with timed("part"):`` adds the block's wall seconds to ``into["part"]``."""

    @contextmanager
    def timed(part: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            into[part] = into.get(part, 0.0) + time.perf_counter() - t0

    return timed


@dataclass
class Measured:
    """Test metrics, calibration, ROC/PR curves and which test images are right (N,) bool (top-1, or
    the whole label set for multi-label: what the slices count)."""

    metrics: dict[str, Any]
    calibration: CalibrationReport
    curves: dict[str, Any]
    correct: np.ndarray


def measure(
    params: Params, task: Task, classes: tuple[str, ...], test: SplitOutput, val: SplitOutput | None
) -> Measured:
    """T fitted on val (the task's log-loss), then the task's decision rule fitted on val's scaled
    probabilities (multi-label thresholds), then the test metrics at that rule."""
    from components.evaluate.calibration import calibrate
    from components.task.metrics import one_vs_rest_curves

    ev_cfg = params.evaluate
    fit = ev_cfg.temperature_scaling and val is not None
    fit_on = val if fit and val is not None else test
    cal = calibrate(task, fit_on.logits, fit_on.targets, test.logits, test.targets, classes,
                    n_bins=ev_cfg.calibration_bins, fit=fit)  # fmt: skip
    decision = task.fit_decision(
        None if val is None else val.targets,
        None if val is None else task.probabilities(val.logits, temperature=cal.temperature),
        classes, rule=ev_cfg.threshold_rule, target=ev_cfg.threshold_target,
    )  # fmt: skip
    probs = task.probabilities(test.logits, temperature=cal.temperature)
    metrics = task.metrics(test.targets, probs, classes, thresholds=decision.thresholds, top_k=ev_cfg.top_k,
                           confidence=params.gates.confidence)  # fmt: skip
    curves = one_vs_rest_curves(task.one_hot(test.targets, len(classes)), probs, classes)
    correct = task.correct(probs, test.targets, thresholds=decision.thresholds)
    return Measured(decision.annotate(metrics), cal, curves, correct)


def _robustness(params: Params, model: Any, spec: Any, test: SplitOutput) -> Any:
    """The corruption sweep on the kept test images, scored by the task's headline (top-1 accuracy,
    or mAP: both straight from the logits)."""
    from components.evaluate.robustness import corruption_sweep, resolve_families

    assert test.kept is not None and test.kept_targets is not None
    size = params.evaluate.robustness.batch_size
    return corruption_sweep(
        model,
        zip(test.kept.split(size), test.kept_targets.split(size), strict=True),
        mean=spec.data_config["mean"],
        std=spec.data_config["std"],
        families=resolve_families(params.evaluate.robustness.families),
        seed=params.project.seed,
        score=spec.task.headline_of_scores,
        metric=spec.task.headline,
        amp=params.evaluate.robustness.amp,
    )


def _adversarial(params: Params, model: Any, spec: Any, test: SplitOutput) -> dict[str, Any]:
    """FGSM/PGD accuracy vs eps on a class-stratified sample of the kept test images
    (:mod:`components.evaluate.adversarial`); single-label models only."""
    from components.evaluate.adversarial import adversarial_curve

    cfg = params.evaluate.adversarial
    if test.kept is None or test.kept_targets is None or test.kept_targets.ndim != 1:
        return {"status": "skipped", "reason": "single-label models only (no one true class to attack)"}
    pick = sweep_sample(test.kept_targets.numpy(), cfg.max_images, cfg.seed)
    report = adversarial_curve(
        model, test.kept[pick], test.kept_targets[pick], mean=spec.data_config["mean"],
        std=spec.data_config["std"], epsilons=cfg.epsilons, pgd_steps=cfg.pgd_steps, seed=cfg.seed,
        amp=cfg.amp,
    )  # fmt: skip
    return report.to_dict()


def _explanations(params: Params, model: Any, spec: Any, test: SplitOutput, measured: Measured) -> Any:
    """Grad-CAM gallery of the most confident test errors and the most confused pairs
    (:mod:`components.evaluate.explain`); single-label models only."""
    import torch

    from components.data.datasets import dataset_for_split
    from components.evaluate.explain import Gallery, build_gallery, pick_examples
    from components.model.models import create_image_transform, image_mode

    if test.targets.ndim != 1:
        return Gallery((), "", status="skipped", reason="single-label models only")
    probs = spec.task.probabilities(test.logits, temperature=measured.calibration.temperature)
    picks = pick_examples(probs, test.targets, spec.task.most_confused(measured.metrics, k=3), spec.classes)
    ds = dataset_for_split(
        read_manifest(DataPaths(params.project.data_dir).manifest), "test", data_dir=params.project.data_dir,
        classes=spec.classes, transform=create_image_transform(spec.data_config, is_training=False),
        mode=image_mode(spec.in_chans), task=spec.task,
    )  # fmt: skip
    cfg = spec.data_config
    try:
        return build_gallery(model, lambda rows: torch.stack([ds[i][0] for i in rows]), picks, probs=probs,
                             targets=test.targets, classes=spec.classes, mean=cfg["mean"], std=cfg["std"])  # fmt: skip
    except (ConfigError, RuntimeError) as e:  # evidence for people, not a gate: the report still gets written
        logger.warning("no Grad-CAM gallery for this model: %s", e)
        return Gallery((), "", status="skipped", reason=f"Grad-CAM failed on this model: {e}")


def _trust(
    params: Params,
    model_dir: Path,
    model: Any,
    spec: Any,
    test: SplitOutput,
    val: SplitOutput | None,
    measured: Measured,
    trust_dir: Path,
) -> tuple[Any, dict[str, Any]]:
    """The OOD detector (:mod:`components.evaluate.ood`) and the conformal sets
    (:mod:`components.evaluate.conformal`), fitted on val and measured on test; their files go to
    ``trust_dir`` (stale ones removed first, so register never ships another run's)."""
    from components.evaluate.conformal import conformal_evidence
    from components.evaluate.ood import ood_evidence
    from components.model.uncertainty import TRUST_FILES

    trust_dir.mkdir(parents=True, exist_ok=True)
    for name in TRUST_FILES:
        (trust_dir / name).unlink(missing_ok=True)
    single, temperature = not spec.task.several_labels, measured.calibration.temperature

    def probs(out: SplitOutput) -> tuple[np.ndarray, np.ndarray]:
        return spec.task.probabilities(out.logits, temperature=temperature), out.targets

    conformal = conformal_evidence(params.conformal, single_class=single, val=probs(val) if val else None,
                                   test=probs(test), classes=spec.classes, out_dir=trust_dir)  # fmt: skip
    needed = params.ood.enabled and single and val is not None
    inputs = _ood_inputs(params, model_dir, spec, test, val) if needed else {}
    ood = ood_evidence(params.ood, single_class=single, temperature=temperature, model=model, spec=spec,
                       out_dir=trust_dir, **inputs)  # fmt: skip
    return ood, conformal


def _hierarchy(
    params: Params,
    spec: Any,
    test: SplitOutput,
    val: SplitOutput | None,
    measured: Measured,
    trust_dir: Path | None,
) -> dict[str, Any] | None:
    """With a label tree in the data version (single-label): per-decoding rows and back-off fitted on
    val (:mod:`components.evaluate.hierarchy`); the tree and rule are shipped via ``trust_dir``."""
    from components.evaluate.hierarchy import measure_hierarchy
    from components.task.taxonomy import load_taxonomy

    tree = load_taxonomy(params.project.data_dir)
    if tree is None or spec.task.several_labels or tuple(tree.leaves) != tuple(spec.classes):
        return None
    t = measured.calibration.temperature

    def probs(out: SplitOutput) -> tuple[np.ndarray, np.ndarray]:
        return spec.task.probabilities(out.logits, temperature=t), np.asarray(out.targets)

    return measure_hierarchy(tree, probs(test), probs(val) if val is not None else None,
                             backoff=params.serve.backoff, backoff_precision=params.serve.backoff_precision,
                             backoff_confidence=params.serve.backoff_confidence,
                             k=params.evaluate.top_k, n_bins=params.evaluate.calibration_bins,
                             out_dir=trust_dir)  # fmt: skip


def _ood_inputs(
    params: Params, model_dir: Path, spec: Any, test: SplitOutput, val: SplitOutput | None
) -> dict[str, Any]:
    """Train/val/test features at ``ood.layer`` from the embedding store (one cached pass over the data
    version), with val's and test's logits, and the OOD sets as model inputs."""
    from components.data.datasets import encode_targets, split_rows
    from components.evaluate.ood import Pass, ood_inputs
    from components.evaluate.robustness import resolve_families
    from components.model.embedding_store import embed_project

    cfg = params.ood
    # The drift reference the register stage stores for this model comes from the same pass.
    also = (params.drift.layer,) if params.drift.enabled else ()
    emb = embed_project(params, model_dir, layer=cfg.layer, also=also)
    manifest = read_manifest(DataPaths(params.project.data_dir).manifest)

    def feats(split: str) -> np.ndarray:
        return emb.rows(list(split_rows(manifest, split)["image_id"]))

    train_targets = np.asarray(encode_targets(split_rows(manifest, "train"), spec.classes, spec.task))
    families = resolve_families(params.evaluate.robustness.families)
    return {
        "train": (feats("train"), train_targets),
        "val": Pass(val.logits, feats("val")) if val is not None else None,
        "test": Pass(test.logits, feats("test")),
        "sets": ood_inputs(cfg, spec, test.kept, families),
    }


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class Evaluated:
    """What evaluating one model produced: the stage's result and what the caller logs to MLflow."""

    result: dict[str, Any]
    """task, accuracy, <headline>, gates_passed, verdict, gates, temperature, thresholds, report_html,
    report_json, out_dir, run_id, seconds (what ``imgflow evaluate --json`` prints)."""
    scalars: dict[str, float]
    """Test metrics, calibration, robustness and ``evaluate_seconds`` (logged with the ``test_`` prefix)."""
    baseline_scalars: dict[str, float]
    """The CLIP baselines' headline metrics (:func:`baseline_scalars`), logged as they are."""
    files: tuple[Path, ...]
    """The report files (logged under ``evaluate/``)."""
    tags: dict[str, str]
    """``gates_passed``, ``task``, ``baseline_status``."""


def model_slug(model_uri: str) -> str:
    """Folder name of a model URI: ``models:/imgflow@champion`` -> ``imgflow@champion``."""
    rest = re.sub(r"^[a-z]+:/+", "", model_uri)
    return re.sub(r"[^A-Za-z0-9@._-]+", "_", rest).strip("_") or "model"


def trained_model_dir(params: Params) -> Path:
    """The train stage's ``outputs/train/model``; a DataError when there is no trained model yet."""
    model_dir = params.project.output_dir / "train" / "model"
    if not (model_dir / "model.json").exists():
        raise DataError(f"no trained model in {model_dir}: run `imgflow train` first")
    return model_dir


def evaluate_model(
    params: Params,
    model_dir: Path,
    *,
    out_dir: Path,
    run_id: str,
    context: dict[str, Any],
    champion: Champion | None = None,
    own_version: str | None = None,
) -> Evaluated:
    """Evaluate the model in ``model_dir``: evidence, gates, the report in ``out_dir``.

    run_id: the MLflow run the caller logs the result into (named in the result); context: what the
    report says about the model (``model``, ``training run``, ``data version``...).
    """
    from components.baseline.records import read_baseline
    from components.evaluate.gate_report import all_scalars, build_gates, write_report

    t0 = time.perf_counter()
    baseline = read_baseline(params.project.output_dir / "baseline")
    evidence = gather_evidence(
        params, model_dir, champion=champion, own_version=own_version, baseline=baseline,
        trust_dir=out_dir / TRUST_DIR, audit=audit_summary(params),
    )  # fmt: skip
    gates = build_gates(params.gates, evidence, baseline=params.baseline)
    seconds = time.perf_counter() - t0
    parts = ", ".join(f"{k} {v:.1f}" for k, v in evidence.timings.items())
    files = write_report(evidence, gates, out_dir,
                         context={**context, "seconds": round(seconds, 1), "seconds by part": parts})  # fmt: skip
    task = evidence.task
    headline, value = evidence.headline
    result = {
        "task": task.name,
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
        "timings": {k: round(v, 2) for k, v in evidence.timings.items()},
    }
    return Evaluated(
        result=result,
        scalars={**all_scalars(evidence), "evaluate_seconds": seconds},
        baseline_scalars=baseline_scalars(baseline),
        files=(*files.values(), *sorted(p for p in (out_dir / TRUST_DIR).glob("*") if p.is_file())),
        tags={"gates_passed": str(gates.passed).lower(), "task": task.name,
              "baseline_status": str((baseline or {}).get("status", "not run"))},
    )  # fmt: skip


def audit_summary(params: Params) -> dict[str, Any] | None:
    """The audit stage's ``summary.json`` when it describes the current data version, else None (an
    audit of other data says nothing about this test set's difficulty)."""
    from components.core.jsonio import read_json
    from components.data.manifest import data_version

    path = params.project.output_dir / "audit" / "summary.json"
    manifest = DataPaths(params.project.data_dir).manifest
    if not path.exists() or not manifest.exists():
        return None
    summary = read_json(path, hint="run `imgflow audit` again") or {}
    return summary if summary.get("data_version") == data_version(manifest) else None


def baseline_scalars(baseline: dict[str, Any] | None) -> dict[str, float]:
    """Headline metrics of the CLIP baselines, named to sit next to the trained model's ``test_*``
    in the same MLflow run: ``baseline_zeroshot_test_accuracy``, ``baseline_linearprobe_test_macro_f1``."""
    out: dict[str, float] = {}
    keys = task_of(baseline or {}).summary_keys
    for kind, name in (("zero_shot", "zeroshot"), ("linear_probe", "linearprobe")):
        m = (baseline or {}).get(kind)
        if m:
            out |= {f"baseline_{name}_test_{k}": float(m[k]) for k in keys if m.get(k) is not None}
    return out
