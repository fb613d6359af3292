"""Label-quality audit: suspected label errors (cleanlab), near-duplicate sets and outliers.

The only cleanlab and faiss adapter. :func:`audit` takes manifest rows and returns one row per
issue found (:data:`ISSUE_COLUMNS`):

- ``label_error``: out-of-sample predicted probabilities from cheap models on learned features go
  through cleanlab's confident learning (``cleanlab.filter.find_label_issues``) and are ranked by
  cleanlab's label quality score (self-confidence); each suspect gets the suggested label (the
  most probable class). The probabilities are the mean of a logistic regression's out-of-fold
  predictions (stratified k-fold) and a leave-one-out k-nearest-neighbour vote (each image's
  neighbours never include itself).
- ``near_duplicate``: sets of images whose perceptual hashes are within a few bits (multi-index
  hash search, :func:`components.data.image_stats.near_duplicate_pairs`) or whose features are almost
  identical (the kNN graph below), grouped into connected sets.
- ``outlier``: mean distance to the k nearest neighbours in feature space (an approximate faiss
  IVF index: no all-pairs distance matrix), above a quantile.

Multi-label data (``task="multilabel"``: each image's ``labels`` set): the probabilities are
per-label (one-vs-rest logistic regressions, k-fold out-of-fold, averaged with the kNN vote of the
neighbours' label sets), and cleanlab's multi-label filter
(``cleanlab.filter.find_label_issues(..., multi_label=True)``) flags the images whose set looks
wrong, ranked by cleanlab's multi-label label quality score (per-label self-confidence, aggregated
by an exponential moving average over the worst labels). Per-label filtering
(``cleanlab.multilabel_classification.filter.find_multilabel_issues_per_class``) tells which labels
look wrong: ``extra_labels`` (given but likely absent) and ``missing_labels`` (likely present but
not given); ``label`` and ``suggested_label`` are the given and suggested sets, ``|``-joined.

Why PCA + logistic regression + kNN: the audit must cover 70k images in minutes on 2 CPU cores,
before any model is trained. PCA of the grey pixels is a learned (unsupervised) linear feature
space (32 components keep most of Fashion-MNIST's variance); the linear model and the kNN vote
make different mistakes, and their mean ranked 84-86% of 300 flipped labels among 3,000 real
Fashion-MNIST images into the top 300 (each alone: 74-84%), measured over three seeds. Confident
learning needs probabilities that put a wrong label far below the right one far more than it
needs a top model. A pretrained CNN would give better features at ~100x the CPU cost.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from components.core import report as kit
from components.core.config import AuditConfig
from components.core.errors import ConfigError, DataError
from components.core.jsonio import atomic_path, write_text_atomic
from components.core.progress import progress_bar
from components.data.grey_cache import GREY_FILE, grey_rows
from components.data.image_stats import (
    displayed,
    duplicate_sets,
    grey_pixels,
    hex_to_uint64,
    near_duplicate_pairs,
)
from components.quality.encoders import (
    MODEL,
    PRETRAINED,
    AuditFeatures,
    noise_estimate,
    queue_summary,
)
from components.task import MULTILABEL, SINGLELABEL, Task, get_task

logger = logging.getLogger(__name__)

ISSUE_TYPES: tuple[str, ...] = ("label_error", "near_duplicate", "outlier")
"""What :func:`audit` finds (and owns in the ledger)."""
CLIP_DISAGREEMENT = "clip_disagreement"
"""One more ledger signal, recorded by the CLIP baseline stage: see :func:`clip_disagreement_issues`."""
ISSUE_COLUMNS: tuple[str, ...] = (
    "image_id", "issue", "split", "label", "suggested_label", "score", "rank", "group", "path",
    "missing_labels", "extra_labels",
)  # fmt: skip
"""``score``: label quality (0..1, low = likely wrong) for label errors, the kNN distance for
outliers, the set size for near-duplicates; ``rank``: 1 = worst within the issue type;
``group``: the near-duplicate set's id (its smallest image_id), else empty. Multi-label data:
``label`` / ``suggested_label`` are ``|``-joined label sets, ``missing_labels`` / ``extra_labels``
(``|``-joined, else empty) the labels suspected absent from / wrongly in the given set."""
LABEL_SEPARATOR = "|"


@dataclass(frozen=True)
class AuditResult:
    issues: pd.DataFrame
    """One row per (image_id, issue), columns :data:`ISSUE_COLUMNS`, sorted by issue then rank."""
    summary: dict[str, Any]
    """Counts per issue type, audited rows, out-of-fold accuracy, seconds per step."""


# --------------------------------------------------------------------------------------------
# Features


def load_grey(paths: Sequence[Path], *, side: int, width: int | None = None, workers: int = 4) -> np.ndarray:
    """(N, side * width) float32 in 0..1: each image as displayed, grey, resized to side (rows) x
    width (columns; default ``side``).

    Decoded in chunks of :data:`_CHUNK` files per thread task (one future per file cost more than the
    decoding of a 28 px PNG, measured: 2x the CPU of a plain loop), in the calling thread when ``workers``
    is 1 (:func:`decode_workers`); a grey file is read as it is."""
    width = side if width is None else width

    def one(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            im.load()
            shown = displayed(im)
            if shown.mode == "L":
                grey = shown
            else:
                grey = Image.fromarray(np.rint(grey_pixels(shown)).astype(np.uint8), mode="L")
            if grey.size != (width, side):
                grey = grey.resize((width, side), Image.Resampling.BILINEAR)
            return np.asarray(grey, dtype=np.uint8).reshape(-1)

    def chunk(start: int) -> np.ndarray:
        return np.stack([one(p) for p in paths[start : start + _CHUNK]])

    out = np.empty((len(paths), side * width), dtype=np.uint8)
    with (
        # decoding releases the GIL; one worker: the calling thread (decode_workers: small images)
        ThreadPoolExecutor(max_workers=workers) if workers > 1 else nullcontext() as pool,
        progress_bar(len(paths), description="audit: reading images") as advance,  # when a person watches
    ):
        starts = range(0, len(paths), _CHUNK)
        for start, arr in zip(
            starts, map(chunk, starts) if pool is None else pool.map(chunk, starts), strict=True
        ):
            out[start : start + len(arr)] = arr
            advance(len(arr))
    return out.astype(np.float32) / 255.0


_CHUNK = 512
"""Files per thread task of :func:`load_grey`."""


def resolve_features(features: str, task: str | Task) -> str:
    """``auto`` -> ``patches`` for multi-label data (objects anywhere in the image), else ``pca``."""
    if features != "auto":
        return features
    return get_task(task).audit_features


def learn_features(pixels: np.ndarray, *, cfg: AuditConfig, kind: str | None = None) -> np.ndarray:
    """pixels (N, D) -> (N, F) float32: whitened PCA (``pca``) or the pixels themselves (``pixels``).
    kind: the resolved feature kind (default ``cfg.features``; ``auto`` means ``pca`` here)."""
    kind = resolve_features(cfg.features, SINGLELABEL) if kind is None else kind
    if kind == "pixels":
        return pixels - pixels.mean(axis=0, keepdims=True)
    from sklearn.decomposition import PCA

    k = min(cfg.pca_components, pixels.shape[0] - 1, pixels.shape[1])
    # auto: the exact PCA from the D x D covariance where samples outnumber pixels 10x and D <= 1000
    # (70k x 784: 0.4 s against 1.9-2.4 s for the randomized SVD, which it used before), the randomized
    # SVD for wider images (image_side 64: 4,096 pixels, where the covariance route is 3x slower)
    pca = PCA(n_components=k, whiten=True, svd_solver="auto", random_state=cfg.seed)
    return pca.fit_transform(pixels).astype(np.float32)


def patch_features(pixels: np.ndarray, *, height: int, cfg: AuditConfig) -> np.ndarray:
    """pixels (N, height * W) grey 0..1 -> (N, 2 * cfg.patch_dictionary) float32, standardised.

    A single-layer patch-dictionary network (Coates, Lee & Ng 2011): k-means centroids of
    contrast-normalised ``patch_size``-square patches (a sample of them) are the filters; each
    image's response to a centroid is the cosine of every contrast-normalised patch with it, shifted
    by 0.25 and rectified, then max- and mean-pooled over the whole image. Global pooling makes the
    features translation invariant: a multi-label image's objects may sit anywhere, which PCA of
    aligned pixels cannot follow (on two-item Fashion-MNIST canvases: out-of-fold mAP ~0.7 vs ~0.4).
    """
    import torch
    import torch.nn.functional as F
    from sklearn.cluster import MiniBatchKMeans

    k, n_dict = cfg.patch_size, cfg.patch_dictionary
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).view(len(pixels), 1, height, -1)
    if min(x.shape[2:]) < k:
        raise DataError(
            f"audit.image_side {height} is smaller than audit.patch_size {k}: raise it or use pca"
        )
    rng = np.random.default_rng(cfg.seed)
    sample = x[np.sort(rng.choice(len(x), size=min(len(x), 1000), replace=False))]
    patches = F.unfold(sample, k).transpose(1, 2).reshape(-1, k * k).numpy()
    patches = patches[rng.choice(len(patches), size=min(len(patches), 20_000), replace=False)]
    patches = patches[patches.std(axis=1) > 0.05]  # flat background says nothing
    if len(patches) < n_dict:
        raise DataError(
            f"too few textured {k}x{k} patches ({len(patches)}) for {n_dict} patch features: use pca"
        )
    patches = (patches - patches.mean(axis=1, keepdims=True)) / (patches.std(axis=1, keepdims=True) + 0.1)
    km = MiniBatchKMeans(n_dict, random_state=cfg.seed, n_init=1, batch_size=2048).fit(patches)
    centres = km.cluster_centers_ / (np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True) + 1e-6)
    weight = torch.from_numpy(centres.astype(np.float32)).view(n_dict, 1, k, k)
    out = []
    with torch.inference_mode():
        for chunk in x.split(512):
            mean = F.avg_pool2d(chunk, k, stride=1)
            var = (F.avg_pool2d(chunk * chunk, k, stride=1) - mean * mean).clamp_min(0)
            resp = F.conv2d(chunk, weight) - mean * weight.sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
            act = torch.relu(resp / (torch.sqrt(var * k * k) + 0.1 * k) - 0.25)
            out.append(torch.cat([act.amax(dim=(2, 3)), act.mean(dim=(2, 3))], dim=1))
    feats = torch.cat(out).numpy()
    return ((feats - feats.mean(axis=0)) / (feats.std(axis=0) + 1e-6)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Label errors


def out_of_fold_probs(features: np.ndarray, labels: np.ndarray, *, cfg: AuditConfig) -> np.ndarray:
    """(N, K) predicted probabilities, each row from a model that never saw that row.

    labels: (N,) int in 0..K-1. Stratified k-fold (k = ``cfg.folds``, fewer when a class is
    smaller); a fold that lacks a class gives it probability ~0 there.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    n_classes = int(labels.max()) + 1
    smallest = int(np.bincount(labels, minlength=n_classes).min())
    folds = max(2, min(cfg.folds, smallest)) if smallest >= 2 else 2
    probs = np.zeros((len(labels), n_classes), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=cfg.seed)
    import warnings

    def fold(split: tuple[np.ndarray, np.ndarray]) -> None:
        train_idx, held_idx = split
        model = LogisticRegression(max_iter=cfg.max_iter, C=1.0)
        model.fit(features[train_idx], labels[train_idx])
        probs[np.ix_(held_idx, model.classes_)] = model.predict_proba(features[held_idx])

    # one BLAS thread per fit: on a busy 2-core box a multi-threaded BLAS made these small fits 30x slower
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore")  # convergence / tiny-class warnings: the probabilities still rank
        _each_fold(fold, list(splitter.split(features, labels)))
    probs = np.clip(probs, 1e-6, None)
    return probs / probs.sum(axis=1, keepdims=True)


def out_of_fold_probs_multilabel(features: np.ndarray, y: np.ndarray, *, cfg: AuditConfig) -> np.ndarray:
    """(N, K) per-label probabilities (rows need not sum to 1), each row from models that never saw it.

    y: (N, K) 0/1 indicator. k-fold (k = ``cfg.folds``), one logistic regression per label and fold
    (one-vs-rest); a label that is constant in a fold's training part gets that constant there.
    """
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from threadpoolctl import threadpool_limits

    folds = max(2, min(cfg.folds, len(y)))
    probs = np.zeros(y.shape, dtype=np.float64)
    splitter = KFold(n_splits=folds, shuffle=True, random_state=cfg.seed)

    def fold(split: tuple[np.ndarray, np.ndarray]) -> None:
        train_idx, held_idx = split
        for k in range(y.shape[1]):
            target = y[train_idx, k]
            if target.min() == target.max():
                probs[held_idx, k] = float(target[0])
                continue
            model = LogisticRegression(max_iter=cfg.max_iter, C=1.0)
            model.fit(features[train_idx], target)
            probs[held_idx, k] = model.predict_proba(features[held_idx])[:, 1]

    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore")  # convergence warnings: the probabilities still rank
        _each_fold(fold, list(splitter.split(features)))
    return np.clip(probs, 1e-6, 1 - 1e-6)


def _each_fold(
    fit: Callable[[tuple[np.ndarray, np.ndarray]], None], splits: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    """Run ``fit`` on every (train, held-out) split, as many side by side as there are CPUs (at most
    the folds): each writes its own held-out rows, so the result is the sequential one. lbfgs spends
    most of its time in numpy and scipy calls that release the GIL: the 5 folds of a 60k-image audit
    took 1.5-1.65x less wall time on 2 cores, one BLAS thread each (32 and 128 features)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(len(splits), cpus)
    if workers <= 1:
        for split in splits:
            fit(split)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fit, splits))  # re-raises a fold's error


def knn_probs_multilabel(dist: np.ndarray, idx: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Leave-one-out kNN vote per label, weighted by 1 / distance: (N, K), the weighted share of
    neighbours that carry each label (the label prevalence where a row has no neighbours)."""
    valid = idx >= 0
    weights = np.where(valid, 1.0 / (dist.astype(np.float64) + 1e-6), 0.0)  # (N, k)
    votes = np.einsum("nk,nkc->nc", weights, y[np.where(valid, idx, 0)].astype(np.float64))
    total = weights.sum(axis=1, keepdims=True)
    prior = np.broadcast_to(y.mean(axis=0, keepdims=True), votes.shape)
    return np.clip(np.where(total > 0, votes / np.where(total > 0, total, 1), prior), 1e-6, 1 - 1e-6)


def multilabel_label_issues(
    label_lists: list[list[int]], probs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cleanlab's multi-label filter on out-of-fold per-label probabilities (N, K): (ranked indices
    of images whose label set looks wrong, worst first; label quality score (N,) in 0..1; per-label
    issue mask (N, K) bool: the label's presence/absence in the given set looks wrong)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.multilabel_classification.filter import find_multilabel_issues_per_class
    from cleanlab.multilabel_classification.rank import get_label_quality_scores

    quality = get_label_quality_scores(label_lists, probs, method="self_confidence")
    ranked = find_label_issues(
        label_lists, probs, multi_label=True, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    per_label = find_multilabel_issues_per_class(label_lists, probs, n_jobs=1)
    return (
        np.asarray(ranked, dtype=np.int64),
        np.asarray(quality, dtype=np.float64),
        np.asarray(per_label, dtype=bool),
    )


def label_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab on out-of-fold probabilities: (ranked indices of suspected label errors, worst
    first; label quality score (N,) in 0..1, cleanlab's self-confidence)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    return np.asarray(ranked, dtype=np.int64), np.asarray(quality, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Neighbours: outliers and feature-space duplicates


def knn(features: np.ndarray, *, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k nearest neighbours of every row (itself excluded): distances (N, k) float32
    (Euclidean), indices (N, k) int64 (-1 where fewer than k exist).

    A faiss inverted-file index (~sqrt(N) k-means cells, 8 probed): each query scans a few cells,
    not all N rows. Below 2,000 rows an exact flat index is as fast.
    """
    import faiss

    x = np.ascontiguousarray(features, dtype=np.float32)
    n, d = x.shape
    k_eff = min(k + 1, n)
    if n < 2000:
        index: Any = faiss.IndexFlatL2(d)
    else:
        cells = int(min(4 * np.sqrt(n), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, cells)
        sample = np.random.default_rng(seed).choice(n, size=min(n, cells * 64), replace=False)
        index.train(x[np.sort(sample)])
        index.nprobe = 8
    index.add(x)
    dist, idx = index.search(x, k_eff)
    # drop each row's own entry (normally first; with exact duplicates it may be elsewhere)
    other = (idx != np.arange(n)[:, None]) & (idx >= 0)
    order = np.argsort(~other, axis=1, kind="stable")[:, :k]  # kept entries first, in distance order
    out_i = np.take_along_axis(idx, order, axis=1).astype(np.int64)
    out_d = np.sqrt(np.maximum(np.take_along_axis(dist, order, axis=1), 0)).astype(np.float32)
    valid = np.take_along_axis(other, order, axis=1)
    out_i[~valid], out_d[~valid] = -1, np.inf
    return out_d, out_i


def knn_probs(dist: np.ndarray, idx: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Leave-one-out kNN vote, weighted by 1 / distance: (N, K) probabilities."""
    valid = idx >= 0
    weights = np.where(valid, 1.0 / (dist.astype(np.float64) + 1e-6), 0.0)
    rows = np.repeat(np.arange(len(idx)), idx.shape[1])
    votes = np.zeros((len(idx), n_classes), dtype=np.float64)
    np.add.at(votes, (rows, labels[np.where(valid, idx, 0)].ravel()), weights.ravel())
    total = votes.sum(axis=1, keepdims=True)
    return np.where(total > 0, votes / np.where(total > 0, total, 1), 1.0 / n_classes)


def outlier_scores(dist: np.ndarray) -> np.ndarray:
    """Mean distance to the k nearest neighbours (missing neighbours ignored): (N,)."""
    finite = np.where(np.isfinite(dist), dist, np.nan)
    return np.nan_to_num(np.nanmean(finite, axis=1), nan=0.0)


def embedding_duplicate_pairs(dist: np.ndarray, idx: np.ndarray, *, ratio: float) -> np.ndarray:
    """Neighbour pairs closer than ``ratio`` x the median nearest-neighbour distance: (P, 2), i < j."""
    if ratio <= 0 or dist.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    threshold = ratio * float(np.median(dist[:, 0][np.isfinite(dist[:, 0])]))
    rows, cols = np.nonzero((dist <= threshold) & (idx >= 0))
    a, b = rows, idx[rows, cols]
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


# --------------------------------------------------------------------------------------------
# The audit


def audit(
    rows: pd.DataFrame,
    *,
    data_dir: Path,
    classes: Sequence[str],
    cfg: AuditConfig,
    progress: bool = False,
    task: str | Task = SINGLELABEL,
    encoded: AuditFeatures | None = None,
    features_reason: str | None = None,
) -> AuditResult:
    """Audit manifest ``rows`` (columns image_id, path, label, split, phash; ``labels`` for
    ``task="multilabel"``); see the module doc. encoded: features computed elsewhere (a trained
    model's or a pretrained backbone's, :mod:`components.quality.encoders`), used instead of the
    cheap ones; features_reason: why the cheap ones were used (recorded in the summary)."""
    rows = rows[rows["split"].isin(cfg.splits)].reset_index(drop=True)
    if len(rows) < 2:
        raise DataError(f"the audit needs at least 2 images in splits {list(cfg.splits)}, got {len(rows)}")
    task = get_task(task)
    sets = task.manifest_label_sets(rows)
    rows = rows.assign(label=[LABEL_SEPARATOR.join(s) for s in sets])  # issue rows show the whole set
    timings: dict[str, float] = {}
    t = time.perf_counter()
    kind = resolve_features(cfg.features, task)
    if encoded is not None:
        features, kind = encoded.for_rows(rows["image_id"].tolist()), encoded.source
    elif kind in (MODEL, PRETRAINED):
        raise ConfigError(
            f"audit.features={kind}: the pipeline computes these features (run `imgflow audit`)"
        )
    else:
        features = _features(rows, data_dir, kind, cfg)
    timings["features_s"] = time.perf_counter() - t

    t = time.perf_counter()
    dist, idx = knn(features, k=min(cfg.knn, len(rows) - 1), seed=cfg.seed)
    frames = [_outlier_rows(rows, outlier_scores(dist), cfg.outlier_quantile)]
    timings["neighbours_s"] = time.perf_counter() - t

    t = time.perf_counter()
    errors, fit = _LABEL_ERRORS[task.activation](rows, sets, features, dist, idx, classes, cfg)
    if errors is not None:
        frames.append(errors)
    if encoded is not None and encoded.source == MODEL:
        fit = _not_a_cheap_baseline(fit)
    timings["label_errors_s"] = time.perf_counter() - t

    t = time.perf_counter()
    pairs = near_duplicate_pairs(hex_to_uint64(rows["phash"].tolist()), max_distance=cfg.near_dup_distance)[
        :, :2
    ]
    pairs = np.concatenate([pairs, embedding_duplicate_pairs(dist, idx, ratio=cfg.embedding_dup_ratio)])
    frames.append(_duplicate_rows(rows, duplicate_sets(len(rows), pairs)))
    timings["near_duplicates_s"] = time.perf_counter() - t

    issues = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(ISSUE_COLUMNS))
    issues = (
        issues.loc[:, list(ISSUE_COLUMNS)]
        .sort_values(["issue", "rank"], kind="stable")
        .reset_index(drop=True)
    )
    counts = issues["issue"].value_counts()
    occurrences = pd.Series([c for s in sets for c in s], dtype=object)
    summary = {
        "audited": len(rows),
        "splits": list(cfg.splits),
        "issues": {t: int(counts.get(t, 0)) for t in ISSUE_TYPES},
        "label_error_rate": int(counts.get("label_error", 0)) / len(rows),
        "class_counts": {
            c: int(n) for c, n in occurrences.value_counts().reindex(list(classes), fill_value=0).items()
        },
        **fit,
        "folds": cfg.folds,
        "features": kind
        + {"pca": str(cfg.pca_components), "patches": str(cfg.patch_dictionary)}.get(kind, ""),
        "features_from": encoded.name if encoded is not None else _cheap_features_name(kind, cfg),
        "features_reason": encoded.reason if encoded is not None else (features_reason or "asked for"),
        **queue_summary(issues, size=cfg.queue_size),
        **{k: round(v, 3) for k, v in timings.items()},
    }
    logger.info(
        "audit of %d images: %s (out-of-fold accuracy %s, mAP %s)",
        len(rows),
        summary["issues"],
        fit.get("oof_accuracy"),
        fit.get("oof_map"),
    )
    return AuditResult(issues=issues, summary=summary)


ON_MODEL_FEATURES = "_on_model_features"


def _not_a_cheap_baseline(fit: dict[str, Any]) -> dict[str, Any]:
    """On a trained model's features the audit's out-of-fold score is no cheap baseline: that model
    learnt these very labels (its train split included), so the score sits at the model's own level.
    ``gates.min_accuracy: auto`` reads ``oof_accuracy`` as the cheap classifier to beat; here it is
    None and the score is kept as ``oof_accuracy_on_model_features`` (likewise ``oof_map``)."""
    out = dict(fit)
    for key in ("oof_accuracy", "oof_map"):
        if out.get(key) is not None:
            out[f"{key}{ON_MODEL_FEATURES}"], out[key] = out[key], None
    return out


def _cheap_features_name(kind: str, cfg: AuditConfig) -> str:
    """The cheap features in words, for the summary and the report."""
    side = f"{cfg.image_side} px grey"
    return {
        "pca": f"PCA ({cfg.pca_components} components) of the {side} pixels",
        "pixels": f"the {side} pixels",
        "patches": f"a {cfg.patch_dictionary}-centroid {cfg.patch_size}x{cfg.patch_size} patch dictionary on {side}",
    }.get(kind, kind)


def _features(rows: pd.DataFrame, data_dir: Path, kind: str, cfg: AuditConfig) -> np.ndarray:
    """(N, F) features of ``kind`` (pca / pixels: square images; patches: the median aspect kept)."""
    if kind != "patches":
        return learn_features(read_grey(rows, data_dir, side=cfg.image_side), cfg=cfg, kind=kind)
    aspect = pd.to_numeric(rows.get("aspect"), errors="coerce").median() if "aspect" in rows else np.nan
    width = max(cfg.patch_size, round(cfg.image_side * (float(aspect) if aspect == aspect else 1.0)))
    return patch_features(
        read_grey(rows, data_dir, side=cfg.image_side, width=width), height=cfg.image_side, cfg=cfg
    )


def read_grey(rows: pd.DataFrame, data_dir: Path, *, side: int, width: int | None = None) -> np.ndarray:
    """:func:`load_grey` of the rows' files, taken from the grey pixels ingest saved when it holds them
    at this size (:mod:`components.data.grey_cache`: the same values, without decoding the files again)."""
    width = side if width is None else width
    held = grey_rows(data_dir, list(rows["image_id"]), shape=(side, width)) if "image_id" in rows else None
    if held is not None:
        logger.info("audit: %d images' pixels from %s", len(held), GREY_FILE)
        return held.reshape(len(held), -1).astype(np.float32) / 255.0
    paths = [Path(data_dir) / p for p in rows["path"]]
    return load_grey(paths, side=side, width=width, workers=decode_workers(rows))


THREADED_DECODE_PIXELS = 128 * 128
"""Images of at least this many pixels (the manifest's median) are decoded by 4 threads, smaller ones in
the calling thread. Decoding releases the GIL, but for small images the per-image Python work between
decodes dominates and threads only contend for the GIL. Measured on 2 cores, µs per image with 1 / 2 / 4
threads (PNG unless named): 28 px 122-157 / 220-233 / 272-294, 64 px 222-247 / 258-307 / 388-422, 96 px
265-299 / 290-312 / 325-374, 128 px 295 / 227-230 / 274-278, 256 px JPEG 737-854 / 632-659 / 594-612."""


def decode_workers(rows: pd.DataFrame) -> int:
    """Threads :func:`load_grey` should decode ``rows`` (manifest rows) with: 1 for small images, else 4."""
    if not {"width", "height"} <= set(rows.columns) or rows.empty:
        return 4
    pixels = (
        pd.to_numeric(rows["width"], errors="coerce") * pd.to_numeric(rows["height"], errors="coerce")
    ).median()
    return 4 if math.isnan(pixels) or pixels >= THREADED_DECODE_PIXELS else 1


def _single_label_errors(
    rows: pd.DataFrame,
    sets: list[list[str]],
    features: np.ndarray,
    dist: np.ndarray,
    idx: np.ndarray,
    classes: Sequence[str],
    cfg: AuditConfig,
) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """(label-error rows or None when fewer than 2 classes have images, {oof_accuracy})."""
    present = [c for c in classes if c in set(rows["label"])]
    index_of = {c: i for i, c in enumerate(present)}
    labels = rows["label"].map(index_of).to_numpy(dtype=np.int64)
    if len(present) < 2:
        return None, {"oof_accuracy": None}
    probs = (out_of_fold_probs(features, labels, cfg=cfg) + knn_probs(dist, idx, labels, len(present))) / 2
    ranked, quality = label_issues(labels, probs)
    oof_accuracy = float((probs.argmax(axis=1) == labels).mean())
    return _label_error_rows(rows, ranked, quality, probs.argmax(axis=1), present), {
        "oof_accuracy": oof_accuracy,
        **noise_estimate(labels, probs),
    }


def _multilabel_errors(
    rows: pd.DataFrame,
    sets: list[list[str]],
    features: np.ndarray,
    dist: np.ndarray,
    idx: np.ndarray,
    classes: Sequence[str],
    cfg: AuditConfig,
) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """(label-error rows naming the suspected missing / extra labels, or None when fewer than 2
    labels occur; {task, oof_accuracy: None, oof_map (mean out-of-fold AP over the labels),
    label_cardinality, suspected_missing, suspected_extra (label counts over the flagged images)})."""
    task = get_task(MULTILABEL)
    occurring = {c for s in sets for c in s}
    present = [c for c in classes if c in occurring]
    fit: dict[str, Any] = {"task": task.name, "oof_accuracy": None, "oof_map": None,
                           "label_cardinality": float(np.mean([len(s) for s in sets]))}  # fmt: skip
    if len(present) < 2:
        return None, fit
    y = task.encode([[c for c in s if c in set(present)] for s in sets], present)
    probs = (out_of_fold_probs_multilabel(features, y, cfg=cfg) + knn_probs_multilabel(dist, idx, y)) / 2
    label_lists = [[int(k) for k in np.flatnonzero(row)] for row in y]
    ranked, quality, per_label = multilabel_label_issues(label_lists, probs)
    fit["oof_map"] = task.headline_of_scores(probs, y)  # mAP
    given = y[ranked].astype(bool)
    flagged = per_label[ranked]
    fallback = ~flagged.any(axis=1)  # flagged as a whole but by no single label: name the worst one
    worst = np.argmin(np.where(given, probs[ranked], 1 - probs[ranked]), axis=1)
    flagged[fallback, worst[fallback]] = True
    extra, missing = flagged & given, flagged & ~given
    suggested = (given & ~extra) | missing
    names = np.asarray(present, dtype=object)

    def joined(mask: np.ndarray) -> list[str]:
        return [LABEL_SEPARATOR.join(names[m]) for m in mask]

    fit["suspected_missing"] = int(missing.sum())
    fit["suspected_extra"] = int(extra.sum())
    frame = _issue_rows(
        rows.iloc[ranked], "label_error", score=quality[ranked], suggested=joined(suggested),
        missing=joined(missing), extra=joined(extra),
    )  # fmt: skip
    return frame, fit


# The audit model is the task's kind of model (Task.activation): one softmax over the classes (cleanlab's
# label issues), or one sigmoid per label (cleanlab's multi-label issues, naming missing / extra labels).
_LABEL_ERRORS = {"softmax": _single_label_errors, "sigmoid": _multilabel_errors}


def _issue_rows(
    sel: pd.DataFrame,
    issue: str,
    *,
    score: np.ndarray,
    suggested: Any = "",
    missing: Any = "",
    extra: Any = "",
) -> pd.DataFrame:
    """Rows of :data:`ISSUE_COLUMNS` for the manifest rows ``sel``, already in rank order."""
    return pd.DataFrame(
        {
            "image_id": sel["image_id"].to_numpy(),
            "issue": issue,
            "split": sel["split"].to_numpy(),
            "label": sel["label"].to_numpy(),
            "suggested_label": suggested,
            "score": score,
            "rank": np.arange(1, len(sel) + 1),
            "group": "",
            "path": sel["path"].to_numpy(),
            "missing_labels": missing,
            "extra_labels": extra,
        },
        columns=list(ISSUE_COLUMNS),
    )


def clip_disagreement_issues(disagreements: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """The baseline's ``disagreements.csv`` rows (CLIP confidently predicts another class than the
    label) as ledger issues: ``suggested_label`` is CLIP's class, ``score`` the probability CLIP
    gives the given label (low = likely wrong, like cleanlab's label quality), rank 1 = most
    confident disagreement. Multi-label tables also carry ``missing_labels`` / ``extra_labels``."""
    if disagreements.empty:
        return pd.DataFrame(columns=list(ISSUE_COLUMNS))
    rows = disagreements.sort_values(["confidence", "image_id"], ascending=[False, True], kind="stable")
    paths = manifest.drop_duplicates("image_id").set_index("image_id")["path"]
    sel = rows.assign(path=paths.reindex(rows["image_id"]).fillna("").to_numpy())
    changes = {
        key: sel[col].fillna("").astype(str).to_numpy()
        for key, col in (("missing", "missing_labels"), ("extra", "extra_labels"))
        if col in sel.columns
    }
    return _issue_rows(
        sel, CLIP_DISAGREEMENT, score=sel["label_probability"].to_numpy(dtype=float),
        suggested=sel["clip_label"].to_numpy(), **changes,
    )  # fmt: skip


def _label_error_rows(
    rows: pd.DataFrame, ranked: np.ndarray, quality: np.ndarray, suggested: np.ndarray, classes: Sequence[str]
) -> pd.DataFrame:
    names = [classes[int(s)] for s in suggested[ranked]]
    return _issue_rows(rows.iloc[ranked], "label_error", score=quality[ranked], suggested=names)


def _outlier_rows(rows: pd.DataFrame, scores: np.ndarray, quantile: float) -> pd.DataFrame:
    threshold = float(np.quantile(scores, quantile))
    order = np.argsort(-scores, kind="stable")
    order = order[scores[order] > threshold]
    return _issue_rows(rows.iloc[order], "outlier", score=scores[order])


def _duplicate_rows(rows: pd.DataFrame, sets: list[np.ndarray]) -> pd.DataFrame:
    ids = rows["image_id"].to_numpy()
    members = [(int(m), str(min(ids[g])), len(g), rank) for rank, g in enumerate(sets, start=1) for m in g]
    sel = rows.iloc[[m for m, *_ in members]]
    return pd.DataFrame(
        {
            "image_id": sel["image_id"].to_numpy(),
            "issue": "near_duplicate",
            "split": sel["split"].to_numpy(),
            "label": sel["label"].to_numpy(),
            "suggested_label": "",
            "score": [float(size) for _, _, size, _ in members],
            "rank": [rank for *_, rank in members],
            "group": [group for _, group, _, _ in members],
            "path": sel["path"].to_numpy(),
            "missing_labels": "",
            "extra_labels": "",
        },
        columns=list(ISSUE_COLUMNS),
    )


# --------------------------------------------------------------------------------------------
# The HTML report (drawn with the report kit, components.core.report)


def _thumb_uri(path: Path, *, side: int = 64) -> str:
    import io

    try:
        with Image.open(path) as im:
            im.load()
            shown = displayed(im).convert("RGB")
    except Exception:  # a file that vanished from the store: show the row without a picture
        return ""
    shown.thumbnail((side, side))
    buf = io.BytesIO()
    shown.save(buf, format="PNG")
    return kit.data_uri(buf.getvalue())


def _thumb(path: Path, *, title: str = "") -> kit.Html:
    """An inlined thumbnail (nothing when the file is gone: no broken picture)."""
    uri = _thumb_uri(path)
    hover = f' title="{kit.esc(title)}"' if title else ""
    return kit.Html(f'<img src="{uri}"{hover} alt="">' if uri else "")


def write_audit_report(
    result: AuditResult,
    ledger: dict[str, Any],
    path: Path,
    *,
    data_dir: Path,
    gallery: int = 24,
    validation: Sequence[dict[str, Any]] = (),
) -> Path:
    """A self-contained page: the data-validation results (``validation``: the validation report's
    outcomes as dicts), counts, ledger diff, class balance, and thumbnails of the top suspected
    label errors (given vs suggested label) and of the largest near-duplicate sets."""
    summary, issues = result.summary, result.issues
    intro = kit.paragraph(kit.join([
        f"{summary['audited']} images audited (splits {', '.join(summary['splits'])}); {_model_quality(summary)}; "
        "data version ", kit.code(ledger.get("data_version", "")), ", compared with ",
        kit.code(ledger.get("previous_version") or "none"), ".",
    ]))  # fmt: skip
    page = kit.page(
        "Label audit",
        heading="Label-quality audit",
        top=[
            intro,
            _basis_paragraph(summary),
            kit.table(["issue", "count"], list(summary["issues"].items())),
        ],
        sections=[
            _validation_table(validation),
            kit.section("Since the previous data version", _ledger_table(ledger)),
            kit.section("Class balance", _balance_table(summary.get("class_counts", {}))),
            kit.section("Top suspected label errors", _error_cards(issues, Path(data_dir), gallery)),
            kit.section("Largest near-duplicate sets", _duplicate_cards(issues, Path(data_dir), gallery)),
        ],
    )
    return write_text_atomic(Path(path), page)


def _ledger_table(ledger: dict[str, Any]) -> kit.Html:
    """Issue counts against the previous data version: new, persisting, resolved."""
    states = ("new", "persisting", "resolved")
    rows = [[issue, *[c[s] for s in states]] for issue, c in ledger.get("counts", {}).items()]
    return kit.table(["issue", *states], rows)


def _error_cards(issues: pd.DataFrame, data_dir: Path, gallery: int) -> kit.Html:
    """The top suspected label errors: thumbnail, given and suggested label, quality score."""
    errors = issues[issues["issue"] == "label_error"].head(gallery)
    return kit.gallery(
        kit.join([_thumb(data_dir / r.path), kit.Html("<br>given <b>"), r.label, kit.Html("</b><br>suggested <b>"),
                  r.suggested_label, kit.Html("</b>"), _set_changes(r), kit.Html("<br>"), f"quality {r.score:.3f}",
                  kit.Html("<br>"), kit.code(r.image_id[:10])])
        for r in errors.itertuples()
    )  # fmt: skip


def _duplicate_cards(issues: pd.DataFrame, data_dir: Path, gallery: int) -> kit.Html:
    """The largest near-duplicate sets, up to six thumbnails each (hover: split / label)."""
    dups = issues[issues["issue"] == "near_duplicate"]
    return kit.gallery(
        (
            kit.join([*(_thumb(data_dir / r.path, title=f"{r.split} / {r.label}") for r in grp.head(6).itertuples()),
                      kit.Html("<br>"), f"{len(grp)} images, splits {', '.join(sorted(set(grp['split'])))}"])
            for _, grp in list(dups.groupby("rank", sort=True))[: max(1, gallery // 3)]
        ),
        wide=True,
    )  # fmt: skip


def _basis_paragraph(summary: dict[str, Any]) -> kit.Html:
    """What the audit stands on and what to do with it: the features (and why those), cleanlab's
    noise-rate estimate, and how much of the suspects the capped relabel queue shows."""
    parts: list[Any] = []
    if summary.get("features_from"):
        parts.append(f"Features: {summary['features_from']} ({summary.get('features_reason', '')}). ")
    if summary.get("noise_rate_estimate") is not None:
        parts.append(
            f"cleanlab estimates {summary['noise_rate_estimate']:.1%} of the labels are wrong "
            f"(~{summary['label_issues_estimate']} images; the audit model's own errors count too). "
        )
    if "relabel_queue" in summary:
        parts.append(
            f"The relabel queue lists the worst {summary['relabel_queue']} of {summary['suspected']} suspected "
            f"label errors (audit.queue_size {summary['queue_size']}); every suspect is in issues.csv."
        )
    return kit.paragraph(kit.join(parts)) if parts else kit.Html("")


def _model_quality(summary: dict[str, Any]) -> str:
    """How well the audit model separates the labels: out-of-fold accuracy, or mAP (multi-label)."""
    task = get_task(summary.get("task"))
    key = f"oof_{task.headline.lower()}"  # oof_accuracy | oof_map
    value = summary.get(key)
    value = summary.get(f"{key}{ON_MODEL_FEATURES}") if value is None else value
    what = f"out-of-fold {task.headline}"
    if (card := summary.get("label_cardinality")) is not None:
        what = f"{card:.2f} labels per image; {what}"
    return f"{what} of the audit model {'n/a' if value is None else f'{value:.3f}'}"


def _set_changes(row: Any) -> kit.Html:
    """Multi-label: the suspected missing (+) and extra (-) labels of an issue row, as HTML."""
    parts = [
        kit.join([kit.Html(f"<br>{sign} "), value])
        for sign, value in (
            ("+", getattr(row, "missing_labels", "")),
            ("&minus;", getattr(row, "extra_labels", "")),
        )
        if isinstance(value, str) and value
    ]
    return kit.join(parts)


def _validation_table(outcomes: Sequence[dict[str, Any]]) -> kit.Section:
    """The data-validation outcomes (one row per expectation): failures first, then warnings."""
    title = "Data validation"
    if not outcomes:
        return kit.section(title, kit.paragraph(kit.join(
            ["No validation report found: run ", kit.code("imgflow validate"), "."]
        )))  # fmt: skip
    ordered = sorted(outcomes, key=lambda o: list(_OUTCOME_WORDS).index(_outcome_kind(o)))
    kinds = [_outcome_kind(o) for o in ordered]
    rows = [[kit.badge(_OUTCOME_WORDS[k], k), o["name"], o.get("unexpected_count", 0), o.get("description", "")]
            for o, k in zip(ordered, kinds, strict=True)]  # fmt: skip
    return kit.section(
        title,
        kit.table(["", "expectation", "rows", "what"], rows,
                  row_classes=[None if kind == "pass" else kind for kind in kinds]),
    )  # fmt: skip


# Badge words, in table order: failures first, then warnings.
_OUTCOME_WORDS = {"fail": "FAILED", "warn": "WARNING", "pass": "ok"}


def _outcome_kind(outcome: dict[str, Any]) -> str:
    """pass, warn (failed, but the expectation's severity is ``warn``) or fail, as in the validation report."""
    if outcome["success"]:
        return "pass"
    return "warn" if outcome.get("severity") == "warn" else "fail"


def _balance_table(counts: dict[str, int]) -> kit.Html:
    if not counts:
        return kit.Html("")
    top = max(counts.values()) or 1
    return kit.table(["class", "images", ""], [[c, n, kit.bar(n, top)] for c, n in counts.items()])


EXCLUDED_FILE = "excluded.csv"


def write_exclusions(issues: pd.DataFrame, manifest: pd.DataFrame, cfg: AuditConfig, path: Path) -> int:
    """With ``audit.action: exclude``: the worst suspected label errors of the train split, at most
    ``max_issue_rate`` of it, for the train stage to leave out. Always written (empty otherwise) so
    the file is a stable DVC output. Returns the number excluded."""
    columns = ["image_id", "label", "suggested_label", "score", "path"]
    rows = pd.DataFrame(columns=columns)
    if cfg.action == "exclude":
        cap = int(cfg.max_issue_rate * int((manifest["split"] == "train").sum()))
        suspects = issues[(issues["issue"] == "label_error") & (issues["split"] == "train")]
        rows = suspects.sort_values("score", kind="stable").head(cap).loc[:, columns]
    with atomic_path(path) as tmp:  # the train stage reads it
        rows.to_csv(tmp, index=False)
    return len(rows)
