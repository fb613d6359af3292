"""Linear probes: logistic regression on frozen, L2-normalised CLIP image features (the CLIP
paper's second baseline), its ``C`` picked on the validation split by the task's headline metric.

The probe follows the task's output activation (:attr:`Task.activation`), as a trained model's
head does: ``softmax`` -> one multinomial logistic regression over the classes
(:class:`LinearProbe`); ``sigmoid`` -> one logistic regression per label, one-vs-rest
(:class:`OneVsRestProbe`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from components.baseline.embeddings import normalize
from components.core.errors import DataError
from components.task import Task

logger = logging.getLogger(__name__)

PROBE_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


class Probe(Protocol):
    @property
    def C(self) -> float: ...

    @property
    def val_score(self) -> float | None:
        """The task's headline metric on the validation split at the chosen C (None: nothing to score)."""

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, D) unnormalised features -> (N, K) probabilities."""
        ...

    def scored(self, value: float) -> Probe:
        """This probe with its validation score."""
        ...


@dataclass(frozen=True)
class LinearProbe:
    """A multinomial logistic regression over the classes (single-label)."""

    model: Any
    """sklearn pipeline: StandardScaler -> LogisticRegression, on L2-normalised features."""
    C: float
    n_classes: int
    val_score: float | None = None

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, K) probabilities; classes never seen in training get probability 0."""
        probs = np.zeros((features.shape[0], self.n_classes))
        probs[:, self.model.classes_] = self.model.predict_proba(normalize(features))
        return probs

    def scored(self, value: float) -> LinearProbe:
        return replace(self, val_score=value)


@dataclass(frozen=True)
class OneVsRestProbe:
    """One logistic regression per label (multi-label)."""

    models: tuple[Any, ...]
    """Per label: a StandardScaler -> LogisticRegression pipeline, or the constant probability of a
    label that is always (or never) there in the training images."""
    C: float
    val_score: float | None = None

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, K) per-label probabilities."""
        x = normalize(features)
        return np.stack(
            [
                m.predict_proba(x)[:, 1] if hasattr(m, "predict_proba") else np.full(len(x), float(m))
                for m in self.models
            ],
            axis=1,
        )

    def scored(self, value: float) -> OneVsRestProbe:
        return replace(self, val_score=value)


def _pipeline(c: float, max_iter: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))


def _fit_multinomial(x: np.ndarray, y: np.ndarray, c: float, n_classes: int, max_iter: int) -> LinearProbe:
    """y: (N,) class indices."""
    return LinearProbe(model=_pipeline(c, max_iter).fit(normalize(x), y), C=c, n_classes=n_classes)


def _fit_one_vs_rest(x: np.ndarray, y: np.ndarray, c: float, n_classes: int, max_iter: int) -> OneVsRestProbe:
    """y: (N, K) 0/1 indicators; a label without both values in training gets its constant."""
    xn = normalize(x)
    models: list[Any] = []
    for k in range(y.shape[1]):
        target = y[:, k]
        models.append(
            float(target[0]) if target.min() == target.max() else _pipeline(c, max_iter).fit(xn, target)
        )
    return OneVsRestProbe(models=tuple(models), C=c)


@dataclass(frozen=True)
class _Recipe:
    """How a probe is fitted for one output activation."""

    fit: Callable[[np.ndarray, np.ndarray, float, int, int], Probe]
    gap: Callable[[np.ndarray], str | None]
    """Training targets -> why no probe can be fitted on them (None: it can)."""
    scorable: Callable[[np.ndarray], bool]
    """Validation targets -> whether the headline metric is defined on them."""


def _fewer_than_two_classes(y: np.ndarray) -> str | None:
    return "fewer than 2 classes in the train split" if len(np.unique(y)) < 2 else None


def _no_label_on_both_sides(y: np.ndarray) -> str | None:
    both = (y.any(axis=0) & ~y.all(axis=0)).any()
    return None if both else "no label both present and absent in the train split"


_RECIPES: dict[str, _Recipe] = {
    "softmax": _Recipe(_fit_multinomial, gap=_fewer_than_two_classes, scorable=lambda y: len(y) > 0),
    "sigmoid": _Recipe(
        _fit_one_vs_rest,
        gap=_no_label_on_both_sides,
        scorable=lambda y: bool(y.any()),  # AP needs a positive
    ),
}


def probe_gap(task: Task, y_train: np.ndarray) -> str | None:
    """Why no linear probe can be fitted on the training targets ``y_train`` (None: one can)."""
    return _RECIPES[task.activation].gap(np.asarray(y_train))


def fit_linear_probe(
    task: Task,
    x_train: np.ndarray,
    y_train: np.ndarray,
    n_classes: int,
    *,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    C: float | None = None,
    max_iter: int = 1000,
) -> Probe:
    """The task's linear probe on frozen features x (N, D) with targets y (:meth:`Task.encode`'s).

    ``C`` None: the best of :data:`PROBE_C_GRID` by the task's headline metric on the validation
    split (ties go to the stronger regularisation, the smaller C); 1.0 when validation has nothing
    to score. The CLIP paper sweeps C the same way.
    """
    recipe = _RECIPES[task.activation]
    if reason := recipe.gap(np.asarray(y_train)):
        raise DataError(f"the linear probe cannot be fitted: {reason}")

    def fit(c: float) -> Probe:
        return recipe.fit(x_train, y_train, c, n_classes, max_iter)

    if x_val is None or y_val is None or not recipe.scorable(np.asarray(y_val)):
        c = 1.0 if C is None else C
        logger.info("linear probe: C=%g (nothing to score on val)", c)
        return fit(c)
    scored = [
        (task.headline_of_scores(p.predict_proba(x_val), y_val), -c, p)
        for c in (PROBE_C_GRID if C is None else (C,))
        for p in (fit(c),)
    ]
    value, _, best = max(scored, key=lambda t: t[:2])
    logger.info("linear probe: C=%g (val %s %.4f)", best.C, task.headline, value)
    return best.scored(float(value))
