"""Decode-once data: a split decoded into one uint8 array, normalised and augmented a batch at a time."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from components.core.errors import ConfigError
from components.data.datasets import (
    InMemoryDataset,
    ManifestDataset,
    alternating_flips,
    batch_collate,
    cache_key,
    cached_split_array,
    decode_split,
    random_resized_crop_flip,
)
from components.model.models import create_classifier, create_image_transform, resolve_data_config
from components.train.torch_recipe import use_cache
from tests.conftest import fmnist_arrays


@pytest.fixture(scope="module")
def png_split(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray, np.ndarray]:
    x, y = fmnist_arrays("t10k", 64)
    root = tmp_path_factory.mktemp("store")
    paths = []
    for i, arr in enumerate(x):
        p = root / f"{i:04d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths, x, y


def test_in_memory_batches_equal_timm_eval_transform(png_split) -> None:
    paths, x, y = png_split
    cfg = resolve_data_config(create_classifier("imgflow_cnn", 10, in_chans=1))
    per_item = ManifestDataset(paths, y, transform=create_image_transform(cfg, is_training=False), mode="L")
    images = decode_split(paths, mode="L", side=28)
    assert images.shape == (64, 1, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images[:, 0], x)  # lossless PNG round trip
    ds = InMemoryDataset(images, y, mean=cfg["mean"], std=cfg["std"])
    loader = DataLoader(ds, batch_size=16, shuffle=False, collate_fn=batch_collate)
    xb, yb = next(iter(loader))
    ref = torch.stack([per_item[i][0] for i in range(16)])
    assert xb.shape == (16, 1, 28, 28) and yb.tolist() == [int(v) for v in y[:16]]
    torch.testing.assert_close(xb, ref, atol=1e-6, rtol=0)


def test_resize_to_model_side_matches_timm_geometry(png_split) -> None:
    paths, _, y = png_split
    cfg = resolve_data_config(create_classifier("imgflow_cnn", 10, in_chans=1), input_size=32)
    tf = create_image_transform(cfg, is_training=False)
    images = decode_split(
        paths[:8], mode="L", side=32, crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"]
    )
    ref = torch.stack([tf(Image.open(p).convert("L")) for p in paths[:8]])
    got = InMemoryDataset(images, y[:8], mean=cfg["mean"], std=cfg["std"]).__getitems__(list(range(8)))[0]
    # the cache stores uint8: at most one grey level of rounding against timm's float pipeline
    assert (got - ref).abs().max().item() <= 2 / 255 / cfg["std"][0] + 1e-6


def test_batched_augmentation_crops_flips_and_is_seeded() -> None:
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    flipped = random_resized_crop_flip(x, scale=(1.0, 1.0), hflip=1.0)
    torch.testing.assert_close(flipped, x.flip(-1))
    assert random_resized_crop_flip(x, scale=(1.0, 1.0), hflip=0.0) is x
    a = random_resized_crop_flip(x, scale=(0.5, 0.6), hflip=0.5, generator=torch.Generator().manual_seed(1))
    b = random_resized_crop_flip(x, scale=(0.5, 0.6), hflip=0.5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert a.shape == x.shape and not torch.allclose(a, x)
    # a crop of ~half the area zooms in: the output's value range shrinks inside the input's
    assert (
        a.amax(dim=(1, 2, 3)) - a.amin(dim=(1, 2, 3)) < x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))
    ).all()


def test_cache_file_is_written_once_and_memory_mapped(png_split, tmp_path: Path) -> None:
    paths = png_split[0][:10]
    key = cache_key(paths, mode="L", side=28, crop_pct=1.0, interpolation="bilinear")
    assert key != cache_key(paths[::-1], mode="L", side=28, crop_pct=1.0, interpolation="bilinear")
    f = tmp_path / f"train-{key}.npy"
    first = cached_split_array(paths, cache_file=f, mode="L", side=28)
    stamp = f.stat().st_mtime_ns
    second = cached_split_array(paths, cache_file=f, mode="L", side=28)
    assert f.stat().st_mtime_ns == stamp and isinstance(second, np.memmap)
    assert np.array_equal(np.asarray(first), np.asarray(second))


def test_cache_policy_respects_memory_limit() -> None:
    assert use_cache(60_000, 1, 28, cache="auto", max_gb=1.0)
    assert not use_cache(60_000, 1, 28, cache="auto", max_gb=0.001)
    assert not use_cache(10, 1, 28, cache="off", max_gb=100.0)
    with pytest.raises(ConfigError, match="cache_max_gb"):
        use_cache(60_000, 3, 224, cache="memory", max_gb=0.001)


def test_random_erasing_blanks_a_rectangle_of_training_batches_only() -> None:
    x, y = fmnist_arrays(n=64)
    images = x[:, None]
    plain = InMemoryDataset(images, y, mean=[0.5], std=[0.5], train=True, hflip=0.0, scale=(1.0, 1.0))
    erased = InMemoryDataset(images, y, mean=[0.5], std=[0.5], train=True, hflip=0.0, scale=(1.0, 1.0),
                             random_erasing=1.0)  # fmt: skip
    a, b = plain.__getitems__(list(range(64)))[0], erased.__getitems__(list(range(64)))[0]
    changed = (a != b).flatten(1).float().mean(1)
    assert bool((changed > 0.01).all()) and bool((changed < 0.5).all())  # every image, one rectangle
    evaluated = InMemoryDataset(images, y, mean=[0.5], std=[0.5], random_erasing=1.0)
    assert torch.equal(evaluated.__getitems__([0, 1])[0], plain.__getitems__([0, 1])[0])


def test_alternating_flip_mirrors_each_image_in_every_other_epoch(png_split) -> None:
    """``train.hflip_schedule: alternate``: an image mirrored in one epoch is not in the next, for the
    decoded split and the per-file one alike, and the loader's epoch reaches the dataset."""
    from components.train.torch_recipe import epoch_flips, set_loader_epoch

    paths, x, y = png_split
    n = 32
    images = x[:n, None].copy()
    images[..., : images.shape[-1] // 2] = 0  # a dark left half: a mirrored image has it on the right

    def dark_on_right(batch: torch.Tensor) -> torch.Tensor:
        half = batch.shape[-1] // 2
        return batch[..., half:].flatten(1).mean(1) < batch[..., :half].flatten(1).mean(1)

    def left_dark(img: Image.Image) -> torch.Tensor:
        t = torch.from_numpy(np.asarray(img)).float()[None]
        t[..., : t.shape[-1] // 2] = 0
        return t

    flips = alternating_flips(n, 0.5, seed=7)
    assert 8 < int(flips.sum()) < 24 and torch.equal(flips, alternating_flips(n, 0.5, seed=7))
    in_memory = InMemoryDataset(images, y[:n], mean=[0.5], std=[0.5], train=True, scale=(1.0, 1.0),
                                flip_base=flips)  # fmt: skip
    per_file = ManifestDataset(paths[:n], y[:n], transform=left_dark, mode="L", flip_base=flips)
    for ds, batch in (
        (in_memory, lambda: in_memory.__getitems__(list(range(n)))[0]),
        (per_file, lambda: torch.stack([per_file[i][0] for i in range(n)])),
    ):
        loader = DataLoader(ds, batch_size=4)
        seen = []
        for epoch in range(3):
            set_loader_epoch(loader, epoch)
            seen.append(dark_on_right(batch()))
        assert torch.equal(seen[0], flips) and torch.equal(seen[1], ~flips) and torch.equal(seen[2], flips)
    random_ds = InMemoryDataset(images, y[:n], mean=[0.5], std=[0.5], train=True, scale=(1.0, 1.0))
    assert random_ds.flip_base is None
    # the recipe's schedule: alternate only where images are mirrored at all (train.hflip > 0)
    recipe = SimpleNamespace(hflip_schedule="alternate", hflip=0.5, seed=7)
    assert torch.equal(epoch_flips(cast(Any, recipe), n), flips)
    assert epoch_flips(cast(Any, SimpleNamespace(hflip_schedule="alternate", hflip=0.0, seed=7)), n) is None
    assert epoch_flips(cast(Any, SimpleNamespace(hflip_schedule="random", hflip=0.5, seed=7)), n) is None
