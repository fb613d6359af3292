"""Hyper-parameter sweeps (``imgflow tune``): Ray Tune over train keys, every trial a real training run.

Composition (Ray 2.x with Train V2, the pattern Ray's "Hyperparameter Tuning with Ray Tune" guide
documents): each Tune trial is a *function trainable* that acts as the driver of one
``TorchTrainer`` running the same per-worker loop as ``imgflow train``
(:func:`components.train.training.fit` with the trial's :class:`~components.train.recipe.TrainRecipe`).
Ray's ``TuneReportCallback`` forwards every epoch's report to Tune, so ASHA can stop trailing trials
early. The trial itself only waits on its trainer: it reserves a little memory and no CPU, so the
trainer's workers get the CPUs. Every Ray call is in :mod:`components.train.ray_adapter`.

Records: the caller passes a :class:`SweepLog` (``components.pipeline.tuning`` builds one over
MLflow: a parent run ``tune`` and one nested child run per trial) that gets each trial's train
params and per-epoch metrics, live from a Tune callback in this process; the best trial's record
is tagged ``best_trial=true``. Files: the best config as a full params file, the trial table
(JSON + CSV) and a plot of the metric per trial.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import ValidationError

from components.core.config import Params, TrainConfig
from components.core.errors import ConfigError, DataError
from components.core.jsonio import write_json
from components.data.manifest import DataPaths, require_manifest
from components.train import ray_adapter
from components.train.ray_adapter import RayOptions
from components.train.recipe import TrainRecipe, build_recipe

logger = logging.getLogger(__name__)

TRIAL_MEMORY_BYTES = 256 * 2**20
"""What a trial (the driver of its Ray Train run) reserves: memory only, no CPU, so the trainer's
workers fit next to it (Ray needs a non-empty resource request)."""
BEST_PARAMS_FILE = "best_params.yaml"
TRIALS_JSON, TRIALS_CSV, TRIALS_PLOT = "trials.json", "trials.csv", "trials.png"
_NOT_METRICS = ("epoch", "finished_at")  # reported by the loop, but not per-epoch metrics for MLflow


# --------------------------------------------------------------------------- search space


def _plain(value: Any) -> Any:
    """numpy scalars (what Tune's samplers return) as Python numbers, so YAML and pydantic take them."""
    return value.item() if hasattr(value, "item") else value


def trial_train_config(train: TrainConfig, sampled: Mapping[str, Any], *, epochs: int) -> TrainConfig:
    """``train`` with a trial's sampled values and the trial length, validated like params.yaml."""
    values = {**train.model_dump(), **{k: _plain(v) for k, v in sampled.items()}, "epochs": epochs}
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(f"train.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"trial values {dict(sampled)} are not valid train params: {problems}") from None


def _candidates(distribution: Mapping[str, list[Any]]) -> list[Any]:
    """The values a distribution can produce that are worth checking: every choice, or both bounds."""
    ((_, args),) = distribution.items()
    return list(args)


def check_search_space(train: TrainConfig, space: Mapping[str, Mapping[str, list[Any]]]) -> None:
    """Refuse a search space that can draw an invalid train value, before any trial starts."""
    for key, distribution in space.items():
        for value in _candidates(distribution):
            try:
                trial_train_config(train, {key: value}, epochs=train.epochs)
            except ConfigError as e:
                raise ConfigError(
                    f"tune.search_space.{key} can draw {value!r}, which is refused: {e}"
                ) from None


# --------------------------------------------------------------------------- one trial


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs besides its sampled values (absolute paths: a trial runs in its own
    working directory)."""

    train: TrainConfig
    epochs: int
    data_dir: Path
    weights_dir: Path
    storage_path: Path
    seed: int
    use_gpu: bool
    exclude_file: Path | None = None
    worker_events: Path | None = None
    """See ``ray_adapter.WORKER_EVENTS_ENV``."""
    verbose: bool = False
    """Ray Train's per-rank lines on the console."""


def trial_recipe(sampled: Mapping[str, Any], setup: TrialSetup) -> tuple[TrainConfig, TrainRecipe]:
    """A trial's train config (``setup.train`` with its ``sampled`` values) and training recipe."""
    cfg = trial_train_config(setup.train, sampled, epochs=setup.epochs)
    recipe = build_recipe(
        cfg, DataPaths(setup.data_dir), seed=setup.seed, weights_dir=setup.weights_dir,
        exclude_file=setup.exclude_file,
    )  # fmt: skip
    return cfg, recipe


def run_trial(config: dict[str, Any], *, setup: TrialSetup) -> None:
    """Tune function trainable: :func:`components.train.training.fit` (the same driver and per-worker
    loop as ``imgflow train``) with the trial's values, plus Tune's report callback."""
    from components.train.training import fit

    ray_adapter.let_train_find_the_cluster()
    cfg, recipe = trial_recipe(config["train"], setup)
    trial_id = ray_adapter.trial_id()  # stable: a restarted trial resumes its run
    fit(
        recipe, workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker, use_gpu=setup.use_gpu,
        storage_path=setup.storage_path, run_name=trial_id, out_dir=setup.storage_path / trial_id / "model",
        max_failures=cfg.max_failures, show_progress=False, callbacks=ray_adapter.trial_report_callbacks(),
        worker_events=setup.worker_events, verbose=setup.verbose,
    )  # fmt: skip


# --------------------------------------------------------------------------- live record (log + display)


class SweepLog(Protocol):
    """Where a sweep's records go: one record per trial under the sweep's own (parent) record. The
    caller builds it (``components.pipeline.tuning``: nested MLflow runs); run ids are its ids."""

    parent_run_id: str

    def start_trial_run(self, *, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str: ...

    def log_metrics(self, run_id: str, metrics: dict[str, float], *, step: int | None = None) -> None: ...

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None: ...

    def log_artifacts(self, run_id: str, paths: Sequence[Path], *, artifact_path: str) -> None: ...

    def end_run(self, run_id: str, status: str = "FINISHED") -> None: ...


@dataclass
class TrialRecord:
    number: int
    trial_id: str
    sampled: dict[str, Any]
    run_id: str
    status: str = "RUNNING"
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str | None = None
    error: str | None = None

    def last(self, metric: str) -> float | None:
        value = self.history[-1].get(metric) if self.history else None
        return None if value is None else float(value)


class SweepRecorder:
    """Turns Tune's trial events into trial records (``log``) and a quiet rich display (one line per
    epoch).

    Plain Python: ``ray_adapter.tune_callback`` forwards Ray's callback hooks to it.
    """

    def __init__(self, *, log: SweepLog, setup: TrialSetup, metric: str, total: int, show: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.log, self.setup, self.metric, self.show = log, setup, metric, show
        self.trials: dict[str, TrialRecord] = {}
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        self.progress = Progress(*columns, disable=not show, transient=False)
        self.bar = self.progress.add_task("trials", total=total)

    def __enter__(self) -> SweepRecorder:
        self.progress.start()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.progress.stop()
        for record in self.trials.values():  # a sweep that stopped mid-trial leaves no run RUNNING
            if record.status == "RUNNING":
                self.finish(record.trial_id, {}, status="KILLED" if exc_type else "FINISHED")

    def start(self, trial_id: str, config: Mapping[str, Any]) -> None:
        if trial_id in self.trials:  # a restarted trial keeps its run
            self.trials[trial_id].status = "RUNNING"
            return
        sampled = {k: _plain(v) for k, v in dict(config.get("train", {})).items()}
        train = trial_train_config(self.setup.train, sampled, epochs=self.setup.epochs)
        number = len(self.trials) + 1
        run_id = self.log.start_trial_run(
            run_name=f"tune-trial-{number}",
            params={"train": train.model_dump(mode="json"), "sampled": sampled},
            tags={"stage": "tune-trial", "trial_id": trial_id},
        )
        self.trials[trial_id] = TrialRecord(number, trial_id, sampled, run_id)

    def result(self, trial_id: str, result: Mapping[str, Any]) -> None:
        record = self.trials[trial_id]
        epoch = int(result.get("epoch", len(record.history)))
        row = {k: v for k, v in result.items() if _is_number(v)}
        record.history.append({**row, "epoch": epoch})
        record.checkpoint = result.get("checkpoint_path") or record.checkpoint
        metrics = {k: v for k, v in row.items() if k not in _NOT_METRICS}
        self.log.log_metrics(record.run_id, metrics, step=epoch)
        if not self.show:
            return
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in record.sampled.items())
        self.progress.console.log(
            f"trial {record.number} epoch {epoch + 1}/{self.setup.epochs}: {self.metric} "
            f"{_fmt(result.get(self.metric))}  ({shown})"
        )

    def finish(
        self, trial_id: str, config: Mapping[str, Any], *, status: str, error: str | None = None
    ) -> None:
        if trial_id not in self.trials:  # failed before it started: still a row and a run
            self.start(trial_id, config)
        record = self.trials[trial_id]
        if record.status != "RUNNING":
            return
        if status == "FINISHED" and len(record.history) < self.setup.epochs:
            status = "STOPPED"  # by ASHA (or train.early_stopping_patience) before tune.epochs
        record.status, record.error = status, error
        if error:
            self.log.set_tags(record.run_id, {"error": error[:4000]})
        self.log.end_run(record.run_id, status={"ERROR": "FAILED", "STOPPED": "FINISHED"}.get(status, status))
        self.progress.advance(self.bar)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


# --------------------------------------------------------------------------- the sweep


def _concurrency(wanted: int, train: TrainConfig, *, use_gpu: bool) -> int:
    """``wanted`` trials at once, fewer when the cluster cannot hold that many trainers side by side
    (extra trials would only sit in Ray Train's resource queue)."""
    have = ray_adapter.cluster_resources()
    need = train.workers * train.cpus_per_worker
    fits = int(have.get("CPU", 0.0) // need)
    if use_gpu:
        fits = min(fits, int(have.get("GPU", 0.0) // train.workers))
    if fits < 1:
        raise ConfigError(
            f"a trial needs train.workers ({train.workers}) x train.cpus_per_worker ({train.cpus_per_worker}) "
            f"= {need} CPUs{' and GPUs' if use_gpu else ''}, but the Ray cluster has {have.get('CPU', 0):g} "
            "CPUs: lower them or add nodes"
        )
    if wanted > fits:
        logger.info(
            "tune.max_concurrent_trials %d > %d trainers that fit at once: running %d", wanted, fits, fits
        )
    return min(wanted, fits)


@dataclass(frozen=True)
class SweepSpec:
    """One sweep, resolved: what to sample, how to rank, how many trials at once."""

    space: dict[str, dict[str, list[Any]]]
    metric: str
    mode: str
    num_samples: int
    scheduler: str
    grace_period: int
    reduction_factor: float
    max_concurrent: int
    seed: int
    name: str
    storage_path: Path


def run_sweep(spec: SweepSpec, setup: TrialSetup, recorder: SweepRecorder) -> None:
    """Run the trials on the connected Ray runtime; every event goes to ``recorder``."""
    ray_adapter.run_tuner(
        run_trial, trial_kwargs={"setup": setup}, trial_memory=TRIAL_MEMORY_BYTES, search_space=spec.space,
        metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples, scheduler=spec.scheduler,
        max_t=setup.epochs, grace_period=spec.grace_period, reduction_factor=spec.reduction_factor,
        max_concurrent=_concurrency(spec.max_concurrent, setup.train, use_gpu=setup.use_gpu),
        seed=spec.seed, name=spec.name, storage_path=spec.storage_path, events=recorder,
    )  # fmt: skip


# --------------------------------------------------------------------------- results


def best_trial(records: list[TrialRecord], *, metric: str, mode: str) -> TrialRecord:
    """The trial with the best ``metric`` at its last epoch (Ray Tune's ``scope="last"``)."""
    scored = [r for r in records if r.status != "ERROR" and r.last(metric) is not None]
    if not scored:
        errors = "; ".join(sorted({r.error or r.status for r in records})) or "no trial started"
        raise RuntimeError(f"no trial of the sweep reported {metric}: {errors}")
    pick = min if mode == "min" else max
    return pick(scored, key=lambda r: float(r.last(metric) or 0.0))


def trial_table(records: list[TrialRecord], *, metric: str, best: TrialRecord | None) -> list[dict[str, Any]]:
    """One row per trial: status, epochs trained, the ranking metric and the sampled train values."""
    rows = []
    for r in records:
        row: dict[str, Any] = {"trial": r.number, "trial_id": r.trial_id, "status": r.status,
                               "epochs": len(r.history), metric: r.last(metric)}  # fmt: skip
        row |= {k: r.last(k) for k in ("val_loss", "val_accuracy")}
        row |= {f"train.{k}": v for k, v in r.sampled.items()}
        row |= {
            "best": best is not None and r.trial_id == best.trial_id,
            "run_id": r.run_id,
            "error": r.error,
        }
        rows.append(row)
    return rows


def best_params(params: Params, sampled: Mapping[str, Any]) -> dict[str, Any]:
    """The full params (YAML section names) with the best trial's train values; ``train.epochs`` kept."""
    from components.core.config import params_from_dict

    tree = params.to_dict()
    tree["train"] = {**tree["train"], **{k: _plain(v) for k, v in sampled.items()}}
    return params_from_dict(tree, source="the best trial's params").to_dict()


def write_best_params(tree: dict[str, Any], path: Path, *, header: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(tree, sort_keys=False)
    path.write_text("".join(f"# {line}\n" for line in header.splitlines()) + body)
    return path


def write_trial_table(rows: list[dict[str, Any]], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / TRIALS_JSON, out_dir / TRIALS_CSV
    write_json(json_path, rows)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def plot_trials(records: list[TrialRecord], path: Path, *, metric: str, best: TrialRecord) -> Path:
    """Left: ``metric`` per epoch of every trial; right: each trial's last value, the best one marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 4.0), dpi=100)
    curves, bars = fig.subplots(1, 2)
    for r in records:
        points = [(row["epoch"] + 1, row[metric]) for row in r.history if metric in row]
        if points:
            curves.plot(*zip(*points, strict=True), marker="o", markersize=3, label=f"trial {r.number}")
    curves.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
    finals = [(r.number, r.last(metric)) for r in records]
    colours = ["tab:orange" if n == best.number else "tab:blue" for n, _ in finals]
    positions = list(range(len(finals)))
    bars.bar(positions, [math.nan if v is None else v for _, v in finals], color=colours)
    bars.set_xticks(positions, labels=[str(n) for n, _ in finals])
    bars.set(xlabel="trial", ylabel=metric, title=f"last {metric} per trial (best: trial {best.number})")
    for ax in (curves, bars):
        ax.grid(True, alpha=0.3)
    if len(records) <= 12:
        curves.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(path)
    return path


# --------------------------------------------------------------------------- the stage


def prepare_sweep(
    params: Params, num_samples: int | None = None, *, ray_options: RayOptions | None = None
) -> tuple[SweepSpec, TrialSetup]:
    """Check everything a user can get wrong before Ray starts; absolute paths for the trials.

    Builds one trial's recipe with the unswept values, so task options and pretrained weights fail
    (or are converted) once, here. ``train.use_gpu: auto`` is left False: :func:`sweep` asks the
    cluster once Ray is up.
    """
    cfg, project = params.tune, params.project
    data = DataPaths(project.data_dir.resolve())
    require_manifest(data)
    epochs = cfg.epochs or params.train.epochs
    if cfg.scheduler == "asha" and cfg.grace_period > epochs:
        raise ConfigError(
            f"tune.grace_period ({cfg.grace_period}) must be <= the trial length ({epochs} epochs)"
        )
    check_search_space(params.train, cfg.search_space)
    exclude = project.output_dir / "audit" / "excluded.csv" if params.audit.action == "exclude" else None
    if exclude is not None and not exclude.exists():
        raise DataError(f"audit.action is 'exclude' but {exclude} is missing: run `imgflow audit` first")
    name = f"tune-{params.fingerprint()}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = (project.state_dir / "ray_results").resolve()
    spec = SweepSpec(
        space=cfg.search_space, metric=cfg.metric, mode=cfg.resolved_mode(),
        num_samples=num_samples or cfg.num_samples, scheduler=cfg.scheduler, grace_period=cfg.grace_period,
        reduction_factor=cfg.reduction_factor, max_concurrent=cfg.max_concurrent_trials,
        seed=project.seed if cfg.seed is None else cfg.seed, name=name, storage_path=storage,
    )  # fmt: skip
    options = ray_options or RayOptions()
    setup = TrialSetup(
        train=params.train, epochs=epochs, data_dir=data.root, weights_dir=(project.state_dir / "weights").resolve(),
        storage_path=storage / f"{name}-trainers", seed=project.seed, use_gpu=params.train.use_gpu == "true",
        exclude_file=exclude.resolve() if exclude else None, worker_events=options.worker_events,
        verbose=options.verbose,
    )  # fmt: skip
    trial_recipe({}, setup)
    return spec, setup


def sweep(
    params: Params,
    spec: SweepSpec,
    setup: TrialSetup,
    log: SweepLog,
    *,
    progress: bool = True,
    ray_options: RayOptions | None = None,
) -> dict[str, Any]:
    """Sweep ``tune.search_space`` with Ray Tune; write the best params file, the trial table and plot.

    Each trial trains ``tune.epochs`` epochs exactly as ``imgflow train`` does (same loop, data, seed)
    with its sampled train values; ``log`` records every trial under ``log.parent_run_id`` and is
    ended (the parent included) when the sweep succeeds. Returns the best trial, the table and where
    everything went.
    """
    options = ray_options or RayOptions()
    started = ray_adapter.init_ray(
        address=options.address, dashboard=options.dashboard, verbose=options.verbose
    )
    t0 = time.perf_counter()
    try:
        if params.train.use_gpu == "auto":
            setup = replace(setup, use_gpu=ray_adapter.cluster_has_gpus())
        recorder = SweepRecorder(
            log=log, setup=setup, metric=spec.metric, total=spec.num_samples * _grid_size(spec.space),
            show=progress,
        )  # fmt: skip
        with recorder:
            run_sweep(spec, setup, recorder)
        summary = _finish(params, spec, list(recorder.trials.values()), log)
    finally:
        if started:
            ray_adapter.shutdown_ray()
    return {**summary, "seconds": time.perf_counter() - t0}


def _grid_size(space: Mapping[str, Mapping[str, list[Any]]]) -> int:
    return math.prod(len(args) for d in space.values() for name, args in d.items() if name == "grid")


def _finish(params: Params, spec: SweepSpec, records: list[TrialRecord], log: SweepLog) -> dict[str, Any]:
    """Pick the best trial; write and log the best params, the trial table and the plot."""
    best = best_trial(records, metric=spec.metric, mode=spec.mode)
    out_file = params.tune.out or params.project.output_dir / "tune" / BEST_PARAMS_FILE
    value = best.last(spec.metric)
    header = (
        f"Written by `imgflow tune` ({spec.name}): the best of {len(records)} trials by {spec.metric} "
        f"({spec.mode}) = {_fmt(value)}, trial {best.number} (MLflow run {best.run_id}).\n"
        f"Sampled: {', '.join(f'train.{k}={_fmt(v)}' for k, v in best.sampled.items())}. "
        "Train with it: imgflow train --params <this file>"
    )
    best_file = write_best_params(best_params(params, best.sampled), out_file, header=header)
    rows = trial_table(records, metric=spec.metric, best=best)
    json_path, csv_path = write_trial_table(rows, out_file.parent)
    plot = plot_trials(records, out_file.parent / TRIALS_PLOT, metric=spec.metric, best=best)
    for r in records:
        log.set_tags(r.run_id, {"best_trial": str(r is best).lower()})
    parent = log.parent_run_id
    log.set_tags(parent, {"best_trial_id": best.trial_id, "best_run_id": best.run_id})
    failed = sum(r.status == "ERROR" for r in records)
    log.log_metrics(parent, {f"best_{spec.metric}": value or math.nan, "trials": len(records),
                             "trials_failed": failed})  # fmt: skip
    log.log_artifacts(parent, [best_file, json_path, csv_path, plot], artifact_path="tune")
    log.end_run(parent)
    return {
        "best": {"trial": best.number, "trial_id": best.trial_id, "run_id": best.run_id, spec.metric: value,
                 "train": best.sampled, "checkpoint": best.checkpoint},
        "metric": spec.metric, "mode": spec.mode, "trials": rows, "trials_failed": failed,
        "best_params": str(best_file), "trials_json": str(json_path), "trials_csv": str(csv_path),
        "plot": str(plot), "run_id": parent, "ray_tune_run": str(spec.storage_path / spec.name),
    }  # fmt: skip
