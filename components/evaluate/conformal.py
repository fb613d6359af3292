"""Split-conformal prediction sets (APS, RAPS; marginal or class-conditional), calibrated on val.

A set rule (:class:`~components.model.uncertainty.ConformalSets`) puts class y in the set of image x
when y's conformity score is at most the calibrated quantile ``qhat``: the
``ceil((n + 1) * coverage) / n`` empirical quantile of the val images' scores of their true class
(class-conditional: one quantile per class, from that class's val images). Split conformal then
guarantees that a new exchangeable image's true class is in its set with probability at least
``coverage`` (and at most ``coverage + 1 / (n + 1)`` for continuous scores): the evaluate stage
measures it on test, overall and per class, with the mean set size.

When the model is more accurate than the target coverage, exact coverage needs some empty sets: an
empty set says that at this coverage the model commits to no class for the image.

Multi-label models are skipped (a label *set* per image has no single true class to cover; per-label
sets would be one conformal problem per label), with that reason in the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from components.core import report as kit
from components.core.config import ConformalConfig
from components.evaluate.gates import GateLevel, GateResult, make_gate
from components.model.uncertainty import ConformalSets
from components.task.metrics import wilson_interval

GATE = "conformal_coverage"


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The split-conformal quantile of (n,) calibration scores: the ceil((n + 1) coverage)-th smallest;
    +inf when n is too small for the coverage (every class then goes into every set)."""
    n = len(scores)
    rank = math.ceil((n + 1) * coverage)
    if n == 0 or rank > n:
        return math.inf
    return float(np.sort(scores)[rank - 1])


def calibrate(cfg: ConformalConfig, probs: np.ndarray, targets: np.ndarray) -> ConformalSets:
    """Fit the set rule on val: probs (n, K) calibrated probabilities, targets (n,) class indices."""
    lam = cfg.raps_lambda if cfg.method == "raps" else 0.0
    k_reg = cfg.raps_k_reg if cfg.method == "raps" else 0
    rule = ConformalSets(cfg.method, cfg.coverage, (math.inf,), lam=lam, k_reg=k_reg,
                         randomized=cfg.randomized, n_calibration=len(targets))  # fmt: skip
    true_scores = rule.scores(probs)[np.arange(len(targets)), targets]
    if cfg.class_conditional:
        qhat = tuple(
            conformal_quantile(true_scores[targets == c], cfg.coverage) for c in range(probs.shape[1])
        )
    else:
        qhat = (conformal_quantile(true_scores, cfg.coverage),)
    return ConformalSets(cfg.method, cfg.coverage, qhat, lam=lam, k_reg=k_reg, randomized=cfg.randomized,
                         n_calibration=len(targets))  # fmt: skip


def measure_sets(
    rule: ConformalSets, probs: np.ndarray, targets: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Empirical coverage (overall and per class), set sizes and empty sets of ``rule`` on test."""
    member = rule.sets(probs)
    covered = member[np.arange(len(targets)), targets]
    sizes = member.sum(axis=1)
    per_class = [
        {"class": name, "n": int((targets == c).sum()),
         "coverage": float(covered[targets == c].mean()) if (targets == c).any() else None,
         "mean_set_size": float(sizes[targets == c].mean()) if (targets == c).any() else None}
        for c, name in enumerate(classes)
    ]  # fmt: skip
    hist = np.bincount(sizes, minlength=len(classes) + 1)
    return {
        "status": "ok", "method": rule.method, "target": rule.coverage, "class_conditional": rule.class_conditional,
        "randomized": rule.randomized, "qhat": [q if math.isfinite(q) else None for q in rule.qhat],
        "n_calibration": rule.n_calibration, "n": len(targets), "coverage": float(covered.mean()),
        "mean_set_size": float(sizes.mean()), "empty_sets": float((sizes == 0).mean()),
        "singletons": float((sizes == 1).mean()), "size_histogram": [int(h) for h in hist], "per_class": per_class,
    }  # fmt: skip


def conformal_evidence(
    cfg: ConformalConfig,
    *,
    single_class: bool,
    val: tuple[np.ndarray, np.ndarray] | None,
    test: tuple[np.ndarray, np.ndarray],
    classes: Sequence[str],
    out_dir: Path,
) -> dict[str, Any]:
    """Calibrate on val (probs, targets), measure on test, save ``conformal.json`` in ``out_dir``.

    single_class: the task gives one true class per image (:attr:`components.task.Task.several_labels`
    is false); else skipped with the reason."""
    if not cfg.enabled:
        return {"status": "skipped", "reason": "conformal.enabled is false"}
    if not single_class:
        return {"status": "skipped", "reason": "multi-label model: an image has a set of true labels, not one "
                "class for a prediction set to cover (per-label sets are not implemented)"}  # fmt: skip
    if val is None or len(val[1]) == 0:
        return {"status": "skipped", "reason": "no val split to calibrate the sets on"}
    rule = calibrate(cfg, *val)
    rule.save(out_dir)
    return measure_sets(rule, *test, classes)


def coverage_gate(
    report: Mapping[str, Any], tolerance: float, *, confidence: float, level: GateLevel
) -> list[GateResult]:
    """``conformal_coverage``: the Wilson interval of the measured test coverage (at ``confidence``) must
    meet [target - tolerance, target + tolerance], the band widened by the spread that the calibration
    set's size alone gives the coverage (split conformal's coverage given n calibration images is
    Beta-distributed, sd ~ sqrt(c (1 - c) / (n + 2)): 0.4 points at n = 6,000, 5 points at n = 30).
    So neither a small test nor a small val split fails it by chance alone, and large ones hold the
    coverage to the band."""
    from statistics import NormalDist

    if report.get("status") != "ok":
        return []
    target, cov, n = report["target"], report["coverage"], report["n"]
    lower, upper = wilson_interval(int(round(cov * n)), n, confidence=confidence)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    band = tolerance + z * math.sqrt(target * (1 - target) / (report["n_calibration"] + 2))
    off = max(0.0, (target - band) - upper, lower - (target + band))
    gate = make_gate(GATE, "distance of the coverage interval from the allowed band", off, 0.0, level=level,
                     comparison="<=")  # fmt: skip
    text = (
        f"The {report['method'].upper()} sets calibrated on {report['n_calibration']} val images hold the true class "
        f"of {cov:.1%} of {n} test images ({confidence:.0%} interval {lower:.1%}-{upper:.1%}) with "
        f"{report['mean_set_size']:.2f} classes per set on average; the target is {target:.0%} +- {tolerance:.1%} "
        f"(+- {band:.1%} with the calibration set's own spread)."
    )
    return [GateResult(gate.name, gate.passed, gate.value, gate.threshold, gate.message, level=level,
                       comparison="<=", explanation=text)]  # fmt: skip


def conformal_scalars(report: Mapping[str, Any] | None) -> dict[str, float]:
    """Flat scalars for MLflow: ``conformal_coverage``, ``conformal_mean_set_size``, ``conformal_empty_sets``."""
    if not report or report.get("status") != "ok":
        return {}
    return {f"conformal_{k}": float(report[k]) for k in ("coverage", "mean_set_size", "empty_sets")}


def conformal_section(report: Mapping[str, Any] | None) -> kit.Section | None:
    """The gate report's "Prediction sets" section."""
    if not report:
        return None
    title = "Prediction sets (conformal)"
    if report.get("status") != "ok":
        return kit.section(title, kit.note(f"Not measured: {report.get('reason', '')}"))
    num = kit.num
    how = "one quantile per class" if report["class_conditional"] else "one quantile"
    rows = [
        [r["class"], str(r["n"]), num(r["coverage"]), num(r["mean_set_size"], 2)] for r in report["per_class"]
    ]
    sizes = ", ".join(f"{k}: {v}" for k, v in enumerate(report["size_histogram"]) if v)
    return kit.section(
        title,
        kit.paragraph(
            f"Split-conformal {report['method'].upper()} sets ({how}) calibrated on {report['n_calibration']} val "
            f"images for {report['target']:.0%} coverage. On {report['n']} test images the set holds the true "
            f"class {report['coverage']:.1%} of the time, with {report['mean_set_size']:.2f} classes per set on "
            f"average; {report['singletons']:.1%} of the sets are one class and {report['empty_sets']:.1%} are "
            "empty (at this coverage the model commits to no class). Every prediction carries its "
            "prediction_set."
        ),
        kit.table(["coverage", "mean set size", "empty sets", "set sizes (size: images)"],
                  [[num(report["coverage"]), num(report["mean_set_size"], 2), num(report["empty_sets"]), sizes]]),
        kit.subheading("Per class"),
        kit.table(["class", "test images", "coverage", "mean set size"], rows),
    )  # fmt: skip
