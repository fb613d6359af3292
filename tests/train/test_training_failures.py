"""Recovery and reproducibility of Ray Train runs, on a small real Fashion-MNIST subset.

One ingest and one local Ray runtime (127.0.0.1) serve the whole module; each test trains in its
own output and state folders, through the same stage functions the CLI calls.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from components.core.config import Params, load_params
from components.pipeline.stages import run_evaluate, run_ingest, run_register, run_train
from components.train import ray_adapter
from components.train.ray_adapter import RayOptions
from tests.conftest import fast_ray_runtime, write_small_params


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 real images per class and source split, ingested once for the module."""
    root = tmp_path_factory.mktemp("data-project")
    params = load_params(
        write_small_params(root, max_per_class=60),
        [f"project.data_dir={root / 'data'}"],
    )
    run_ingest(params, progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[None]:
    """One local Ray runtime for the module (tests/conftest.py fast_ray_runtime)."""
    with fast_ray_runtime():
        yield


def _params(project: Path, data_dir: Path, *overrides: str) -> Params:
    robustness = {"enabled": False, "families": ["all"], "max_images": 200}
    path = write_small_params(
        project, max_per_class=60, evaluate={"robustness": robustness, "compare_champion": False}
    )
    base = [
        f"project.data_dir={data_dir}",
        f"project.output_dir={project / 'outputs'}",
        f"project.state_dir={project / '.imgflow'}",
        "train.batch_size=16",
    ]
    return load_params(path, [*base, *overrides])


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _kill_worker_mid_epoch(
    events: Path, ray_results: Path, *, rank: int, killed: list[tuple[int, int]], stop: threading.Event
) -> None:
    """Once Ray Train's controller has registered a checkpoint (its snapshot file exists), SIGKILL
    worker ``rank`` by PID the next time it is inside an epoch (its second batch done)."""
    registered_at = None
    while not stop.is_set():
        if registered_at is None:
            snapshots = list(ray_results.glob("*/checkpoint_manager_snapshot.json"))
            registered_at = time.time() if snapshots else None
        else:
            later = [e for e in _events(events) if e["phase"] == "mid_epoch" and e["rank"] == rank
                     and e["time"] > registered_at]  # fmt: skip
            if later:
                os.kill(later[0]["pid"], signal.SIGKILL)
                killed.append((later[0]["pid"], later[0]["epoch"]))
                return
        time.sleep(0.01)


def test_killed_worker_restarts_from_checkpoint_and_model_is_registered(
    tmp_path: Path,
    data_dir: Path,
    ray_runtime: None,
    capfd: pytest.CaptureFixture[str],
) -> None:
    events = tmp_path / "worker-events.jsonl"
    # Progressive resizing on (half the side at the first epoch, full from the fourth): the resumed run
    # continues the schedule of the epoch it restarts at.
    params = _params(tmp_path, data_dir, "train.epochs=4", "train.max_failures=1",
                     "train.progressive_resize=0.5", "train.progressive_until=0.75")  # fmt: skip
    killed: list[tuple[int, int]] = []
    stop = threading.Event()
    killer = threading.Thread(
        target=_kill_worker_mid_epoch,
        args=(events, tmp_path / ".imgflow" / "ray_results"),
        kwargs={"rank": 1, "killed": killed, "stop": stop},
    )
    killer.start()
    try:
        result = run_train(params, progress=True, ray_options=RayOptions(worker_events=events))
    finally:
        stop.set()
        killer.join()

    assert len(killed) == 1, "worker 1 was never seen inside an epoch after a checkpoint"
    # The module's runtime is local without a dashboard: the lean trainer ran (and recovered).
    assert os.environ.get(ray_adapter.LEAN_RUNTIME_ENV) == "1"
    actors = {a["ActorClassName"] for a in ray._private.state.actors().values()}
    assert "TrainController" in actors
    assert not actors & {"PlacementGroupCleaner", "DatasetManager"}, actors
    # Rank 0's progress reached the console through the lean runtime's progress file, across the
    # restart: the bar ends on the last epoch and the restart is said once (not by every rank). The
    # default console has no per-rank report lines.
    console = "".join(capfd.readouterr())
    assert "epoch 4/4" in console and console.count("resuming after epoch") == 1, console
    assert "Reporting training result" not in console, console
    killed_pid, killed_epoch = killed[0]
    starts = [e for e in _events(events) if e["phase"] == "start"]
    assert sorted(e["start_epoch"] for e in starts)[:2] == [0, 0] and len(starts) == 4
    # After the kill Ray Train restarts the whole worker group; both ranks resume after the last
    # checkpoint the controller registered: not from scratch, and not past the killed epoch.
    resumed = {e["start_epoch"] for e in starts if e["start_epoch"] > 0}
    assert len(resumed) == 1
    (resumed_at,) = resumed
    assert 1 <= resumed_at <= killed_epoch
    assert killed_pid not in {e["pid"] for e in starts if e["start_epoch"] > 0}
    mid = [e["epoch"] for e in _events(events) if e["phase"] == "mid_epoch" and e["rank"] == 1]
    assert mid == [*range(killed_epoch + 1), *range(resumed_at, 4)]  # the killed epoch ran twice

    history = json.loads((tmp_path / "outputs" / "train" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]  # each epoch once in the final history
    assert [h["input_scale"] for h in history] == pytest.approx([0.5, 2 / 3, 5 / 6, 1.0])
    assert result.final["val_accuracy"] > 0.3  # 10 classes: chance is 0.1

    run_evaluate(params)
    registration = run_register(params, raise_on_gate_failure=False)
    assert registration.version == "1" and "challenger" in registration.aliases
    assert registration.run_id == result.run_id


_RUN_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, ray_runtime: None) -> list[Path]:
    """Two fresh 2-epoch runs with the same seed, data version and params, in separate projects."""
    projects = []
    for i in range(2):
        project = tmp_path_factory.mktemp(f"run{i}")
        # mlflow.set_tracking_uri (run by each stage) exports $MLFLOW_TRACKING_URI, which would send
        # the second run to the first project's store.
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        run_train(_params(project, data_dir, "train.epochs=2"), progress=False)
        projects.append(project)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return projects


def _history(project: Path) -> list[dict[str, Any]]:
    return json.loads((project / "outputs" / "train" / "history.json").read_text())


@pytest.mark.slow
def test_same_seed_data_and_params_give_identical_metrics(two_runs: list[Path]) -> None:
    a, b = (_history(p) for p in two_runs)
    assert len(a) == len(b) == 2
    for ea, eb in zip(a, b, strict=True):
        for k in _RUN_KEYS:
            assert ea[k] == pytest.approx(eb[k], rel=0, abs=1e-6), (k, ea, eb)


@pytest.mark.slow
def test_resume_continues_a_stopped_run_from_its_last_epoch(
    two_runs: list[Path], data_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    project = two_runs[1]
    before = _history(project)
    run_before = json.loads((project / "outputs" / "train" / "run.json").read_text())
    events = project / "worker-events.jsonl"
    capfd.readouterr()
    result = run_train(
        _params(project, data_dir, "train.epochs=4"), progress=True, resume=True,
        ray_options=RayOptions(worker_events=events, verbose=True),
    )  # fmt: skip
    console = "".join(capfd.readouterr())

    after = _history(project)
    assert [h["epoch"] for h in after] == [0, 1, 2, 3]
    assert after[:2] == before  # epochs 0-1 restored from the checkpoint, not trained again
    starts = [e for e in _events(events) if e["phase"] == "start"]
    assert sorted(e["start_epoch"] for e in starts) == [2, 2]  # both ranks began at epoch 2
    assert {e["epoch"] for e in _events(events) if e["phase"] == "mid_epoch"} == {2, 3}
    assert result.run_id == run_before["run_id"]  # the same MLflow run continues
    # The cosine now spans 4 epochs: the 2-epoch run ended at the floor, epoch 2 is above it again.
    assert after[2]["lr"] > after[1]["lr"] > 0
    # Verbose: today's detail, Ray's per-rank report lines and one line per epoch trained.
    assert "Reporting training result" in console and "resuming after epoch 2" in console, console
    assert "epoch 3/4: train_loss" in console and "epoch 4/4: train_loss" in console, console
    assert "epoch 2/4: train_loss" not in console, console
