"""Ingestion throughput on full Fashion-MNIST (70k images) vs a bare baseline of the same work.

Baseline, measured in the same run: decoding the idx files and PNG-encoding every image in one
loop with no store, hashing or manifest. The ratio shows what the ingestion machinery costs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from components.data.ingest import ingest
from components.data.sources import encode_png, fashion_mnist_paths, load_fashion_mnist


def run(*, quick: bool = False) -> dict[str, Any]:
    per_class = 500 if quick else None
    fm_dir = Path("/usr/share/datasets/fashion-mnist")
    t0 = time.perf_counter()
    arrays = load_fashion_mnist(fashion_mnist_paths(fm_dir, download=False))
    n = 0
    for images, _labels in arrays.values():
        for img in images if per_class is None else images[: per_class * 10]:
            encode_png(img)
            n += 1
    baseline_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = ingest(
            "fashion-mnist", data_dir=Path(tmp), max_per_class=per_class, fashion_mnist_dir=fm_dir
        )
        ingest_s = time.perf_counter() - t0
    return {
        "figures": [
            {"name": "images", "value": summary.ingested},
            {"name": "ingest_seconds", "value": ingest_s, "unit": "s"},
            {"name": "baseline_seconds", "value": baseline_s, "unit": "s"},
            {"name": "images_per_s", "value": summary.ingested / ingest_s, "unit": "img/s"},
            {"name": "ingest_vs_bare_encode", "value": ingest_s / baseline_s, "unit": "x"},
        ],
        "baseline": "decode idx + PNG-encode every image in one loop (no store, hash, manifest)",
    }
