"""Quality gates over a model's test metrics: :class:`GateResult`, :class:`GateReport`, :func:`make_gate`.

A gate compares one measured number (or its confidence bound) with a threshold from
``params.yaml``'s ``gates:``; :func:`accuracy_gate`, :func:`recall_gates` (each class's recall on its Wilson
lower bound), :func:`map_gate` and :func:`label_ap_gates` are the gates on the test metrics; which of
them apply is the task's (:attr:`components.task.Task.gates`). The metrics
themselves come from :mod:`components.task.metrics`; the report files from
:mod:`components.evaluate.writers`; every other gate (calibration, robustness, slices, champion,
zero-shot baseline) is assembled in :mod:`components.evaluate.gate_report`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from components.core.errors import ConfigError
from components.task.metrics import wilson_interval

# Gates compare ``value >= threshold``; this absorbs float noise such as 0.1 * 3 != 0.3.
_GATE_EPS = 1e-12

ACCURACY_GATE = "min_accuracy"
CLASS_RECALL_GATE = "min_class_recall"
MAP_GATE = "min_map"
LABEL_AP_GATE = "min_label_ap"

GateLevel = Literal["error", "warn"]
INSUFFICIENT = "insufficient data"
"""The status of a gate with fewer test images than ``gates.min_support``."""


@dataclass(frozen=True)
class GateResult:
    """One quality gate and its outcome.

    ``value`` is the point estimate, ``bound`` the statistic actually compared with ``threshold``
    when it is a confidence bound (None: the value itself is compared). A failed ``warn`` gate is
    reported but does not block promotion; a failed ``error`` gate does.
    """

    name: str
    """e.g. ``min_accuracy``, ``min_class_recall[Shirt]``, ``max_ece``."""
    passed: bool
    value: float
    threshold: float
    message: str
    """What was measured against what, e.g. ``recall of 'Shirt' 0.58 < 0.60``."""
    level: GateLevel = "error"
    bound: float | None = None
    comparison: Literal[">=", "<="] = ">="
    explanation: str = ""
    """The result in plain words: what the gate protects against and what this result means."""
    insufficient: bool = False
    """Too few test images to judge (fewer than ``gates.min_support``): its own verdict, "insufficient
    data", listed in the report; neither a pass (``passed`` is False) nor a failure (never blocking)."""

    @property
    def blocking(self) -> bool:
        """Failed and at level ``error``: the model must not be promoted."""
        return not self.passed and self.level == "error" and not self.insufficient

    @property
    def status(self) -> str:
        if self.insufficient:
            return INSUFFICIENT
        return "pass" if self.passed else ("FAIL" if self.level == "error" else "warn")


@dataclass(frozen=True)
class GateReport:
    """All gates of one evaluation; ``passed`` only if there is at least one gate and no failed
    ``error`` gate (failed ``warn`` gates are reported, not blocking).

    ``not_applicable``: (gate name, why) of the configured gates that do not apply to this model at
    all (a single-label gate on a multi-label model and vice versa); listed, neither passed nor failed.
    """

    passed: bool
    gates: tuple[GateResult, ...]
    not_applicable: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        expected = bool(self.gates) and not any(g.blocking for g in self.gates)
        if self.passed != expected:
            raise ValueError(
                f"GateReport.passed={self.passed} contradicts its gates (expected {expected}: "
                "a report passes only with at least one gate and no failed error gate)"
            )

    @classmethod
    def of(cls, gates: Sequence[GateResult], *, not_applicable: Sequence[tuple[str, str]] = ()) -> GateReport:
        gates = tuple(gates)
        return cls(passed=bool(gates) and not any(g.blocking for g in gates), gates=gates,
                   not_applicable=tuple((str(n), str(r)) for n, r in not_applicable))  # fmt: skip

    def failed(self) -> list[GateResult]:
        """The gates that block promotion (failed, level ``error``), in report order."""
        return [g for g in self.gates if g.blocking]

    def warnings(self) -> list[GateResult]:
        """The ``warn`` gates that did not pass (and were judged)."""
        return [g for g in self.gates if not g.passed and g.level == "warn" and not g.insufficient]

    def insufficient(self) -> list[GateResult]:
        """The gates with too few test images to judge ("insufficient data"), in report order."""
        return [g for g in self.gates if g.insufficient]

    def verdict(self) -> str:
        """One sentence: the decision first, then why."""
        n = len(self.gates)
        if not self.gates:
            return "NOT PROMOTABLE: no gate was checked, so nothing shows the model is good enough."
        warn = f"; {len(self.warnings())} warning(s)" if self.warnings() else ""
        if self.insufficient():
            warn += f"; {len(self.insufficient())} with insufficient data (not judged)"
            n -= len(self.insufficient())
        if self.passed:
            return f"PASSED: all {n} blocking gates hold{warn}. The model may be promoted to champion."
        names = ", ".join(g.name for g in self.failed())
        return f"FAILED: {len(self.failed())} of {n} gates failed ({names}){warn}. The model must not be promoted."

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``gates.json``); :meth:`from_dict` reads it back."""
        return {
            "passed": self.passed,
            "verdict": self.verdict(),
            "failed": [g.name for g in self.failed()],
            "warnings": [g.name for g in self.warnings()],
            "insufficient_data": [g.name for g in self.insufficient()],
            "gates": [{**asdict(g), "status": g.status} for g in self.gates],
            "not_applicable": [{"name": n, "reason": r} for n, r in self.not_applicable],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateReport:
        """Inverse of :meth:`to_dict` (derived keys are not read)."""
        gates = tuple(
            GateResult(
                name=str(g["name"]),
                passed=bool(g["passed"]),
                value=float(g["value"]),
                threshold=float(g["threshold"]),
                message=str(g["message"]),
                level=g.get("level", "error"),
                bound=None if g.get("bound") is None else float(g["bound"]),
                comparison=g.get("comparison", ">="),
                explanation=str(g.get("explanation", "")),
                insufficient=bool(g.get("insufficient", False)),
            )
            for g in d["gates"]
        )
        not_applicable = tuple((str(n["name"]), str(n["reason"])) for n in d.get("not_applicable", []))
        return cls(passed=bool(d["passed"]), gates=gates, not_applicable=not_applicable)

    def summary_text(self) -> str:
        """The verdict, then one line per gate (``ok``/``FAIL``/``warn``), e.g. for logs and the CLI."""
        lines = [self.verdict()]
        lines += [f"{'ok  ' if g.passed else g.status:4}  {g.name}: {g.message}" for g in self.gates]
        return "\n".join(lines)


def make_gate(
    name: str,
    what: str,
    value: float,
    threshold: float,
    *,
    level: GateLevel = "error",
    bound: float | None = None,
    bound_name: str = "",
    comparison: Literal[">=", "<="] = ">=",
    explanation: str = "",
) -> GateResult:
    """Compare ``bound`` (or ``value`` when there is no bound) with ``threshold``.

    The message shows both numbers with enough decimals that a failure never reads as equal.
    """
    compared = value if bound is None else bound
    if comparison == ">=":
        passed = compared >= threshold - _GATE_EPS
        op = ">=" if passed else "<"
    else:
        passed = compared <= threshold + _GATE_EPS
        op = "<=" if passed else ">"
    v, t = _format_pair(compared, threshold)
    if bound is None:
        message = f"{what} {v} {op} {t}"
    else:
        message = f"{what} {value:.4f}, {bound_name or 'bound'} {v} {op} {t}"
    return GateResult(
        name=name,
        passed=passed,
        value=float(value),
        threshold=float(threshold),
        message=message,
        level=level,
        bound=None if bound is None else float(bound),
        comparison=comparison,
        explanation=explanation,
    )


def _check_threshold(name: str, threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"gates.{name} must be within [0, 1], got {threshold}; fix params.yaml")


def gate_level(levels: Mapping[str, str], name: str) -> GateLevel | None:
    """The level of gate ``name`` from ``gates.levels`` (default ``error``); None when it is ``off``."""
    level = levels.get(name, "error")
    if level == "off":
        return None
    if level not in ("error", "warn"):
        raise ConfigError(f"gates.levels.{name} must be error, warn or off, got {level!r}")
    return "warn" if level == "warn" else "error"


def check_gates(
    metrics: Mapping[str, Any],
    *,
    min_accuracy: float,
    min_class_recall: float,
    confidence: float = 0.95,
    levels: Mapping[str, str] | None = None,
) -> GateReport:
    """Gate a single-label model on overall accuracy and on every class's recall (metrics-only gates).

    metrics: a :func:`~components.task.metrics.compute_metrics` dict. The class-recall gate compares
    the **Wilson lower bound** of each class's recall (at ``confidence``) with the threshold, so a
    class with few test images cannot pass by luck; a class with no test images fails its gate.
    levels: gate name -> ``error`` | ``warn`` | ``off`` (default ``error``). The evaluate stage builds
    every gate of a model's task in :func:`components.evaluate.gate_report.build_gates`.
    """
    levels = levels or {}
    _check_threshold(ACCURACY_GATE, min_accuracy)
    _check_threshold(CLASS_RECALL_GATE, min_class_recall)
    gates: list[GateResult] = []
    if (level := gate_level(levels, ACCURACY_GATE)) is not None:
        gates.append(accuracy_gate(metrics, min_accuracy, level=level))
    if (level := gate_level(levels, CLASS_RECALL_GATE)) is not None:
        gates += recall_gates(metrics["per_class"], min_class_recall, name_key="class", confidence=confidence,
                              level=level)  # fmt: skip
    return GateReport.of(gates)


def accuracy_gate(metrics: Mapping[str, Any], threshold: float, *, level: GateLevel = "error") -> GateResult:
    """Single-label: the share of test images labelled correctly against ``min_accuracy``."""
    _check_threshold(ACCURACY_GATE, threshold)
    acc = float(metrics["accuracy"])
    return make_gate(
        ACCURACY_GATE, "accuracy", acc, threshold, level=level,
        explanation=(f"The model labels {acc:.1%} of the {metrics['n']} test images correctly; "
                     f"at least {threshold:.1%} is required."),
    )  # fmt: skip


def auto_accuracy_gate(
    metrics: Mapping[str, Any],
    *,
    baseline: tuple[str, float] | None,
    margin: float,
    confidence: float,
    level: GateLevel = "error",
) -> GateResult:
    """``min_accuracy: auto``: the Wilson lower bound of the test accuracy must beat the majority-class
    rate (what always answering the largest test class scores) and the cheap ``baseline`` at hand
    ((what, accuracy): the audit's out-of-fold classifier or CLIP zero-shot) by ``margin``.

    A threshold that means something on any dataset: 0.90 is a Fashion-MNIST number; beating what a
    trivial rule and a cheap model already reach is what shows the training was worth it."""
    n = int(metrics["n"])
    acc = float(metrics["accuracy"])
    majority = max((int(r["support"]) for r in metrics.get("per_class", [])), default=0) / max(n, 1)
    references = [("the majority-class rate", majority)] + ([baseline] if baseline is not None else [])
    what, reference = max(references, key=lambda r: r[1])
    threshold = min(reference + margin, 1.0)
    lower, _ = wilson_interval(int(round(acc * n)), n, confidence=confidence)
    gate = make_gate(ACCURACY_GATE, "accuracy", acc, threshold, level=level, bound=lower,
                     bound_name=f"{confidence:.0%} lower bound")  # fmt: skip
    shown = ", ".join(f"{w} {v:.1%}" for w, v in references)
    verdict = "beats" if gate.passed else "does NOT beat"
    return replace(gate, explanation=(
        f"The model labels {acc:.1%} of the {n} test images correctly; with {confidence:.0%} confidence at "
        f"least {lower:.1%}, which {verdict} the best reference ({what}, {reference:.1%}) by the required "
        f"margin {margin:.1%} (min_accuracy: auto; references: {shown})."
    ))  # fmt: skip


def recall_gates(
    rows: Sequence[Mapping[str, Any]],
    threshold: float,
    *,
    name_key: str,
    confidence: float,
    level: GateLevel = "error",
    min_support: int = 1,
) -> list[GateResult]:
    """One recall gate per class (or label) on the Wilson lower bound of its recall at ``confidence``
    (``min_class_recall``). rows: a metrics dict's per-class rows (``name_key`` names the class);
    a row with a ``threshold`` is a label's recall at its decision threshold. A class with 1 to
    ``min_support - 1`` test images gets an "insufficient data" gate (no test image at all still fails)."""
    _check_threshold(CLASS_RECALL_GATE, threshold)
    return [
        _recall_gate(row, str(row[name_key]), threshold, confidence, level, min_support=min_support)
        for row in rows
    ]


def insufficient_gate(
    name: str, what: str, value: float, threshold: float, *, n: int, min_support: int, level: GateLevel
) -> GateResult:
    """The "insufficient data" verdict of a gate measured on ``n`` < ``min_support`` test images."""
    message = (
        f"{INSUFFICIENT}: {what} {value:.4f} on {n} test image(s), fewer than gates.min_support={min_support}"
    )
    text = (
        f"Only {n} test image(s): too few to tell a good model from a bad one at the required "
        f"{threshold:.0%}, so this is neither a pass nor a failure. Add test images (or lower "
        "gates.min_support) to have it judged."
    )
    return GateResult(name=name, passed=False, value=float(value), threshold=float(threshold), message=message,
                      level=level, explanation=text, insufficient=True)  # fmt: skip


def _recall_gate(
    row: Mapping[str, Any],
    cls: str,
    threshold: float,
    confidence: float,
    level: GateLevel,
    *,
    min_support: int = 1,
) -> GateResult:
    """Recall gate of one class on its Wilson lower bound."""
    name = f"{CLASS_RECALL_GATE}[{cls}]"
    support = int(row["support"])
    if 0 < support < min_support:
        return insufficient_gate(name, f"recall of '{cls}'", float(row["recall"]), threshold, n=support,
                                 min_support=min_support, level=level)  # fmt: skip
    if support == 0:
        message = (
            f"no test images for class '{cls}': its recall cannot be checked against "
            f"{threshold:.2f}; add test images of this class or drop it from the label set"
        )
        return GateResult(
            name=name, passed=False, value=0.0, threshold=threshold, message=message, level=level, bound=0.0,
            explanation=f"Nothing was measured for '{cls}', and a gate never passes on no evidence.",
        )  # fmt: skip
    recall = float(row["recall"])
    hits = int(round(recall * support))
    lower, _ = wilson_interval(hits, support, confidence=confidence)
    gate = make_gate(name, f"recall of '{cls}'", recall, threshold, level=level, bound=lower,
                     bound_name=f"{confidence:.0%} lower bound")  # fmt: skip
    verdict = "is" if gate.passed else "is NOT"
    bound_text = (
        f"With {confidence:.0%} confidence the true recall is at least {lower:.1%}, which {verdict} "
        f"above the required {threshold:.1%}."
    )
    if row.get("threshold") is not None:  # a label's recall depends on the threshold it was tuned to
        return replace(gate, explanation=(
            f"At its threshold {row['threshold']:.3f}, '{cls}' is predicted on {hits} of the {support} "
            f"test images that show it ({recall:.1%}). {bound_text}"
        ))  # fmt: skip
    return replace(
        gate,
        explanation=f"{hits} of {support} '{cls}' test images are recognised ({recall:.1%}). {bound_text}",
    )


def map_gate(metrics: Mapping[str, Any], threshold: float, *, level: GateLevel = "error") -> GateResult:
    """Multi-label: mean average precision over the labels present in test against ``min_map``."""
    _check_threshold(MAP_GATE, threshold)
    value = metrics["mAP"]
    if value is None:
        return GateResult(MAP_GATE, False, 0.0, threshold, "no label has a positive test image: mAP "
                          "cannot be checked; add test images", level=level,
                          explanation="Nothing was measured, and a gate never passes on no evidence.")  # fmt: skip
    n_labels = sum(r["ap"] is not None for r in metrics["per_label"])
    gate = make_gate(MAP_GATE, "mAP", value, threshold, level=level)
    return replace(gate, explanation=(
        f"Averaged over the {n_labels} labels present in the {metrics['n']} test images, the model ranks "
        f"images showing a label above those without it with an average precision of {value:.1%}; "
        f"at least {threshold:.1%} is required."
    ))  # fmt: skip


def label_ap_gates(
    rows: Sequence[Mapping[str, Any]], threshold: float, *, level: GateLevel = "error"
) -> list[GateResult]:
    """Multi-label: each label's average precision against ``min_label_ap``; rows: ``per_label``."""
    _check_threshold(LABEL_AP_GATE, threshold)
    return [_label_ap_gate(row, threshold, level) for row in rows]


def _label_ap_gate(row: Mapping[str, Any], threshold: float, level: GateLevel) -> GateResult:
    label = str(row["label"])
    name = f"{LABEL_AP_GATE}[{label}]"
    if row["ap"] is None:
        return GateResult(name, False, 0.0, threshold, f"no test image shows '{label}': its AP cannot be "
                          f"checked against {threshold:.2f}; add test images with this label", level=level,
                          explanation=f"Nothing was measured for '{label}', and a gate never passes on no evidence.")  # fmt: skip
    gate = make_gate(name, f"AP of '{label}'", row["ap"], threshold, level=level)
    verdict = "reaches" if gate.passed else "does NOT reach"
    return replace(gate, explanation=(
        f"Over the {row['support']} test images showing '{label}' the average precision is {row['ap']:.1%}, "
        f"which {verdict} the required {threshold:.1%}."
    ))  # fmt: skip


def _format_pair(value: float, threshold: float) -> tuple[str, str]:
    """Both with the same decimals: at least 2, enough to show the threshold exactly (up to 6), and
    more where fewer would print a failing 0.598 as '0.60 < 0.60'."""
    start = next((d for d in range(2, 7) if float(f"{threshold:.{d}f}") == threshold), 6)
    for digits in range(start, 7):
        v, t = f"{value:.{digits}f}", f"{threshold:.{digits}f}"
        if v != t or math.isclose(value, threshold, abs_tol=_GATE_EPS):
            return v, t
    return f"{value:.6g}", f"{threshold:.6g}"
