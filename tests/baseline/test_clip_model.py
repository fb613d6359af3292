"""The open_clip adapter: weights from a checkpoint file or a ``local-dir:`` folder, clear errors
for bad settings, *unavailable* (not failed) without weights, and each image encoded once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from components.baseline.clip_model import (
    WeightsUnavailableError,
    _in_hub_cache,
    create_clip,
    embed_images,
    encode_image_batches,
)
from components.baseline.embeddings import EmbeddingCache, cache_dir_for
from components.core.errors import ConfigError
from tests.baseline.tiny_clip import CLASSES, TINY, TINY_CFG, draw


def test_local_dir_checkpoint_loads_the_same_weights(tiny_clip: dict, held_out: tuple) -> None:
    from_dir = create_clip(f"local-dir:{tiny_clip['local_dir']}", None)
    x = held_out[0][::10]
    a = encode_image_batches(from_dir, [x])
    b = encode_image_batches(tiny_clip["encoder"], [x])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert from_dir.logit_scale == pytest.approx(tiny_clip["encoder"].logit_scale)
    assert from_dir.key.startswith("local-dir/sha256:")


def test_bad_weights_settings_are_config_errors_and_missing_weights_are_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a pretrained tag"):
        create_clip("ViT-B-32", str(tmp_path / "nope.pt"))
    with pytest.raises(ConfigError, match="not an open_clip model"):
        create_clip("ViT-B-99", "openai")
    with pytest.raises(WeightsUnavailableError):  # HF_HUB_OFFLINE=1 and an empty cache
        create_clip("ViT-B-32", "laion2b_s34b_b79k", cache_dir=tmp_path / "hub")
    hub = tmp_path / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text("abc123")
    (hub / "snapshots" / "abc123").mkdir(parents=True)
    assert not _in_hub_cache("laion/CLIP-ViT-B-32-laion2B-s34B-b79K/", tmp_path / "hub")
    (hub / "snapshots" / "abc123" / "open_clip_pytorch_model.bin").write_bytes(b"x")
    assert _in_hub_cache("laion/CLIP-ViT-B-32-laion2B-s34B-b79K/", tmp_path / "hub")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    with pytest.raises(WeightsUnavailableError, match="no checkpoint"):
        create_clip(f"local-dir:{tmp_path / 'dir'}", None)


def test_embedding_cache_encodes_each_image_once(tmp_path: Path, tiny_clip: dict) -> None:
    encoder, rng = tiny_clip["encoder"], np.random.default_rng(7)
    paths = []
    for i, c in enumerate(CLASSES[:6]):
        paths.append(tmp_path / f"{i}.png")
        draw(c, rng).save(paths[-1])
    ids = [f"id{i}" for i in range(len(paths))]
    root = tmp_path / "embeddings"
    first, n_first = embed_images(
        encoder, ids[:4], paths[:4], cache=EmbeddingCache(root, encoder.key), batch_size=3
    )
    assert n_first == 4 and first.shape == (4, TINY_CFG["embed_dim"])
    cache = EmbeddingCache(root, encoder.key)  # a new process would see the same files
    again, n_again = embed_images(encoder, ids, paths, cache=cache, batch_size=3)
    assert n_again == 2 and len(cache) == 6  # only the two new images were encoded
    np.testing.assert_allclose(again[:4], first, rtol=1e-6)
    direct = embed_images(encoder, ids, paths, cache=None)[0]
    np.testing.assert_allclose(again, direct, rtol=1e-4, atol=1e-5)
    assert embed_images(encoder, ids[::-1], paths[::-1], cache=cache)[1] == 0
    assert cache_dir_for(root, encoder.key) != cache_dir_for(root, f"{TINY}/other-weights")
