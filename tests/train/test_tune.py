"""``imgflow tune``: the tune section's rules (fast, in memory) and one real Ray Tune sweep of 2 trials
x 1 epoch on a tiny real Fashion-MNIST subset (local Ray on 127.0.0.1, sqlite MLflow in tmp_path)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from components.core.config import Params, TrainConfig, TuneConfig, load_params
from components.core.errors import ConfigError
from components.pipeline.stages import run_ingest
from components.train.ray_adapter import tune_search_space
from components.train.tune import (
    SweepRecorder,
    TrialSetup,
    best_params,
    best_trial,
    check_search_space,
    plot_trials,
    trial_table,
)
from tests.conftest import REPO, run_cli, write_small_params

# Every range and choice excludes the value write_small_params trains with (lr 0.005, batch_size 32,
# weight_decay 0.05, label_smoothing 0.0): the best params file must show the sampled values.
SPACE = {
    "lr": {"loguniform": [0.006, 0.009]},
    "weight_decay": {"choice": [0.01, 0.02]},
    "batch_size": {"choice": [16, 24]},
    "label_smoothing": {"uniform": [0.05, 0.1]},
}


def _tune(*overrides: str) -> TuneConfig:
    return load_params(REPO / "params.yaml", list(overrides)).tune


# --------------------------------------------------------------------------- config rules


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tune.search_space.lrr={uniform: [0, 1]}", "unknown train key(s) ['lrr']"),
        ("tune.search_space.lr={normal: [0.001, 0.01]}", "unknown distribution 'normal'; known: choice"),
        ("tune.search_space.lr={loguniform: [0, 0.01]}", "low must be > 0"),
        ("tune.search_space.lr={uniform: [0.01, 0.001]}", "low must be < high"),
        ("tune.search_space.lr={uniform: [0.01]}", "expected [low, high]"),
        ("tune.search_space.lr={uniform: [a, b]}", "must be numbers"),
        ("tune.search_space.lr=0.01", "expected one distribution"),
        ("tune.search_space.lr={choice: []}", "expected a non-empty list"),
        ("tune.search_space.workers={choice: [1, 2]}", "['workers'] cannot be swept"),
        ("tune.search_space.epochs={choice: [1, 2]}", "['epochs'] cannot be swept"),
        ("tune.metric=val_f2", "tune.metric"),
        ("tune.grace_period=5", "grace_period (5) must be <= tune.epochs (3)"),
    ],
)
def test_bad_tune_params_name_what_is_wrong(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _tune(override)
    assert "tune" in str(err.value) and message in str(err.value)


def test_search_space_is_normalised() -> None:
    assert _tune().search_space == Params().tune.search_space  # params.yaml holds the defaults
    yaml_text = _tune("tune.search_space={lr: {loguniform: [1e-3, 1e-2]}, warmup_epochs: {randint: [1, 3]}}")
    assert yaml_text.search_space == {
        "lr": {"loguniform": [0.001, 0.01]},
        "warmup_epochs": {"randint": [1, 3]},
    }
    dropped = _tune("tune.search_space.batch_size=null").search_space
    assert "batch_size" not in dropped and "lr" in dropped
    assert _tune().resolved_mode() == "min" and _tune("tune.metric=val_accuracy").resolved_mode() == "max"
    assert _tune("tune.metric=val_accuracy", "tune.mode=min").resolved_mode() == "min"


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"label_smoothing": {"uniform": [0.0, 1.5]}}, "tune.search_space.label_smoothing can draw 1.5"),
        ({"optimizer": {"choice": ["adamw", "lion"]}}, "tune.search_space.optimizer can draw 'lion'"),
        ({"batch_size": {"choice": [64, 0]}}, "train.batch_size"),
    ],
)
def test_search_space_values_must_be_valid_train_values(space: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="refused") as err:
        check_search_space(TrainConfig(), TuneConfig(search_space=space).search_space)
    assert message in str(err.value)


def test_ray_domains_stay_within_the_declared_ranges() -> None:
    space = TuneConfig(
        search_space={
            "lr": {"loguniform": [1e-3, 1e-2]},
            "warmup_epochs": {"randint": [1, 2]},
            "optimizer": {"grid": ["adamw", "sgd"]},
            "batch_size": {"choice": [16, 24]},
        }  # fmt: skip
    ).search_space
    domains = tune_search_space(space)
    assert domains["optimizer"] == {"grid_search": ["adamw", "sgd"]}
    lrs = [domains["lr"].sample() for _ in range(200)]
    assert all(1e-3 <= v <= 1e-2 for v in lrs) and min(lrs) < 2e-3 < 5e-3 < max(lrs)  # log scale
    assert {int(domains["warmup_epochs"].sample()) for _ in range(100)} == {1, 2}  # high included
    assert {int(domains["batch_size"].sample()) for _ in range(100)} == {16, 24}


def test_cli_refuses_a_bad_search_space_before_starting_ray(tmp_path: Path) -> None:
    write_small_params(tmp_path)
    proc = run_cli("tune", "--set", "tune.search_space.lr={gauss: [0.1, 1]}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "unknown distribution 'gauss'" in proc.stderr and not (tmp_path / ".imgflow").exists()


class _MemoryLog:
    """A ``SweepLog`` kept in memory: what the recorder records (the MLflow one is
    ``components.pipeline.tuning.MlflowSweepLog``, used by the real sweep below)."""

    def __init__(self, parent_run_id: str = "parent") -> None:
        self.parent_run_id = parent_run_id
        self.runs: dict[str, dict] = {}

    def start_trial_run(self, *, run_name: str, params: dict, tags: dict) -> str:
        run_id = f"run-{len(self.runs) + 1}"
        self.runs[run_id] = {
            "name": run_name,
            "params": params,
            "tags": dict(tags),
            "metrics": [],
            "status": None,
        }
        return run_id

    def log_metrics(self, run_id: str, metrics: dict, *, step: int | None = None) -> None:
        self.runs[run_id]["metrics"].append((step, metrics))

    def set_tags(self, run_id: str, tags: dict) -> None:
        self.runs[run_id]["tags"].update(tags)

    def log_artifacts(self, run_id: str, paths: list[Path], *, artifact_path: str) -> None:
        self.runs[run_id].setdefault("artifacts", []).extend(paths)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.runs[run_id]["status"] = status


def test_recorder_turns_trial_events_into_child_runs_and_rows(tmp_path: Path) -> None:
    tracking = _MemoryLog()
    setup = TrialSetup(train=TrainConfig(), epochs=2, data_dir=tmp_path, weights_dir=tmp_path,
                       storage_path=tmp_path, seed=0, use_gpu=False)  # fmt: skip
    recorder = SweepRecorder(log=tracking, setup=setup, metric="val_loss", total=3, show=False)
    epoch = {"train_loss": 1.0, "val_accuracy": 0.5, "lr": 0.01, "finished_at": 1e9, "stopped_early": False}
    with recorder:
        recorder.start("a", {"train": {"lr": np.float64(0.007), "batch_size": np.int64(16)}})
        recorder.start("b", {"train": {"lr": 0.002, "batch_size": 24}})
        for e, (la, lb) in enumerate([(1.5, 1.4), (0.9, 1.1)]):
            recorder.result("a", {**epoch, "epoch": e, "val_loss": la, "checkpoint_path": f"/ckpt/a{e}"})
            if e == 0:
                recorder.result("b", {**epoch, "epoch": e, "val_loss": lb})
        recorder.finish("a", {}, status="FINISHED")
        recorder.finish("b", {}, status="FINISHED")  # one epoch of two: stopped by ASHA
        recorder.finish("c", {"train": {"lr": 0.05, "batch_size": 16}}, status="ERROR", error="boom")
    a, b, c = (recorder.trials[t] for t in "abc")
    assert (a.status, b.status, c.status) == ("FINISHED", "STOPPED", "ERROR")
    assert [tracking.runs[r.run_id]["status"] for r in (a, b, c)] == ["FINISHED", "FINISHED", "FAILED"]
    run_a = tracking.runs[a.run_id]
    assert run_a["tags"] == {"stage": "tune-trial", "trial_id": "a"}
    assert run_a["params"]["sampled"] == {"lr": 0.007, "batch_size": 16}  # numpy scalars made plain
    assert run_a["params"]["train"]["epochs"] == 2 and run_a["params"]["train"]["lr"] == 0.007
    step, logged = run_a["metrics"][1]
    assert (
        step == 1
        and logged["val_loss"] == 0.9
        and not {"epoch", "finished_at", "stopped_early"} & set(logged)
    )
    assert a.checkpoint == "/ckpt/a1" and tracking.runs[c.run_id]["tags"]["error"] == "boom"

    records = [a, b, c]
    best = best_trial(records, metric="val_loss", mode="min")
    assert best is a and best_trial(records, metric="val_loss", mode="max") is b
    rows = trial_table(records, metric="val_loss", best=best)
    assert [(r["trial"], r["status"], r["epochs"], r["best"]) for r in rows] == [
        (1, "FINISHED", 2, True), (2, "STOPPED", 1, False), (3, "ERROR", 0, False),
    ]  # fmt: skip
    assert rows[0]["train.lr"] == 0.007 and rows[2]["error"] == "boom" and rows[2]["val_loss"] is None
    tuned = best_params(Params(), best.sampled)
    assert tuned["train"]["lr"] == 0.007 and tuned["train"]["batch_size"] == 16
    assert tuned["train"]["epochs"] == Params().train.epochs and tuned["tune"] == Params().to_dict()["tune"]
    png = plot_trials(records, tmp_path / "trials.png", metric="val_loss", best=best)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_sweep_where_every_trial_failed_says_why() -> None:
    tracking, setup = _MemoryLog(), TrialSetup(TrainConfig(), 1, Path(), Path(), Path(), 0, False)
    recorder = SweepRecorder(log=tracking, setup=setup, metric="val_loss", total=1, show=False)
    recorder.finish("a", {"train": {}}, status="ERROR", error="ConfigError: unknown model 'resnet'")
    with pytest.raises(
        RuntimeError, match="no trial of the sweep reported val_loss: ConfigError: unknown model"
    ):
        best_trial(list(recorder.trials.values()), metric="val_loss", mode="min")


# --------------------------------------------------------------------------- a real sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``imgflow tune --json`` as a user runs it: 2 trials x 1 epoch, both at once (1 worker each)."""
    project = tmp_path_factory.mktemp("tune-project")
    tune = {
        "num_samples": 2,
        "epochs": 1,
        "scheduler": "fifo",
        "max_concurrent_trials": 2,
        "search_space": SPACE,
    }
    write_small_params(project, max_per_class=20, train={"workers": 1, "cpus_per_worker": 1}, tune=tune)
    ingest = load_params(project / "params.yaml", [f"project.data_dir={project / 'data'}"])
    run_ingest(ingest, progress=False)
    proc = run_cli("tune", "--json", cwd=project, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"project": project, "result": json.loads(proc.stdout)}


def test_sweep_logs_one_child_run_per_trial_under_the_parent(sweep: dict) -> None:
    result = sweep["result"]
    client = MlflowClient(tracking_uri=result["tracking_uri"])
    parent = client.get_run(result["run_id"])
    assert parent.info.run_name == "tune" and parent.info.status == "FINISHED"
    children = client.search_runs(
        [result["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{result['run_id']}'"
    )
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_loss")
        assert [m.step for m in history] == [0] and math.isfinite(history[0].value)
        assert 0.006 <= float(child.data.params["train.lr"]) <= 0.009
        assert child.data.params["train.epochs"] == "1"
    losses = {c.info.run_id: c.data.metrics["val_loss"] for c in children}
    best = [c.info.run_id for c in children if c.data.tags["best_trial"] == "true"]
    assert best == [min(losses, key=losses.__getitem__)] == [result["best"]["run_id"]]
    assert parent.data.tags["best_run_id"] == best[0]
    assert parent.data.metrics["best_val_loss"] == pytest.approx(losses[best[0]])


def test_best_params_file_holds_the_best_trial_values(sweep: dict) -> None:
    project, result = sweep["project"], sweep["result"]
    best_file = project / result["best_params"]
    assert best_file == project / "outputs" / "tune" / "best_params.yaml"
    tuned = load_params(best_file)
    sampled = result["best"]["train"]
    assert tuned.train.lr == pytest.approx(sampled["lr"]) and 0.006 <= tuned.train.lr <= 0.009
    assert tuned.train.weight_decay == sampled["weight_decay"] and tuned.train.weight_decay in (0.01, 0.02)
    assert tuned.train.batch_size == sampled["batch_size"] and tuned.train.batch_size in (16, 24)
    assert tuned.train.label_smoothing == pytest.approx(sampled["label_smoothing"])
    assert 0.05 <= tuned.train.label_smoothing <= 0.1
    original = load_params(project / "params.yaml")
    assert tuned.train.epochs == original.train.epochs == 8  # the sweep's 1-epoch trials do not leak
    assert tuned.model_copy(update={"train": original.train}) == original  # nothing else changed


def test_trial_table_and_plot_list_both_trials(sweep: dict) -> None:
    project, result = sweep["project"], sweep["result"]
    with (project / result["trials_csv"]).open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and sorted(r["trial"] for r in rows) == ["1", "2"]
    assert {r["trial_id"] for r in rows} == {t["trial_id"] for t in result["trials"]}
    assert [r["best"] for r in rows].count("True") == 1
    assert all(r["status"] == "FINISHED" and r["epochs"] == "1" and float(r["val_loss"]) > 0 for r in rows)
    assert json.loads((project / result["trials_json"]).read_text()) == result["trials"]
    assert (project / result["plot"]).read_bytes()[:4] == b"\x89PNG"
