"""The images a pretraining run sees and the recipe it runs: resolved once on the driver.

Sources, labels ignored: the ingested data version's train split (val and test stay unseen, so the
label-efficiency report's test accuracy is not inflated by pretraining on its own test images), another
ingested data folder (one holding ``manifest.parquet``), or any folder of image files (unlabelled
extras). They are decoded once, at the side and channels supervised training uses, into a uint8
``.npy`` that every Ray worker memory-maps (:func:`components.data.datasets.cached_split_array`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from components.core.config import SSLConfig, TrainConfig
from components.core.errors import ConfigError, DataError
from components.data.datasets import cache_key, cached_split_array, split_rows
from components.data.manifest import DataPaths, read_manifest
from components.model.models import create_classifier, image_mode, resolve_data_config
from components.train.ssl import SSLRecipe, hash_images, resolve_byol_momentum, steps_per_epoch
from components.train.ssl_augment import ViewAugment

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def source_paths(source: Path) -> list[Path]:
    """The image files of ``source``: an ingested data folder's train split, or every image file
    under a plain folder (sorted, so the same folder gives the same order)."""
    if not source.is_dir():
        raise ConfigError(f"--data {source}: no such folder (give a data folder or a folder of images)")
    data = DataPaths(source)
    if data.manifest.is_file():
        rows = split_rows(read_manifest(data.manifest), "train")
        return [(source / p).resolve() for p in rows["path"]]
    paths = sorted(p.resolve() for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"--data {source}: no image files ({', '.join(IMAGE_SUFFIXES)}) under it")
    return paths


def folder_in_chans(paths: list[Path], *, sample: int = 50) -> int:
    """1 when the sampled images are all grey (mode L / LA / 1), else 3."""
    step = max(1, len(paths) // sample)
    for p in paths[::step]:
        try:
            with Image.open(p) as img:
                if img.mode not in ("L", "LA", "1", "I", "I;16"):
                    return 3
        except OSError as e:
            raise DataError(f"cannot read image {p}: {e}") from e
    return 1


def model_data_config(model: str, in_chans: int, input_size: int | None) -> dict[str, Any]:
    """The preprocessing supervised training of ``model`` uses (timm's data config: side, mean, std):
    pretraining normalises the same way, so the backbone sees the inputs it will see when fine-tuned."""
    net = create_classifier(model, 0, in_chans=in_chans)
    return dict(resolve_data_config(net, input_size=input_size))


def decode_images(
    paths: list[Path], *, in_chans: int, side: int, cache_dir: Path, max_images: int | None
) -> Path:
    """Decode ``paths`` (an evenly spaced subset of ``max_images`` when set) once into a cached
    (N, C, side, side) uint8 ``.npy``; returns its path."""
    if max_images is not None and len(paths) > max_images:
        keep = np.linspace(0, len(paths) - 1, max_images).round().astype(int)
        paths = [paths[i] for i in keep]
    geometry = {"mode": image_mode(in_chans), "side": side, "crop_pct": 1.0, "interpolation": "bilinear"}
    cache_file = cache_dir / f"ssl-{cache_key(paths, **geometry)}.npy"  # type: ignore[arg-type]
    cached_split_array(paths, cache_file=cache_file, **geometry)  # type: ignore[arg-type]
    return cache_file


def build_ssl_recipe(
    cfg: SSLConfig,
    train: TrainConfig,
    *,
    images_file: Path,
    in_chans: int,
    data_config: dict[str, Any],
    seed: int,
    epochs: int | None = None,
) -> SSLRecipe:
    """The run's recipe: ``ssl.*`` values, ``train.model`` / ``train.deterministic``, and augmentations
    normalised as the model's ``data_config`` says (see :func:`model_data_config`)."""
    images = np.load(images_file, mmap_mode="r")
    c = images.shape[1]
    mean, std = tuple(data_config["mean"])[:c], tuple(data_config["std"])[:c]
    augment = ViewAugment(
        crop_scale=cfg.crop_scale, hflip=cfg.hflip, brightness=cfg.brightness, contrast=cfg.contrast,
        noise=cfg.noise, grey_p=cfg.grey_p if in_chans == 3 else 0.0, mean=mean, std=std,
    )  # fmt: skip
    run_epochs, batch = epochs or cfg.epochs, min(cfg.batch_size, len(images))
    return SSLRecipe(
        method=cfg.method, model=train.model, in_chans=in_chans, images_file=images_file.resolve(),
        data_hash=hash_images(images), epochs=run_epochs, batch_size=batch,
        lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs, temperature=cfg.temperature,
        proj_hidden=cfg.proj_hidden, proj_dim=cfg.proj_dim, augment=augment, deterministic=train.deterministic,
        seed=seed, loss=cfg.loss, channels_last=train.channels_last, amp=train.amp, local_crops=cfg.local_crops,
        local_scale=cfg.local_scale, local_side=cfg.local_side, byol_backbone=cfg.byol_backbone,
        byol_momentum=resolve_byol_momentum(
            cfg.byol_momentum, run_epochs * steps_per_epoch(len(images), batch, train.workers)),
    )  # fmt: skip
