"""Evaluate's pass over a split: the decoded-split cache and the per-file transform give the same
predictions, and what serving computes from the same files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.core.config import Params, load_params
from components.evaluate.predictions import predict_split
from components.model import inference
from components.model.checkpoint import Predictor, load_classifier
from tests.conftest import REPO, fmnist_arrays
from tests.model.test_embedding_store import write_data_dir


def _params(data: Path, state: Path, cache: str) -> Params:
    return load_params(REPO / "params.yaml", [f"project.data_dir={data}", f"project.state_dir={state}",
                                              f"train.cache='{cache}'", "evaluate.batch_size=4"])  # fmt: skip


def _served_logits(model_dir: Path, files: list[Path]) -> np.ndarray:
    model, spec = load_classifier(model_dir)
    inputs = Predictor(model, spec).preprocess([f.read_bytes() for f in files])
    with torch.no_grad():
        return model.eval()(inputs).numpy()


def test_cached_and_per_file_passes_agree_with_serving(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inference, "unit_size", lambda shape: 3)  # batches of 4 cut into units of 3 and 1
    x, y = fmnist_arrays("t10k", 14)
    data = write_data_dir(tmp_path / "data", x, y, ["train"] * 3 + ["test"] * 11)
    keep = np.array([0, 4, 10])
    got = {}
    for cache in ("auto", "off"):
        state = tmp_path / f"state-{cache}"
        got[cache], (_, spec) = predict_split(
            _params(data.root, state, cache), tiny_model_dir, "test", keep=keep
        )
        # the cache is read (and written) only where train.cache allows it
        assert any((state / "cache").glob("test-*.npy")) == (cache == "auto")
    a, b = got["auto"], got["off"]
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    rows = _rows(data.manifest, "test")  # split order: the manifest's
    files = [data.root / p for p in rows["path"]]
    np.testing.assert_array_equal(a.targets, [spec.classes.index(label) for label in rows["label"]])
    np.testing.assert_array_equal(a.targets, b.targets)
    for k in ("brightness", "contrast"):
        np.testing.assert_allclose(a.properties[k], b.properties[k], rtol=1e-6, atol=1e-6)
    assert a.kept is not None and b.kept is not None and a.kept_targets is not None
    # the kept images are the files' own 8-bit pixels, with their labels, in split order
    pixels = np.stack([np.asarray(Image.open(files[i])) for i in keep])[:, None]
    torch.testing.assert_close(a.kept, torch.from_numpy(pixels))
    torch.testing.assert_close(b.kept, a.kept)
    assert a.kept_targets.tolist() == a.targets[keep].tolist()
    np.testing.assert_allclose(a.logits, _served_logits(tiny_model_dir, files), rtol=1e-4, atol=1e-4)


def test_images_that_need_resizing_go_through_the_transform(tmp_path: Path, tiny_model_dir: Path) -> None:
    """32 px files for a 28 px model: resizing in uint8 (the cache) would round what serving's transform
    does not, so the pass reads the files through the transform and writes no cache."""
    x, y = fmnist_arrays("t10k", 6)
    big = np.stack([np.asarray(Image.fromarray(a).resize((32, 32), Image.Resampling.BILINEAR)) for a in x])
    data = write_data_dir(tmp_path / "data", big, y, ["train"] + ["test"] * 5)
    state = tmp_path / "state"
    out, _ = predict_split(_params(data.root, state, "auto"), tiny_model_dir, "test")
    assert not any((state / "cache").glob("*.npy"))
    files = [data.root / p for p in _rows(data.manifest, "test")["path"]]
    np.testing.assert_allclose(out.logits, _served_logits(tiny_model_dir, files), rtol=1e-4, atol=1e-4)
    assert out.kept is None and out.kept_targets is None


def _rows(manifest: Path, split: str) -> pd.DataFrame:
    rows = pd.read_parquet(manifest)
    return rows[rows["split"] == split].reset_index(drop=True)
