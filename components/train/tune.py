"""Hyper-parameter sweeps (``imgflow tune``): Ray Tune over train keys, every trial a real training run.

Composition (Ray 2.x with Train V2, the pattern Ray's "Hyperparameter Tuning with Ray Tune" guide
documents): each Tune trial is a *function trainable* that acts as the driver of one
``TorchTrainer`` running the same per-worker loop as ``imgflow train``
(:func:`components.train.ray_train.train_loop_per_worker`, fed by :func:`components.train.training.loop_config`).
Ray's ``TuneReportCallback`` forwards every epoch's report to Tune, so ASHA can stop trailing trials
early. The trial itself only waits on its trainer: it reserves a little memory and no CPU
(``tune.with_resources``), so the trainer's workers get the CPUs.

MLflow: one parent run ``tune`` and one nested child run per trial (``mlflow.parentRunId``) with the
trial's train params and per-epoch metrics, logged live from a Tune callback in this process; the
best trial's run is tagged ``best_trial=true``. Files: the best config as a full params file, the
trial table (JSON + CSV) and a plot of the metric per trial.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from components.core.config import Params, TrainConfig
from components.core.errors import ConfigError, DataError
from components.data.manifest import DataPaths, require_manifest

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


def ray_search_space(space: Mapping[str, Mapping[str, list[Any]]]) -> dict[str, Any]:
    """``tune.search_space`` as Ray Tune sampling domains (``randint``'s high is included)."""
    from ray import tune

    make: dict[str, Callable[[list[Any]], Any]] = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": lambda a: tune.uniform(a[0], a[1]),
        "loguniform": lambda a: tune.loguniform(a[0], a[1]),
        "randint": lambda a: tune.randint(a[0], a[1] + 1),
    }
    out = {}
    for key, distribution in space.items():
        ((name, args),) = distribution.items()
        out[key] = make[name](list(args))
    return out


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


def _trial_loop_config(config: Mapping[str, Any], setup: TrialSetup) -> tuple[TrainConfig, dict[str, Any]]:
    from components.train.training import loop_config

    cfg = trial_train_config(setup.train, config["train"], epochs=setup.epochs)
    loop = loop_config(
        cfg, DataPaths(setup.data_dir), seed=setup.seed, weights_dir=setup.weights_dir,
        exclude_file=setup.exclude_file,
    )  # fmt: skip
    return cfg, {**loop, "use_gpu": setup.use_gpu, "threads": cfg.cpus_per_worker}


def run_trial(config: dict[str, Any], *, setup: TrialSetup) -> None:
    """Tune function trainable: :func:`components.train.ray_train.fit` (the same driver and per-worker loop
    as ``imgflow train``) with the trial's values, plus Tune's report callback."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from components.train.ray_train import fit

    _name_the_cluster_for_train()
    cfg, loop = _trial_loop_config(config, setup)
    trial_id = ray.tune.get_context().get_trial_id()  # stable: a restarted trial resumes its run
    fit(
        loop, workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker, use_gpu=setup.use_gpu,
        storage_path=setup.storage_path, run_name=trial_id, out_dir=setup.storage_path / trial_id / "model",
        max_failures=cfg.max_failures, show_progress=False, callbacks=[TuneReportCallback()],
    )  # fmt: skip


def _name_the_cluster_for_train() -> None:
    """Put this cluster's address in ``RAY_ADDRESS`` for the trial's Train controller.

    When ASHA stops a trial, its driver (this process) dies and takes the Train controller with it.
    Ray Train V2 then frees the workers' placement group from a helper actor that finds the cluster
    by scanning the machine for Ray processes. With a second Ray instance on the machine that scan
    fails, the CPUs stay reserved, and the next trials wait forever. Ray Train propagates the
    variables in its list to the controller, and the controller's children inherit them.
    """
    import ray
    from ray.train.v2._internal import constants

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    constants.ENV_VARS_TO_PROPAGATE.add("RAY_ADDRESS")  # this trial's process only


# --------------------------------------------------------------------------- live record (MLflow + display)


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
    """Turns Tune's trial events into nested MLflow runs and a quiet rich display (one line per epoch).

    Plain Python: :func:`_tune_callback` forwards Ray's callback hooks to it.
    """

    def __init__(
        self, *, tracking: Any, experiment_id: str, parent_run_id: str, tracking_uri: str,
        setup: TrialSetup, metric: str, total: int, show: bool,
    ) -> None:  # fmt: skip
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.tracking, self.experiment_id, self.parent = tracking, experiment_id, parent_run_id
        self.tracking_uri, self.setup, self.metric, self.show = tracking_uri, setup, metric, show
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
        run = self.tracking.start_run(
            self.experiment_id,
            run_name=f"tune-trial-{number}",
            params={"train": train.model_dump(mode="json"), "sampled": sampled},
            tags={"mlflow.parentRunId": self.parent, "stage": "tune-trial", "trial_id": trial_id},
            tracking_uri=self.tracking_uri,
        )
        self.trials[trial_id] = TrialRecord(number, trial_id, sampled, run.run_id)

    def result(self, trial_id: str, result: Mapping[str, Any]) -> None:
        record = self.trials[trial_id]
        epoch = int(result.get("epoch", len(record.history)))
        row = {k: v for k, v in result.items() if _is_number(v)}
        record.history.append({**row, "epoch": epoch})
        record.checkpoint = result.get("checkpoint_path") or record.checkpoint
        metrics = {k: v for k, v in row.items() if k not in _NOT_METRICS}
        self.tracking.log_metrics(record.run_id, metrics, step=epoch)
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
            self.tracking.set_tags(record.run_id, {"error": error[:4000]})
        self.tracking.end_run(
            record.run_id, status={"ERROR": "FAILED", "STOPPED": "FINISHED"}.get(status, status)
        )
        self.progress.advance(self.bar)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _tune_callback(recorder: SweepRecorder) -> Any:
    """A ``ray.tune.Callback`` forwarding trial events to ``recorder`` (runs in this process); the
    results without Tune's own bookkeeping keys (iteration counters, timestamps, host, pid).

    Tune pickles its run config (callbacks included) into the experiment folder: the recorder, with
    its MLflow client and display, stays out of that copy.
    """
    from ray import tune
    from ray.tune.result import AUTO_RESULT_KEYS

    tune_keys = frozenset(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag"}

    class _Forward(tune.Callback):
        def __init__(self, target: SweepRecorder | None) -> None:
            self.target = target

        def __getstate__(self) -> dict[str, Any]:
            return {"target": None}

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if self.target:
                self.target.start(trial.trial_id, trial.config)

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            if self.target:
                self.target.result(trial.trial_id, {k: v for k, v in result.items() if k not in tune_keys})

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if self.target:
                self.target.finish(trial.trial_id, trial.config, status="FINISHED")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if self.target:
                self.target.finish(trial.trial_id, trial.config, status="ERROR", error=_trial_error(trial))

    return _Forward(recorder)


def _trial_error(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        return Path(path).read_text().strip().splitlines()[-1]
    return "the trial failed (see the Ray logs)"


# --------------------------------------------------------------------------- the sweep


def _concurrency(wanted: int, train: TrainConfig, *, use_gpu: bool) -> int:
    """``wanted`` trials at once, fewer when the cluster cannot hold that many trainers side by side
    (extra trials would only sit in Ray Train's resource queue)."""
    import ray

    have = ray.cluster_resources()
    need = train.workers * train.cpus_per_worker
    fits = int(float(have.get("CPU", 0)) // need)
    if use_gpu:
        fits = min(fits, int(float(have.get("GPU", 0)) // train.workers))
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


def _scheduler(grace_period: int, reduction_factor: float, *, kind: str, epochs: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=epochs,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
    )


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
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    concurrent = _concurrency(spec.max_concurrent, setup.train, use_gpu=setup.use_gpu)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup), {"cpu": 0, "memory": TRIAL_MEMORY_BYTES}
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"train": ray_search_space(spec.space)},
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            num_samples=spec.num_samples,
            scheduler=_scheduler(
                spec.grace_period, spec.reduction_factor, kind=spec.scheduler, epochs=setup.epochs
            ),
            # max_concurrent here, not TuneConfig.max_concurrent_trials (which would drop random_state)
            search_alg=BasicVariantGenerator(max_concurrent=concurrent, random_state=spec.seed),
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=str(spec.storage_path),
            verbose=0,  # the recorder's display instead of Ray's trial tables
            callbacks=[_tune_callback(recorder)],
        ),
    )
    tuner.fit()


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
    json_path.write_text(json.dumps(rows, indent=2, default=str) + "\n")
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


def _resolve(params: Params, num_samples: int | None) -> tuple[SweepSpec, TrialSetup]:
    """Check everything a user can get wrong before Ray starts; absolute paths for the trials.

    ``train.use_gpu: auto`` is left False here: :func:`run_tune` asks the cluster once Ray is up.
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
    setup = TrialSetup(
        train=params.train, epochs=epochs, data_dir=data.root, weights_dir=(project.state_dir / "weights").resolve(),
        storage_path=storage / f"{name}-trainers", seed=project.seed, use_gpu=params.train.use_gpu == "true",
        exclude_file=exclude.resolve() if exclude else None,
    )  # fmt: skip
    return spec, setup


def _parent_run(params: Params, spec: SweepSpec, tracking: Any, uri: str) -> Any:
    """The MLflow run ``tune`` the trials nest under: the resolved params and provenance."""
    from components.core.provenance import git_commit
    from components.data.manifest import data_version

    exp_id = tracking.ensure_experiment(
        params.register_.experiment, artifact_root=params.project.state_dir / "mlartifacts"
    )
    tags = {
        "stage": "tune", "data_version": data_version(DataPaths(params.project.data_dir).manifest),
        "git_commit": git_commit(), "params_hash": params.fingerprint(), "ray_tune_run": spec.name,
        "search_space": json.dumps(spec.space, sort_keys=True),
    }  # fmt: skip
    return tracking.start_run(exp_id, run_name="tune", params=params.to_dict(), tags=tags, tracking_uri=uri)


def run_tune(params: Params, *, num_samples: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Sweep ``tune.search_space`` with Ray Tune; write the best params file, the trial table and plot.

    Each trial trains ``tune.epochs`` epochs exactly as ``imgflow train`` does (same loop, data, seed)
    with its sampled train values. Returns the best trial, the table and where everything went.
    """
    from dataclasses import replace

    from components.registry import tracking as tracking_mod
    from components.train import ray_train

    spec, setup = _resolve(params, num_samples)
    _trial_loop_config({"train": {}}, setup)  # task options, pretrained weights: fail (or convert) once, here
    uri = tracking_mod.configure(params.register_.tracking_uri, state_dir=params.project.state_dir)
    parent = _parent_run(params, spec, tracking_mod, uri)
    started = ray_train.init_ray()
    t0 = time.perf_counter()
    try:
        if params.train.use_gpu == "auto":
            setup = replace(setup, use_gpu=ray_train.cluster_has_gpus())
        recorder = SweepRecorder(
            tracking=tracking_mod, experiment_id=parent.experiment_id, parent_run_id=parent.run_id,
            tracking_uri=uri, setup=setup, metric=spec.metric, total=spec.num_samples * _grid_size(spec.space),
            show=progress,
        )  # fmt: skip
        with recorder:
            run_sweep(spec, setup, recorder)
        summary = _finish(params, spec, list(recorder.trials.values()), parent, tracking_mod)
    except BaseException:
        tracking_mod.end_run(parent.run_id, status="FAILED")
        raise
    finally:
        if started:
            ray_train.shutdown_ray()
    return {**summary, "seconds": time.perf_counter() - t0}


def _grid_size(space: Mapping[str, Mapping[str, list[Any]]]) -> int:
    return math.prod(len(args) for d in space.values() for name, args in d.items() if name == "grid")


def _finish(
    params: Params, spec: SweepSpec, records: list[TrialRecord], parent: Any, tracking: Any
) -> dict[str, Any]:
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
        tracking.set_tags(r.run_id, {"best_trial": str(r is best).lower()})
    tracking.set_tags(parent.run_id, {"best_trial_id": best.trial_id, "best_run_id": best.run_id})
    failed = sum(r.status == "ERROR" for r in records)
    tracking.log_metrics(parent.run_id, {f"best_{spec.metric}": value or math.nan, "trials": len(records),
                                         "trials_failed": failed})  # fmt: skip
    tracking.log_artifacts(parent.run_id, [best_file, json_path, csv_path, plot], artifact_path="tune")
    tracking.end_run(parent.run_id)
    return {
        "best": {"trial": best.number, "trial_id": best.trial_id, "run_id": best.run_id, spec.metric: value,
                 "train": best.sampled, "checkpoint": best.checkpoint},
        "metric": spec.metric, "mode": spec.mode, "trials": rows, "trials_failed": failed,
        "best_params": str(best_file), "trials_json": str(json_path), "trials_csv": str(csv_path),
        "plot": str(plot), "run_id": parent.run_id, "tracking_uri": parent.tracking_uri,
        "experiment_id": parent.experiment_id, "ray_tune_run": str(spec.storage_path / spec.name),
    }  # fmt: skip
