"""Active-learning heuristics on hand-checkable probability arrays, batch de-duplication, and auto's choice."""

from __future__ import annotations

import math

import numpy as np
import pytest

from components.quality import active_learning as al

# three images, three classes, one pass: a tie, a confident one, a spread one
P1 = np.array([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05], [0.4, 0.3, 0.3]])[:, :, None]


def test_margin_entropy_least_confident_by_hand() -> None:
    assert np.allclose(al.margin(P1), [1.0, 0.15, 0.9])
    h = [
        math.log(2),
        -(0.9 * math.log(0.9) + 2 * 0.05 * math.log(0.05)),
        -(0.4 * math.log(0.4) + 0.6 * math.log(0.3)),
    ]
    assert np.allclose(al.entropy(P1), h)
    assert np.allclose(al.least_confident(P1), [0.5, 0.1, 0.6])
    # the orders differ: margin prefers the tie, entropy and least-confident the spread one
    assert np.argmax(al.score("margin", P1).scores) == 0
    assert np.argmax(al.score("entropy", P1).scores) == 2
    assert np.argmax(al.score("least_confident", P1).scores) == 2
    assert np.allclose(al.margin(P1[:, :, 0]), al.margin(P1))  # [N, C] is T = 1


def test_bald_is_disagreement_between_members() -> None:
    # image 0: two members certain of different classes (max disagreement, ln 2);
    # image 1: both members unsure the same way (no disagreement: 0, though its entropy is ln 2)
    probs = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])  # [N=2, C=2, T=2]
    assert np.allclose(al.bald(probs), [math.log(2), 0.0], atol=1e-9)
    assert np.allclose(al.entropy(probs), [math.log(2), math.log(2)])
    scored = al.score("bald", probs)
    assert scored.used == "bald" and scored.note == ""


def test_bald_with_one_pass_falls_back_to_entropy_and_says_so() -> None:
    scored = al.score("bald", P1)
    assert scored.used == "entropy" and "T > 1" in scored.note
    assert np.allclose(scored.scores, al.entropy(P1))


def test_random_is_seeded_and_unknown_strategy_is_an_error() -> None:
    a, b = al.score("random", P1, seed=3).scores, al.score("random", P1, seed=3).scores
    assert np.array_equal(a, b) and not np.array_equal(a, al.score("random", P1, seed=4).scores)
    with pytest.raises(ValueError, match="unknown strategy"):
        al.score("nope", P1)
    with pytest.raises(ValueError, match=r"\[N, C, T\]"):
        al.score("margin", np.zeros(3))


def test_typical_picks_a_typical_image_of_each_cluster_largest_first() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = [50, 30, 10]
    x = np.concatenate([c + rng.normal(0, 0.5, (n, 2)) for c, n in zip(centres, sizes, strict=True)])
    x = np.concatenate([x, [[30.0, 30.0]]])  # a lone outlier: a cluster of its own, never typical
    scored = al.typical(x, 4, seed=0)
    picked = al.select(scored.scores, 3).rows
    cluster_of = np.repeat([0, 1, 2, 3], [*sizes, 1])
    assert [int(cluster_of[i]) for i in picked] == [0, 1, 2]  # one per cluster, largest first
    for i in picked:  # each pick sits in its cluster's dense core (among the 25% nearest the centre)
        members = x[cluster_of == cluster_of[i]]
        to_centre = np.linalg.norm(members - members.mean(axis=0), axis=1)
        assert np.linalg.norm(x[i] - members.mean(axis=0)) <= np.quantile(to_centre, 0.25)
    assert scored.scores[-1] > 0 and np.argsort(-scored.scores)[3] == len(x) - 1  # the outlier comes last


def test_select_keeps_one_per_near_duplicate_group() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    feats = np.array([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    hashes = ["ff00", "0000", "ff00", "1234", "abcd"]  # row 2 has row 0's perceptual hash
    sel = al.select(scores, 3, features=feats, phashes=hashes)
    assert sel.rows == (0, 3, 4)
    assert sel.dropped == {1: 0, 2: 0}  # 1: cosine ~1 to row 0; 2: same phash as row 0
    assert al.select(scores, 2).rows == (0, 1)  # without features or hashes: plain top-k


def _curves(acc: dict[str, list[float]]) -> dict[str, list[al.Curve]]:
    return {k: [al.Curve(k, (10, 20, 30), tuple(v))] for k, v in acc.items()}


def test_choose_picks_the_best_against_random_and_says_why() -> None:
    choice = al.choose(
        _curves({"margin": [0.6, 0.7, 0.8], "entropy": [0.5, 0.6, 0.65], "random": [0.55, 0.65, 0.7]})
    )
    assert choice.strategy == "margin"
    assert (
        "margin beat the random control by +6.67 points" in choice.reason and "10-30 labels" in choice.reason
    )
    table = {r["strategy"]: r for r in choice.table}
    assert table["entropy"]["gain_vs_random_pt"] == pytest.approx(-5.0)
    assert [r["strategy"] for r in choice.table] == ["margin", "random", "entropy"]


def test_choose_falls_back_to_random_when_nothing_beats_it() -> None:
    choice = al.choose(_curves({"margin": [0.5, 0.6, 0.7], "random": [0.6, 0.7, 0.8]}))
    assert choice.strategy == "random" and "no strategy beat the random control" in choice.reason


def test_replay_on_separable_data_learns_and_covers_every_strategy() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, (60, 4)), rng.normal(2.5, 1, (60, 4))])
    y = np.repeat([0, 1], 60)
    curves = al.replay(x, y, x, y, strategies=("margin", "typical"), start=6, batch=6, rounds=2)
    assert set(curves) == {"margin", "typical", "random"}
    for (curve,) in curves.values():
        assert curve.labels == (12, 18) and all(a > 0.8 for a in curve.accuracy)
