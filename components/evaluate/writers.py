"""The evaluate stage's report files: metrics, per-class table, gates, confusion matrices, curves.

Files written by :func:`write_evaluation`:

===============================  ============================================================
metrics.json                     :func:`~components.task.metrics.flat_metrics`: scalars only (what ``dvc metrics show`` reads)
evaluation.json                  the full metrics dict (per class, confusion matrix)
per_class.csv                    class, precision, recall (+ Wilson bounds), f1, support, roc_auc, pr_auc
gates.json                       :meth:`~components.evaluate.gates.GateReport.to_dict`
confusion_matrix.png             counts (rows: true class, columns: predicted)
confusion_matrix_normalized.png  each true class's row as shares (recall on the diagonal)
===============================  ============================================================

:func:`write_curves` adds the one-vs-rest curves of :func:`~components.task.metrics.one_vs_rest_curves`:
``roc_curves.csv`` (class, fpr, tpr), ``pr_curves.csv`` (class, recall, precision), at most ~200 points
per class, and ``roc_curves.png`` / ``pr_curves.png`` (all classes in one figure each).

A multi-label evaluation (:meth:`Task.metrics <components.task.Task.metrics>`, ``task: multilabel``)
writes the same files: per_class.csv holds one row per label (AP, ROC-AUC, precision, recall, F1,
support, threshold) and the confusion matrix counts which label was missed while which was wrongly
predicted (hits on the diagonal).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from components.core.jsonio import write_json
from components.evaluate.gates import GateReport
from components.task import task_of

logger = logging.getLogger(__name__)


def write_curves(curves: Mapping[str, list[dict[str, Any]]], out_dir: Path) -> dict[str, Path]:
    """``roc_curves.csv`` (class, fpr, tpr), ``pr_curves.csv`` (class, recall, precision) and their
    PNGs (``roc_curves.png``, ``pr_curves.png``: all classes in one figure each) into ``out_dir``."""
    from components.evaluate.plots import plot_curves

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, x, y in (("roc", "fpr", "tpr"), ("pr", "recall", "precision")):
        path = out_dir / f"{kind}_curves.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["class", x, y])
            for c in curves[kind]:
                writer.writerows((c["class"], a, b) for a, b in zip(c[x], c[y], strict=True))
        paths[f"{kind}_curves_csv"] = path
        paths[f"{kind}_curves"] = plot_curves(curves[kind], out_dir / f"{kind}_curves.png", kind=kind)
    return paths


def write_evaluation(metrics: dict[str, Any], gates: GateReport, out_dir: Path) -> dict[str, Path]:
    """Write the evaluation's five files into ``out_dir`` (created); return their paths by kind.

    Keys: ``metrics``, ``evaluation``, ``per_class``, ``gates``, ``confusion_matrix`` (counts) and
    ``confusion_matrix_normalized`` (each true class's row as shares).
    """
    from components.evaluate.plots import plot_confusion_matrix  # matplotlib only when plotting

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = task_of(metrics)
    classes = task.class_names(metrics)
    # Rows as shares of each class's test images (multi-label: of each label's positives, as a missed
    # label may be taken for several others; single-label these are the row sums).
    totals = np.asarray([r["support"] for r in task.rows(metrics)])
    labels = task.confusion_axes
    paths = {
        "metrics": write_json(out_dir / "metrics.json", task.flat_metrics(metrics)),
        "evaluation": write_json(out_dir / "evaluation.json", metrics),
        "per_class": _write_per_class_csv(metrics, out_dir / "per_class.csv"),
        "gates": write_json(out_dir / "gates.json", gates.to_dict()),
        "confusion_matrix": plot_confusion_matrix(
            np.asarray(metrics["confusion_matrix"]),
            classes,
            out_dir / "confusion_matrix.png",
            normalize=False,
            axis_labels=labels,
        ),
        "confusion_matrix_normalized": plot_confusion_matrix(
            np.asarray(metrics["confusion_matrix"]),
            classes,
            out_dir / "confusion_matrix_normalized.png",
            normalize=True,
            totals=totals,
            axis_labels=labels,
        ),
    }
    logger.info("wrote evaluation to %s (gates %s)", out_dir, "passed" if gates.passed else "FAILED")
    return paths


def _write_per_class_csv(metrics: Mapping[str, Any], path: Path) -> Path:
    """One row per class (multi-label: per label, its name in the ``class`` column too), in the
    task's columns (:attr:`components.task.Task.row_columns`)."""
    task = task_of(metrics)
    columns = task.row_columns
    rows = [{"class": r[task.row_name], **r} for r in task.rows(metrics)]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
