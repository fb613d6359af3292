"""Torch datasets over the manifest: images from the content-addressed store, decoded per item
(``ManifestDataset``, timm's PIL transforms) or once per split (``InMemoryDataset``, batched
augmentation on tensors: the default when the split fits in ``train.cache_max_gb``)."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from components.core.errors import DataError
from components.data.grey_cache import grey_rows
from components.data.image_stats import model_input
from components.task import SINGLELABEL, Task, get_task

Targets = Sequence[int] | np.ndarray
"""Class indices (N,) for single-label tasks, or a 0/1 indicator matrix (N, C) for multi-label ones."""


def as_target_tensor(targets: Targets) -> torch.Tensor:
    """(N,) int64 class indices, or (N, C) float32 multi-hot rows (what BCE-with-logits takes)."""
    arr = np.asarray(targets)
    if arr.ndim == 2:
        return torch.as_tensor(arr, dtype=torch.float32)
    return torch.as_tensor(arr.astype(np.int64), dtype=torch.long)


class ManifestDataset(Dataset):
    """(image tensor (C, H, W), target) pairs for the rows of one split: a class index, or a
    multi-hot float vector (C,) for multi-label tasks."""

    def __init__(
        self,
        paths: Sequence[Path],
        targets: Targets,
        *,
        transform: Callable[[Image.Image], torch.Tensor],
        mode: str,
        flip_base: torch.Tensor | None = None,
    ) -> None:
        if len(paths) != len(targets) or (flip_base is not None and len(flip_base) != len(paths)):
            raise ValueError("paths, targets and flip_base differ in length")
        self.paths = [Path(p) for p in paths]
        self.targets = as_target_tensor(targets)
        self.transform = transform
        self.mode = mode
        self.flip_base, self.epoch = flip_base, 0

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next items belong to (with ``flip_base``: the alternating flip's parity)."""
        self.epoch = epoch

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        with Image.open(self.paths[i]) as img:
            x = self.transform(model_input(img, self.mode))
        if self.flip_base is not None and bool(mirrored_in_epoch(self.flip_base, torch.tensor([i]), self.epoch)):
            x = torch.flip(x, dims=[-1])  # after the transform: its crop and erasing are symmetric
        # A class index as a plain int, a multi-hot row as its (C,) tensor.
        return x, (self.targets[i] if self.targets.ndim == 2 else int(self.targets[i]))


def split_rows(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        raise DataError(
            f"the manifest has no {split!r} images: re-run `imgflow ingest` or check split params"
        )
    return rows.reset_index(drop=True)


def label_sets_of(rows: pd.DataFrame) -> list[list[str]]:
    """Each manifest row's labels: its ``labels`` set (``[label]`` for a single-label dataset; older
    manifests without that column: ``[label]``)."""
    if "labels" not in rows:
        return [[str(lab)] for lab in rows["label"]]
    return [[str(lab) for lab in labels] for labels in rows["labels"]]


def encode_targets(rows: pd.DataFrame, classes: Sequence[str], task: str | Task) -> Targets:
    """A split's targets in the task's encoding (:meth:`components.task.Task.encode`): class indices
    (single-label), or the indicator matrix of the label sets (multi-label)."""
    return get_task(task).encode(label_sets_of(rows), classes)


def dataset_for_split(
    manifest: pd.DataFrame,
    split: str,
    *,
    data_dir: Path,
    classes: Sequence[str],
    transform: Callable[[Image.Image], torch.Tensor],
    mode: str,
    task: str | Task = SINGLELABEL,
) -> ManifestDataset:
    rows = split_rows(manifest, split)
    return ManifestDataset(
        [data_dir / p for p in rows["path"]],
        encode_targets(rows, classes, task),
        transform=transform,
        mode=mode,
    )


def grey_dataset(manifest: pd.DataFrame, *, sample: int = 200) -> bool:
    """True when the (sampled) images are all single-channel: such data trains 1-channel models."""
    modes: Any = manifest["mode"].head(sample) if len(manifest) > sample else manifest["mode"]
    return bool(set(modes) <= {"L", "1", "I;16", "I"})


# --- decode once: a split as one uint8 array, augmented and normalised a batch at a time -------------


def decoded_size(rows: int, in_chans: int, side: int) -> int:
    """Bytes of a split decoded to uint8 (N, C, side, side)."""
    return rows * in_chans * side * side


def _fit_to_side(img: Image.Image, side: int, crop_pct: float, interpolation: str) -> Image.Image:
    """The eval geometry of timm's transform: resize the short side to side / crop_pct, centre-crop."""
    if img.size == (side, side):
        return img
    scale_to = int(round(side / crop_pct))
    w, h = img.size
    if w <= h:
        size = (scale_to, max(1, int(round(h * scale_to / w))))
    else:
        size = (max(1, int(round(w * scale_to / h))), scale_to)
    resample = Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR
    img = img.resize(size, resample)
    left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
    return img.crop((left, top, left + side, top + side))


def decode_split(
    paths: Sequence[Path],
    *,
    mode: str,
    side: int,
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """Every image decoded once into a (N, C, side, side) uint8 array (the eval geometry)."""
    channels = 1 if mode == "L" else 3
    out = np.empty((len(paths), channels, side, side), dtype=np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as img:
            arr = np.asarray(_fit_to_side(model_input(img, mode), side, crop_pct, interpolation))
        out[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return out


def cached_split_array(
    paths: Sequence[Path],
    *,
    cache_file: Path,
    mode: str,
    side: int,
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
    data_dir: Path | None = None,
) -> np.ndarray:
    """``decode_split`` once per (data version, split, geometry): a .npy file memory-mapped by every
    worker. The first worker decodes under a file lock; the others wait and map the same file.

    ``data_dir``: the data dir the (content-addressed) ``paths`` are in; a grey split whose images
    ingest saved at exactly ``side`` x ``side`` (:mod:`components.data.grey_cache`) is taken from there
    instead of decoded: the same values (no resize or crop applies at that size)."""
    from filelock import FileLock

    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_file) + ".lock"):
        if not cache_file.exists():
            held = grey_rows(data_dir, [Path(p).stem for p in paths], shape=(side, side)) if mode == "L" else None
            arr = (
                held[:, None]
                if held is not None
                else decode_split(paths, mode=mode, side=side, crop_pct=crop_pct, interpolation=interpolation)
            )
            tmp = cache_file.with_suffix(".tmp.npy")
            np.save(tmp, arr)
            os.replace(tmp, cache_file)
    arr = np.load(cache_file, mmap_mode="r")
    if arr.shape[0] != len(paths):
        raise DataError(
            f"decoded cache {cache_file} has {arr.shape[0]} images, expected {len(paths)}: delete it"
        )
    return arr


def cached_split_at(
    paths: Sequence[Path],
    *,
    split: str,
    data_config: dict[str, Any],
    mode: str,
    cache_dir: Path,
    data_dir: Path | None = None,
) -> np.ndarray:
    """:func:`cached_split_array` at a model's eval geometry (``data_config``), under the name every stage
    gives it (``<cache_dir>/<split>-<key>.npy``): training, the embedding store and the reports share it."""
    geometry = {
        "mode": mode,
        "side": int(data_config["input_size"][-1]),
        "crop_pct": float(data_config.get("crop_pct", 1.0)),
        "interpolation": str(data_config.get("interpolation", "bilinear")),
    }
    key = cache_key(paths, **geometry)  # type: ignore[arg-type]
    return cached_split_array(paths, cache_file=Path(cache_dir) / f"{split}-{key}.npy", data_dir=data_dir, **geometry)  # type: ignore[arg-type]


def normalise(images: np.ndarray, *, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Decoded uint8 images (N, C, H, W) -> float (N, C, H, W) as the model's data config says (``/255``,
    then each channel's mean and std): what the model's own transform does to one PIL image."""
    c = images.shape[1]
    m = torch.tensor(list(mean)[:c], dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(list(std)[:c], dtype=torch.float32).view(1, c, 1, 1)
    return (torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0) - m) / s


def decoded_cache_dir(state_dir: Path) -> Path:
    """``<state_dir>/cache``: the decoded splits (uint8 .npy) that training, pretraining, the embedding
    store and the label-efficiency report share."""
    return Path(state_dir) / "cache"


DECODE_LAYOUT = "upright"
"""Part of every decoded split's cache key: bumped when decoding changes (``upright``: EXIF orientation
applied, :func:`components.data.image_stats.model_input`), so no cache of the old decoding is reused."""


def cache_key(paths: Sequence[Path], *, mode: str, side: int, crop_pct: float, interpolation: str) -> str:
    """Content key of a decoded split: the (content-addressed) file names in order plus the geometry."""
    h = hashlib.sha256(f"{mode}|{side}|{crop_pct}|{interpolation}|{DECODE_LAYOUT}".encode())
    for p in paths:
        h.update(Path(p).name.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def alternating_flips(n: int, hflip: float, seed: int) -> torch.Tensor:
    """``train.hflip_schedule: alternate`` (airbench's alternating flip): (n,) bool, image i's mirror in
    even epochs, drawn once with probability ``hflip``; odd epochs mirror the others, so every image
    is seen both ways in any two consecutive epochs (:func:`mirrored_in_epoch`)."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < hflip


def mirrored_in_epoch(flip_base: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which of the images at ``index`` an alternating flip mirrors in ``epoch``: (len(index),) bool."""
    return flip_base[index] ^ bool(epoch % 2)


def random_resized_crop_flip(
    x: torch.Tensor,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (0.9, 1.1),
    hflip: float = 0.5,
    generator: torch.Generator | None = None,
    side: int | None = None,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """timm's training geometry (RandomResizedCrop(scale, ratio) + horizontal flip) for a whole batch:
    one affine sampling grid per image, applied by ``grid_sample`` in one call (no per-image Python).
    ``side``: the crops' output side (None: the input's); ``flip``: which images to mirror, (N,) bool
    (None: each with probability ``hflip``)."""
    n = x.shape[0]
    out_shape = list(x.shape) if side is None else [n, x.shape[1], side, side]
    if scale[0] < 1.0 or scale[1] < 1.0:
        area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
        log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
        r = torch.exp(log_r)
        w, h = torch.sqrt(area * r).clamp(max=1.0), torch.sqrt(area / r).clamp(max=1.0)
        tx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
        ty = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    else:
        w = h = torch.ones(n)
        tx = ty = torch.zeros(n)
    mirror = torch.rand(n, generator=generator) < hflip if flip is None else flip
    sign = torch.where(mirror, -1.0, 1.0)
    if side is None and bool((w == 1).all() and (h == 1).all() and (sign == 1).all()):
        return x
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * sign, tx
    theta[:, 1, 1], theta[:, 1, 2] = h, ty
    grid = F.affine_grid(theta.to(x.dtype), out_shape, align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InMemoryDataset(Dataset):
    """A decoded split (uint8 (N, C, H, W), in memory or memory-mapped) that hands the DataLoader whole
    batches through ``__getitems__``: one gather, one normalisation, one batched augmentation.

    Use it with ``collate_fn=batch_collate``. Training augmentation: ``random_resized_crop_flip``.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: Targets,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool = False,
        hflip: float = 0.5,
        scale: tuple[float, float] = (0.85, 1.0),
        random_erasing: float = 0.0,
        paths: Sequence[Path] | None = None,
        flip_base: torch.Tensor | None = None,
    ) -> None:
        if len(images) != len(targets) or (paths is not None and len(paths) != len(targets)):
            raise ValueError("images, targets and paths differ in length")
        self.images = images
        self.paths = list(paths) if paths is not None else None  # row i's source file (provenance)
        self.targets = as_target_tensor(targets)
        c = images.shape[1]
        self.mean = torch.tensor(list(mean)[:c], dtype=torch.float32).view(1, c, 1, 1) * 255.0
        self.std = torch.tensor(list(std)[:c], dtype=torch.float32).view(1, c, 1, 1) * 255.0
        self.train, self.hflip, self.scale = train, hflip, scale
        self.flip_base, self.epoch = flip_base, 0  # flip_base: alternating_flips (training only)
        self.erase = None
        if train and random_erasing > 0:  # timm's random erasing, on the normalised batch
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(probability=random_erasing, mode="pixel", device="cpu")

    def __len__(self) -> int:
        return len(self.targets)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next batches belong to (with ``flip_base``: the alternating flip's parity)."""
        self.epoch = epoch

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx)  # sorted reads are kinder to a memory-mapped file
        raw = np.empty((len(idx), *self.images.shape[1:]), dtype=np.uint8)
        raw[order] = self.images[idx[order]]
        x = (torch.from_numpy(raw).float() - self.mean) / self.std
        if self.train:
            flip = None if self.flip_base is None else mirrored_in_epoch(self.flip_base, torch.from_numpy(idx), self.epoch)
            x = random_resized_crop_flip(x, scale=self.scale, hflip=self.hflip, flip=flip)
            if self.erase is not None:
                x = self.erase(x)
        return x, self.targets[torch.from_numpy(idx)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        x, y = self.__getitems__([i])
        return x[0], (y[0] if y.ndim == 2 else int(y[0]))


def batch_collate(batch: Any) -> Any:
    """Collate for ``InMemoryDataset``: its ``__getitems__`` already returns the batch."""
    return batch
