"""The Ray adapter: every Ray import of the train package is in it, and each private Ray API it
leans on still exists and still does what the adapter needs (these tests fail when Ray changes one).
"""

from __future__ import annotations

import ast
import inspect
import logging
from pathlib import Path

import pytest

from components.train import ray_adapter as ra
from tests.conftest import REPO

TRAIN_MODULES = sorted((REPO / "components" / "train").glob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_only_the_adapter_imports_ray() -> None:
    importers = {
        p.name
        for p in [*TRAIN_MODULES, REPO / "components" / "pipeline" / "tuning.py"]
        if any(m == "ray" or m.startswith("ray.") for m in _imported_modules(p))
    }
    assert importers == {"ray_adapter.py"}


def test_ray_options_come_from_the_environment_the_entry_point_passes() -> None:
    env = {"RAY_ADDRESS": "10.0.0.5:6379", ra.RAY_DASHBOARD_ENV: "1", ra.WORKER_EVENTS_ENV: "/tmp/ev.jsonl"}
    assert ra.RayOptions.from_env(env, verbose=True) == ra.RayOptions(
        address="10.0.0.5:6379", dashboard=True, worker_events=Path("/tmp/ev.jsonl"), verbose=True
    )
    assert ra.RayOptions.from_env({}) == ra.RayOptions()
    assert ra.RayOptions.from_env({"RAY_ADDRESS": "", ra.RAY_DASHBOARD_ENV: "0"}).address is None


def test_quiet_ray_train_logging_is_a_public_run_setting() -> None:
    """Ray Train V2 filters its own per-rank INFO lines (``Reporting training result ...``) by
    ``RunConfig.logging_config``: the run config imgflow builds when not verbose."""
    import ray.train

    config = ray.train.RunConfig(logging_config=ray.train.LoggingConfig(log_level="WARNING"))
    assert config.logging_config.log_level == "WARNING"


# --------------------------------------------------------------------------- private Ray APIs


def test_start_local_ray_private_node_address_argument() -> None:
    """``_start_local_ray`` passes ``ray.init(_node_ip_address=...)`` (that the runtime really binds
    127.0.0.1 is checked where a runtime runs: tests/train/test_training.py)."""
    import ray

    source = inspect.getsource(inspect.unwrap(ray.init))  # a keyword Ray pops from **kwargs
    assert 'kwargs.pop("_node_ip_address"' in source


def test_token_auth_notice_is_logged_where_the_adapter_quiets_it(caplog: pytest.LogCaptureFixture) -> None:
    """Ray announces token authentication on the logger ``_quiet_token_auth_notice`` lowers; quiet,
    the notice is gone; verbose (or after), it is back."""
    import importlib

    setup = importlib.import_module(ra._TOKEN_AUTH_LOGGER)
    assert setup.logger.name == ra._TOKEN_AUTH_LOGGER

    def notices() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            setup._warn_token_auth_enabled()
        return [r.getMessage() for r in caplog.records if r.name == ra._TOKEN_AUTH_LOGGER]

    with ra._quiet_token_auth_notice(True):
        assert notices() == []
    with ra._quiet_token_auth_notice(False):
        assert any("Token authentication is enabled" in m for m in notices())
    assert notices()


def test_propagate_to_train_controller_private_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """``_propagate_to_train_controller`` adds to the list Ray Train copies from the driver's
    environment into its controller's (and the trainer still reads that list)."""
    from ray.train.v2._internal import constants
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    name = "IMGFLOW_TEST_PROPAGATED"
    monkeypatch.setenv(name, "yes")
    try:
        ra._propagate_to_train_controller(name)
        assert constants.get_env_vars_to_propagate()[name] == "yes"
    finally:
        constants.ENV_VARS_TO_PROPAGATE.discard(name)
    assert "get_env_vars_to_propagate" in inspect.getsource(DataParallelTrainer)


def test_train_poll_interval_is_the_variable_ray_trains_controller_reads() -> None:
    """Private API: the variable ``init_ray`` sets for a local runtime is the one Ray Train's controller
    reads for its poll interval, and one the trainer copies from the driver into the controller."""
    from ray.train.v2._internal import constants
    from ray.train.v2._internal.execution.controller import controller

    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR == ra.TRAIN_POLL_ENV
    assert ra.TRAIN_POLL_ENV in constants.ENV_VARS_TO_PROPAGATE
    assert "os.getenv(HEALTH_CHECK_INTERVAL_S_ENV_VAR" in inspect.getsource(controller)
    assert 0 < float(ra.TRAIN_POLL_S) < constants.DEFAULT_HEALTH_CHECK_INTERVAL_S


def test_lean_local_trainer_leaves_out_only_the_helpers_it_cannot_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Private API (``_lean_trainer_class``): a local runtime without the dashboard
    (``LEAN_RUNTIME_ENV``) trains without Ray Train's placement-group cleaner and, when given no Ray
    Datasets, without its dataset manager; every other default callback stays. A cluster (or a
    dashboard) gets the stock ``TorchTrainer``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    def callbacks(trainer_cls: type, **kw: object) -> set[str]:
        trainer = trainer_cls(lambda _c: None, scaling_config=ray.train.ScalingConfig(num_workers=1), **kw)
        return {type(cb).__name__ for cb in trainer._create_default_callbacks()}

    monkeypatch.delenv(ra.LEAN_RUNTIME_ENV, raising=False)
    assert ra.trainer_class() is TorchTrainer
    stock = callbacks(TorchTrainer)
    assert {"PlacementGroupCleanerCallback", "DatasetsCallback"} <= stock

    monkeypatch.setenv(ra.LEAN_RUNTIME_ENV, "1")
    lean = ra.trainer_class()
    assert issubclass(lean, TorchTrainer) and lean is not TorchTrainer
    assert callbacks(lean) == stock - {"PlacementGroupCleanerCallback", "DatasetsCallback"}
    # A dataset factory (called only when training starts): a real Ray Dataset would start Ray here.
    with_data = callbacks(lean, datasets={"train": lambda: None})
    assert with_data == stock - {"PlacementGroupCleanerCallback"}
    assert not ray.is_initialized()  # building trainers started no runtime behind the suite's back


def test_quiet_workers_drop_ray_trains_per_rank_report_lines() -> None:
    """Ray Train logs each rank's report on a logger named after its source file (outside
    ``ray.train``, so ``LoggingConfig`` misses it): a quiet worker's root logger drops it; verbose
    keeps today's lines. imgflow's own loggers follow the same switch."""
    import ray.train.v2._internal.execution.context as ray_context

    report_logger = ray_context.logger
    root, ours = logging.getLogger(), logging.getLogger("components")
    saved = root.level, ours.level
    try:
        root.setLevel(logging.INFO)  # what Ray Train sets in a worker
        ra.configure_worker_logging(verbose=True)
        assert report_logger.isEnabledFor(logging.INFO) and ours.isEnabledFor(logging.INFO)
        ra.configure_worker_logging(verbose=False)
        assert not report_logger.isEnabledFor(logging.INFO) and not ours.isEnabledFor(logging.INFO)
        assert report_logger.isEnabledFor(logging.WARNING)
    finally:
        root.setLevel(saved[0])
        ours.setLevel(saved[1])


_ORPHAN_SCRIPT = """
import json, os, subprocess, psutil
from components.train import ray_adapter
assert ray_adapter.init_ray(num_cpus=1)
poll = os.environ.get(ray_adapter.TRAIN_POLL_ENV)
import ray

@ray.remote(num_cpus=0)
class Spawner:
    def spawn(self):  # a child the actor does not wait for: orphaned when the actor goes
        return subprocess.Popen(["sleep", "600"], start_new_session=True).pid

child = ray.get(Spawner.remote().spawn.remote())
in_tree = child in {p.pid for p in psutil.Process().children(recursive=True)}
ray_adapter.shutdown_ray(grace_s=float(os.environ["GRACE_S"]))
print(json.dumps({"child": child, "in_tree": in_tree, "alive": psutil.pid_exists(child), "poll": poll}))
"""


def test_shutdown_stops_runtime_processes_that_outlive_ray_shutdown(tmp_path: Path) -> None:
    """A process of the local runtime's tree that ray.shutdown() leaves running is killed by PID after
    the grace period. Here an actor's own child, orphaned when the actor is stopped, with Ray's own
    cleanup of workers' children switched off (its default kills them; what leaked in CI runs were
    Ray's own actor processes, which no test can make outlive the shutdown on purpose)."""
    import json
    import os
    import subprocess
    import sys

    import psutil

    env = dict(
        os.environ, GRACE_S="2", RAY_USAGE_STATS_ENABLED="0", RAY_kill_child_processes_on_worker_exit="0"
    )
    env.pop(ra.TRAIN_POLL_ENV, None)  # an earlier in-process init_ray of the suite set it here
    proc = subprocess.run([sys.executable, "-c", _ORPHAN_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    try:
        assert result["in_tree"] and not result["alive"]
        assert result["poll"] == ra.TRAIN_POLL_S  # the local runtime's Train poll interval, set by init_ray
        assert "stopped 1 Ray process(es) that outlived ray.shutdown()" in proc.stderr
    finally:
        if psutil.pid_exists(result["child"]):
            psutil.Process(result["child"]).kill()
