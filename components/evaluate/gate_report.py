"""The gate report: every gate from the evidence of one evaluation, as JSON, CSV, PNG and HTML.

:func:`build_gates` turns the evidence (test metrics, calibration, robustness sweep, slices,
champion comparison) into one :class:`~components.evaluate.gates.GateReport` using the thresholds
and levels of ``params.yaml``'s ``gates:``. :func:`write_report` writes the evaluate stage's
files; ``report.html`` is self-contained (plots inlined as base64), verdict first.

Which gates apply is the model's task's (:attr:`components.task.Task.gates`): a multi-label model is
gated on mAP, each label's AP and recall at its tuned threshold, the mean per-label ECE, corrupted /
clean mAP, slice subset accuracy and mAP / per-label AP against the champion; the gates of the
other task are listed as not applicable, never as passed.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from components.core import report as kit
from components.core.config import BaselineConfig, GatesConfig
from components.core.jsonio import write_json
from components.evaluate.adversarial import adversarial_section, plot_curve
from components.evaluate.baseline_gate import (
    NOT_APPLICABLE,
    ZERO_SHOT_GATE,
    check_beats_baseline,
    is_not_applicable,
)
from components.evaluate.calibration import CalibrationReport
from components.evaluate.conformal import conformal_scalars, conformal_section, coverage_gate
from components.evaluate.ensemble_eval import ensemble_scalars, ensemble_section
from components.evaluate.explain import Gallery, gallery_section
from components.evaluate.gates import (
    INSUFFICIENT,
    GateLevel,
    GateReport,
    GateResult,
    accuracy_gate,
    auto_accuracy_gate,
    gate_level,
    insufficient_gate,
    label_ap_gates,
    make_gate,
    map_gate,
    recall_gates,
)
from components.evaluate.hierarchy import hierarchy_gates, hierarchy_scalars, hierarchy_section
from components.evaluate.label_efficiency import report_section as label_efficiency_section
from components.evaluate.ood import OODEvidence, ood_gate, ood_scalars, ood_section
from components.evaluate.robustness import SEVERITIES, RobustnessReport
from components.evaluate.variants import variants_section
from components.task import TASK_NAMES, Task, get_task, task_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evidence:
    """Everything measured about one model. Optional parts are None when not measured."""

    metrics: dict[str, Any]
    calibration: CalibrationReport | None = None
    robustness: RobustnessReport | None = None
    slices: list[dict[str, Any]] | None = None
    champion: dict[str, Any] | None = None
    """``{"status": "compared", "version", "uri", "comparison": champion.compare(...)}``,
    or ``{"status": "none"|"skipped", "reason": ...}``."""
    baseline: dict[str, Any] | None = None
    """The baseline stage's ``baseline.json`` record (CLIP zero-shot and linear probe), or None
    when that stage has not run."""
    curves: dict[str, Any] | None = None
    """One-vs-rest ROC and PR curves (:func:`components.task.metrics.one_vs_rest_curves`)."""
    adversarial: dict[str, Any] | None = None
    """FGSM/PGD accuracy vs eps (:meth:`components.evaluate.adversarial.AdversarialReport.to_dict`), or
    ``{"status": "skipped", "reason"}``."""
    explanations: Gallery | None = None
    """Grad-CAM overlays of the most confident errors and the most confused pairs."""
    ood: OODEvidence | None = None
    """OOD scores vs held-out OOD sets and the shipped detector (:mod:`components.evaluate.ood`)."""
    conformal: dict[str, Any] | None = None
    """Conformal prediction sets' test coverage and set sizes (:mod:`components.evaluate.conformal`)."""
    hierarchy: dict[str, Any] | None = None
    """Label tree: per-decoding rows and back-off (:mod:`components.evaluate.hierarchy`); None: flat labels."""
    ensemble: dict[str, Any] | None = None
    """An ensemble's members vs the combined model (:mod:`components.evaluate.ensemble_eval`); None: one model."""
    audit: dict[str, Any] | None = None
    """The audit stage's ``summary.json`` for this data version (its ``oof_accuracy``: the cheap
    out-of-fold classifier ``min_accuracy: auto`` must beat), or None when the audit has not run."""
    timings: dict[str, float] = field(default_factory=dict)
    """Wall seconds of each part of the measurement (predict, robustness, adversarial, ...)."""

    @property
    def cheap_baseline(self) -> tuple[str, float] | None:
        """(what, accuracy) of the best cheap classifier at hand: the audit's out-of-fold classifier
        and CLIP zero-shot (when the baseline ran); None when neither did."""
        found = []
        if (self.audit or {}).get("oof_accuracy") is not None:
            found.append(("the audit's out-of-fold classifier", float(self.audit["oof_accuracy"])))  # type: ignore[index]
        zero_shot = (self.baseline or {}).get("zero_shot") or {}
        if (self.baseline or {}).get("status") == "ok" and zero_shot.get("accuracy") is not None:
            found.append(("CLIP zero-shot", float(zero_shot["accuracy"])))
        return max(found, key=lambda f: f[1]) if found else None

    @property
    def task(self) -> Task:
        """The model's task, as its metrics say (:func:`components.task.task_of`)."""
        return task_of(self.metrics)

    @property
    def thresholds(self) -> list[float] | None:
        """Multi-label: the per-label decision thresholds in class order (None: single-label)."""
        return self.task.thresholds_of(self.metrics)

    @property
    def headline(self) -> tuple[str, float | None]:
        """The one number of the run: (``accuracy``, value) or (``mAP``, value)."""
        return self.task.headline, self.metrics.get(self.task.headline)


# --------------------------------------------------------------------------- gates


def build_gates(cfg: GatesConfig, ev: Evidence, *, baseline: BaselineConfig | None = None) -> GateReport:
    """All gates that apply to ``ev`` (a gate whose evidence is missing is not invented).

    With ``baseline.gate`` on, the trained model must beat CLIP zero-shot overall and per class by
    ``baseline.gate_margin``; without a zero-shot result (the baseline was skipped, disabled or
    not run) that gate is *not applicable* and does not pass (level from ``gates.levels``).
    """
    levels: Mapping[str, str] = cfg.levels
    task = ev.task
    gates: list[GateResult] = []
    for name in task.gates:
        if (level := gate_level(levels, name)) is not None:
            gates += _BUILDERS[name](cfg, ev, level)
    if baseline is not None and baseline.gate and (level := gate_level(levels, ZERO_SHOT_GATE)) is not None:
        gates += _zero_shot_gates(ev, baseline.gate_margin, level)
    not_applicable = [
        (name, f"{other.title} only: this is a {task.title} model")
        for other, name in _other_tasks_gates(task)
        if levels.get(name, "error") != "off"
    ]
    gates += _adversarial_gates(cfg, ev, levels)
    gates += ood_gate(ev.ood, cfg.min_ood_auroc, level=gate_level(levels, "min_ood_auroc"))
    if (level := gate_level(levels, "conformal_coverage")) is not None:
        gates += coverage_gate(ev.conformal or {}, cfg.conformal_tolerance, confidence=cfg.confidence,
                               level=level)  # fmt: skip
    gates += hierarchy_gates(ev.hierarchy, max_crm_ratio=cfg.max_crm_hdist_ratio, levels=levels,
                             min_precision=cfg.min_backoff_precision, min_answered=cfg.min_backoff_answered)  # fmt: skip
    report = GateReport.of(gates, not_applicable=not_applicable)
    if not report.passed:
        logger.warning("gates failed: %s", ", ".join(g.name for g in report.failed()))
    return report


def _adversarial_gates(cfg: GatesConfig, ev: Evidence, levels: Mapping[str, str]) -> list[GateResult]:
    """``min_adversarial_accuracy``, only when set and the adversarial curve was measured."""
    name = "min_adversarial_accuracy"
    adv = ev.adversarial or {}
    level = gate_level(levels, name)
    if cfg.min_adversarial_accuracy is None or "pgd" not in adv or level is None:
        return []
    eps, value = adv["epsilons"][-1], adv["pgd"][-1]
    gate = make_gate(name, f"PGD accuracy at eps {eps:g}", value, cfg.min_adversarial_accuracy, level=level)
    text = (
        f"Under a {adv['pgd_steps']}-step PGD attack of at most {eps * 255:.2g}/255 per pixel the model classifies "
        f"{value:.1%} of {adv['n']} test images correctly (clean: {adv['clean_accuracy']:.1%}); at least "
        f"{cfg.min_adversarial_accuracy:.0%} is required."
    )
    return [replace(gate, explanation=text)]


def _other_tasks_gates(task: Task) -> list[tuple[Task, str]]:
    """(other task, gate name) of the gates only another task has, in that task's order."""
    others = [get_task(name) for name in TASK_NAMES if get_task(name) is not task]
    return [(other, name) for other in others for name in other.gates if name not in task.gates]


def _accuracy_gate(cfg: GatesConfig, ev: Evidence, level: GateLevel) -> list[GateResult]:
    if cfg.min_accuracy == "auto":
        return [auto_accuracy_gate(ev.metrics, baseline=ev.cheap_baseline, margin=cfg.auto_margin,
                                   confidence=cfg.confidence, level=level)]  # fmt: skip
    return [accuracy_gate(ev.metrics, cfg.min_accuracy, level=level)]


def _recall_gates(cfg: GatesConfig, ev: Evidence, level: GateLevel) -> list[GateResult]:
    task = ev.task
    # Multi-label: each label's recall is judged at its tuned threshold on its Wilson bound, as before
    # (min_support applies to single-label classes and to slices).
    support = 1 if task.several_labels else cfg.min_support
    return recall_gates(task.rows(ev.metrics), cfg.min_class_recall, name_key=task.row_name,
                        confidence=cfg.confidence, level=level, min_support=support)  # fmt: skip


def _map_gate(cfg: GatesConfig, ev: Evidence, level: GateLevel) -> list[GateResult]:
    return [map_gate(ev.metrics, cfg.min_map, level=level)]


def _label_ap_gates(cfg: GatesConfig, ev: Evidence, level: GateLevel) -> list[GateResult]:
    return label_ap_gates(ev.task.rows(ev.metrics), cfg.min_label_ap, level=level)


def _ece_gate(cfg: GatesConfig, ev: Evidence, level: Any) -> list[GateResult]:
    if ev.calibration is None:
        return []
    cal = ev.calibration
    after, before = cal.after["ece"], cal.before["ece"]
    scaled = cal.fitted_on != "none"
    what = get_task(cal.task).calibration_name
    gate = make_gate("max_ece", f"{what} after temperature scaling" if scaled else what, after, cfg.max_ece,
                     level=level, comparison="<=")  # fmt: skip
    if cal.per_label is not None:  # class-wise calibration: say which label is worst
        return [replace(gate, explanation=_per_label_ece_text(cal, cfg.max_ece, passed=gate.passed))]
    how = (
        f"After dividing the logits by T = {cal.temperature:.3f} (fitted on {cal.n_fit} validation images) "
        f"the confidence the model states differs from its real hit rate by {after:.2%} on average "
        f"(before scaling: {before:.2%})."
        if scaled
        else f"Stated confidence differs from the real hit rate by {after:.2%} on average (no scaling)."
    )
    tail = " That is within" if gate.passed else " That exceeds"
    return [replace(gate, explanation=f"{how}{tail} the allowed {cfg.max_ece:.2%}.")]


def _per_label_ece_text(cal: CalibrationReport, allowed: float, *, passed: bool) -> str:
    scaled = cal.fitted_on != "none"
    how = (
        f"After dividing the logits by T = {cal.temperature:.3f} (fitted on {cal.n_fit} validation images)"
        if scaled
        else "Without scaling"
    )
    worst = max(cal.per_label or [], key=lambda r: r["ece"], default=None)
    worst_text = f"; the worst label is '{worst['label']}' with {worst['ece']:.2%}" if worst else ""
    return (
        f"{how}, each label's predicted probability differs from how often the label is really there "
        f"by {cal.after['ece']:.2%} on average over the labels (before scaling: {cal.before['ece']:.2%})"
        f"{worst_text}. That {'is within' if passed else 'exceeds'} the allowed {allowed:.2%}."
    )


def _robustness_gates(cfg: GatesConfig, ev: Evidence, level: Any) -> list[GateResult]:
    return [] if ev.robustness is None else [_relative_gate(cfg, ev.robustness, level)]


def _relative_gate(cfg: GatesConfig, r: RobustnessReport, level: Any) -> GateResult:
    m = r.metric
    gate = make_gate("min_relative_robustness", f"mean corruption {m} / clean {m}",
                     r.relative_robustness, cfg.min_relative_robustness, level=level)  # fmt: skip
    text = (
        f"Over {len(r.accuracy)} corruption families x {len(SEVERITIES)} severities on {r.n} test images "
        f"the model keeps {r.relative_robustness:.1%} of its clean {m} ({r.mean_corruption_accuracy:.3f} "
        f"vs {r.clean_accuracy:.3f}); at least {cfg.min_relative_robustness:.0%} is required."
    )
    return replace(gate, explanation=text)


def _family_gates(cfg: GatesConfig, ev: Evidence, level: Any) -> list[GateResult]:
    if ev.robustness is None:
        return []
    r = ev.robustness
    worst = r.worst_family
    gate = make_gate("min_family_robustness", f"worst family ({worst}) {r.metric} / clean {r.metric}",
                     r.family_relative[worst], cfg.min_family_robustness, level=level)  # fmt: skip
    text = (
        f"The corruption that hurts most is {worst}: averaged over its 5 severities the model keeps "
        f"{r.family_relative[worst]:.1%} of its clean {r.metric}; no family may fall below "
        f"{cfg.min_family_robustness:.0%}."
    )
    return [replace(gate, explanation=text)]


def _slice_gates(cfg: GatesConfig, ev: Evidence, level: Any) -> list[GateResult]:
    out = []
    what, right = ev.task.correct_name, ev.task.correct_phrase
    for row in ev.slices or []:
        if row["n"] < cfg.min_support:
            out.append(insufficient_gate(f"min_slice_accuracy[{row['slice']}]", f"{what} on {row['slice']}",
                                         row["accuracy"], cfg.min_slice_accuracy, n=row["n"],
                                         min_support=cfg.min_support, level=level))  # fmt: skip
            continue
        gate = make_gate(f"min_slice_accuracy[{row['slice']}]", f"{what} on {row['slice']}",
                         row["accuracy"], cfg.min_slice_accuracy, level=level, bound=row["accuracy_lower"],
                         bound_name=f"{cfg.confidence:.0%} lower bound")  # fmt: skip
        text = (
            f"{row['correct']} of the {row['n']} test images with {row['slice']} {right} "
            f"({row['accuracy']:.1%}); with {cfg.confidence:.0%} confidence at least "
            f"{row['accuracy_lower']:.1%}, against a required {cfg.min_slice_accuracy:.0%}."
        )
        out.append(replace(gate, explanation=text))
    return out


def _champion_accuracy_gate(cfg: GatesConfig, ev: Evidence, level: Any) -> list[GateResult]:
    return _overall_drop_gate(ev, "max_accuracy_drop", "accuracy", cfg.max_accuracy_drop, level)


def _champion_class_gates(cfg: GatesConfig, ev: Evidence, level: Any) -> list[GateResult]:
    return _part_drop_gates(
        ev, "max_class_recall_drop", "per_class", "class", cfg.max_class_recall_drop, level
    )


def _champion_map_gate(cfg: GatesConfig, ev: Evidence, level: Any) -> list[GateResult]:
    return _overall_drop_gate(ev, "max_map_drop", "mAP", cfg.max_map_drop, level)


def _champion_label_gates(cfg: GatesConfig, ev: Evidence, level: Any) -> list[GateResult]:
    return _part_drop_gates(ev, "max_label_ap_drop", "per_label", "label", cfg.max_label_ap_drop, level)


def _overall_drop_gate(ev: Evidence, name: str, key: str, margin: float, level: Any) -> list[GateResult]:
    """The overall non-inferiority gate; a champion that cannot be compared at all (another task)
    gives a *not applicable* gate that does not pass."""
    champ = ev.champion or {}
    if champ.get("status") == NOT_APPLICABLE:
        message = f"{NOT_APPLICABLE}: {champ.get('reason', 'the champion cannot be compared')}"
        text = (f"{message}. No comparison was made, so this gate does not pass: promote by hand, or set "
                f"gates.levels.{name}: warn to let a change of task through.")  # fmt: skip
        return [GateResult(name, False, 0.0, -margin, message, level=level, explanation=text)]
    if champ.get("status") != "compared":
        return []
    return [_drop_gate(name, champ["comparison"][key], margin, champ.get("version", "?"), level)]


def _part_drop_gates(
    ev: Evidence, name: str, key: str, label: str, margin: float, level: Any
) -> list[GateResult]:
    champ = ev.champion or {}
    if champ.get("status") != "compared":
        return []
    version = champ.get("version", "?")
    return [
        _drop_gate(f"{name}[{row[label]}]", row, margin, version, level) for row in champ["comparison"][key]
    ]


def _drop_gate(name: str, row: dict[str, Any], margin: float, version: str, level: Any) -> GateResult:
    what = row["what"]
    gate = make_gate(name, f"{what} challenger - champion", row["difference"], -margin, level=level,
                     bound=row["lower"], bound_name="lower bound")  # fmt: skip
    verdict = "is not" if gate.passed else "may be"
    text = (
        f"On the same {row['n']} test images the challenger's {what} is {row['challenger']:.3f} and the "
        f"champion's (version {version}) is {row['champion']:.3f}. The paired bootstrap puts the "
        f"difference at no less than {row['lower']:+.3f}, so the challenger {verdict} worse by more than "
        f"the allowed {margin:.3f}."
    )
    return replace(gate, explanation=text)


def _zero_shot_gates(ev: Evidence, margin: float, level: Any) -> list[GateResult]:
    """Trained vs CLIP zero-shot: accuracy and per-class recall, or (multi-label) mAP and per-label AP."""
    out = []
    for gate in check_beats_baseline(ev.metrics, ev.baseline, margin=margin):
        if is_not_applicable(gate):
            text = f"{gate.message}: with no CLIP zero-shot result to compare with it does not pass."
        else:
            verdict = "beats" if gate.passed else "does NOT beat"
            text = f"The trained model {verdict} CLIP zero-shot: {gate.message}."
        out.append(replace(gate, level=level, explanation=text))
    return out


# Every gate by its name in ``params.yaml``; a model gets those its task lists (Task.gates), in that order.
_BUILDERS: dict[str, Any] = {
    "min_accuracy": _accuracy_gate,
    "min_map": _map_gate,
    "min_label_ap": _label_ap_gates,
    "min_class_recall": _recall_gates,
    "max_ece": _ece_gate,
    "min_relative_robustness": _robustness_gates,
    "min_family_robustness": _family_gates,
    "min_slice_accuracy": _slice_gates,
    "max_accuracy_drop": _champion_accuracy_gate,
    "max_class_recall_drop": _champion_class_gates,
    "max_map_drop": _champion_map_gate,
    "max_label_ap_drop": _champion_label_gates,
}


# --------------------------------------------------------------------------- files


def report_dict(ev: Evidence, gates: GateReport, *, context: Mapping[str, Any]) -> dict[str, Any]:
    """The whole report as JSON-able data, verdict first."""
    return {
        "verdict": gates.verdict(),
        "passed": gates.passed,
        "task": ev.task.name,
        "context": {k: v for k, v in context.items() if k != "recipe"},
        "recipe": context.get("recipe"),
        "gates": gates.to_dict()["gates"],
        "not_applicable": gates.to_dict()["not_applicable"],
        "insufficient_data": gates.to_dict()["insufficient_data"],
        "thresholds": ev.thresholds,
        "metrics": ev.metrics,
        "calibration": ev.calibration.to_dict() if ev.calibration else None,
        "robustness": ev.robustness.to_dict() if ev.robustness else None,
        "slices": ev.slices,
        "champion": ev.champion,
        "confused_pairs": ev.task.most_confused(ev.metrics),
        "baseline": baseline_comparison(ev.metrics, ev.baseline),
        "adversarial": ev.adversarial,
        "explanations": ev.explanations.to_dict() if ev.explanations is not None else None,
        "ood": ev.ood.to_dict() if ev.ood is not None else None,
        "conformal": ev.conformal,
        "hierarchy": ev.hierarchy,
        "ensemble": ev.ensemble,
        "timings": {k: round(v, 2) for k, v in ev.timings.items()},
    }


def baseline_comparison(metrics: Mapping[str, Any], record: Mapping[str, Any] | None) -> dict[str, Any]:
    """Trained vs CLIP zero-shot vs linear probe: the overall metric (accuracy, or mAP for multi-label
    models) and images of each, and each class's recall (each label's AP) side by side.
    ``status``: ``ok``, ``skipped``, ``disabled``, ``not run`` or not applicable (another task)."""
    if record is None:
        return {
            "status": "not run",
            "reason": "the baseline stage has not run (no outputs/baseline/baseline.json)",
        }
    task = task_of(metrics)
    if record.get("status") == "ok" and task_of(record) is not task:
        return {
            "status": NOT_APPLICABLE,
            "reason": "the baselines were run for the other task (single/multi-label)",
        }
    metric, per, rows, name = task.headline, task.part_metric, task.rows_key, task.row_name
    out: dict[str, Any] = {k: record.get(k) for k in ("status", "reason", "model", "pretrained")}
    out |= {"metric": metric, "per_metric": per}
    kinds = {"trained": metrics, **{k: record.get(k) for k in ("zero_shot", "linear_probe")}}
    out["overall"] = {k: {metric: m[metric], "n": m["n"]} for k, m in kinds.items() if m}
    values = {k: {r[name]: r[per] for r in m[rows]} for k, m in kinds.items() if m}
    out["per_class"] = [
        {"class": row[name], **{k: values[k].get(row[name]) for k in values}} for row in metrics[rows]
    ]
    return out


def all_scalars(ev: Evidence) -> dict[str, float]:
    """Flat scalars for MLflow and ``dvc metrics``: test metrics plus calibration and robustness."""
    flat = ev.task.flat_metrics(ev.metrics)
    if ev.calibration is not None:
        flat["temperature"] = ev.calibration.temperature
        flat.update({f"{k}_before_scaling": v for k, v in ev.calibration.before.items()})
        flat.update({f"{k}_after_scaling": v for k, v in ev.calibration.after.items()})
    if ev.robustness is not None:
        r = ev.robustness
        flat.update(
            {f"mean_corruption_{r.metric}": r.mean_corruption_accuracy},
            relative_robustness=r.relative_robustness,
            worst_family_robustness=r.family_relative[r.worst_family],
        )
        flat.update({f"robustness_{f}": v for f, v in r.family_relative.items()})
    if ev.slices:
        flat["min_slice_accuracy"] = min(row["accuracy"] for row in ev.slices)
    if ev.adversarial and "pgd" in ev.adversarial:
        flat["adversarial_pgd_accuracy"] = ev.adversarial["pgd"][-1]
        flat["adversarial_fgsm_accuracy"] = ev.adversarial["fgsm"][-1]
    flat |= ood_scalars(ev.ood) | conformal_scalars(ev.conformal) | hierarchy_scalars(ev.hierarchy)
    flat |= ensemble_scalars(ev.ensemble)
    comp = (ev.champion or {}).get("comparison")
    if comp:
        key = ev.headline[0]
        flat[f"champion_{key}"] = comp[key]["champion"]
        flat[f"{key}_vs_champion"] = comp[key]["difference"]
    return flat


def write_report(
    ev: Evidence, gates: GateReport, out_dir: Path, *, context: Mapping[str, Any]
) -> dict[str, Path]:
    """Write the evaluate stage's files into ``out_dir``; return their paths by kind.

    Always: metrics.json, evaluation.json, per_class.csv, gates.json, confusion_matrix.png,
    report.json, report.html. With curves: roc_curves.csv/.png, pr_curves.csv/.png. With
    calibration: reliability.csv, reliability.png. With a sweep: robustness.csv, robustness.png.
    With slices: slices.csv.

    gates.json carries what register needs besides the verdict: ``temperature`` and ``thresholds``
    (multi-label: per-label decision thresholds in class order; None for single-label).
    metrics.json (scalars) also says ``task: multilabel`` for a multi-label model.
    """
    from components.evaluate.plots import plot_reliability_diagram, plot_robustness_heatmap
    from components.evaluate.writers import write_curves, write_evaluation

    out_dir = Path(out_dir)
    paths = write_evaluation(ev.metrics, gates, out_dir)
    write_json(paths["metrics"], ev.task.tagged(all_scalars(ev)))
    gates_json = ev.task.tagged({
        **gates.to_dict(),
        "temperature": ev.calibration.temperature if ev.calibration else 1.0,
        "thresholds": ev.thresholds,
    })  # fmt: skip
    if ev.task.fits_decision:  # the rule the thresholds were tuned by, recorded with them
        gates_json["threshold_rule"] = (ev.metrics.get("threshold_tuning") or {}).get("rule")
    write_json(paths["gates"], gates_json)
    if ev.curves is not None:
        paths |= write_curves(ev.curves, out_dir)
    if ev.calibration is not None:
        cal = ev.calibration
        paths["reliability_csv"] = _write_csv(
            out_dir / "reliability.csv",
            [{"stage": stage, **_bin_row(b)} for stage, bins in (("before", cal.bins_before), ("after", cal.bins_after))
             for b in bins],
        )  # fmt: skip
        axes = get_task(cal.task).reliability_axes
        paths["reliability"] = plot_reliability_diagram(
            cal.bins_before, cal.bins_after if cal.fitted_on != "none" else None,
            out_dir / "reliability.png", temperature=cal.temperature, axis_labels=axes,
        )  # fmt: skip
    if ev.robustness is not None:
        paths["robustness_csv"] = _write_csv(out_dir / "robustness.csv", ev.robustness.rows())
        paths["robustness"] = plot_robustness_heatmap(
            ev.robustness.accuracy, out_dir / "robustness.png", clean_accuracy=ev.robustness.clean_accuracy,
            metric=ev.robustness.metric,
        )  # fmt: skip
    if ev.slices is not None:
        paths["slices"] = _write_csv(out_dir / "slices.csv", ev.slices)
    if ev.adversarial and "pgd" in ev.adversarial:
        adv = ev.adversarial
        paths["adversarial_csv"] = _write_csv(out_dir / "adversarial.csv", [
            {"epsilon": e, "fgsm_accuracy": f, "pgd_accuracy": p}
            for e, f, p in zip(adv["epsilons"], adv["fgsm"], adv["pgd"], strict=True)
        ])  # fmt: skip
        paths["adversarial"] = plot_curve(adv, out_dir / "adversarial.png")
    if ev.explanations is not None:
        paths |= ev.explanations.write(out_dir)
    if ev.ood is not None:
        paths |= ev.ood.write(out_dir)
    data = report_dict(ev, gates, context=context)
    paths["report_json"] = write_json(out_dir / "report.json", data)
    paths["report_html"] = out_dir / "report.html"
    paths["report_html"].write_text(render_html(data, images=paths), encoding="utf-8")
    logger.info("gate report: %s", paths["report_html"])
    return paths


def _bin_row(b: Any) -> dict[str, Any]:
    return {"lower": b.lower, "upper": b.upper, "count": b.count, "confidence": b.confidence,
            "accuracy": b.accuracy}  # fmt: skip


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def add_variants_section(out_dir: Path, table: Mapping[str, Any]) -> Path | None:
    """Put ``imgflow variants``'s table into the gate report in ``out_dir`` (``variants`` in report.json,
    the "Deployment variants" section of report.html, redrawn from the files already there); None when
    the evaluate stage has not written a report there."""
    return add_report_data(out_dir, "variants", dict(table))


def add_report_data(out_dir: Path, key: str, value: Any) -> Path | None:
    """Put ``value`` under ``key`` of the gate report in ``out_dir`` (report.json) and redraw report.html
    from the files already there; None when the evaluate stage has not written a report there."""
    from components.core.jsonio import read_json, write_text_atomic

    report_json = Path(out_dir) / "report.json"
    if not report_json.exists():
        return None
    data = {**read_json(report_json, hint="run `imgflow evaluate` again"), key: value}
    write_json(report_json, data)
    images = {p.stem: p for p in Path(out_dir).glob("*.png")}
    images |= {f"explain_{p.stem}": p for p in (Path(out_dir) / "explanations").glob("*.png")}
    html = Path(out_dir) / "report.html"
    write_text_atomic(html, render_html(data, images=images))
    return html


# --------------------------------------------------------------------------- HTML
# The page is drawn with the report kit (components.core.report): one stylesheet for every report.


def render_html(data: Mapping[str, Any], *, images: Mapping[str, Path]) -> str:
    """A self-contained page: verdict, gates in plain words, then the evidence."""
    ok = data["passed"]
    task = get_task(data.get("task"))
    cal = data.get("calibration")
    sections = [
        _context_html(data["context"]),
        _recipe_html(data.get("recipe")),
        _gates_html(data["gates"], data.get("not_applicable") or [], data.get("insufficient_data") or []),
        _METRICS_HTML[task.row_name](data["metrics"], cal),
        _curves_html(images),
        _confusion_html(data.get("confused_pairs") or [], images, task=task),
        gallery_section(data.get("explanations"), images),
        _baseline_html(data.get("baseline")),
        _calibration_html(cal, images),
        _robustness_html(data.get("robustness"), images),
        adversarial_section(data.get("adversarial"), images),
        ood_section(data.get("ood"), images),
        conformal_section(data.get("conformal")),
        hierarchy_section(data.get("hierarchy")),
        ensemble_section(data.get("ensemble")),
        _slices_html(data.get("slices"), task=task),
        _champion_html(data.get("champion")),
        variants_section(data.get("variants")),
        label_efficiency_section(data.get("label_efficiency")),
    ]
    return kit.page(
        f"imgflow gate report: {'PASSED' if ok else 'FAILED'}",
        heading="Gate report",
        top=[kit.verdict_banner(data["verdict"], "pass" if ok else "fail")],
        sections=sections,
    )


_STATUS_KINDS = {"pass": "pass", "FAIL": "fail", "warn": "warn", INSUFFICIENT: "insufficient"}


def _gates_html(
    gates: Sequence[Mapping[str, Any]],
    not_applicable: Sequence[Mapping[str, Any]],
    insufficient: Sequence[str] = (),
) -> kit.Section:
    rows = [
        [g["name"], kit.badge(_status_text(g), _STATUS_KINDS[g["status"]]), g["level"], kit.num(g["value"]),
         kit.num(g["bound"]), f"{g['comparison']} {kit.num(g['threshold'])}", g["explanation"] or g["message"]]
        for g in gates
    ]  # fmt: skip
    table = kit.table(
        ["gate", "result", "level", "value", "bound", "threshold", "in plain words"],
        rows,
        row_classes=[None if g["status"] == "pass" else _STATUS_KINDS[g["status"]] for g in gates],
    )
    return kit.section("Gates", table, _insufficient_html(insufficient), _not_applicable_html(not_applicable))


def _insufficient_html(names: Sequence[str]) -> kit.Html:
    if not names:
        return kit.Html("")
    return kit.note(
        f"Insufficient data, neither passed nor failed (fewer test images than gates.min_support): "
        f"{'; '.join(names)}."
    )


def _status_text(g: Mapping[str, Any]) -> str:
    return f"{g['status']} (not applicable)" if str(g["message"]).startswith(NOT_APPLICABLE) else g["status"]


def _context_html(ctx: Mapping[str, Any]) -> kit.Section | None:
    return kit.section("Model", kit.key_values(ctx)) if ctx else None


def _recipe_html(decisions: Sequence[Mapping[str, Any]] | None) -> kit.Section | None:
    """How the model was trained: each ``train.*`` value in force, who chose it (auto or params), why."""
    if not decisions:
        return None
    rows = [[d["key"], str(d["value"]), d["source"], d["reason"]] for d in decisions]
    return kit.section("Training recipe", kit.table(["train key", "value", "chosen by", "why"], rows))


def _not_applicable_html(items: Sequence[Mapping[str, Any]]) -> kit.Html:
    if not items:
        return kit.Html("")
    listed = "; ".join(f"{i['name']} ({i['reason']})" for i in items)
    return kit.note(f"Not applicable to this model, neither passed nor failed: {listed}.")


def _per_class_html(m: Mapping[str, Any], cal: Mapping[str, Any] | None = None) -> kit.Section:
    num = kit.num
    top_k = next((k for k in m if k.startswith("top") and k.endswith("_accuracy")), None)
    summary = kit.table(
        ["accuracy", *([top_k.replace("_", " ")] if top_k else []), "balanced accuracy", "macro F1",
         "weighted F1", "macro ROC-AUC", "macro PR-AUC", "NLL", "Brier", "images"],
        [[num(m["accuracy"]), *([num(m[top_k])] if top_k else []), num(m["balanced_accuracy"]),
          num(m["macro_f1"]), num(m["weighted_f1"]), num(m.get("macro_roc_auc")), num(m.get("macro_pr_auc")),
          num(m["nll"]), num(m["brier"]), str(m["n"])]],
    )  # fmt: skip
    rows = [[r["class"], num(r["precision"]), num(r["recall"]), num(r.get("recall_lower")),
             num(r["f1"]), num(r.get("roc_auc")), num(r.get("pr_auc")), str(r["support"])]
            for r in m["per_class"]]  # fmt: skip
    bound = f"recall {m.get('confidence', 0.95):.0%} lower bound"
    headers = ["class", "precision", "recall", bound, "F1", "ROC-AUC (one vs rest)", "PR-AUC (AP)", "support"]
    return kit.section("Test metrics", summary, kit.subheading("Per class"), kit.table(headers, rows))


_RULES = {"f1": "maximise each label's F1", "precision": "reach precision {t} (the most recall at it)",
          "recall": "reach recall {t} (the most precision at it)"}  # fmt: skip


def _per_label_html(m: Mapping[str, Any], cal: Mapping[str, Any] | None) -> kit.Section:
    num = kit.num
    summary = kit.table(
        ["mAP", "macro ROC-AUC", "micro F1", "macro F1", "micro precision", "micro recall", "subset accuracy",
         "Hamming loss", "labels per image (true)", "labels per image (predicted)", "images"],
        [[num(m["mAP"]), num(m.get("macro_roc_auc")), num(m["micro_f1"]), num(m["macro_f1"]),
          num(m["micro_precision"]), num(m["micro_recall"]), num(m["subset_accuracy"]), num(m["hamming_loss"]),
          num(m["label_cardinality"], 3), num(m["predicted_cardinality"], 3), str(m["n"])]],
    )  # fmt: skip
    tuning = m.get("threshold_tuning") or {}
    rule = _RULES.get(str(tuning.get("rule")), "default 0.5").format(t=tuning.get("target"))
    where = (
        f"tuned on the {tuning.get('fitted_on')} split ({tuning.get('n_fit')} images) to {rule}"
        if tuning.get("fitted_on") not in (None, "none")
        else "not tuned (no validation split): 0.5 for every label"
    )
    ece = {r["label"]: r["ece"] for r in (cal or {}).get("per_label") or []}
    val = {r["label"]: r for r in tuning.get("per_label") or []}
    rows = [[r["label"], num(r["ap"]), num(r.get("roc_auc")), num(r["threshold"]), num(r["precision"]),
             num(r["recall"]), num(r.get("recall_lower")), num(r["f1"]), str(r["support"]), num(ece.get(r["label"])),
             _target_text(val.get(r["label"]))]
            for r in m["per_label"]]  # fmt: skip
    bound = f"recall {m.get('confidence', 0.95):.0%} lower bound"
    headers = ["label", "AP", "ROC-AUC", "threshold", "precision", "recall", bound, "F1", "support", "ECE",
               "val precision / recall at the threshold"]  # fmt: skip
    return kit.section(
        "Test metrics (multi-label)",
        summary,
        kit.paragraph(f"Decision thresholds: {where}. The registered model predicts a label when its "
                      "probability reaches the label's threshold."),
        kit.subheading("Per label"),
        kit.table(headers, rows),
    )  # fmt: skip


# The metrics section of a task whose model outputs are classes / labels (Task.row_name).
_METRICS_HTML = {"class": _per_class_html, "label": _per_label_html}


def _target_text(row: Mapping[str, Any] | None) -> str:
    """Precision and recall the label's threshold reached on val (what it was tuned for)."""
    if not row:
        return ""
    if row.get("val_support") == 0:
        return "no positive on val: default threshold"
    text = f"P {row['precision']:.3f} / R {row['recall']:.3f}"
    return text if row.get("reached", True) else text + " (target not reached: best F1 used)"


def _curves_html(images: Mapping[str, Path]) -> kit.Section | None:
    if images.get("roc_curves") is None and images.get("pr_curves") is None:
        return None
    return kit.section(
        "ROC and precision-recall curves",
        kit.paragraph("One class against the rest; the legend gives each curve's area (ROC-AUC, average "
                      "precision)."),
        kit.figures(
            kit.figure(images.get("roc_curves"), alt="one-vs-rest ROC curves",
                       caption="ROC: up and to the left is better; the dashed line is chance."),
            kit.figure(images.get("pr_curves"), alt="precision-recall curves",
                       caption="Precision-recall: up and to the right is better."),
        ),
    )  # fmt: skip


# Headers of the most-confused pairs and what a cell of the matrix counts, by Task.row_name.
_CONFUSION_WORDS = {
    "class": (("true class", "predicted as", "images", "share of the true class"), ""),
    "label": (
        ("missed label", "predicted instead", "images", "share of the label's images"),
        "A cell counts the test images where the row's label was missed while the column's label was "
        "predicted without being there; the diagonal counts each label's hits.",
    ),
}


def _confusion_html(
    pairs: Sequence[Mapping[str, Any]], images: Mapping[str, Path], *, task: Task
) -> kit.Section:
    headers, intro = _CONFUSION_WORDS[task.row_name]
    rows = [[p["true"], p["predicted"], str(p["count"]), kit.num(p["share"], 3)] for p in pairs]
    table = kit.table(headers, rows) if rows else kit.note("No test image was confused with another class.")
    return kit.section(
        "Confusion matrix",
        kit.paragraph(intro) if intro else "",
        kit.subheading("Most confused pairs"),
        table,
        kit.figures(
            kit.figure(images.get("confusion_matrix"), alt="confusion matrix (counts)",
                       caption="Counts of test images."),
            kit.figure(images.get("confusion_matrix_normalized"),
                       alt="confusion matrix (share of each true class)", caption="Each row as shares of its images."),
        ),
    )  # fmt: skip


_KIND_NAMES = {"trained": "trained model", "zero_shot": "CLIP zero-shot", "linear_probe": "CLIP linear probe"}


def _baseline_html(b: Mapping[str, Any] | None) -> kit.Section | None:
    if not b:
        return None
    title = "CLIP baselines"
    if b["status"] != "ok":
        reason = str(b.get("reason") or "")
        why = reason if reason.startswith(str(b["status"])) else f"{b['status']}: {reason}"
        return kit.section(title, kit.note(
            f"Baseline {why}. No zero-shot comparison; the zero-shot gate, if enabled, is not applicable "
            "and does not pass."
        ))  # fmt: skip
    kinds = list(b["overall"])
    metric, per = b.get("metric", "accuracy"), b.get("per_metric", "recall")
    overall = kit.table(["", *[_KIND_NAMES[k] for k in kinds]],
                        [[metric, *[kit.num(b["overall"][k][metric]) for k in kinds]],
                         ["test images", *[str(b["overall"][k]["n"]) for k in kinds]]])  # fmt: skip
    rows = [[r["class"], *[kit.num(r.get(k)) for k in kinds]] for r in b["per_class"]]
    return kit.section(
        title,
        kit.paragraph(f"{b.get('model')} / {b.get('pretrained')}, on the test split."),
        overall,
        kit.subheading("AP per label" if per == "ap" else "Recall per class"),
        kit.table(["class", *[_KIND_NAMES[k] for k in kinds]], rows),
    )


# How the registered model applies the temperature, by Task.row_name.
_CALIBRATION_HOW = {
    "class": "divides its logits by T",
    "label": "divides its logits by T before each label's sigmoid. Below: means over the labels (ECE per label: "
    "predicted probability against how often the label is really there; NLL: binary cross-entropy)",
}


def _calibration_html(cal: Mapping[str, Any] | None, images: Mapping[str, Path]) -> kit.Section | None:
    if not cal:
        return None
    task = get_task(cal.get("task"))
    rows = [[k, kit.num(cal["before"][k]), kit.num(cal["after"][k])] for k in cal["before"]]
    return kit.section(
        "Calibration",
        kit.paragraph(f"Temperature T = {cal['temperature']:.4f}, fitted on the {cal['fitted_on']} split "
                      f"({cal['n_fit']} images); the registered model {_CALIBRATION_HOW[task.row_name]}."),
        kit.table(["test metric", "before scaling", "after scaling"], rows),
        _calibration_per_label(cal.get("per_label")),
        kit.figure(images.get("reliability"), alt="reliability diagram",
                   caption="Bars below the dashed diagonal: the model states more confidence than it earns."),
    )  # fmt: skip


def _calibration_per_label(rows: Sequence[Mapping[str, Any]] | None) -> kit.Html:
    """Multi-label calibration has one row per label (single-label has none)."""
    if rows is None:
        return kit.Html("")
    num = kit.num
    return kit.join([kit.subheading("Per label (after scaling)"), kit.table(
        ["label", "ECE", "adaptive ECE", "MCE", "mean probability", "positive rate"],
        [[r["label"], num(r["ece"]), num(r["ece_adaptive"]), num(r["mce"]), num(r["mean_probability"]),
          num(r["positive_rate"])] for r in rows],
    )])  # fmt: skip


def _robustness_html(r: Mapping[str, Any] | None, images: Mapping[str, Path]) -> kit.Section | None:
    if not r:
        return None
    rows = [[fam, *[kit.num(a, 3) for a in accs], kit.num(r["family_relative"][fam], 3)]
            for fam, accs in r["accuracy"].items()]  # fmt: skip
    m = r.get("metric", "accuracy")
    return kit.section(
        "Robustness",
        kit.paragraph(f"{r['n']} test images, seed {r['seed']}: clean {m} {r['clean_accuracy']:.4f}, mean "
                      f"corruption {m} {r['mean_corruption_accuracy']:.4f}, relative robustness "
                      f"{r['relative_robustness']:.3f}; worst family {r['worst_family']}."),
        kit.table(["family", *[f"severity {s}" for s in SEVERITIES], "relative"], rows),
        kit.figure(images.get("robustness"), alt="robustness heatmap",
                   caption=f"Each cell: the {m} under one corruption family (row) at one severity (column)."),
    )  # fmt: skip


def _slices_html(slices: Sequence[Mapping[str, Any]] | None, *, task: Task) -> kit.Section | None:
    if slices is None:
        return None
    rows = [[s["slice"], str(s["n"]), kit.num(s["accuracy"]), kit.num(s["accuracy_lower"])] for s in slices]
    return kit.section(
        "Slices",
        kit.paragraph(f"{task.correct_name.capitalize()}: the share of images that {task.correct_phrase}."),
        kit.table(["slice", "images", task.correct_name, "lower bound"], rows),
    )


def _champion_html(champ: Mapping[str, Any] | None) -> kit.Section | None:
    if not champ:
        return None
    title = "Champion comparison"
    if champ.get("status") != "compared":
        return kit.section(title, kit.note(champ.get("reason", "not compared")))
    comp = champ["comparison"]
    parts = [comp["mAP"], *comp["per_label"]] if "mAP" in comp else [comp["accuracy"], *comp["per_class"]]
    num = kit.num
    rows = [[r["what"], num(r["challenger"]), num(r["champion"]), num(r["difference"]), num(r["lower"]),
             num(-r["margin"]), kit.badge("yes", "pass") if r["passed"] else kit.badge("NO", "fail")]
            for r in parts]  # fmt: skip
    return kit.section(
        title,
        kit.paragraph(f"Champion: {champ.get('uri')} (version {champ.get('version')}), re-evaluated on the same "
                      f"test images; paired bootstrap ({comp['n_boot']} resamples, {comp['confidence']:.0%} "
                      "one-sided)."),
        kit.table(["metric", "challenger", "champion", "difference", "lower bound", "allowed", "non-inferior"],
                  rows, row_classes=[None if r["passed"] else "fail" for r in parts]),
    )  # fmt: skip
