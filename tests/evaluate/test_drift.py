"""Drift on real embeddings: a brightness-shifted test split is flagged, resamples of one
distribution are not (false-positive rate <= alpha), and the test's p-value is a valid one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.evaluate.drift import drift_test, median_bandwidth, mmd_permutation_test, squared_distances
from components.model.checkpoint import Predictor
from components.model.embedding_store import embed_tensors
from tests.conftest import fmnist_arrays, png_bytes

ALPHA = 0.05


@pytest.fixture(scope="module")
def embed(tiny_model_dir: Path):
    predictor = Predictor.from_dir(tiny_model_dir)

    def _embed(images: np.ndarray) -> np.ndarray:
        return embed_tensors(predictor.model, predictor.preprocess([png_bytes(a) for a in images]))

    return _embed


@pytest.fixture(scope="module")
def test_pool(embed) -> np.ndarray:
    x, _ = fmnist_arrays("t10k", 600)
    return embed(x)


def brighter(images: np.ndarray, shift: int) -> np.ndarray:
    return np.clip(images.astype(np.int16) + shift, 0, 255).astype(np.uint8)


def test_flags_a_brightness_shifted_test_split(embed) -> None:
    train, _ = fmnist_arrays("train", 200)
    test, _ = fmnist_arrays("t10k", 200)
    reference = embed(train)
    same = drift_test(reference, embed(test), alpha=ALPHA, permutations=200)
    shifted = drift_test(reference, embed(brighter(test, 30)), alpha=ALPHA, permutations=200)
    assert not same.drifted and same.p_value > ALPHA
    assert shifted.drifted and shifted.p_value < ALPHA
    assert shifted.statistic > 5 * same.statistic
    assert shifted.classifier_auc is not None and same.classifier_auc is not None
    assert shifted.classifier_auc > 0.8 > same.classifier_auc


def test_false_positive_rate_over_resamples_is_at_most_alpha(test_pool: np.ndarray) -> None:
    """20 pairs of disjoint random samples of the same test split (n = 60 each): at most alpha flagged."""
    rng = np.random.default_rng(0)
    flagged = 0
    for i in range(20):
        idx = rng.permutation(len(test_pool))
        result = mmd_permutation_test(
            test_pool[idx[:60]], test_pool[idx[60:120]], alpha=ALPHA, permutations=99, seed=i
        )
        flagged += result.drifted
    assert flagged / 20 <= ALPHA


def test_the_p_value_is_uniform_enough_under_the_null(test_pool: np.ndarray) -> None:
    """400 null resamples at n = 25: the rejection rate's binomial 99% lower bound stays <= alpha, and
    the test is not so conservative that it never rejects (the p-value spreads over (0, 1])."""
    from scipy.stats import binomtest

    rng = np.random.default_rng(1)
    p_values = []
    for i in range(400):
        idx = rng.permutation(len(test_pool))
        p_values.append(
            mmd_permutation_test(test_pool[idx[:25]], test_pool[idx[25:50]], permutations=39, seed=i).p_value
        )
    rejected = int(np.sum(np.asarray(p_values) < ALPHA))
    low = binomtest(rejected, 400).proportion_ci(confidence_level=0.99).low
    assert low <= ALPHA and rejected > 0
    assert 0.35 < float(np.median(p_values)) < 0.65


def test_subsampling_and_bandwidth() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3000, 4)), rng.normal(loc=0.5, size=(3000, 4))
    result = mmd_permutation_test(a, b, max_samples=300, permutations=50)
    assert (result.n_reference, result.n_current) == (300, 300) and result.drifted
    assert result.p_value == pytest.approx(1 / 51)
    d2 = squared_distances(np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]))
    assert d2[0, 1] == pytest.approx(25.0) and median_bandwidth(d2) == pytest.approx(5.0)
    assert median_bandwidth(np.zeros((3, 3))) == 1.0  # identical points: any bandwidth, statistic 0
    with pytest.raises(ValueError, match=">= 2 rows"):
        mmd_permutation_test(a[:1], b)
