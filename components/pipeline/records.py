"""What each pipeline stage hands the next one (and the CLI, the Prefect tasks, the webhook): small
frozen records with ``to_dict()`` for JSON files, ``--json`` output and MLflow.

A record carries paths and figures, never tensors or models. ``to_dict()`` keeps the keys the
stages have always returned, so scripts reading ``imgflow <stage> --json`` keep working. Records a
producing package already defines are used as they are: the ingest stage returns
:class:`components.data.ingest.IngestSummary`, the retrain check
:class:`components.pipeline.freshness.Freshness`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: keep this module free of heavy imports
    from components.data.ingest import IngestSummary
    from components.evaluate.gates import GateReport
    from components.model.export import Parity
    from components.pipeline.freshness import Freshness
    from components.quality.ledger import LedgerDiff
    from components.registry.registry import Registration

UP_TO_DATE = "up to date"
"""The status of a pipeline run that stopped after the retrain check: nothing changed."""


@dataclass(frozen=True)
class ValidationResult:
    """The validate stage: the suite's verdict, its reports, and which warning-level expectations
    failed (their example rows are in the reports only)."""

    success: bool
    report_json: Path
    report_html: Path
    warnings: tuple[str, ...] = ()
    label_cardinality: Mapping[str, float | None] | None = None
    """Multi-label data: mean labels per image of each split (and overall); None for single-label."""
    contract: str = ""
    """What happened with the data contract: checked against it, written (first version) or off."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "success": self.success,
            "report_json": str(self.report_json),
            "report_html": str(self.report_html),
            "warnings": list(self.warnings),
        }
        if self.contract:
            out["contract"] = self.contract
        if self.label_cardinality is not None:
            out["label_cardinality"] = dict(self.label_cardinality)
        return out


@dataclass(frozen=True)
class AuditSummary:
    """The audit stage: issue counts, the ledger's comparison with the previous data version, how
    many images are excluded from training, and the MLflow run of the audit."""

    data_version: str
    audited: int
    issues: Mapping[str, int]
    """issue type (``label_error``, ``near_duplicate``, ``outlier``, ...) -> count."""
    label_error_rate: float
    ledger: LedgerDiff
    excluded: int
    run_id: str
    report_html: Path
    details: Mapping[str, Any] = field(default_factory=dict)
    """The rest of the audit's ``summary.json``: splits, class counts, out-of-fold scores, timings."""

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.details,
            "audited": self.audited,
            "issues": dict(self.issues),
            "label_error_rate": self.label_error_rate,
            "data_version": self.data_version,
            "ledger": self.ledger.to_dict(),
            "excluded": self.excluded,
            "run_id": self.run_id,
            "report_html": str(self.report_html),
        }


@dataclass(frozen=True)
class BaselineResult:
    """The CLIP baseline stage: its status (``ok``, ``skipped``, ``disabled``) and headline figures,
    the MLflow run of each baseline, and the ledger totals of CLIP's confident disagreements."""

    summary: Mapping[str, Any]
    """:func:`components.baseline.records.summarize` of ``baseline.json``: status, reason,
    model, pretrained, disagreements and each baseline's headline metrics."""
    mlflow_runs: Mapping[str, str]
    """baseline kind (or the skip status) -> MLflow run id."""
    ledger: Mapping[str, int] | None
    """new / persisting / resolved disagreement rows in the label-quality ledger (None: none recorded)."""
    out_dir: Path

    @property
    def status(self) -> str:
        return str(self.summary["status"])

    @property
    def reason(self) -> str | None:
        reason = self.summary.get("reason")
        return None if reason is None else str(reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.summary,
            "mlflow_runs": dict(self.mlflow_runs),
            "ledger": None if self.ledger is None else dict(self.ledger),
            "out_dir": str(self.out_dir),
        }


@dataclass(frozen=True)
class TrainedRun:
    """The train stage: the trained model folder and its MLflow run, with the last epoch's figures
    (it wraps :class:`components.train.training.TrainResult`, whose history goes to MLflow)."""

    run_id: str
    tracking_uri: str
    model_dir: Path
    final: Mapping[str, float]
    """``val_accuracy``, ``val_loss``, ``train_loss``, ``train_accuracy`` of the last epoch (those present)."""
    seconds: float
    epochs: int

    @property
    def val_accuracy(self) -> float | None:
        return self.final.get("val_accuracy")

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "tracking_uri": self.tracking_uri,
            "model_dir": str(self.model_dir),
            **self.final,
        }


@dataclass(frozen=True)
class Evaluation:
    """The evaluate stage: the headline test metric, the gate verdict, the calibration the served
    model carries (temperature; per-label thresholds for multi-label models) and the gate report."""

    task: str
    headline: str
    """The headline metric's name: ``accuracy`` (single-label) or ``mAP`` (multi-label)."""
    value: float | None
    accuracy: float | None
    gates: GateReport
    temperature: float
    thresholds: tuple[float, ...] | None
    report_html: Path
    report_json: Path
    out_dir: Path
    run_id: str
    seconds: float
    timings: Mapping[str, float] = field(default_factory=dict)
    """Wall seconds of each part of the measurement (predict, robustness, adversarial, ...)."""

    @property
    def gates_passed(self) -> bool:
        return bool(self.gates.passed)

    @property
    def verdict(self) -> str:
        return str(self.gates.verdict())

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Evaluation:
        """From what :mod:`components.evaluate.evaluate_run` returns (the keys of :meth:`to_dict`)."""
        from components.evaluate.gates import GateReport
        from components.task import task_of

        task = task_of(raw)  # evaluate returns the task's headline under its name
        thresholds = raw.get("thresholds")
        return cls(
            task=str(raw["task"]),
            headline=task.headline,
            value=task.headline_value(raw),
            accuracy=raw.get("accuracy"),
            gates=GateReport.from_dict(raw["gates"]),
            temperature=float(raw["temperature"]),
            thresholds=None if thresholds is None else tuple(float(t) for t in thresholds),
            report_html=Path(raw["report_html"]),
            report_json=Path(raw["report_json"]),
            out_dir=Path(raw["out_dir"]),
            run_id=str(raw["run_id"]),
            seconds=float(raw["seconds"]),
            timings={str(k): float(v) for k, v in (raw.get("timings") or {}).items()},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "accuracy": self.accuracy,
            self.headline: self.value,
            "gates_passed": self.gates_passed,
            "verdict": self.verdict,
            "gates": self.gates.to_dict(),
            "temperature": self.temperature,
            "thresholds": None if self.thresholds is None else list(self.thresholds),
            "report_html": str(self.report_html),
            "report_json": str(self.report_json),
            "out_dir": str(self.out_dir),
            "run_id": self.run_id,
            "seconds": self.seconds,
            "timings": dict(self.timings),
        }


@dataclass(frozen=True)
class AliasMove:
    """``imgflow promote`` / ``rollback``: an alias moved (or was already there)."""

    alias: str
    from_version: str | None
    to_version: str
    changed: bool
    entry: Mapping[str, Any] = field(default_factory=dict)
    """The promotion-log entry (who, when, why, the gates); empty when nothing moved."""

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> AliasMove:
        """From what :mod:`components.registry.registry` returns (its log entry plus ``changed``)."""
        rest = {k: v for k, v in entry.items() if k not in ("alias", "from", "to", "changed")}
        return cls(
            alias=str(entry["alias"]),
            from_version=None if entry.get("from") is None else str(entry["from"]),
            to_version=str(entry["to"]),
            changed=bool(entry["changed"]),
            entry=rest,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.entry,
            "alias": self.alias,
            "from": self.from_version,
            "to": self.to_version,
            "changed": self.changed,
        }


@dataclass(frozen=True)
class PredictionResult:
    """``imgflow predict``: how many images went into which Parquet file, with which model, how fast."""

    images: int
    failed: int
    out: Path
    classes: tuple[str, ...]
    model: str
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "failed": self.failed,
            "out": str(self.out),
            "classes": list(self.classes),
            "model": self.model,
            "seconds": self.seconds,
            "images_per_s": self.images_per_s,
        }


@dataclass(frozen=True)
class ExportResult:
    """``imgflow export``: the ONNX file, its parity with PyTorch, and the registry version it was
    attached to (None for a local model folder)."""

    model: str
    onnx: Path
    parity: Parity
    attached_to: Mapping[str, str] | None = None
    """``name``, ``version`` and ``artifact`` (its ``runs:/`` URI) of the registered version."""
    int8: Mapping[str, Any] | None = None
    """``--quantize int8``: ``onnx`` (the int8 file), ``quantized`` and ``accuracy`` (int8 vs fp32 ONNX on
    the test split, :class:`components.model.quantize.AccuracyDelta`), ``artifact`` once attached."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "onnx": str(self.onnx), "parity": self.parity.to_dict()}
        if self.attached_to is not None:
            out["attached_to"] = dict(self.attached_to)
        if self.int8 is not None:
            out["int8"] = dict(self.int8)
        return out


@dataclass(frozen=True)
class PipelineResult:
    """A whole pipeline run: ``status`` ``trained`` with every stage's record, or ``up to date``
    (the champion already comes from this data and these params) with ingest and the retrain check."""

    status: str
    ingest: IngestSummary
    freshness: Freshness
    audit: AuditSummary | None = None
    baseline: BaselineResult | None = None
    train: TrainedRun | None = None
    evaluate: Evaluation | None = None
    register: Registration | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "ingest": self.ingest.to_dict(),
            "freshness": self.freshness.to_dict(),
        }
        if self.status == UP_TO_DATE:
            return out
        stages = {"audit": self.audit, "baseline": self.baseline, "train": self.train,
                  "evaluate": self.evaluate, "register": self.register}  # fmt: skip
        return out | {k: None if v is None else v.to_dict() for k, v in stages.items()}
