"""Training: turns the train config + the ingested data into a Ray Train run and a model folder.

The driver side: :func:`train` builds the :class:`~components.train.recipe.TrainRecipe`, starts
(or joins) Ray and calls :func:`fit`, which runs the per-worker loop on a ``TorchTrainer``
(through :mod:`components.train.ray_adapter`), draws rank 0's progress and copies the final model
out of the last checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.core.config import TrainConfig
from components.core.jsonio import write_json
from components.data.manifest import DataPaths
from components.train import ray_adapter, snapshots
from components.train.progress import progress_display
from components.train.ray_adapter import RayOptions
from components.train.recipe import Distillation, TrainRecipe, build_recipe
from components.train.torch_recipe import MODEL_SUBDIR, read_history
from components.train.worker import WorkerRun, train_loop_per_worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    model_dir: Path
    history: list[dict[str, Any]]
    run_path: str
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    """A finished training: the model folder, every epoch's record, the last one, the wall time, the
    Ray Train run's folder and the recipe it trained."""

    model_dir: Path
    history: list[dict[str, Any]]
    final: dict[str, Any]
    seconds: float
    ray_run: str
    recipe: TrainRecipe

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_dir": str(self.model_dir),
            "history": [dict(h) for h in self.history],
            "final": dict(self.final),
            "seconds": self.seconds,
            "ray_run": self.ray_run,
            "recipe": self.recipe.to_dict(),
        }


def fit(
    recipe: TrainRecipe,
    *,
    workers: int,
    cpus_per_worker: int,
    use_gpu: bool | None,
    storage_path: Path | str,
    run_name: str,
    out_dir: Path,
    max_failures: int = 0,
    show_progress: bool = True,
    callbacks: Sequence[Any] = (),
    worker_events: Path | None = None,
    verbose: bool = False,
) -> FitResult:
    """Train ``recipe`` on ``workers`` Ray Train workers; copy the final model into ``out_dir``.

    ``use_gpu=None`` means auto: GPUs when the cluster has them. Re-running with the same
    ``run_name`` and ``storage_path`` resumes from the latest checkpoint. ``callbacks`` go to the
    run config (e.g. Ray Tune's report callback when a sweep trial runs this trainer).
    ``worker_events``: see ``ray_adapter.WORKER_EVENTS_ENV``; ``verbose``: Ray's per-rank lines
    and one console line per epoch.
    """
    gpu = ray_adapter.cluster_has_gpus() if use_gpu is None else use_gpu
    ray_adapter.check_resources(workers, cpus_per_worker, gpu)

    def copy_out(checkpoint: Path) -> list[dict[str, Any]]:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(checkpoint / MODEL_SUBDIR, out_dir)
        snapshots.copy_snapshots(checkpoint, out_dir)
        return read_history(checkpoint)

    with contextlib.ExitStack() as stack:
        events = ray_adapter.progress_channel(stack)
        run = WorkerRun(recipe=recipe, use_gpu=gpu, threads=cpus_per_worker, progress=events,
                        worker_events=worker_events, verbose=verbose)  # fmt: skip
        t0 = time.perf_counter()
        with progress_display(events, epochs=recipe.epochs, show=show_progress, verbose=verbose):
            done = ray_adapter.run_trainer(
                train_loop_per_worker, run.loop_config(), workers=workers, cpus_per_worker=cpus_per_worker,
                use_gpu=gpu, storage_path=storage_path, run_name=run_name, read_checkpoint=copy_out,
                max_failures=max_failures, callbacks=callbacks, verbose=verbose,
            )  # fmt: skip
        seconds = time.perf_counter() - t0
    return FitResult(model_dir=out_dir, history=done.checkpoint, run_path=done.path, seconds=seconds)


def train(
    cfg: TrainConfig,
    *,
    data: DataPaths,
    out_dir: Path,
    storage_path: Path,
    run_name: str,
    seed: int,
    weights_dir: Path,
    exclude_file: Path | None = None,
    show_progress: bool = True,
    ray_options: RayOptions | None = None,
    distill: Distillation | None = None,
    init_dir: Path | None = None,
) -> TrainResult:
    """Train with Ray Train; writes ``out_dir/model/`` (safetensors + spec) and ``history.json``.

    Checkpoints go to ``cfg.storage_path`` when set (shared storage for a multi-node cluster), else
    to ``storage_path``.

    ``weights_dir`` caches converted pretrained weights (shipped packages, see ``models``);
    ``exclude_file`` lists train images to leave out (the audit's suspected label errors);
    ``ray_options``: which Ray (a cluster or a local runtime) and how much of it the console shows;
    ``distill``: train as a student of that teacher (``imgflow distill``, :mod:`components.train.distill`).
    ``init_dir``: start from that self-supervised backbone (``train.init``; LP-FT when asked, :mod:`components.train.ssl_init`).
    ``train.ensemble`` with members: one run per member, combined (:mod:`components.train.ensemble_train`).
    """
    if cfg.ensemble is not None and cfg.ensemble.snapshots is None and distill is None:
        from components.train.ensemble_train import train_ensemble  # it builds on this module's fit

        return train_ensemble(
            cfg, data=data, out_dir=out_dir, storage_path=storage_path, run_name=run_name, seed=seed,
            weights_dir=weights_dir, exclude_file=exclude_file, show_progress=show_progress,
            ray_options=ray_options,
        )  # fmt: skip
    options = ray_options or RayOptions()
    recipe = build_recipe(
        cfg,
        data,
        seed=seed,
        weights_dir=weights_dir,
        exclude_file=exclude_file,
        distill=distill,
        init_dir=init_dir,
    )
    use_gpu = {"auto": None, "true": True, "false": False}[cfg.use_gpu]
    started = ray_adapter.init_ray(
        address=options.address, dashboard=options.dashboard, verbose=options.verbose
    )
    try:
        fit_result = fit(
            recipe,
            workers=cfg.workers,
            cpus_per_worker=cfg.cpus_per_worker,
            use_gpu=use_gpu,
            storage_path=cfg.storage_path or storage_path,
            run_name=run_name,
            out_dir=out_dir / "model",
            max_failures=cfg.max_failures,
            show_progress=show_progress,
            worker_events=options.worker_events,
            verbose=options.verbose,
        )
    finally:
        if started:
            ray_adapter.shutdown_ray()
    write_json(out_dir / "history.json", fit_result.history)
    if recipe.snapshots:
        snapshots.combine_snapshots(out_dir, fit_result.history)
    final = dict(fit_result.history[-1]) if fit_result.history else {}
    logger.info(
        "trained %s for %d epochs in %.1fs: val_accuracy %s", cfg.model, len(fit_result.history),
        fit_result.seconds, f"{final['val_accuracy']:.4f}" if "val_accuracy" in final else "-",
    )  # fmt: skip
    logger.debug("last epoch: %s", final)
    return TrainResult(
        model_dir=fit_result.model_dir, history=fit_result.history, final=final, seconds=fit_result.seconds,
        ray_run=fit_result.run_path, recipe=recipe,
    )  # fmt: skip
