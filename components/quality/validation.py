"""Data validation of the manifest with Great Expectations (the project's only GE adapter).

:func:`validate_manifest` runs one expectation suite over a manifest DataFrame and returns a
:class:`ValidationReport`: one :class:`ExpectationOutcome` per expectation, with the offending
rows (image_id, path, split, value) or the missing values, plus the raw GE validation result.
Each expectation belongs to a check (``schema``, ``too_dark``, ``near_dup_leakage``, ...) whose
severity comes from ``validate.severity``: an ``error`` fails the report, a ``warn`` is reported
only. Besides the manifest's own columns, the suite runs over derived columns (per-image flags
such as ``is_dark``, the near-duplicate partner in another split found with a multi-index hash
search) and over a small class-count table (per class and split), so class balance, quality
fractions and leakage are plain GE expectations with the offending rows named.

Multi-label manifests (``task="multilabel"``: ``labels`` holds each image's label set) are checked
on label *occurrences*: an image with two labels counts for both in the class-count table (presence
per split, minimum per label and split, imbalance per label), every label of a set must be a
declared class, and two more checks cover the sets themselves: ``label_cardinality`` (no image
without labels, at most ``max_labels_per_image``) and ``cardinality_shift`` (each split's mean
labels per image within ``max_cardinality_ratio`` of the train split's, from a per-split table).
The report's ``summary`` carries the label cardinality and per-label counts of each split.
:func:`write_validation_report` saves it as ``report.json`` and a self-contained ``report.html``.

Every GE call lives in this module, against the GE 1.x API (ephemeral context, fluent pandas
data source, ``ExpectationSuite`` + ``ValidationDefinition``). GE is imported lazily inside the
functions that use it: importing it costs seconds, and callers such as the CLI import this module
just to reach the names. Each call builds its own in-memory context: nothing global is kept by us,
nothing is written to disk by GE, and its progress bars are off.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.core import report as kit
from components.core.config import DEFAULT_SEVERITY, ValidateConfig
from components.core.errors import DataError
from components.core.jsonio import write_json, write_text_atomic
from components.data.image_stats import hex_to_uint64, near_duplicate_pairs
from components.data.manifest import MANIFEST_COLUMNS, SPLITS
from components.quality.contract import (
    ACCEPT_HINT,
    FEATURE_COLUMNS,
    SHARE_COLUMNS,
    DataContract,
    compare_to_contract,
)
from components.task import MULTILABEL, SINGLELABEL, Task, get_task, label_set

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 20
"""Offending rows (or missing values) kept per expectation."""
TEXT_EXAMPLES = 5
"""Of those, shown per failed expectation by :meth:`ValidationReport.summary_text`."""

NOT_NULL_COLUMNS: tuple[str, ...] = (
    "image_id", "path", "label", "width", "height", "mode", "split",
    "decode_ok", "aspect", "brightness", "contrast", "blur", "phash",
)  # fmt: skip
_NAME_KEY = "imgflow_name"
"""Expectation ``meta`` key that carries our short outcome name through GE's result."""


@dataclass(frozen=True)
class ExpectationOutcome:
    """The result of one expectation, reduced to what a person needs to fix the data."""

    name: str
    """Short stable id, e.g. ``label_in_class_set``, ``class_present_in_val``."""
    expectation: str
    """GE expectation type, e.g. ``expect_column_values_to_be_in_set``."""
    description: str
    """What was expected, as a sentence."""
    success: bool
    unexpected_count: int
    """Offending rows (row expectations) or missing values (set expectations)."""
    examples: tuple[dict[str, Any], ...]
    """Up to 20 offending rows (``image_id``, ``path``, ``split``, ``value``) or missing values."""
    severity: str = "error"
    """``error``: a failure fails the report; ``warn``: reported only."""
    check: str = ""
    """The check it belongs to (the key of ``validate.severity``)."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["examples"] = [dict(e) for e in self.examples]
        return out


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of :func:`validate_manifest`; ``success`` is True unless an ``error`` expectation failed."""

    success: bool
    outcomes: tuple[ExpectationOutcome, ...]
    n_rows: int
    ge_result: dict[str, Any]
    """The raw GE validation result (``ExpectationSuiteValidationResult.to_json_dict()``)."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Multi-label only (else empty): ``task``, ``label_cardinality`` (split -> mean labels per image,
    ``all`` included) and ``label_counts`` (split -> label -> images carrying it)."""

    def failed(self) -> list[ExpectationOutcome]:
        """Failed expectations, errors and warnings."""
        return [o for o in self.outcomes if not o.success]

    def errors(self) -> list[ExpectationOutcome]:
        return [o for o in self.failed() if o.severity != "warn"]

    def warnings(self) -> list[ExpectationOutcome]:
        return [o for o in self.failed() if o.severity == "warn"]

    def summary_text(self) -> str:
        """Multi-line, readable: the verdict, then each failed expectation with example rows."""
        failed, errors, warns = self.failed(), self.errors(), self.warnings()
        n = len(self.outcomes)
        if not failed:
            return f"Manifest validation PASSED: all {n} expectations met ({self.n_rows} rows)." + (
                f"\n{self._cardinality_text()}" if self.summary else ""
            )
        if not errors:
            lines = [
                f"Manifest validation PASSED with {len(warns)} warning(s): {n - len(warns)} of {n} "
                f"expectations met ({self.n_rows} rows)."
            ]
        else:
            lines = [
                f"Manifest validation FAILED: {len(errors)} of {n} expectations failed"
                + (f" (and {len(warns)} warning(s))" if warns else "")
                + f" ({self.n_rows} rows)."
            ]
        for o in errors + warns:
            tag = "WARNING " if o.severity == "warn" else ""
            lines.append(f"- {tag}{o.name} ({o.expectation}): {o.unexpected_count} unexpected")
            lines.append(f"    expected: {o.description}")
            shown = o.examples[:TEXT_EXAMPLES]
            lines.extend(f"    e.g. {_format_example(e)}" for e in shown)
            if len(o.examples) > len(shown):
                lines.append(
                    f"    ... {len(o.examples) - len(shown)} more examples in report.json / report.html"
                )
        if self.summary:
            lines.append(self._cardinality_text())
        return "\n".join(lines)

    def _cardinality_text(self) -> str:
        card = self.summary.get("label_cardinality", {})
        return "Label cardinality (mean labels per image): " + ", ".join(
            f"{split} {value:.3f}" for split, value in card.items() if value is not None
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: ``json.loads(json.dumps(r.to_dict())) == r.to_dict()``."""
        out = {
            "success": self.success,
            "n_rows": self.n_rows,
            "outcomes": [o.to_dict() for o in self.outcomes],
            "ge_result": self.ge_result,
        }
        if self.summary:
            out["summary"] = self.summary
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ValidationReport:
        """Inverse of :meth:`to_dict` (e.g. to reload ``report.json``)."""
        outcomes = tuple(
            ExpectationOutcome(**{**o, "examples": tuple(dict(e) for e in o["examples"])})
            for o in raw["outcomes"]
        )  # older reports lack severity/check: the defaults apply
        return cls(
            success=bool(raw["success"]),
            outcomes=outcomes,
            n_rows=int(raw["n_rows"]),
            ge_result=raw["ge_result"],
            summary=dict(raw.get("summary") or {}),
        )


# ---------------------------------------------------------------------------------------------
# The suite: what is expected of a manifest
# ---------------------------------------------------------------------------------------------

ExampleFn = Callable[[dict[str, Any], pd.DataFrame], tuple[int, list[dict[str, Any]]]]
"""(GE result of one expectation, manifest) -> (unexpected count, examples)."""


@dataclass(frozen=True)
class _Spec:
    """One expectation of the suite, before it is handed to GE."""

    name: str
    expectation_class: str
    """Class name in ``great_expectations.expectations``."""
    kwargs: dict[str, Any]
    """Its arguments; ``row_condition`` as ``(column, value)``, made a GE condition at run time
    (keeps GE out of module import)."""
    description: str
    examples: ExampleFn
    check: str = "schema"
    """Key of ``validate.severity``."""
    table: str = "manifest"
    """Which frame it runs on: ``manifest`` (with derived columns), ``class_counts``, and for
    multi-label data ``label_rows`` (one row per image and label) or ``cardinality`` (per split)."""


def _suite_specs(
    classes: Sequence[str],
    cfg: ValidateConfig,
    task: str | Task = SINGLELABEL,
    *,
    cutoffs: Mapping[str, float] | None = None,
    contract: DataContract | None = None,
) -> list[_Spec]:
    """The whole suite, in report order; label sets are checked where the task has them, the data
    contract's checks when there is one. cutoffs: :func:`quality_cutoffs` (default: the absolute ones)."""
    task = get_task(task)
    cuts = dict(cutoffs or _absolute_cutoffs(cfg))
    return (
        _schema_specs(classes, cfg, task=task)
        + (_label_set_specs(classes, cfg) if task.several_labels else [])
        + _image_specs(cfg, cuts)
        + _balance_specs(classes, cfg, task=task)
        + _leakage_specs(cfg)
        + (_contract_specs(contract, task) if contract is not None else [])
    )


def _label_table(task: Task) -> str:
    """The frame a label count runs on: one row per image, or per (image, label) for label sets."""
    return task.label_table


def _schema_specs(classes: Sequence[str], cfg: ValidateConfig, *, task: Task) -> list[_Spec]:
    specs = [
        _Spec(
            "manifest_not_empty",
            "ExpectTableRowCountToBeBetween",
            {"min_value": 1},
            "the manifest has at least one row",
            _no_examples,
        ),
        _Spec(
            "columns_present",
            "ExpectTableColumnsToMatchSet",
            {"column_set": list(MANIFEST_COLUMNS), "exact_match": False},
            f"every manifest column exists ({', '.join(MANIFEST_COLUMNS)})",
            _missing_columns,
        ),
    ]
    specs += [
        _Spec(
            f"{col}_not_null",
            "ExpectColumnValuesToNotBeNull",
            {"column": col},
            f"no row has a null {col}",
            _row_examples,
        )
        for col in NOT_NULL_COLUMNS
    ]
    specs += [
        _Spec(
            "label_in_class_set",
            "ExpectColumnValuesToBeInSet",
            {"column": "label", "value_set": list(classes)},
            f"every label is one of the {len(classes)} declared classes ({_short_list(classes)})",
            _row_examples,
            "unknown_labels",
        ),
        _Spec(
            "width_in_range",
            "ExpectColumnValuesToBeBetween",
            {"column": "width", "min_value": cfg.min_width, "max_value": cfg.max_width},
            f"every width is within [{cfg.min_width}, {cfg.max_width}] pixels",
            _row_examples,
            "size",
        ),
        _Spec(
            "height_in_range",
            "ExpectColumnValuesToBeBetween",
            {"column": "height", "min_value": cfg.min_height, "max_value": cfg.max_height},
            f"every height is within [{cfg.min_height}, {cfg.max_height}] pixels",
            _row_examples,
            "size",
        ),
        _Spec(
            "mode_allowed",
            "ExpectColumnValuesToBeInSet",
            {"column": "mode", "value_set": list(cfg.allowed_modes)},
            f"every image mode is one of {', '.join(cfg.allowed_modes)}",
            _row_examples,
            "modes",
        ),
        _Spec(
            "split_known",
            "ExpectColumnValuesToBeInSet",
            {"column": "split", "value_set": list(SPLITS)},
            f"every split is one of {', '.join(SPLITS)}",
            _row_examples,
        ),
    ]
    specs += [
        _Spec(
            f"class_present_in_{split}",
            "ExpectColumnDistinctValuesToContainSet",
            {"column": "label", "value_set": list(classes), "row_condition": ("split", split)},
            f"each of the {len(classes)} declared classes has at least one image in the {split} split"
            + task.label_scope,
            _missing_classes(split),
            "class_presence",
            _label_table(task),
        )
        for split in cfg.required_splits
    ]
    return specs


def _label_set_specs(classes: Sequence[str], cfg: ValidateConfig) -> list[_Spec]:
    """Multi-label only: every label of a set is declared, set sizes, cardinality across splits."""
    most = cfg.max_labels_per_image
    return [
        _Spec(
            "labels_in_class_set",
            "ExpectColumnValuesToBeNull",
            {"column": "unknown_label"},
            f"every label of every image's label set is one of the {len(classes)} declared classes",
            _row_examples,
            "unknown_labels",
        ),
        _Spec(
            "labels_not_empty",
            "ExpectColumnValuesToBeBetween",
            {"column": "n_labels", "min_value": 1, **({"max_value": most} if most else {})},
            "every image carries at least one label" + (f" and at most {most}" if most else ""),
            _row_examples,
            "label_cardinality",
        ),
        _Spec(
            "label_cardinality_across_splits",
            "ExpectColumnValuesToBeBetween",
            {"column": "ratio_to_train", "max_value": cfg.max_cardinality_ratio},
            f"each split's mean labels per image is within {cfg.max_cardinality_ratio:g}x of the train "
            "split's (either way)",
            _cardinality_rows,
            "cardinality_shift",
            "cardinality",
        ),
    ]


def _image_specs(cfg: ValidateConfig, cuts: Mapping[str, float]) -> list[_Spec]:
    """Per-image properties computed at ingestion (decode, aspect, brightness, blur); cuts: the
    brightness / blur cut-offs in force (:func:`quality_cutoffs`)."""
    specs = [
        _Spec(
            "decode_ok",
            "ExpectColumnValuesToBeInSet",
            {"column": "decode_ok", "value_set": [True]},
            "every image decoded fully at ingestion",
            _row_examples,
            "decode",
        ),
        _Spec(
            "aspect_in_range",
            "ExpectColumnValuesToBeBetween",
            {"column": "aspect", "min_value": cfg.min_aspect, "max_value": cfg.max_aspect},
            f"every aspect ratio (width / height) is within [{cfg.min_aspect}, {cfg.max_aspect}]",
            _row_examples,
            "aspect",
        ),
    ]
    how = _cutoff_origin(cfg)
    fractions = (
        ("too_dark", "is_dark", cfg.max_dark_fraction, f"mean brightness < {cuts['dark_below']:.4g}{how}", "brightness"),
        ("too_bright", "is_bright", cfg.max_bright_fraction, f"mean brightness > {cuts['bright_above']:.4g}{how}", "brightness"),
        ("blurry", "is_blurry", cfg.max_blurry_fraction, f"Laplacian variance < {cuts['blur_below']:.4g}{how}", "blur"),
    )  # fmt: skip
    specs += [
        _Spec(
            f"{check}_fraction",
            "ExpectColumnMeanToBeBetween",
            {"column": flag, "max_value": limit},
            f"at most {limit:.1%} of the images are {check.replace('_', ' ')} ({what})",
            _flagged_rows(flag, source),
            check,
        )
        for check, flag, limit, what, source in fractions
    ]
    return specs


def _balance_specs(classes: Sequence[str], cfg: ValidateConfig, *, task: Task) -> list[_Spec]:
    """Class balance, on the class-count table (one row per class, in total and per split); for
    multi-label data the counts are label occurrences (images carrying the label)."""
    images = task.counted_images
    return [
        _Spec(
            "enough_classes",
            "ExpectColumnUniqueValueCountToBeBetween",
            {"column": "label", "min_value": cfg.min_classes},
            f"at least {cfg.min_classes} classes have images (a classifier needs two)",
            _observed,
            "class_count",
            _label_table(task),
        ),
        _Spec(
            "min_per_class",
            "ExpectColumnValuesToBeBetween",
            {"column": "count", "min_value": cfg.min_per_class, "row_condition": ("scope", "total")},
            f"every declared class has at least {cfg.min_per_class} {images} over all splits",
            _count_rows,
            "min_per_class",
            "class_counts",
        ),
        _Spec(
            "min_per_class_per_split",
            "ExpectColumnValuesToBeBetween",
            {
                "column": "count",
                "min_value": cfg.min_per_class_per_split,
                "row_condition": ("scope", "split"),
            },
            f"every declared class has at least {cfg.min_per_class_per_split} {images} in each of "
            f"{', '.join(cfg.required_splits)}",
            _count_rows,
            "min_per_class_per_split",
            "class_counts",
        ),
        _Spec(
            "class_imbalance",
            "ExpectColumnValuesToBeBetween",
            {
                "column": "imbalance",
                "max_value": cfg.max_imbalance_ratio,
                "row_condition": ("scope", "total"),
            },
            task.imbalance_rule(cfg.max_imbalance_ratio) + IMBALANCE_ADVICE,
            _count_rows,
            "imbalance",
            "class_counts",
        ),
    ]


IMBALANCE_ADVICE = (
    "; a skewed dataset trains with train.loss: logit_adjusted, train.sampler: balanced or "
    "train.class_weights: inverse (it fails only where a class is too small to split: min_per_class_per_split)"
)


def _contract_specs(contract: DataContract, task: Task) -> list[_Spec]:
    """The data contract's checks: same classes, stable class shares, no distribution shift."""
    classes = list(contract.classes)
    where = "the data contract (data_contract.yaml)"
    return [
        _Spec(
            "label_in_contract",
            "ExpectColumnValuesToBeInSet",
            {"column": "label", "value_set": classes},
            f"every label is one of the {len(classes)} classes of {where} ({_short_list(classes)}); a new "
            f"class is refused: {ACCEPT_HINT}",
            _row_examples,
            "contract_classes",
            _label_table(task),
        ),
        _Spec(
            "contract_classes_present",
            "ExpectColumnDistinctValuesToContainSet",
            {"column": "label", "value_set": classes},
            f"every class of {where} still has images; {ACCEPT_HINT}",
            _missing_classes("all"),
            "contract_classes",
            _label_table(task),
        ),
        _Spec(
            "class_shares_match_contract",
            "ExpectColumnValuesToBeBetween",
            {"column": "change", "max_value": contract.checks.max_share_change},
            f"each class's share of the {task.counted_images} moved at most "
            f"{contract.checks.max_share_change:.0%} (absolute) from {where}",
            _table_rows(SHARE_COLUMNS),
            "contract_shares",
            "contract_shares",
        ),
        _Spec(
            "no_shift_from_contract",
            "ExpectColumnValuesToBeInSet",
            {"column": "shifted", "value_set": [False]},
            f"no image property shifted from {where}: per property a KS test (p < {contract.checks.alpha:g} "
            f"and statistic >= {contract.checks.min_ks_statistic:g}, or PSI >= {contract.checks.max_psi:g}), "
            f"mode/channel shares within {contract.checks.max_share_change:.0%}, cheap-feature mean within "
            f"{contract.checks.min_embedding_shift:g} SD; {ACCEPT_HINT}",
            _table_rows(FEATURE_COLUMNS),
            "contract_shift",
            "contract_features",
        ),
    ]


def _leakage_specs(cfg: ValidateConfig) -> list[_Spec]:
    return [
        _Spec(
            "image_id_unique",
            "ExpectColumnValuesToBeUnique",
            {"column": "image_id"},
            "every image_id (sha256) occurs once: no exact copy within or across train/val/test",
            _duplicate_ids,
            "exact_leakage",
        ),
        _Spec(
            "no_near_duplicate_across_splits",
            "ExpectColumnValuesToBeNull",
            {"column": "near_dup_in_other_split"},
            f"no image has a near-duplicate (perceptual-hash distance <= {cfg.near_dup_distance}) in "
            "another split",
            _row_examples,
            "near_dup_leakage",
        ),
    ]


def _short_list(values: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")


# ---------------------------------------------------------------------------------------------
# Examples: from a GE result to the offending rows / missing values
# ---------------------------------------------------------------------------------------------


def _no_examples(result: dict[str, Any], df: pd.DataFrame) -> tuple[int, list[dict[str, Any]]]:
    return 0, []


def _missing_columns(result: dict[str, Any], df: pd.DataFrame) -> tuple[int, list[dict[str, Any]]]:
    missing = result.get("details", {}).get("mismatched", {}).get("missing", [])
    return len(missing), [{"missing_column": c} for c in missing[:MAX_EXAMPLES]]


def _missing_classes(split: str) -> ExampleFn:
    def examples(result: dict[str, Any], df: pd.DataFrame) -> tuple[int, list[dict[str, Any]]]:
        missing = sorted(result.get("partial_missing_list") or [])
        count = int(result.get("missing_count", len(missing)))
        return count, [{"split": split, "missing_class": c} for c in missing[:MAX_EXAMPLES]]

    return examples


def _row_examples(result: dict[str, Any], df: pd.DataFrame) -> tuple[int, list[dict[str, Any]]]:
    """Offending rows from GE's ``partial_unexpected_index_list``, with path and split added.

    GE lists ``{"image_id": ..., <column>: value}`` per row; without an image_id column it lists
    the DataFrame's index labels instead, and the values come from ``partial_unexpected_list``.
    """
    count = int(result.get("unexpected_count") or 0)
    index_list = (result.get("partial_unexpected_index_list") or [])[:MAX_EXAMPLES]
    values = result.get("partial_unexpected_list") or []
    id_cols = set(result.get("unexpected_index_column_names") or [])
    by_id = _rows_by_id(df, [r.get("image_id") for r in index_list if isinstance(r, dict)])
    out = []
    for i, r in enumerate(index_list):
        if isinstance(r, dict):
            image_id = r.get("image_id")
            value = next((v for k, v in r.items() if k not in id_cols), image_id)
            out.append({"image_id": image_id, **by_id.get(image_id, {}), "value": _jsonable(value)})
        else:
            value = values[i] if i < len(values) else None
            out.append({"row": _jsonable(r), **_row_at(df, r), "value": _jsonable(value)})
    return count, out


def _flagged_rows(flag: str, source: str) -> ExampleFn:
    """Rows whose derived ``flag`` column is set, with the ``source`` value that set it."""

    def examples(result: dict[str, Any], df: pd.DataFrame) -> tuple[int, list[dict[str, Any]]]:
        if flag not in df.columns:
            return 0, []
        rows = df[df[flag] > 0]
        cols = [c for c in ("image_id", "path", "split") if c in df.columns]
        out = [
            {**{c: _jsonable(r[c]) for c in cols}, "value": _jsonable(r.get(source))}
            for r in rows.head(MAX_EXAMPLES).to_dict("records")
        ]
        return len(rows), out

    return examples


def _observed(result: dict[str, Any], df: pd.DataFrame) -> tuple[int, list[dict[str, Any]]]:
    return 0, [{"observed": _jsonable(result.get("observed_value"))}]


def _count_rows(result: dict[str, Any], df: pd.DataFrame) -> tuple[int, list[dict[str, Any]]]:
    """Offending rows of the class-count table (GE lists their index labels)."""
    count = int(result.get("unexpected_count") or 0)
    out = []
    for label in (result.get("partial_unexpected_index_list") or [])[:MAX_EXAMPLES]:
        if label in df.index:
            row = df.loc[label]
            out.append({k: _jsonable(row[k]) for k in ("split", "label", "count", "imbalance")})
    return count, out


def _table_rows(columns: Sequence[str]) -> ExampleFn:
    """Offending rows of a small table (GE lists their index labels), with ``columns``."""

    def examples(result: dict[str, Any], df: pd.DataFrame) -> tuple[int, list[dict[str, Any]]]:
        count = int(result.get("unexpected_count") or 0)
        listed = (result.get("partial_unexpected_index_list") or [])[:MAX_EXAMPLES]
        labels = [x for x in listed if x in df.index]
        return count, [{k: _jsonable(df.loc[x, k]) for k in columns if k in df.columns} for x in labels]

    return examples


def _cardinality_rows(result: dict[str, Any], df: pd.DataFrame) -> tuple[int, list[dict[str, Any]]]:
    """Every split's row of the cardinality table (passing or not: the report shows the
    cardinality), the offending ones first."""
    count = int(result.get("unexpected_count") or 0)
    bad = set(result.get("partial_unexpected_index_list") or [])
    rows = [
        {k: _jsonable(r[k]) for k in CARDINALITY_COLUMNS} for label, r in df.iterrows() if label in bad
    ] + [{k: _jsonable(r[k]) for k in CARDINALITY_COLUMNS} for label, r in df.iterrows() if label not in bad]
    return count, rows[:MAX_EXAMPLES]


def _duplicate_ids(result: dict[str, Any], df: pd.DataFrame) -> tuple[int, list[dict[str, Any]]]:
    """One example per duplicated image_id, naming the splits (and paths) it occurs in."""
    count = int(result.get("unexpected_count") or 0)
    if count == 0 or "image_id" not in df.columns:
        return count, []
    dup = df[df["image_id"].duplicated(keep=False) & df["image_id"].notna()]
    out = []
    for image_id, rows in list(dup.groupby("image_id", sort=True))[:MAX_EXAMPLES]:
        example: dict[str, Any] = {"image_id": str(image_id), "count": len(rows)}
        for col, key in (("split", "splits"), ("path", "paths")):
            if col in rows.columns:
                example[key] = sorted({str(v) for v in rows[col]})
        out.append(example)
    return count, out


def _rows_by_id(df: pd.DataFrame, ids: list[Any]) -> dict[Any, dict[str, Any]]:
    """image_id -> {path, split} of its first row, for the few ids given."""
    if "image_id" not in df.columns or not ids:
        return {}
    cols = [c for c in ("path", "split") if c in df.columns]
    rows = df.loc[df["image_id"].isin([i for i in ids if i is not None]), ["image_id", *cols]]
    rows = rows.drop_duplicates("image_id")
    return {r["image_id"]: {c: _jsonable(r[c]) for c in cols} for r in rows.to_dict("records")}


def _row_at(df: pd.DataFrame, label: Any) -> dict[str, Any]:
    """{path, split} of the row with this index label (when the label is still valid)."""
    cols = [c for c in ("path", "split") if c in df.columns]
    try:
        row = df.loc[label]
    except (KeyError, TypeError):
        return {}
    if isinstance(row, pd.DataFrame):  # duplicate index labels
        row = row.iloc[0]
    return {c: _jsonable(row[c]) for c in cols}


def _jsonable(value: Any) -> Any:
    """numpy scalars, NaN and friends -> plain JSON values."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return None if value != value else float(value)
    if hasattr(value, "item"):
        try:
            return _jsonable(value.item())
        except (ValueError, TypeError):
            pass
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return None
    return str(value)


def _format_example(example: dict[str, Any]) -> str:
    return " ".join(f"{k}={v!r}" for k, v in example.items())


# ---------------------------------------------------------------------------------------------
# Running GE
# ---------------------------------------------------------------------------------------------


def validate_manifest(
    df: pd.DataFrame,
    *,
    classes: Sequence[str],
    cfg: ValidateConfig,
    task: str | Task = SINGLELABEL,
    contract: DataContract | None = None,
) -> ValidationReport:
    """Validate a manifest (columns of :data:`components.data.manifest.MANIFEST_COLUMNS`) with GE.

    df: (N, 19) manifest as read by ``read_manifest``; N may be 0 (the report then fails).
    classes: the declared class set (``dataset.json``'s classes). task: ``dataset.json``'s task;
    ``multilabel`` checks the ``labels`` sets (see the module doc). Never raises on bad data: every
    problem becomes a failed outcome, a missing column included. contract: the data contract this
    version must match (:mod:`components.quality.contract`; None: no contract checks).
    """
    classes = [str(c) for c in classes]
    if not classes:
        raise DataError("no classes given to validate the manifest against: pass the dataset's class names")
    task = get_task(task)  # an unknown name is a DataError
    start = time.perf_counter()
    cutoffs = quality_cutoffs(df, cfg)
    specs = _suite_specs(classes, cfg, task, cutoffs=cutoffs, contract=contract)
    frames = {
        "manifest": with_derived_columns(df, cfg, classes=classes if task.several_labels else None),
        "class_counts": class_count_table(df, classes, cfg, task=task),
    }
    summary: dict[str, Any] = {}
    if task.several_labels:  # the label-set tables and the report's label summary
        frames["label_rows"] = label_rows_table(df)
        frames["cardinality"] = cardinality_table(df, cfg)
        summary = label_summary(frames["label_rows"], frames["cardinality"], classes)
    if contract is not None:  # class shares count label occurrences for multi-label data
        frames["contract_features"] = compare_to_contract(frames["manifest"], contract).features
        frames["contract_shares"] = compare_to_contract(frames[task.label_table], contract).shares
    ge_result = _run_suite(frames, specs)
    results = _results_by_name(ge_result)
    severity = {**DEFAULT_SEVERITY, **cfg.severity}
    outcomes = tuple(
        _outcome(spec, results.get(spec.name), frames[spec.table], severity[spec.check]) for spec in specs
    )
    report = ValidationReport(
        success=all(o.success or o.severity == "warn" for o in outcomes),
        outcomes=outcomes,
        n_rows=len(df),
        ge_result=ge_result,
        summary=summary,
    )
    logger.info(
        "manifest validation %s: %d/%d expectations met, %d rows, %.2f s",
        "passed" if report.success else "FAILED",
        len(outcomes) - len(report.failed()),
        len(outcomes),
        len(df),
        time.perf_counter() - start,
    )
    return report


def with_derived_columns(
    df: pd.DataFrame, cfg: ValidateConfig, *, classes: Sequence[str] | None = None
) -> pd.DataFrame:
    """The manifest plus per-row flags the suite checks: ``is_dark``, ``is_bright``, ``is_blurry``
    (0/1 floats: their mean is the fraction) and ``near_dup_in_other_split`` (the image_id of a
    near-duplicate in another split, else null). With ``classes`` (multi-label data) also
    ``n_labels`` (size of the label set) and ``unknown_label`` (the first label of the set that is
    not a declared class, else null). A flag whose source column is missing is left out, so its
    expectation fails naming the column."""
    out = df.copy()
    if classes is not None and "labels" in df.columns:
        known = set(classes)
        sets = [label_set(v) for v in df["labels"]]
        out["n_labels"] = np.asarray([len(s) for s in sets], dtype=np.int64)
        out["unknown_label"] = [next((lab for lab in s if lab not in known), None) for s in sets]
    cuts = quality_cutoffs(df, cfg)
    if "brightness" in df.columns:
        brightness = pd.to_numeric(df["brightness"], errors="coerce")
        out["is_dark"] = (brightness < cuts["dark_below"]).astype(float)
        out["is_bright"] = (brightness > cuts["bright_above"]).astype(float)
    if "blur" in df.columns:
        out["is_blurry"] = (pd.to_numeric(df["blur"], errors="coerce") < cuts["blur_below"]).astype(float)
    if {"phash", "split", "image_id"} <= set(df.columns):
        out["near_dup_in_other_split"] = near_duplicate_partners(
            df["phash"].tolist(),
            df["split"].tolist(),
            df["image_id"].tolist(),
            max_distance=cfg.near_dup_distance,
        )
    return out


_MIN_SPREAD = {"brightness": 0.02, "log_blur": 0.25}
"""Floor of the interquartile range in ``quality_reference: dataset``: a dataset whose images are all
alike (IQR ~ 0) must not call every small difference an outlier (brightness 0..1; blur in log1p units)."""


def quality_cutoffs(df: pd.DataFrame, cfg: ValidateConfig) -> dict[str, float]:
    """The cut-offs of the too_dark / too_bright / blurry checks: ``dark_below``, ``bright_above``,
    ``blur_below``. ``quality_reference: absolute``: the configured numbers; ``dataset``: Tukey fences of
    this dataset's own distribution, ``outlier_iqr`` x IQR beyond the quartiles (blur on a log scale,
    where the Laplacian variance of real photos is roughly symmetric), so a dataset of smooth
    textures is not "blurry" by a number tuned on sharp 28x28 clothing."""
    cuts = _absolute_cutoffs(cfg)
    if cfg.quality_reference == "absolute":
        return cuts
    k = cfg.outlier_iqr
    if "brightness" in df.columns and (b := _finite(df["brightness"])).size:
        q1, q3 = np.quantile(b, [0.25, 0.75])
        spread = max(q3 - q1, _MIN_SPREAD["brightness"])
        cuts["dark_below"], cuts["bright_above"] = float(q1 - k * spread), float(q3 + k * spread)
    if "blur" in df.columns and (v := _finite(df["blur"])).size:
        q1, q3 = np.quantile(np.log1p(np.maximum(v, 0)), [0.25, 0.75])
        cuts["blur_below"] = float(np.expm1(q1 - k * max(q3 - q1, _MIN_SPREAD["log_blur"])))
    return cuts


def _absolute_cutoffs(cfg: ValidateConfig) -> dict[str, float]:
    return {"dark_below": cfg.dark_below, "bright_above": cfg.bright_above, "blur_below": cfg.blur_below}


def _cutoff_origin(cfg: ValidateConfig) -> str:
    if cfg.quality_reference == "absolute":
        return ""
    return f", an outlier of this dataset: beyond {cfg.outlier_iqr:g} x IQR of its own distribution"


def _finite(column: pd.Series) -> np.ndarray:
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    return values[np.isfinite(values)]


def near_duplicate_partners(
    phashes: Sequence[Any], splits: Sequence[Any], image_ids: Sequence[Any], *, max_distance: int
) -> list[str | None]:
    """Per row: the image_id of its closest near-duplicate in another split, or None."""
    valid = np.array([isinstance(h, str) and len(h) == 16 for h in phashes], dtype=bool)
    rows = [int(i) for i in np.flatnonzero(valid)]
    out: list[str | None] = [None] * len(phashes)
    if len(rows) < 2:
        return out
    pairs = near_duplicate_pairs(hex_to_uint64([phashes[i] for i in rows]), max_distance=max_distance)
    split_arr = np.asarray([str(splits[i]) for i in rows])
    row_arr = np.asarray(rows)
    best: dict[int, tuple[int, int]] = {}  # row -> (distance, partner row)
    for i, j, d in pairs[split_arr[pairs[:, 0]] != split_arr[pairs[:, 1]]] if len(pairs) else []:
        a, b = int(row_arr[i]), int(row_arr[j])
        for x, y in ((a, b), (b, a)):
            if x not in best or (int(d), y) < best[x]:
                best[x] = (int(d), y)
    for x, (_, y) in best.items():
        out[x] = str(image_ids[y])
    return out


def label_rows_table(df: pd.DataFrame) -> pd.DataFrame:
    """Multi-label: one row per (image, label) of the ``labels`` sets: image_id, split, label."""
    if "labels" not in df.columns:
        return pd.DataFrame({"image_id": [], "split": [], "label": []}, dtype=object)
    ids = df["image_id"] if "image_id" in df.columns else pd.Series(range(len(df))).astype(str)
    splits = df["split"] if "split" in df.columns else pd.Series([None] * len(df))
    rows = [
        (image_id, split, lab)
        for image_id, split, value in zip(ids, splits, df["labels"], strict=True)
        for lab in label_set(value)
    ]
    return pd.DataFrame(rows, columns=["image_id", "split", "label"], dtype=object)


CARDINALITY_COLUMNS: tuple[str, ...] = ("split", "images", "label_cardinality", "ratio_to_train")


def cardinality_table(df: pd.DataFrame, cfg: ValidateConfig) -> pd.DataFrame:
    """Multi-label: one row per required split (train first): images, ``label_cardinality`` (mean
    labels per image) and ``ratio_to_train`` (the larger of split/train and train/split; null when
    either split is empty or has no labels)."""
    sizes = pd.Series(
        [len(label_set(v)) for v in df["labels"]] if "labels" in df.columns else [], dtype=float
    )
    splits = df["split"].reset_index(drop=True) if "split" in df.columns else pd.Series([], dtype=object)
    usable = len(sizes) > 0 and len(splits) == len(sizes)
    mean = sizes.groupby(splits).mean() if usable else pd.Series(dtype=float)
    count = splits.value_counts()
    reference = mean.get("train")
    order = list(dict.fromkeys(["train", *cfg.required_splits]))
    rows = []
    for split in order:
        m = mean.get(split)
        ok = m is not None and reference is not None and m > 0 and reference > 0
        ratio = max(m / reference, reference / m) if ok else None
        rows.append({"split": split, "images": int(count.get(split, 0)), "label_cardinality": m,
                     "ratio_to_train": ratio})  # fmt: skip
    table = pd.DataFrame(rows, columns=list(CARDINALITY_COLUMNS))
    return table.astype({"images": "int64", "label_cardinality": "float64", "ratio_to_train": "float64"})


def label_summary(
    label_rows: pd.DataFrame, cardinality: pd.DataFrame, classes: Sequence[str]
) -> dict[str, Any]:
    """The report's multi-label summary: cardinality per split (and overall), label counts per split."""
    total_images = int(cardinality["images"].sum())
    card: dict[str, Any] = {
        str(r["split"]): _jsonable(r["label_cardinality"]) for r in cardinality.to_dict("records")
    }
    card["all"] = len(label_rows) / total_images if total_images else None
    counts = label_rows.groupby(["split", "label"]).size() if len(label_rows) else pd.Series(dtype=int)
    per_split = {
        str(split): {c: int(counts.get((split, c), 0)) for c in classes} for split in cardinality["split"]
    }
    return {"task": MULTILABEL, "label_cardinality": card, "label_counts": per_split}


def class_count_table(
    df: pd.DataFrame, classes: Sequence[str], cfg: ValidateConfig, *, task: str | Task = SINGLELABEL
) -> pd.DataFrame:
    """One row per declared class in total (``scope`` total) and per required split (``scope``
    split): ``count``, and ``imbalance`` = largest class count / this count (null when 0).
    Multi-label: counts are label occurrences (an image with two labels counts for both)."""
    if get_task(task).several_labels:
        occurrences = label_rows_table(df)
        labels, splits = occurrences["label"], occurrences["split"]
    else:
        labels = df["label"] if "label" in df.columns else pd.Series([], dtype=object)
        splits = df["split"] if "split" in df.columns else pd.Series([None] * len(df))
    total = labels.value_counts()
    per_split = pd.Series(list(zip(splits, labels, strict=True)), dtype=object).value_counts()
    largest = max((int(total.get(c, 0)) for c in classes), default=0)
    rows = []
    for c in classes:
        n = int(total.get(c, 0))
        rows.append({"scope": "total", "split": "all", "label": c, "count": n,
                     "imbalance": largest / n if n else None})  # fmt: skip
        for split in cfg.required_splits:
            k = int(per_split.get((split, c), 0))
            rows.append({"scope": "split", "split": split, "label": c, "count": k, "imbalance": None})
    table = pd.DataFrame(rows, columns=["scope", "split", "label", "count", "imbalance"])
    return table.astype({"count": "int64", "imbalance": "float64"})


def _run_suite(frames: dict[str, pd.DataFrame], specs: list[_Spec]) -> dict[str, Any]:
    """Build an in-memory GE context, run each table's expectations over its frame, and merge the
    results into one GE-shaped JSON result (``success``, ``statistics``, ``results``)."""
    merged: dict[str, Any] = {"success": True, "results": [], "statistics": {}}
    for table, df in frames.items():
        table_specs = [s for s in specs if s.table == table]
        if not table_specs:
            continue
        result = _run_table(table, df, table_specs)
        merged["success"] = merged["success"] and bool(result.get("success"))
        merged["results"].extend(result.get("results", []))
        for k, v in (result.get("statistics") or {}).items():
            if isinstance(v, int | float) and k != "success_percent":
                merged["statistics"][k] = merged["statistics"].get(k, 0) + v
        merged.setdefault("meta", {})[table] = result.get("meta", {})
    stats = merged["statistics"]
    if stats.get("evaluated_expectations"):
        stats["success_percent"] = (
            100.0 * stats.get("successful_expectations", 0) / stats["evaluated_expectations"]
        )
    return merged


def _run_table(table: str, df: pd.DataFrame, specs: list[_Spec]) -> dict[str, Any]:
    """Run ``specs`` over ``df`` in a fresh in-memory GE context; the JSON result."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    project_config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    ctx = gx.get_context(mode="ephemeral", project_config=project_config)
    batch = (
        ctx.data_sources.add_pandas("imgflow")
        .add_dataframe_asset(table)
        .add_batch_definition_whole_dataframe(f"whole_{table}")
    )
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"imgflow_{table}", expectations=_expectations(specs)))
    definition = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=f"imgflow_{table}", data=batch, suite=suite)
    )
    result_format: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES}
    if "image_id" in df.columns:
        result_format["unexpected_index_column_names"] = ["image_id"]
    result = definition.run(batch_parameters={"dataframe": df}, result_format=result_format)
    # A JSON round trip makes sure the stored result is plain JSON (no numpy scalars).
    return json.loads(json.dumps(result.to_json_dict(), default=str))


def _expectations(specs: list[_Spec]) -> list[Any]:
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    out = []
    for spec in specs:
        kwargs = dict(spec.kwargs)
        if "row_condition" in kwargs:
            column, value = kwargs["row_condition"]
            kwargs["row_condition"] = Column(column) == value
        cls = getattr(gxe, spec.expectation_class)
        out.append(cls(**kwargs, meta={_NAME_KEY: spec.name}))
    return out


def _results_by_name(ge_result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Our outcome name -> that expectation's entry in GE's ``results`` (GE reorders them)."""
    out = {}
    for entry in ge_result.get("results", []):
        meta = (entry.get("expectation_config") or {}).get("meta") or {}
        if _NAME_KEY in meta:
            out[meta[_NAME_KEY]] = entry
    return out


def _outcome(
    spec: _Spec, entry: dict[str, Any] | None, df: pd.DataFrame, severity: str
) -> ExpectationOutcome:
    expectation = _snake_case(spec.expectation_class)
    tags = {"severity": severity, "check": spec.check}
    if entry is None:  # GE dropped it: report rather than pass silently
        return ExpectationOutcome(
            spec.name, expectation, spec.description, False, 0, ({"error": "no result from GE"},), **tags
        )
    error = _exception_message(entry)
    if error is not None:
        return ExpectationOutcome(
            spec.name, expectation, spec.description, False, 0, ({"error": error},), **tags
        )
    count, examples = spec.examples(entry.get("result") or {}, df)
    return ExpectationOutcome(
        severity=severity,
        check=spec.check,
        name=spec.name,
        expectation=expectation,
        description=spec.description,
        success=bool(entry.get("success")),
        unexpected_count=count,
        examples=tuple(examples),
    )


def _exception_message(entry: dict[str, Any]) -> str | None:
    """GE's message when the expectation could not be evaluated (e.g. its column is missing)."""
    info = entry.get("exception_info") or {}
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for nested in info.values():  # keyed by metric id when a metric failed
        if isinstance(nested, dict) and nested.get("raised_exception"):
            return str(nested.get("exception_message"))
    return None


def _snake_case(class_name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in class_name).lstrip("_")


# ---------------------------------------------------------------------------------------------
# Writing the report
# ---------------------------------------------------------------------------------------------


def write_validation_report(
    report: ValidationReport,
    out_dir: Path,
    *,
    extra: Mapping[str, Any] | None = None,
    extra_sections: Sequence[kit.Section | None] = (),
) -> tuple[Path, Path]:
    """Write ``out_dir/report.json`` (``to_dict``, raw GE result included) and ``out_dir/report.html``.

    ``extra``: more top-level JSON entries and ``extra_sections`` more report sections, measured by
    layers this package cannot import (the data-drift test on the champion's embeddings)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    html_path = out_dir / "report.html"
    write_json(json_path, {**report.to_dict(), **(extra or {})})
    write_text_atomic(html_path, render_html(report, extra_sections=extra_sections))
    return json_path, html_path


def render_html(report: ValidationReport, *, extra_sections: Sequence[kit.Section | None] = ()) -> str:
    """A self-contained page (report kit): verdict, then one table row per expectation with example rows."""
    verdict, kind = ("PASSED", "pass") if report.success else ("FAILED", "fail")
    if report.success and report.warnings():
        verdict, kind = f"PASSED with {len(report.warnings())} warning(s)", "warn"
    outcomes, failed = report.outcomes, len(report.failed())
    summary = (
        f"{report.n_rows} rows; {len(outcomes) - failed} of {len(outcomes)} expectations met, {failed} failed "
        f"({len(report.warnings())} of them warnings only)."
    )
    table = kit.table(
        ["Expectation", "Expected", "Status", "Unexpected", "Examples"],
        [_html_row(o) for o in outcomes],
        row_classes=[_ROW_KINDS[_status(o)] for o in outcomes],
    )
    return kit.page(
        f"Manifest validation: {verdict}",
        heading="Manifest validation",
        top=[kit.verdict_banner(verdict, kind), kit.paragraph(summary)],
        sections=[_html_label_summary(report.summary), kit.section("Expectations", table), *extra_sections],
    )


def _html_label_summary(summary: dict[str, Any]) -> kit.Section | None:
    """Multi-label: label cardinality and per-label counts, one column per split."""
    if not summary:
        return None
    card = summary.get("label_cardinality", {})
    counts = summary.get("label_counts", {})
    splits = list(counts)
    labels = list(dict.fromkeys(lab for per in counts.values() for lab in per))
    rows = [
        [kit.Html("<b>labels per image</b>"), *[_cell(_rounded(card.get(s))) for s in splits]],
        *[[lab, *[counts[s].get(lab, 0) for s in splits]] for lab in labels],
    ]
    return kit.section(
        "Labels (multi-label)",
        kit.paragraph(f"Mean labels per image over all splits: {_cell(_rounded(card.get('all')))}."),
        kit.table(["", *splits], rows),
    )


def _rounded(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


# status -> (badge colour, row tint)
_STATUS_KINDS = {"PASSED": "pass", "WARNING": "warn", "FAILED": "fail"}
_ROW_KINDS = {"PASSED": None, "WARNING": "warn", "FAILED": "fail"}


def _status(o: ExpectationOutcome) -> str:
    return "PASSED" if o.success else ("WARNING" if o.severity == "warn" else "FAILED")


def _html_row(o: ExpectationOutcome) -> list[object]:
    name = kit.join([kit.Html("<b>"), o.name, kit.Html("</b><br>"), kit.code(o.expectation),
                     kit.Html("<br>"), f"check {o.check} ({o.severity})"])  # fmt: skip
    status = _status(o)
    return [name, o.description, kit.badge(status, _STATUS_KINDS[status]), o.unexpected_count,
            _html_examples(o.examples)]  # fmt: skip


def _html_examples(examples: tuple[dict[str, Any], ...]) -> kit.Html:
    if not examples:
        return kit.Html("")
    keys = list(dict.fromkeys(k for ex in examples for k in ex))
    return kit.table(keys, [[_cell(ex.get(k)) for k in keys] for ex in examples], compact=True)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)
