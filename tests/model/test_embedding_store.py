"""The embedding store: one pass per (data version, model, layer), cached beside the data and reused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.core.errors import DataError
from components.data.manifest import DataPaths, data_version, write_manifest
from components.model import embedding_store
from components.model.checkpoint import load_classifier
from components.model.embedding_store import embed_files, embed_manifest, model_hash
from tests.conftest import FMNIST_CLASSES, fmnist_arrays, png_bytes


def write_data_dir(root: Path, images: np.ndarray, labels: np.ndarray, splits: list[str]) -> DataPaths:
    """A minimal data dir: PNGs in the content store and a manifest listing them."""
    paths = DataPaths(root)
    rows = []
    for img, lab, split in zip(images, labels, splits, strict=True):
        data = png_bytes(img)
        sha = hashlib.sha256(data).hexdigest()
        rel = f"store/{sha[:2]}/{sha}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        rows.append({"image_id": sha, "path": rel, "label": FMNIST_CLASSES[int(lab)], "labels": [FMNIST_CLASSES[int(lab)]],
                     "width": img.shape[1], "height": img.shape[0], "mode": "L", "bytes": len(data), "split": split,
                     "source": "test", "source_path": sha})  # fmt: skip
    write_manifest(pd.DataFrame(rows), paths.manifest)
    return paths


@pytest.fixture()
def data_dir(tmp_path: Path) -> DataPaths:
    x, y = fmnist_arrays("t10k", 12)
    return write_data_dir(tmp_path / "data", x, y, ["train"] * 8 + ["test"] * 4)


def test_one_pass_then_reused(
    data_dir: DataPaths, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = embed_manifest(data_dir.root, tiny_model_dir, layer="pooled_last", batch_size=5)
    version, mhash = data_version(data_dir.manifest), model_hash(tiny_model_dir)
    entry = data_dir.root / "embeddings" / version / mhash
    sidecar = json.loads((entry / "pooled_last.json").read_text())
    assert first.vectors.shape == (12, 64) and sidecar["shape"] == [12, 64]
    assert sidecar["layer"] == "pooled_last" and sidecar["model"] == "imgflow_cnn"
    assert list(first.ids) == sidecar["ids"] and first.split("train").shape == (8, 64)
    # The rows are the model's features of those files, in manifest order.
    model, spec = load_classifier(tiny_model_dir)
    manifest = pd.read_parquet(data_dir.manifest)
    direct = embed_files(model, spec, [data_dir.root / p for p in manifest["path"]], layer="pooled_last")
    np.testing.assert_allclose(first.vectors, direct, rtol=1e-5, atol=1e-5)
    assert not list(entry.glob("*.tmp*"))  # atomic writes leave no temporary files

    # A second consumer reads the stored entry: no forward pass at all.
    def no_pass(*_a: object, **_k: object) -> np.ndarray:
        raise AssertionError("the store computed an entry it already had")

    monkeypatch.setattr(embedding_store, "embed_files_layers", no_pass)
    again = embed_manifest(data_dir.root, tiny_model_dir, layer="pooled_last")
    np.testing.assert_array_equal(np.asarray(again.vectors), np.asarray(first.vectors))
    np.testing.assert_array_equal(again.rows(list(first.ids[:2])), first.vectors[:2])


def test_layers_and_data_versions_are_separate_entries(data_dir: DataPaths, tiny_model_dir: Path) -> None:
    pooled = embed_manifest(data_dir.root, tiny_model_dir, layer="pooled_last")
    pre = embed_manifest(data_dir.root, tiny_model_dir, layer="pre_logits")
    assert pooled.vectors.shape[1] == 64 and pre.vectors.shape[1] == 64  # imgflow_cnn: avg pool head
    x, y = fmnist_arrays("t10k", 20)
    write_data_dir(data_dir.root, x[12:], y[12:], ["train"] * 8)  # a new data version, same dir
    newer = embed_manifest(data_dir.root, tiny_model_dir, layer="pooled_last")
    assert newer.data_version != pooled.data_version and len(newer.ids) == 8
    versions = sorted(p.name for p in (data_dir.root / "embeddings").iterdir())
    assert versions == sorted([pooled.data_version, newer.data_version])  # the old entry is kept
    with pytest.raises(DataError, match="no 'test' images"):
        newer.split("test")


def test_also_stores_other_layers_from_the_same_pass(
    data_dir: DataPaths, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[tuple[str, ...]] = []
    real = embedding_store.embed_files_layers

    def counted(*a: object, layers: tuple[str, ...], **k: object) -> dict[str, np.ndarray]:
        passes.append(tuple(layers))
        return real(*a, layers=layers, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(embedding_store, "embed_files_layers", counted)
    pre = embed_manifest(
        data_dir.root, tiny_model_dir, layer="pre_logits", also=["pooled_last", "pre_logits"]
    )
    pooled = embed_manifest(data_dir.root, tiny_model_dir, layer="pooled_last")  # stored by the first call
    assert passes == [("pre_logits", "pooled_last")]
    # The same vectors as a pass of each layer alone over the same files.
    model, spec = load_classifier(tiny_model_dir)
    files = [data_dir.root / p for p in pd.read_parquet(data_dir.manifest)["path"]]
    for emb in (pre, pooled):
        alone = embed_files(model, spec, files, layer=emb.layer, batch_size=5)
        np.testing.assert_allclose(emb.vectors, alone, rtol=1e-5, atol=1e-5)
    # Asking again with a layer not yet stored computes only that one.
    before = len(passes)
    embed_manifest(data_dir.root, tiny_model_dir, layer="pooled_last", also=["prev_stage_3x3"])
    assert passes[before:] == [("prev_stage_3x3",)]


def test_model_hash_ignores_temperature_but_not_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from components.model.checkpoint import with_temperature

    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    before = model_hash(copy)
    with_temperature(copy, 1.7)
    assert model_hash(copy) == before
    raw = bytearray((copy / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(raw))
    assert model_hash(copy) != before


def test_missing_manifest_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(DataError, match="run `imgflow ingest` first"):
        embed_manifest(tmp_path, tiny_model_dir)


def test_decoded_cache_gives_the_same_rows_and_reuses_what_training_decoded(
    data_dir: DataPaths, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """With ``decoded_cache`` the images come from the decoded-split files (a split training already
    decoded is read, not decoded again); the rows equal the per-file path's, in manifest order."""
    from components.data.datasets import cache_key, cached_split_array

    manifest = pd.read_parquet(data_dir.manifest)
    cache = tmp_path / "cache"
    geometry = {"mode": "L", "side": 28, "crop_pct": 1.0, "interpolation": "bilinear"}
    train = [data_dir.root / p for p in manifest.loc[manifest["split"] == "train", "path"]]
    # What training would have left: the train split decoded under its usual name.
    train_file = cache / f"train-{cache_key(train, **geometry)}.npy"
    cached_split_array(train, cache_file=train_file, **geometry)
    stamp = train_file.stat().st_mtime_ns
    model, spec = load_classifier(tiny_model_dir)
    layers = ("pooled_last", "pre_logits")
    fast = embed_manifest(data_dir.root, tiny_model_dir, layer=layers[0], also=layers[1:], batch_size=5,
                          decoded_cache=cache)  # fmt: skip
    assert train_file.stat().st_mtime_ns == stamp  # read, not rewritten
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.npy")) == ["test", "train"]
    files = [data_dir.root / p for p in manifest["path"]]
    for layer in layers:
        direct = embed_files(model, spec, files, layer=layer)
        stored = embed_manifest(data_dir.root, tiny_model_dir, layer=layer)
        np.testing.assert_allclose(stored.vectors, direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        fast.vectors, embed_files(model, spec, files, layer=layers[0]), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(("cache", "max_gb", "decoded"), [("auto", 1.0, True), ("off", 1.0, False),
                                                          ("auto", 1e-9, False)])  # fmt: skip
def test_a_project_embeds_through_decoded_copies_only_as_train_cache_allows(
    data_dir: DataPaths, tiny_model_dir: Path, tmp_path: Path, cache: str, max_gb: float, decoded: bool
) -> None:
    """``embed_project`` writes decoded splits under ``<state_dir>/cache`` only when ``train.cache`` is
    not ``off`` and the whole manifest fits in ``train.cache_max_gb``; the rows are the same either way."""
    from components.core.config import load_params
    from components.model.embedding_store import embed_project
    from tests.conftest import REPO

    state = tmp_path / "state"
    params = load_params(REPO / "params.yaml", [f"project.data_dir={data_dir.root}", f"project.state_dir={state}",
                                                f"train.cache='{cache}'", f"train.cache_max_gb={max_gb}"])  # fmt: skip
    got = embed_project(params, tiny_model_dir, layer="pooled_last")
    assert any((state / "cache").glob("*.npy")) == decoded
    model, spec = load_classifier(tiny_model_dir)
    files = [data_dir.root / p for p in pd.read_parquet(data_dir.manifest)["path"]]
    np.testing.assert_allclose(got.vectors, embed_files(model, spec, files, layer="pooled_last"), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
