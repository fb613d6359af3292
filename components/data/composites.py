"""A real multi-label dataset from Fashion-MNIST: square canvases with one or two items, labelled with all.

``imgflow make-composites OUT`` writes ``OUT/images/<split>/<n>.png`` and ``OUT/labels.csv``
(``path,labels,split`` with ``|``-separated labels) for ``imgflow ingest --source csv:OUT/labels.csv``.
Items of a canvas are distinct classes placed in non-overlapping halves with a random offset; each
official split only draws from its own images, so the test canvases hold only test items.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from components.data.sources import FASHION_MNIST_CLASSES, fashion_mnist_paths, load_fashion_mnist

SIDE = 28
CANVAS = 2 * SIDE
"""Canvases are square (56 x 56, two item columns): train with ``train.input_size=56`` so nothing is cropped."""


def compose(
    items: list[np.ndarray], rng: np.random.Generator, *, height: int = CANVAS, width: int = CANVAS
) -> np.ndarray:
    """Place 28x28 items left to right in equal columns of a (height, width) canvas, each jittered."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    col = width // len(items)
    for k, item in enumerate(items):
        x0 = k * col + int(rng.integers(0, max(1, col - SIDE + 1)))
        y0 = int(rng.integers(0, height - SIDE + 1))
        np.maximum(canvas[y0 : y0 + SIDE, x0 : x0 + SIDE], item, out=canvas[y0 : y0 + SIDE, x0 : x0 + SIDE])
    return canvas


def make_composites(
    out: Path,
    *,
    fashion_mnist_dir: Path,
    per_split: dict[str, int],
    two_item_fraction: float = 0.7,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> Path:
    """Write the composite dataset under ``out``; returns the CSV path. ``per_split`` maps
    ``train``/``test`` (official Fashion-MNIST splits) to the number of canvases."""
    data = load_fashion_mnist(fashion_mnist_paths(fashion_mnist_dir, download=False))
    rng = np.random.default_rng(seed)
    rows = []
    for split, count in per_split.items():
        images, labels = data[split]
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(count):
            first = int(rng.integers(len(images)))
            picks = [first]
            if rng.random() < two_item_fraction:
                while True:
                    other = int(rng.integers(len(images)))
                    if labels[other] != labels[first]:
                        picks.append(other)
                        break
            canvas = compose([images[i] for i in picks], rng)
            rel = f"images/{split}/{n:06d}.png"
            Image.fromarray(canvas).save(out / rel)
            names = [FASHION_MNIST_CLASSES[int(labels[i])] for i in picks]
            rows.append({"path": rel, "labels": "|".join(names), "split": split})
            if on_progress is not None:
                on_progress(1)
    csv_path = out / "labels.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "labels", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def composite_overrides(out: Path, *, project: str, model_name: str) -> list[str]:
    """``--set`` overrides that turn a project's params into the composite dataset's: its own data and
    output folders and registered model name, the 56x56 input, and a darkness bound for canvases that
    are mostly black by construction (one small item on a 56x56 canvas averages ~0.03-0.08)."""
    return [
        f"ingest.source=csv:{out / 'labels.csv'}",
        "ingest.task=multilabel",
        "ingest.max_per_class=null",
        f"project.data_dir={out / 'data'}",
        f"project.output_dir={out / 'outputs'}",
        f"train.input_size={CANVAS}",
        "validate.dark_below=0.01",
        f"register.model_name={model_name}",
        f"project.name={project}",
    ]


def write_composite_params(base: Path, out: Path) -> Path:
    """``out/params.yaml``: the ``base`` params file (all defaults when absent) with
    :func:`composite_overrides` applied and validated, for ``imgflow pipeline --params out/params.yaml``."""
    import yaml

    from components.core.config import apply_overrides, params_from_dict

    raw = yaml.safe_load(base.read_text()) if base.exists() else {}
    params = params_from_dict(raw or {}, source=str(base))
    overrides = composite_overrides(
        out,
        project=f"{params.project.name}-composites",
        model_name=f"{params.register_.model_name}-composites",
    )
    merged = apply_overrides(raw or {}, overrides)
    params_from_dict(merged, source=f"{base} + composite overrides")
    path = out / "params.yaml"
    header = f"# {base} for the multi-label composites in {out} (written by `imgflow make-composites`)\n"
    path.write_text(header + yaml.safe_dump(merged, sort_keys=False))
    return path
