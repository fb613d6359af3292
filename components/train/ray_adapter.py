"""Ray adapter: every Ray call of imgflow lives here (Ray core, Ray Train and Ray Tune).

Training always goes through Ray Train's ``TorchTrainer`` — on this laptop a local Ray runtime
bound to 127.0.0.1, on a cluster the one ``RayOptions.address`` names — so the same code path runs
everywhere. The rest of the train package speaks plain Python to this module: the driver
(:mod:`components.train.training`) asks it to run a trainer, the per-worker loop
(:mod:`components.train.worker`) asks it for the rank, the prepared model and loaders, the latest
checkpoint and to report an epoch, and the sweep (:mod:`components.train.tune`) asks it to run a
tuner. Ray is imported inside the functions, so importing this module costs nothing.

Private Ray APIs are used only where no public one exists, each in one function whose comment says
why; ``tests/train/test_ray_adapter.py`` fails when Ray changes one of them.

The environment: imgflow's components take their settings as arguments (entry points read the
environment: :meth:`RayOptions.from_env`). Only this module writes variables, and only those that
are the channel to Ray's own processes: Ray reads them when it starts (``RAY_*``), or every process
the runtime starts inherits them (``IMGFLOW_RAY_LEAN``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import psutil

from components.core.errors import ConfigError
from components.train.progress import ProgressFile

logger = logging.getLogger(__name__)

T = TypeVar("T")

RAY_ADDRESS_ENV = "RAY_ADDRESS"
"""A running Ray cluster to use instead of starting a local runtime (Ray's own variable)."""
RAY_DASHBOARD_ENV = "IMGFLOW_RAY_DASHBOARD"
"""Set to 1 to start Ray's dashboard (http://127.0.0.1:8265) with a local runtime. Off by default:
its ~12 processes take ~0.7 GiB and about a fifth of the CPU Ray's own processes use while training
(measured per process over 30 s of steady training on 2 cores), which training on a small machine
feels. A cluster named by ``RAY_ADDRESS`` keeps its own dashboard."""
WORKER_EVENTS_ENV = "IMGFLOW_WORKER_EVENTS"
"""A file path: every worker appends one JSON line (rank, pid, phase, epoch) when it starts and after
its second batch of each epoch: how a test (or an operator) finds a worker's PID mid-epoch and sees a
restart from a checkpoint. The file must be on storage the workers share with the driver (always
true for the local runtime)."""
LEAN_RUNTIME_ENV = "IMGFLOW_RAY_LEAN"
"""Set by ``init_ray`` (and inherited by every Ray process it starts) when it starts a local
runtime without the dashboard: nothing can read Ray's state API there, so the parts of Ray Train
that only feed or poll it are left out, and progress travels through a file rather than a queue
actor (see ``_lean_trainer_class`` and ``progress_channel``). A variable, not an argument: a Tune
trial runs in a process of the runtime, and it must make the same choice as the driver."""
TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"
"""How often Ray Train's controller polls its workers (Ray's default 2 s) in a local runtime imgflow
starts; a value already in the environment wins, and a cluster keeps its own."""
_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_LOCAL_RUNTIME: list[psutil.Process] = []
"""The processes ``ray.init`` started for the local runtime this process owns (empty otherwise):
:func:`shutdown_ray` stops whatever of their tree outlives ``ray.shutdown()``."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how imgflow runs Ray: a cluster ``address`` (None: a local runtime), the local
    ``dashboard``, a ``worker_events`` log (see ``WORKER_EVENTS_ENV``), and ``verbose``: Ray's own
    INFO lines (every rank's reports, the worker group's start) on the console."""

    address: str | None = None
    dashboard: bool = False
    worker_events: Path | None = None
    verbose: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, verbose: bool = False) -> RayOptions:
        """The options an operator sets in the environment (``RAY_ADDRESS``, ``IMGFLOW_RAY_DASHBOARD``,
        ``IMGFLOW_WORKER_EVENTS``): entry points call it with ``os.environ``."""
        events = environ.get(WORKER_EVENTS_ENV)
        return cls(
            address=environ.get(RAY_ADDRESS_ENV) or None,
            dashboard=environ.get(RAY_DASHBOARD_ENV, "0") == "1",
            worker_events=Path(events) if events else None,
            verbose=verbose,
        )


# --------------------------------------------------------------------------- runtime


def _set_ray_startup_env() -> None:
    """Variables Ray reads when it (or a process of its runtime) starts; set before ``import ray``
    where possible (entry points set them too)."""
    # A single-node runtime then binds loopback, never the machine's external interface.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's default worker niceness is 15: training workers would yield the CPU to any other
    # process (the bench measured Ray at 0.78x a plain loop with it, on a quiet 2-core box).
    os.environ.setdefault("RAY_worker_niceness", "0")


def init_ray(
    *, address: str | None = None, num_cpus: int | None = None, dashboard: bool = False, verbose: bool = False
) -> bool:
    """Connect to the cluster at ``address``, else start a local runtime on 127.0.0.1.

    Returns True when this call started (or connected) the runtime: the caller then owns its
    shutdown. Not ``verbose``: the driver's ``ray`` logger shows warnings only.
    """
    _set_ray_startup_env()
    import ray

    if ray.is_initialized():
        return False
    level = logging.INFO if verbose else logging.WARNING
    if address:
        check_reachable(address)
        logger.info("connecting to the Ray cluster at %s", address)
        os.environ.pop(LEAN_RUNTIME_ENV, None)  # a cluster runs Ray Train in full
        with _quiet_token_auth_notice(not verbose):
            ray.init(address=address, log_to_driver=True, logging_level=level)
        return True
    # A runtime this process starts is one node that nobody drains: Ray Train's preemption watcher
    # (one more actor process, ~200 MB, polling every 5 s) has nothing to watch. Clusters keep it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The Train controller polls its workers every 2 s by default: the worker group's start and the
    # run's end each wait up to a poll. Locally a poll is a cheap call: 0.5 s saved 0.5-4.1 s a run
    # (a 1-epoch run on a tiny project, four alternating pairs: mean 2.4 s; docs/development.md).
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
    if dashboard:
        os.environ.pop(LEAN_RUNTIME_ENV, None)
    else:
        # No dashboard, no state API: the task-state events every Ray process reports each second
        # would have no reader (they cost ~11% of Ray's own CPU while training, measured).
        os.environ.setdefault("RAY_task_events_report_interval_ms", "0")
        os.environ[LEAN_RUNTIME_ENV] = "1"
    before = {child.pid for child in psutil.Process().children()}
    with _quiet_token_auth_notice(not verbose):
        _start_local_ray(num_cpus=num_cpus or os.cpu_count() or 1, dashboard=dashboard, logging_level=level)
    # The runtime's own processes (GCS, raylet, monitors): the children ray.init just started. Their
    # descendants (the workers and actors) are found when the runtime is shut down.
    _LOCAL_RUNTIME[:] = [child for child in psutil.Process().children() if child.pid not in before]
    return True


@contextlib.contextmanager
def runtime(options: RayOptions | None = None, *, num_cpus: int | None = None) -> Iterator[bool]:
    """A connected Ray runtime for the block: the cluster ``options.address`` names, else a local one
    on 127.0.0.1 with ``num_cpus``; shut down on exit when this call started it (which it yields).
    Inside the block :func:`init_ray` finds it connected, so the stages run there reuse it."""
    opts = options or RayOptions()
    started = init_ray(
        address=opts.address, num_cpus=num_cpus, dashboard=opts.dashboard, verbose=opts.verbose
    )
    try:
        yield started
    finally:
        if started:
            shutdown_ray()


def check_reachable(address: str, *, timeout_s: float = 5.0) -> None:
    """A ConfigError within ``timeout_s`` when nothing accepts a connection at a ``host:port`` (or
    ``ray://host:port``) cluster address. ``ray.init`` itself retries an unreachable GCS for minutes
    (measured: no answer after 300 s on a closed local port). ``auto``/``local`` are Ray's to resolve."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(
            f"no Ray cluster answers at RAY_ADDRESS={address} ({type(e).__name__}: {e}): start it "
            "(`ray start --head`), fix the address, or unset RAY_ADDRESS to run on a local Ray runtime"
        ) from e


def _start_local_ray(*, num_cpus: int, dashboard: bool, logging_level: int) -> None:
    """``ray.init`` of a new local runtime bound to 127.0.0.1.

    Private API: ``_node_ip_address``. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` binds loopback too, but
    Ray reads it once, when ``ray`` is first imported; a process that imported Ray before setting it
    would bind the machine's external interface. No public argument names the node's address.
    """
    import ray

    ray.init(
        num_cpus=num_cpus,
        _node_ip_address="127.0.0.1",
        dashboard_host="127.0.0.1",
        include_dashboard=dashboard,
        log_to_driver=True,
        logging_level=logging_level,
    )


@contextlib.contextmanager
def _quiet_token_auth_notice(quiet: bool) -> Iterator[None]:
    """Without ``verbose``, hide Ray's notice that the runtime has token authentication on (its
    default for a new local runtime, which imgflow keeps) while ``ray.init`` runs.

    Private API: the notice's logger is named after a private module, and no public switch silences
    it: saying ``RAY_AUTH_MODE=token`` explicitly (which would) breaks the driver's connection when
    ``ray`` was imported before the variable was set.
    """
    if not quiet:
        yield
        return
    notice = logging.getLogger(_TOKEN_AUTH_LOGGER)
    previous = notice.level
    notice.setLevel(logging.ERROR)
    try:
        yield
    finally:
        notice.setLevel(previous)


def shutdown_ray(*, grace_s: float = 10.0) -> None:
    """``ray.shutdown()``, then stop what of a local runtime this process started outlived it.

    ``ray.shutdown`` stops the GCS and the raylet; their workers are meant to exit when the raylet
    goes, but an actor busy in a blocking call can miss it and live on as an orphan (seen: a Ray Train
    controller and a Ray Data map worker, each holding ~200 MB, an hour after their test). So the
    runtime's process tree is taken before the shutdown, and whatever of it is still running
    ``grace_s`` later is killed, by PID (psutil checks a PID still names the same process)."""
    import ray

    runtime = _runtime_tree()
    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop(LEAN_RUNTIME_ENV, None)  # whatever this process connects to next is not lean
    _reap(runtime, grace_s=grace_s)


def _runtime_tree() -> list[psutil.Process]:
    """The local runtime's processes and all their descendants, now; emptied (the runtime is going)."""
    tree: dict[int, psutil.Process] = {}
    for root in _LOCAL_RUNTIME:
        with contextlib.suppress(psutil.Error):
            if root.is_running():
                tree.setdefault(root.pid, root)
                tree.update((p.pid, p) for p in root.children(recursive=True))
    _LOCAL_RUNTIME.clear()
    return list(tree.values())


def _reap(processes: list[psutil.Process], *, grace_s: float) -> None:
    """Wait up to ``grace_s`` for ``processes`` to exit; kill the rest (and wait for them)."""
    if not processes:
        return
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    if not alive:
        return
    names = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            names.append(f"{p.pid} {p.name()}")
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    logger.warning(
        "stopped %d Ray process(es) that outlived ray.shutdown(): %s", len(alive), ", ".join(names)
    )


def is_lean_runtime() -> bool:
    """This process (or the driver that started its runtime) runs a lean local runtime."""
    return os.environ.get(LEAN_RUNTIME_ENV) == "1"


def cluster_resources() -> dict[str, float]:
    """What the connected cluster holds: ``{"CPU": 2.0, "GPU": 0.0, "memory": ..., ...}``."""
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


def cluster_has_gpus() -> bool:
    return cluster_resources().get("GPU", 0.0) > 0


def check_resources(workers: int, cpus_per_worker: int, use_gpu: bool) -> None:
    """A ConfigError when the cluster cannot hold ``workers`` training workers."""
    have = cluster_resources()
    have_cpu, need_cpu = have.get("CPU", 0.0), workers * cpus_per_worker
    if need_cpu > have_cpu:
        raise ConfigError(
            f"train.workers ({workers}) x train.cpus_per_worker ({cpus_per_worker}) = {need_cpu} CPUs, "
            f"but the Ray cluster has {have_cpu:g}: lower them or add nodes"
        )
    if use_gpu and have.get("GPU", 0.0) < workers:
        raise ConfigError(f"train.use_gpu is on but the Ray cluster has fewer than {workers} GPUs")


def progress_channel(stack: contextlib.ExitStack) -> Any:
    """Where rank 0 sends progress: a ``ProgressFile`` in a lean local runtime (its workers share this
    disk; removed when ``stack`` closes), else a Ray queue (workers may be on other machines)."""
    if is_lean_runtime():
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="imgflow-progress-"))
        return ProgressFile(Path(tmp) / "progress.jsonl")
    from ray.util.queue import Queue

    return Queue(actor_options={"num_cpus": 0})


# --------------------------------------------------------------------------- the trainer (driver)


@functools.cache
def _lean_trainer_class() -> type:
    """``TorchTrainer`` without the two helper actors a lean local runtime (``LEAN_RUNTIME_ENV``)
    cannot use, each one more process polling while training on a small machine.

    - The placement-group cleaner removes a crashed controller's placement group on a long-lived
      cluster. It asks the state API whether the controller lives, once a second; with no dashboard
      every ask fails and logs a warning to the console, and the runtime's shutdown (which imgflow
      always does) removes every placement group anyway.
    - The datasets callback starts a ``DatasetManager`` actor to shard Ray Datasets; imgflow's
      loaders read the manifest themselves and the trainer gets no datasets.

    Private API: the two callback classes (``ray.train.v2._internal``) and the trainer's
    ``_create_default_callbacks``. Ray Train has no public switch for its default callbacks.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            unused: tuple[type, ...] = (PlacementGroupCleanerCallback,)
            if not self.datasets:
                unused += (DatasetsCallback,)
            defaults = super()._create_default_callbacks()  # type: ignore[misc]  # Train V2 (default)
            return [cb for cb in defaults if not isinstance(cb, unused)]

    return LeanTorchTrainer


def trainer_class() -> type:
    """The lean trainer in a lean local runtime, else Ray's stock ``TorchTrainer``."""
    from ray.train.torch import TorchTrainer

    return _lean_trainer_class() if is_lean_runtime() else TorchTrainer


@dataclass(frozen=True)
class TrainerRun(Generic[T]):
    """A finished Ray Train run: what ``read_checkpoint`` returned for its last checkpoint, and the
    run's folder under the storage path."""

    checkpoint: T
    path: str


def run_trainer(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    *,
    workers: int,
    cpus_per_worker: int,
    use_gpu: bool,
    storage_path: Path | str,
    run_name: str,
    read_checkpoint: Callable[[Path], T],
    max_failures: int = 0,
    callbacks: Sequence[Any] = (),
    verbose: bool = False,
) -> TrainerRun[T]:
    """Run ``loop(loop_config)`` on ``workers`` Ray Train workers; ``read_checkpoint`` reads the last
    checkpoint's folder (it is gone once this returns).

    Re-running with the same ``run_name`` and ``storage_path`` resumes from the latest checkpoint
    (two kept). ``callbacks`` go to the run config (e.g. Ray Tune's report callback when a sweep
    trial runs this trainer). Not ``verbose``: Ray Train's own INFO lines (every rank's report of
    every epoch, the worker group's start) stay in Ray's log files, off the console.
    """
    import ray
    import ray.train

    config_ref = ray.put(loop_config)  # held by this frame until the run ends (restarted workers get it too)
    trainer = trainer_class()(
        _config_from_object_store(loop),
        train_loop_config={CONFIG_REF_KEY: config_ref},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_location(storage_path),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=list(callbacks) or None,
            # Train V2's RunConfig (Ray's default) has it; the type stubs describe V1's
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),  # type: ignore[call-arg]
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as d:
        value = read_checkpoint(Path(d))
    return TrainerRun(checkpoint=value, path=str(result.path))


CONFIG_REF_KEY = "imgflow_config"
"""The key of the loop config's object reference in what Ray Train's ``train_loop_config`` holds."""


def _config_from_object_store(loop: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """``loop`` reading its config from Ray's object store. Ray Train also hands ``train_loop_config`` to
    its controller (in ``TrainRunContext``), which unpickles it: imgflow's run records there would import
    torch, timm and the training stack into a process that never trains, on the path to the first epoch
    (measured: 4.9 s of imports in the controller before it asked for the workers' resources). An object
    reference unpickles to itself; the workers fetch the config (Ray's own serialisation, actor handles
    included), as Ray Train does with the loop function itself."""

    @functools.wraps(loop)
    def run(config: dict[str, Any]) -> None:
        import ray

        loop(ray.get(config[CONFIG_REF_KEY]))

    return run


def storage_location(storage_path: Path | str) -> str:
    """What ``RunConfig.storage_path`` gets: a URI (``s3://...``, ``gs://...``, any pyarrow/fsspec
    filesystem) as it is, a local folder as an absolute path (every node must mount it there)."""
    text = str(storage_path)
    if "://" in text:
        return text
    return str(Path(text).expanduser().resolve())


# --------------------------------------------------------------------------- inside a worker


def configure_worker_logging(*, verbose: bool) -> None:
    """Not ``verbose``: this worker logs warnings only.

    ``RunConfig.logging_config`` (see :func:`run_trainer`) quiets the ``ray.train`` loggers, but Ray
    Train 2.60 logs every rank's "Reporting training result N: TrainingReport(...)" on a logger named
    after its source file (``logging.getLogger(__file__)``), which only the worker's root logger
    (INFO, sent to the driver's console) governs. imgflow's own loggers follow the same switch.
    """
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("components").setLevel(level)
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)


def worker_rank_and_world() -> tuple[int, int]:
    """This worker's rank and the number of workers."""
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def prepare_loader(loader: Any, *, add_dist_sampler: bool = True) -> Any:
    """The loader moved to this worker's device, sharded over the workers unless its sampler already is."""
    import ray.train.torch

    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=add_dist_sampler)


def prepare_model(model: Any) -> Any:
    """The model on this worker's device, wrapped in DistributedDataParallel with several workers."""
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


def worker_device() -> Any:
    """This worker's ``torch.device``."""
    import ray.train.torch

    return ray.train.torch.get_device()


@contextlib.contextmanager
def latest_checkpoint() -> Iterator[Path | None]:
    """The run's latest reported checkpoint as a local folder (None: a fresh run)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        yield None
        return
    with ckpt.as_directory() as d:
        yield Path(d)


def report(metrics: dict[str, Any], *, checkpoint_dir: Path | None) -> None:
    """Report one epoch (every rank, same metrics); rank 0 passes the checkpoint folder it wrote."""
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint)


# --------------------------------------------------------------------------- Ray Tune


class TrialEvents(Protocol):
    """What a sweep hears about its trials (``components.train.tune.SweepRecorder``)."""

    def start(self, trial_id: str, config: Mapping[str, Any]) -> None: ...

    def result(self, trial_id: str, result: Mapping[str, Any]) -> None: ...

    def finish(
        self, trial_id: str, config: Mapping[str, Any], *, status: str, error: str | None = None
    ) -> None: ...


def tune_search_space(space: Mapping[str, Mapping[str, list[Any]]]) -> dict[str, Any]:
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


def trial_id() -> str:
    """The running Tune trial's id (stable: a restarted trial resumes its Ray Train run)."""
    import ray.tune

    return str(ray.tune.get_context().get_trial_id())


def trial_report_callbacks() -> list[Any]:
    """Ray Train callbacks that forward every epoch's report to the Tune trial running the trainer."""
    from ray.tune.integration.ray_train import TuneReportCallback

    return [TuneReportCallback()]


def let_train_find_the_cluster() -> None:
    """Put this cluster's address in ``RAY_ADDRESS`` for the trial's Train controller.

    When ASHA stops a trial, its driver (this process) dies and takes the Train controller with it.
    Ray Train V2 then frees the workers' placement group from a helper actor that finds the cluster
    by scanning the machine for Ray processes. With a second Ray instance on the machine that scan
    fails, the CPUs stay reserved, and the next trials wait forever. Ray Train propagates the
    variables in its list to the controller, and the controller's children inherit them.
    """
    import ray

    os.environ.setdefault(RAY_ADDRESS_ENV, ray.get_runtime_context().gcs_address)
    _propagate_to_train_controller(RAY_ADDRESS_ENV)


def _propagate_to_train_controller(variable: str) -> None:
    """Have Ray Train pass ``variable`` (when set) from this process to its controller and workers.

    Private API: ``ray.train.v2._internal.constants.ENV_VARS_TO_PROPAGATE``, the list Ray Train reads;
    the controller's runtime environment has no public setting (``RunConfig.worker_runtime_env``
    reaches the workers only). Changes this process's list only.
    """
    from ray.train.v2._internal import constants

    constants.ENV_VARS_TO_PROPAGATE.add(variable)


def tune_callback(target: TrialEvents | None) -> Any:
    """A ``ray.tune.Callback`` forwarding trial events to ``target`` (runs in this process); the
    results without Tune's own bookkeeping keys (iteration counters, timestamps, host, pid).

    Tune pickles its run config (callbacks included) into the experiment folder: the target, with
    its MLflow logger and display, stays out of that copy.
    """
    from ray import tune
    from ray.tune.result import AUTO_RESULT_KEYS

    tune_keys = frozenset(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag"}

    class _Forward(tune.Callback):
        def __init__(self, target: TrialEvents | None) -> None:
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

    return _Forward(target)


def _trial_error(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        return Path(path).read_text().strip().splitlines()[-1]
    return "the trial failed (see the Ray logs)"


def _scheduler(kind: str, *, max_t: int, grace_period: int, reduction_factor: float) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_t,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
    )


def run_tuner(
    trial: Callable[..., None],
    *,
    trial_kwargs: dict[str, Any],
    trial_memory: int,
    search_space: Mapping[str, Mapping[str, list[Any]]],
    metric: str,
    mode: str,
    num_samples: int,
    scheduler: str,
    max_t: int,
    grace_period: int,
    reduction_factor: float,
    max_concurrent: int,
    seed: int,
    name: str,
    storage_path: Path,
    events: TrialEvents,
) -> None:
    """Run a Ray Tune sweep of ``trial(config, **trial_kwargs)`` (``config["train"]``: one draw of
    ``search_space``) on the connected runtime; every trial event goes to ``events``.

    A trial reserves ``trial_memory`` bytes and no CPU (the trainer it drives takes the CPUs);
    ``scheduler``: ``asha`` (stops trailing trials after ``grace_period`` of ``max_t`` epochs) or
    ``fifo``; ``seed`` fixes the draws.
    """
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = tune.with_resources(
        tune.with_parameters(trial, **trial_kwargs), {"cpu": 0, "memory": trial_memory}
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"train": tune_search_space(search_space)},
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=num_samples,
            scheduler=_scheduler(
                scheduler, max_t=max_t, grace_period=grace_period, reduction_factor=reduction_factor
            ),
            # max_concurrent here, not TuneConfig.max_concurrent_trials (which would drop random_state)
            search_alg=BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage_path),
            verbose=0,  # the sweep's own display instead of Ray's trial tables
            callbacks=[tune_callback(events)],
        ),
    )
    tuner.fit()
