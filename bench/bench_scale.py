"""Scale: Ray Data batch prediction vs today's single-process ``imgflow predict``, same run, same images.

All 70,000 Fashion-MNIST images (train + test) are written once as PNG files into a temporary
folder; one model folder (imgflow_cnn, temperature-scaled) scores them three ways, each writing
the same Parquet file: the single-process path (:func:`components.serve.predict.predict_to_parquet`,
``predict.workers`` loader processes: what ``imgflow predict --no-ray`` runs) and the Ray Data path
(:func:`components.serve.ray_batch.predict_with_ray`, what ``imgflow predict --ray`` runs) with one
CPU actor and with two. Throughput counts the whole job (listing excluded; for Ray the actors' start
included, the runtime's own start reported apart). Targets: 1 actor >= 0.9x single-process.

Ray Serve vs ``imgflow serve`` comes from ``bench/scale_serve.py`` when it exists (its figures join
the table, its JSON sits under ``serve``). ``--quick``: 2,000 images.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from components.core.config import PredictConfig
from components.data.sources import encode_png, fashion_mnist_paths, load_fashion_mnist
from components.model.checkpoint import ModelSpec, Predictor, save_classifier
from components.model.models import create_classifier, resolve_data_config
from components.serve import ray_batch
from components.serve.predict import list_inputs, predict_to_parquet

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = tuple(f"c{i}" for i in range(10))


def _write_pngs(folder: Path, n: int | None) -> int:
    """Fashion-MNIST train + test as PNG files (the first ``n``; None: all 70,000)."""
    arrays = load_fashion_mnist(fashion_mnist_paths(FMNIST, download=False))
    images = np.concatenate([arrays["train"][0], arrays["test"][0]])[:n]
    for i, a in enumerate(images):
        sub = folder / f"{i // 5000:02d}"  # 5,000 files per folder
        sub.mkdir(exist_ok=True)
        (sub / f"{i:05d}.png").write_bytes(encode_png(a))
    return len(images)


def _model(root: Path) -> Path:
    model = create_classifier("imgflow_cnn", len(CLASSES), in_chans=1)
    spec = ModelSpec("imgflow_cnn", CLASSES, 1, resolve_data_config(model), temperature=1.3)
    return save_classifier(model.state_dict(), spec, root / "model")


def _serve_figures(quick: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """bench/scale_serve.py's result and its figures (named ``serve_*``), or why it is not there."""
    try:
        from bench import scale_serve
    except ImportError as e:
        return {"status": "not available", "reason": str(e)}, []
    result = scale_serve.run(quick=quick)
    figures = [{**f, "name": f"serve_{f['name']}"} for f in result.get("figures", [])]
    return result, figures


def run(*, quick: bool = False) -> dict[str, Any]:
    cfg = PredictConfig()  # today's defaults: batch_size 256, workers 2, top_k 3
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        t0 = time.perf_counter()
        n = _write_pngs(root / "images", 2000 if quick else None)
        write_s = time.perf_counter() - t0
        model_dir = _model(root)
        paths = list_inputs(root / "images")
        t0 = time.perf_counter()
        single = predict_to_parquet(
            Predictor.from_dir(model_dir, batch_size=cfg.batch_size), paths, root / "single.parquet",
            batch_size=cfg.batch_size, workers=cfg.workers, top_k=cfg.top_k,
        )  # fmt: skip
        single_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ray_batch.ray_runtime(num_cpus=os.cpu_count() or 1):
            start_s = time.perf_counter() - t0
            ray_s: dict[int, float] = {}
            for actors in (1, 2):
                t0 = time.perf_counter()
                done = ray_batch.predict_with_ray(
                    model_dir, ray_batch.ImageSource.local(paths), root / f"ray{actors}.parquet",
                    batch_size=cfg.batch_size, top_k=cfg.top_k, actors=actors, use_gpu=False,
                )  # fmt: skip
                ray_s[actors] = time.perf_counter() - t0
                if done.images != single["images"] or done.failed != single["failed"]:
                    raise RuntimeError(
                        f"Ray wrote {done.images} rows ({done.failed} failed), single {single}"
                    )
    serve, serve_figures = _serve_figures(quick)
    single_rate = n / single_s
    ratio = {a: (n / s) / single_rate for a, s in ray_s.items()}
    return {
        "figures": [
            {"name": "images", "value": n},
            {"name": "cpus", "value": os.cpu_count() or 1},
            {"name": "write_pngs_s", "value": write_s, "unit": "s"},
            {"name": "single_process_img_per_s", "value": single_rate, "unit": "img/s"},
            {"name": "ray_runtime_start_s", "value": start_s, "unit": "s"},
            {"name": "ray_1_actor_img_per_s", "value": n / ray_s[1], "unit": "img/s"},
            {"name": "ray_2_actors_img_per_s", "value": n / ray_s[2], "unit": "img/s"},
            {
                "name": "ray_1_actor_vs_single",
                "value": ratio[1],
                "unit": "x",
                "target": ">= 0.9",
                "passed": ratio[1] >= 0.9,
            },
            {"name": "ray_2_actors_vs_single", "value": ratio[2], "unit": "x"},
            *serve_figures,
        ],  # fmt: skip
        "baseline": f"single-process imgflow predict (predict_to_parquet, {cfg.workers} loader workers), same run",
        "serve": serve,
    }
