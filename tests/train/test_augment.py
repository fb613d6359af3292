"""``train.augment``: photometric TrivialAugment / AugMix on batches (components/train/augment.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from components.core.config import TrainConfig
from components.core.errors import ConfigError
from components.data.datasets import InMemoryDataset, ManifestDataset
from components.model.models import create_image_transform
from components.train import augment
from tests.conftest import fmnist_arrays


def _grey_batch(n: int = 32) -> torch.Tensor:
    x, _ = fmnist_arrays(n=n)
    return torch.from_numpy(np.asarray(x)).float().div(255).unsqueeze(1)


def test_grey_images_get_no_colour_op_and_stay_grey_in_rgb() -> None:
    assert "colour" not in augment.ops_for(1) and "colour" in augment.ops_for(3)
    grey = _grey_batch()
    g = torch.Generator().manual_seed(0)
    for fn in (augment.trivial_augment, augment.augmix):
        out = fn(grey, generator=g)
        assert out.shape == grey.shape and out.dtype == grey.dtype
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert not torch.equal(out, grey)  # most images changed
        # a grey picture stored as RGB stays grey: every op treats the channels alike
        rgb = fn(grey.expand(-1, 3, -1, -1).contiguous(), generator=g)
        torch.testing.assert_close(rgb[:, 0], rgb[:, 1])
        torch.testing.assert_close(rgb[:, 1], rgb[:, 2])


def test_colour_op_changes_colour_on_rgb_and_ops_match_pil() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    half = torch.tensor([0.25])  # enhance factor 0.01 + 1.98 * 0.25 = 0.505
    for op, enhancer in (("brightness", ImageEnhance.Brightness), ("colour", ImageEnhance.Color)):
        ours = augment.apply_op(x, op, half)[0].permute(1, 2, 0).numpy() * 255
        ref = np.asarray(enhancer(Image.fromarray(pixels)).enhance(0.505), dtype=np.float32)
        assert np.abs(ours - ref).max() <= 2.0, op  # PIL rounds to uint8 (and its grey to integers)
    coloured = augment.apply_op(x, "colour", torch.tensor([0.0]))  # factor 0.01: nearly grey
    assert (
        float((coloured[:, 0] - coloured[:, 1]).abs().max()) < 0.05 < float((x[:, 0] - x[:, 1]).abs().max())
    )


def test_same_generator_same_batch_and_unknown_kind_refused() -> None:
    grey = _grey_batch(8)
    a = augment.augmix(grey, generator=torch.Generator().manual_seed(3))
    b = augment.augmix(grey, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match="train.augment"):
        augment.photometric("randaugment")
    with pytest.raises(ValueError, match="augment"):
        TrainConfig(augment="colourjitter")


@pytest.mark.parametrize("kind", ["trivialaugment", "augmix"])
def test_attach_augments_training_batches_of_both_dataset_kinds(kind: str, tmp_path: Path) -> None:
    x, y = fmnist_arrays(n=16)
    images = np.asarray(x, dtype=np.uint8)[:, None]
    plain = InMemoryDataset(
        images, np.asarray(y), mean=(0.5,), std=(0.5,), train=True, hflip=0.0, scale=(1, 1)
    )
    aug = augment.attach(
        InMemoryDataset(images, np.asarray(y), mean=(0.5,), std=(0.5,), train=True, hflip=0.0, scale=(1, 1)),
        kind, mean=(0.5,), std=(0.5,),
    )  # fmt: skip
    xp, yp = plain.__getitems__(list(range(16)))
    xa, ya = aug.__getitems__(list(range(16)))
    assert xa.shape == xp.shape == (16, 1, 28, 28) and torch.equal(ya, yp)
    assert not torch.equal(xa, xp) and float(xa.min()) >= -1.0 - 1e-5 and float(xa.max()) <= 1.0 + 1e-5
    assert augment.attach(plain, "none", mean=(0.5,), std=(0.5,)) is plain
    # the per-file path (train.cache=off): RGB files through timm's transform, then the same ops
    paths = []
    for i, a in enumerate(x[:4]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.stack([a, a // 2, a // 3], -1)).save(paths[-1])
    tf = create_image_transform(
        {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}, is_training=True
    )
    files = augment.attach(ManifestDataset(paths, list(y[:4]), transform=tf, mode="RGB"), kind,
                           mean=(0.5,) * 3, std=(0.5,) * 3)  # fmt: skip
    assert files[0][0].shape == (3, 32, 32)
