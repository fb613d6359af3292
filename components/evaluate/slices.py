"""Slice metrics: accuracy on subsets of the test set declared in params (``evaluate.slices``).

A slice spec names a column of the test rows (``by``): a manifest column (``source``, ``mode``,
``width``, ``height``, ``bytes``) or an image property computed at evaluation time
(``brightness``: mean intensity in [0, 1]; ``contrast``: standard deviation of intensity;
``pixels``: width x height). With ``bins`` the numeric column is cut into ``[lo, hi)`` intervals,
otherwise every distinct value is a slice. Each slice's accuracy carries a Wilson lower bound so
that a handful of lucky images cannot pass the min-slice gate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from components.core.errors import ConfigError
from components.task.metrics import wilson_interval

logger = logging.getLogger(__name__)

COMPUTED = ("brightness", "contrast", "pixels")


def image_properties(images: np.ndarray) -> dict[str, np.ndarray]:
    """images: (N, C, H, W) in [0, 1] -> ``brightness`` (N,) and ``contrast`` (N,)."""
    flat = images.reshape(images.shape[0], -1)
    return {"brightness": flat.mean(axis=1), "contrast": flat.std(axis=1)}


def slice_table(
    rows: pd.DataFrame,
    correct: np.ndarray,
    specs: Sequence[Any],
    *,
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """Per-slice accuracy. rows: one row per test image (columns named by the specs' ``by``);
    correct: (N,) bool, top-1 right; specs: objects with ``by`` and ``bins`` (None or edges).

    Returns one dict per non-empty slice: ``slice`` (e.g. ``brightness in [0.00, 0.15)``),
    ``by``, ``n``, ``correct``, ``accuracy``, ``accuracy_lower``.
    """
    correct = np.asarray(correct, dtype=bool)
    if len(rows) != correct.size:
        raise ValueError(f"rows ({len(rows)}) and correct ({correct.size}) differ in length")
    out: list[dict[str, Any]] = []
    for spec in specs:
        if spec.by not in rows.columns:
            known = ", ".join(sorted(set(rows.columns) | set(COMPUTED)))
            raise ConfigError(f"evaluate.slices: unknown column {spec.by!r}; use one of {known}")
        for name, mask in _masks(rows[spec.by], spec.bins):
            n = int(mask.sum())
            if n == 0:
                continue
            hits = int(correct[mask].sum())
            lower, _ = wilson_interval(hits, n, confidence=confidence)
            out.append(
                {"slice": f"{spec.by} {name}", "by": spec.by, "n": n, "correct": hits,
                 "accuracy": hits / n, "accuracy_lower": lower}
            )  # fmt: skip
    return out


def _masks(column: pd.Series, bins: Sequence[float] | None) -> list[tuple[str, np.ndarray]]:
    if bins is None:
        values = column.astype(str).to_numpy()
        return [(f"= {v}", values == v) for v in sorted(set(values))]
    edges = [float(b) for b in bins]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ConfigError(f"evaluate.slices bins must be at least 2 increasing edges, got {list(bins)}")
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    masks = []
    for i, (lo, hi) in enumerate(zip(edges, edges[1:], strict=False)):
        last = i == len(edges) - 2
        mask = (values >= lo) & ((values <= hi) if last else (values < hi))
        masks.append((f"in [{lo:g}, {hi:g}{']' if last else ')'}", mask))
    return masks
