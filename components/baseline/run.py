"""The baseline stage's work: embed the images once, score CLIP zero-shot and a linear probe on
``baseline.eval_split``, and find the images whose label CLIP confidently contradicts.

Everything that differs between single- and multi-label data comes from the :class:`Task`: the
targets (:meth:`Task.encode`), the probabilities (softmax / one sigmoid per label), the decision
rule fitted on val (none / per-label thresholds, best F1; :attr:`Task.fits_decision` says whether
val is needed for it even without a probe), the metric set (:meth:`Task.metrics`), and through
its activation the probe (:mod:`components.baseline.probes`) and the disagreement rule
(:mod:`components.baseline.disagreements`).

The record (baseline.json, see :mod:`components.baseline.records`) holds status, model, weights,
prompts, embedding counts, ``zero_shot`` / ``linear_probe`` metric dicts, the probe's C and
validation score (``linear_probe_val_accuracy`` / ``linear_probe_val_map``), and for a task with
a fitted decision ``threshold_split``, ``threshold_images`` and ``<kind>_thresholds`` (label ->
threshold); multi-label records say ``task: multilabel`` and carry the disagreements'
``zero_shot_calibration``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from components.baseline.clip_model import ClipEncoder, build_text_classifier, embed_images
from components.baseline.disagreements import clip_disagreements
from components.baseline.embeddings import EmbeddingCache
from components.baseline.probes import fit_linear_probe, probe_gap
from components.baseline.prompts import class_prompts, resolve_templates
from components.baseline.zero_shot import scoring_formula, zero_shot_logits
from components.task import SINGLELABEL, Task, get_task

if TYPE_CHECKING:
    from components.core.config import BaselineConfig

logger = logging.getLogger(__name__)


def run_baselines(
    encoder: ClipEncoder,
    manifest: pd.DataFrame,
    classes: Sequence[str],
    *,
    data_dir: Path,
    cache: EmbeddingCache | None,
    cfg: BaselineConfig,
    task: Task | str = SINGLELABEL,
    encode: Callable[[list[Path]], np.ndarray] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Zero-shot and linear-probe metrics on ``cfg.eval_split``, and the disagreement table.
    ``encode``: image features computed elsewhere (:func:`embed_images`), e.g. on Ray Data.

    Returns (the record written as baseline.json, the disagreements with
    :func:`components.baseline.disagreements.disagreement_columns`).
    """
    task = get_task(task)
    rows = _rows(manifest, cfg, task)
    feats, encoded = embed_images(
        encoder,
        rows["image_id"].tolist(),
        [data_dir / p for p in rows["path"]],
        cache=cache,
        batch_size=cfg.batch_size,
        workers=cfg.loader_workers,
        encode=encode,
    )
    y = task.encode([_label_list(v) for v in rows["labels"]], classes)
    prompts = class_prompts(
        classes, resolve_templates(cfg.templates), names=cfg.class_names, overrides=cfg.class_prompts
    )
    logits = zero_shot_logits(feats, build_text_classifier(encoder, prompts), encoder.logit_scale)
    role = rows["_role"].to_numpy()
    record = task.tagged({"status": "ok", "reason": ""}) | {
        "model": encoder.model_name,
        "pretrained": encoder.weights,
        "embedding_key": encoder.key,
        "logit_scale": encoder.logit_scale,
        "zero_shot_scoring": scoring_formula(task),
        "templates": cfg.templates,
        "prompts_per_class": {c: len(p) for c, p in zip(classes, prompts, strict=True)},
        "example_prompt": {c: p[0] for c, p in zip(classes, prompts, strict=True)},
        "eval_split": cfg.eval_split,
        "embeddings": {
            "images": len(rows),
            "encoded": encoded,
            "cached": rows["image_id"].nunique() - encoded,
        },
    }
    if task.fits_decision:
        record |= {"threshold_split": "val", "threshold_images": int((role == "val").sum())}
    record |= _scored("zero_shot", task, y, task.probabilities(logits), role, classes)
    record |= {"linear_probe": None, "linear_probe_C": None}
    if cfg.probe:
        record |= _probe(task, feats, y, role, classes, C=cfg.probe_C)
    disagreements, extra = clip_disagreements(
        task, rows, y, logits, fit_on=role == "val", classes=classes,
        min_confidence=cfg.disagreement_min_confidence,
    )  # fmt: skip
    record |= extra
    record["disagreements"] = len(disagreements)
    return record, disagreements


def _rows(manifest: pd.DataFrame, cfg: BaselineConfig, task: Task) -> pd.DataFrame:
    """The manifest rows to embed, each with its ``_role``: ``eval`` (``cfg.eval_split``), ``train``
    (the probe's) and ``val`` (the probe's C, and the task's decision rule)."""
    from components.data.datasets import split_rows

    parts = [_sample(split_rows(manifest, cfg.eval_split), cfg.eval_max_per_class).assign(_role="eval")]
    roles = [*(("train",) if cfg.probe else ()), *(("val",) if cfg.probe or task.fits_decision else ())]
    parts += [
        _sample(manifest[manifest["split"] == r], cfg.probe_max_per_class).assign(_role=r) for r in roles
    ]
    return pd.concat(parts, ignore_index=True)


def _sample(rows: pd.DataFrame, max_per_class: int | None) -> pd.DataFrame:
    """The first ``max_per_class`` rows of each label (manifest order: by image_id, i.e. a hash)."""
    if max_per_class is None:
        return rows
    return rows.groupby("label", sort=False).head(max_per_class)


def _label_list(value: Any) -> list[str]:
    """A manifest ``labels`` cell (list, or numpy array from parquet) as a list of str."""
    return [] if value is None else [str(v) for v in value]


def _scored(
    kind: str, task: Task, y: np.ndarray, probs: np.ndarray, role: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """``{kind: the task's metrics on the eval rows}`` with the decision rule fitted on the val rows
    (plus ``<kind>_thresholds`` when that rule has thresholds). probs: (N, K) for every row."""
    val, ev = role == "val", role == "eval"
    thresholds = task.fit_decision(y[val], probs[val], classes).thresholds
    out: dict[str, Any] = {kind: task.metrics(y[ev], probs[ev], classes, thresholds=thresholds)}
    if thresholds is not None:
        out[f"{kind}_thresholds"] = dict(zip(classes, thresholds, strict=True))
    return out


def _probe(
    task: Task, feats: np.ndarray, y: np.ndarray, role: np.ndarray, classes: Sequence[str], *, C: float | None
) -> dict[str, Any]:
    train, val = role == "train", role == "val"
    if reason := probe_gap(task, y[train]):
        logger.warning("linear probe skipped: %s", reason)
        return {"linear_probe_skipped": reason}
    probe = fit_linear_probe(task, feats[train], y[train], len(classes), x_val=feats[val], y_val=y[val], C=C)
    return _scored("linear_probe", task, y, probe.predict_proba(feats), role, classes) | {
        "linear_probe_C": probe.C,
        f"linear_probe_val_{task.headline.lower()}": probe.val_score,
        "linear_probe_train_images": int(train.sum()),
    }
