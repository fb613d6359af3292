"""Torch datasets over the manifest: images are decoded from the content-addressed store."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from components.errors import DataError


class ManifestDataset(Dataset):
    """(image tensor (C, H, W), class index) pairs for the rows of one split."""

    def __init__(
        self,
        paths: Sequence[Path],
        targets: Sequence[int],
        *,
        transform: Callable[[Image.Image], torch.Tensor],
        mode: str,
    ) -> None:
        if len(paths) != len(targets):
            raise ValueError("paths and targets differ in length")
        self.paths = [Path(p) for p in paths]
        self.targets = [int(t) for t in targets]
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as img:
            x = self.transform(img.convert(self.mode))
        return x, self.targets[i]


def split_rows(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        raise DataError(
            f"the manifest has no {split!r} images: re-run `imgflow ingest` or check split params"
        )
    return rows.reset_index(drop=True)


def encode_labels(labels: Sequence[str], classes: Sequence[str]) -> list[int]:
    """Class names -> indices in ``classes`` order; an unknown name is a DataError."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({lab for lab in labels if lab not in index})
    if unknown:
        raise DataError(f"labels not in the class list: {unknown[:10]}; re-run `imgflow ingest`")
    return [index[lab] for lab in labels]


def dataset_for_split(
    manifest: pd.DataFrame,
    split: str,
    *,
    data_dir: Path,
    classes: Sequence[str],
    transform: Callable[[Image.Image], torch.Tensor],
    mode: str,
) -> ManifestDataset:
    rows = split_rows(manifest, split)
    return ManifestDataset(
        [data_dir / p for p in rows["path"]],
        encode_labels(rows["label"].tolist(), classes),
        transform=transform,
        mode=mode,
    )


def grey_dataset(manifest: pd.DataFrame, *, sample: int = 200) -> bool:
    """True when the (sampled) images are all single-channel: such data trains 1-channel models."""
    modes: Any = manifest["mode"].head(sample) if len(manifest) > sample else manifest["mode"]
    return bool(set(modes) <= {"L", "1", "I;16", "I"})
