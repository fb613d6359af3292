"""Episodic few-shot evaluation: N-way K-shot episodes, the same seeded episodes for every method.

An episode draws ``n_way`` classes, ``k`` support and ``n_query`` query images of each; a method
classifies the queries by the nearest class prototype of its support features. Written here rather
than taken from easyfsl (not in the lock): the whole of it is the sampler and two distance rules.

- ``protonet``: prototypes are the mean support feature, queries go to the nearest one in Euclidean
  distance (Snell et al. 2017, without episodic training: the features are the model's as trained).
- ``simpleshot``: features centred and L2-normalised first (CL2N, Wang et al. 2019), then the nearest
  prototype by cosine. The centre is what ``imgflow classes add`` uses: the class-balanced mean over
  the base classes' means and the episode's support-class means (given the base class means, (C, D)),
  or a fixed (D,) vector. Centring on the base mean alone cost 7-8 points on Fashion-MNIST's held-out
  classes, far from the base ones (docs/few-shot.md): the shared offset dominates after normalising.
- ``l2n``: L2-normalised without centring, the same cosine rule (reported beside SimpleShot).

Episodes are sampled once, with the largest K; a smaller K uses the first K supports of each class, so
1-, 5- and 10-shot share their queries, and every representation (raw pixels, a random-init backbone,
the trained one) sees the very same images. Vectorised over episodes: 300 5-way episodes on cached
features take well under a second.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from components.core.errors import ConfigError

METHODS: tuple[str, ...] = ("protonet", "simpleshot", "l2n")
DEFAULT_METHODS: tuple[str, ...] = ("protonet", "simpleshot")


@dataclass(frozen=True)
class Episodes:
    """Row indices of every episode into the evaluated feature matrix."""

    classes: np.ndarray
    """(E, n_way) the class ids drawn."""
    support: np.ndarray
    """(E, n_way, max_k) support rows, class by class."""
    query: np.ndarray
    """(E, n_way, n_query) query rows."""

    @property
    def max_k(self) -> int:
        return int(self.support.shape[2])


def sample_episodes(
    labels: np.ndarray, *, n_way: int, k: int, n_query: int, episodes: int, seed: int = 0
) -> Episodes:
    """``episodes`` seeded episodes over (N,) ``labels``: support and query rows disjoint within an
    episode. A ConfigError when too few classes or too few images per class exist."""
    labels = np.asarray(labels)
    counts = {c: int((labels == c).sum()) for c in np.unique(labels)}
    usable = sorted(c for c, n in counts.items() if n >= k + n_query)
    if n_way < 2 or len(usable) < n_way:
        raise ConfigError(
            f"{n_way}-way {k}-shot episodes with {n_query} queries need {max(n_way, 2)} classes of at least "
            f"{k + n_query} images; {len(usable)} of {len(counts)} classes have that many"
        )
    rows = {c: np.flatnonzero(labels == c) for c in usable}
    rng = np.random.default_rng(seed)
    classes = np.stack([rng.choice(usable, size=n_way, replace=False) for _ in range(episodes)])
    picked = np.array([[rng.choice(rows[c], size=k + n_query, replace=False) for c in ep] for ep in classes])
    return Episodes(classes=classes, support=picked[:, :, :k], query=picked[:, :, k:])


def _predict(support: np.ndarray, query: np.ndarray, *, euclidean: bool) -> np.ndarray:
    """support (E, n, k, D), query (E, Q, D) -> (E, Q) index of the nearest prototype."""
    protos = support.mean(axis=2)  # (E, n, D)
    if euclidean:
        d = (
            (query**2).sum(-1)[:, :, None]
            - 2 * query @ protos.transpose(0, 2, 1)
            + (protos**2).sum(-1)[:, None, :]
        )
        return np.asarray(d.argmin(axis=2))
    protos = protos / np.maximum(np.linalg.norm(protos, axis=-1, keepdims=True), 1e-12)
    return np.asarray((query @ protos.transpose(0, 2, 1)).argmax(axis=2))


def cl2n(feats: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """SimpleShot's centring and L2 normalisation: (N, D) features, (D,) base mean."""
    x = feats - centre[None, :]
    return np.asarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def episode_accuracies(feats: np.ndarray, episodes: Episodes, *, k: int, method: str,
                       centre: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """(E,) query accuracy of each episode with the first ``k`` supports, features (N, D); ``centre``:
    SimpleShot's (D,) centre or base class means (C, D), see :func:`_episode_centres`."""
    if method not in METHODS:
        raise ConfigError(f"unknown few-shot method {method!r}: use one of {', '.join(METHODS)}")
    if k > episodes.max_k:
        raise ConfigError(f"k={k} is more than the {episodes.max_k} supports the episodes were drawn with")
    x = np.asarray(feats, dtype=np.float32)
    e, n, q = episodes.query.shape
    support = x[episodes.support[:, :, :k]]  # (E, n, k, D)
    query = x[episodes.query.reshape(e, n * q)]  # (E, n*q, D)
    if method == "simpleshot":
        c = _episode_centres(x, support, centre)  # (E, D)
        support, query = _l2(support - c[:, None, None, :]), _l2(query - c[:, None, :])
    elif method == "l2n":
        support, query = _l2(support), _l2(query)
    truth = np.repeat(np.arange(n), q)[None, :]
    pred = _predict(support, query, euclidean=method == "protonet")
    return np.asarray((pred == truth).mean(axis=1))


def _l2(x: np.ndarray) -> np.ndarray:
    return np.asarray(x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12), dtype=np.float32)


def _episode_centres(x: np.ndarray, support: np.ndarray, centre: np.ndarray | None) -> np.ndarray:
    """(E, D) SimpleShot centre of each episode: a fixed (D,) ``centre`` (default: the mean of ``x``),
    or, given the base class means (C, D), the mean of those C means and the episode's n support-class
    means, every class weighing the same (as :func:`components.model.fewshot.add_classes` centres)."""
    e = support.shape[0]
    c = x.mean(axis=0) if centre is None else np.asarray(centre, dtype=np.float32)
    if c.ndim == 1:
        return np.broadcast_to(c, (e, x.shape[1]))
    class_means = support.mean(axis=2)  # (E, n, D)
    return np.asarray((c.sum(axis=0)[None, :] + class_means.sum(axis=1)) / (len(c) + class_means.shape[1]))


@dataclass(frozen=True)
class FewShotRow:
    """One (representation, method, k) cell of the table: mean accuracy over the episodes."""

    features: str
    method: str
    k: int
    accuracy: float
    ci95: float
    """Half-width of the 95% interval of the mean (1.96 standard errors over episodes)."""
    episodes: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def evaluate_episodes(
    features: Mapping[str, np.ndarray],
    labels: np.ndarray,
    *,
    n_way: int = 5,
    ks: Sequence[int] = (1, 5, 10),
    n_query: int = 15,
    episodes: int = 300,
    seed: int = 0,
    methods: Sequence[str] = DEFAULT_METHODS,
    centres: Mapping[str, np.ndarray] | None = None,
) -> list[FewShotRow]:
    """Every representation in ``features`` (name -> (N, D), rows aligned with ``labels``) x method x
    k on ONE set of seeded episodes. ``centres``: per representation, SimpleShot's base class means (C, D)
    (centre = their balanced mean with the episode's support means) or a fixed (D,) centre (default: the
    mean of the evaluated rows)."""
    if not ks or min(ks) < 1:
        raise ConfigError(f"k must be positive shot counts, got {list(ks)}")
    eps = sample_episodes(labels, n_way=n_way, k=max(ks), n_query=n_query, episodes=episodes, seed=seed)
    rows = []
    for name, feats in features.items():
        if len(feats) != len(labels):
            raise ConfigError(f"features {name!r}: {len(feats)} rows for {len(labels)} labels")
        for method in methods:
            for k in sorted(ks):
                acc = episode_accuracies(feats, eps, k=k, method=method, centre=(centres or {}).get(name))
                ci = 1.96 * float(acc.std(ddof=1)) / np.sqrt(len(acc)) if len(acc) > 1 else 0.0
                rows.append(FewShotRow(name, method, int(k), float(acc.mean()), ci, len(acc)))
    return rows


def table_text(rows: Sequence[FewShotRow]) -> str:
    """The rows as an aligned text table (accuracy in percent with its 95% half-width)."""
    lines = [f"{'features':<14} {'method':<11} {'k':>3}  accuracy"]
    lines += [
        f"{r.features:<14} {r.method:<11} {r.k:>3}  {100 * r.accuracy:5.1f}% ± {100 * r.ci95:.1f}"
        for r in rows
    ]
    return "\n".join(lines)
