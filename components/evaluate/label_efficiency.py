"""The label-efficiency report: how much a self-supervised backbone buys when labels are few.

For each fraction of the train split's labels (1% / 10% / 100% by default) and each of ``subsets``
seeded, class-stratified subsets (the same subsets for every method), four learners are fitted on the
labelled subset and scored on the test split:

- ``ssl_probe``: a linear probe on the frozen SSL backbone's features: the last conv stage and the
  stage before it, each average-pooled to a ``grid`` x ``grid`` map and concatenated (``probe_layers``;
  the issue's planning read the last stage alone, 3 x 3; the globally pooled layer and the projection head
  lost to pixels there). Adding the previous stage lifted the probe by 0.7 / 1.0 points at 1% / 10% of
  Fashion-MNIST's labels on one SimCLR backbone (docs/self-supervised.md, "Probe protocol"): SimCLR's
  last stage specialises to the augmentation-invariance task, the stage before keeps more of the local
  shape that tells similar classes apart;
- ``pixels``: the same probe on raw pixels;
- ``random_init``: the same probe on the same layers of a randomly initialised backbone (what the
  architecture alone gives);
- ``scratch``: imgflow's supervised recipe itself (model, augmentation, loss, optimiser and schedule of
  ``components.train.torch_recipe``) trained from scratch on the subset, in this process, for a budget
  of optimiser steps (``scratch_steps``, at most ``scratch_max_epochs`` epochs);
- ``ssl_finetune`` (when a fine-tune trainer is given): the same recipe, the same steps, started from the
  SSL backbone as ``train.init: ssl:<run>`` starts it (the head alone for the first
  ``finetune_probe_share`` of the epochs when LP-FT is on, then the whole network with the backbone at
  ``train.init_backbone_lr_scale`` x lr). What a user of ``train.init`` gets; the issue's gain figures are
  the frozen probe's, this one is reported beside them.

The three probes share one protocol: a linear classifier (L2 logistic regression on standardised
features, shrinkage LDA, or the two averaged) and the logistic regression's C, both chosen by k-fold
cross-validation inside the labelled subset (:func:`probe_fit`; never on the test split).
Subsets at 100% are all the same set: one fit stands for the three. Every evaluation hyperparameter is
in :class:`EvalSettings` and written with the rows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.core.errors import ConfigError
from components.data.datasets import normalise
from components.model.features import base_model, readable_stages, stage_maps

logger = logging.getLogger(__name__)

METHODS = ("ssl_probe", "pixels", "random_init", "scratch", "ssl_finetune")
STAGES_READ = {"last": 1, "last+prev": 2, "last3": 3}
"""A fixed choice of :attr:`EvalSettings.probe_layers` -> how many stages it reads, from the last back."""
AUTO_LAYERS = ("last+prev", "last3")
"""What ``probe_layers: auto`` chooses among, for each fit, by the C search's cross-validation."""
PROBE_CLASSIFIERS = ("logistic", "lda", "logistic+lda")
"""The probes' linear classifiers (:attr:`EvalSettings.probe_classifier`), in the order ``auto``'s ties
go: the simplest first."""
PROBE_LAYERS = (*STAGES_READ, "auto")
"""What the feature probes may read (:attr:`EvalSettings.probe_layers`)."""


@dataclass(frozen=True)
class EvalSettings:
    """Every hyperparameter of the report (logged with it)."""

    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    subsets: int = 3
    seed: int = 0
    grid: int = 3
    """Probe features: each read map average-pooled to grid x grid."""
    probe_layers: str = "auto"
    """Maps the probes read: ``last`` (the last conv stage), ``last+prev`` (and the stage before it,
    concatenated; see the module docstring), ``last3`` (and the one before that), or ``auto``: for each
    fit, ``last+prev`` or ``last3``, whichever the cross-validation that chooses C scores higher inside
    the labelled subset (ties: the fewer maps; the choice is in each row; a backbone with fewer stages
    chooses among those it has: :func:`auto_layers`). Measured on one SimCLR
    backbone, 1% of Fashion-MNIST's labels: ``last3`` +0.4 points over ``last+prev``, and ``auto`` picked
    it on 2 of 3 subsets for the same test accuracy (docs/self-supervised.md)."""
    mirror: bool | None = None
    """True: every method sees each image and its horizontal mirror: the probes read the features of both
    (concatenated; for a backbone, the mirror's features are those of mirrored filters, which a linear probe
    cannot form itself), ``scratch`` and ``ssl_finetune`` predict the mean logits of both (imgflow's
    ``train.tta: hflip``). False: the image alone, everywhere. None: as the data's supervised recipe
    trains, mirrored images when ``train.hflip > 0`` (:func:`run_label_efficiency` decides; for data
    whose mirror image means something else, such as text, the recipe does not flip). Measured: +0.6
    points at 1% for the SSL probe of one backbone (docs/self-supervised.md)."""
    probe_classifier: str = "auto"
    """The probes' linear classifier: ``logistic`` (L2 logistic regression on standardised features, C
    below), ``lda`` (linear discriminant analysis with Ledoit-Wolf shrinkage, ``solver="lsqr"``: no
    hyperparameter; the few-shot classic), ``logistic+lda`` (the two's class probabilities averaged), or
    ``auto``: for each fit, whichever of the three (with its C) the cross-validation that chooses C and the
    maps scores highest inside the labelled subset (ties: that order; the choice is in each row). Measured
    on the val split with one SimCLR backbone at 1% of Fashion-MNIST's labels: ``auto`` +0.3 to +0.5
    points over logistic alone, and it keeps logistic on raw pixels, where LDA loses 2 points
    (docs/self-supervised.md, "The probe's classifier")."""
    probe_C: float | None = None
    """Inverse L2 strength of the logistic regressions (features standardised first); None: chosen for
    each fit by ``probe_cv_folds``-fold cross-validation inside its labelled subset over ``probe_C_grid``
    (the test split plays no part; the chosen C is in each row). Measured on one SimCLR backbone: +0.1 /
    +0.7 points at 1% / 10% over the fixed 0.5 (docs/self-supervised.md)."""
    probe_C_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    probe_cv_folds: int = 3
    probe_cv_max_rows: int = 6000
    """The cross-validation sees at most this many labelled rows (a stratified draw): with many labels C
    matters little, and a CV over 54k rows would cost minutes per probe."""
    probe_C_fallback: float = 0.5
    """C when a subset is too small to cross-validate (a class with a single image)."""
    probe_max_iter: int = 300
    scratch_steps: int = 600
    """Optimiser steps of each from-scratch run (epochs = steps / batches per epoch, 1..scratch_max_epochs)."""
    scratch_max_epochs: int = 40
    scratch_batch_size: int = 64
    finetune_probe_share: float | None = None
    """``ssl_finetune``: the share of its epochs (rounded down) that trains the head alone before the whole
    network. None: ``train.init_probe_epochs / train.epochs``, the share a full run of the recipe gives it
    (here epochs vary with the subset; :func:`components.pipeline.pretraining.run_label_efficiency` fills
    it in)."""
    feature_batch_size: int = 512

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class Split:
    """Decoded images (N, C, H, W) uint8 and class indices (N,)."""

    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class Row:
    method: str
    fraction: float
    subset: int
    labels: int
    accuracy: float
    seconds: float
    probe_C: float | None = None
    """The probes' C (chosen or fixed); None for the trained arms and for ``lda`` alone."""
    probe_layers: str | None = None
    """The maps a backbone probe read (``probe_layers``, or what ``auto`` chose); None for the others."""
    probe_classifier: str | None = None
    """The probes' classifier (``probe_classifier``, or what ``auto`` chose); None for the trained arms."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LabelEfficiencyReport:
    """Rows (method x fraction x subset), the means, and what was evaluated how."""

    rows: list[Row]
    settings: EvalSettings
    backbone: dict[str, Any]
    """The SSL backbone's spec (model, method, data hash, epochs)."""
    notes: list[str]

    def mean(self, method: str, fraction: float) -> float:
        values = [r.accuracy for r in self.rows if r.method == method and r.fraction == fraction]
        if not values:
            raise KeyError(f"no {method} rows at {fraction:g}")
        return float(np.mean(values))

    def summary(self) -> dict[str, dict[str, float]]:
        """``{method: {"1%": mean accuracy, ...}}``."""
        return {
            m: {_pct(f): self.mean(m, f) for f in self.settings.fractions}
            for m in METHODS
            if any(r.method == m for r in self.rows)
        }

    def gains(self) -> dict[str, float]:
        """Points (x100) the SSL probe gains: over the better of pixels and scratch, and over scratch."""
        out = {}
        for f in self.settings.fractions:
            ssl = self.mean("ssl_probe", f)
            out[f"ssl_vs_best_baseline_{_pct(f)}_pt"] = 100 * (
                ssl - max(self.mean("pixels", f), self.mean("scratch", f))
            )
            out[f"ssl_vs_scratch_{_pct(f)}_pt"] = 100 * (ssl - self.mean("scratch", f))
            if any(r.method == "ssl_finetune" and r.fraction == f for r in self.rows):
                out[f"ssl_finetune_vs_scratch_{_pct(f)}_pt"] = 100 * (
                    self.mean("ssl_finetune", f) - self.mean("scratch", f)
                )
        return out

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow: ``<method>_<pct>_accuracy`` and the gains."""
        flat = {
            f"{m}_{p.rstrip('%')}pct_accuracy": v for m, by in self.summary().items() for p, v in by.items()
        }
        return {**flat, **{k.replace("%", "pct"): v for k, v in self.gains().items()}}

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.to_dict() for r in self.rows],
            "summary": self.summary(),
            "gains": self.gains(),
            "settings": self.settings.to_dict(),
            "backbone": self.backbone,
            "notes": list(self.notes),
        }


def _pct(fraction: float) -> str:
    return f"{100 * fraction:g}%"


# --------------------------------------------------------------------------- subsets


def labelled_subset(labels: np.ndarray, fraction: float, *, seed: int, subset: int) -> np.ndarray:
    """Sorted indices of a class-stratified ``fraction`` of ``labels`` (at least one per class), drawn
    with a generator seeded by (seed, subset): every method sees the same images."""
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, subset])
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, round(fraction * len(idx)))
        picked.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(picked))


# --------------------------------------------------------------------------- learners


@torch.no_grad()
def stage_grids(
    model: nn.Module,
    images: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    grid: int,
    batch_size: int,
    stages: int = 1,
) -> list[np.ndarray]:
    """Per stage read, the last first, (N, C_s * grid * grid) float32: ``forward_features``' last map and
    the maps of the ``stages - 1`` stages before it (:func:`components.model.features.stage_maps`; a
    ConfigError for a model without them), each average-pooled to grid x grid. Token models, with no
    spatial map, give their mean token for the last."""
    net = base_model(model).eval()
    out: list[list[np.ndarray]] = [[] for _ in range(stages)]
    for i in range(0, len(images), batch_size):
        x = normalise(images[i : i + batch_size], mean=mean, std=std)
        feats, earlier = stage_maps(net, x, [-2 - k for k in range(stages - 1)]) if stages > 1 else (None, [])
        if feats is None:
            feats = net.forward_features(x)  # type: ignore[operator]
        last = F.adaptive_avg_pool2d(feats, grid).flatten(1) if feats.ndim == 4 else feats.mean(dim=1)
        for into, fmap in zip(
            out, [last, *(F.adaptive_avg_pool2d(m, grid).flatten(1) for m in earlier)], strict=True
        ):
            into.append(fmap.float().numpy())
    return [np.concatenate(parts) for parts in out]


def grid_features(
    model: nn.Module,
    images: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    grid: int,
    batch_size: int,
    layers: str = "last",
) -> np.ndarray:
    """(N, D) float32: :func:`stage_grids` concatenated, the last stage's columns first, for a fixed
    ``layers`` (``last``: C * grid * grid columns; ``last+prev``: followed by the previous stage's;
    ``last3``: and the one before that)."""
    if layers not in STAGES_READ:
        raise ConfigError(f"label efficiency: probe_layers {layers!r}: use one of {', '.join(PROBE_LAYERS)}")
    parts = stage_grids(model, images, mean=mean, std=std, grid=grid, batch_size=batch_size,
                        stages=STAGES_READ[layers])  # fmt: skip
    return np.concatenate(parts, axis=1)


def auto_layers(net: nn.Module) -> tuple[str, ...]:
    """``probe_layers: auto``'s choices on this backbone: those of :data:`AUTO_LAYERS` it has the stages
    for (a backbone with fewer: ``last+prev`` alone, or ``last``), so ``auto`` holds on any model."""
    stages = readable_stages(base_model(net))
    return tuple(c for c in AUTO_LAYERS if STAGES_READ[c] <= stages) or ("last",)


def _read_layers(settings: EvalSettings, net: nn.Module) -> str:
    """The fixed layers a probe's features are read at (``auto`` reads the widest of its choices)."""
    if settings.probe_layers == "auto":
        return max(auto_layers(net), key=STAGES_READ.__getitem__)
    return settings.probe_layers


def probe_features(
    net: nn.Module | None,
    images: np.ndarray,
    *,
    settings: EvalSettings,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """(N, D) what a probe reads: ``net``'s :func:`grid_features` of ``images`` (raw pixels, flattened,
    for ``net=None``), followed by those of the mirror images when ``settings.mirror``. With
    ``probe_layers: auto`` the widest choice; :func:`probe_columns` names each choice's columns."""
    views = [images, np.ascontiguousarray(images[..., ::-1])] if settings.mirror else [images]
    return np.concatenate([
        v.reshape(len(v), -1) if net is None else grid_features(
            net, v, mean=mean, std=std, grid=settings.grid, batch_size=settings.feature_batch_size,
            layers=_read_layers(settings, net))
        for v in views
    ], axis=1)  # fmt: skip


def probe_columns(
    net: nn.Module | None,
    image: np.ndarray,
    *,
    settings: EvalSettings,
    mean: Sequence[float],
    std: Sequence[float],
) -> dict[str, np.ndarray] | None:
    """For ``probe_layers: auto`` and a backbone: each choice of :data:`AUTO_LAYERS` -> the columns of
    :func:`probe_features` it reads (in each view, the first stages' blocks), found from one ``image``
    (1, C, H, W); None otherwise (one fixed set of columns)."""
    if net is None or settings.probe_layers != "auto":
        return None
    blocks = stage_grids(net, image, mean=mean, std=std, grid=settings.grid, batch_size=1,
                         stages=STAGES_READ[_read_layers(settings, net)])  # fmt: skip
    widths = np.cumsum([0, *(block.shape[1] for block in blocks)])
    views = 2 if settings.mirror else 1
    return {
        layers: np.concatenate(
            [v * widths[-1] + np.arange(widths[STAGES_READ[layers]]) for v in range(views)]
        )
        for layers in auto_layers(net)
    }


def probe_accuracy(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    settings: EvalSettings,
    columns: Mapping[str, np.ndarray] | None = None,
) -> tuple[float, float | None]:
    """(test accuracy, C) of :func:`probe_fit` (C None where the classifier chosen has none: ``lda``)."""
    fit = probe_fit(x_train, y_train, x_test, y_test, settings=settings, columns=columns)
    return fit.accuracy, fit.C


@dataclass(frozen=True)
class ProbeFit:
    accuracy: float
    C: float | None
    """The logistic regression's C (None for ``lda`` alone)."""
    layers: str | None
    """The choice of ``columns`` the cross-validation picked (None: all columns, no choice)."""
    classifier: str = "logistic"
    """The classifier fitted (:data:`PROBE_CLASSIFIERS`; what ``auto`` chose)."""


@dataclass(frozen=True)
class _Choice:
    classifier: str
    C: float | None
    score: float
    """Mean validation accuracy over the folds; -1 where none was measured."""


def probe_fit(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    settings: EvalSettings,
    columns: Mapping[str, np.ndarray] | None = None,
) -> ProbeFit:
    """Test accuracy of the probe's linear classifier (``settings.probe_classifier``; for ``auto`` and
    C, the choice of :func:`_cv_choice` on the training rows only). ``columns`` (name -> column indices,
    from :func:`probe_columns`): the cross-validation also chooses which set of columns it reads, the
    best mean validation accuracy over every (columns, classifier, C), ties to the first named."""
    x, x_te = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    layers = None
    if columns:
        many = len(columns) > 1  # a choice of maps is made by the CV score even of a single candidate
        scored = {
            name: _cv_choice(x[:, cols], y_train, settings, score=many) for name, cols in columns.items()
        }
        layers = max(scored, key=lambda name: scored[name].score)  # first of equal scores: dict order
        choice = scored[layers]
        x, x_te = x[:, columns[layers]], x_te[:, columns[layers]]
    else:
        choice = _cv_choice(x, y_train, settings)
    clf = _ProbeClassifier(choice.classifier, choice.C, settings.probe_max_iter).fit(x, y_train)
    return ProbeFit(float((clf.predict(x_te) == y_test).mean()), choice.C, layers, choice.classifier)


def choose_probe_C(x: np.ndarray, y: np.ndarray, *, settings: EvalSettings) -> float:
    """The logistic regression's C: ``settings.probe_C`` when set, else the grid value with the best mean
    validation accuracy over a stratified k-fold split of the labelled rows (at most
    ``probe_cv_max_rows`` of them); ties go to the smaller C (stronger regularisation). Folds shrink to
    the rarest class's count; below 2 images in a class, ``probe_C_fallback``."""
    c = _cv_choice(x, y, dataclasses.replace(settings, probe_classifier="logistic")).C
    assert c is not None  # every logistic candidate has a C
    return c


class _ProbeClassifier:
    """One of :data:`PROBE_CLASSIFIERS`, fitted: logistic on standardised features, shrinkage LDA on the
    features as read, or both with their class probabilities averaged."""

    def __init__(self, kind: str, C: float | None, max_iter: int) -> None:
        from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.parts: list[Any] = []
        if kind in ("logistic", "logistic+lda"):
            self.parts.append(make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter)))
        if kind in ("lda", "logistic+lda"):
            self.parts.append(LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"))

    def fit(self, x: np.ndarray, y: np.ndarray) -> _ProbeClassifier:
        for part in self.parts:
            part.fit(x, y)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        if len(self.parts) == 1:
            return self.parts[0].predict(x)
        proba = sum(part.predict_proba(x) for part in self.parts)
        return self.parts[0].classes_[np.argmax(proba, axis=1)]


def _classifiers(settings: EvalSettings) -> tuple[str, ...]:
    kind = settings.probe_classifier
    if kind == "auto":
        return PROBE_CLASSIFIERS
    if kind not in PROBE_CLASSIFIERS:
        raise ConfigError(
            f"label efficiency: probe_classifier {kind!r}: use auto or one of {', '.join(PROBE_CLASSIFIERS)}"
        )
    return (kind,)


def _cv_choice(x: np.ndarray, y: np.ndarray, settings: EvalSettings, *, score: bool = False) -> _Choice:
    """The (classifier, C) with the best mean validation accuracy over a stratified k-fold split of the
    labelled rows (at most ``probe_cv_max_rows``), among ``settings.probe_classifier``'s candidates
    (for ``auto``, every classifier of :data:`PROBE_CLASSIFIERS`) and, for those with a logistic part,
    ``probe_C_grid`` (or the fixed ``probe_C``); ties to the first classifier named, then the smaller C.
    With a single candidate (unless ``score``: its score is wanted, to compare sets of columns), or a
    class of fewer than 2 images, nothing is measured (score -1; C: ``probe_C_fallback`` when the grid
    has several values and no fold can be made)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    kinds = _classifiers(settings)
    grid = [float(settings.probe_C)] if settings.probe_C is not None else sorted(settings.probe_C_grid)
    candidates = [(k, None if k == "lda" else c) for k in kinds for c in (grid if k != "lda" else [None])]
    if len(x) > settings.probe_cv_max_rows:
        keep = labelled_subset(y, settings.probe_cv_max_rows / len(x), seed=settings.seed, subset=0)
        x, y = x[keep], y[keep]
    folds = min(settings.probe_cv_folds, int(np.unique(y, return_counts=True)[1].min()))
    if (len(candidates) == 1 and not score) or folds < 2:
        kind, c = candidates[0]
        if c is not None and len(grid) > 1:
            c = settings.probe_C_fallback
        return _Choice(kind, c, -1.0)
    scores = dict.fromkeys(candidates, 0.0)
    logistic = any(k != "lda" for k in kinds)
    lda = any(k != "logistic" for k in kinds)
    for tr, va in StratifiedKFold(folds, shuffle=True, random_state=settings.seed).split(x, y):
        p_lda = (
            LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x[tr], y[tr]).predict_proba(x[va])
            if lda
            else None
        )
        classes = np.unique(y[tr])
        if p_lda is not None and ("lda", None) in scores:
            scores[("lda", None)] += float((classes[p_lda.argmax(1)] == y[va]).mean())
        if not logistic:
            continue
        scaler = StandardScaler().fit(x[tr])
        x_tr, x_va = scaler.transform(x[tr]), scaler.transform(x[va])
        # warm start along the C path (small to large): each fit starts near its optimum
        clf = LogisticRegression(max_iter=settings.probe_max_iter, warm_start=True)
        for c in grid:
            proba = clf.set_params(C=c).fit(x_tr, y[tr]).predict_proba(x_va)
            for kind, p in (("logistic", proba), ("logistic+lda", None if p_lda is None else proba + p_lda)):
                if (kind, c) in scores and p is not None:
                    scores[(kind, c)] += float((classes[p.argmax(1)] == y[va]).mean())
    best = max(candidates, key=scores.__getitem__)  # first of equal scores: candidates' order
    return _Choice(best[0], best[1], scores[best] / folds)


Features = tuple[np.ndarray, np.ndarray, "dict[str, np.ndarray] | None"]
"""A probe's (train features, test features, :func:`probe_columns`' choices or None)."""

ScratchTrainer = Callable[[Split, Split, int], float]
"""(labelled subset, test split, epochs) -> test accuracy of imgflow's recipe trained from scratch."""


def scratch_epochs(n: int, settings: EvalSettings) -> int:
    """Epochs giving about ``scratch_steps`` optimiser steps on ``n`` images (1..scratch_max_epochs)."""
    per_epoch = max(1, math.ceil(n / settings.scratch_batch_size))
    return int(min(settings.scratch_max_epochs, max(1, round(settings.scratch_steps / per_epoch))))


# --------------------------------------------------------------------------- the report


def label_efficiency(
    train: Split,
    test: Split,
    *,
    ssl_backbone: nn.Module,
    random_backbone: nn.Module,
    mean: Sequence[float],
    std: Sequence[float],
    train_scratch: ScratchTrainer,
    backbone_spec: dict[str, Any],
    settings: EvalSettings = EvalSettings(),
    full_scratch_accuracy: float | None = None,
    train_finetune: ScratchTrainer | None = None,
    notes: Sequence[str] = (),
) -> LabelEfficiencyReport:
    """Fit every method on every (fraction, subset) and score it on ``test``.

    ``full_scratch_accuracy``: the 100% scratch figure from elsewhere (e.g. the registered champion,
    trained on this very data version); None trains it here like the others. ``train_finetune``: the
    recipe started from the SSL backbone (:func:`recipe_scratch_trainer` with ``init_dir``); None: no
    ``ssl_finetune`` rows.
    """
    if settings.grid < 1 or not settings.fractions:
        raise ConfigError("label efficiency: grid >= 1 and at least one fraction")
    if settings.probe_C is None and (not settings.probe_C_grid or min(settings.probe_C_grid) <= 0):
        raise ConfigError("label efficiency: probe_C_grid needs positive values when probe_C is None")
    _classifiers(settings)  # an unknown probe_classifier fails before any work
    # grid_features rejects an unknown probe_layers before any work
    feats: dict[str, Features] = {}
    for name, net in (("ssl_probe", ssl_backbone), ("random_init", random_backbone), ("pixels", None)):
        read = [
            probe_features(net, split.images, settings=settings, mean=mean, std=std)
            for split in (train, test)
        ]
        columns = probe_columns(net, train.images[:1], settings=settings, mean=mean, std=std)
        feats[name] = (read[0], read[1], columns)
    rows: list[Row] = []
    for fraction in settings.fractions:
        for subset in range(1 if fraction >= 1.0 else settings.subsets):
            idx = labelled_subset(train.labels, fraction, seed=settings.seed, subset=subset)
            full = full_scratch_accuracy if fraction >= 1.0 else None
            rows += _subset_rows(train, test, idx, feats, train_scratch, settings, fraction, subset, full)
            if train_finetune is not None:
                t0 = time.perf_counter()
                acc = train_finetune(Split(train.images[idx], train.labels[idx]), test,
                                     scratch_epochs(len(idx), settings))  # fmt: skip
                rows.append(Row("ssl_finetune", fraction, subset, len(idx), acc, time.perf_counter() - t0))
            logger.info("label efficiency %s subset %d: %s", _pct(fraction), subset, rows[-5:])
    return LabelEfficiencyReport(
        rows=rows, settings=settings, backbone=dict(backbone_spec), notes=list(notes)
    )


def _subset_rows(
    train: Split,
    test: Split,
    idx: np.ndarray,
    feats: dict[str, Features],
    train_scratch: ScratchTrainer,
    settings: EvalSettings,
    fraction: float,
    subset: int,
    full_scratch_accuracy: float | None,
) -> list[Row]:
    """Every method fitted on the labelled rows ``idx`` of ``train``, scored on ``test``."""
    y, rows = train.labels[idx], []
    for method, (x_tr, x_te, columns) in feats.items():
        t0 = time.perf_counter()
        fit = probe_fit(x_tr[idx], y, x_te, test.labels, settings=settings, columns=columns)
        layers = fit.layers or (None if method == "pixels" else settings.probe_layers)
        rows.append(Row(method, fraction, subset, len(idx), fit.accuracy, time.perf_counter() - t0,
                        probe_C=fit.C, probe_layers=layers, probe_classifier=fit.classifier))  # fmt: skip
    if full_scratch_accuracy is not None:
        return [*rows, Row("scratch", fraction, subset, len(idx), full_scratch_accuracy, 0.0)]
    t0 = time.perf_counter()
    acc = train_scratch(Split(train.images[idx], y), test, scratch_epochs(len(idx), settings))
    return [*rows, Row("scratch", fraction, subset, len(idx), acc, time.perf_counter() - t0)]


def write_markdown(report: LabelEfficiencyReport, path: Path) -> Path:
    """The summary as a Markdown table (mean test accuracy per method and fraction)."""
    fractions = [_pct(f) for f in report.settings.fractions]
    lines = ["| method | " + " | ".join(fractions) + " |", "|---" * (len(fractions) + 1) + "|"]
    for method, by in report.summary().items():
        lines.append(f"| {method} | " + " | ".join(f"{100 * by[p]:.1f}" for p in fractions) + " |")
    lines += ["", *(f"- {n}" for n in report.notes)]
    path.write_text("\n".join(lines) + "\n")
    return path


def report_section(data: dict[str, Any] | None) -> Any:
    """The gate report's "Label efficiency" section (absent until ``imgflow label-efficiency`` has run)."""
    from components.core import report as kit

    if not data:
        return None
    summary: dict[str, dict[str, float]] = data["summary"]
    fractions = list(next(iter(summary.values())))
    rows = [[m, *(f"{100 * by[p]:.1f}" for p in fractions)] for m, by in summary.items()]
    backbone = data.get("backbone") or {}
    return kit.section(
        "Label efficiency",
        kit.paragraph(
            f"Mean test accuracy (%) with {', '.join(fractions)} of the train labels, "
            f"{data['settings']['subsets']} seeded subsets each; SSL backbone: {backbone.get('method', '?')} "
            f"{backbone.get('model', '?')} (data hash {backbone.get('data_hash', '?')})."
        ),
        kit.table(["method", *fractions], rows),
        *(kit.note(n) for n in data.get("notes", [])),
    )


def train_init_probe_share(recipe: Any) -> float:
    """The share of a full run's epochs that ``train.init: ssl:<run>`` trains the head alone for
    (``train.init_probe_epochs / train.epochs``): what a shorter run of the same recipe probes for."""
    return recipe.init_probe_epochs / max(1, recipe.epochs)


def recipe_scratch_trainer(
    recipe: Any,
    *,
    device: str = "cpu",
    init_dir: Path | None = None,
    probe_share: float = 0.0,
    mirror: bool = False,
) -> ScratchTrainer:
    """A :data:`ScratchTrainer` running imgflow's supervised recipe (``TrainRecipe``: model, training
    augmentation, loss, optimiser, cosine schedule, AMP/channels-last) in this process, one worker's loop
    without Ray: the comparison is about the labels, not the orchestration.

    ``init_dir``: an SSL backbone folder to start from, as ``train.init: ssl:<run>`` does (with LP-FT, the
    head alone for ``probe_share`` of the epochs, rounded down; 0: none); None: from scratch. ``mirror``: predict the
    mean logits of each test image and its mirror (``train.tta: hflip``)."""
    from torch.utils.data import DataLoader

    from components.data.datasets import InMemoryDataset, batch_collate
    from components.train import torch_recipe as tr
    from components.train.augment import attach as attach_augment
    from components.train.engine import seed_everything, train_one_epoch

    dev = torch.device(device)

    def fit(subset: Split, test: Split, epochs: int) -> float:
        r = dataclasses.replace(
            recipe, epochs=epochs, init_dir=init_dir, early_stopping_patience=None, snapshots=None,
            init_probe_epochs=int(epochs * probe_share),
        )  # fmt: skip
        model, spec = tr.build_model(r)
        dc = spec.data_config
        seed_everything(r.seed)
        ds = InMemoryDataset(
            subset.images, subset.labels, mean=dc["mean"], std=dc["std"], train=True, hflip=r.hflip,
            scale=r.scale, random_erasing=r.random_erasing, flip_base=tr.epoch_flips(r, len(subset.labels)),
        )  # fmt: skip
        ds = attach_augment(ds, r.augment, mean=dc["mean"], std=dc["std"])  # train.augment, as the workers do
        loader = DataLoader(ds, batch_size=min(r.batch_size, len(ds)), shuffle=True, collate_fn=batch_collate,
                            generator=torch.Generator().manual_seed(r.seed))  # fmt: skip
        if r.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = model.to(dev)
        optimizer, scheduler = tr.build_optimizer(model, r, len(loader))
        opts = tr.build_step_options(r, model, dev)
        loss_fn = tr.build_train_loss(r, opts, subset.labels)
        for epoch in range(epochs):
            tr.set_loader_epoch(loader, epoch)
            train_one_epoch(model, loader, optimizer, loss_fn, device=dev, scheduler=scheduler,
                            start_step=epoch * len(loader), opts=opts, input_scale=tr.input_scale(r, epoch))  # fmt: skip
        if mirror:
            from components.model.checkpoint import FlipTTA

            model = FlipTTA(model, subset.images.shape[-1]).to(dev)
        return _accuracy(model, test, mean=dc["mean"], std=dc["std"], device=dev)

    return fit


@torch.no_grad()
def _accuracy(
    model: nn.Module, test: Split, *, mean: Sequence[float], std: Sequence[float], device: torch.device
) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(test.images), 512):
        logits = model(normalise(test.images[i : i + 512], mean=mean, std=std).to(device))
        correct += int((logits.argmax(1).cpu().numpy() == test.labels[i : i + 512]).sum())
    return correct / max(1, len(test.labels))


def load_split(manifest: Path, data_dir: Path, split: str, classes: Sequence[str], *, in_chans: int, side: int,
               cache_dir: Path) -> Split:  # fmt: skip
    """A single-label split decoded at the model's side (cached like training's), with class indices."""
    from components.data.datasets import cache_key, cached_split_array, encode_targets, split_rows
    from components.data.manifest import read_manifest
    from components.model.models import image_mode

    rows = split_rows(read_manifest(manifest), split)
    if rows.empty:
        raise ConfigError(f"label efficiency: the data version has no {split} split")
    paths = [data_dir / p for p in rows["path"]]
    geometry: dict[str, Any] = {
        "mode": image_mode(in_chans),
        "side": side,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    }
    images = cached_split_array(
        paths,
        cache_file=cache_dir / f"{split}-le-{cache_key(paths, **geometry)}.npy",
        data_dir=data_dir,
        **geometry,
    )
    labels = np.asarray(encode_targets(rows, classes, "singlelabel"))
    if labels.ndim != 1:
        raise ConfigError("label efficiency is for single-label data (one class per image)")
    return Split(np.asarray(images), labels.astype(np.int64))
