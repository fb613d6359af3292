"""Batch inference over a folder or CSV of images into a Parquet file, streaming.

Images are read and decoded by DataLoader worker processes (``workers``), predicted a batch at a
time and appended to the Parquet file one row group per batch, so memory stays flat however many
images there are. An image that cannot be decoded becomes a row with its ``error`` (never a crash,
never dropped silently).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from components.core.errors import DataError
from components.model.checkpoint import Predictor, Scored

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def list_inputs(source: Path) -> list[Path]:
    """A folder (every image file below it, sorted) or a CSV with a ``path`` column (relative to it)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif source.suffix.lower() == ".csv" and source.is_file():
        table = pd.read_csv(source)
        if "path" not in table.columns:
            raise DataError(f"{source} needs a 'path' column (image paths relative to the CSV)")
        files = [(source.parent / p) for p in table["path"].astype(str)]
    else:
        raise DataError(f"{source} is neither a folder of images nor a .csv file with a 'path' column")
    if not files:
        raise DataError(f"no images found in {source} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


class _Images(Dataset):
    """path -> (C, H, W) tensor, error text ('' when fine); runs in loader workers."""

    def __init__(self, paths: list[Path], predictor: Predictor) -> None:
        self.paths = paths
        self.preprocess = predictor.preprocess
        self.shape = tuple(predictor.spec.data_config["input_size"])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return self.preprocess([self.paths[i].read_bytes()])[0], ""
        except (DataError, OSError) as e:
            return torch.zeros(self.shape), str(e)


def predict_batches(
    predictor: Predictor, paths: list[Path], *, batch_size: int, workers: int
) -> Iterator[tuple[Scored, list[str]]]:
    """Yield (the batch's :class:`Scored`: (B, K) calibrated probabilities and, when the model ships
    an OOD detector, (B,) OOD scores; per-image error text) batch by batch, in order."""
    loader = DataLoader(
        _Images(paths, predictor), batch_size=batch_size, num_workers=workers, shuffle=False,
        persistent_workers=False, prefetch_factor=2 if workers else None,
    )  # fmt: skip
    for x, errors in loader:
        yield predictor.score_batch(x), list(errors)


def _frame(
    paths: Sequence[str | Path], probs: np.ndarray, errors: list[str], predictor: Predictor, top_k: int
) -> pd.DataFrame:
    classes = predictor.spec.classes
    order = np.argsort(-probs, axis=1)[:, :top_k]
    ok = [not e for e in errors]
    sets = predictor.label_sets(probs)
    return pd.DataFrame(
        {
            "path": [str(p) for p in paths],
            "labels": [s if good else [] for s, good in zip(sets, ok, strict=True)],
            "label": [classes[o[0]] if good else None for o, good in zip(order, ok, strict=True)],
            "score": [float(r[o[0]]) if good else None for r, o, good in zip(probs, order, ok, strict=True)],
            "top_k_labels": [
                [classes[j] for j in o] if good else [] for o, good in zip(order, ok, strict=True)
            ],
            "top_k_probs": [
                [float(r[j]) for j in o] if good else [] for r, o, good in zip(probs, order, ok, strict=True)
            ],
            "probabilities": [
                r.astype(np.float32).tolist() if good else [] for r, good in zip(probs, ok, strict=True)
            ],
            "error": [e or None for e in errors],
        }
    )


def prediction_schema(*, ood: bool = False, sets: bool = False) -> Any:
    """The Arrow schema of a predictions Parquet file (``imgflow predict``, with or without ``--ray``);
    ``ood``: with ``ood_score`` and ``ood`` columns, ``sets``: with ``prediction_set`` (models that ship
    an OOD detector / conformal sets, :mod:`components.model.uncertainty`)."""
    import pyarrow as pa

    fields = [("path", pa.string()), ("labels", pa.list_(pa.string())), ("label", pa.string()),
              ("score", pa.float64()), ("top_k_labels", pa.list_(pa.string())), ("top_k_probs", pa.list_(pa.float64())),
              ("probabilities", pa.list_(pa.float32())), ("error", pa.string())]  # fmt: skip
    fields += [("ood_score", pa.float64()), ("ood", pa.bool_())] if ood else []
    fields += [("prediction_set", pa.list_(pa.string()))] if sets else []
    return pa.schema(fields)


def _with_trust(frame: pd.DataFrame, scored: Scored, predictor: Predictor, ok: list[bool]) -> pd.DataFrame:
    """``frame`` plus the model's ood_score / ood / prediction_set columns (null / [] for unreadable files)."""
    rows = predictor.trust_fields(scored)
    if scored.ood_scores is not None and predictor.ood is not None:
        frame["ood_score"] = [r["ood_score"] if good else None for r, good in zip(rows, ok, strict=True)]
        frame["ood"] = [r["ood"] if good else None for r, good in zip(rows, ok, strict=True)]
    if predictor.conformal is not None:
        frame["prediction_set"] = [
            r["prediction_set"] if good else [] for r, good in zip(rows, ok, strict=True)
        ]
    return frame


def prediction_table(
    paths: Sequence[str],
    probs: np.ndarray,
    errors: list[str],
    predictor: Predictor,
    *,
    top_k: int,
    ood_scores: np.ndarray | None = None,
) -> Any:
    """One batch's prediction rows as an Arrow table of :func:`prediction_schema`: probs (B, K), one
    error text per image ('' when it decoded), ood_scores (B,) when the model has an OOD detector
    (:meth:`Predictor.score_batch`). The one record function of every batch-prediction path."""
    import pyarrow as pa

    frame = _frame(paths, probs, errors, predictor, min(top_k, len(predictor.spec.classes)))
    frame = _with_trust(frame, Scored(probs, ood_scores), predictor, [not e for e in errors])
    schema = prediction_schema(ood="ood" in frame.columns, sets="prediction_set" in frame.columns)
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def predict_to_parquet(
    predictor: Predictor,
    paths: list[Path],
    out: Path,
    *,
    batch_size: int = 256,
    workers: int = 2,
    top_k: int = 3,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Predict every image in ``paths`` into ``out`` (Parquet, one row group per batch)."""
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    classes = predictor.spec.classes
    writer = pq.ParquetWriter(
        str(out), prediction_schema(ood=predictor.ood is not None, sets=predictor.conformal is not None)
    )
    done = failed = 0
    try:
        for scored, errors in predict_batches(predictor, paths, batch_size=batch_size, workers=workers):
            batch_paths = [str(p) for p in paths[done : done + len(errors)]]
            writer.write_table(prediction_table(batch_paths, scored.probs, errors, predictor, top_k=top_k,
                                                ood_scores=scored.ood_scores))  # fmt: skip
            done, failed = done + len(errors), failed + sum(1 for e in errors if e)
            if on_batch:
                on_batch(len(errors))
    finally:
        writer.close()
    return {"images": done, "failed": failed, "out": str(out), "classes": list(classes)}
