"""Episodic few-shot evaluation: seeded episodes shared by every method and k, the two nearest-mean
rules checked by hand, and the `evaluate --few-shot` table on a tiny real model and data dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.core.config import load_params
from components.core.errors import ConfigError
from components.evaluate.fewshot import episode_accuracies, evaluate_episodes, sample_episodes
from tests.conftest import fmnist_arrays
from tests.model.test_embedding_store import write_data_dir


def test_episodes_are_seeded_disjoint_and_nested_across_k() -> None:
    labels = np.repeat(np.arange(8), 30)
    a = sample_episodes(labels, n_way=5, k=10, n_query=15, episodes=50, seed=3)
    b = sample_episodes(labels, n_way=5, k=10, n_query=15, episodes=50, seed=3)
    c = sample_episodes(labels, n_way=5, k=10, n_query=15, episodes=50, seed=4)
    assert all(
        np.array_equal(x, y) for x, y in ((a.classes, b.classes), (a.support, b.support), (a.query, b.query))
    )
    assert not np.array_equal(a.support, c.support)
    for e in range(50):
        assert len(set(a.classes[e])) == 5
        for j, cls in enumerate(a.classes[e]):
            rows = [*a.support[e, j], *a.query[e, j]]
            assert len(set(rows)) == 25 and set(labels[rows]) == {cls}
    with pytest.raises(ConfigError, match="need 5 classes of at least 31 images"):
        sample_episodes(labels, n_way=5, k=16, n_query=15, episodes=1)


def test_nearest_mean_rules_by_hand() -> None:
    # Two classes on a line, x in {0, 0.5, 1} and {4, 4.5, 5}: whichever supports are drawn, every query
    # is nearer its own class mean, and on its own side of the centre 2.5 after centring.
    feats = np.array(
        [[0.0, 1.0], [0.5, 1.0], [4.0, 1.0], [5.0, 1.0], [1.0, 1.0], [4.5, 1.0]], dtype=np.float32
    )
    labels = np.array([0, 0, 1, 1, 0, 1])
    eps = sample_episodes(labels, n_way=2, k=2, n_query=1, episodes=20, seed=0)
    proto = episode_accuracies(feats, eps, k=2, method="protonet")
    simple = episode_accuracies(feats, eps, k=2, method="simpleshot", centre=np.array([2.5, 1.0]))
    assert proto.mean() == 1.0 and simple.mean() == 1.0
    wrong_centre = episode_accuracies(feats, eps, k=2, method="simpleshot", centre=np.array([-10.0, 1.0]))
    assert (
        wrong_centre.mean() < 1.0
    )  # everything points the same way from a far centre: CL2N needs the base mean
    rows = evaluate_episodes({"a": feats, "b": feats[:, ::-1].copy()}, labels, n_way=2, ks=(1, 2), n_query=1,
                             episodes=20)  # fmt: skip
    assert [(r.features, r.method, r.k) for r in rows][:4] == [
        ("a", "protonet", 1), ("a", "protonet", 2), ("a", "simpleshot", 1), ("a", "simpleshot", 2),
    ]  # fmt: skip
    # The same episodes for every representation: permuted columns give the very same accuracies.
    assert [r.accuracy for r in rows[:4]] == [r.accuracy for r in rows[4:]]
    with pytest.raises(ConfigError, match="k=3 is more than the 2 supports"):
        episode_accuracies(feats, eps, k=3, method="protonet")


def test_evaluate_few_shot_on_a_real_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    from components.pipeline.classes import run_fewshot_evaluation

    x, y = fmnist_arrays("t10k", 300)
    write_data_dir(tmp_path / "data", x, y, ["train"] * 100 + ["test"] * 200)
    (tmp_path / "params.yaml").write_text("{}\n")
    params = load_params(tmp_path / "params.yaml", [f"project.data_dir={tmp_path / 'data'}"])
    result = run_fewshot_evaluation(
        params, model=str(tiny_model_dir), n_way=5, ks=(1, 5), episodes=40, n_query=5
    )
    rows = {(r["features"], r["method"], r["k"]): r["accuracy"] for r in result["rows"]}
    assert set(rows) == {(f, m, k) for f in ("model", "pixels", "random_init") for m in ("protonet", "simpleshot")
                         for k in (1, 5)}  # fmt: skip
    assert all(0.2 <= acc <= 1.0 for acc in rows.values())
    # A trained model's features separate its own classes better than random weights do.
    assert rows[("model", "simpleshot", 5)] > rows[("random_init", "simpleshot", 5)]
    assert result["images"] == 200 and "accuracy" in result["table"]
    assert result["layer"] == "prev_stage_3x3"  # the few-shot default: the stage before the last, 3x3
