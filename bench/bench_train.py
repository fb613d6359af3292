"""Orchestration overhead of Ray Train vs a plain single-process PyTorch loop, measured in one run.

Both paths train the same model on the same real Fashion-MNIST subset for the same epochs with the
same torch threads, through the same engine steps (``components.engine``) and the same model,
loader and optimiser builders the Ray worker uses. Ray runs one worker holding all the threads, so
the only difference is the orchestration: the Ray runtime, the TorchTrainer controller, the
per-epoch report and checkpoint. Figures: steady-state epoch throughput (epoch 1 excluded), the
fixed start-up cost of Ray, peak RSS of the driver and everything it started, accuracy, wall time.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from components.config import TrainConfig
from components.ingest import ingest
from components.manifest import DataPaths

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class PeakRss:
    """Samples the RSS of this process plus all its descendants (Ray's raylet, workers...)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.peak, self._stop, self._interval = 0, threading.Event(), interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # exited between listing and reading
                total += p.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self._interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _plain_loop(config: dict[str, Any], threads: int) -> dict[str, Any]:
    """The Ray worker's loop without Ray: same builders, same engine steps, one process."""
    import torch
    from torch import nn

    from components import ray_train as rt
    from components.engine import eval_sums, seed_everything, train_one_epoch

    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    config = dict(config, use_gpu=False, threads=threads)
    model, spec = rt._build_model(config)
    seed_everything(config["seed"])
    train_loader, val_loader = rt._build_loaders(config, spec.data_config)
    device = torch.device("cpu")
    optimizer, scheduler = rt._make_optimizer(model, config, len(train_loader))
    opts = rt._step_options(config, model, device)
    loss_fn = rt._loss_fn(config, opts)
    epochs = []
    for epoch in range(config["epochs"]):
        t0 = time.perf_counter()
        tr = train_one_epoch(model, train_loader, optimizer, loss_fn, device=device, scheduler=scheduler,
                             start_step=epoch * len(train_loader), opts=opts)  # fmt: skip
        seconds = time.perf_counter() - t0
        va = eval_sums(model, val_loader, nn.CrossEntropyLoss(), device=device)
        epochs.append(rt._epoch_metrics(epoch, tr, va, optimizer.param_groups[0]["lr"], seconds))
    return {"history": epochs, "wall_s": time.perf_counter() - t_start}


def _ray_fit(config: dict[str, Any], threads: int, storage: Path) -> dict[str, Any]:
    from components import ray_train as rt

    t0 = time.perf_counter()
    started = rt.init_ray(num_cpus=threads)
    init_s = time.perf_counter() - t0
    try:
        fit = rt.fit(config, workers=1, cpus_per_worker=threads, use_gpu=False, storage_path=storage,
                     run_name="bench", out_dir=storage / "model", show_progress=False)  # fmt: skip
    finally:
        if started:
            rt.shutdown_ray()
    return {"history": fit.history, "wall_s": time.perf_counter() - t0, "init_s": init_s}


def _steady_images_per_s(history: list[dict[str, Any]]) -> float:
    """Training images/s over whole epoch cycles 2.. (train, eval, and for Ray the report and the
    checkpoint), from the wall-clock end of epoch 1 to the end of the last; epoch 1 is warm-up."""
    images = sum(h["train_images_per_s"] * h["epoch_seconds"] for h in history[1:])
    return images / (history[-1]["finished_at"] - history[0]["finished_at"])


def _warm_decode_cache(config: dict[str, Any]) -> None:
    """Decode the images once before timing, so neither path pays the shared decode cache."""
    from components import ray_train as rt

    _model, spec = rt._build_model(config)
    rt._build_loaders(dict(config, use_gpu=False), spec.data_config)


def run(*, quick: bool = False) -> dict[str, Any]:
    from components.training import loop_config

    per_class, epochs = (300, 3) if quick else (1000, 4)
    threads = min(2, os.cpu_count() or 1)
    cfg = TrainConfig(epochs=epochs, workers=1, cpus_per_worker=threads)
    with tempfile.TemporaryDirectory(prefix="imgflow-bench-train-") as tmp:
        root = Path(tmp)
        ingest("fashion-mnist", data_dir=root / "data", max_per_class=per_class, fashion_mnist_dir=FMNIST_DIR,
               progress=False)  # fmt: skip
        config = loop_config(cfg, DataPaths(root / "data"), seed=0, weights_dir=root / "weights")
        _warm_decode_cache(config)
        with PeakRss() as plain_mem:
            plain = _plain_loop(config, threads)
        with PeakRss() as ray_mem:
            ray = _ray_fit(config, threads, root / "ray")
    plain_tp, ray_tp = _steady_images_per_s(plain["history"]), _steady_images_per_s(ray["history"])
    ratio = ray_tp / plain_tp
    gib = 2**30
    return {
        "figures": [
            {
                "name": "steady_throughput_ratio",
                "value": ratio,
                "unit": "x",
                "target": ">= 0.9",
                "passed": ratio >= 0.9,
            },  # fmt: skip
            {"name": "ray_images_per_s", "value": ray_tp, "unit": "img/s"},
            {"name": "plain_images_per_s", "value": plain_tp, "unit": "img/s"},
            {"name": "ray_fixed_startup_s", "value": ray["wall_s"] - plain["wall_s"], "unit": "s"},
            {"name": "ray_init_s", "value": ray["init_s"], "unit": "s"},
            {"name": "ray_wall_s", "value": ray["wall_s"], "unit": "s"},
            {"name": "plain_wall_s", "value": plain["wall_s"], "unit": "s"},
            {"name": "ray_val_accuracy", "value": ray["history"][-1]["val_accuracy"]},
            {"name": "plain_val_accuracy", "value": plain["history"][-1]["val_accuracy"]},
            {"name": "ray_peak_rss_gib", "value": ray_mem.peak / gib, "unit": "GiB"},
            {"name": "plain_peak_rss_gib", "value": plain_mem.peak / gib, "unit": "GiB"},
        ],
        "config": {
            "model": cfg.model,
            "epochs": epochs,
            "max_per_class": per_class,
            "threads": threads,
            "ray_workers": 1,
            "batch_size": cfg.batch_size,
        },  # fmt: skip
        "epoch_train_seconds": {
            "plain": [round(h["epoch_seconds"], 3) for h in plain["history"]],
            "ray": [round(h["epoch_seconds"], 3) for h in ray["history"]],
        },
        "baseline": "the same model/loaders/optimiser/engine steps in one plain process, same threads",
        "ray_startup_note": "ray_fixed_startup_s = Ray wall - plain wall (same work): runtime, controller, "
        "worker start, per-epoch reports and checkpoints",
    }
