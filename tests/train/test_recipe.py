"""The typed training recipe: built once from the train params and the data, pickled to every Ray
worker, every field read by the worker side, none with a default (so none restated anywhere)."""

from __future__ import annotations

import ast
import dataclasses
import json
import pickle
from pathlib import Path

import pytest

from components.core.config import TrainConfig, load_params
from components.core.errors import ConfigError
from components.data.manifest import DataPaths, DatasetInfo
from components.pipeline.stages import run_ingest
from components.train.recipe import TrainRecipe, build_recipe
from tests.conftest import REPO, write_small_params

WORKER_SIDE = [REPO / "components" / "train" / m for m in ("worker.py", "torch_recipe.py", "distill.py")]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> DataPaths:
    root = tmp_path_factory.mktemp("recipe")
    write_small_params(root, max_per_class=3)
    run_ingest(load_params(root / "params.yaml", [f"project.data_dir={root / 'data'}"]), progress=False)
    return DataPaths(root / "data")


def _recipe(data: DataPaths, tmp_path: Path, **train: object) -> TrainRecipe:
    return build_recipe(TrainConfig(**train), data, seed=7, weights_dir=tmp_path / "weights")


def test_recipe_is_resolved_from_the_params_and_the_data(data: DataPaths, tmp_path: Path) -> None:
    recipe = _recipe(data, tmp_path, batch_size=32, lr=0.01, loss="focal", ema_decay=0.99)
    info = DatasetInfo.load(data.dataset)
    assert recipe.task == info.task == "singlelabel" and recipe.classes == tuple(info.classes)
    assert recipe.manifest == data.manifest.resolve() and recipe.data_dir == data.root.resolve()
    assert recipe.in_chans == 1  # Fashion-MNIST is grey and train.in_chans is unset
    assert recipe.eval_batch_size == 256 and recipe.batch_size == 32 and recipe.seed == 7
    assert (recipe.lr, recipe.loss, recipe.ema_decay) == (0.01, "focal", 0.99)
    assert recipe.cache_dir == (tmp_path / "cache").resolve() and recipe.exclude_file is None
    assert recipe.pretrained_file is None  # no pretrained weights asked for


def test_options_of_the_other_task_are_refused_before_ray_starts(data: DataPaths, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="asymmetric is for multi-label"):
        _recipe(data, tmp_path, loss="asymmetric")


def test_recipe_round_trips_through_pickle_and_to_dict(data: DataPaths, tmp_path: Path) -> None:
    recipe = _recipe(data, tmp_path, class_weights="inverse", early_stopping_patience=2)
    assert pickle.loads(pickle.dumps(recipe)) == recipe  # what Ray does to send it to every worker
    plain = recipe.to_dict()
    assert json.loads(json.dumps(plain)) == plain  # plain JSON values: MLflow params, recipe.json
    assert plain["manifest"] == str(recipe.manifest) and plain["scale"] == list(recipe.scale)
    assert set(plain) == {f.name for f in dataclasses.fields(TrainRecipe)}
    assert TrainRecipe.from_dict(plain) == recipe
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.lr = 1.0  # type: ignore[misc]


def test_every_field_is_required(data: DataPaths, tmp_path: Path) -> None:
    """No field has a default: a recipe built without one fails at once (instead of a worker
    training with a default restated somewhere)."""
    plain = _recipe(data, tmp_path).to_dict()
    for name in plain:
        with pytest.raises(TypeError, match=name):
            TrainRecipe.from_dict({k: v for k, v in plain.items() if k != name})
    with pytest.raises(TypeError, match="unexpected"):
        TrainRecipe.from_dict({**plain, "lr_typo": 0.1})


def _recipe_reads(path: Path) -> set[str]:
    """Attributes read from a variable named ``recipe`` in a module."""
    return {
        node.attr
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "recipe"
    }


def test_every_field_is_read_by_the_worker_side() -> None:
    """The per-worker loop and the torch builders read every field (nothing resolved on the driver
    is silently dropped) and nothing else; no dict lookups with defaults remain."""
    read = set().union(*(_recipe_reads(p) for p in WORKER_SIDE))
    fields = {f.name for f in dataclasses.fields(TrainRecipe)}
    assert fields - read == set(), "fields no worker-side code reads"
    assert read - fields == set(), "attributes the recipe does not have"
    for path in WORKER_SIDE:
        assert _keyed_lookups(path) == [], path.name


def _keyed_lookups(path: Path) -> list[str]:
    """``config["key"]``, ``config.get("key", default)`` and ``getattr(recipe, ...)`` in a module: how
    the old dict-based loop config read its values (and restated their defaults)."""

    def on_recipe(node: ast.expr) -> bool:
        return isinstance(node, ast.Name) and node.id in ("config", "recipe", "run")

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        keyed = (
            isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and on_recipe(node.value)
        )
        got = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
        got = got and on_recipe(node.func.value)  # type: ignore[union-attr]
        attr = isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
        attr = attr and bool(node.args) and on_recipe(node.args[0])  # type: ignore[union-attr]
        if keyed or got or attr:
            found.append(ast.unparse(node))
    return found
