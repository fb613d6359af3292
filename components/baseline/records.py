"""The baseline record (baseline.json), its files and its summary.

Files written by :func:`write_baseline` (``outputs/baseline/``):

==================  =========================================================================
baseline.json       the record: status (``ok`` / ``skipped`` / ``disabled``), reason, model,
                    weights, ``zero_shot`` and ``linear_probe`` (full metric dicts or null);
                    see :mod:`components.baseline.run`
metrics.json        scalars for ``dvc metrics show``: ``zero_shot_<metric>``, ``linear_probe_<metric>``
                    (:meth:`Task.flat_metrics`: ``zero_shot_accuracy``..., or ``zero_shot_mAP``,
                    ``zero_shot_micro_f1``, ``zero_shot_ap_<label>``... for multi-label records)
per_class.csv       class, support, ``<kind>_<metric>`` for :func:`per_class_metrics` (recall,
                    f1; or ap, f1, threshold)
disagreements.csv   images whose label CLIP confidently disagrees with (label-quality signal;
                    :mod:`components.baseline.disagreements`)
==================  =========================================================================

A record's task is ``task_of(record)``: multi-label records say ``task: multilabel``,
single-label ones (and records of a baseline that did not run) say nothing.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from components.baseline.disagreements import disagreement_columns
from components.core.jsonio import write_json
from components.task import Task, task_of

KINDS = ("zero_shot", "linear_probe")


def skipped_record(
    reason: str, *, model: str, pretrained: str | None, status: str = "skipped"
) -> dict[str, Any]:
    """baseline.json of a baseline that did not run (``status`` skipped or disabled)."""
    return {
        "status": status,
        "reason": reason,
        "model": model,
        "pretrained": pretrained,
        "zero_shot": None,
        "linear_probe": None,
        "disagreements": 0,
    }


def summarize(record: Mapping[str, Any]) -> dict[str, Any]:
    """The small result a stage returns (CLI, Prefect): status, reason, accuracies, counts; for
    multi-label records also ``task`` and ``<kind>_<metric>`` of the task's summary metrics
    (:attr:`Task.summary_keys`: mAP, micro and macro F1)."""
    task = task_of(record)
    out = {k: record.get(k) for k in ("status", "reason", "model", "pretrained", "disagreements")}
    for kind in KINDS:
        out[f"{kind}_accuracy"] = (record.get(kind) or {}).get("accuracy")
    out |= task.tagged({})
    for kind in KINDS:
        out |= {f"{kind}_{m}": (record.get(kind) or {}).get(m) for m in task.summary_keys}
    if record.get("embeddings"):
        out["embeddings"] = record["embeddings"]
    return out


def summary_line(summary: Mapping[str, Any]) -> str:
    """One line for people (CLI, Prefect log) from :func:`summarize`'s result."""
    if summary["status"] != "ok":
        return str(summary["reason"])
    metric = task_of(summary).headline
    zero_shot, probe = summary.get(f"zero_shot_{metric}"), summary.get(f"linear_probe_{metric}")
    return (
        f"{summary['model']}/{summary['pretrained']}: zero-shot {metric} "
        f"{'-' if zero_shot is None else f'{zero_shot:.4f}'}, linear probe "
        f"{'-' if probe is None else f'{probe:.4f}'}; {summary['disagreements']} confident label disagreements"
    )


def write_baseline(
    record: Mapping[str, Any], disagreements: pd.DataFrame | None, out_dir: Path
) -> dict[str, Path]:
    """Write baseline.json, metrics.json, per_class.csv, disagreements.csv (always all four, so DVC
    finds its outputs also when the baseline was skipped); returns their paths by kind."""
    task = task_of(record)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat: dict[str, Any] = {"available": record["status"] == "ok"}
    for kind in KINDS:
        if record.get(kind):
            flat.update({f"{kind}_{k}": v for k, v in task.flat_metrics(record[kind]).items()})
    paths = {
        "baseline": write_json(out_dir / "baseline.json", record),
        "metrics": write_json(out_dir / "metrics.json", flat),
        "per_class": _write_per_class(record, out_dir / "per_class.csv"),
        "disagreements": out_dir / "disagreements.csv",
    }
    table = (
        disagreements if disagreements is not None else pd.DataFrame(columns=list(disagreement_columns(task)))
    )
    table.to_csv(paths["disagreements"], index=False, float_format="%.6f")
    return paths


def read_baseline(out_dir: Path) -> dict[str, Any] | None:
    """baseline.json of ``out_dir`` (``outputs/baseline``), or None when the stage has not run."""
    path = Path(out_dir) / "baseline.json"
    return json.loads(path.read_text()) if path.exists() else None


def per_class_metrics(task: Task) -> tuple[str, ...]:
    """The per-class numbers of each baseline in per_class.csv: the task's per-class metric
    (:attr:`Task.part_metric`: recall, or AP), F1, and the threshold where the task fits one."""
    return (task.part_metric, "f1", *(("threshold",) if task.fits_decision else ()))


def _write_per_class(record: Mapping[str, Any], path: Path) -> Path:
    task = task_of(record)
    metrics = per_class_metrics(task)
    columns = ["class", "support"] + [f"{k}_{m}" for k in KINDS for m in metrics]
    rows: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        for row in task.rows(record[kind]) if record.get(kind) else []:
            name = row[task.row_name]
            entry = rows.setdefault(name, {"class": name, "support": row["support"]})
            entry.update({f"{kind}_{m}": row[m] for m in metrics})
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows.values())
    return path
