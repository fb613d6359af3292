"""Zero-shot scoring: image features against one text embedding per class.

The logits are the model's own ``logit_scale`` times ``cos(image, class text) - the image's mean
cos over all classes``; the task turns them into probabilities (:meth:`Task.probabilities`): a
softmax over the classes (single-label; the per-image centring is what the softmax ignores
anyway), or one sigmoid per label (multi-label; the centring removes each image's overall
similarity offset, so one threshold per label fits every image; the thresholds are tuned on the
val split by the task's decision rule, :meth:`Task.fit_decision`).

:func:`fit_label_calibration` calibrates per-label logits (Platt scaling fitted on val: one slope
shared by all labels, one intercept per label): the raw sigmoid of a logit-scaled similarity is
far too sure of itself to say that CLIP contradicts a label "confidently" (see
:mod:`components.baseline.disagreements`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from components.baseline.embeddings import normalize
from components.task import Task


def scoring_formula(task: Task) -> str:
    """The zero-shot scoring of ``task`` in words (recorded in baseline.json)."""
    thing = task.row_name
    return f"{task.activation}(logit_scale * (cos(image, {thing}) - mean cos(image, every {thing})))"


def zero_shot_logits(image_features: np.ndarray, text_weights: np.ndarray, logit_scale: float) -> np.ndarray:
    """Logits (N, K): ``logit_scale * (cos(image (N, D), class text (K, D)) - the image's mean cos
    over the K classes)``."""
    cos = normalize(image_features.astype(np.float64)) @ text_weights.astype(np.float64).T
    return logit_scale * (cos - cos.mean(axis=1, keepdims=True))


def zero_shot_probs(
    task: Task, image_features: np.ndarray, text_weights: np.ndarray, logit_scale: float
) -> np.ndarray:
    """Probabilities (N, K) of :func:`zero_shot_logits`: softmax rows summing to 1 (single-label), or
    an independent sigmoid per label (multi-label)."""
    return task.probabilities(zero_shot_logits(image_features, text_weights, logit_scale))


@dataclass(frozen=True)
class LabelCalibration:
    """Platt scaling of per-label logits: ``sigmoid(slope * logit + intercepts[label])``."""

    slope: float
    intercepts: tuple[float, ...]

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """(N, K) logits -> (N, K) calibrated probabilities of presence."""
        return _sigmoid(self.slope * logits + np.asarray(self.intercepts)[None, :])


def fit_label_calibration(logits: np.ndarray, y: np.ndarray) -> LabelCalibration | None:
    """Fit :class:`LabelCalibration` on validation logits (N, K) and 0/1 labels (N, K): one logistic
    regression over every (image, label) pair, the logit as the shared feature and a one-hot label
    as the per-label intercept (L2-regularised, so a label with few val positives stays near the
    rest). None when there is nothing to fit (no val images, or no label both present and absent)."""
    from sklearn.linear_model import LogisticRegression

    n, k = logits.shape
    if n == 0 or y.min() == y.max():
        return None
    x = np.zeros((n * k, k + 1))
    x[:, 0] = logits.ravel()
    x[np.arange(n * k), 1 + np.tile(np.arange(k), n)] = 1.0
    model = LogisticRegression(C=1.0, fit_intercept=False, max_iter=1000).fit(x, np.asarray(y).ravel())
    coef = model.coef_[0]
    return LabelCalibration(slope=float(coef[0]), intercepts=tuple(float(c) for c in coef[1:]))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free
