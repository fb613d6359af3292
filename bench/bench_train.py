"""Orchestration overhead of Ray Train vs a plain single-process PyTorch loop, measured in one run.

Both paths train the same model on the same real Fashion-MNIST subset for the same epochs with the
same torch threads, through the same engine steps (``components.train.engine``) and the same model,
loader and optimiser builders the Ray worker uses. Two comparisons: one Ray worker holding all the
threads (the only difference is the orchestration: the Ray runtime, the TorchTrainer controller, the
per-epoch report and checkpoint), and the shipped layout (``train.workers`` x
``train.cpus_per_worker``, data-parallel) against the plain loop on as many threads with the same
global batch. Figures: steady-state epoch throughput (epoch 1 excluded), the fixed start-up cost of
Ray, peak RSS of the driver and everything it started, accuracy, wall time.

Like for like, three Ray runs each between two plain runs, the median ratio is the figure: single
ratios on a shared 2-core box swing by +-15%. What Ray still costs there: its own processes (GCS,
raylet, the dashboard agent, the Train controller and its helper actors, each actor waking ~100 times
a second) and, with every core running an OpenMP thread, each wake-up stalls the whole team at the
next barrier. With one thread on two cores the same comparison measures ~1.0x.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from components.core.config import TrainConfig
from components.data.ingest import ingest
from components.data.manifest import DataPaths
from components.train.recipe import TrainRecipe

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class PeakRss:
    """Peak memory of this process plus all its descendants (Ray's raylet, workers...): the sum of
    each process's own peak RSS (Linux ``VmHWM``, else its RSS when sampled), an upper bound of the
    peak of the sum. Sampled once a second: the kernel keeps each peak between samples, and a tighter
    loop over Ray's ~25 processes would itself slow the training it measures."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self._peaks: dict[int, int] = {}
        self._stop, self._interval = threading.Event(), interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def peak(self) -> int:
        return sum(self._peaks.values())

    @staticmethod
    def _process_peak(p: psutil.Process) -> int:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return p.memory_info().rss

    def _sample(self) -> None:
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # exited between listing and reading
                self._peaks[p.pid] = max(self._peaks.get(p.pid, 0), self._process_peak(p))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _plain_loop(recipe: TrainRecipe, threads: int, device_name: str = "cpu") -> dict[str, Any]:
    """The Ray worker's loop without Ray: same builders, same engine steps, one process, on
    ``device_name`` (``cuda``: the model and batches on the GPU, pinned loaders, as a GPU worker)."""
    import torch
    from torch import nn

    from components.train import torch_recipe as tr
    from components.train.engine import eval_sums, seed_everything, train_one_epoch

    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    model, spec = tr.build_model(recipe)
    seed_everything(recipe.seed)
    device = torch.device(device_name)
    train_loader, val_loader = tr.build_loaders(recipe, spec.data_config, pin_memory=device.type == "cuda")
    model = model.to(device)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = tr.build_optimizer(model, recipe, len(train_loader))
    opts = tr.build_step_options(recipe, model, device)
    loss_fn = tr.build_train_loss(recipe, opts)
    epochs = []
    for epoch in range(recipe.epochs):
        t0 = time.perf_counter()
        sums = train_one_epoch(model, train_loader, optimizer, loss_fn, device=device, scheduler=scheduler,
                               start_step=epoch * len(train_loader), opts=opts)  # fmt: skip
        seconds = time.perf_counter() - t0
        va = eval_sums(model, val_loader, nn.CrossEntropyLoss(), device=device)
        epochs.append(tr.epoch_metrics(epoch, sums, va, optimizer.param_groups[0]["lr"], seconds))
    return {"history": epochs, "wall_s": time.perf_counter() - t_start}


def _plain_fresh(recipe: TrainRecipe, threads: int, device_name: str = "cpu") -> dict[str, Any]:
    """``_plain_loop`` in a fresh interpreter, as a Ray worker is one: the first training run in a
    process is ~6% slower (oneDNN primitive caches, allocator), so both sides pay it alike."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_plain_loop, recipe, threads, device_name).result()


def _ray_fit(
    recipe: TrainRecipe, *, workers: int, threads: int, storage: Path, use_gpu: bool = False
) -> dict[str, Any]:
    from components.train import ray_adapter
    from components.train.training import fit as ray_fit

    t0 = time.perf_counter()
    started = ray_adapter.init_ray(num_cpus=workers * threads)
    init_s = time.perf_counter() - t0
    try:
        fit = ray_fit(recipe, workers=workers, cpus_per_worker=threads, use_gpu=use_gpu, storage_path=storage,
                      run_name="bench", out_dir=storage / "model", show_progress=False)  # fmt: skip
    finally:
        if started:
            ray_adapter.shutdown_ray()
    return {"history": fit.history, "wall_s": time.perf_counter() - t0, "init_s": init_s}


def _steady_images_per_s(history: list[dict[str, Any]]) -> float:
    """Training images/s over whole epoch cycles 2.. (train, eval, and for Ray the report and the
    checkpoint), from the wall-clock end of epoch 1 to the end of the last; epoch 1 is warm-up."""
    images = sum(h["train_images_per_s"] * h["epoch_seconds"] for h in history[1:])
    return images / (history[-1]["finished_at"] - history[0]["finished_at"])


def _warm_decode_cache(recipe: TrainRecipe) -> None:
    """Decode the images once before timing, so neither path pays the shared decode cache."""
    from components.train import torch_recipe as tr

    _model, spec = tr.build_model(recipe)
    tr.build_loaders(recipe, spec.data_config)


def _compare(
    recipe: TrainRecipe, *, workers: int, threads: int, storage: Path, repeats: int = 1, gpu: bool = False
) -> dict[str, Any]:
    """Plain loop, Ray Train, plain loop again (``repeats`` Ray runs, each between two plain runs);
    each Ray run is compared with the mean of the plain runs either side of it (on a shared machine
    the load drifts over a minute: bracketing cancels a drift that would favour either side), and
    the figure is the median of those ratios. The plain loop uses all ``workers x threads`` threads
    and the global batch."""
    total = workers * threads
    device = "cuda" if gpu else "cpu"
    plain_recipe = dataclasses.replace(recipe, batch_size=recipe.batch_size * workers)
    with PeakRss() as plain_mem:
        plain = [_plain_fresh(plain_recipe, total, device)]
    rays, ray_peak = [], 0
    for i in range(repeats):
        with PeakRss() as mem:
            rays.append(
                _ray_fit(recipe, workers=workers, threads=threads, storage=storage / f"run{i}", use_gpu=gpu)
            )
        ray_peak = max(ray_peak, mem.peak)
        plain.append(_plain_fresh(plain_recipe, total, device))
    plain_tp = [_steady_images_per_s(p["history"]) for p in plain]
    ray_tp = [_steady_images_per_s(r["history"]) for r in rays]
    ratios = [tp / ((plain_tp[i] + plain_tp[i + 1]) / 2) for i, tp in enumerate(ray_tp)]
    mid = sorted(range(repeats), key=lambda i: ratios[i])[repeats // 2]  # the median run (odd repeats)
    ray, before = rays[mid], plain[mid]
    return {
        "ratio": ratios[mid],
        "ratios": ratios,
        "ray_images_per_s": ray_tp[mid],
        "plain_images_per_s": (plain_tp[mid] + plain_tp[mid + 1]) / 2,
        "plain_runs_images_per_s": plain_tp,
        "ray_runs_images_per_s": ray_tp,
        "ray_fixed_startup_s": ray["wall_s"] - (before["wall_s"] + plain[mid + 1]["wall_s"]) / 2,
        "ray_init_s": ray["init_s"],
        "ray_wall_s": ray["wall_s"],
        "plain_wall_s": before["wall_s"],
        "ray_val_accuracy": ray["history"][-1]["val_accuracy"],
        "plain_val_accuracy": before["history"][-1]["val_accuracy"],
        "ray_peak_rss_gib": ray_peak / 2**30,
        "plain_peak_rss_gib": plain_mem.peak / 2**30,
        "epoch_train_seconds": {
            "plain": [[round(h["epoch_seconds"], 3) for h in p["history"]] for p in plain],
            "ray": [[round(h["epoch_seconds"], 3) for h in r["history"]] for r in rays],
        },
    }


def _ratio_figure(name: str, value: float) -> dict[str, Any]:
    return {"name": name, "value": value, "unit": "x", "target": ">= 0.9", "passed": value >= 0.9}


def run(*, quick: bool = False) -> dict[str, Any]:
    from components.train.recipe import build_recipe

    per_class, epochs = (300, 3) if quick else (1000, 6)
    threads = min(2, os.cpu_count() or 1)
    default = TrainConfig()
    with tempfile.TemporaryDirectory(prefix="imgflow-bench-train-") as tmp:
        root = Path(tmp)
        ingest("fashion-mnist", data_dir=root / "data", max_per_class=per_class, fashion_mnist_dir=FMNIST_DIR,
               progress=False)  # fmt: skip
        cfg = TrainConfig(epochs=epochs, workers=1, cpus_per_worker=threads)
        recipe = build_recipe(cfg, DataPaths(root / "data"), seed=0, weights_dir=root / "weights")
        _warm_decode_cache(recipe)
        # Like for like: one Ray worker holding every thread vs the plain loop on the same threads.
        # Three Ray runs, each between two plain runs; the median ratio is the figure.
        one = _compare(
            recipe, workers=1, threads=threads, storage=root / "ray-one", repeats=1 if quick else 3
        )
        # The shipped layout (train.workers x train.cpus_per_worker, DDP) vs the plain loop on as many
        # threads with the same global batch: what a user of the defaults pays for Ray.
        layout = (default.workers, default.cpus_per_worker)
        dflt = None
        if layout != (1, threads) and layout[0] * layout[1] <= (os.cpu_count() or 1):
            dflt = _compare(recipe, workers=layout[0], threads=layout[1], storage=root / "ray-default")
    figures: list[dict[str, Any]] = [
        _ratio_figure("steady_throughput_ratio", one["ratio"]),
        {"name": "steady_throughput_ratio_lowest", "value": min(one["ratios"]), "unit": "x"},
        {"name": "steady_throughput_ratio_highest", "value": max(one["ratios"]), "unit": "x"},
        {"name": "ray_images_per_s", "value": one["ray_images_per_s"], "unit": "img/s"},
        {"name": "plain_images_per_s", "value": one["plain_images_per_s"], "unit": "img/s"},
        {"name": "ray_fixed_startup_s", "value": one["ray_fixed_startup_s"], "unit": "s"},
        {"name": "ray_init_s", "value": one["ray_init_s"], "unit": "s"},
        {"name": "ray_wall_s", "value": one["ray_wall_s"], "unit": "s"},
        {"name": "plain_wall_s", "value": one["plain_wall_s"], "unit": "s"},
        {"name": "ray_val_accuracy", "value": one["ray_val_accuracy"]},
        {"name": "plain_val_accuracy", "value": one["plain_val_accuracy"]},
        {"name": "ray_peak_rss_gib", "value": one["ray_peak_rss_gib"], "unit": "GiB"},
        {"name": "plain_peak_rss_gib", "value": one["plain_peak_rss_gib"], "unit": "GiB"},
    ]
    if dflt is not None:
        figures += [
            {"name": "default_layout_throughput_ratio", "value": dflt["ratio"], "unit": "x"},
            {"name": "default_layout_ray_images_per_s", "value": dflt["ray_images_per_s"], "unit": "img/s"},
            {
                "name": "default_layout_plain_images_per_s",
                "value": dflt["plain_images_per_s"],
                "unit": "img/s",
            },
            {"name": "default_layout_ray_peak_rss_gib", "value": dflt["ray_peak_rss_gib"], "unit": "GiB"},
        ]
    return {
        "figures": figures,
        "config": {
            "model": cfg.model,
            "epochs": epochs,
            "max_per_class": per_class,
            "threads": threads,
            "batch_size_per_worker": cfg.batch_size,
            "default_layout": {"workers": layout[0], "cpus_per_worker": layout[1]} if dflt else None,
        },
        "one_worker": one,
        "default_layout": dflt,
        "baseline": "the same model/loaders/optimiser/engine steps in one plain process (a fresh interpreter, "
        "as a Ray worker), on workers x threads threads with the global batch; run before and after Ray, "
        "the mean of the two is the baseline",
        "ray_startup_note": "ray_fixed_startup_s = Ray wall - plain wall (same work): runtime, controller, "
        "worker start, per-epoch reports and checkpoints",
    }
