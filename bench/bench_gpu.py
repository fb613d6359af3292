"""The GPU path: Ray Train epoch throughput vs a plain single-process loop on the same GPU, same model.

The same comparison as ``bench_train`` (same builders, same engine steps, three Ray runs each between
two plain runs, the median ratio is the figure), with the model and batches on the GPU: one Ray Train
worker holding the GPU (``use_gpu=True``, AMP ``auto`` = bf16 where the GPU has it, channels-last)
against the plain loop in a fresh process on the same GPU. Also the GPU's name, the autocast dtype and
the peak GPU memory of the plain run. Without CUDA it reports itself skipped (``make bench`` on a CPU
machine); ``make test-gpu`` runs it on a GPU machine.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_train import FMNIST_DIR, _compare, _warm_decode_cache
from components.core.config import TrainConfig
from components.data.ingest import ingest
from components.data.manifest import DataPaths
from components.train.recipe import build_recipe


def _gpu_facts() -> dict[str, Any]:
    import torch

    from components.train.torch_recipe import amp_dtype

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    return {
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "amp_auto_dtype": str(amp_dtype("auto", device)),
    }


def run(*, quick: bool = False) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"figures": [], "skipped": "no CUDA device here: run `make test-gpu` on a GPU machine"}
    per_class, epochs, repeats = (300, 3, 1) if quick else (1000, 5, 2)
    threads = min(4, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="imgflow-bench-gpu-") as tmp:
        root = Path(tmp)
        ingest("fashion-mnist", data_dir=root / "data", max_per_class=per_class, fashion_mnist_dir=FMNIST_DIR,
               progress=False)  # fmt: skip
        cfg = TrainConfig(epochs=epochs, workers=1, cpus_per_worker=threads, use_gpu="true")
        recipe = build_recipe(cfg, DataPaths(root / "data"), seed=0, weights_dir=root / "weights")
        _warm_decode_cache(recipe)
        torch.cuda.reset_peak_memory_stats()
        one = _compare(
            recipe, workers=1, threads=threads, storage=root / "ray-gpu", repeats=repeats, gpu=True
        )
    figures: list[dict[str, Any]] = [
        {"name": "gpu_steady_throughput_ratio", "value": one["ratio"], "unit": "x", "target": ">= 0.9",
         "passed": one["ratio"] >= 0.9},
        {"name": "gpu_ray_images_per_s", "value": one["ray_images_per_s"], "unit": "img/s"},
        {"name": "gpu_plain_images_per_s", "value": one["plain_images_per_s"], "unit": "img/s"},
        {"name": "gpu_ray_fixed_startup_s", "value": one["ray_fixed_startup_s"], "unit": "s"},
        {"name": "gpu_ray_val_accuracy", "value": one["ray_val_accuracy"]},
        {"name": "gpu_plain_val_accuracy", "value": one["plain_val_accuracy"]},
    ]  # fmt: skip
    return {
        "figures": figures,
        "device": _gpu_facts(),
        "config": {
            "model": cfg.model,
            "epochs": epochs,
            "max_per_class": per_class,
            "threads": threads,
            "batch_size": cfg.batch_size,
            "amp": cfg.amp,
            "channels_last": cfg.channels_last,
        },  # fmt: skip
        "one_worker": one,
        "baseline": "the same model/loaders/optimiser/engine steps in one plain process on the same GPU, run "
        "before and after each Ray run; the mean of the two is the baseline",
    }
