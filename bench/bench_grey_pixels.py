"""Ingest's grey pixels for the later stages (issue 21, ``components/data/grey_cache.py``): what the audit's
pixel read and a grey model's decoded splits cost from ``data/grey_pixels.npz`` against decoding the files,
on all 70,000 Fashion-MNIST images.

A fresh data dir is ingested once (which writes the file; its save is timed apart, on the same rows).
Then ``ROUNDS`` alternating rounds of: the audit's read (``label_quality.read_grey`` against ``load_grey``,
the same values checked) and the train, val and test splits at 28 px grey into fresh ``.npy`` caches
(``cached_split_array`` with and without ``data_dir``). Figures are the minimum of the rounds and the ratio
decode / file, both measured in this run.

``--quick``: 100 images per class (a smoke test).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROUNDS = 3


def _seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(quick: bool = False) -> dict[str, Any]:
    from components.data.datasets import cached_split_array
    from components.data.grey_cache import load_grey_pixels, save_grey_pixels
    from components.data.ingest import ingest
    from components.data.manifest import DataPaths, read_manifest
    from components.quality import label_quality as lq

    times: dict[str, list[float]] = {
        "audit_file": [],
        "audit_decode": [],
        "splits_file": [],
        "splits_decode": [],
    }
    with tempfile.TemporaryDirectory(prefix="imgflow-bench-grey-") as tmp:
        data = Path(tmp) / "data"
        ingest_s, _ = _seconds(
            lambda: ingest("fashion-mnist", data_dir=data, max_per_class=100 if quick else None)
        )
        held = load_grey_pixels(data)
        if held is None:
            raise RuntimeError("ingest saved no grey pixels for Fashion-MNIST")
        ids = [i.decode() for i in held.image_ids]
        save_s, _ = _seconds(lambda: save_grey_pixels(Path(tmp), ids, list(held.pixels), ["L"] * len(ids)))
        rows = read_manifest(DataPaths(data).manifest)
        paths = [data / p for p in rows["path"]]

        def splits(data_dir: Path | None) -> None:
            cache = Path(tmp) / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            for split in ("train", "val", "test"):
                files = [data / p for p in rows.loc[rows["split"] == split, "path"]]
                cached_split_array(
                    files, cache_file=cache / f"{split}.npy", mode="L", side=28, data_dir=data_dir
                )

        for _ in range(ROUNDS):
            t_file, from_file = _seconds(lambda: lq.read_grey(rows, data, side=28))
            t_decode, decoded = _seconds(
                lambda: lq.load_grey(paths, side=28, workers=lq.decode_workers(rows))
            )
            if not np.array_equal(from_file, decoded):
                raise RuntimeError("the grey pixels file differs from decoding")
            times["audit_file"].append(t_file)
            times["audit_decode"].append(t_decode)
            times["splits_file"].append(_seconds(lambda: splits(data))[0])
            times["splits_decode"].append(_seconds(lambda: splits(None))[0])
    best = {k: min(v) for k, v in times.items()}

    def fig(name: str, value: float, unit: str = "s") -> dict[str, Any]:
        return {"name": name, "value": value, "unit": unit, "target": "", "passed": None}

    return {
        "figures": [
            fig(f"audit read of {len(paths)} images, decoding", best["audit_decode"]),
            fig("audit read, from grey_pixels.npz", best["audit_file"]),
            fig("audit read, decode / file", best["audit_decode"] / best["audit_file"], "x"),
            fig("train+val+test splits, decoding", best["splits_decode"]),
            fig("train+val+test splits, from grey_pixels.npz", best["splits_file"]),
            fig("splits, decode / file", best["splits_decode"] / best["splits_file"], "x"),
            fig("ingest (writes the file)", ingest_s),
            fig("saving the file alone", save_s),
        ],
        "rounds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "config": {"quick": quick, "images": len(paths), "rounds": ROUNDS},
    }
