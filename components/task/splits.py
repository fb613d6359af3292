"""Deterministic, stratified, order-independent train/val/test assignment.

How a dataset is stratified is its task's (:meth:`components.task.Task.assign_splits`): per class with
exact quotas (single-label), or by iterative stratification of the label sets (multi-label).
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence
from fractions import Fraction

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")


def split_quotas(n: int, *, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) counts for one class of ``n`` images.

    Largest-remainder rounding of ``n * fraction`` (ties go to train, then val, then test). When
    ``n >= 3`` a split with a fraction > 0 gets at least one image, and train always keeps one.
    """
    # Fraction(str(x)) is the decimal the user wrote (0.1 -> 1/10), so 0.1 * 30 is exactly 3.
    fracs = (
        1 - Fraction(str(val_fraction)) - Fraction(str(test_fraction)),
        Fraction(str(val_fraction)),
        Fraction(str(test_fraction)),
    )
    ideal = [n * f for f in fracs]
    quota = [math.floor(x) for x in ideal]
    by_remainder = sorted(range(3), key=lambda i: (-(ideal[i] - quota[i]), i))
    for i in by_remainder[: n - sum(quota)]:
        quota[i] += 1
    if n >= 3:
        for i in (1, 2):
            if fracs[i] > 0 and quota[i] == 0:
                donor = max(range(3), key=lambda j: (quota[j], -j))
                quota[donor] -= 1
                quota[i] += 1
    if n >= 1 and quota[0] == 0:
        donor = max((1, 2), key=lambda j: quota[j])
        quota[donor] -= 1
        quota[0] += 1
    return quota[0], quota[1], quota[2]


def _order_keys(seed: int, image_ids: Sequence[str]) -> list[str]:
    """``sha256(f"{seed}:{image_id}")`` (hex) per id: the order rows take within a class."""
    prefix, sha256 = f"{seed}:".encode(), hashlib.sha256  # hoisted: a re-ingest orders every image
    return [sha256(prefix + image_id.encode()).hexdigest() for image_id in image_ids]


def _check_split_args(image_ids: Sequence[str], labels: Sequence[object], val_fraction: float,
                      test_fraction: float) -> None:  # fmt: skip
    if len(image_ids) != len(labels):
        raise ValueError(f"{len(image_ids)} image_ids but {len(labels)} labels")
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("image_ids must be unique (deduplicate byte-identical images first)")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction}, test_fraction={test_fraction}: each must be in [0, 1) "
            "and their sum < 1"
        )


def assign_splits(
    image_ids: Sequence[str],
    labels: Sequence[str],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> list[str]:
    """'train'/'val'/'test' per row, aligned with ``image_ids``.

    Stratified per label with exact per-class quotas (:func:`split_quotas`). Within a class,
    images are ordered by ``sha256(f"{seed}:{image_id}")``; the first ``test`` go to test, the
    next ``val`` to val, the rest to train. The result depends only on the (image_id, label)
    pairs and the seed, never on input order. ``image_ids`` must be unique.
    """
    _check_split_args(image_ids, labels, val_fraction, test_fraction)
    by_class: dict[str, list[int]] = defaultdict(list)
    for row, label in enumerate(labels):
        by_class[label].append(row)
    out = ["train"] * len(image_ids)
    keys = _order_keys(seed, image_ids)
    for rows in by_class.values():
        rows.sort(key=keys.__getitem__)
        _, n_val, n_test = split_quotas(len(rows), val_fraction=val_fraction, test_fraction=test_fraction)
        for r in rows[:n_test]:
            out[r] = "test"
        for r in rows[n_test : n_test + n_val]:
            out[r] = "val"
    return out


def assign_multilabel_splits(
    image_ids: Sequence[str],
    label_sets: Sequence[Sequence[str]],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> list[str]:
    """'train'/'val'/'test' per row for multi-label data: iterative stratification (Sechidis et al.
    2011, the ``iterative-stratification`` package), so every label's share of each split is close to
    the split's fraction, rare labels first.

    Order-independent like :func:`assign_splits`: rows are put in ``sha256(f"{seed}:{image_id}")``
    order before the (seeded) algorithm runs, so the result depends only on the (image_id, label set)
    pairs and the seed.
    """
    from iterstrat.ml_stratifiers import IterativeStratification

    _check_split_args(image_ids, label_sets, val_fraction, test_fraction)
    import numpy as np

    order = sorted(range(len(image_ids)), key=_order_keys(seed, image_ids).__getitem__)
    names = sorted({lab for labels in label_sets for lab in labels})
    index = {c: i for i, c in enumerate(names)}
    y = np.zeros((len(order), len(names)), dtype=bool)  # bool: the package indexes label columns by it
    for k, r in enumerate(order):
        y[k, [index[lab] for lab in label_sets[r]]] = True
    folds = [(s, f) for s, f in zip(SPLIT_NAMES, (1 - val_fraction - test_fraction, val_fraction,
                                                  test_fraction), strict=True) if f > 0]  # fmt: skip
    out = ["train"] * len(image_ids)
    if len(order) == 0 or len(folds) == 1:
        return out
    assigned = IterativeStratification(
        labels=y, r=np.asarray([f for _, f in folds]), random_state=np.random.RandomState(seed)
    )
    for k, r in enumerate(order):
        out[r] = folds[int(assigned[k])][0]
    return out
