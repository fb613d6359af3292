"""The CLIP gate (optional, ``baseline.gate``): the trained model must beat CLIP zero-shot.

Overall on the task's headline metric (accuracy, or mAP) and per class on its per-class metric
(:attr:`Task.part_metric`: each class's recall, or each label's AP), each by
``baseline.gate_margin``. A gate that cannot be checked (no zero-shot result: the baseline was
skipped, disabled or not run; a baseline of the other task; a class without a number on one
side) is *not applicable*, says so in its message, and does NOT pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from components.core.errors import ConfigError
from components.evaluate.gates import GateResult
from components.task import Task, task_of

NOT_APPLICABLE = "not applicable"
ZERO_SHOT_GATE = "beats_zero_shot"
_TITLES = {"ap": "AP"}  # how a per-class metric is written in a gate message


def check_beats_baseline(
    trained_metrics: Mapping[str, Any], baseline_metrics: Mapping[str, Any] | None, *, margin: float = 0.0
) -> list[GateResult]:
    """Gates ``beats_zero_shot[<headline>]`` and ``beats_zero_shot[<class>]``: the trained model's
    headline metric, and each class's per-class metric, >= the zero-shot one + margin.

    trained_metrics: a :meth:`Task.metrics` dict. baseline_metrics: the zero-shot metrics dict, or a
    whole baseline.json record, or None. When there is no zero-shot result (skipped: weights
    unavailable, disabled, not run) the result is one gate ``beats_zero_shot`` marked *not
    applicable* in its message and NOT passed: a gate that was not checked never passes.
    """
    if not 0.0 <= margin <= 1.0:
        raise ConfigError(f"the zero-shot gate margin must be within [0, 1], got {margin}")
    task = task_of(trained_metrics)
    zero_shot, why = _zero_shot_of(baseline_metrics)
    if zero_shot is not None and task_of(zero_shot) is not task:
        zero_shot, why = None, "is of another task (single-label vs multi-label) than the trained model"
    if zero_shot is None:
        message = f"{NOT_APPLICABLE}: baseline {why}; this gate was not checked"
        return [
            GateResult(ZERO_SHOT_GATE, False, task.headline_value(trained_metrics) or 0.0, margin, message)
        ]
    overall = _beats(
        f"{ZERO_SHOT_GATE}[{task.headline}]",
        task.headline,
        task.headline_value(trained_metrics) or 0.0,
        task.headline_value(zero_shot) or 0.0,
        margin,
    )
    return [overall, *_per_class(task, trained_metrics, zero_shot, margin)]


def _per_class(
    task: Task, trained: Mapping[str, Any], zero_shot: Mapping[str, Any], margin: float
) -> list[GateResult]:
    """One gate per class of the trained model; a class without the metric on one side (not in the
    zero-shot result; multi-label: no positives, so no AP) is not applicable and does not pass."""
    metric, noun = task.part_metric, task.row_name
    title = _TITLES.get(metric, metric)
    base = {str(r[noun]): r.get(metric) for r in task.rows(zero_shot)}
    gates = []
    for row in task.rows(trained):
        name, value, zero_shot_value = str(row[noun]), row.get(metric), base.get(str(row[noun]))
        gate = f"{ZERO_SHOT_GATE}[{name}]"
        if value is None or zero_shot_value is None:
            why = (
                "has no zero-shot result"
                if name not in base
                else f"has no {title} on one side (no positives)"
            )
            msg = f"{NOT_APPLICABLE}: {noun} '{name}' {why}; this gate was not checked"
            gates.append(GateResult(gate, False, float(value or 0.0), margin, msg))
            continue
        gates.append(_beats(gate, f"{title} of '{name}'", value, zero_shot_value, margin))
    return gates


def is_not_applicable(gate: GateResult) -> bool:
    """True for a baseline gate that could not be checked (see :func:`check_beats_baseline`)."""
    return gate.message.startswith(NOT_APPLICABLE)


def _zero_shot_of(baseline: Mapping[str, Any] | None) -> tuple[Mapping[str, Any] | None, str]:
    if baseline is None:
        return None, "not run (no baseline.json)"
    if "status" in baseline:  # a baseline.json record
        if baseline.get("zero_shot"):
            return baseline["zero_shot"], ""
        reason = str(baseline.get("reason") or baseline["status"])  # e.g. "skipped: weights unavailable: ..."
        status = str(baseline["status"])
        return None, reason if reason.startswith(status) else f"{status}: {reason}"
    return baseline, ""


def _beats(name: str, what: str, value: float, base: float, margin: float) -> GateResult:
    threshold = float(base) + margin
    passed = float(value) >= threshold - 1e-12
    message = f"{what} {float(value):.4f} {'>=' if passed else '<'} zero-shot {float(base):.4f}" + (
        f" + margin {margin:.4f}" if margin else ""
    )
    return GateResult(name=name, passed=passed, value=float(value), threshold=threshold, message=message)
