"""No-regression check of a challenger against the current champion on the same test images.

Both models predict the same test split (the champion is re-run from its registered files, not
trusted from old numbers). The question is *non-inferiority*: is the challenger at most
``margin`` worse? A paired bootstrap answers it: only images where exactly one model is right
move the difference, so resampling the four (right/wrong x right/wrong) counts with a
multinomial is the exact bootstrap of the paired difference, in microseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class NonInferiority:
    """Challenger minus champion on one metric (accuracy or a class's recall)."""

    what: str
    n: int
    challenger: float
    champion: float
    difference: float
    lower: float
    """One-sided lower confidence bound of the difference (paired bootstrap)."""
    margin: float
    passed: bool
    """``lower >= -margin``: the challenger is not worse by more than the margin."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(
    challenger_correct: np.ndarray,
    champion_correct: np.ndarray,
    *,
    margin: float,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    what: str = "accuracy",
) -> NonInferiority:
    """Non-inferiority of the challenger's hit rate. *_correct: (N,) bool, same images."""
    a = np.asarray(challenger_correct, dtype=bool)
    b = np.asarray(champion_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two (N,) arrays over the same images, got {a.shape} and {b.shape}")
    n = int(a.size)
    if n == 0:
        return NonInferiority(what, 0, 0.0, 0.0, 0.0, -1.0, margin, False)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [only_a / n, only_b / n, 1 - (only_a + only_b) / n], size=n_boot)
    diffs = (draws[:, 0] - draws[:, 1]) / n
    lower = float(np.quantile(diffs, 1 - confidence))
    return NonInferiority(
        what=what,
        n=n,
        challenger=float(a.mean()),
        champion=float(b.mean()),
        difference=(only_a - only_b) / n,
        lower=lower,
        margin=margin,
        passed=lower >= -margin - 1e-12,
    )


def compare(
    y_true: np.ndarray,
    challenger_pred: np.ndarray,
    champion_pred: np.ndarray,
    classes: Sequence[str],
    *,
    margin: float,
    class_margin: float,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy and per-class recall non-inferiority; *_pred: (N,) predicted class indices."""
    y = np.asarray(y_true)
    a, b = np.asarray(challenger_pred) == y, np.asarray(champion_pred) == y
    overall = paired_bootstrap(a, b, margin=margin, n_boot=n_boot, confidence=confidence, seed=seed)
    per_class = [
        paired_bootstrap(
            a[y == i], b[y == i], margin=class_margin, n_boot=n_boot, confidence=confidence,
            seed=seed + 1 + i, what=f"recall of '{name}'",
        ).to_dict() | {"class": str(name)}
        for i, name in enumerate(classes)
        if (y == i).any()
    ]  # fmt: skip
    return {"accuracy": overall.to_dict(), "per_class": per_class, "confidence": confidence, "n_boot": n_boot}
