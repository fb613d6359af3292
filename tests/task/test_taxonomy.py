"""Label trees: validation errors name the node; distances, CRM and back-off on a hand-checkable tree."""

from __future__ import annotations

import numpy as np
import pytest

from components.core.errors import ConfigError
from components.task.taxonomy import (
    ABSTAIN,
    FASHION_MNIST_TREE,
    Taxonomy,
    backoff_decode,
    crm_decode,
    fit_backoff_threshold,
    load_taxonomy,
)

# A = {a1, a2}, B = {b1, b2}: siblings are 1 apart, cousins 2.
LEAVES = ("a1", "a2", "b1", "b2")


@pytest.fixture
def tree() -> Taxonomy:
    return Taxonomy.from_paths(["A/a1", "A/a2", "B/b1", "B/b2"], LEAVES)


def test_distance_matrix_ancestors_and_paths(tree: Taxonomy) -> None:
    assert tree.distance_matrix().tolist() == [[0, 1, 2, 2], [1, 0, 2, 2], [2, 2, 0, 1], [2, 2, 1, 0]]
    assert tree.ancestors("b2") == ("B",)
    assert tree.path("b2") == "B/b2"
    assert tree.inner_nodes == ("A", "B")
    assert tree.height() == 2


def test_ragged_tree_distance_is_the_height_of_the_common_ancestor() -> None:
    # shoes/sport/{run, court}, shoes/sandal, bag: depths 3, 2 and 1.
    tree = Taxonomy.from_paths(["shoes/sport/run", "shoes/sport/court", "shoes/sandal", "bag"],
                               ["run", "court", "sandal", "bag"])  # fmt: skip
    d = tree.distance_matrix()
    assert d[0, 1] == 1  # under sport (height 1)
    assert d[0, 2] == 2  # under shoes (height 2)
    assert d[0, 3] == 3 and d[2, 3] == 3  # only the root in common: the tree's height
    assert tree.parent_of("bag") == "bag"  # a top-level leaf has no coarser answer


def test_parent_probabilities_sum_their_children(tree: Taxonomy) -> None:
    probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    parents = tree.parent_probabilities(probs)
    np.testing.assert_allclose(parents["A"], [0.3, 0.8])
    np.testing.assert_allclose(parents["B"], [0.7, 0.2])


def test_crm_prefers_the_leaf_of_least_expected_distance(tree: Taxonomy) -> None:
    # Expected distances: a1 1.2, a2 1.6, b1 1.1, b2 1.1 -> CRM answers b1 (tie: the more probable,
    # then the lower index) while argmax answers a1.
    probs = np.array([[0.4, 0.0, 0.3, 0.3], [0.9, 0.1, 0.0, 0.0]])
    assert crm_decode(probs, tree.distance_matrix()).ravel().tolist() == [2, 0]
    assert crm_decode(probs, tree.distance_matrix(), k=4)[0].tolist() == [2, 3, 0, 1]


def test_crm_on_a_flat_tree_is_argmax() -> None:
    flat = Taxonomy.from_pairs([(c, None) for c in "xyz"], list("xyz"))
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    assert crm_decode(probs, flat.distance_matrix()).ravel().tolist() == [1, 0]


def test_backoff_answers_leaf_parent_or_abstains(tree: Taxonomy) -> None:
    probs = np.array([[0.9, 0.1, 0, 0], [0.5, 0.4, 0.05, 0.05], [0.3, 0.2, 0.3, 0.2]])
    assert backoff_decode(probs, tree, threshold=0.8, mode="parent") == ["a1", "A", ABSTAIN]
    assert backoff_decode(probs, tree, threshold=0.8, mode="abstain") == ["a1", ABSTAIN, ABSTAIN]
    assert backoff_decode(probs, tree, threshold=0.8, mode="off") == ["a1", "a1", "a1"]


def test_fitted_threshold_is_the_lowest_reaching_the_target(tree: Taxonomy) -> None:
    # Image 2's top leaf a1 (0.6) is wrong, its parent A (0.9) right: tau must exceed 0.6.
    probs = np.array([[0.95, 0.05, 0, 0], [0.6, 0.3, 0.1, 0], [0.7, 0.1, 0.2, 0]])
    labels = [0, 1, 0]
    fit = fit_backoff_threshold(probs, labels, tree, target_precision=1.0, mode="abstain", confidence=None)
    assert (fit.threshold, fit.precision, fit.answered, fit.reached) == (0.7, 1.0, pytest.approx(2 / 3), True)
    fit = fit_backoff_threshold(probs, labels, tree, target_precision=1.0, mode="parent", confidence=None)
    assert (fit.threshold, fit.answered, fit.leaf_share) == (0.7, 1.0, pytest.approx(2 / 3))


def test_fitted_threshold_needs_the_precision_bound_to_reach_the_target(tree: Taxonomy) -> None:
    # 500 images: 400 sure (a1 at 0.9; 395 right), 100 unsure (a1 0.5, a2 0.45: parent A at 0.95; 85
    # right as leaves, all right as A). A point fit for 0.95 takes the lowest threshold, 0.5: every image
    # answered with its leaf, 480/500 = 0.96 right. Its Wilson lower bound (~0.94) misses 0.95, so the
    # confident fit moves to 0.9: the unsure back off to A, 495/500 right (bound ~0.98).
    probs = np.concatenate(
        [np.tile([0.9, 0.1, 0.0, 0.0], (400, 1)), np.tile([0.5, 0.45, 0.05, 0.0], (100, 1))]
    )
    labels = [0] * 395 + [1] * 5 + [0] * 85 + [1] * 15
    point = fit_backoff_threshold(probs, labels, tree, target_precision=0.95, mode="parent", confidence=None)
    assert point.threshold == pytest.approx(0.5) and point.precision == pytest.approx(0.96)
    bound = fit_backoff_threshold(probs, labels, tree, target_precision=0.95, mode="parent", confidence=0.95)
    assert (bound.threshold, bound.reached, bound.answered) == (pytest.approx(0.9), True, 1.0)
    assert bound.precision == pytest.approx(0.99) and bound.leaf_share == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("pairs", "classes", "named"),
    [
        ([("a", "b"), ("b", "c"), ("c", "a"), ("x", None)], ["x"], "cycle through"),
        ([("a1", "A")], ["a1", "a2"], "class 'a2' is not in the tree"),
        ([("a1", "A"), ("ghost", "A")], ["a1"], "leaf 'ghost' is not a class"),
        ([("a1", "A"), ("A", None)], ["a1", "A"], "'A' is a class and also has children"),
        ([("a1", "A"), ("a1", "B")], ["a1"], "'a1' is under two parents"),
    ],
)
def test_bad_trees_name_the_node(pairs: list, classes: list, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Taxonomy.from_pairs(pairs, classes)


def test_yaml_leaf_under_two_parents_is_named(tmp_path) -> None:
    file = tmp_path / "taxonomy.yaml"
    file.write_text("a1: A\na2: A\na1: B\n")
    with pytest.raises(ConfigError, match="'a1' is under two parents"):
        Taxonomy.from_yaml(file, ["a1", "a2"])
    file.write_text("a1: A\na2: A\nA: top\n")  # deeper trees: parent: grandparent
    assert Taxonomy.from_yaml(file, ["a1", "a2"]).path("a2") == "top/A/a2"


def test_fashion_mnist_tree_roundtrips_through_json(tmp_path) -> None:
    tree = Taxonomy.fashion_mnist()
    assert tree.parent_of("Sneaker") == "footwear" and len(tree.leaves) == 10
    assert set(tree.inner_nodes) == {"tops", "bottoms", "footwear", "accessories"}
    tree.save(tmp_path / "taxonomy.json")
    loaded = load_taxonomy(tmp_path)
    assert loaded is not None and loaded.leaves == tuple(FASHION_MNIST_TREE)
    assert np.array_equal(loaded.distance_matrix(), tree.distance_matrix())
    assert load_taxonomy(tmp_path / "nothing") is None
