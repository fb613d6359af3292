"""Split assignment: exact stratified quotas, order independence, determinism."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from components.task.splits import assign_splits, split_quotas


@pytest.mark.parametrize(
    ("n", "val", "test", "expected"),
    [
        (100, 0.1, 0.1, (80, 10, 10)),
        (30, 0.1, 0.1, (24, 3, 3)),  # 0.1 * 30 is exactly 3 (no float drift)
        (15, 0.1, 0.2, (11, 1, 3)),  # remainders .5/.5/0: the tie goes to train
        (12, 0.2, 0.2, (7, 3, 2)),  # remainders .2/.4/.4: the tie goes to val
        (3, 0.1, 0.1, (1, 1, 1)),  # small class: each split with a fraction gets one
        (5, 0.1, 0.1, (3, 1, 1)),
        (2, 0.1, 0.1, (2, 0, 0)),  # under 3 images no minimum is forced
        (1, 0.5, 0.4, (1, 0, 0)),  # train always keeps one
        (3, 0.1, 0.0, (2, 1, 0)),  # no test fraction: no test image
        (10, 0.0, 0.0, (10, 0, 0)),
        (0, 0.1, 0.1, (0, 0, 0)),
    ],
)
def test_split_quotas(n: int, val: float, test: float, expected: tuple[int, int, int]) -> None:
    assert split_quotas(n, val_fraction=val, test_fraction=test) == expected


def test_split_quotas_sum_and_minimums_over_a_grid() -> None:
    for n in range(60):
        for val in (0.0, 0.05, 0.1, 0.25, 0.45):
            for test in (0.0, 0.05, 0.1, 0.3):
                train_n, val_n, test_n = split_quotas(n, val_fraction=val, test_fraction=test)
                assert train_n + val_n + test_n == n
                assert min(train_n, val_n, test_n) >= 0
                if n >= 1:
                    assert train_n >= 1
                if n >= 3:
                    assert (val_n >= 1) == (val > 0)
                    assert (test_n >= 1) == (test > 0)
                # rounding never moves more than one image per split away from the exact share
                # (except where a minimum of one was forced)
                if n >= 3 and val * n >= 1 and test * n >= 1:
                    assert abs(val_n - val * n) < 1 + 1e-9
                    assert abs(test_n - test * n) < 1 + 1e-9


def _dataset(sizes: dict[str, int]) -> tuple[list[str], list[str]]:
    ids, labels = [], []
    for label, n in sizes.items():
        for i in range(n):
            ids.append(f"{label}-{i:04d}")
            labels.append(label)
    return ids, labels


def test_assign_splits_is_stratified_with_exact_quotas() -> None:
    sizes = {"cat": 200, "dog": 57, "eel": 9, "fox": 3}
    ids, labels = _dataset(sizes)
    splits = assign_splits(ids, labels, val_fraction=0.15, test_fraction=0.1, seed=7)
    counts = Counter(zip(labels, splits, strict=True))
    for label, n in sizes.items():
        expected = split_quotas(n, val_fraction=0.15, test_fraction=0.1)
        got = (counts[(label, "train")], counts[(label, "val")], counts[(label, "test")])
        assert got == expected
        assert min(got) >= 1  # every class in every split
    # per-class proportions within one image of the target
    assert counts[("cat", "val")] == 30 and counts[("cat", "test")] == 20


def test_assign_splits_does_not_depend_on_input_order() -> None:
    ids, labels = _dataset({"a": 40, "b": 25, "c": 11})
    reference = dict(
        zip(ids, assign_splits(ids, labels, val_fraction=0.2, test_fraction=0.1, seed=3), strict=True)
    )
    rows = list(zip(ids, labels, strict=True))
    random.Random(0).shuffle(rows)
    shuffled_ids, shuffled_labels = zip(*rows, strict=True)
    shuffled = assign_splits(shuffled_ids, shuffled_labels, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert dict(zip(shuffled_ids, shuffled, strict=True)) == reference


def test_assign_splits_depends_on_seed_and_is_deterministic() -> None:
    ids, labels = _dataset({"a": 100})
    first = assign_splits(ids, labels, val_fraction=0.1, test_fraction=0.1, seed=1)
    assert first == assign_splits(ids, labels, val_fraction=0.1, test_fraction=0.1, seed=1)
    assert first != assign_splits(ids, labels, val_fraction=0.1, test_fraction=0.1, seed=2)


def test_assign_splits_test_set_is_stable_when_val_fraction_changes() -> None:
    ids, labels = _dataset({"a": 100, "b": 50})
    small = assign_splits(ids, labels, val_fraction=0.1, test_fraction=0.1, seed=5)
    large = assign_splits(ids, labels, val_fraction=0.3, test_fraction=0.1, seed=5)
    assert [i for i, s in zip(ids, small, strict=True) if s == "test"] == [
        i for i, s in zip(ids, large, strict=True) if s == "test"
    ]


def test_assign_splits_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unique"):
        assign_splits(["x", "x"], ["a", "a"], val_fraction=0.1, test_fraction=0.1, seed=0)
    with pytest.raises(ValueError, match="labels"):
        assign_splits(["x", "y"], ["a"], val_fraction=0.1, test_fraction=0.1, seed=0)
    with pytest.raises(ValueError, match="sum"):
        assign_splits(["x"], ["a"], val_fraction=0.6, test_fraction=0.4, seed=0)
    assert assign_splits([], [], val_fraction=0.1, test_fraction=0.1, seed=0) == []
