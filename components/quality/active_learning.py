"""Active learning: which unlabelled images are worth labelling next (pure numpy / scikit-learn).

The heuristics follow baal's interface: they read a probability array ``probs`` of shape
``[N, C, T]`` (N images, C classes, T stochastic passes or committee members; T = 1 allowed) and
return one score per image, higher = more worth a label:

- ``margin``: 1 - (p1 - p2), the gap between the two most likely classes of the mean prediction;
- ``entropy``: the entropy of the mean prediction;
- ``least_confident``: 1 - max p;
- ``bald``: mutual information between the label and the model (entropy of the mean minus the mean
  of the members' entropies); with T = 1 there is no disagreement to measure, so it falls back to
  ``entropy`` and says so (:attr:`Scored.note`);
- ``random``: a seeded random order (the control every strategy is compared with).

``typical`` (TypiClust cold start, Hacohen et al. 2022) reads the embedding instead: k-means with
``budget`` centroids, the most typical image of each cluster (densest: nearest its neighbours), the
largest clusters first.

:func:`select` takes the top of a ranking while dropping near-duplicates within the batch (the same
perceptual hash, or cosine similarity of the embeddings above a threshold): one image per group.
:func:`replay` simulates labelling rounds on already labelled images (a logistic probe on the
embeddings) for each strategy and a random control; :func:`choose` picks the best and says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

UNCERTAINTY: tuple[str, ...] = ("margin", "entropy", "least_confident", "bald")
STRATEGIES: tuple[str, ...] = (*UNCERTAINTY, "typical", "random")
REPLAYED: tuple[str, ...] = ("margin", "entropy", "least_confident", "bald", "typical")
"""The strategies ``auto`` replays against the random control."""
_EPS = 1e-12


@dataclass(frozen=True)
class Scored:
    """One score per image (higher = label it sooner) and what produced it."""

    scores: np.ndarray
    strategy: str
    """The strategy asked for."""
    used: str
    """The strategy that actually scored (``entropy`` for ``bald`` with T = 1)."""
    note: str = ""


def _check_probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 2:  # [N, C]: one pass
        p = p[:, :, None]
    if p.ndim != 3:
        raise ValueError(f"probabilities must be [N, C, T] (or [N, C]); got shape {p.shape}")
    return p


def _entropy(p: np.ndarray, axis: int = 1) -> np.ndarray:
    return -(p * np.log(np.clip(p, _EPS, 1.0))).sum(axis=axis)


def margin(probs: np.ndarray) -> np.ndarray:
    """1 - (top-1 - top-2 probability) of the mean prediction: highest where two classes tie."""
    mean = _check_probs(probs).mean(axis=2)
    if mean.shape[1] < 2:
        return np.zeros(len(mean))
    top = np.sort(mean, axis=1)
    return 1.0 - (top[:, -1] - top[:, -2])


def entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy (nats) of the mean prediction."""
    return _entropy(_check_probs(probs).mean(axis=2))


def least_confident(probs: np.ndarray) -> np.ndarray:
    """1 - the probability of the predicted class."""
    return 1.0 - _check_probs(probs).mean(axis=2).max(axis=1)


def bald(probs: np.ndarray) -> np.ndarray:
    """Mutual information I(y; model) = H(mean_t p_t) - mean_t H(p_t) (Houlsby et al. 2011); 0 when T = 1."""
    p = _check_probs(probs)
    return _entropy(p.mean(axis=2)) - _entropy(p, axis=1).mean(axis=1)


def score(strategy: str, probs: np.ndarray, *, seed: int = 0) -> Scored:
    """Scores of an uncertainty strategy (or ``random``) on ``probs`` [N, C, T]."""
    p = _check_probs(probs)
    if strategy == "random":
        return Scored(np.random.default_rng(seed).random(len(p)), strategy, strategy)
    if strategy == "bald" and p.shape[2] == 1:
        note = ("bald needs T > 1 stochastic passes or committee members to measure disagreement; with "
                "T = 1 it is scored by entropy (the first term of BALD)")  # fmt: skip
        return Scored(entropy(p), strategy, "entropy", note)
    functions = {"margin": margin, "entropy": entropy, "least_confident": least_confident, "bald": bald}
    if strategy not in functions:
        raise ValueError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    return Scored(functions[strategy](p), strategy, strategy)


def typical(features: np.ndarray, budget: int, *, seed: int = 0, neighbours: int = 20) -> Scored:
    """TypiClust cold start (Hacohen et al. 2022): k-means with ``budget`` centroids; in each cluster the
    most *typical* image (highest density: the inverse of its mean distance to its ``neighbours`` nearest
    neighbours within the cluster) scores the cluster's share of the images, so the largest clusters
    come first; every other image scores 0. The features are used as they are (standardising them
    whitens a PCA space and made the picks worse: measured in bench/al_bench.py's notes)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x = np.asarray(features, dtype=np.float64)
    k = max(1, min(budget, len(x)))
    algo = MiniBatchKMeans if len(x) > 50_000 else KMeans
    with one_thread():
        labels = algo(n_clusters=k, random_state=seed, n_init=3).fit(x).labels_
    sizes = np.bincount(labels, minlength=k)
    out = np.zeros(len(x))
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if len(members):
            density = _typicality(x[members], neighbours)
            best = int(np.argmax(density))
            # ties between equal-sized clusters broken by density, so the order is total and reproducible
            out[members[best]] = sizes[c] / len(x) + 1e-9 * density[best] / (1.0 + density[best])
    return Scored(out, "typical", "typical")


def _typicality(x: np.ndarray, neighbours: int) -> np.ndarray:
    """1 / mean distance to the ``neighbours`` nearest other rows (all rows when fewer)."""
    if len(x) == 1:
        return np.ones(1)
    from sklearn.neighbors import NearestNeighbors

    k = min(neighbours, len(x) - 1)
    with one_thread():
        dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    return 1.0 / (dist[:, 1:].mean(axis=1) + 1e-12)


def one_thread() -> Any:
    """Limit BLAS/OpenMP to one thread: these problems are small, and on a busy machine the thread
    pools' contention made a 40-image probe fit 18x slower (0.32 s against 0.017 s, measured)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def _hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


@dataclass(frozen=True)
class Selection:
    """The picked rows (best first) and the near-duplicates dropped on the way (row -> kept row)."""

    rows: tuple[int, ...]
    dropped: dict[int, int] = field(default_factory=dict)


def select(
    scores: np.ndarray,
    budget: int,
    *,
    features: np.ndarray | None = None,
    phashes: Sequence[str] | None = None,
    max_cosine: float = 0.995,
    max_hash_distance: int = 0,
) -> Selection:
    """Up to ``budget`` rows in descending score order (ties: lower row first), one per group of
    near-duplicates: a row is skipped when its perceptual hash is within ``max_hash_distance`` bits
    of a picked row's, or its embedding's cosine similarity to one exceeds ``max_cosine``."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    unit = None
    if features is not None:
        f = np.asarray(features, dtype=np.float64)
        unit = f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-12)
    picked: list[int] = []
    dropped: dict[int, int] = {}
    for row in order:
        if len(picked) >= budget:
            break
        twin = _twin(int(row), picked, unit=unit, phashes=phashes, max_cosine=max_cosine,
                     max_hash_distance=max_hash_distance)  # fmt: skip
        if twin is None:
            picked.append(int(row))
        else:
            dropped[int(row)] = twin
    return Selection(tuple(picked), dropped)


def _twin(
    row: int,
    picked: list[int],
    *,
    unit: np.ndarray | None,
    phashes: Sequence[str] | None,
    max_cosine: float,
    max_hash_distance: int,
) -> int | None:
    """The picked row ``row`` duplicates, or None."""
    if not picked:
        return None
    if phashes is not None and phashes[row]:
        for other in picked:
            if phashes[other] and _hamming(phashes[row], phashes[other]) <= max_hash_distance:
                return other
    if unit is not None:
        sims = unit[picked] @ unit[row]
        best = int(np.argmax(sims))
        if sims[best] > max_cosine:
            return picked[best]
    return None


# ------------------------------------------------------------------------------------------- probes


def fit_probe(x: np.ndarray, y: np.ndarray, *, seed: int = 0) -> Any:
    """A logistic-regression probe on standardised features (scikit-learn pipeline)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=1.0, random_state=seed))
    return probe.fit(x, y)


def probe_probs(
    x_train: np.ndarray, y_train: np.ndarray, x_pool: np.ndarray, *, n_classes: int, members: int = 1,
    seed: int = 0,
) -> np.ndarray:  # fmt: skip
    """[N, C, T] probabilities of the pool under ``members`` probes (T = members): the first fits every
    labelled image, the others bootstrap resamples of them (a committee, BALD's disagreement)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(x_pool), n_classes, members))
    with one_thread():
        for t in range(members):
            _member(out, t, x_train, y_train, x_pool, rng=rng, seed=seed)
    return out


def _member(
    out: np.ndarray, t: int, x_train: np.ndarray, y_train: np.ndarray, x_pool: np.ndarray, *,
    rng: np.random.Generator, seed: int,
) -> None:  # fmt: skip
    """Fit committee member ``t`` and write its pool probabilities into ``out[:, :, t]``."""
    idx = np.arange(len(y_train)) if t == 0 else rng.integers(0, len(y_train), len(y_train))
    if len(np.unique(y_train[idx])) < 2:  # a resample with one class cannot be fit
        idx = np.arange(len(y_train))
    probe = fit_probe(x_train[idx], y_train[idx], seed=seed + t)
    out[:, probe.classes_, t] = probe.predict_proba(x_pool)


def rank(
    strategy: str,
    *,
    budget: int,
    pool: np.ndarray,
    probs: np.ndarray | None = None,
    seed: int = 0,
) -> Scored:
    """Scores of ``strategy`` over the pool: ``typical`` from the embeddings ``pool``, the others from
    ``probs`` ([N, C, T]; required for them)."""
    if strategy == "typical":
        return typical(pool, budget, seed=seed)
    if probs is None:
        if strategy != "random":
            raise ValueError(f"strategy {strategy!r} needs probabilities")
        probs = np.ones((len(pool), 1, 1))
    return score(strategy, probs, seed=seed)


# ------------------------------------------------------------------------------------------- replay


@dataclass(frozen=True)
class Curve:
    """Accuracy on the held-out images after each simulated round (labels = the labelled count)."""

    strategy: str
    labels: tuple[int, ...]
    accuracy: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracy))


def simulate(
    strategy: str,
    x: np.ndarray,
    y: np.ndarray,
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    *,
    start: int,
    batch: int,
    rounds: int,
    seed: int = 0,
    members: int = 3,
) -> Curve:
    """Label ``start`` random images, then ``rounds`` batches of ``batch`` chosen by ``strategy``;
    after each batch fit a probe on the labelled images and score it on ``(x_eval, y_eval)``."""
    rng = np.random.default_rng(seed)
    n_classes = int(max(y.max(), y_eval.max())) + 1
    labelled = list(rng.choice(len(x), size=min(start, len(x)), replace=False))
    counts, accs = [], []
    for r in range(rounds):
        rest = np.setdiff1d(np.arange(len(x)), labelled)
        if len(rest) == 0:
            break
        probs = None
        if strategy in UNCERTAINTY:
            t = members if strategy == "bald" else 1
            probs = probe_probs(
                x[labelled], y[labelled], x[rest], n_classes=n_classes, members=t, seed=seed + r
            )
        scored = rank(strategy, budget=batch, pool=x[rest], probs=probs, seed=seed * 1000 + r)
        picked = select(scored.scores, batch, features=x[rest]).rows  # de-duplicated, as label-next picks
        labelled += [int(rest[i]) for i in picked]
        probe = fit_probe(x[labelled], y[labelled], seed=seed)
        counts.append(len(labelled))
        accs.append(float((probe.predict(x_eval) == y_eval).mean()))
    return Curve(strategy, tuple(counts), tuple(accs))


@dataclass(frozen=True)
class Choice:
    """What ``auto`` picked, the table it read, and why."""

    strategy: str
    reason: str
    table: list[dict[str, Any]]
    curves: dict[str, list[Curve]]


def replay(
    x: np.ndarray,
    y: np.ndarray,
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    *,
    strategies: Sequence[str] = REPLAYED,
    start: int,
    batch: int,
    rounds: int,
    seeds: Sequence[int] = (0,),
) -> dict[str, list[Curve]]:
    """Each strategy's and the random control's curves, one per seed (same seeds, same start sets)."""
    names = [*dict.fromkeys([*strategies, "random"])]
    with one_thread():
        return _replay(names, x, y, x_eval, y_eval, start=start, batch=batch, rounds=rounds, seeds=seeds)


def _replay(
    names: Sequence[str], x: np.ndarray, y: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray, *,
    start: int, batch: int, rounds: int, seeds: Sequence[int],
) -> dict[str, list[Curve]]:  # fmt: skip
    return {
        name: [simulate(name, x, y, x_eval, y_eval, start=start, batch=batch, rounds=rounds, seed=s)
               for s in seeds]
        for name in names
    }  # fmt: skip


def choose(curves: dict[str, list[Curve]]) -> Choice:
    """The strategy whose mean accuracy over the replayed rounds beats the random control by most;
    ``random`` when none beats it. The table: per strategy the mean accuracy over rounds, the final
    accuracy, and the gain over random in points."""

    def mean_of(name: str) -> float:
        return float(np.mean([c.mean for c in curves[name]]))

    def final_of(name: str) -> float:
        return float(np.mean([c.accuracy[-1] for c in curves[name] if c.accuracy] or [0.0]))

    control = mean_of("random")
    table: list[dict[str, Any]] = [
        {"strategy": name, "mean_accuracy": round(mean_of(name), 4), "final_accuracy": round(final_of(name), 4),
         "gain_vs_random_pt": round(100 * (mean_of(name) - control), 2)}
        for name in curves
    ]  # fmt: skip
    table.sort(key=lambda r: (-r["mean_accuracy"], r["strategy"] != "random", r["strategy"]))
    best = next(r for r in table if r["strategy"] != "random")
    labels = curves["random"][0].labels if curves["random"] else ()
    span = f"{labels[0]}-{labels[-1]} labels" if labels else "no rounds"
    if best["gain_vs_random_pt"] > 0:
        reason = (f"{best['strategy']} beat the random control by {best['gain_vs_random_pt']:+.2f} points of "
                  f"mean probe accuracy over the replayed rounds ({span}, {len(curves['random'])} seed(s)); "
                  f"the best of {', '.join(n for n in curves if n != 'random')}")  # fmt: skip
        return Choice(best["strategy"], reason, table, curves)
    reason = (f"no strategy beat the random control on the replay ({span}); best was {best['strategy']} "
              f"at {best['gain_vs_random_pt']:+.2f} points: labelling a random sample")  # fmt: skip
    return Choice("random", reason, table, curves)
